"""The index engine in-process, with real FAISS: upserts, deletes, filters,
recall, background training, snapshot + replay."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from clipsearch.errors import FailedPrecondition, InvalidArgument
from index_service import shards as shards_module
from index_service.synthetic import clustered_vectors
from tests.index.helpers import unit_rows

DIM = 16
# Every index family, trained where it needs training.
SPECS = ["Flat", "IVF32,Flat", "IVF32,PQ8", "HNSW16", "SQ8"]


def fill(engine, name: str, spec: str, vectors: np.ndarray, metadata=None, shards: int = 2, metric: str = "ip"):
    engine.create_collection(name, vectors.shape[1], metric, spec, num_shards=shards)
    ids = [f"id{i}" for i in range(len(vectors))]
    for start in range(0, len(ids), 1000):
        engine.upsert(name, ids[start:start + 1000], vectors[start:start + 1000],
                      metadata[start:start + 1000] if metadata else None)
    engine.train(name)
    engine.wait_for_builds()
    return ids


def result_ids(hits) -> list[list[str]]:
    return [[hit.id for hit in row] for row in hits]


@pytest.mark.parametrize("spec", SPECS)
def test_upsert_overwrites_and_deleted_ids_never_come_back(open_engine, tmp_path, spec):
    engine = open_engine(tmp_path / "d", snapshot_on_close=False)
    old = unit_rows(1500, DIM, seed=1)
    ids = fill(engine, "c", spec, old)
    assert engine.get_collection("c").trained
    deleted, overwritten = ids[:200], ids[200:400]
    new = unit_rows(200, DIM, seed=2)
    assert engine.delete("c", deleted + ["never-existed"]).count == 200
    assert engine.upsert("c", overwritten, new).count == 200

    def check(engine):
        info = engine.get_collection("c")
        assert info.vector_count == 1300
        everything = engine.search("c", old[:40], k=1300)
        for row in result_ids(everything):
            assert not set(row) & set(deleted)
            assert len(row) == len(set(row)), "an id came back twice (old and new version)"
        if spec != "HNSW16":  # graph search need not return all 1300
            assert all(len(row) == 1300 for row in result_ids(everything))
        records, missing = engine.fetch("c", overwritten + deleted[:5], include_vectors=True)
        assert missing == deleted[:5]
        np.testing.assert_array_equal(np.stack([r.vector for r in records]), new)
        top = engine.search("c", new, k=5)
        assert np.mean([overwritten[i] == row[0] for i, row in enumerate(result_ids(top))]) >= 0.9
        assert all(overwritten[i] in row for i, row in enumerate(result_ids(top)))
        return result_ids(engine.search("c", unit_rows(20, DIM, seed=3), k=10))

    before = check(engine)
    engine.close()  # no snapshot on close: the next open loads the post-training snapshot and replays
    reopened = open_engine(tmp_path / "d")
    assert check(reopened) == before
    reopened.snapshot()
    reopened.close()
    assert check(open_engine(tmp_path / "d")) == before


def test_hnsw_compaction_drops_tombstones(open_engine):
    engine = open_engine()
    vectors = unit_rows(3000, DIM, seed=4)
    ids = fill(engine, "h", "HNSW16", vectors)
    engine.delete("h", ids[:2500])  # 2500 tombstones > max(1000, 500 live): a background rebuild
    engine.wait_for_builds()
    collection = engine._collections["h"]
    assert collection.tombstones == 0
    assert sum(shard.ntotal for shard in collection.shards) == 500
    hits = result_ids(engine.search("h", vectors[:50], k=20))
    assert all(not set(row) & set(ids[:2500]) and len(row) == 20 for row in hits)


# -- filters -----------------------------------------------------------------------


def metadata_rows(n: int, seed: int = 5):
    rng = np.random.default_rng(seed)
    colors = rng.choice(["red", "green", "blue", "black", "white"], n)
    sizes = rng.integers(0, 100, n)
    days = rng.integers(0, 365, n)
    rare = rng.random(n) < 0.01
    has_price = rng.random(n) < 0.7
    prices = np.round(rng.uniform(0, 50, n), 2)
    start = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    rows = []
    for i in range(n):
        row = {"color": str(colors[i]), "size": int(sizes[i]), "taken": start + dt.timedelta(days=int(days[i]))}
        if rare[i]:
            row["tag"] = "rare"
        if has_price[i]:
            row["price"] = float(prices[i])
        rows.append(row)
    columns = {"color": colors, "size": sizes, "day": days, "rare": rare, "has_price": has_price, "price": prices}
    return rows, columns, start


def random_filters(columns, start, rng, count: int):
    """(filter dict, numpy mask) pairs, from broad to 1%-selective."""
    def day(d):
        return start + dt.timedelta(days=int(d))

    out = [
        ({"tag": "rare"}, columns["rare"]),  # ~1%
        ({"size": 42}, columns["size"] == 42),  # ~1%
        ({"color": "red", "size": {"lt": 5}}, (columns["color"] == "red") & (columns["size"] < 5)),  # ~1%
    ]
    for _ in range(count):
        kind = rng.integers(5)
        color = str(rng.choice(["red", "green", "blue", "black", "white"]))
        low, high = sorted(rng.integers(0, 100, 2))
        d1, d2 = sorted(rng.integers(0, 365, 2))
        if kind == 0:
            out.append(({"color": color}, columns["color"] == color))
        elif kind == 1:
            chosen = [color, "black"]
            out.append(({"color": chosen}, np.isin(columns["color"], chosen)))
        elif kind == 2:
            in_range = (columns["size"] >= low) & (columns["size"] < high)
            out.append(({"size": {"gte": int(low), "lt": int(high)}}, in_range))
        elif kind == 3:
            out.append((
                {"taken": {"gt": day(d1), "lte": day(d2)}, "color": [color]},
                (columns["day"] > d1) & (columns["day"] <= d2) & (columns["color"] == color),
            ))
        else:
            out.append((
                {"price": {"lte": float(high) / 2}},
                columns["has_price"] & (columns["price"] <= high / 2),
            ))
    return out


def brute_force(vectors, queries, mask, k, metric):
    if metric == "ip":
        scores = queries @ vectors.T
    else:
        scores = -((queries[:, None, :] - vectors[None, :, :]) ** 2).sum(-1)
    scores[:, ~mask] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[f"id{j}" for j in row if mask[j]] for row in order]


FILTER_CASES = [
    # (spec, metric, auto_train, exact filter path for HNSW)
    pytest.param("Flat", "ip", True, True, id="flat-ip"),
    pytest.param("Flat", "l2", True, True, id="flat-l2"),
    pytest.param("IVF64,Flat", "ip", False, True, id="ivf-untrained-exact"),
    pytest.param("IVF64,Flat", "ip", True, True, id="ivf-trained"),
    pytest.param("HNSW16", "l2", True, True, id="hnsw-exact-subset"),
    pytest.param("HNSW16", "ip", True, False, id="hnsw-selector"),
]


@pytest.mark.parametrize("spec,metric,auto_train,hnsw_exact", FILTER_CASES)
def test_filtered_search_matches_brute_force(open_engine, monkeypatch, spec, metric, auto_train, hnsw_exact):
    if not hnsw_exact:
        monkeypatch.setattr(shards_module, "HNSW_EXACT_FILTER_MAX", 0)
    n, k = 5000, 10
    vectors, queries = clustered_vectors(n, DIM, queries=20, clusters=40, seed=7)
    rows, columns, start = metadata_rows(n)
    engine = open_engine(auto_train=auto_train)
    engine.create_collection("f", DIM, metric, spec, num_shards=2)
    engine.upsert("f", [f"id{i}" for i in range(n)], vectors, rows)
    engine.wait_for_builds()
    exact = spec == "Flat" or not auto_train or (spec.startswith("HNSW") and hnsw_exact)
    assert engine.get_collection("f").trained == (auto_train or spec == "Flat" or spec.startswith("HNSW"))
    recalls = []
    for filter_spec, mask in random_filters(columns, start, np.random.default_rng(11), count=25):
        expected = brute_force(vectors, queries, mask, k, metric)
        hits = engine.search("f", queries, k=k, filter=filter_spec, include_metadata=True)
        for row, want in zip(hits, expected):
            assert len(row) == min(k, int(mask.sum())), filter_spec
            assert all(mask[int(hit.id[2:])] for hit in row), filter_spec
            assert all(hit.metadata == rows[int(hit.id[2:])] for hit in row)
            if exact:
                assert [hit.id for hit in row] == want, filter_spec
            recalls.append(len({hit.id for hit in row} & set(want)) / max(1, len(want)))
    assert np.mean(recalls) >= 0.95


def test_filter_validation(open_engine):
    engine = open_engine()
    engine.create_collection("v", 4)
    engine.upsert("v", ["a"], unit_rows(1, 4), [{"color": "red", "n": 1, "t": dt.datetime(2024, 1, 1)}])
    query = unit_rows(1, 4)
    for bad, field in [
        ({"nope": "x"}, "filter.conditions[0].key"),
        ({"n": "1"}, "filter.conditions[0].equals"),
        ({"color": {"gte": "a"}}, "filter.conditions[0].range"),
        ({"t": {"gte": 3}}, "filter.conditions[0].range.gte"),
        ({"color": []}, "filter.conditions[0].in_set"),
        ({"n": {"between": 1}}, "filter.conditions[0].range"),
    ]:
        with pytest.raises(InvalidArgument) as error:
            engine.search("v", query, k=1, filter=bad)
        assert error.value.field == field, bad
    with pytest.raises(InvalidArgument, match="holds string values"):
        engine.upsert("v", ["b"], unit_rows(1, 4), [{"color": 3}])
    assert engine.get_collection("v").vector_count == 1


# -- recall and training ---------------------------------------------------------------


@pytest.mark.slow
def test_ivf_recall_at_default_nprobe(open_engine):
    """Clustered, overlapping data: nprobe=1 misses many neighbours, the default does not."""
    n, dim = 20_000, 64
    vectors, queries = clustered_vectors(n, dim, queries=200, clusters=100, spread=1.5, seed=0)
    exact = brute_force_ids(vectors, queries, 10)
    engine = open_engine()
    for spec in ("IVF256,Flat", "IVF1024,Flat"):
        name = spec.replace(",", "-")
        engine.create_collection(name, dim, "ip", spec, num_shards=2)
        for start in range(0, n, 5000):  # IVF256 trains itself at 39 * 256 vectors
            engine.upsert(name, [f"id{i}" for i in range(start, start + 5000)], vectors[start:start + 5000])
        engine.train(name)  # IVF1024 is below its auto-train size; waits for IVF256's background build
        assert engine.get_collection(name).trained
        default = recall(engine.search(name, queries, k=10), exact)
        probe_one = recall(engine.search(name, queries, k=10, nprobe=1), exact)
        assert default >= 0.95, (spec, default)
        assert probe_one < 0.9, (spec, probe_one)


def brute_force_ids(vectors, queries, k):
    order = np.argsort(-(queries @ vectors.T), axis=1)[:, :k]
    return [{f"id{j}" for j in row} for row in order]


def recall(hits, exact) -> float:
    return float(np.mean([len({hit.id for hit in row} & want) / len(want) for row, want in zip(hits, exact)]))


def test_background_training_keeps_writes_made_meanwhile(open_engine):
    dim = 32
    vectors = unit_rows(7000, dim, seed=8)
    engine = open_engine()
    engine.create_collection("t", dim, "ip", "IVF128,Flat", num_shards=2)
    ids = [f"id{i}" for i in range(len(vectors))]
    engine.upsert("t", ids[:5000], vectors[:5000])  # >= 39 * 128: training starts in the background
    assert not engine.get_collection("t").trained
    engine.upsert("t", ids[5000:], vectors[5000:])
    engine.delete("t", ids[:1000])
    replaced = unit_rows(500, dim, seed=9)
    engine.upsert("t", ids[1000:1500], replaced)
    engine.wait_for_builds()
    info = engine.get_collection("t")
    assert info.trained and info.vector_count == 6000
    everything = engine.search("t", vectors[:3], k=6000, nprobe=128)
    assert all(set(hit.id for hit in row) == set(ids[1000:]) for row in everything)
    top = engine.search("t", replaced, k=1)
    assert [row[0].id for row in top] == ids[1000:1500]


def test_train_needs_enough_vectors(open_engine):
    engine = open_engine()
    engine.create_collection("small", 8, "ip", "IVF64,Flat")
    engine.upsert("small", [f"{i}" for i in range(10)], unit_rows(10, 8))
    with pytest.raises(FailedPrecondition, match="at least 64"):
        engine.train("small")
    assert not engine.get_collection("small").trained
    assert len(engine.search("small", unit_rows(1, 8), k=10)[0]) == 10  # exact while untrained


# -- paging and metadata ---------------------------------------------------------------


def test_list_vectors_and_collections_pages(open_engine):
    engine = open_engine()
    for name in ("b", "a", "c"):
        engine.create_collection(name, 4)
    ids = [f"k{i:03d}" for i in range(250)]
    engine.upsert("a", ids, unit_rows(250, 4), [{"i": i} for i in range(250)])
    seen, token = [], ""
    while True:
        page, token = engine.list_vectors("a", page_size=100, page_token=token, include_metadata=True)
        seen.extend(page)
        if not token:
            break
    assert [r.id for r in seen] == sorted(ids)
    assert [r.metadata["i"] for r in seen] == list(range(250))
    assert engine.list_vectors("a", page_token="k248")[0][0].id == "k249"
    assert len(engine.list_vectors("a", page_size=5000)[0]) == 250  # capped at 1000
    first, token = engine.list_collections(page_size=2)
    rest, end = engine.list_collections(page_size=2, page_token=token)
    assert [c.name for c in first + rest] == ["a", "b", "c"] and end == ""


def test_metadata_round_trip(open_engine):
    engine = open_engine()
    engine.create_collection("m", 4)
    when = dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=dt.timezone.utc)
    engine.upsert("m", ["x", "y"], unit_rows(2, 4), [{"s": "text", "n": 2.5, "t": when}, None])
    records, missing = engine.fetch("m", ["y", "x", "z"])
    assert [r.id for r in records] == ["y", "x"] and missing == ["z"]
    assert records[0].metadata == {} and records[1].metadata == {"s": "text", "n": 2.5, "t": when}
    assert engine.search("m", unit_rows(1, 4), k=2, filter={"t": when})[0][0].id == "x"
