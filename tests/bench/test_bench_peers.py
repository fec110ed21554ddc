"""bench.peers, clipsearch side only, at a tiny size: a real index service process on 127.0.0.1
port 0. The peers (Milvus Lite, Chroma) are not installed here. Timings are never asserted."""

from __future__ import annotations

import json
import math

from bench import peers
from bench.peers_common import choose_parameter


def test_choose_parameter_takes_the_smallest_reaching_the_target_else_the_best():
    assert choose_parameter({4: 0.80, 8: 0.95, 16: 0.97}) == (8, True)
    assert choose_parameter({16: 0.97, 8: 0.96, 4: 0.80}) == (8, True)  # order of the sweep does not matter
    assert choose_parameter({1: 0.61, 2: 0.61, 4: 0.60}) == (1, False)  # never reached: best recall, smallest
    assert choose_parameter({None: 1.0}) == (None, True)  # nothing to tune (Flat)


def test_clipsearch_side_end_to_end_at_tiny_n(tmp_path):
    results = peers.main(["--n", "3000", "--dim", "32", "--clusters", "64", "--systems", "clipsearch",
                          "--rounds", "2", "--tuning-queries", "60", "--heldout-queries", "40",
                          "--clients", "3", "--queries-per-client", "4",
                          "--workdir", str(tmp_path / "work"), "--out", str(tmp_path)])
    written = json.loads((tmp_path / "peers.json").read_text())
    assert written["machine"]["cpus"] >= 1 and len(written["host_at_start"]["load_average"]) == 3
    info = results["systems"]["clipsearch"]
    assert "error" not in info and info["versions"]["faiss"]
    assert set(info["configs"]) == {"Flat", "IVF219,Flat", "HNSW32"}  # nlist = 4 sqrt(n)
    for name, entry in info["configs"].items():
        assert entry["accepted"], name
        assert len(entry["rounds"]) == 2
        assert 0.0 <= entry["heldout_recall"] <= 1.0
        for key in ("p50_ms", "p99_ms", "qps", "ingest_vectors_per_s", "searchable_s"):
            assert math.isfinite(entry[key]) and entry[key] > 0, (name, key)
        sweep = dict(entry["tuning_sweep"])
        assert all(0.0 <= recall <= 1.0 for recall in sweep.values())
        assert (entry["param"], entry["reached_target"]) == choose_parameter(sweep)
    assert info["configs"]["Flat"]["heldout_recall"] >= 0.99  # exact search (ties aside)
    ivf = info["configs"]["IVF219,Flat"]
    recalls = dict(ivf["tuning_sweep"])
    # The sweep climbs until the target: every smaller nprobe fell short, the chosen one reached it.
    assert ivf["reached_target"] and recalls[ivf["param"]] >= 0.95
    assert all(recall < 0.95 for nprobe, recall in recalls.items() if nprobe < ivf["param"])
    assert recalls[1] < 0.95  # real recall: one list of 219 does not find the neighbours
    assert not ivf["parameter_had_no_effect"]
