"""Cheap searches run on the event loop (no worker-thread hand-off): the engine's
non-blocking search, its cost estimate, and the servicer's choice of path."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from clipsearch.errors import NotFound
from clipsearch.index.v1 import index_service_pb2 as pb
from clipsearch.vectors import pack_matrix
from index_service.engine import WouldBlock
from index_service.servicer import IndexServicer
from tests.index.helpers import unit_rows

DIM = 16


def fill(engine, name: str, spec: str, n: int, shards: int = 2) -> np.ndarray:
    vectors = unit_rows(n, DIM, seed=3)
    engine.create_collection(name, DIM, "ip", spec, num_shards=shards)
    engine.upsert(name, [f"id{i}" for i in range(n)], vectors, [{"i": i} for i in range(n)])
    engine.train(name)
    return vectors


def ids(hits):
    return [[(hit.id, round(hit.score, 5)) for hit in row] for row in hits]


@pytest.mark.parametrize("spec", ["Flat", "IVF16,Flat", "HNSW16"])
def test_search_without_waiting_matches_the_threaded_search(open_engine, spec):
    engine = open_engine()
    vectors = fill(engine, "c", spec, 2000, shards=3)
    queries = vectors[:5] + 0.01
    expected = engine.search("c", queries, k=7, nprobe=4)
    assert ids(engine.search("c", queries, k=7, nprobe=4, wait=False)) == ids(expected)


def test_search_without_waiting_raises_would_block_while_a_write_is_applied(open_engine):
    engine = open_engine()
    vectors = fill(engine, "c", "Flat", 100)
    collection = engine._collections["c"]
    with collection.rw.write():
        with pytest.raises(WouldBlock):
            engine.search("c", vectors[:1], k=3, wait=False)
    assert len(engine.search("c", vectors[:1], k=3, wait=False)[0]) == 3


def test_search_cost_estimate_orders_indexes_and_nprobe(open_engine):
    engine = open_engine()
    fill(engine, "flat", "Flat", 4000, shards=1)
    fill(engine, "ivf", "IVF32,Flat", 4000, shards=1)
    flat = engine.estimated_search_seconds("flat", 1)
    assert flat == pytest.approx(4000 * DIM / 5e9)
    assert engine.estimated_search_seconds("flat", 10) == pytest.approx(10 * flat)
    few, many = (engine.estimated_search_seconds("ivf", 1, nprobe=p) for p in (2, 32))
    assert few < many < 2 * flat
    with pytest.raises(NotFound):
        engine.estimated_search_seconds("nope", 1)


def test_servicer_searches_inline_only_when_cheap_unfiltered_and_alone(open_engine):
    engine = open_engine()
    vectors = fill(engine, "c", "Flat", 500)
    servicer = IndexServicer(engine, inline_search_max_ms=5.0)

    def request(**fields):
        return pb.SearchVectorsRequest(collection="c", queries=pack_matrix(vectors[:1]), k=5, **fields)

    assert servicer.search_inline(request(), 1)
    assert not servicer.search_inline(request(include_metadata=True), 1)
    assert not servicer.search_inline(request(include_vectors=True), 1)
    filtered = request()
    filtered.filter.conditions.add(key="i").equals.number_value = 1
    assert not servicer.search_inline(filtered, 1)
    assert not servicer.search_inline(pb.SearchVectorsRequest(collection="nope", k=5), 1)
    assert not servicer.search_inline(request(), 10_000)  # too expensive
    assert not IndexServicer(engine, inline_search_max_ms=0).search_inline(request(), 1)
    servicer._searches_in_flight = 2  # another search is being handled
    assert not servicer.search_inline(request(), 1)


def test_servicer_falls_back_to_a_thread_when_a_write_is_being_applied(open_engine):
    engine = open_engine()
    vectors = fill(engine, "c", "Flat", 300)
    servicer = IndexServicer(engine, inline_search_max_ms=5.0)
    request = pb.SearchVectorsRequest(collection="c", queries=pack_matrix(vectors[:2]), k=4)
    inline = asyncio.run(servicer.SearchVectors(request, None))

    collection = engine._collections["c"]
    holding, release = threading.Event(), threading.Event()

    def writer():
        with collection.rw.write():
            holding.set()
            release.wait(5)

    thread = threading.Thread(target=writer)
    thread.start()
    holding.wait(5)
    threading.Timer(0.2, release.set).start()
    started = time.perf_counter()
    waited = asyncio.run(servicer.SearchVectors(request, None))
    thread.join()
    assert time.perf_counter() - started >= 0.15  # it waited for the write, on a worker thread
    assert waited == inline
    assert [hit.id for hit in waited.results[0].hits][0] == "id0"
    assert servicer._searches_in_flight == 0
