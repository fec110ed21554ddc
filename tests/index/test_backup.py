"""S3 backup of snapshots and the store, and restore into an empty data dir,
against a moto S3 server."""

from __future__ import annotations

import json

import pytest

from clipsearch.index.v1 import index_service_pb2 as pb
from tests.index.helpers import observe, seed_collections, unit_rows, upsert_request


@pytest.mark.slow
def test_rescheduled_pod_comes_back_from_s3(start_index, s3_bucket, s3_endpoint, tmp_path):
    client, bucket = s3_bucket
    flags = ("--backup-s3-uri", f"s3://{bucket}/pods/index-0", "--s3-endpoint-url", s3_endpoint)
    index = start_index(tmp_path / "first-pod", *flags)
    vectors = unit_rows(2500, 16, seed=5)
    ids = seed_collections(index.stub, vectors, [{"group": f"g{i % 5}", "rank": i} for i in range(2500)])
    index.stub.CreateSnapshot(pb.CreateSnapshotRequest(collection="flat"))
    index.stub.DeleteVectors(pb.DeleteVectorsRequest(collection="ivf", ids=ids[:100]))
    index.stub.UpsertVectors(upsert_request("hnsw", ["late"], unit_rows(1, 16, seed=6)))
    index.stub.CreateCollection(pb.CreateCollectionRequest(name="gone", dim=4))
    index.stub.CreateSnapshot(pb.CreateSnapshotRequest())
    index.stub.DeleteCollection(pb.DeleteCollectionRequest(name="gone"))
    index.stub.UpsertVectors(upsert_request("flat", ["after-last-snapshot"], unit_rows(1, 16, seed=7)))
    queries = unit_rows(10, 16, seed=8)
    before = observe(index.stub, queries)
    assert index.process.terminate() == 0  # the shutdown snapshot uploads the last writes

    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="pods/index-0/")["Contents"]}
    assert "pods/index-0/store.sqlite" in keys
    manifests = [k for k in keys if k.endswith("/manifest.json")]
    assert len(manifests) == 3  # flat, ivf, hnsw; the deleted collection's snapshot is gone
    for key in manifests:
        manifest = json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())
        assert all(key.rsplit("/", 1)[0] + "/" + name in keys for name in manifest["shards"])

    restored = start_index(tmp_path / "second-pod", *flags)  # empty data dir: restore from S3
    assert observe(restored.stub, queries) == before
    names = [c.name for c in restored.stub.ListCollections(pb.ListCollectionsRequest()).collections]
    assert names == ["flat", "hnsw", "ivf"]
    log = restored.process.log_text()
    assert "restored the store" in log and "from snapshot at sequence" in log
