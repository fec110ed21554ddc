"""Crash safety: kill -9 the service at random moments while a client streams
writes; after a restart every acknowledged write is there, exactly."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from clipsearch.index.v1 import index_service_pb2 as pb
from clipsearch.vectors import pack_matrix, unpack_vector
from tests.index.helpers import upsert_request

DIM = 32


class Writer(threading.Thread):
    """Streams upserts of fresh ids and deletes of acknowledged ones until the server dies."""

    def __init__(self, stub, prefix: str, acked: dict, deleted: set, seed: int):
        super().__init__(daemon=True)
        self.stub, self.prefix, self.acked, self.deleted = stub, prefix, acked, deleted
        self.rng = np.random.default_rng(seed)
        self.uncertain: set[str] = set()  # sent, never answered: either outcome is fine
        self.batches = 0

    def run(self):
        while True:
            n = int(self.rng.integers(1, 120))
            ids = [f"{self.prefix}-{self.batches}-{i}" for i in range(n)]
            vectors = self.rng.standard_normal((n, DIM)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            self.uncertain.update(ids)
            try:
                self.stub.UpsertVectors(upsert_request("crash", ids, vectors), timeout=30)
            except grpc.RpcError:
                return
            self.uncertain.difference_update(ids)
            self.acked.update(zip(ids, vectors))
            self.batches += 1
            if self.batches % 4 == 0:
                victims = list(self.rng.choice(sorted(self.acked), size=min(20, len(self.acked)), replace=False))
                for victim in victims:
                    del self.acked[victim]
                self.uncertain.update(victims)
                try:
                    self.stub.DeleteVectors(pb.DeleteVectorsRequest(collection="crash", ids=victims), timeout=30)
                except grpc.RpcError:
                    return
                self.uncertain.difference_update(victims)
                self.deleted.update(victims)


@pytest.mark.slow
def test_acknowledged_writes_survive_kill_9(start_index, tmp_path):
    data_dir = tmp_path / "data"
    # Frequent snapshots and an IVF index that trains itself mid-stream, so kills land
    # during store commits, snapshot writes and background training alike.
    flags = ("--snapshot-interval-seconds", "0.3")
    index = start_index(data_dir, *flags)
    index.stub.CreateCollection(pb.CreateCollectionRequest(name="crash", dim=DIM, index_spec="IVF16,Flat",
                                                           num_shards=2))
    acked: dict[str, np.ndarray] = {}
    deleted: set[str] = set()
    rng = np.random.default_rng(1234)
    for kill_point in range(5):
        writer = Writer(index.stub, f"k{kill_point}", acked, deleted, seed=kill_point)
        writer.start()
        time.sleep(float(rng.uniform(0.3, 1.5)))
        index.process.kill()
        writer.join(timeout=60)
        assert writer.batches > 0, "no write was acknowledged before the kill"
        for maybe in writer.uncertain:
            acked.pop(maybe, None)
            deleted.discard(maybe)

        index = start_index(data_dir, *flags)
        ids = sorted(acked)
        found: dict[str, np.ndarray] = {}
        for start in range(0, len(ids), 2000):
            reply = index.stub.FetchVectors(pb.FetchVectorsRequest(collection="crash", ids=ids[start:start + 2000],
                                                                   include_vectors=True))
            found.update((r.id, unpack_vector(r.vector, DIM)) for r in reply.records)
        assert set(found) == set(acked), f"kill {kill_point}: {len(set(acked) - set(found))} acknowledged ids lost"
        assert all(np.array_equal(found[i], acked[i]) for i in ids)
        gone = index.stub.FetchVectors(pb.FetchVectorsRequest(collection="crash", ids=sorted(deleted)))
        assert not gone.records, f"kill {kill_point}: deleted ids came back"
        # The index agrees with the store: each acknowledged vector finds itself.
        sample = ids[:: max(1, len(ids) // 50)]
        queries = np.stack([acked[i] for i in sample])
        hits = index.stub.SearchVectors(pb.SearchVectorsRequest(
            collection="crash", queries=pack_matrix(queries), k=1,
            params={"nprobe": 16})).results
        assert [r.hits[0].id for r in hits] == sample
