"""Metadata after upload: re-uploading the same bytes merges the new metadata
(reported as metadata_updated), UpdateImage merges or replaces it by a field mask."""

from __future__ import annotations

import time

import pytest

from clipsearch import errors
from clipsearch.client import Client
from tests.gateway.conftest import near_duplicate, noise_image, sha, start_gateway


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("gw-meta")


@pytest.fixture(scope="module")
def gateway(workdir, encoder_service, index_shards):
    proc = start_gateway(workdir, encoder_service, index_shards, "--storage", str(workdir / "images"),
                         "--default-collection", "metaupd", "--import-sources", str(workdir / "sources"),
                         name="gateway-meta")
    yield proc
    proc.terminate()


@pytest.fixture(scope="module")
def sdk(gateway):
    with Client(gateway.address) as client:
        yield client


def test_reupload_with_metadata_merges_and_says_so(sdk):
    data = noise_image(4100)
    first = sdk.upload([(data, {"album": "pets"})])[0]
    assert first.created and not first.metadata_updated
    again = sdk.upload([(data, {"album": "travel", "year": 2024})])[0]
    assert again.ok and not again.created and again.metadata_updated
    image = sdk.get(sha(data))
    assert image.metadata["album"] == "travel" and image.metadata["year"] == 2024
    assert image.metadata["content_type"] == "image/png"
    hits = sdk.search(image=data, top_k=3, filter={"album": "travel", "year": {"gte": 2020}})
    assert [h.id for h in hits][:1] == [sha(data)]
    same = sdk.upload([(data, {"album": "travel"})])[0]
    assert same.ok and not same.metadata_updated  # nothing changed


def test_update_image_merges_replaces_and_removes_by_field_mask(sdk):
    data = noise_image(4101)
    image_id = sdk.upload([(data, {"album": "pets", "rating": 3})])[0].id
    merged = sdk.update_metadata(image_id, {"rating": 5, "place": "home"})
    assert {k: merged.metadata[k] for k in ("album", "rating", "place")} == {"album": "pets", "rating": 5,
                                                                            "place": "home"}
    removed = sdk.update_metadata(image_id, remove=["place"])
    assert "place" not in removed.metadata and removed.metadata["album"] == "pets"
    replaced = sdk.update_metadata(image_id, {"tag": "x"}, replace=True)
    assert replaced.metadata == {"tag": "x", "content_type": "image/png", "size_bytes": float(len(data))}
    assert sdk.get(image_id).metadata == replaced.metadata
    with pytest.raises(errors.InvalidArgument):
        sdk.update_metadata(image_id, {"content_type": "image/gif"})
    with pytest.raises(errors.NotFound):
        sdk.update_metadata("0" * 64, {"a": "b"})


def test_import_into_a_recreated_collection_starts_fresh(sdk, workdir):
    folder = workdir / "sources" / "photos"
    folder.mkdir(parents=True)
    for i in range(3):
        (folder / f"{i}.png").write_bytes(noise_image(4200 + i))

    def run_import():
        job = sdk.import_images(str(folder), collection="reimp")
        deadline = time.monotonic() + 60
        while not job.done and time.monotonic() < deadline:
            time.sleep(0.1)
            job = sdk.get_import_job(job.job_id)
        return job

    sdk.create_collection("reimp")
    first = run_import()
    assert first.imported == 3
    uid = sdk.get_collection("reimp").uid
    sdk.delete_collection("reimp")
    sdk.create_collection("reimp")
    assert sdk.get_collection("reimp").uid not in ("", uid)
    again = run_import()
    assert again.job_id != first.job_id and again.imported == 3 and again.skipped == 0
    assert sdk.get_collection("reimp").vector_count == 3
    jobs, token = sdk.list_import_jobs(collection="reimp")
    assert {j.job_id for j in jobs} == {first.job_id, again.job_id} and token == ""
    assert sdk.cancel_import_job(again.job_id).state == "SUCCEEDED"  # an ended job stays as it ended


def test_cancelling_a_running_job_stops_it_and_keeps_its_cursor(tmp_path):
    import asyncio

    from gateway.jobs import JobStore, Saved
    from gateway.types import ImportJob

    async def main():
        store = JobStore(tmp_path, ImportJob, r"imp-[0-9a-f]{24}")
        saved = Saved(ImportJob(job_id="imp-" + "a" * 24, collection="c", source="s"), cursor="k1")
        store.launch(saved, lambda s: asyncio.sleep(60))
        await asyncio.sleep(0)
        job = await store.cancel(saved.job.job_id)
        assert job.state == "cancelled" and not saved.running
        assert store.listed()[0].state == "cancelled" and store.unfinished() == []  # not resumed on start
        assert JobStore(tmp_path, ImportJob, r"imp-[0-9a-f]{24}").find(job.job_id).cursor == "k1"

    asyncio.run(main())


def test_pages_stay_stable_while_others_write_and_delete(sdk):
    sdk.create_collection("pages")
    datas = [noise_image(4300 + i) for i in range(12)]
    sdk.upload(datas, collection="pages")
    query = noise_image(4399)
    whole = [h.id for h in sdk.search(image=query, top_k=12, collection="pages")]
    first = sdk.search(image=query, top_k=12, page_size=4, collection="pages")
    # Others write after the first page: near-copies of the query would rank first if searched again.
    sdk.upload([near_duplicate(4399, v) for v in range(3)], collection="pages")
    second = sdk.search(image=query, top_k=12, page_size=4, page_token=first.next_page_token, collection="pages")
    sdk.delete(whole[10], collection="pages")
    third = sdk.search(image=query, top_k=12, page_size=4, page_token=second.next_page_token, collection="pages")
    assert [h.id for h in first] + [h.id for h in second] == whole[:8]
    assert [h.id for h in third] == whole[8:10] + whole[11:]  # the deleted one is left out, nothing else moves
    assert third.next_page_token == "" and all(h.metadata.get("content_type") for h in third)
    assert max(h.score for h in second) <= min(h.score for h in first)  # the scores of the pinned ranking


def test_the_readme_sdk_examples_run_against_a_live_gateway(gateway, tmp_path, monkeypatch):
    import io
    import re
    from pathlib import Path

    from PIL import Image

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("\n### Python SDK\n", 1)[1].split("\n### ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) >= 3
    for seed, name in enumerate(["cat.jpg", "dog.jpg", "sunset.jpg", "query.jpg"]):
        buffer = io.BytesIO()
        Image.open(io.BytesIO(noise_image(4500 + seed))).convert("RGB").save(buffer, "JPEG")
        (tmp_path / name).write_bytes(buffer.getvalue())
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block.replace("127.0.0.1:50050", gateway.address), "README.md", "exec"), namespace)
    assert namespace["results"] and all(r.ok for r in namespace["results"])


def test_the_readme_grpcurl_lines_run_where_grpcurl_is_installed(gateway):
    import re
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("grpcurl") is None:
        pytest.skip("grpcurl is not installed")
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = re.search(r"### grpcurl\n.*?```bash\n(.*?)```", readme, re.S).group(1)
    for command in block.replace("\\\n", " ").strip().splitlines():
        result = subprocess.run(command.replace("127.0.0.1:50050", gateway.address), shell=True,
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, command + result.stderr
