"""`clipsearch repair` end to end: a real gateway over the session's encoder
and index shards, an image whose index entry is lost (its stored object is
orphaned) and an index entry whose stored object is lost; the CLI repairs
both through RepairCollection/GetRepairJob."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from clipsearch import errors
from clipsearch.client import Client
from clipsearch.index.v1 import index_service_pb2 as ipb
from tests.gateway.conftest import (  # noqa: F401  (session fixtures used here)
    encoder_service,
    index_shards,
    index_stub,
    noise_image,
    sha,
    start_gateway,
)

COLLECTION = "repairimgs"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("cli-repair")


@pytest.fixture(scope="module")
def gateway(workdir, encoder_service, index_shards):  # noqa: F811
    proc = start_gateway(workdir, encoder_service, index_shards, "--storage", str(workdir / "images"),
                         "--default-collection", COLLECTION, name="gateway-repair")
    yield proc
    proc.terminate()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("CLIPSEARCH_TARGET", "CLIPSEARCH_API_KEY")}
    return subprocess.run([sys.executable, "-m", "clipsearch.cli", *args], env=env, capture_output=True,
                          text=True, timeout=180)


def test_repair_reindexes_orphaned_images_and_drops_entries_of_lost_ones(gateway, index_shards,  # noqa: F811
                                                                          workdir):
    datas = [noise_image(7100 + i) for i in range(5)]
    orphan, lost = datas[1], datas[3]
    with Client(gateway.address, collection=COLLECTION) as client:
        assert all(r.ok for r in client.upload(datas))

        # The index forgets one image: its stored object is orphaned.
        deleted = sum(index_stub(s.address).DeleteVectors(
            ipb.DeleteVectorsRequest(collection=COLLECTION, ids=[sha(orphan)])).deleted_count for s in index_shards)
        assert deleted == 1
        assert sha(orphan) not in [h.id for h in client.search(image=orphan, top_k=5)]
        # Storage loses another image: its index entry points at nothing.
        next((workdir / "images" / COLLECTION).glob(f"{sha(lost)}.*")).unlink()

        dry = run_cli("repair", "--target", gateway.address, "--collection", COLLECTION, "--dry-run", "--quiet")
        assert dry.returncode == 0, dry.stdout + dry.stderr
        assert "reindexed=1" in dry.stdout and "dropped=1" in dry.stdout and "nothing changed" in dry.stdout
        assert sha(orphan) not in [h.id for h in client.search(image=orphan, top_k=5)]

        result = run_cli("repair", "--target", gateway.address, "--collection", COLLECTION, "--quiet")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "succeeded" in result.stdout
        assert "checked=5" in result.stdout and "reindexed=1" in result.stdout and "dropped=1" in result.stdout
        assert f"dropped: {sha(lost)}" in result.stdout

        hit = client.search(image=orphan, top_k=1)[0]
        assert hit.id == sha(orphan) and hit.score == pytest.approx(1.0, abs=1e-3)
        assert client.get(sha(orphan)).size_bytes == len(orphan)
        assert sha(lost) not in [h.id for h in client.search(image=lost, top_k=5, with_metadata=False)]
        with pytest.raises(errors.NotFound):
            client.get(sha(lost))

