"""Fan-out over index shards, against in-process fake shards."""

from __future__ import annotations

import asyncio
from collections import Counter

import numpy as np
import pytest

from clipsearch.common.v1 import common_pb2
from clipsearch.errors import Unavailable
from clipsearch.index.v1 import index_service_pb2 as ipb
from gateway.deadline import Deadline
from gateway.search import Candidate
from gateway.settings import GatewaySettings
from gateway.shards import ShardSet, jump_hash, merge_top_k, shard_for_id
from tests.gateway.fake_index import start_fake_shard

PINNED = [1, 0, 2, 1, 1, 0, 1, 0, 0, 0, 1, 2]


def test_shard_choice_is_stable_and_balanced():
    # Pinned: changing the hash would strand stored images on the wrong shard.
    assert [shard_for_id(f"id-{i}", 3) for i in range(12)] == PINNED
    counts = Counter(shard_for_id(f"img-{i}", 4) for i in range(4000))
    assert set(counts) == {0, 1, 2, 3} and min(counts.values()) > 850
    # Growing from 4 to 5 shards moves only about a fifth of the ids.
    moved = sum(shard_for_id(f"img-{i}", 4) != shard_for_id(f"img-{i}", 5) for i in range(4000))
    assert 600 < moved < 1000


def test_jump_hash_only_moves_keys_to_the_new_bucket():
    for key in range(0, 2**40, 2**40 // 500):
        for n in range(1, 12):
            before, after = jump_hash(key, n), jump_hash(key, n + 1)
            assert 0 <= before < n and after in (before, n)


def test_merge_top_k():
    a = [Candidate("a1", 0.9), Candidate("a2", 0.3)]
    b = [Candidate("b1", 0.8), Candidate("b2", 0.7)]
    assert [c.id for c in merge_top_k([a, b], 3)] == ["a1", "b1", "b2"]


@pytest.fixture
def fake_cluster():
    """Runs a coroutine with two fake shards and a ShardSet over them."""

    def run(scenario, policy="fail"):
        async def main():
            started = [await start_fake_shard() for _ in range(2)]
            settings = GatewaySettings(index=[addr for _, _, addr in started], index_timeout_seconds=5,
                                       shard_failure_policy=policy)
            shards = ShardSet(settings)
            try:
                await scenario(shards, started)
            finally:
                await shards.close()
                for server, _, _ in started:
                    await server.stop(None)

        asyncio.run(main())

    return run


def _vectors(n, dim=8, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


async def _fill(shards, n=40):
    d = Deadline.after(5)
    await shards.create_collection("c", 8, "Flat", 1, "fp", d)
    ids = [f"{i:03d}" for i in range(n)]
    vectors = _vectors(n)
    meta = [{"parity": "even" if i % 2 == 0 else "odd"} for i in range(n)]
    errors = await shards.upsert("c", ids, vectors, meta, "fp", d)
    assert errors == [None] * n
    return ids, vectors


def test_writes_route_by_hash_and_search_merges(fake_cluster):
    async def scenario(shards, started):
        ids, vectors = await _fill(shards)
        for index, (_, fake, _) in enumerate(started):
            held = set(fake.records["c"])
            assert held == {i for i in ids if shard_for_id(i, 2) == index}
            assert 0 < len(held) < len(ids)
        query = _vectors(1, seed=5)
        hits, missing = await shards.search("c", query, 7, deadline=Deadline.after(5))
        expected = [ids[i] for i in np.argsort(-(vectors @ query[0]), kind="stable")[:7]]
        assert [h.id for h in hits[0]] == expected and missing == []
        collection = await shards.get_collection("c", Deadline.after(5))
        assert collection.vector_count == len(ids) and collection.dim == 8
        fetched = await shards.fetch("c", ids[:5] + ["nope"], Deadline.after(5), include_vectors=True)
        assert set(fetched) == set(ids[:5])

        seen, after = [], ""
        while True:
            records, more = await shards.list("c", after, 6, Deadline.after(5))
            seen.extend(r.id for r in records)
            if not more:
                break
            after = records[-1].id
        assert seen == sorted(ids)

    fake_cluster(scenario)


@pytest.mark.parametrize("policy", ["fail", "partial"])
def test_a_dead_shard_follows_the_policy(fake_cluster, policy):
    async def scenario(shards, started):
        ids, vectors = await _fill(shards)
        server, fake, address = started[1]
        await server.stop(None)
        query = _vectors(1, seed=5)
        if policy == "fail":
            with pytest.raises(Unavailable) as err:
                await shards.search("c", query, 5, deadline=Deadline.after(5), policy=policy)
            assert "shard-1" in err.value.message and address not in err.value.message
        else:
            hits, missing = await shards.search("c", query, 5, deadline=Deadline.after(5), policy=policy)
            assert missing == ["shard-1"]  # a stable name; the address stays in the log
            assert hits[0] and all(shard_for_id(h.id, 2) == 0 for h in hits[0])

    fake_cluster(scenario, policy)
