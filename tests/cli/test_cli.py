"""The CLI and SDK end to end: `clipsearch up` in a subprocess, then import,
search, get, delete, resume of an interrupted import, and clean shutdown."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipsearch import errors
from clipsearch.client import AsyncClient, Client
from clipsearch.keys import key_entry, keys_file_text

API_KEY = "cli-test-key"


def write_images(folder: Path, count: int, seed: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        pixels = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).resize((64, 64), Image.NEAREST)
        path = folder / f"img-{i:03d}.png"
        image.save(path)
        paths.append(path)
    return paths


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    env = {**os.environ, "CLIPSEARCH_STATE_DIR": str(root / "state"), "CLIPSEARCH_API_KEY": API_KEY}
    keys_file = root / "keys.yaml"
    keys_file.write_text(keys_file_text([key_entry("cli-test", API_KEY, ["admin"])]))
    up = subprocess.Popen(
        [sys.executable, "-m", "clipsearch.cli", "up", "--model", "clipsearch-tiny", "--pretrained", "none",
         "--shards", "2", "--data-dir", str(root / "data"), "--port", "0", "--http-port", "0",
         "--api-keys-file", str(keys_file)],
        stdout=open(root / "up.log", "wb"), stderr=subprocess.STDOUT, env=env,
    )
    stack_file = root / "state" / "stack.json"
    deadline = time.monotonic() + 180
    while not stack_file.exists():
        assert up.poll() is None, (root / "up.log").read_text()
        assert time.monotonic() < deadline, "clipsearch up did not become ready"
        time.sleep(0.2)
    info = json.loads(stack_file.read_text())
    yield {"root": root, "env": env, "up": up, "info": info}
    if up.poll() is None:
        up.send_signal(signal.SIGTERM)
        up.wait(60)


def cli(stack, *args, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "clipsearch.cli", *args], env=stack["env"],
                            capture_output=True, text=True, timeout=180)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_import_search_get_delete_through_the_cli(stack):
    folder = stack["root"] / "photos"
    paths = write_images(folder, 24, seed=1)
    counts = json.loads(cli(stack, "import", str(folder), "--json", "--quiet").stdout)
    assert counts["found"] == 24 and counts["imported"] == 24 and counts["failed"] == 0

    query = paths[5]
    found = json.loads(cli(stack, "search", "--image", str(query), "--json", "--top-k", "3").stdout)
    assert found["hits"][0]["id"] == sha(query)
    assert found["hits"][0]["score"] == pytest.approx(1.0, abs=1e-3)
    assert found["hits"][0]["metadata"]["filename"] == query.name

    table = cli(stack, "search", "a red circle", "--top-k", "3").stdout
    assert "file" in table.splitlines()[2] and "img-0" in table  # the original file names
    assert "rank" in table and len([l for l in table.splitlines() if l.strip()[:1].isdigit()]) == 3

    shown = json.loads(cli(stack, "get", sha(query)).stdout)
    assert shown["id"] == sha(query) and shown["size_bytes"] == query.stat().st_size

    cli(stack, "delete", sha(query))
    again = json.loads(cli(stack, "search", "--image", str(query), "--json", "--top-k", "24").stdout)
    assert sha(query) not in [h["id"] for h in again["hits"]]
    missing = cli(stack, "get", sha(query), check=False)
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr


def test_an_interrupted_import_resumes_without_duplicates(stack, monkeypatch):
    from clipsearch.cli import import_checkpoint_path

    folder = stack["root"] / "resume"
    paths = write_images(folder, 60, seed=2)
    proc = subprocess.Popen(
        [sys.executable, "-m", "clipsearch.cli", "import", str(folder), "--batch-size", "4"],
        env=stack["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    monkeypatch.setenv("CLIPSEARCH_STATE_DIR", stack["env"]["CLIPSEARCH_STATE_DIR"])
    with Client(stack["info"]["target"], api_key=API_KEY) as client:
        uid = client.get_collection().uid
    checkpoint = import_checkpoint_path(stack["info"]["target"], folder, "", uid)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if checkpoint.exists() and len(checkpoint.read_text().splitlines()) >= 8:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    assert "run the same command again to resume" in err

    counts = json.loads(cli(stack, "import", str(folder), "--json", "--quiet", "--batch-size", "4").stdout)
    assert counts["already_done"] >= 8 and counts["already_done"] + counts["imported"] + counts["duplicates"] == 60
    assert counts["failed"] == 0

    with Client(stack["info"]["target"], api_key=API_KEY) as client:
        stored = [image.id for image in client.iter_images(page_size=7)]
    assert len(stored) == len(set(stored)), "an image was stored twice"
    assert {sha(p) for p in paths} <= set(stored)


def test_a_recreated_collection_imports_the_same_folder_again(stack, tmp_path):
    folder = tmp_path / "again"
    write_images(folder, 5, seed=7)
    cli(stack, "collections", "create", "recreated")
    first = json.loads(cli(stack, "import", str(folder), "--collection", "recreated", "--json", "--quiet").stdout)
    assert first["imported"] == 5
    with Client(stack["info"]["target"], api_key=API_KEY) as client:
        uid = client.get_collection("recreated").uid
    cli(stack, "collections", "delete", "recreated")
    cli(stack, "collections", "create", "recreated")
    again = json.loads(cli(stack, "import", str(folder), "--collection", "recreated", "--json", "--quiet").stdout)
    assert again["already_done"] == 0 and again["imported"] == 5
    with Client(stack["info"]["target"], api_key=API_KEY) as client:
        collection = client.get_collection("recreated")
    assert collection.vector_count == 5 and collection.uid and collection.uid != uid


def test_sdk_sync_and_async_with_typed_errors(stack):
    target = stack["info"]["target"]
    image = io.BytesIO()
    Image.new("RGB", (64, 64), (250, 10, 10)).save(image, "PNG")
    with Client(target, api_key=API_KEY) as client:
        [result] = client.upload([(image.getvalue(), {"colour": "red", "weight": 3})])
        assert result.ok and len(result.id) == 64
        hits = client.search(image=image.getvalue(), top_k=1, filter={"colour": "red"})
        assert hits[0].id == result.id
        assert hits[0].metadata["colour"] == "red" and hits[0].metadata["weight"] == 3.0
        with pytest.raises(errors.NotFound) as info:
            client.get("0" * 64)
        assert info.value.code == "NOT_FOUND"
        with pytest.raises(errors.InvalidArgument):
            client.search(top_k=5)  # no query at all
    with Client(target, api_key="wrong") as client, pytest.raises(errors.Unauthenticated):
        client.list_collections()

    async def use_async():
        async with AsyncClient(target, api_key=API_KEY) as client:
            hits = await client.search(image=image.getvalue(), top_k=1)
            collections = await client.list_collections()
            try:
                await client.get("f" * 64)
            except errors.NotFound as error:
                return hits, collections, error

    hits, collections, error = asyncio.run(use_async())
    assert hits[0].id == result.id
    assert collections and collections[0].vector_count >= 1
    assert error.code == "NOT_FOUND"


def test_batch_search_through_the_cli_and_both_sdks(stack, tmp_path):
    query = write_images(tmp_path / "q", 1, seed=99)[0]
    with Client(stack["info"]["target"], api_key=API_KEY) as client:
        client.upload_files([query])
        results = client.batch_search(["a red circle", {"image": str(query), "top_k": 2},
                                       {"image_id": "0" * 64}], top_k=3)
    assert [r.ok for r in results] == [True, True, False] and results[2].error_code == "NOT_FOUND"
    assert len(results[0].hits) == 3 and results[1].hits[0].id == sha(query) and len(results[1].hits) == 2

    async def run_async():
        async with AsyncClient(stack["info"]["target"], api_key=API_KEY) as client:
            return await client.batch_search(["a red circle", "a blue square"], top_k=2)

    assert [len(r.hits) for r in asyncio.run(run_async())] == [2, 2]
    queries = tmp_path / "queries.txt"
    queries.write_text(f'a red circle\n# a comment\n{{"image": "{query}", "top_k": 1}}\n')
    found = json.loads(cli(stack, "search", "--queries-file", str(queries), "--top-k", "4", "--json").stdout)
    assert [len(r["hits"]) for r in found] == [4, 1] and found[1]["hits"][0]["id"] == sha(query)
    queries.write_text('a red circle\n{"image_id": "' + "0" * 64 + '"}\n')
    failed = cli(stack, "search", "--queries-file", str(queries), check=False)
    assert failed.returncode == 1 and "NOT_FOUND" in failed.stdout and "rank" in failed.stdout


def test_cli_parity_sidecar_metadata_date_and_range_filters_aggregation_weights_nprobe(stack, tmp_path):
    folder = tmp_path / "dated"
    paths = write_images(folder, 3, seed=31)
    (tmp_path / "meta.csv").write_text("filename,date,year,album\nimg-000.png,2019-06-01,2019,old\n"
                                       "img-001.png,2021-03-04,2021,new\nimg-002.png,2023-01-01,2023,new\n")
    counts = json.loads(cli(stack, "import", str(folder), "--metadata", str(tmp_path / "meta.csv"), "--json",
                            "--quiet").stdout)
    assert counts["failed"] == 0

    def found(*args):
        return [h["id"] for h in json.loads(cli(stack, "search", "a photo", "--json", "--top-k", "50",
                                                 *args).stdout)["hits"]]

    assert set(found("--filter", "date>=2020-01-01")) == {sha(paths[1]), sha(paths[2])}
    assert found("--filter", "year=2020..2022") == [sha(paths[1])]
    hits = json.loads(cli(stack, "search", "--image", str(paths[0]), "--image", str(paths[1]), "--weight", "1",
                          "--weight", "0.01", "--aggregation", "max", "--nprobe", "4", "--top-k", "3",
                          "--filter", "album=old|new", "--json").stdout)["hits"]
    alone = json.loads(cli(stack, "search", "--image", str(paths[0]), "--top-k", "3", "--filter", "album=old|new",
                           "--json").stdout)["hits"]
    assert hits[0]["id"] == sha(paths[0]) and hits[0]["metadata"]["album"] == "old"
    assert [(h["id"], round(h["score"], 4)) for h in hits] == [(h["id"], round(h["score"], 4)) for h in alone]
    even = json.loads(cli(stack, "search", "--image", str(paths[0]), "--image", str(paths[1]), "--aggregation",
                          "max", "--top-k", "3", "--json").stdout)["hits"]
    assert {h["id"]: round(h["score"], 3) for h in even}[sha(paths[1])] == 1.0  # unweighted, its own part wins
    refused = cli(stack, "search", "--image", str(paths[0]), "--weight", "1", "--weight", "2", check=False)
    assert refused.returncode != 0 and "--weight" in refused.stderr
    listed = cli(stack, "imports", "list")
    assert "job id" in listed.stdout


def test_eval_takes_its_options_without_a_separator(monkeypatch):
    from clipsearch import cli as cli_module
    from clipsearch import eval as evaluation

    seen = []
    monkeypatch.setattr(evaluation, "main", lambda argv: seen.append(argv) or 0)
    monkeypatch.delenv("CLIPSEARCH_TARGET", raising=False)
    assert cli_module.main(["eval", "--synthetic", "--n", "50"]) == 0
    assert cli_module.main(["eval", "--", "--synthetic"]) == 0
    assert seen == [["--synthetic", "--n", "50"], ["--synthetic"]]


def test_upload_files_splits_into_calls_under_the_per_call_limit(tmp_path, monkeypatch):
    from clipsearch.client import UploadResult

    paths = []
    for i in range(300):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(b"x" * 10)
    calls = []

    def fake_call(method, request, parse, timeout=None):
        calls.append(len(request.items))
        return [UploadResult(str(i), True) for i in range(len(request.items))]

    with Client("127.0.0.1:1") as client:
        monkeypatch.setattr(client, "_call", fake_call)
        results = client.upload_files(paths, file_metadata=[{"n": i} for i in range(300)])
    assert len(results) == 300 and max(calls) <= 256 and sum(calls) == 300 and len(calls) > 1


def test_up_passes_clipsearch_settings_through_and_shows_metrics(stack, monkeypatch, tmp_path):
    from clipsearch.stack import LocalStack, StackConfig, default_data_dir

    monkeypatch.setenv("CLIPSEARCH_STATE_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path / "data"
    monkeypatch.setenv("CLIPSEARCH_URL_TTL_SECONDS", "123")
    local = LocalStack(StackConfig(data_dir=tmp_path))
    monkeypatch.setattr("clipsearch.stack.ServiceProcess.spawn", lambda self: self)
    child = local._spawn("gateway", "gateway", [], 0)
    assert child.env["CLIPSEARCH_URL_TTL_SECONDS"] == "123"
    assert "--metrics-port" in child.args
    for service in stack["info"]["services"].values():
        assert service["metrics"].startswith("http://127.0.0.1:") and service["metrics"].endswith("/metrics")
    printed = (stack["root"] / "up.log").read_text()
    assert printed.count("metrics http://") == len(stack["info"]["services"])
    page = stack["info"]["services"]["gateway"]["web"]
    assert f"web page and HTTP/JSON API at {page}" in printed
    with urllib.request.urlopen(page, timeout=10) as response:
        assert b"clipsearch" in response.read()


def test_down_stops_every_process_cleanly(stack):
    pids = [s["pid"] for s in stack["info"]["services"].values()]
    cli(stack, "down")
    assert stack["up"].wait(60) == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not (stack["root"] / "state" / "stack.json").exists()


def test_keys_create_prints_a_secret_and_its_entry(tmp_path):
    result = subprocess.run([sys.executable, "-m", "clipsearch.cli", "keys", "create", "--id", "team-a-reader",
                             "--scope", "read:team-a*"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    secret = next(line.strip() for line in result.stdout.splitlines() if line.strip().startswith("csk_"))
    import yaml

    entry = yaml.safe_load(result.stdout.split("file (it is re-read on change):\n", 1)[1])[0]
    assert entry == {"id": "team-a-reader", "sha256": hashlib.sha256(secret.encode()).hexdigest(),
                     "scopes": ["read:team-a*"]}
    bad = subprocess.run([sys.executable, "-m", "clipsearch.cli", "keys", "create", "--id", "x", "--scope", "all"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "scope" in bad.stderr


def test_up_and_demo_keep_their_own_defaults():
    from clipsearch.cli import build_parser

    parser = build_parser()
    up = parser.parse_args(["up"])
    demo = parser.parse_args(["demo"])
    assert (up.port, up.data_dir) == (50050, "")  # "" = the documented <state dir>/data
    assert (demo.port, demo.data_dir) == (0, "./data/demo")
    assert parser.parse_args(["up", "--port", "0"]).port == 0
    assert (up.http_port, demo.http_port) == (8080, -1)  # up serves the web page by default
