"""The benchmark driver runs every row of the suite at tiny sizes (the tiny model,
a few thousand vectors) and reports each with a finite baseline and ratio, the
ratio's spread over alternating rounds, and the machine it ran on.
Correctness only: timings and whether targets are met are never asserted."""

from __future__ import annotations

import json
import math

import pytest

ROW_IDS = {"P1", "P2", "P3", "P4", "P7", "P8", "P10", "P11"}


def finite(value) -> bool:
    return isinstance(value, float) and math.isfinite(value)


@pytest.mark.slow
def test_run_all_tiny_reports_every_row_with_baseline_and_ratio(tmp_path):
    from bench.run_all import main

    summary = main(["--tiny", "--out", str(tmp_path / "results"), "--workdir", str(tmp_path / "work")])

    assert summary["mode"] == "tiny" and summary["errors"] == {}
    rows = summary["rows"]
    assert {r["id"] for r in rows} == ROW_IDS
    for r in rows:
        assert finite(r["ours"]) and r["ours"] > 0, r
        assert finite(r["baseline"]) and r["baseline"] > 0, r
        # The ratio is the median of per-round ratios, within their spread.
        assert finite(r["ratio"]) and finite(r["ratio_min"]) and finite(r["ratio_max"]), r
        assert r["ratio_min"] <= r["ratio"] <= r["ratio_max"], r
        assert r["target"] and isinstance(r["met"], bool), r
        if r["rounds"] == 1:  # a figure measured once (memory, recall), not a timing
            assert r["ratio"] == pytest.approx(r["ours"] / r["baseline"]), r
        else:  # every timed ours-vs-baseline row: at least 3 alternating rounds
            assert r["rounds"] >= 3, r
    once = {(r["id"], r["what"].split(":")[0]) for r in rows if r["rounds"] == 1}
    assert {pid for pid, _ in once} == {"P2", "P8"}, once  # recall and memory only
    p1 = [r for r in rows if r["id"] == "P1"]
    assert len(p1) == 8  # p50 and p99: 1 client, 1 client without metadata, 8 clients; onnx vs torch encoder
    assert sum(r["id"] == "P4" for r in rows) == 3  # trimmed vs 77 tokens; onnx vs torch: one text, images/s
    assert {"onnx", "torch"} <= set(summary["details"]["P1"]["runtimes"])
    # Flat; IVF latency and recall for in-distribution and text-like (shifted) queries.
    assert sum(r["id"] == "P2" for r in rows) == 5
    for setting in ("in-distribution", "text-like"):
        assert sum(f"{setting} queries" in r["what"] for r in rows if r["id"] == "P2" and "IVF" in r["what"]) == 2
    settings = summary["p2"]["settings"]
    assert set(settings) == {"in-distribution", "text-like"}
    assert settings["text-like"]["nn_similarity"] < settings["in-distribution"]["nn_similarity"]
    # P8: a real index service's RSS growth per vector for Flat, IVF-Flat, IVF-PQ and HNSW.
    p8 = summary["details"]["P8"]["per_spec"]
    assert sum(r["id"] == "P8" for r in rows) == len(p8) == 4
    for entry in p8.values():
        for state in ("after_ingest", "settled", "after_snapshot"):
            assert finite(entry[state]["rss_growth"]), entry
            breakdown = entry[state]["breakdown"]
            assert isinstance(breakdown, str) or set(breakdown) == {
                "faiss", "id_maps", "filter_columns", "store_cache", "python_and_rest"}, breakdown
    assert sum(r["id"] == "P11" for r in rows) == 1  # HTTP/JSON vs gRPC search p50, same request
    assert sum(r["id"] == "P10" for r in rows) == 1  # one BatchSearchImages vs sequential SearchImages
    assert summary["details"]["P1"]["batch_search"]["queries"] == 32

    # The scaling table: Flat and IVF (both query settings) at every size, in-process and
    # through the service; the largest size comes from P2.
    scaling = summary["scaling"]
    sizes = sorted({e["n"] for e in scaling})
    assert sizes == [500, 1000, 3000]
    assert len(scaling) == 3 * len(sizes)
    for entry in scaling:
        assert entry["index_mb"] > 0 and entry["build_s"] > 0 and entry["query_p50_ms"] > 0, entry
        assert entry["grpc_p50_ms"] > 0 and finite(entry["grpc_vs_in_process"]), entry
        assert 0 < entry["recall_at_10"] <= 1.0, entry
    assert all(e["recall_at_10"] == 1.0 for e in scaling if e["index"] == "Flat")

    written = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert [r["id"] for r in written["rows"]] == [r["id"] for r in rows]
    machine = written["machine"]
    assert machine["cpus"] >= 1 and machine["cpu_model"] and machine["cpu_flags"] and machine["faiss_simd"]
    assert machine["load_1min_start"] >= 0 and machine["load_1min_end"] >= 0
    assert (tmp_path / "results" / "summary-tiny.json").exists()
    # P1 and P2 searched the same IVF collection, created with the encoder's fingerprint.
    assert summary["details"]["P1"]["index_spec"].startswith("IVF")
