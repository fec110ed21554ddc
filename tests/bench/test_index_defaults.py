"""bench.index_defaults runs end to end at a tiny size (timings are never checked)."""

from __future__ import annotations

from bench import index_defaults
from index_service.shards import HNSW_DEFAULT_EF


def test_recall_sweep_reports_the_default_efsearch(tmp_path):
    results = index_defaults.main(["--n", "1000", "--dim", "32", "--queries", "20", "--specs", "HNSW16",
                                   "--threads", "1", "--out", str(tmp_path)])
    rows = [row for row in results["rows"] if "ef_search" in row]
    assert HNSW_DEFAULT_EF in {row["ef_search"] for row in rows}
    assert all(0 <= value <= 1 for row in rows for value in row["recall"].values())
    assert (tmp_path / "index_defaults.json").exists()
