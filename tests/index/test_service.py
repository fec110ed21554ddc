"""index_service as a real process over gRPC: bad input gets the right status
and the server stays up; health, reflection and metrics; restarts."""

from __future__ import annotations

import datetime as dt
import urllib.request

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from clipsearch.common.v1 import common_pb2
from clipsearch.index.v1 import index_service_pb2 as pb
from clipsearch.status import error_from_rpc
from clipsearch.vectors import pack_matrix, unpack_vector
from tests.index.helpers import DIM, observe, search_request, seed_collections, unit_rows, upsert_request


def test_bad_input_gets_its_status_and_nothing_is_stored(start_index):
    index = start_index(None, "--max-message-mb", "1")
    stub = index.stub
    stub.CreateCollection(pb.CreateCollectionRequest(name="c", dim=DIM, model_fingerprint="model-a"))
    stub.CreateCollection(pb.CreateCollectionRequest(name="ivf", dim=DIM, index_spec="IVF64,Flat"))
    good = unit_rows(3)
    stub.UpsertVectors(upsert_request("c", ["a", "b", "c"], good, [{"color": "red", "n": 1}] * 3, "model-a"))
    before = stub.GetCollection(pb.GetCollectionRequest(name="c")).collection

    nan, inf = good.copy(), good.copy()
    nan[1, 2], inf[2, 0] = np.nan, np.inf
    wrong_bytes = pack_matrix(good)
    wrong_bytes.rows = 4
    xyz = ["x", "y", "z"]

    def upsert(ids, vectors, metadata=None, fingerprint="model-a", collection="c"):
        return stub.UpsertVectors, upsert_request(collection, ids, vectors, metadata, fingerprint)

    def search(queries, **kwargs):
        return stub.SearchVectors, search_request(kwargs.pop("collection", "c"), queries, **kwargs)

    empty_condition = pb.SearchVectorsRequest(collection="c", queries=pack_matrix(good), k=1,
                                              filter=common_pb2.Filter(conditions=[common_pb2.Condition(key="n")]))
    invalid, not_found, precondition = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                                        grpc.StatusCode.FAILED_PRECONDITION)
    cases = [  # (what, (method, request), status, BadRequest field)
        ("wrong dim", upsert(xyz, unit_rows(3, DIM + 1)), invalid, "vectors.dim"),
        ("NaN", upsert(xyz, nan), invalid, "vectors[1]"),
        ("Inf", upsert(xyz, inf), invalid, "vectors[2]"),
        ("empty id", upsert(["x", "", "z"], good), invalid, "ids[1]"),
        ("long id", upsert(["x", "y", "z" * 513], good), invalid, "ids[2]"),
        ("duplicate ids", upsert(["x", "y", "x"], good), invalid, "ids[2]"),
        ("no ids", upsert([], good[:0]), invalid, "ids"),
        ("rows != ids", upsert(["x", "y"], good), invalid, "vectors.rows"),
        ("bad packing", (stub.UpsertVectors, pb.UpsertVectorsRequest(
            collection="c", ids=["x"], vectors=wrong_bytes, model_fingerprint="model-a")), invalid, "vectors.data"),
        ("metadata count", upsert(xyz, good, [{"n": 1}]), invalid, "metadata"),
        ("metadata kind", upsert(xyz, good, [{"n": "one"}] * 3), invalid, "metadata[0].n"),
        ("fingerprint", upsert(xyz, good, fingerprint="model-b"), precondition, "model_fingerprint"),
        ("no fingerprint", upsert(xyz, good, fingerprint=""), precondition, "model_fingerprint"),
        ("upsert unknown collection", upsert(["x"], good[:1], collection="nope"), not_found, "collection"),
        ("too big", upsert([f"r{i}" for i in range(40_000)], unit_rows(40_000)), grpc.StatusCode.RESOURCE_EXHAUSTED,
         None),
        ("k = 0", search(good, k=0), invalid, "k"),
        ("k too big", search(good, k=10_001), invalid, "k"),
        ("query dim", search(unit_rows(1, DIM - 1)), invalid, "queries.dim"),
        ("query NaN", search(nan), invalid, "queries[1]"),
        ("no queries", search(good[:0]), invalid, "queries.rows"),
        ("search unknown collection", search(good, collection="nope"), not_found, "collection"),
        ("unknown filter key", search(good, filter={"size": 1}), invalid, "filter.conditions[0].key"),
        ("filter value kind", search(good, filter={"color": 1}), invalid, "filter.conditions[0].equals"),
        ("range on strings", search(good, filter={"n": 1, "color": {"gte": "a"}}), invalid,
         "filter.conditions[1].range"),
        ("empty condition", (stub.SearchVectors, empty_condition), invalid, "filter.conditions[0]"),
        ("create existing", (stub.CreateCollection, pb.CreateCollectionRequest(name="c", dim=DIM)),
         grpc.StatusCode.ALREADY_EXISTS, "name"),
        ("bad index spec", (stub.CreateCollection, pb.CreateCollectionRequest(
            name="d", dim=DIM, index_spec="IVF,Banana")), invalid, "index_spec"),
        ("pq not dividing dim", (stub.CreateCollection, pb.CreateCollectionRequest(
            name="d", dim=DIM, index_spec="IVF16,PQ3")), invalid, "index_spec"),
        ("dim 0", (stub.CreateCollection, pb.CreateCollectionRequest(name="d", dim=0)), invalid, "dim"),
        ("bad name", (stub.CreateCollection, pb.CreateCollectionRequest(name="a/b", dim=DIM)), invalid, "name"),
        ("dotted name", (stub.CreateCollection, pb.CreateCollectionRequest(name="a.b", dim=DIM)), invalid, "name"),
        ("get unknown", (stub.GetCollection, pb.GetCollectionRequest(name="nope")), not_found, "collection"),
        ("delete unknown collection", (stub.DeleteCollection, pb.DeleteCollectionRequest(name="nope")), not_found,
         "collection"),
        ("delete duplicate ids", (stub.DeleteVectors, pb.DeleteVectorsRequest(collection="c", ids=["a", "a"])),
         invalid, "ids[1]"),
        ("fetch no ids", (stub.FetchVectors, pb.FetchVectorsRequest(collection="c")), invalid, "ids"),
        ("list unknown", (stub.ListVectors, pb.ListVectorsRequest(collection="nope")), not_found, "collection"),
        ("train too small", (stub.TrainIndex, pb.TrainIndexRequest(collection="ivf")), precondition, "collection"),
    ]
    failures = []
    for name, (method, request), code, field in cases:
        try:
            method(request, timeout=30)
            failures.append(f"{name}: succeeded")
            continue
        except grpc.RpcError as error:
            if error.code() != code:
                failures.append(f"{name}: {error.code().name} {error.details()}")
            elif field is not None and (sent := error_from_rpc(error).field) != field:
                failures.append(f"{name}: field {sent!r}, expected {field!r} ({error.details()})")
            elif field == "index_spec" and "Examples" not in error.details():
                failures.append(f"{name}: message lists no examples: {error.details()}")
    assert not failures, "\n".join(failures)

    health = health_pb2_grpc.HealthStub(index.channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    after = stub.GetCollection(pb.GetCollectionRequest(name="c")).collection
    assert (after.vector_count, after.sequence) == (before.vector_count, before.sequence)
    records = stub.FetchVectors(pb.FetchVectorsRequest(collection="c", ids=["a", "b", "c", "x"], include_vectors=True))
    assert [r.id for r in records.records] == ["a", "b", "c"] and list(records.missing_ids) == ["x"]
    np.testing.assert_array_equal(np.stack([unpack_vector(r.vector) for r in records.records]), good)


def test_health_reflection_and_metrics(start_index):
    index = start_index()
    stub = index.stub
    stub.CreateCollection(pb.CreateCollectionRequest(name="m", dim=DIM, index_spec="Flat", num_shards=2))
    stub.UpsertVectors(upsert_request("m", ["a", "b", "c"], unit_rows(3)))
    hits = stub.SearchVectors(search_request("m", unit_rows(2), k=2)).results
    assert [len(r.hits) for r in hits] == [2, 2]

    health = health_pb2_grpc.HealthStub(index.channel)
    for service in ("", "clipsearch.index.v1.IndexService"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING

    reflection = reflection_pb2_grpc.ServerReflectionStub(index.channel)
    reply = next(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    assert "clipsearch.index.v1.IndexService" in {s.name for s in reply.list_services_response.service}

    text = urllib.request.urlopen(f"http://127.0.0.1:{index.process.metrics_port}/metrics", timeout=10).read().decode()
    total = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith('clipsearch_index_vectors{collection="m"'))
    assert total == 3.0
    for name in ('clipsearch_index_search_seconds_count{index_type="flat"}',
                 "clipsearch_index_store_write_seconds_count",
                 'clipsearch_index_snapshot_age_seconds{collection="m"}',
                 'grpc_server_handled_total{grpc_code="OK",grpc_method="SearchVectors"'):
        assert name in text, name


def test_restarts_keep_everything_and_replay_matches(start_index, tmp_path):
    data_dir = tmp_path / "data"
    vectors = unit_rows(3000, 16, seed=1)
    start = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    metadata = [{"group": f"g{i % 7}", "rank": i, "at": start + dt.timedelta(hours=i)} for i in range(3000)]
    index = start_index(data_dir)
    ids = seed_collections(index.stub, vectors, metadata)
    index.stub.CreateSnapshot(pb.CreateSnapshotRequest())
    # Writes after the snapshot: replayed from the store on restart.
    for name in ("flat", "ivf", "hnsw"):
        index.stub.DeleteVectors(pb.DeleteVectorsRequest(collection=name, ids=ids[:300]))
        replaced = upsert_request(name, ids[300:400], unit_rows(100, 16, seed=2), [{"group": "g1"}] * 100)
        index.stub.UpsertVectors(replaced)
        index.stub.UpsertVectors(upsert_request(name, ["new1", "new2"], unit_rows(2, 16, seed=3)))
    queries = unit_rows(20, 16, seed=4)
    before = observe(index.stub, queries)
    assert before["flat"][0][0] == 2702 and all(before[name][0][1] for name in before)

    index.process.kill()  # no shutdown snapshot: snapshot + replay
    index = start_index(data_dir)
    assert observe(index.stub, queries) == before

    assert index.process.terminate() == 0  # clean: snapshot on shutdown
    index = start_index(data_dir)
    assert observe(index.stub, queries) == before
    assert index.process.log_text().count("+ 0 added and 0 retired after it") == 3  # nothing left to replay
    collection = index.stub.GetCollection(pb.GetCollectionRequest(name="ivf")).collection
    assert collection.snapshot_age_seconds >= 0 and collection.memory_bytes > 0
