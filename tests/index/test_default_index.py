"""The default index (a collection created without a spec) and HNSW parameters in
the spec: what an empty spec gives, its recall on held-out and shifted queries,
efConstruction/efSearch parsed, persisted across restarts and rebuilds, and bad
values refused with a message that says what to write."""

from __future__ import annotations

import json
import urllib.request

import faiss
import grpc
import numpy as np
import pytest

from clipsearch.index.v1 import index_service_pb2 as pb
from clipsearch.status import error_from_rpc
from index_service.shards import DEFAULT_INDEX_SPEC, HNSW_DEFAULT_EF, HNSW_DEFAULT_EF_CONSTRUCTION
from index_service.synthetic import GaussianMixture
from tests.index.helpers import search_request, unit_rows, upsert_request


def hnsw_parameters(path) -> tuple[int, int, int]:
    """(vectors, efConstruction, efSearch) of the HNSW index in a shard's snapshot file."""
    wrapper = faiss.read_index(str(path))  # an IndexIDMap2; it owns the HNSW index, so keep it alive
    hnsw = faiss.downcast_index(wrapper.index)
    return hnsw.ntotal, hnsw.hnsw.efConstruction, hnsw.hnsw.efSearch


def snapshot_shards(data_dir, uid: str) -> list:
    folder = data_dir / "snapshots" / uid
    return [folder / name for name in json.loads((folder / "manifest.json").read_text())["shards"]]


def recall_at_10(results, exact: np.ndarray) -> float:
    return float(np.mean([len({hit.id for hit in row.hits} & {f"v{i}" for i in want}) / 10
                          for row, want in zip(results, exact)]))


def exact_top10(base: np.ndarray, queries: np.ndarray) -> np.ndarray:
    return np.argsort(-(queries @ base.T), axis=1)[:, :10]


def fill(stub, name: str, base: np.ndarray, metadata=None, batch: int = 5000) -> None:
    for start in range(0, len(base), batch):
        ids = [f"v{i}" for i in range(start, min(start + batch, len(base)))]
        stub.UpsertVectors(upsert_request(name, ids, base[start:start + batch],
                                          metadata[start:start + batch] if metadata else None))


def test_default_index_has_recall_on_held_out_and_shifted_queries(start_index):
    """20k clustered vectors in a collection created without a spec: recall@10 >= 0.95 on
    queries not used to choose the default, a little less on queries moved off the data
    (as text queries sit apart from image vectors), exact with a filter, ~1 on 1k vectors."""
    stub = start_index().stub
    dim = 64
    mixture = GaussianMixture(dim, clusters=141, spread=2.0, seed=7)
    base = mixture.sample(20_000, seed=8)
    queries = mixture.sample(200, seed=9)
    offset = np.random.default_rng(10).standard_normal(dim).astype(np.float32)
    shifted = queries + 0.5 * offset / np.linalg.norm(offset)
    shifted /= np.linalg.norm(shifted, axis=1, keepdims=True)
    groups = [{"group": f"g{i % 10}"} for i in range(len(base))]

    info = stub.CreateCollection(pb.CreateCollectionRequest(name="d", dim=dim)).collection
    assert info.index_spec == DEFAULT_INDEX_SPEC and info.trained
    fill(stub, "d", base, groups)
    stub.CreateCollection(pb.CreateCollectionRequest(name="small", dim=dim))
    fill(stub, "small", base[:1000])

    held_out = stub.SearchVectors(search_request("d", queries, k=10), timeout=1).results
    assert recall_at_10(held_out, exact_top10(base, queries)) >= 0.95
    off = stub.SearchVectors(search_request("d", shifted, k=10), timeout=1).results
    assert recall_at_10(off, exact_top10(base, shifted)) >= 0.9
    small = stub.SearchVectors(search_request("small", queries, k=10)).results
    assert recall_at_10(small, exact_top10(base[:1000], queries)) >= 0.99

    # A filter matching 2,000 vectors is answered exactly over them.
    in_group = np.flatnonzero(np.arange(len(base)) % 10 == 3)
    filtered = stub.SearchVectors(search_request("d", queries[:50], k=10, filter={"group": "g3"})).results
    assert recall_at_10(filtered, in_group[exact_top10(base[in_group], queries[:50])]) == 1.0


def test_hnsw_parameters_in_the_spec_persist_across_restarts(start_index, tmp_path):
    data_dir = tmp_path / "data"
    index = start_index(data_dir)
    created = index.stub.CreateCollection(pb.CreateCollectionRequest(
        name="tuned", dim=16, index_spec=" HNSW16, efC=24 ,efs=80")).collection
    assert created.index_spec == "HNSW16,efConstruction=24,efSearch=80"
    plain = index.stub.CreateCollection(pb.CreateCollectionRequest(name="plain", dim=16)).collection
    vectors = unit_rows(300, 16)
    for name in ("tuned", "plain"):
        index.stub.UpsertVectors(upsert_request(name, [f"v{i}" for i in range(300)], vectors))
    index.process.terminate()  # snapshots on shutdown

    assert hnsw_parameters(snapshot_shards(data_dir, created.uid)[0]) == (300, 24, 80)
    assert hnsw_parameters(snapshot_shards(data_dir, plain.uid)[0]) == (300, HNSW_DEFAULT_EF_CONSTRUCTION,
                                                                       HNSW_DEFAULT_EF)

    restarted = start_index(data_dir)
    again = restarted.stub
    assert again.GetCollection(pb.GetCollectionRequest(name="tuned")).collection.index_spec == created.index_spec
    hits = again.SearchVectors(search_request("tuned", vectors[:1], k=1)).results[0].hits
    assert hits[0].id == "v0"
    # The efSearch each searches with by default (300 vectors are too few to calibrate "plain").
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{restarted.process.metrics_port}/metrics",
                                     timeout=10).read().decode()
    assert 'clipsearch_index_hnsw_ef_search{collection="tuned"} 80.0' in metrics
    assert f'clipsearch_index_hnsw_ef_search{{collection="plain"}} {float(HNSW_DEFAULT_EF)}' in metrics


def test_hnsw_parameters_survive_compaction(open_engine):
    engine = open_engine()
    engine.create_collection("c", 16, index_spec="HNSW16,efConstruction=24")
    ids = [f"v{i}" for i in range(2000)]
    engine.upsert("c", ids, unit_rows(2000, 16))
    engine.delete("c", ids[:1500])  # 1,500 tombstones > max(1000, 500 live): the graph is rebuilt
    engine.wait_for_builds()
    files = engine.snapshot_files("c")  # a rebuild ends with a snapshot of what it built
    assert files and hnsw_parameters(files[0]) == (500, 24, HNSW_DEFAULT_EF)


BAD_SPECS = [  # (spec, what the message says)
    ("HNSW32,efC=0", "efConstruction must be a whole number from 1 to 4096, got '0'"),
    ("HNSW32,efSearch=lots", "efSearch must be a whole number from 1 to 4096, got 'lots'"),
    ("HNSW32,efC=40,efConstruction=80", "sets efConstruction twice"),
    ("HNSW32,ef=64", "'ef=64' is not a parameter; parameters come last, as name=value: HNSW specs take "
                     "efConstruction=N and efSearch=N"),
    ("HNSW32,efC=40,SQ8", "'SQ8' is not a parameter; parameters come last"),
    ("IVF64,Flat,efSearch=64", "'IVF64,Flat' takes no parameters (efSearch is for HNSW indexes only)"),
]


def test_bad_hnsw_parameters_are_refused_with_what_to_write(start_index):
    stub = start_index().stub
    for spec, message in BAD_SPECS:
        with pytest.raises(grpc.RpcError) as error:
            stub.CreateCollection(pb.CreateCollectionRequest(name="bad", dim=16, index_spec=spec))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, spec
        assert message in error.value.details() and error_from_rpc(error.value).field == "index_spec", spec
    assert not stub.ListCollections(pb.ListCollectionsRequest()).collections


def test_upserts_add_on_the_build_threads_whatever_a_search_set(open_engine):
    """OpenMP's thread count is per thread and every search sets it to 1; an upsert served by
    the same worker thread still adds (HNSW graph inserts) on --build-threads."""
    engine = open_engine(build_threads=2)
    engine.create_collection("c", 16)
    engine.upsert("c", ["a"], unit_rows(1, 16))
    engine.search("c", unit_rows(1, 16), k=1)
    assert faiss.omp_get_max_threads() == 1
    engine.upsert("c", ["b", "c"], unit_rows(2, 16, seed=1))
    assert faiss.omp_get_max_threads() == 2
