"""The benchmark code runs at tiny sizes and reports every figure with its
baseline and ratio. Correctness only: timings are never asserted."""

from __future__ import annotations

import json
import math

from bench import encoder_bench, gpu


def finite_positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_encoder_bench_reports_p3_p4_with_ratios(tmp_path):
    results = encoder_bench.main(["--model", "clipsearch-tiny", "--quick", "--out", str(tmp_path)])
    assert finite_positive(results["P4"]["ratio"])
    for key in ("text_query", "images"):
        assert finite_positive(results["runtimes"][key]["ratio"]), key
    for key in ("texts_ratio", "images_ratio", "texts_per_s", "images_baseline_per_s"):
        assert finite_positive(results["P3"][key]), key
    for rounds in (results["P3"]["texts_rounds"], results["P3"]["images_rounds"], results["P4"]["rounds"]):
        assert rounds["rounds"] >= 3 and rounds["ratio_min"] <= rounds["ratio"] <= rounds["ratio_max"], rounds
    written = json.loads((tmp_path / "encoder-quick.json").read_text())
    assert written["P4"]["trimmed"]["n"] == 10 and written["machine"]["cpus"] >= 1
    assert written["machine"]["cpu_flags"] and written["machine"]["faiss_simd"]


def test_gpu_bench_runs_on_cpu_at_tiny_sizes(tmp_path):
    results = gpu.main(["--tiny", "--out", str(tmp_path)])
    assert results["device"] == "cpu"
    for key in ("P5_640x480", "P5_1600x1200"):
        assert finite_positive(results[key]["ratio"]), key
    assert finite_positive(results["P6"]["through_service"]["p50_ms"])
    graphs = results["P6_graphs"]
    assert graphs["in_process"]["captured"] is False  # the bucketed path ran, without capture, on the CPU
    for key in ("through_service_graphs", "through_service_eager"):
        assert finite_positive(graphs[key]["p50_ms"]), key
    assert finite_positive(results["text_throughput"]["raw_trimmed_per_s"])
    assert (tmp_path / "gpu-tiny.json").exists()
