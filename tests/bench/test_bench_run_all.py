"""The benchmark driver runs every row of the suite at tiny sizes (the tiny model,
a few thousand vectors) and reports each with a finite baseline and ratio.
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
        assert finite(r["ratio"]) and r["ratio"] == pytest.approx(r["ours"] / r["baseline"]), r
        assert r["target"] and isinstance(r["met"], bool), r
    p1 = [r for r in rows if r["id"] == "P1"]
    assert len(p1) == 8  # p50 and p99: 1 client, 1 client without metadata, 8 clients; onnx vs torch encoder
    assert sum(r["id"] == "P4" for r in rows) == 3  # trimmed vs 77 tokens; onnx vs torch: one text, images/s
    assert set(summary["details"]["P1"]["runtimes"]) == {"onnx", "torch"}
    assert sum(r["id"] == "P2" for r in rows) == 3  # Flat, IVF, IVF recall
    assert sum(r["id"] == "P8" for r in rows) == 2  # Flat, IVF-PQ
    assert sum(r["id"] == "P11" for r in rows) == 1  # HTTP/JSON vs gRPC search p50, same request
    assert sum(r["id"] == "P10" for r in rows) == 1  # one BatchSearchImages vs sequential SearchImages
    assert summary["details"]["P1"]["batch_search"]["queries"] == 32

    # The scaling table: Flat and IVF at every size, the largest coming from P2.
    scaling = summary["scaling"]
    sizes = sorted({e["n"] for e in scaling})
    assert sizes == [500, 1000, 3000]
    assert len(scaling) == 2 * len(sizes)
    for entry in scaling:
        assert entry["index_mb"] > 0 and entry["build_s"] > 0 and entry["query_p50_ms"] > 0, entry
        assert 0 < entry["recall_at_10"] <= 1.0, entry
    assert all(e["recall_at_10"] == 1.0 for e in scaling if e["index"] == "Flat")

    written = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert [r["id"] for r in written["rows"]] == [r["id"] for r in rows]
    assert written["machine"]["cpus"] >= 1
    assert (tmp_path / "results" / "summary-tiny.json").exists()
    # P1 and P2 searched the same IVF collection, created with the encoder's fingerprint.
    assert summary["details"]["P1"]["index_spec"].startswith("IVF")
