"""The gateway with the local-folder storage backend, and a local
folder import that is interrupted (SIGKILL) and resumed."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from clipsearch.gateway.v1 import gateway_service_pb2 as gpb
from tests.gateway.conftest import Client, http_get, noise_image, sha, start_gateway

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("gw-local")


@pytest.fixture(scope="module")
def gateway(workdir, encoder_service, index_shards):
    proc = start_gateway(workdir, encoder_service, index_shards, "--storage", str(workdir / "images"),
                         "--default-collection", "localimgs", name="gateway-local")
    yield proc
    proc.terminate()


def test_local_upload_search_url_and_delete(client, workdir):
    datas = [noise_image(300 + i) for i in range(6)]
    results = client.upload(datas)
    assert all(r.status.code == 0 and r.created for r in results)
    again = client.upload(datas[:1])[0]
    assert again.id == results[0].id and not again.created
    stored = sorted(p.name for p in (workdir / "images" / "localimgs").iterdir())
    assert stored == sorted(f"{sha(d)}.png" for d in datas)  # one file per distinct image, with its extension

    hit = client.search(gpb.QueryPart(image_data=datas[2]), top_k=3).hits[0]
    assert hit.id == sha(datas[2]) and hit.score == pytest.approx(1.0, abs=1e-4)
    assert hit.url.startswith("file://") and http_get(hit.url) == datas[2]

    client.DeleteImage(gpb.DeleteImageRequest(id=hit.id))
    assert not (workdir / "images" / "localimgs" / f"{hit.id}.png").exists()
    assert hit.id not in [h.id for h in client.search(gpb.QueryPart(image_data=datas[2]), top_k=10).hits]
    with pytest.raises(grpc.RpcError) as err:
        client.GetImage(gpb.GetImageRequest(id=hit.id))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def make_folder(folder: Path, count: int) -> dict[str, str]:
    """``count`` distinct images in nested folders, plus a file that is not an image."""
    ids = {}
    for i in range(count):
        path = folder / f"part-{i % 4}" / f"img-{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = noise_image(10_000 + i, size=32)
        path.write_bytes(data)
        ids[sha(data)] = str(path)
    (folder / "notes.txt").write_text("not an image")
    return ids


def test_import_interrupted_and_resumed_gives_each_image_once(workdir, encoder_service, index_shards):
    source = workdir / "to-import"
    expected = make_folder(source, 200)
    args = ["--storage", str(workdir / "import-images"), "--default-collection", "importimgs",
            "--import-sources", str(workdir), "--import-batch-size", "10", "--import-max-images-per-second", "80"]
    first = start_gateway(workdir, encoder_service, index_shards, *args, name="gateway-import")
    client = Client(first.address)
    job = client.ImportImages(gpb.ImportImagesRequest(source=str(source))).job
    assert job.state == gpb.IMPORT_STATE_RUNNING
    deadline = time.monotonic() + 60
    while client.GetImportJob(gpb.GetImportJobRequest(job_id=job.job_id)).job.processed < 40:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    first.kill()  # no chance to save anything more
    client.close()

    second = start_gateway(workdir, encoder_service, index_shards, *args, name="gateway-import")
    client = Client(second.address)
    try:
        resumed = client.ImportImages(gpb.ImportImagesRequest(source=str(source))).job
        assert resumed.job_id == job.job_id
        assert 40 <= resumed.processed < 200 or resumed.state == gpb.IMPORT_STATE_RUNNING
        done = client.wait_import(job.job_id)
        assert done.state == gpb.IMPORT_STATE_SUCCEEDED, done
        assert (done.total, done.processed, done.failed) == (200, 200, 0)
        assert done.imported + done.skipped == 200

        listed, token = [], ""
        while True:
            page = client.ListImages(gpb.ListImagesRequest(page_size=64, page_token=token))
            listed += [image.id for image in page.images]
            token = page.next_page_token
            if not token:
                break
        assert sorted(listed) == sorted(expected)  # every image, exactly once
        count = client.GetCollection(gpb.GetCollectionRequest(name="importimgs")).collection.vector_count
        assert count == 200
        stored = list((workdir / "import-images" / "importimgs").iterdir())
        assert len(stored) == 200

        # Running it again is a fresh pass that finds nothing new.
        again = client.wait_import(client.ImportImages(gpb.ImportImagesRequest(source=str(source))).job.job_id)
        assert (again.imported, again.skipped, again.state) == (0, 200, gpb.IMPORT_STATE_SUCCEEDED)
    finally:
        client.close()
        second.terminate()


def test_import_outside_the_allowed_roots_is_refused(workdir, encoder_service, index_shards, tmp_path):
    proc = start_gateway(workdir, encoder_service, index_shards, "--storage", str(workdir / "roots-images"),
                         "--default-collection", "rootsimgs", "--import-sources", str(workdir / "allowed"),
                         name="gateway-roots")
    client = Client(proc.address)
    try:
        (workdir / "allowed").mkdir(exist_ok=True)
        for source in (str(tmp_path), str(workdir / "allowed" / ".." / "to-import"), "/etc"):
            with pytest.raises(grpc.RpcError) as err:
                client.ImportImages(gpb.ImportImagesRequest(source=source))
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, source
        with pytest.raises(grpc.RpcError) as err:
            client.GetImportJob(gpb.GetImportJobRequest(job_id="imp-../../etc"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        client.close()
        proc.terminate()
