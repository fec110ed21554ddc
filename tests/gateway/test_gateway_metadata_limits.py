"""Metadata limits, byte-bounded pages, metadata read masks and public error
messages through a real gateway (real encoder, two real index shards)."""

from __future__ import annotations

import re

import grpc
import pytest
from google.protobuf import field_mask_pb2, timestamp_pb2

from clipsearch.common.v1 import common_pb2
from clipsearch.gateway.v1 import gateway_service_pb2 as gpb
from clipsearch.metadata import metadata_from_proto, metadata_to_proto
from tests.gateway.conftest import Client, noise_image, sha, start_gateway, start_index_shards

# The gateway adds content_type and size_bytes to every image: 2 keys, 12+9 and 10+8 bytes for a PNG.
LIMIT_FLAGS = ["--max-metadata-keys", "6", "--max-metadata-key-bytes", "16", "--max-metadata-value-bytes", "64",
               "--max-metadata-bytes", "200", "--max-response-metadata-bytes", "1000"]
CLASS_NAME = re.compile(r"\b\w*(Error|Exception)\b|Traceback|\.py\b|_pb2|0x[0-9a-f]{6,}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, encoder_service):
    workdir = tmp_path_factory.mktemp("gw-limits")
    shards = start_index_shards(workdir, prefix="limits")
    gateway = start_gateway(workdir, encoder_service, shards, "--storage", str(workdir / "images"),
                            "--default-collection", "limits", "--index-timeout-seconds", "3", *LIMIT_FLAGS)
    client = Client(gateway.address)
    yield workdir, encoder_service, shards, gateway, client
    client.close()
    for proc in (gateway, *shards):
        proc.terminate()


def upload_one(client: Client, seed: int, metadata: dict) -> gpb.UploadResult:
    return client.upload([noise_image(seed)], metadata=[metadata_to_proto(metadata)])[0]


@pytest.mark.parametrize("metadata, field", [
    ({f"k{i}": 1.0 for i in range(5)}, "items[0].metadata"),  # 5 + 2 = 7 keys > 6
    ({"k" * 17: 1.0}, "items[0].metadata"),  # a 17-byte key
    ({"note": "x" * 65}, "items[0].metadata.note"),  # a 65-byte value
    ({"a": "x" * 64, "b": "y" * 64, "c": "z" * 31}, "items[0].metadata"),  # 3 + 159 + 39 = 201 bytes
])
def test_each_limit_over_is_refused_naming_the_field(stack, metadata, field):
    *_, client = stack
    result = upload_one(client, 9000 + len(str(metadata)), metadata)
    assert result.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], result
    assert field in result.status.message and "limit" in result.status.message


def test_each_limit_at_is_accepted(stack):
    *_, client = stack
    at = [
        {f"k{i}": 1.0 for i in range(4)},  # 6 keys with the gateway's
        {"k" * 16: "x" * 64},  # key and value at their limits
        {"a": "x" * 64, "b": "y" * 64, "c": "z" * 30},  # 3 + 158 + 39 = 200 bytes
    ]
    for i, metadata in enumerate(at):
        result = upload_one(client, 9100 + i, metadata)
        assert result.status.code == 0, (metadata, result.status.message)


def test_a_metadata_heavy_collection_searches_and_lists_in_pages(stack):
    *_, client = stack
    client.CreateCollection(gpb.CreateCollectionRequest(name="heavy"))
    datas = [noise_image(9200 + i) for i in range(12)]
    results = client.upload(datas, collection="heavy",
                            metadata=[metadata_to_proto({"note": f"{i:02d}" + "n" * 62, "n": float(i)})
                                      for i in range(12)])
    assert [r.status.code for r in results] == [0] * 12
    query = gpb.QueryPart(image_id=sha(datas[0]))

    seen, token, pages = [], "", 0
    while True:
        response = client.search(query, collection="heavy", top_k=12, page_token=token)
        assert 1 <= len(response.hits) < 12  # ~120 metadata bytes a hit, 1000 a response
        seen += [h.id for h in response.hits]
        pages += 1
        token = response.next_page_token
        if not token:
            break
    assert sorted(seen) == sorted(sha(d) for d in datas) and pages >= 2

    masked = client.search(query, collection="heavy", top_k=12,
                           read_mask=field_mask_pb2.FieldMask(paths=["id", "metadata.n"]))
    assert len(masked.hits) == 12 and not masked.next_page_token  # 9 bytes a hit: one page
    assert all(set(metadata_from_proto(h.metadata)) == {"n"} for h in masked.hits)

    listed, token = [], ""
    while True:
        page = client.ListImages(gpb.ListImagesRequest(collection="heavy", page_size=100, page_token=token))
        assert 1 <= len(page.images) < 12
        listed += [i.id for i in page.images]
        token = page.next_page_token
        if not token:
            break
    assert sorted(listed) == sorted(sha(d) for d in datas)


def timestamp_condition(seconds: int, nanos: int) -> common_pb2.Filter:
    message = common_pb2.Filter()
    message.conditions.add(key="when").range.gte.timestamp_value.CopyFrom(
        timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos))
    return message


def failing_calls(client: Client, workdir):
    """(what, call) pairs that each fail: bad input, unknown things, and (after a shard dies) outages."""
    bad_ts = timestamp_condition(253_402_300_800, 0)
    query = gpb.QueryPart(image_id=sha(noise_image(9100)))
    wrong_kind = common_pb2.Filter()
    wrong_kind.conditions.add(key="k0").equals.string_value = "one"
    yield "timestamp past 9999", lambda: client.search(query, collection="limits", filter=bad_ts)
    yield "nanos of 1e9", lambda: client.search(query, collection="limits",
                                               filter=timestamp_condition(0, 1_000_000_000))
    yield "filter of the wrong kind", lambda: client.search(query, collection="limits", filter=wrong_kind)
    yield "unknown collection", lambda: client.search(query, collection="nope")
    yield "unknown image", lambda: client.GetImage(gpb.GetImageRequest(collection="limits", id="0" * 64))
    yield "bad page token", lambda: client.ListImages(gpb.ListImagesRequest(collection="limits", page_token="x"))
    yield "empty query", lambda: client.search(collection="limits")


def check_public(err: grpc.RpcError, secrets: list[str]) -> None:
    details = err.details() or ""
    for secret in secrets:
        assert secret not in details, (secret, details)
    assert not CLASS_NAME.search(details), details
    trailing = dict(err.trailing_metadata() or ())
    assert trailing.get("x-request-id"), trailing


def test_out_of_range_timestamps_and_bad_input_are_invalid_argument(stack):
    workdir, encoder, shards, gateway, client = stack
    secrets = [encoder.address, *(s.address for s in shards), str(workdir)]
    for what, call in failing_calls(client, workdir):
        with pytest.raises(grpc.RpcError) as err:
            call()
        check_public(err.value, secrets)
        if what.startswith(("timestamp", "nanos", "filter")):
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (what, err.value.details())
    bad = gpb.UploadItem(data=noise_image(1), metadata=common_pb2.Metadata(fields={"when": common_pb2.MetadataValue(
        timestamp_value=timestamp_pb2.Timestamp(seconds=-62_135_596_801))}))
    with pytest.raises(grpc.RpcError) as err:
        client.UploadImages(gpb.UploadImagesRequest(items=[bad]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "out of range" in err.value.details()


def test_no_public_error_names_an_address_a_path_or_a_class(stack):
    """Runs last: it kills a shard."""
    workdir, encoder, shards, gateway, client = stack
    secrets = [encoder.address, *(s.address for s in shards), str(workdir)]
    shards[1].kill()
    datas = [noise_image(9300 + i) for i in range(6)]
    outages = [
        lambda: client.search(gpb.QueryPart(image_data=datas[0]), collection="limits"),
        lambda: client.ListImages(gpb.ListImagesRequest(collection="limits")),
        lambda: client.GetCollection(gpb.GetCollectionRequest(name="limits")),
        lambda: client.DeleteImage(gpb.DeleteImageRequest(collection="limits", id=sha(noise_image(9101)))),
    ]
    codes = set()
    for call in outages:
        try:
            call()
        except grpc.RpcError as err:
            codes.add(err.code())
            check_public(err, secrets)
    assert grpc.StatusCode.UNAVAILABLE in codes
    for result in client.upload(datas):
        assert not any(secret in result.status.message for secret in secrets), result.status.message
        assert not CLASS_NAME.search(result.status.message), result.status.message
    for what, call in failing_calls(client, workdir):
        with pytest.raises(grpc.RpcError) as err:
            call()
        check_public(err.value, secrets)
