"""Metadata limits, sparse filter columns, out-of-range timestamps and snapshot
leftovers: in-process engines and a real index process (real FAISS)."""

from __future__ import annotations

import datetime as dt

import grpc
import numpy as np
import pytest
from google.protobuf import timestamp_pb2

from clipsearch.errors import InvalidArgument
from clipsearch.index.v1 import index_service_pb2 as pb
from clipsearch.metadata import MetadataLimits
from clipsearch.status import error_from_rpc
from index_service import engine as engine_module
from tests.index.helpers import DIM, search_request, unit_rows, upsert_request

LIMITS = MetadataLimits(max_keys_per_item=4, max_key_bytes=8, max_value_bytes=16, max_item_bytes=40,
                        max_collection_keys=6)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.parametrize("record, field", [
    ({"a": 1, "b": 2, "c": 3, "d": 4, "e": 5}, "metadata[0]"),  # 5 keys per item
    ({"k" * 9: 1}, "metadata[0]"),  # key of 9 bytes
    ({"a": "x" * 17}, "metadata[0].a"),  # value of 17 bytes
    ({"a": "x" * 16, "b": "y" * 16}, "metadata[0]"),  # 2 + 32 bytes... plus numbers below
])
def test_each_limit_over_is_invalid_argument_naming_the_field(open_engine, record, field):
    engine = open_engine(metadata_limits=LIMITS)
    engine.create_collection("c", dim=DIM)
    if field == "metadata[0]" and len(record) == 2:
        record = {**record, "n": 1.0}  # 2 + 32 + 1 + 8 = 43 bytes > 40
    with pytest.raises(InvalidArgument) as err:
        engine.upsert("c", ["x"], unit_rows(1), [record])
    assert err.value.field == field and "limit" in err.value.message
    assert engine.get_collection("c").vector_count == 0


def test_each_limit_at_is_accepted(open_engine):
    engine = open_engine(metadata_limits=LIMITS)
    engine.create_collection("c", dim=DIM)
    at_bytes = {"k" * 8: "x" * 16, "b": "y" * 6, "c": 1.0}  # key and value at their limits; 40 bytes
    at_keys = {"a": 1.0, "b": "z", "c": 2.0, "d": dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)}  # 4 keys
    engine.upsert("c", ["x", "y"], unit_rows(2), [at_bytes, at_keys])
    engine.upsert("c", ["z"], unit_rows(1, seed=1), [{"f": 2.0}])  # the collection's 6th key: at the limit
    with pytest.raises(InvalidArgument) as err:
        engine.upsert("c", ["w"], unit_rows(1, seed=2), [{"g": 1.0}])  # a 7th distinct key
    assert err.value.field == "metadata[0]" and err.value.reason == "METADATA_TOO_MANY_COLLECTION_KEYS"
    hits = engine.search("c", unit_rows(1), k=5, filter={"f": {"gte": 2.0}})
    assert [h.id for h in hits[0]] == ["z"]


def test_filter_memory_grows_with_items_that_carry_a_key_not_keys_times_capacity(open_engine):
    engine = open_engine(metadata_limits=MetadataLimits(max_keys_per_item=30_000, max_item_bytes=10**6,
                                                        max_collection_keys=30_000))
    engine.create_collection("c", dim=DIM)
    n = 20_000
    engine.upsert("c", [f"i{i}" for i in range(n)], unit_rows(n), [{"group": f"g{i % 7}"} for i in range(n)])
    before = engine.get_collection("c").memory_bytes
    engine.upsert("c", ["wide"], unit_rows(1, seed=3), [{f"key{j}": float(j) for j in range(20_000)}])
    added = engine.get_collection("c").memory_bytes - before
    # Dense columns sized to capacity (32,768 slots x 8 bytes x 20,000 keys) took 5 GB here; sparse ones
    # take a few hundred bytes per key.
    assert added < 20_000 * 400, added
    hits = engine.search("c", unit_rows(1), k=3, filter={"key123": 123.0})
    assert [h.id for h in hits[0]] == ["wide"]
    assert len(engine.search("c", unit_rows(1), k=50, filter={"group": "g3"})[0]) == 50


def test_list_pages_end_early_at_the_metadata_budget(open_engine, monkeypatch):
    monkeypatch.setattr(engine_module, "MAX_PAGE_METADATA_BYTES", 3000)
    engine = open_engine()
    engine.create_collection("c", dim=DIM)
    ids = [f"id{i:03d}" for i in range(30)]
    engine.upsert("c", ids, unit_rows(30), [{"text": "x" * 1000} for _ in ids])
    seen, token = [], ""
    while True:
        page, token = engine.list_vectors("c", page_size=100, page_token=token, include_metadata=True)
        assert 1 <= len(page) <= 4
        seen += [r.id for r in page]
        if not token:
            break
    assert seen == ids


def test_startup_removes_leftovers_of_interrupted_snapshots(open_engine, tmp_path):
    data = tmp_path / "snap"
    engine = open_engine(data)
    engine.create_collection("c", dim=DIM)
    engine.upsert("c", ["a", "b"], unit_rows(2), [{"n": 1.0}, {"n": 2.0}])
    engine.snapshot("c")
    live = set(engine.snapshot_files("c"))
    folder = next(iter(live)).parent
    leftovers = [folder / "shard-0-7-deadbeef.faiss.tmp", folder / "shard-0-6-cafebabe.faiss",
                 folder / "manifest.json.tmp"]
    engine.close()
    for path in leftovers:
        path.write_bytes(b"x" * 1000)
    reopened = open_engine(data)
    assert {p.name for p in folder.iterdir()} == {p.name for p in live} | {"manifest.json"}
    assert reopened.get_collection("c").vector_count == 2
    # A snapshot written later also keeps one copy: the new one.
    (folder / "shard-0-9-0badf00d.faiss.tmp").write_bytes(b"x")
    reopened.upsert("c", ["c"], unit_rows(1, seed=4))
    reopened.snapshot("c")
    assert len([p for p in folder.iterdir() if p.suffix == ".faiss"]) == 1
    assert not list(folder.glob("*.tmp"))


def timestamp_search(seconds: int, nanos: int) -> pb.SearchVectorsRequest:
    """A search of collection "c" filtered on t >= a raw Timestamp (the SDK cannot build out-of-range ones)."""
    request = search_request("c", unit_rows(1), k=1)
    request.filter.conditions.add(key="t").range.gte.timestamp_value.CopyFrom(
        timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos))
    return request


def test_index_process_refuses_a_20000_key_item_and_stays_flat(start_index):
    """Through a real index process: limits answer INVALID_ARGUMENT naming the field, the
    refused item leaves memory flat, and out-of-range timestamps are INVALID_ARGUMENT."""
    client = start_index()
    stub = client.stub
    stub.CreateCollection(pb.CreateCollectionRequest(name="c", dim=DIM))
    stub.UpsertVectors(upsert_request("c", ["a"], unit_rows(1), [{"t": dt.datetime(2020, 1, 1)}]))
    pid = int(client.process.proc.pid)
    before_rss = rss_bytes(pid)
    before = stub.GetCollection(pb.GetCollectionRequest(name="c")).collection.memory_bytes
    wide = {f"key{j}": float(j) for j in range(20_000)}
    for _ in range(3):
        with pytest.raises(grpc.RpcError) as err:
            stub.UpsertVectors(upsert_request("c", ["wide"], unit_rows(1, seed=1), [wide]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_from_rpc(err.value).field == "metadata[0]"
        assert "20000 keys; the limit is 64" in err.value.details()
    assert stub.GetCollection(pb.GetCollectionRequest(name="c")).collection.memory_bytes == before
    assert rss_bytes(pid) - before_rss < 64 * 1024 * 1024  # main added 164 MB for one such item

    for seconds, nanos in ((253_402_300_800, 0), (0, 1_000_000_000), (-62_135_596_801, 0)):
        with pytest.raises(grpc.RpcError) as err:
            stub.SearchVectors(timestamp_search(seconds, nanos))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert "out of range" in err.value.details() and "ValueError" not in err.value.details()
        assert error_from_rpc(err.value).field == "filter.conditions[0].range.gte"
    at_limit = stub.SearchVectors(timestamp_search(0, 999_999_999))
    assert [h.id for h in at_limit.results[0].hits] == ["a"]
    assert np.isfinite(at_limit.results[0].hits[0].score)
