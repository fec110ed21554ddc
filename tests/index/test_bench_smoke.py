"""The index benchmark runs end to end at a tiny size. Correctness only: timings are never asserted."""

from __future__ import annotations

import json
import math

import pytest


def positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_index_bench_tiny(tmp_path):
    from bench.index_bench import main

    results = main(["--n", "5000", "--dim", "32", "--queries", "30", "--flat-queries", "20", "--out", str(tmp_path)])
    assert results["config"]["nlist"] == 128  # the largest power of two with 39 x nlist <= n
    for name in ("flat", "ivf", "ivf_text"):
        entry = results[name]
        assert entry["recall_at_10_grpc"] == pytest.approx(entry["recall_at_10_in_process"])
        for key in ("p50_ratio_grpc_vs_in_process", "index_bytes_per_vector", "engine_memory_bytes_per_vector"):
            assert positive(entry[key]), (name, key)
        for path in ("in_process", "grpc"):
            assert positive(entry[path]["p50_ms"]) and entry[path]["n"] == (20 if name == "flat" else 30)
    assert results["flat"]["recall_at_10_grpc"] == 1.0
    assert 0 < results["ivf"]["recall_at_10_grpc"] <= 1.0
    # nprobe is chosen on tuning queries; recall is reported on held-out ones.
    for name, setting in (("ivf", "in-distribution"), ("ivf_text", "text-like")):
        assert results[name]["queries"] == setting
        assert results[name]["nprobe"] in results["settings"][setting]["tuning_sweep_recall"]
    assert results["settings"]["text-like"]["nn_similarity"] < results["settings"]["in-distribution"]["nn_similarity"]
    assert positive(results["grpc_floor"]["p50_ms"])  # a bare health check on the same channel
    written = json.loads((tmp_path / "index_bench_n5000.json").read_text())
    assert written["ivf"]["index_spec"] == "IVF128,Flat"
