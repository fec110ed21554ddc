"""API keys and scopes through a real gateway process (moto S3 behind a
recording proxy): every RPC x {no key, wrong key, key without the scope, key
with the scope}, import sources, rotation, fail-closed, audit lines, and no
secret in the command line, the logs or any error message."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import boto3
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from clipsearch.gateway.v1 import gateway_service_pb2 as gpb
from clipsearch.keys import key_entry, keys_file_text, new_secret
from tests.gateway.conftest import Client, noise_image, start_gateway
from tests.gateway.faults import S3Proxy

STORE, SOURCES, SECRET_BUCKET = "access-store", "import-src", "secret-bucket"
KEYS = {  # id -> (scopes, import sources)
    "reader": (["read:team-a"], []),
    "writer": (["write:team-a"], [f"s3://{SOURCES}/team-a/"]),
    "admin-a": (["admin:team-a*"], []),
    "outsider": (["admin:team-b*"], [f"s3://{SOURCES}/team-b/"]),  # every scope, on other collections
    "root": (["admin"], [f"s3://{SOURCES}/"]),
}
SECRETS = {key_id: new_secret() for key_id in [*KEYS, "late"]}
UNAUTH, DENIED, OK = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.OK


def write_keys(path: Path, ids) -> None:
    entries = [key_entry(i, SECRETS[i], *KEYS.get(i, (["read:team-a"], []))) for i in ids]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(keys_file_text(entries))
    tmp.replace(path)  # atomic, as a Kubernetes Secret update is


@pytest.fixture(scope="module")
def world(tmp_path_factory, encoder_service, index_shards, s3_endpoint):
    workdir = tmp_path_factory.mktemp("gw-access")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    for bucket in (STORE, SOURCES, SECRET_BUCKET):
        s3.create_bucket(Bucket=bucket)
    for i, key in enumerate(["team-a/x/1.png", "team-a/2.png", "team-b/3.png", "team-ab/4.png"]):
        s3.put_object(Bucket=SOURCES, Key=key, Body=noise_image(900 + i))
    s3.put_object(Bucket=SECRET_BUCKET, Key="private/secret.png", Body=noise_image(990))
    keys_file = workdir / "keys.yaml"
    write_keys(keys_file, KEYS)
    proxy = S3Proxy(s3_endpoint).start()
    proc = start_gateway(
        workdir, encoder_service, index_shards, "--storage", f"s3://{STORE}/images",
        "--s3-endpoint-url", proxy.endpoint_url, "--default-collection", "team-a",
        "--api-keys-file", str(keys_file), "--api-keys-reload-seconds", "0.2", "--reflection", "auth",
        "--import-sources", f"s3://{SOURCES}/,{workdir / 'local-root'}",
        "--url-ttl-seconds", "600", "--max-url-ttl-seconds", "3600", name="gateway-access",
    )
    clients = {key_id: Client(proc.address, api_key=secret) for key_id, secret in SECRETS.items()}
    clients[None] = Client(proc.address)
    clients["wrong"] = Client(proc.address, api_key="csk_" + "x" * 43)
    root = clients["root"]
    root.CreateCollection(gpb.CreateCollectionRequest(name="team-b"))
    ids = [r.id for r in root.upload([noise_image(950 + i) for i in range(3)], collection="team-a")]
    world = {"proc": proc, "proxy": proxy, "clients": clients, "ids": ids, "keys_file": keys_file, "s3": s3,
             "errors": []}
    yield world
    for client in clients.values():
        client.close()
    proc.terminate()
    proxy.stop()


def call(world, who, method: str, request):
    """The status code of one call; error messages are kept for the secret check."""
    try:
        response = getattr(world["clients"][who], method)(request)
    except grpc.RpcError as err:
        world["errors"].append(err.details() or "")
        return err.code(), err.details()
    return OK, response


def matrix_calls(world):
    """(method, request, the key with just the scope it needs), in an order where each OK call can succeed."""
    ids = world["ids"]
    import_job = world["clients"]["writer"].ImportImages(
        gpb.ImportImagesRequest(collection="team-a", source=f"s3://{SOURCES}/team-a/")).job.job_id
    repair_job = world["clients"]["admin-a"].RepairCollection(
        gpb.RepairCollectionRequest(collection="team-a", dry_run=True)).job.job_id
    return [
        ("SearchImages", gpb.SearchImagesRequest(collection="team-a", parts=[gpb.QueryPart(image_id=ids[0])]),
         "reader"),
        ("UploadImages", gpb.UploadImagesRequest(collection="team-a",
                                                 items=[gpb.UploadItem(data=noise_image(960))]), "writer"),
        ("GetImage", gpb.GetImageRequest(collection="team-a", id=ids[0]), "reader"),
        ("ListImages", gpb.ListImagesRequest(collection="team-a"), "reader"),
        ("DeleteImage", gpb.DeleteImageRequest(collection="team-a", id=ids[1]), "writer"),
        ("ImportImages", gpb.ImportImagesRequest(collection="team-a", source=f"s3://{SOURCES}/team-a/"), "writer"),
        ("GetImportJob", gpb.GetImportJobRequest(job_id=import_job), "reader"),
        ("RepairCollection", gpb.RepairCollectionRequest(collection="team-a", dry_run=True), "admin-a"),
        ("GetRepairJob", gpb.GetRepairJobRequest(job_id=repair_job), "reader"),
        ("CreateCollection", gpb.CreateCollectionRequest(name="team-a-tmp"), "admin-a"),
        ("GetCollection", gpb.GetCollectionRequest(name="team-a"), "reader"),
        ("ListCollections", gpb.ListCollectionsRequest(), "reader"),
        ("DeleteCollection", gpb.DeleteCollectionRequest(name="team-a-tmp"), "admin-a"),
        ("BatchSearchImages", gpb.BatchSearchImagesRequest(
            collection="team-a", queries=[gpb.SearchImagesRequest(parts=[gpb.QueryPart(image_id=ids[0])])]),
         "reader"),
        ("UpdateImage", gpb.UpdateImageRequest(collection="team-a", id=ids[0],
                                               metadata={"fields": {"k": {"string_value": "v"}}}), "writer"),
        ("ListImportJobs", gpb.ListImportJobsRequest(collection="team-a"), "reader"),
        ("CancelImportJob", gpb.CancelImportJobRequest(job_id=import_job), "writer"),
    ]


def test_every_rpc_by_every_kind_of_caller(world):
    calls = matrix_calls(world)
    assert {c[0] for c in calls} == {m.name for m in gpb.DESCRIPTOR.services_by_name["GatewayService"].methods}
    table = {}
    for method, request, holder in calls:
        row = {}
        for cell, who in (("no key", None), ("wrong key", "wrong"), ("without scope", "outsider"),
                          ("with scope", holder)):
            code, result = call(world, who, method, request)
            row[cell] = code.name
            if code == DENIED:
                assert "team-a" in result and ":team-a" in result, result  # names the scope and the collection
        table[method] = row
        expected = {"no key": "UNAUTHENTICATED", "wrong key": "UNAUTHENTICATED",
                    "without scope": "OK" if method == "ListCollections" else "PERMISSION_DENIED",
                    "with scope": "OK"}
        assert row == expected, (method, row)
    print("\n" + json.dumps(table, indent=1))

    # ListCollections lists only what the key may read.
    def names(who):
        return {c.name for c in call(world, who, "ListCollections", gpb.ListCollectionsRequest())[1].collections}

    assert names("reader") == {"team-a"} and names("outsider") == {"team-b"}
    assert {"team-a", "team-b"} <= names("root")
    # Lower levels do not reach higher ones.
    for who, method, request in [
        ("reader", "UploadImages", calls[1][1]), ("reader", "DeleteImage", calls[4][1]),
        ("writer", "RepairCollection", calls[7][1]), ("writer", "CreateCollection", calls[9][1]),
        ("admin-a", "GetCollection", gpb.GetCollectionRequest(name="team-b")),
    ]:
        assert call(world, who, method, request)[0] == DENIED, (who, method)


def test_imports_outside_the_key_or_gateway_sources_read_nothing(world):
    before = len(world["proxy"].requests)
    for who, source in [("writer", f"s3://{SOURCES}/team-b/"), ("writer", f"s3://{SECRET_BUCKET}/private/"),
                        ("writer", f"s3://{SOURCES}/team-a"), ("root", f"s3://{SECRET_BUCKET}/private/"),
                        ("root", "/etc")]:
        code, details = call(world, who, "ImportImages", gpb.ImportImagesRequest(collection="team-a", source=source))
        assert code == DENIED, (who, source, details)
    assert world["proxy"].requests[before:] == []  # refused before any bucket or object was touched
    sources = [line for line in world["proxy"].requests if f" /{SOURCES}" in line or f" /{SECRET_BUCKET}" in line]
    assert sources and not [line for line in sources if SECRET_BUCKET in line or "team-b" in line], sources


def test_presigned_url_lifetime_per_request(world):
    reader = world["clients"]["reader"]
    image_id = world["ids"][0]
    url = reader.GetImage(gpb.GetImageRequest(id=image_id, url_ttl_seconds=120)).image.url
    assert "X-Amz-Expires=120" in url
    assert "X-Amz-Expires=600" in reader.GetImage(gpb.GetImageRequest(id=image_id)).image.url
    listed = reader.ListImages(gpb.ListImagesRequest(url_ttl_seconds=3600)).images
    assert listed and all("X-Amz-Expires=3600" in i.url for i in listed)
    hits = reader.search(gpb.QueryPart(image_id=image_id), url_ttl_seconds=60).hits
    assert hits and all(re.search(r"X-Amz-Expires=60(&|$)", h.url) for h in hits)
    for method, request in [("GetImage", gpb.GetImageRequest(id=image_id, url_ttl_seconds=3601)),
                            ("SearchImages", gpb.SearchImagesRequest(parts=[gpb.QueryPart(text="x")],
                                                                     url_ttl_seconds=86400))]:
        code, details = call(world, "reader", method, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "3600" in details


def test_health_is_open_and_reflection_needs_a_key(world):
    channel = grpc.insecure_channel(world["proc"].address)
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    with pytest.raises(grpc.RpcError) as err:
        list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    assert err.value.code() == UNAUTH
    [answer] = stub.ServerReflectionInfo(iter([request]), timeout=10,
                                         metadata=[("authorization", f"Bearer {SECRETS['reader']}")])
    assert "clipsearch.gateway.v1.GatewayService" in {s.name for s in answer.list_services_response.service}
    channel.close()


def until(predicate, timeout: float = 5.0) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, "not within the reload period"
        time.sleep(0.05)
    return time.monotonic() - started


def test_rotation_without_restart(world):
    late = gpb.GetCollectionRequest(name="team-a")
    assert call(world, "late", "GetCollection", late)[0] == UNAUTH
    write_keys(world["keys_file"], [*KEYS, "late"])
    assert until(lambda: call(world, "late", "GetCollection", late)[0] == OK) < 2
    write_keys(world["keys_file"], KEYS)
    assert until(lambda: call(world, "late", "GetCollection", late)[0] == UNAUTH) < 2
    assert call(world, "reader", "GetCollection", late)[0] == OK


def test_deleting_the_keys_file_fails_every_key(world):
    world["keys_file"].unlink()
    try:
        time.sleep(0.3)
        for who in KEYS:
            assert call(world, who, "GetCollection", gpb.GetCollectionRequest(name="team-a"))[0] == UNAUTH, who
    finally:
        write_keys(world["keys_file"], KEYS)
    until(lambda: call(world, "reader", "GetCollection", gpb.GetCollectionRequest(name="team-a"))[0] == OK)


def test_audit_lines_and_no_secret_anywhere(world):
    log = world["proc"].log_path.read_text()
    audits = [json.loads(line.split("] audit ", 1)[1]) for line in log.splitlines() if "clipsearch.audit" in line]
    deletes = [a for a in audits if a["action"] == "DeleteImage"]
    assert {(a["key_id"], a["outcome"]) for a in deletes} == {("outsider", "PERMISSION_DENIED"), ("writer", "OK"),
                                                              ("reader", "PERMISSION_DENIED")}
    assert all(a["collection"] == "team-a" and a["image_id"] == world["ids"][1] and a["request_id"] != "-"
               for a in deletes)
    assert {"CreateCollection", "DeleteCollection", "ImportImages", "UploadImages", "RepairCollection"} <= {
        a["action"] for a in audits}
    assert not [a for a in audits if a["action"] in ("SearchImages", "GetImage", "ListCollections")]
    cmdline = Path(f"/proc/{world['proc'].proc.pid}/cmdline").read_bytes().decode()
    assert world["errors"]
    for secret in SECRETS.values():
        assert secret not in cmdline and secret not in log
        assert not [e for e in world["errors"] if secret in e]
