"""efSearch calibrated per HNSW collection whose spec sets none: chosen in the background
once the collection holds 10k vectors, served as the default, kept across restarts; a spec's
efSearch is never recalibrated; the sweep's top when the target is out of reach."""

from __future__ import annotations

import json
from contextlib import nullcontext

import faiss
import numpy as np
from prometheus_client import REGISTRY

from index_service.calibration import CALIBRATE_FROM_VECTORS, EF_SEARCH_SWEEP, calibrate_ef_search
from index_service.collection import MANIFEST
from index_service.shards import HNSW_DEFAULT_EF, IndexSpec
from index_service.synthetic import GaussianMixture

DIM = 64


def recall_at_10(hits, base: np.ndarray, queries: np.ndarray) -> float:
    exact = np.argsort(-(queries @ base.T), axis=1)[:, :10]
    return float(np.mean([len({hit.id for hit in row} & {f"v{i}" for i in want}) / 10
                          for row, want in zip(hits, exact)]))


def test_default_spec_calibrates_ef_search_and_keeps_it_across_restarts(open_engine, tmp_path):
    mixture = GaussianMixture(DIM, clusters=110, spread=1.5, seed=3)
    base = mixture.sample(12_000, seed=4)
    data_dir = tmp_path / "data"
    engine = open_engine(data_dir)
    engine.create_collection("auto", DIM, num_shards=2)
    engine.create_collection("fixed", DIM, index_spec="HNSW32,efSearch=48")
    for name in ("auto", "fixed"):
        assert engine.get_collection(name).hnsw_ef_search == (HNSW_DEFAULT_EF if name == "auto" else 48)
        for start in range(0, len(base), 2000):  # crosses 10k, and writes go on
            engine.upsert(name, [f"v{i}" for i in range(start, start + 2000)], base[start:start + 2000])
    engine.wait_for_builds()

    info = engine.get_collection("auto")
    calibrated, auto_uid = info.hnsw_ef_search, info.uid
    assert calibrated in EF_SEARCH_SWEEP
    assert REGISTRY.get_sample_value("clipsearch_index_hnsw_ef_search", {"collection": "auto"}) == calibrated
    queries = mixture.sample_queries(200, seed=5)  # held out: not in the collection
    assert recall_at_10(engine.search("auto", queries, k=10), base, queries) >= 0.95
    # A spec's efSearch stays, even when asked to calibrate.
    assert engine.calibrate_ef_search("fixed").hnsw_ef_search == 48
    assert REGISTRY.get_sample_value("clipsearch_index_hnsw_ef_search", {"collection": "fixed"}) == 48
    engine.close()

    manifest = json.loads((data_dir / "snapshots" / auto_uid / MANIFEST).read_text())
    assert manifest["hnsw_ef_search"] == calibrated and manifest["ef_search_calibrated_at"] >= CALIBRATE_FROM_VECTORS
    again = open_engine(data_dir)
    assert again.get_collection("auto").hnsw_ef_search == calibrated
    assert again.get_collection("fixed").hnsw_ef_search == 48
    again.wait_for_builds()  # 12k has not doubled since the calibration: nothing to redo
    assert again.get_collection("auto").hnsw_ef_search == calibrated


def test_calibration_stops_at_the_first_ef_reaching_the_target_else_at_the_top_of_the_sweep():
    mixture = GaussianMixture(DIM, clusters=40, spread=1.5, seed=6)
    base = mixture.sample(3000, seed=7)
    spec = IndexSpec.parse("HNSW16", DIM, "l2")
    shard = spec.new_shard()
    shard.add(np.arange(len(base), dtype=np.int64), base)
    faiss.omp_set_num_threads(1)

    easy = calibrate_ef_search([shard.index], spec.faiss_metric, nullcontext, sweep=(16, 64), target=0.9)
    assert easy.ef_search in (16, 64) and easy.recall >= 0.9 and easy.vectors == 3000
    assert list(easy.sweep) == ([16] if easy.ef_search == 16 else [16, 64])
    out_of_reach = calibrate_ef_search([shard.index], spec.faiss_metric, nullcontext, sweep=(16, 32), target=1.01)
    assert out_of_reach.ef_search == 32 and set(out_of_reach.sweep) == {16, 32}
