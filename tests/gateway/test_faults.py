"""The gateway stays consistent under faults: real encoder, index shard, moto S3
and gateway processes, with S3 hung or stopped through a TCP proxy and shards
killed, frozen and restarted on the same address.

The invariant checked after every fault: every id in the index has its stored
object (``faults.check_invariant``). Objects without an index entry may exist
for a while; RepairCollection indexes them again.
"""

from __future__ import annotations

import io
import signal
import threading
import time

import boto3
import grpc
import numpy as np
import pytest
from PIL import Image

from clipsearch.gateway.v1 import gateway_service_pb2 as gpb
from clipsearch.index.v1 import index_service_pb2 as ipb
from clipsearch.vectors import pack_matrix
from gateway.shards import shard_for_id
from tests.gateway.conftest import Client, http_get, noise_image, noise_pixels, sha, start_gateway
from tests.gateway.faults import (
    HANG, PASS, STOP, S3Proxy, all_keys, check_invariant, index_stub, shard_ids, start_shards, stored_ids,
    wait_repair,
)

OK = grpc.StatusCode.OK.value[0]
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
RETRYABLE = {UNAVAILABLE, DEADLINE_EXCEEDED}
RETRYABLE_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
PREFIX = "faults/"  # storage prefix inside each bucket
ACCEPTED_FORMATS = "JPEG, PNG, WebP, BMP or GIF"


def code_name(code: int) -> str:
    return next((c.name for c in grpc.StatusCode if c.value[0] == code), str(code))


def codes(results) -> list[str]:
    return [code_name(r.status.code) for r in results]


def make_bucket(endpoint: str, name: str):
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=name)
    return s3


def images(first_seed: int, count: int) -> list[bytes]:
    return [noise_image(first_seed + i) for i in range(count)]


def on_shard(datas: list[bytes], shard: int, shards: int = 2) -> list[bytes]:
    return [d for d in datas if shard_for_id(sha(d), shards) == shard]


def create_collection(client: Client, name: str, index_spec: str = "") -> None:
    client.CreateCollection(gpb.CreateCollectionRequest(name=name, index_spec=index_spec))


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    """The RpcError ``call`` raises; fails the test when it succeeds."""
    try:
        response = call(*args, **kwargs)
    except grpc.RpcError as err:
        return err
    pytest.fail(f"expected an error, got a response: {response}")


class Stack:
    """Shards and gateways of one test module, stopped together."""

    def __init__(self, workdir, encoder, s3_endpoint, bucket: str):
        self.workdir = workdir
        self.encoder = encoder
        self.bucket = bucket
        self.s3_endpoint = s3_endpoint
        self.s3 = make_bucket(s3_endpoint, bucket)
        self.shards = start_shards(workdir)
        self.gateways = []
        self.clients = []

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.shards]

    def gateway(self, *args: str, name: str, env: dict | None = None, endpoint: str = "",
                default_collection: str = "fx-default") -> Client:
        proc = start_gateway(self.workdir, self.encoder, self.shards,
                             "--storage", f"s3://{self.bucket}/{PREFIX}",
                             "--s3-endpoint-url", endpoint or self.s3_endpoint,
                             "--default-collection", default_collection, *args, name=name, env=env)
        self.gateways.append(proc)
        client = Client(proc.address)
        self.clients.append(client)
        return client

    def invariant(self, collection: str) -> tuple[set[str], set[str]]:
        return check_invariant(self.s3, self.bucket, PREFIX, collection, self.addresses)

    def stop(self) -> None:
        """SIGTERM every gateway at once, then every shard; kills what outlives 10 s."""
        for client in self.clients:
            client.close()
        for proc in self.gateways:
            proc.signal(signal.SIGTERM)
        for proc in self.gateways:
            proc.wait(10)
        for shard in self.shards:
            shard.cont()
            if shard.proc is not None:
                shard.proc.signal(signal.SIGTERM)
        for shard in self.shards:
            if shard.proc is not None:
                shard.proc.wait(10)


# ---------------------------------------------------------------- 1. index write timed out but committed

BULK_ROWS = 220_000  # per request: ~60 MB on the wire (the limit is 64 MiB); ~1.6 s under the write lock
BULK_REQUESTS = 2  # sent together: the second waits for the lock ahead of the gateway's write, ~3+ s in all


def bulk_requests(collection: ipb.Collection, name: str) -> list[ipb.UpsertVectorsRequest]:
    rng = np.random.default_rng(7)
    requests = []
    for part in range(BULK_REQUESTS):
        vectors = rng.standard_normal((BULK_ROWS, collection.dim)).astype("float32")
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        requests.append(ipb.UpsertVectorsRequest(
            collection=name, ids=[f"bulk-{part}-{i:07d}" for i in range(BULK_ROWS)], vectors=pack_matrix(vectors),
            model_fingerprint=collection.model_fingerprint))
    return requests


def wait_until_write_locked(stub, probe: ipb.UpsertVectorsRequest, still_loading, timeout: float = 30) -> None:
    """Returns once the shard answers reads at once but a one-row write of a bulk id waits: the bulk
    load holds the collection's write lock (not merely a busy process)."""
    deadline = time.monotonic() + timeout
    while still_loading():
        assert time.monotonic() < deadline, f"the shard did not look write-locked within {timeout}s"
        try:
            stub.FetchVectors(ipb.FetchVectorsRequest(collection=probe.collection, ids=["probe"]), timeout=0.3)
            stub.UpsertVectors(probe, timeout=0.3)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
            try:  # the write timed out; is the process answering reads?
                stub.FetchVectors(ipb.FetchVectorsRequest(collection=probe.collection, ids=["probe"]), timeout=0.3)
                return
            except grpc.RpcError as again:
                if again.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise
        time.sleep(0.02)
    pytest.fail("the bulk load ended before the shard looked write-locked; raise BULK_ROWS")


def test_index_write_that_timed_out_but_committed_keeps_its_object(tmp_path_factory, encoder_service, s3_endpoint):
    """A shard busy with a bulk load past the gateway's index deadline: items routed there fail
    retryably, never OK-but-missing, and the late commit does not leave an index entry without
    its object. Re-uploading the same bytes then succeeds everywhere."""
    stack = Stack(tmp_path_factory.mktemp("fx-busy"), encoder_service, s3_endpoint, "fx-busy")
    try:
        client = stack.gateway("--index-timeout-seconds", "1", name="gateway-busy")
        name = "busy"
        create_collection(client, name, "Flat")  # BULK_ROWS is sized for Flat's adds (HNSW's are ~50x slower)
        collection = client.GetCollection(gpb.GetCollectionRequest(name=name)).collection
        requests = bulk_requests(collection, name)
        busy = index_stub(stack.addresses[0])
        started = time.monotonic()
        loads = [busy.UpsertVectors.future(request, timeout=120) for request in requests]
        probe = ipb.UpsertVectorsRequest(
            collection=name, ids=[requests[0].ids[0]], model_fingerprint=collection.model_fingerprint,
            vectors=pack_matrix(np.frombuffer(requests[0].vectors.data[:collection.dim * 4], "<f4").reshape(1, -1)))
        wait_until_write_locked(busy, probe, lambda: not all(load.done() for load in loads))

        datas = images(1000, 14)
        results = client.upload(datas, collection=name, timeout=30)
        assert not all(load.done() for load in loads), (
            "the bulk load finished before the uploads returned, so the shard was not busy for the whole upload; "
            "raise BULK_ROWS")
        for load in loads:
            load.result()
        bulk_seconds = time.monotonic() - started
        assert len(results) == len(datas)
        busy_ids = {sha(d) for d in on_shard(datas, 0)}
        assert 0 < len(busy_ids) < len(datas)
        for data, result in zip(datas, results):
            if sha(data) in busy_ids:
                assert result.status.code in RETRYABLE, (
                    f"an item on the busy shard reported {code_name(result.status.code)} "
                    f"({result.status.message!r}); expected UNAVAILABLE or DEADLINE_EXCEEDED "
                    f"(the bulk load took {bulk_seconds:.1f}s)")

        # Let the writes queued behind the bulk load land, then drop the bulk rows (test scaffolding).
        time.sleep(0.5)
        bulk_ids = [i for request in requests for i in request.ids]
        for _ in range(20):
            busy.DeleteVectors(ipb.DeleteVectorsRequest(collection=name, ids=bulk_ids), timeout=60)
            if not any(i.startswith("bulk-") for i in shard_ids(stack.addresses[0], name)):
                break
            time.sleep(0.2)

        stored, indexed = stack.invariant(name)
        for data, result in zip(datas, results):  # never OK-but-missing
            if result.status.code == OK:
                assert sha(data) in stored and sha(data) in indexed, f"item {sha(data)} was OK but is missing"

        again = client.upload(datas, collection=name, timeout=30)
        assert codes(again) == ["OK"] * len(datas), [r.status.message for r in again]
        stored, indexed = stack.invariant(name)
        ids = {sha(d) for d in datas}
        assert ids <= stored and ids <= indexed, f"not stored: {ids - stored}; not indexed: {ids - indexed}"
        for data in datas:
            image = client.GetImage(gpb.GetImageRequest(collection=name, id=sha(data))).image
            assert http_get(image.url) == data
    finally:
        stack.stop()


# ---------------------------------------------------------------- 2, 3, 7: S3 behind a proxy


@pytest.fixture(scope="module")
def proxied(tmp_path_factory, encoder_service, s3_endpoint):
    """Two shards and a gateway whose S3 traffic goes through an ``S3Proxy``."""
    with S3Proxy(s3_endpoint) as proxy:
        stack = Stack(tmp_path_factory.mktemp("fx-proxy"), encoder_service, s3_endpoint, "fx-proxied")
        try:
            client = stack.gateway("--storage-timeout-seconds", "2", name="gateway-proxied",
                                   endpoint=proxy.endpoint_url)
            yield stack, proxy, client
        finally:
            proxy.set_mode(PASS)
            stack.stop()


def test_s3_hung_during_uploads(proxied):
    """S3 accepts connections and answers nothing: uploads fail retryably within the storage
    timeout, the index never gets ahead of storage, and a repair indexes what was stored late."""
    stack, proxy, client = proxied
    name = "s3-hung"
    create_collection(client, name)
    before = images(2000, 3)
    assert codes(client.upload(before, collection=name)) == ["OK"] * 3

    failed = images(2100, 10)
    client_deadline = 20
    with proxy.mode_while(HANG):
        started = time.monotonic()
        try:
            results = client.upload(failed, collection=name, timeout=client_deadline)
        except grpc.RpcError as err:
            elapsed = time.monotonic() - started
            assert err.code() in RETRYABLE_CODES, f"{err.code()}: {err.details()}"
            results = None
        else:
            elapsed = time.monotonic() - started
            assert all(r.status.code in RETRYABLE for r in results), codes(results)
        assert elapsed < client_deadline - 1, (
            f"the upload answered after {elapsed:.1f}s, at the client deadline ({client_deadline}s); "
            "the storage timeout is 2s")
    time.sleep(3)  # hung requests drain now that S3 answers again
    stack.invariant(name)

    job = wait_repair(client, name, timeout=30)
    assert job.state == gpb.REPAIR_STATE_SUCCEEDED, job
    stored, indexed = stack.invariant(name)
    assert stored == indexed, f"stored but not indexed after repair: {sorted(stored - indexed)}"

    again = client.upload(failed, collection=name)
    assert codes(again) == ["OK"] * len(failed), [r.status.message for r in again]
    stored, indexed = stack.invariant(name)
    assert stored == indexed
    assert {sha(d) for d in before + failed} <= indexed


def test_s3_stopped_during_uploads(proxied):
    """S3 refuses connections: uploads fail per item with UNAVAILABLE quickly and index nothing."""
    stack, proxy, client = proxied
    name = "s3-stopped"
    create_collection(client, name)
    before = images(3000, 3)
    assert codes(client.upload(before, collection=name)) == ["OK"] * 3
    _, indexed_before = stack.invariant(name)

    failed = images(3100, 6)
    with proxy.mode_while(STOP):
        started = time.monotonic()
        results = client.upload(failed, collection=name, timeout=20)
        elapsed = time.monotonic() - started
        assert codes(results) == ["UNAVAILABLE"] * len(failed), [r.status.message for r in results]
        assert elapsed < 10, f"uploads with S3 down took {elapsed:.1f}s"
        _, indexed = stack.invariant(name)
        assert indexed == indexed_before, f"indexed while S3 was down: {sorted(indexed - indexed_before)}"

    again = client.upload(failed, collection=name)
    assert codes(again) == ["OK"] * len(failed), [r.status.message for r in again]
    stored, indexed = stack.invariant(name)
    assert {sha(d) for d in before + failed} <= stored & indexed


def tiff_image(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(noise_pixels(seed)).save(buffer, "TIFF")
    return buffer.getvalue()


def test_tiff_is_refused_naming_the_accepted_formats(proxied):
    stack, _, client = proxied
    name = "tiff"
    create_collection(client, name)
    tiff, png = tiff_image(4000), noise_image(4001)
    results = client.upload([tiff, png], collection=name)
    assert codes(results) == ["INVALID_ARGUMENT", "OK"], [r.status.message for r in results]
    message = results[0].status.message
    assert ACCEPTED_FORMATS in message and "tiff" not in message.lower(), message
    stored, indexed = stack.invariant(name)
    assert sha(tiff) not in stored and sha(tiff) not in indexed

    err = rpc_error(client.search, gpb.QueryPart(image_data=tiff), collection=name)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{err.code()}: {err.details()}"
    assert ACCEPTED_FORMATS in err.details() and "tiff" not in err.details().lower(), err.details()


# ---------------------------------------------------------------- 4. DeleteCollection with a shard down


def test_delete_collection_with_a_shard_down_finishes_when_it_returns(tmp_path_factory, encoder_service,
                                                                      s3_endpoint):
    """The deletion is recorded as pending, the collection is unusable meanwhile, and it
    completes once the shard is back: nothing deleted comes back."""
    stack = Stack(tmp_path_factory.mktemp("fx-delete"), encoder_service, s3_endpoint, "fx-delete")
    try:
        # The reconcile interval as an environment setting (same setting as --reconcile-interval-seconds).
        client = stack.gateway(name="gateway-delete", env={"CLIPSEARCH_RECONCILE_INTERVAL_SECONDS": "0.5"})
        name = "doomed-x"
        create_collection(client, name)
        datas = images(5000, 10)
        assert on_shard(datas, 0) and on_shard(datas, 1)
        assert codes(client.upload(datas, collection=name)) == ["OK"] * len(datas)
        assert len(stored_ids(stack.s3, stack.bucket, PREFIX, name)) == len(datas)

        down = stack.shards[1]
        down.kill()
        try:
            response = client.DeleteCollection(gpb.DeleteCollectionRequest(name=name), timeout=20)
        except grpc.RpcError as err:
            pytest.fail(f"DeleteCollection with shard {down.address} down failed with {err.code().name}: "
                        f"{err.details()}; expected OK with pending=true")
        assert response.pending, response
        assert list(response.waiting_for_shards) == ["shard-1"], response

        def refused(call, request):
            err = rpc_error(call, request, timeout=10)
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, f"{err.code()}: {err.details()}"
            assert "delet" in err.details().lower(), err.details()

        refused(client.SearchImages, gpb.SearchImagesRequest(collection=name, parts=[gpb.QueryPart(text="x")]))
        refused(client.UploadImages, gpb.UploadImagesRequest(
            collection=name, items=[gpb.UploadItem(data=noise_image(5100))]))
        refused(client.CreateCollection, gpb.CreateCollectionRequest(name=name))
        refused(client.GetCollection, gpb.GetCollectionRequest(name=name))  # the refused create made nothing
        assert not shard_ids(stack.addresses[0], name), "the collection came back on the shard that was up"

        down.restart()
        deadline = time.monotonic() + 20
        while True:
            try:
                client.GetCollection(gpb.GetCollectionRequest(name=name), timeout=5)
                state = "OK"
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.NOT_FOUND:
                    break
                state = f"{err.code().name}: {err.details()}"
            assert time.monotonic() < deadline, f"20s after the shard returned, GetCollection({name!r}) is {state}"
            time.sleep(0.2)
        assert not all_keys(stack.s3, stack.bucket, f"{PREFIX}{name}/"), "objects of the deleted collection remain"

        create_collection(client, name)
        assert client.GetCollection(gpb.GetCollectionRequest(name=name)).collection.vector_count == 0
        for address in stack.addresses:
            assert not shard_ids(address, name), f"deleted vectors came back on {address}"
        stack.invariant(name)
    finally:
        stack.stop()


# ---------------------------------------------------------------- 5. gateway restart during a shard outage


def test_gateway_starts_during_a_shard_outage_and_sees_the_shard_return(tmp_path_factory, encoder_service,
                                                                        s3_endpoint):
    stack = Stack(tmp_path_factory.mktemp("fx-restart"), encoder_service, s3_endpoint, "fx-restart")
    try:
        first = stack.gateway("--shard-failure-policy", "partial", name="gateway-first")
        name = "comeback"
        create_collection(first, name)
        datas = images(6000, 16)
        assert on_shard(datas, 0) and on_shard(datas, 1)
        assert codes(first.upload(datas, collection=name)) == ["OK"] * len(datas)
        query = gpb.QueryPart(image_data=datas[0])

        down = stack.shards[1]
        down.kill()
        try:
            second = stack.gateway("--shard-failure-policy", "partial", "--startup-timeout-seconds", "3",
                                   name="gateway-second")
        except (RuntimeError, TimeoutError) as err:
            pytest.fail(f"a gateway started while shard {down.address} was down did not come up: {err}")

        response = second.search(query, collection=name, top_k=16, timeout=15)
        assert response.partial and list(response.missing_shards) == ["shard-1"], response
        assert {h.id for h in response.hits} == {sha(d) for d in on_shard(datas, 0)}

        down.restart()
        deadline = time.monotonic() + 15
        while True:
            response = second.search(query, collection=name, top_k=16, timeout=10)
            if not response.partial:
                break
            assert time.monotonic() < deadline, f"15s after the shard returned, searches are still partial: " \
                                                f"{list(response.missing_shards)}"
            time.sleep(0.2)
        assert {h.id for h in response.hits} == {sha(d) for d in datas}
        stack.invariant(name)
    finally:
        stack.stop()


# ---------------------------------------------------------------- 6. hung shard (SIGSTOP)


@pytest.fixture(scope="module")
def hung(tmp_path_factory, encoder_service, s3_endpoint):
    """Two shards; a warm partial gateway, a warm fail gateway and a partial gateway that has
    answered nothing yet; collection "hung" with images on both shards."""
    stack = Stack(tmp_path_factory.mktemp("fx-hung"), encoder_service, s3_endpoint, "fx-hung")
    try:
        partial = stack.gateway("--shard-failure-policy", "partial", name="gateway-partial")
        fail = stack.gateway("--shard-failure-policy", "fail", name="gateway-fail")
        cold = stack.gateway("--shard-failure-policy", "partial", name="gateway-cold")
        name = "hung"
        create_collection(partial, name)
        datas = images(7000, 12)
        assert on_shard(datas, 0) and on_shard(datas, 1)
        assert codes(partial.upload(datas, collection=name)) == ["OK"] * len(datas)
        query = gpb.QueryPart(image_data=datas[0])
        for warm in (partial, fail):
            assert not warm.search(query, collection=name, top_k=12).partial
        yield stack, name, datas, partial, fail, cold
    finally:
        stack.stop()


def test_hung_shard_gives_partial_results_from_a_warm_gateway(hung):
    stack, name, datas, partial, _, _ = hung
    frozen = stack.shards[1]
    with frozen.frozen():
        started = time.monotonic()
        try:
            response = partial.search(gpb.QueryPart(image_data=datas[0]), collection=name, top_k=12, timeout=15)
        except grpc.RpcError as err:
            pytest.fail(f"search with shard {frozen.address} hung: {err.code().name} after "
                        f"{time.monotonic() - started:.1f}s: {err.details()}")
        elapsed = time.monotonic() - started
        assert response.partial and list(response.missing_shards) == ["shard-1"], response
        assert {h.id for h in response.hits} == {sha(d) for d in on_shard(datas, 0)}
        assert elapsed < 15
    stack.invariant(name)


def test_hung_shard_gives_partial_results_from_a_cold_gateway(hung):
    stack, name, datas, _, _, cold = hung
    frozen = stack.shards[1]
    with frozen.frozen():
        started = time.monotonic()
        try:
            response = cold.search(gpb.QueryPart(image_data=datas[0]), collection=name, top_k=12, timeout=4)
        except grpc.RpcError as err:
            pytest.fail(f"first search of a fresh gateway with shard {frozen.address} hung: {err.code().name} "
                        f"after {time.monotonic() - started:.1f}s: {err.details()}")
        assert response.partial and list(response.missing_shards) == ["shard-1"], response
        assert time.monotonic() - started < 4
    stack.invariant(name)


def test_hung_shard_under_fail_policy_is_unavailable_before_the_deadline(hung):
    stack, name, datas, _, fail, _ = hung
    frozen = stack.shards[1]
    client_deadline = 4  # nearer than the 10 s index timeout: the shard call gets what is left, less the margin
    with frozen.frozen():
        started = time.monotonic()
        err = rpc_error(fail.search, gpb.QueryPart(image_data=datas[0]), collection=name, top_k=12,
                        timeout=client_deadline)
        elapsed = time.monotonic() - started
        assert err.code() == grpc.StatusCode.UNAVAILABLE, \
            f"{err.code().name} after {elapsed:.1f}s (client deadline {client_deadline}s): {err.details()}"
        assert "shard-1" in err.details() and frozen.address not in err.details()
        assert elapsed < client_deadline
    stack.invariant(name)


# ---------------------------------------------------------------- the harness itself


def test_s3_proxy_modes(s3_endpoint):
    """pass relays, hang holds requests until pass releases them, stop refuses at once."""
    from botocore.config import Config

    s3 = make_bucket(s3_endpoint, "fx-proxy-modes")
    s3.put_object(Bucket="fx-proxy-modes", Key="k", Body=b"payload")
    with S3Proxy(s3_endpoint) as proxy:
        quick = boto3.client("s3", endpoint_url=proxy.endpoint_url, region_name="us-east-1",
                             config=Config(connect_timeout=1, read_timeout=1, retries={"max_attempts": 1}))
        patient = boto3.client("s3", endpoint_url=proxy.endpoint_url, region_name="us-east-1",
                               config=Config(read_timeout=20, retries={"max_attempts": 1}))
        assert quick.get_object(Bucket="fx-proxy-modes", Key="k")["Body"].read() == b"payload"

        proxy.set_mode(HANG)
        with pytest.raises(Exception, match="timeout|timed out"):
            quick.get_object(Bucket="fx-proxy-modes", Key="k")
        held: dict = {}
        waiter = threading.Thread(target=lambda: held.setdefault(
            "body", patient.get_object(Bucket="fx-proxy-modes", Key="k")["Body"].read()), daemon=True)
        waiter.start()
        time.sleep(1)
        assert "body" not in held, "a request went through a hung proxy"
        proxy.set_mode(PASS)
        waiter.join(10)
        assert held.get("body") == b"payload", "the held request was not released by pass"

        proxy.set_mode(STOP)
        started = time.monotonic()
        with pytest.raises(Exception, match="Could not connect|Connection"):
            quick.get_object(Bucket="fx-proxy-modes", Key="k")
        assert time.monotonic() - started < 1
        proxy.set_mode(PASS)
        assert quick.get_object(Bucket="fx-proxy-modes", Key="k")["Body"].read() == b"payload"
    assert proxy.accepted >= 2 and not proxy.live_threads()


def test_shard_kill_freeze_and_restart_at_the_same_address(tmp_path):
    shard = start_shards(tmp_path, 1, prefix="harness")[0]
    try:
        stub = index_stub(shard.address)
        stub.CreateCollection(ipb.CreateCollectionRequest(name="h", dim=4, metric=ipb.METRIC_INNER_PRODUCT))
        stub.UpsertVectors(ipb.UpsertVectorsRequest(collection="h", ids=["a"], vectors=pack_matrix(
            np.eye(1, 4, dtype="float32"))))
        with shard.frozen():
            with pytest.raises(grpc.RpcError) as err:
                stub.ListVectors(ipb.ListVectorsRequest(collection="h"), timeout=0.5)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert shard_ids(shard.address, "h") == {"a"}

        address = shard.address
        shard.kill()
        with pytest.raises(grpc.RpcError) as err:
            stub.ListVectors(ipb.ListVectorsRequest(collection="h"), timeout=2)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        shard.restart()
        assert shard.address == address
        assert shard_ids(address, "h") == {"a"}
        assert shard_ids(address, "missing") == set()
    finally:
        shard.terminate()


def test_check_invariant_names_index_entries_without_objects(proxied):
    stack, _, client = proxied
    name = "harness"
    create_collection(client, name)
    datas = images(8000, 6)
    assert codes(client.upload(datas, collection=name)) == ["OK"] * len(datas)
    stack.s3.put_object(Bucket=stack.bucket, Key=f"{PREFIX}{name}/not-an-id.txt", Body=b"ignored")
    stored, indexed = stack.invariant(name)
    assert stored == indexed == {sha(d) for d in datas}
    assert check_invariant(stack.s3, stack.bucket, PREFIX, "no-such-collection", stack.addresses) == (set(), set())

    gone = sha(datas[0])
    stack.s3.delete_object(Bucket=stack.bucket, Key=f"{PREFIX}{name}/{gone}")
    with pytest.raises(AssertionError, match="every indexed id has its stored object") as err:
        stack.invariant(name)
    assert gone in str(err.value) and sha(datas[1]) not in str(err.value)
