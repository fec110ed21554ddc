"""efSearch calibrated per HNSW collection: the smallest efSearch of a sweep whose
recall@10 on a sample of the collection's own vectors reaches a target.

Each sample vector (as stored, so SQ/PQ codes are decoded) is a query; its own
id is dropped from both the exact answer and the graph's, so it measures a
neighbour search like a held-out query's, not finding itself. The exact answer
is a brute-force top-(k+1) over every vector in the shards (tombstones
included: the graph holds them too, and efSearch is about the graph).

The shards keep changing while this runs: every read of a FAISS index happens
under ``read_guard`` (the collection's read lock), one chunk or one search batch
at a time, so a write waits for at most one of those, never for the whole run.
Vectors added meanwhile get ids above those seen at the start, and a selector
keeps them out of the graph's answers.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import AbstractContextManager
from typing import Callable, Sequence

import faiss
import numpy as np

# Calibration runs once a collection holds this many vectors (below it the static default
# finds ~all of the true top 10), and again each time its count has doubled since.
CALIBRATE_FROM_VECTORS = 10_000
EF_SEARCH_SWEEP = (64, 96, 128, 160, 192, 256, 384, 512, 768, 1024)
# recall@10 the chosen efSearch must reach on the sample: 0.95 plus a margin, as queries
# that are not the collection's own vectors find fewer (the graph links each stored vector
# to its neighbours): on 100k x 512 from 1024 clusters, 0.962 on the sample at efSearch 256
# went with 0.951 on held-out queries and 0.948 on another set; and the sample's own
# error (200 queries, ~0.006).
RECALL_TARGET = 0.97
SAMPLE_QUERIES = 200
K = 10
# Reads per hold of ``read_guard``, so a write waits at most a few tens of milliseconds:
_CHUNK = 16384  # vectors copied out for the exact search (32 MiB at 512-d)
_QUERY_BATCH = 25  # queries searched in the graph


@dataclasses.dataclass(frozen=True)
class Calibration:
    ef_search: int
    recall: float  # recall@10 on the sample at ef_search
    vectors: int  # vectors in the shards when it ran
    queries: int  # sample size
    seconds: float
    sweep: dict[int, float]  # recall by efSearch, up to the chosen one


def calibrate_ef_search(
    shard_indexes: Sequence[faiss.Index],
    metric: int,
    read_guard: Callable[[], AbstractContextManager],
    seed: int = 0,
    sweep: Sequence[int] = EF_SEARCH_SWEEP,
    target: float = RECALL_TARGET,
    sample_size: int = SAMPLE_QUERIES,
    k: int = K,
) -> Calibration:
    """The smallest efSearch of ``sweep`` reaching ``target`` (else the last of it) for the
    HNSW indexes ``shard_indexes`` (``IndexIDMap2`` over ``IndexHNSW``), searched together."""
    started = time.perf_counter()
    with read_guard():
        sizes = [index.ntotal for index in shard_indexes]
        ids_by_shard = [faiss.vector_to_array(index.id_map)[:size].copy()
                        for index, size in zip(shard_indexes, sizes)]
    total = sum(sizes)
    first_unseen_id = max((int(ids.max()) + 1 for ids in ids_by_shard if len(ids)), default=0)
    # The sample: positions over the shards laid end to end.
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(total, min(sample_size, total), replace=False))
    shard_starts = np.cumsum([0, *sizes])
    query_ids = np.empty(len(picked), dtype=np.int64)
    queries = np.empty((len(picked), shard_indexes[0].d), dtype=np.float32)
    for shard_no, index in enumerate(shard_indexes):
        in_shard = (picked >= shard_starts[shard_no]) & (picked < shard_starts[shard_no + 1])
        positions = picked[in_shard] - shard_starts[shard_no]
        query_ids[in_shard] = ids_by_shard[shard_no][positions]
        with read_guard():
            queries[in_shard] = faiss.downcast_index(index.index).reconstruct_batch(positions)

    truth = _exact_neighbours(shard_indexes, ids_by_shard, queries, query_ids, metric, read_guard, k)
    results: dict[int, float] = {}
    chosen = sweep[-1]
    for ef in sweep:
        found = _graph_neighbours(shard_indexes, queries, query_ids, first_unseen_id, metric, read_guard, ef, k)
        results[ef] = float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth)]))
        if results[ef] >= target:
            chosen = ef
            break
    return Calibration(chosen, results[chosen], total, len(queries), time.perf_counter() - started, results)


def _exact_neighbours(shard_indexes, ids_by_shard, queries, query_ids, metric, read_guard, k) -> list[list[int]]:
    """The true top-k ids of each query among every vector, its own id left out."""
    heap = faiss.ResultHeap(len(queries), k + 1, keep_max=metric == faiss.METRIC_INNER_PRODUCT)
    for index, ids in zip(shard_indexes, ids_by_shard):
        storage = faiss.downcast_index(index.index)
        for start in range(0, len(ids), _CHUNK):
            count = min(_CHUNK, len(ids) - start)
            with read_guard():
                vectors = storage.reconstruct_n(start, count)
            distances, positions = faiss.knn(queries, vectors, min(k + 1, count), metric=metric)
            heap.add_result(distances, ids[start:start + count][positions])
    heap.finalize()
    return _without_own_id(heap.I, query_ids, k)


def _graph_neighbours(shard_indexes, queries, query_ids, first_unseen_id, metric, read_guard, ef, k):
    """The HNSW top-k ids of each query at ``ef``, over every shard, its own id left out."""
    heap = faiss.ResultHeap(len(queries), k + 1, keep_max=metric == faiss.METRIC_INNER_PRODUCT)
    seen = faiss.IDSelectorRange(0, first_unseen_id)  # not what was added after the exact search read
    params = faiss.SearchParametersHNSW(sel=seen, efSearch=max(ef, k + 1))
    distances = np.empty((len(queries), k + 1), dtype=np.float32)
    labels = np.empty((len(queries), k + 1), dtype=np.int64)
    for index in shard_indexes:
        for start in range(0, len(queries), _QUERY_BATCH):
            batch = slice(start, start + _QUERY_BATCH)
            with read_guard():
                distances[batch], labels[batch] = index.search(queries[batch], k + 1, params=params)
        heap.add_result(distances, labels)
    heap.finalize()
    return _without_own_id(heap.I, query_ids, k)


def _without_own_id(labels: np.ndarray, query_ids: np.ndarray, k: int) -> list[list[int]]:
    return [[label for label in row if label != own and label >= 0][:k] for row, own in zip(labels.tolist(),
                                                                                          query_ids.tolist())]
