"""Where the index service's memory and disk go: the memory gauges through a real
server, IVF lists made exact after builds and before snapshots, and a store whose
pages and WAL do not double the bytes of each vector."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import urllib.request

import faiss
import numpy as np

from clipsearch.index.v1 import index_service_pb2 as pb
from index_service import store as store_module
from index_service.ids import PackedIds
from index_service.memory import compact_inverted_lists, process_rss_bytes, store_cache_bytes
from index_service.servicer import IndexServicer
from index_service.store import CollectionRecord, Store, StoredRow
from tests.index.helpers import search_request, unit_rows, upsert_request

DIM = 64


def scrape(index) -> dict[tuple[str, str], float]:
    """{(metric name, labels): value} of the memory gauges on the service's metrics port."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{index.process.metrics_port}/metrics", timeout=10).read().decode()
    return {
        (match["name"], match["labels"]): float(match["value"])
        for match in re.finditer(
            r"^(?P<name>clipsearch_index_(?:process_)?memory_bytes)\{(?P<labels>[^}]*)\} (?P<value>\S+)$", text, re.M)
    }


def test_memory_gauges_break_the_process_down_by_collection_and_part(start_index):
    index = start_index()
    n = 3000
    vectors = unit_rows(n, DIM, seed=1)
    index.stub.CreateCollection(pb.CreateCollectionRequest(name="m", dim=DIM, index_spec="Flat"))
    index.stub.CreateCollection(pb.CreateCollectionRequest(name="gone", dim=DIM, index_spec="Flat"))
    for start in range(0, n, 1000):
        index.stub.UpsertVectors(upsert_request(
            "m", [f"image-{i:06d}" for i in range(start, start + 1000)], vectors[start:start + 1000],
            [{"group": f"g{i % 5}", "rank": i} for i in range(start, start + 1000)]))
    index.stub.SearchVectors(search_request("m", vectors[:2], k=3, include_metadata=True))
    index.stub.DeleteCollection(pb.DeleteCollectionRequest(name="gone"))

    gauges = scrape(index)
    part = {name: gauges[("clipsearch_index_memory_bytes", f'collection="m",part="{name}"')]
            for name in ("faiss", "id_maps", "filter_columns")}
    raw = n * DIM * 4
    assert raw <= part["faiss"] <= 1.5 * raw  # float32 codes, ids and the id map's hash table
    assert n * 12 <= part["id_maps"] <= n * 40  # "image-000123" packed, an offset and an alive bit each
    assert n * 8 <= part["filter_columns"] <= n * 200  # two columns of one value per vector
    rss = gauges[("clipsearch_index_process_memory_bytes", 'part="rss"')]
    assert rss > sum(part.values()) + 10 * 2**20  # Python, gRPC and FAISS themselves
    assert 0 < gauges[("clipsearch_index_process_memory_bytes", 'part="store_cache"')] < rss
    assert not [key for key in gauges if 'collection="gone"' in key[1]]


def test_compacting_ivf_lists_frees_their_growth_slack_and_keeps_every_answer():
    vectors = unit_rows(40_000, DIM, seed=2)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(DIM), DIM, 64, faiss.METRIC_INNER_PRODUCT)
    index.train(vectors[:5000])
    index.set_direct_map_type(faiss.DirectMap.Hashtable)
    for start in range(0, len(vectors), 500):  # many small adds, as upserts make them
        index.add_with_ids(vectors[start:start + 500], np.arange(start, start + 500, dtype=np.int64))
    params = faiss.SearchParametersIVF(nprobe=8)
    before = index.search(vectors[:20], 10, params=params)

    assert compact_inverted_lists(index)
    after = index.search(vectors[:20], 10, params=params)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_array_equal(index.reconstruct(12345), vectors[12345])  # the direct map still points right
    index.remove_ids(faiss.IDSelectorArray(2, faiss.swig_ptr(np.array([7, 8], dtype=np.int64))))
    assert index.ntotal == len(vectors) - 2
    assert not compact_inverted_lists(faiss.IndexFlatIP(DIM))  # nothing to do for other indexes


def test_snapshots_compact_changed_ivf_shards_and_builds_leave_them_exact(open_engine):
    engine = open_engine()
    vectors = unit_rows(6000, DIM, seed=3)
    engine.create_collection("ivf", DIM, "ip", "IVF16,Flat", num_shards=2)
    engine.upsert("ivf", [f"a{i}" for i in range(2000)], vectors[:2000])
    engine.train("ivf")
    collection = engine._collections["ivf"]
    assert collection.compacted_sizes == [shard.ntotal for shard in collection.shards]  # the build made them exact
    engine.upsert("ivf", [f"a{i}" for i in range(2000, 6000)], vectors[2000:])
    expected = engine.search("ivf", vectors[:10], k=5, nprobe=4)

    engine.snapshot("ivf")
    assert collection.compacted_sizes == [3000, 3000]
    found = engine.search("ivf", vectors[:10], k=5, nprobe=4)
    assert [[hit.id for hit in row] for row in found] == [[hit.id for hit in row] for row in expected]
    assert process_rss_bytes() > 0 and store_cache_bytes() > 0


def test_vectors_replayed_onto_exact_shards_are_compacted_by_the_next_snapshot(open_engine, tmp_path):
    data_dir = tmp_path / "replay"
    vectors = unit_rows(4000, DIM, seed=4)
    engine = open_engine(data_dir, snapshot_on_close=False)
    engine.create_collection("ivf", DIM, "ip", "IVF16,Flat")
    engine.upsert("ivf", [f"a{i}" for i in range(3000)], vectors[:3000])
    engine.train("ivf")
    engine.snapshot("ivf")
    engine.upsert("ivf", [f"a{i}" for i in range(3000, 4000)], vectors[3000:])  # after the snapshot
    engine.close()

    reopened = open_engine(data_dir)  # the snapshot's 3000, then 1000 replayed from the store
    collection = reopened._collections["ivf"]
    assert [shard.ntotal for shard in collection.shards] == [4000]
    assert collection.compacted_sizes == [3000]  # the replayed adds grew lists past their exact size
    expected = reopened.search("ivf", vectors[:10], k=5, nprobe=4)
    reopened.snapshot("ivf")
    assert collection.compacted_sizes == [4000]
    found = reopened.search("ivf", vectors[:10], k=5, nprobe=4)
    assert [[hit.id for hit in row] for row in found] == [[hit.id for hit in row] for row in expected]


def test_new_stores_pack_vectors_into_large_pages_and_cut_the_wal_back(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "WAL_SIZE_LIMIT", 256 * 1024)
    path = tmp_path / "store.sqlite"
    store = Store(path)
    assert store._conn().execute("PRAGMA page_size").fetchone()[0] == store_module.PAGE_SIZE
    rows = [StoredRow(i, f"id{i}", unit_rows(1, 512, seed=i).tobytes(), None) for i in range(2000)]
    uid = store.create_collection(CollectionRecord("c", 512, "ip", "Flat", 1, "")).uid
    store.upsert(uid, rows, [], {}, 2000)  # one 4 MB transaction: the WAL grows to hold it
    store._conn().execute("PRAGMA wal_checkpoint(PASSIVE)")
    store.upsert(uid, [StoredRow(2000, "last", unit_rows(1, 512).tobytes(), None)], [], {}, 2001)
    assert (tmp_path / "store.sqlite-wal").stat().st_size <= 256 * 1024
    store.close()
    database_bytes = path.stat().st_size
    assert database_bytes < 2001 * 2700  # 2 KiB of vector per row, not a 4 KiB overflow page each
    with sqlite3.connect(path) as check:
        assert check.execute("SELECT COUNT(*) FROM vectors").fetchone()[0] == 2001


def test_concurrent_searches_go_to_worker_threads_and_a_lone_one_runs_inline(open_engine):
    engine = open_engine()
    engine.create_collection("c", DIM, "ip", "Flat")
    vectors = unit_rows(200, DIM, seed=4)
    engine.upsert("c", [str(i) for i in range(200)], vectors)
    servicer = IndexServicer(engine, inline_search_max_ms=5.0)
    waits = []
    search = engine.search

    def recording_search(*args, wait=True):
        waits.append(wait)
        return search(*args, wait=wait)

    engine.search = recording_search
    request = search_request("c", vectors[:1], k=3)

    async def run():
        await servicer.SearchVectors(request, None)
        waits.append("|")
        await asyncio.gather(*(servicer.SearchVectors(request, None) for _ in range(3)))

    asyncio.run(run())
    assert waits == [False, "|", True, True, True]
    assert servicer._searches_in_flight == 0


def test_packed_ids_name_every_internal_id_with_gaps_for_retired_ones():
    ids = PackedIds()
    ids.fill(iter([(0, "a"), (3, "dé"), (4, "e")]), size=7)  # 1, 2, 5 and 6 were retired
    assert [ids[i] for i in range(len(ids))] == ["a", "", "", "dé", "e", "", ""]
    ids.extend([f"id{i}" for i in range(3000)])  # grows past the first 1024 offsets
    assert (len(ids), ids[7], ids[3006]) == (3007, "id0", "id2999")
    assert ids.nbytes <= 3007 * 8 + 3 + 3000 * 6
