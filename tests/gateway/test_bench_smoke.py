"""The gateway benchmark runs end to end in its quick mode."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_gateway_bench_quick(tmp_path):
    from bench.gateway_bench import main

    assert main(["--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gateway_bench_quick.json").read_text())
    assert result["search"]["p50_ratio_gateway_vs_direct"] > 0
    assert result["upload"]["gateway_images_per_s"] > 0
