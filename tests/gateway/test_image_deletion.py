"""Image deletions are recorded before they start, so one interrupted at any
step is finished, never undone: a retried DeleteImage completes it, and a
repair job removes the object of one nobody retried instead of re-indexing it.
Real gateway (local storage) over the session's encoder and index shards."""

from __future__ import annotations

import time

import grpc
import pytest

from clipsearch.gateway.v1 import gateway_service_pb2 as gpb
from clipsearch.index.v1 import index_service_pb2 as ipb
from tests.gateway.conftest import Client, index_stub, noise_image, sha, start_gateway

COLLECTION = "deletions"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, encoder_service, index_shards):
    workdir = tmp_path_factory.mktemp("gw-deletions")
    images = workdir / "images"
    proc = start_gateway(workdir, encoder_service, index_shards, "--storage", str(images),
                         "--default-collection", COLLECTION, name="gateway-deletions")
    client = Client(proc.address)
    yield client, images, index_shards
    client.close()
    proc.terminate()


def marker(images, image_id: str):
    return images / ".clipsearch" / "deleted" / COLLECTION / image_id


def drop_index_entry(shards, image_id: str) -> None:
    deleted = sum(index_stub(s.address).DeleteVectors(ipb.DeleteVectorsRequest(collection=COLLECTION, ids=[image_id]))
                  .deleted_count for s in shards)
    assert deleted == 1


def indexed(client, image_id: str) -> bool:
    try:
        client.GetImage(gpb.GetImageRequest(id=image_id))
        return True
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.NOT_FOUND
        return False


def repair(client, dry_run: bool) -> gpb.RepairJob:
    job = client.RepairCollection(gpb.RepairCollectionRequest(dry_run=dry_run)).job
    for _ in range(300):
        job = client.GetRepairJob(gpb.GetRepairJobRequest(job_id=job.job_id)).job
        if job.state != gpb.REPAIR_STATE_RUNNING:
            return job
        time.sleep(0.1)
    raise TimeoutError("repair still running")


def test_delete_image_leaves_nothing_behind(setup):
    client, images, _ = setup
    data = noise_image(9100)
    [result] = client.upload([data])
    assert result.status.code == 0
    client.DeleteImage(gpb.DeleteImageRequest(id=result.id))
    assert not list((images / COLLECTION).glob(f"{result.id}*")) and not marker(images, result.id).exists()
    assert not indexed(client, result.id)
    with pytest.raises(grpc.RpcError) as err:
        client.DeleteImage(gpb.DeleteImageRequest(id=result.id))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_retried_delete_finishes_an_interrupted_one(setup):
    client, images, shards = setup
    data = noise_image(9150)
    [result] = client.upload([data])
    # Interrupted after the vector was dropped: the marker and the object are left.
    marker(images, result.id).parent.mkdir(parents=True, exist_ok=True)
    marker(images, result.id).touch()
    drop_index_entry(shards, result.id)
    client.DeleteImage(gpb.DeleteImageRequest(id=result.id))
    assert not list((images / COLLECTION).glob(f"{result.id}*")) and not marker(images, result.id).exists()


def test_repair_finishes_deletions_and_keeps_images_whose_deletion_never_started(setup):
    client, images, shards = setup
    deleting, orphan, intact = (noise_image(9200 + i) for i in range(3))
    finished = "f" * 64  # a deletion that finished but for its marker
    marker(images, finished).parent.mkdir(parents=True, exist_ok=True)
    marker(images, finished).touch()
    results = client.upload([deleting, orphan, intact])
    assert [r.status.code for r in results] == [0, 0, 0]
    # A deletion interrupted after the vector was dropped, one interrupted right after
    # it was recorded, and an object whose index write was lost (no deletion).
    for data in (deleting, intact):
        marker(images, sha(data)).parent.mkdir(parents=True, exist_ok=True)
        marker(images, sha(data)).touch()
    drop_index_entry(shards, sha(deleting))
    drop_index_entry(shards, sha(orphan))

    counted = repair(client, dry_run=True)
    assert counted.state == gpb.REPAIR_STATE_SUCCEEDED
    assert (counted.removed, counted.reindexed, counted.dropped, counted.failed) == (1, 1, 0, 0)
    assert list((images / COLLECTION).glob(f"{sha(deleting)}*"))  # unchanged
    assert marker(images, sha(intact)).exists() and marker(images, finished).exists()

    job = repair(client, dry_run=False)
    assert job.state == gpb.REPAIR_STATE_SUCCEEDED
    assert (job.removed, job.reindexed, job.dropped, job.failed) == (1, 1, 0, 0)
    assert not list((images / COLLECTION).glob(f"{sha(deleting)}*")) and not indexed(client, sha(deleting))
    assert indexed(client, sha(orphan)) and indexed(client, sha(intact))
    assert not any((images / ".clipsearch" / "deleted" / COLLECTION).iterdir())
    stored = {p.name.partition(".")[0] for p in (images / COLLECTION).iterdir()}
    assert sha(orphan) in stored and sha(intact) in stored
