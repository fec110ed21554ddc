"""The gateway as a real process: tiny-model encoder, two index shard processes,
images in a moto S3 server over HTTP."""

from __future__ import annotations

import urllib.request

import boto3
import grpc
import numpy as np
import pytest
from google.rpc import code_pb2, error_details_pb2
from grpc_status import rpc_status

from clipsearch.common.v1 import common_pb2
from clipsearch.encoder.v1 import encoder_service_pb2 as epb
from clipsearch.encoder.v1 import encoder_service_pb2_grpc
from clipsearch.gateway.v1 import gateway_service_pb2 as gpb
from clipsearch.index.v1 import index_service_pb2 as ipb
from clipsearch.metadata import filter_to_proto, metadata_from_proto, metadata_to_proto
from clipsearch.vectors import pack_vector, unpack_matrix, unpack_vector
from gateway.shards import shard_for_id
from tests.gateway.conftest import (
    http_get, index_stub, near_duplicate, noise_image, sha, start_gateway,
)

COLLECTION = "s3imgs"
PREFIX = "clip/images"
CORPUS = 24
GROUPS = "abc"


@pytest.fixture(scope="module")
def bucket(s3_endpoint):
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="gateway-images")
    return client, "gateway-images"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, encoder_service, index_shards, s3_endpoint, bucket):
    _, name = bucket
    proc = start_gateway(
        tmp_path_factory.mktemp("gw-s3"), encoder_service, index_shards,
        "--storage", f"s3://{name}/{PREFIX}", "--s3-endpoint-url", s3_endpoint, "--url-ttl-seconds", "600",
        "--default-collection", COLLECTION, "--max-image-bytes", "100000", "--import-sources", f"s3://{name}/incoming/",
        name="gateway-s3",
    )
    yield proc
    proc.terminate()


@pytest.fixture(scope="module")
def corpus(client):
    """24 distinct noise images in three groups, plus three near-duplicates of image 0."""
    datas = [noise_image(i) for i in range(CORPUS)] + [near_duplicate(0, v) for v in range(3)]
    metadata = [metadata_to_proto({"group": GROUPS[i % 3], "n": i}) for i in range(len(datas))]
    results = client.upload(datas, metadata=metadata)
    assert [r.status.code for r in results] == [0] * len(datas)
    assert all(r.created for r in results)
    return datas


def stored_vector(shards, image_id: str) -> np.ndarray:
    shard = shards[shard_for_id(image_id, len(shards))]
    record = index_stub(shard.address).FetchVectors(
        ipb.FetchVectorsRequest(collection=COLLECTION, ids=[image_id], include_vectors=True)).records[0]
    return unpack_vector(record.vector)


def text_vector(encoder, text: str) -> np.ndarray:
    stub = encoder_service_pb2_grpc.EncoderServiceStub(grpc.insecure_channel(encoder.address))
    return unpack_matrix(stub.EmbedTexts(epb.EmbedTextsRequest(texts=[text])).embeddings)[0]


def ids_scores(response) -> list[tuple[str, float]]:
    return [(h.id, h.score) for h in response.hits]


def bucket_keys(bucket) -> list[str]:
    client, name = bucket
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=name, Prefix=PREFIX).get("Contents", []))


def code_of(excinfo) -> grpc.StatusCode:
    return excinfo.value.code()


# ---------------------------------------------------------------- upload and search


def test_search_by_the_same_bytes_finds_the_image_first(client, corpus):
    for i in (3, 11, 17):
        response = client.search(gpb.QueryPart(image_data=corpus[i]), top_k=5)
        assert response.hits[0].id == sha(corpus[i])
        assert response.hits[0].score == pytest.approx(1.0, abs=1e-4)
        assert metadata_from_proto(response.hits[0].metadata)["n"] == i
        assert not response.partial


def test_same_bytes_twice_give_one_object_and_one_id(client, corpus, bucket):
    again = client.upload([corpus[5]])[0]
    assert again.status.code == 0 and again.id == sha(corpus[5]) and not again.created
    keys = bucket_keys(bucket)
    assert keys.count(f"{PREFIX}/{COLLECTION}/{sha(corpus[5])}") == 1
    assert len([k for k in keys if k.startswith(f"{PREFIX}/{COLLECTION}/")]) == len(corpus)


def test_presigned_urls_return_the_exact_bytes(client, corpus):
    image = client.GetImage(gpb.GetImageRequest(id=sha(corpus[7]))).image
    assert image.url.startswith("http://") and "X-Amz-Signature" in image.url and "X-Amz-Expires=600" in image.url
    assert http_get(image.url) == corpus[7]
    assert image.size_bytes == len(corpus[7]) and image.content_type == "image/png"
    hit = client.search(gpb.QueryPart(image_data=corpus[8]), top_k=1).hits[0]
    assert http_get(hit.url) == corpus[8]


def test_images_spread_over_both_shards(corpus, index_shards):
    for index, shard in enumerate(index_shards):
        held, token = [], ""
        while True:
            page = index_stub(shard.address).ListVectors(
                ipb.ListVectorsRequest(collection=COLLECTION, page_size=100, page_token=token))
            held += [r.id for r in page.records]
            token = page.next_page_token
            if not token:
                break
        expected = {sha(d) for d in corpus if shard_for_id(sha(d), 2) == index}
        assert expected and set(held) >= expected
        assert all(shard_for_id(i, 2) == index for i in held)


def test_delete_removes_from_search_get_and_bucket(client, bucket):
    data = noise_image(500)
    image_id = client.upload([data])[0].id
    key = f"{PREFIX}/{COLLECTION}/{image_id}"
    assert key in bucket_keys(bucket)
    assert client.search(gpb.QueryPart(image_data=data), top_k=1).hits[0].id == image_id
    client.DeleteImage(gpb.DeleteImageRequest(id=image_id))
    assert image_id not in [h.id for h in client.search(gpb.QueryPart(image_data=data), top_k=50).hits]
    with pytest.raises(grpc.RpcError) as err:
        client.GetImage(gpb.GetImageRequest(id=image_id))
    assert code_of(err) == grpc.StatusCode.NOT_FOUND
    assert key not in bucket_keys(bucket)
    with pytest.raises(grpc.RpcError) as err:
        client.DeleteImage(gpb.DeleteImageRequest(id=image_id))
    assert code_of(err) == grpc.StatusCode.NOT_FOUND


# ---------------------------------------------------------------- search options


def test_mean_of_two_parts_equals_search_by_the_mean_vector(client, corpus, encoder_service, index_shards):
    text = "a photo of static"
    u_text = text_vector(encoder_service, text)
    u_image = stored_vector(index_shards, sha(corpus[4]))
    mean = 1.0 * u_text + 2.0 * u_image
    mean /= np.linalg.norm(mean)
    by_parts = client.search(gpb.QueryPart(text=text), gpb.QueryPart(image_id=sha(corpus[4]), weight=2.0),
                             aggregation=gpb.AGGREGATION_MEAN, top_k=10)
    by_vector = client.search(gpb.QueryPart(vector=pack_vector(mean)), top_k=10)
    assert [h.id for h in by_parts.hits] == [h.id for h in by_vector.hits]
    assert [h.score for h in by_parts.hits] == pytest.approx([h.score for h in by_vector.hits], abs=1e-5)


def test_max_keeps_each_images_best_part_score(client, corpus):
    parts = [gpb.QueryPart(image_id=sha(corpus[1])), gpb.QueryPart(image_id=sha(corpus[2]))]
    everything = len(corpus) + 10
    per_part = [dict(ids_scores(client.search(p, top_k=everything))) for p in parts]
    expected = {i: max(per_part[0].get(i, -9), per_part[1].get(i, -9)) for i in per_part[0] | per_part[1]}
    expected_top = sorted(expected.items(), key=lambda kv: (-kv[1], kv[0]))[:8]
    got = client.search(*parts, aggregation=gpb.AGGREGATION_MAX, top_k=8)
    assert [h.id for h in got.hits] == [i for i, _ in expected_top]
    assert [h.score for h in got.hits] == pytest.approx([s for _, s in expected_top], abs=1e-5)
    assert got.hits[0].score == pytest.approx(1.0, abs=1e-4)  # both parts are in the collection


def test_feedback_moves_the_ranking(client, corpus, index_shards):
    query = gpb.QueryPart(image_data=corpus[9])
    base = [h.id for h in client.search(query, top_k=len(corpus)).hits]
    positive, negative = base[-1], base[1]
    pushed = client.search(query, top_k=len(corpus),
                           feedback=gpb.Feedback(positive_ids=[positive], positive_weight=2.0))
    pushed_ids = [h.id for h in pushed.hits]
    assert pushed_ids.index(positive) < base.index(positive)
    pulled = client.search(query, top_k=len(corpus), feedback=gpb.Feedback(negative_ids=[negative],
                                                                            negative_weight=1.0))
    pulled_ids = [h.id for h in pulled.hits]
    assert pulled_ids.index(negative) > base.index(negative)
    # And it is exactly Rocchio over the stored vectors.
    q = stored_vector(index_shards, sha(corpus[9]))
    moved = q + 0.75 * stored_vector(index_shards, positive) - 0.25 * stored_vector(index_shards, negative)
    both = client.search(query, top_k=10, feedback=gpb.Feedback(positive_ids=[positive], negative_ids=[negative]))
    by_vector = client.search(gpb.QueryPart(vector=pack_vector(moved / np.linalg.norm(moved))), top_k=10)
    assert [h.id for h in both.hits] == [h.id for h in by_vector.hits]


def test_min_score_cuts(client, corpus):
    query = gpb.QueryPart(image_data=corpus[12])
    full = client.search(query, top_k=len(corpus))
    threshold = full.hits[5].score
    cut = client.search(query, top_k=len(corpus), min_score=threshold)
    assert [h.id for h in cut.hits] == [h.id for h in full.hits if h.score >= threshold]
    assert all(h.score >= threshold for h in cut.hits) and len(cut.hits) < len(full.hits)


def test_filters_filter(client, corpus):
    query = gpb.QueryPart(text="anything")
    only_b = client.search(query, top_k=100, filter=filter_to_proto({"group": "b"}))
    assert {metadata_from_proto(h.metadata)["group"] for h in only_b.hits} == {"b"}
    assert len(only_b.hits) == sum(1 for i in range(len(corpus)) if GROUPS[i % 3] == "b")
    ranged = client.search(query, top_k=100, filter=filter_to_proto({"n": {"gte": 5, "lt": 10}}))
    assert sorted(metadata_from_proto(h.metadata)["n"] for h in ranged.hits) == [5, 6, 7, 8, 9]


def test_mmr_with_high_diversity_avoids_near_duplicates(client, corpus):
    cluster = {sha(corpus[0])} | {sha(corpus[CORPUS + v]) for v in range(3)}
    query = gpb.QueryPart(image_data=corpus[0])
    plain = client.search(query, top_k=4)
    assert {h.id for h in plain.hits} == cluster  # the original and its near-duplicates
    diverse = client.search(query, top_k=4, diversity=0.9)
    ids = [h.id for h in diverse.hits]
    assert ids[0] == sha(corpus[0]) and len(ids) == 4
    assert len(set(ids) & cluster) == 1


def test_pagination_covers_all_results_once(client, corpus):
    query = gpb.QueryPart(text="pages")
    whole = [h.id for h in client.search(query, top_k=20).hits]
    seen, token, pages = [], "", 0
    while True:
        response = client.search(query, top_k=20, page_size=6, page_token=token)
        seen += [h.id for h in response.hits]
        pages += 1
        token = response.next_page_token
        if not token:
            break
    assert seen == whole and len(set(seen)) == 20 and pages == 4

    listed, token = [], ""
    while True:
        response = client.ListImages(gpb.ListImagesRequest(page_size=7, page_token=token))
        listed += [image.id for image in response.images]
        token = response.next_page_token
        if not token:
            break
    assert listed == sorted(listed) and len(set(listed)) == len(listed)
    assert set(listed) >= {sha(d) for d in corpus}


# ---------------------------------------------------------------- bad input


def violation_field(err) -> str:
    status = rpc_status.from_call(err.value)
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return bad.field_violations[0].field
    return ""


@pytest.mark.parametrize("request_fields, field", [
    ({}, "parts"),
    ({"parts": [gpb.QueryPart(text="   ")]}, "parts[0].text"),
    ({"parts": [gpb.QueryPart()]}, "parts[0]"),
    ({"parts": [gpb.QueryPart(text="x")], "top_k": 1001}, "top_k"),
    ({"parts": [gpb.QueryPart(text="x")], "diversity": 1.5}, "diversity"),
    ({"parts": [gpb.QueryPart(text="x")], "page_token": "eyJ2IjoxfQ.AAAA"}, "page_token"),
    ({"parts": [gpb.QueryPart(vector=b"\x00" * 12)]}, "parts[0].vector"),
    ({"parts": [gpb.QueryPart(image_id="../../../etc/passwd")]}, "parts[0].image_id"),
    ({"parts": [gpb.QueryPart(image_data=b"\x89PNG\r\n\x1a\n garbage")]}, "parts[0].image_data"),
    ({"parts": [gpb.QueryPart(text="x")], "filter": common_pb2.Filter(conditions=[common_pb2.Condition(key="n")])},
     "filter.conditions[0]"),
    ({"parts": [gpb.QueryPart(text="x")], "collection": "../other"}, "collection"),
], ids=["empty", "blank-text", "empty-part", "top_k", "diversity", "forged-token", "vector-dim",
        "bad-id", "corrupt-image", "bad-filter", "bad-collection"])
def test_bad_search_input_is_invalid_argument(client, corpus, request_fields, field):
    with pytest.raises(grpc.RpcError) as err:
        client.SearchImages(gpb.SearchImagesRequest(**request_fields))
    assert code_of(err) == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert violation_field(err) == field


def test_unknown_ids_are_not_found(client, corpus):
    unknown = "0" * 64
    for call in (lambda: client.GetImage(gpb.GetImageRequest(id=unknown)),
                 lambda: client.search(gpb.QueryPart(image_id=unknown)),
                 lambda: client.search(gpb.QueryPart(text="x"), feedback=gpb.Feedback(negative_ids=[unknown])),
                 lambda: client.search(gpb.QueryPart(text="x"), collection="no-such-collection")):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert code_of(err) == grpc.StatusCode.NOT_FOUND


def test_page_token_from_another_query_is_refused(client, corpus):
    token = client.search(gpb.QueryPart(text="one"), top_k=10, page_size=2).next_page_token
    with pytest.raises(grpc.RpcError) as err:
        client.search(gpb.QueryPart(text="two"), top_k=10, page_size=2, page_token=token)
    assert code_of(err) == grpc.StatusCode.INVALID_ARGUMENT and "different query" in err.value.details()


def test_too_large_or_corrupt_uploads_fail_per_item_and_store_nothing(client, bucket, corpus):
    before = bucket_keys(bucket)
    large = noise_image(900, size=256)
    assert len(large) > 100_000
    good = noise_image(901)
    results = client.upload([large, b"\xff\xd8\xff broken jpeg", good, b""])
    assert [r.status.code for r in results] == [code_pb2.INVALID_ARGUMENT] * 2 + [0, code_pb2.INVALID_ARGUMENT]
    assert "limit" in results[0].status.message
    assert set(bucket_keys(bucket)) - set(before) == {f"{PREFIX}/{COLLECTION}/{sha(good)}"}
    client.DeleteImage(gpb.DeleteImageRequest(id=sha(good)))


def test_fingerprint_mismatch_is_failed_precondition(client, index_shards):
    for shard in index_shards:
        index_stub(shard.address).CreateCollection(ipb.CreateCollectionRequest(
            name="other-model", dim=64, metric=ipb.METRIC_INNER_PRODUCT, model_fingerprint="0123abcd"))
    with pytest.raises(grpc.RpcError) as err:
        client.search(gpb.QueryPart(text="x"), collection="other-model")
    assert code_of(err) == grpc.StatusCode.FAILED_PRECONDITION
    assert "model mismatch" in err.value.details() and "0123abcd" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.upload([noise_image(950)], collection="other-model")
    assert code_of(err) == grpc.StatusCode.FAILED_PRECONDITION


# ---------------------------------------------------------------- collections, import, metrics


def test_collections_and_s3_import(client, bucket, gateway):
    s3, name = bucket
    datas = [noise_image(700 + i) for i in range(6)]
    for i, data in enumerate(datas):
        s3.put_object(Bucket=name, Key=f"incoming/batch/{i:02d}.png", Body=data)
    s3.put_object(Bucket=name, Key="incoming/batch/readme.txt", Body=b"not an image")
    created = client.CreateCollection(gpb.CreateCollectionRequest(name="imported")).collection
    assert created.dim == 64 and created.model_fingerprint
    with pytest.raises(grpc.RpcError) as err:
        client.CreateCollection(gpb.CreateCollectionRequest(name="imported"))
    assert code_of(err) == grpc.StatusCode.ALREADY_EXISTS

    request = gpb.ImportImagesRequest(collection="imported", source=f"s3://{name}/incoming/",
                                      metadata=metadata_to_proto({"batch": "one"}))
    job = client.ImportImages(request).job
    assert client.ImportImages(request).job.job_id == job.job_id  # idempotent
    done = client.wait_import(job.job_id)
    assert done.state == gpb.IMPORT_STATE_SUCCEEDED and done.listing_done
    assert (done.total, done.processed, done.imported + done.skipped, done.failed) == (6, 6, 6, 0)
    collection = client.GetCollection(gpb.GetCollectionRequest(name="imported")).collection
    assert collection.vector_count == 6
    hit = client.search(gpb.QueryPart(image_data=datas[2]), collection="imported", top_k=1).hits[0]
    meta = metadata_from_proto(hit.metadata)
    assert hit.id == sha(datas[2]) and meta["batch"] == "one" and meta["source"].endswith("incoming/batch/02.png")
    names = [c.name for c in client.ListCollections(gpb.ListCollectionsRequest()).collections]
    assert {"imported", COLLECTION} <= set(names)

    client.DeleteCollection(gpb.DeleteCollectionRequest(name="imported"))
    assert not [k for k in bucket_keys(bucket) if k.startswith(f"{PREFIX}/imported/")]
    with pytest.raises(grpc.RpcError) as err:
        client.GetCollection(gpb.GetCollectionRequest(name="imported"))
    assert code_of(err) == grpc.StatusCode.NOT_FOUND


def test_imports_outside_import_sources_are_refused(client, tmp_path):
    for source in (str(tmp_path), "s3://gateway-images/clip/", "s3://gateway-images/incoming"):
        with pytest.raises(grpc.RpcError) as err:
            client.ImportImages(gpb.ImportImagesRequest(source=source))
        assert code_of(err) == grpc.StatusCode.PERMISSION_DENIED, source


def test_metrics_are_exported(client, gateway, corpus):
    client.search(gpb.QueryPart(text="cached text"))
    client.search(gpb.QueryPart(text="cached text"))
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    for name in ("clipsearch_gateway_upload_bytes_total", "clipsearch_gateway_text_cache_hits_total",
                 "clipsearch_gateway_text_cache_misses_total", "clipsearch_gateway_storage_op_seconds_bucket",
                 "clipsearch_gateway_downstream_seconds_bucket"):
        assert name in text, name
    assert any(line.startswith("grpc_server_handled_total") and 'grpc_method="SearchImages"' in line
               and 'grpc_code="OK"' in line for line in text.splitlines())
    hits = [line for line in text.splitlines() if line.startswith("clipsearch_gateway_text_cache_hits_total")]
    assert float(hits[0].split()[-1]) >= 1


def test_page_size_above_the_limit_is_clamped_not_refused(client, corpus):
    """AIP-158: a page_size over the maximum means the maximum."""
    response = client.search(gpb.QueryPart(text="x"), top_k=5, page_size=5000)
    assert len(response.hits) == 5 and not response.next_page_token
