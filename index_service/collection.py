"""One collection in memory: id maps, metadata columns, the FAISS shards, and
snapshot files. The engine (engine.py) validates requests, writes the store
and then applies each write here, in sequence order.

Locking:
- ``write_lock`` serializes everything that changes the collection (store
  write + apply, snapshot, the swap at the end of a background build). While
  it is held the FAISS indexes cannot change, so a snapshot only needs it.
- ``rw`` lets many searches run at once and excludes them only while a write
  is applied to the in-memory state (not during the store commit).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from concurrent.futures import Executor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import faiss
import numpy as np

from index_service.calibration import CALIBRATE_FROM_VECTORS
from index_service.filters import Condition, MetadataColumns
from index_service.ids import PackedIds
from index_service.memory import compact_inverted_lists, release_freed_heap
from index_service.shards import IndexSpec, Shard, ShardSelection, bitmap_selector
from index_service.store import Changes, CollectionRecord

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
# FAISS threads per search call. Measured on this 2-core machine with faiss
# 1.15.1 on 1M x 512 IndexFlatIP: one query takes ~105 ms on 1 OpenMP thread
# and ~190 ms on 2; batches of 32 and 256 queries were also slower on 2
# threads (2.5 s vs 3.8 s, 2.4 s vs 6.2 s). So each search call runs FAISS on
# one thread, and the cores are used by searching in-process shards (and
# concurrent requests) in parallel threads instead. Training and bulk builds
# run in the background with every core.
SEARCH_THREADS = 1
# What a collection's memory is made of (``Collection.memory_part``; clipsearch_index_memory_bytes).
MEMORY_PARTS = ("faiss", "id_maps", "filter_columns")


class WouldBlock(Exception):
    """A call made with ``wait=False`` would have had to wait for a lock."""


class ReadWriteLock:
    """Many readers or one writer; a waiting writer holds back new readers."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self, wait: bool = True) -> Iterator[None]:
        """Holds the lock for reading; with ``wait=False`` raises ``WouldBlock`` instead of
        waiting for a writer."""
        with self._cond:
            while self._writer or self._writers_waiting:
                if not wait:
                    raise WouldBlock("a write is being applied")
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class Collection:
    def __init__(self, record: CollectionRecord, spec: IndexSpec, kinds: Mapping[str, str], snapshot_dir: Path):
        self.record = record
        self.spec = spec
        self.snapshot_dir = snapshot_dir
        self.columns = MetadataColumns(kinds)
        self.internal_to_id = PackedIds()  # string id -> internal id is the store's (Store.internal_ids)
        self.live_count = 0
        self.alive = np.zeros(0, dtype=bool)
        self.shard_counts = [0] * record.num_shards
        self.shards: list[Shard] = [spec.new_shard() for _ in range(record.num_shards)]
        self.compacted_sizes = [0] * record.num_shards  # ntotal of each shard when its lists were made exact
        self.trained = not spec.needs_training
        self.applied_sequence = record.last_sequence
        self.snapshot_sequence = -1
        self.snapshot_time: float | None = None
        self.loaded_time = time.time()
        self.deleted = False
        self.write_lock = threading.Lock()
        self.rw = ReadWriteLock()
        # Held by a running build (training or HNSW compaction); builds_done counts finished ones.
        self.build_lock = threading.Lock()
        self.builds_done = 0
        # HNSW: efSearch of a search that asks for none. Calibrated (engine._calibrate_ef_search)
        # when the spec sets none; ef_search_calibrated_at is the vector count it was measured at
        # (0: never). Searches read it without a lock: a calibration swaps in a new int.
        self.hnsw_ef_search = spec.ef_search
        self.ef_search_calibrated_at = 0

    # -- properties ---------------------------------------------------------

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def uid(self) -> int:
        return self.record.uid

    @property
    def dim(self) -> int:
        return self.record.dim

    @property
    def num_shards(self) -> int:
        return self.record.num_shards

    @property
    def next_internal_id(self) -> int:
        return len(self.internal_to_id)

    @property
    def count(self) -> int:
        return self.live_count

    @property
    def tombstones(self) -> int:
        """Retired vectors still inside the indexes (HNSW only)."""
        return sum(shard.ntotal for shard in self.shards) - self.count

    @property
    def wants_ef_search_calibration(self) -> bool:
        """At 10k vectors, and each time the count has doubled since the last calibration, which
        a rebuilt graph forgets (HNSW,PQ/SQ: once trained; until then the shards are exact)."""
        return (self.spec.calibrates_ef_search and self.trained and self.count >= CALIBRATE_FROM_VECTORS
                and self.count >= 2 * self.ef_search_calibrated_at)

    def snapshot_age(self) -> float:
        return -1.0 if self.snapshot_time is None else time.time() - self.snapshot_time

    def memory_bytes(self) -> int:
        """The FAISS indexes plus the metadata columns that filters read."""
        return self.memory_part("faiss") + self.memory_part("filter_columns")

    def memory_part(self, part: str) -> int:
        """Bytes of one of ``MEMORY_PARTS``: ``faiss`` (every shard's index), ``id_maps`` (the
        packed string ids and the alive bitmap), ``filter_columns`` (the metadata filters read)."""
        with self.rw.read():
            if part == "faiss":
                return sum(shard.memory_bytes() for shard in self.shards)
            if part == "id_maps":
                return self.internal_to_id.nbytes + self.alive.nbytes
            if part == "filter_columns":
                return self.columns.memory_bytes()
        raise ValueError(f"unknown memory part {part!r}; one of {MEMORY_PARTS}")

    # -- applying writes (caller holds write_lock) --------------------------

    def load_records(self, records: Iterator[tuple[int, str, str | None]]) -> None:
        """Fills id maps and metadata columns from the store's live rows."""
        size = self.record.next_internal_id
        self._ensure_capacity(size)

        def named() -> Iterator[tuple[int, str]]:
            for internal_id, record_id, metadata_json in records:
                self.alive[internal_id] = True
                self.columns.set_records([internal_id], [self.columns.decode(metadata_json)])
                self.shard_counts[internal_id % self.num_shards] += 1
                self.live_count += 1
                yield internal_id, record_id

        self.internal_to_id = PackedIds()
        self.internal_to_id.fill(named(), size)

    def apply_upsert(
        self,
        ids: Sequence[str],
        internal_ids: np.ndarray,
        vectors: np.ndarray,
        records: Sequence[Mapping[str, Any] | None],
        retired_ids: np.ndarray,
        new_kinds: Mapping[str, str],
        sequence: int,
    ) -> None:
        with self.rw.write():
            self._retire(retired_ids)
            self.columns.add_kinds(new_kinds)
            self._ensure_capacity(int(internal_ids[-1]) + 1)
            self.internal_to_id.extend(ids)
            self.live_count += len(ids) - len(retired_ids)
            self.alive[internal_ids] = True
            self.columns.set_records(internal_ids, records)
            for shard_no, (part_ids, part_vectors) in self._by_shard(internal_ids, vectors):
                self.shards[shard_no].add(part_ids, part_vectors)
                self.shard_counts[shard_no] += len(part_ids)
            self.applied_sequence = sequence

    def apply_delete(self, ids: Sequence[str], retired_ids: np.ndarray, sequence: int) -> None:
        with self.rw.write():
            self.live_count -= len(ids)
            self._retire(retired_ids)
            self.applied_sequence = sequence

    def _retire(self, retired_ids: np.ndarray) -> None:
        self.alive[retired_ids] = False
        for shard_no, (part_ids, _) in self._by_shard(retired_ids):
            self.shards[shard_no].remove(part_ids)
            self.shard_counts[shard_no] -= len(part_ids)

    def _ensure_capacity(self, size: int) -> None:
        if size > len(self.alive):
            grown = np.zeros(max(size, 2 * len(self.alive), 1024), dtype=bool)
            grown[: len(self.alive)] = self.alive
            self.alive = grown

    def _by_shard(
        self, internal_ids: np.ndarray, vectors: np.ndarray | None = None
    ) -> Iterator[tuple[int, tuple[np.ndarray, np.ndarray | None]]]:
        """(shard number, (ids, vectors)) for every shard that gets some of ``internal_ids``."""
        internal_ids = np.asarray(internal_ids, dtype=np.int64)
        if self.num_shards == 1:
            if len(internal_ids):
                yield 0, (internal_ids, vectors)
            return
        shard_of = internal_ids % self.num_shards
        for shard_no in range(self.num_shards):
            part = shard_of == shard_no
            if part.any():
                yield shard_no, (internal_ids[part], None if vectors is None else vectors[part])

    # -- building shards ----------------------------------------------------

    def build_shards(self, internal_ids: np.ndarray, vectors: np.ndarray, template: faiss.Index | None) -> list[Shard]:
        """New shards holding ``vectors``: clones of a trained ``template``, or fresh ones."""
        shards = [
            self.spec.shard_from_template(template) if template is not None else self.spec.new_shard()
            for _ in range(self.num_shards)
        ]
        for shard_no, (part_ids, part_vectors) in self._by_shard(internal_ids, vectors):
            shards[shard_no].add(part_ids, part_vectors)
        return shards

    def replay(self, shards: list[Shard], changes: Changes) -> None:
        """Brings shards built at some sequence up to date with the writes after it."""
        for shard_no, (part_ids, _) in self._by_shard(changes.retired_ids):
            shards[shard_no].remove(part_ids)
        for shard_no, (part_ids, part_vectors) in self._by_shard(changes.added_ids, changes.added_vectors):
            shards[shard_no].add(part_ids, part_vectors)

    def swap_shards(self, shards: list[Shard], exact_sizes: list[int] | None = None) -> None:
        """Serves ``shards`` from now on. ``exact_sizes``: per shard, the vector count at which
        its lists were exact (built and compacted, or read from a snapshot), before any replay
        added to them; a snapshot compacts the shards that have grown since."""
        with self.rw.write():
            self.shards = shards
            self.trained = all(shard.trained for shard in shards)
            self.compacted_sizes = list(exact_sizes) if exact_sizes is not None else [0] * len(shards)

    def compact_changed_shards(self) -> int:
        """Makes the lists of IVF shards changed since their last compaction exact (searches
        go on during the copy); returns how many. A list that got even one vector has doubled
        its buffer. Caller holds ``write_lock``."""
        compacted = 0
        for shard_no, shard in enumerate(self.shards):
            if shard.ntotal != self.compacted_sizes[shard_no]:
                if compact_inverted_lists(shard.index, swap_guard=self.rw.write()):
                    compacted += 1
                self.compacted_sizes[shard_no] = shard.ntotal
        return compacted

    # -- search -------------------------------------------------------------

    def search(
        self,
        queries: np.ndarray,
        k: int,
        conditions: Sequence[Condition],
        nprobe: int,
        ef_search: int,
        pool: Executor | None,
        wait: bool = True,
    ) -> list[list[tuple[str, int, float]]]:
        """Top-k per query as lists of (id, internal id, score), best first. Shards are
        searched in parallel on ``pool`` (one after the other in this thread when None).
        ``wait=False`` raises ``WouldBlock`` rather than wait for a write being applied."""
        with self.rw.read(wait):
            selections, bitmap = self._selections(conditions)

            def search_shard(shard_no: int) -> tuple[np.ndarray, np.ndarray]:
                faiss.omp_set_num_threads(SEARCH_THREADS)  # per thread: OpenMP settings are thread-local
                shard = self.shards[shard_no]
                return shard.search(queries, k, selections[shard_no], nprobe, ef_search or self.hnsw_ef_search)

            if self.num_shards == 1 or pool is None:
                results = [search_shard(shard_no) for shard_no in range(self.num_shards)]
            else:
                results = list(pool.map(search_shard, range(self.num_shards)))
            del bitmap  # the selector used it until here
            scores, labels = self._merge(results, k)
            hits = [
                [(self.internal_to_id[label], label, score)
                 for label, score in zip(row_labels, row_scores) if label >= 0]
                for row_labels, row_scores in zip(labels.tolist(), scores.tolist())
            ]
        return hits

    def estimated_search_seconds(self, n_queries: int, k: int, nprobe: int, ef_search: int) -> float:
        """Rough single-thread time of an unfiltered search over every shard (see ``Shard``)."""
        ef_search = ef_search or self.hnsw_ef_search
        return sum(shard.estimated_search_seconds(n_queries, k, nprobe, ef_search) for shard in self.shards)

    def _selections(self, conditions: Sequence[Condition]) -> tuple[list[ShardSelection | None], np.ndarray | None]:
        """Per shard, the ids a search may return (None: everything in its index), and the
        bitmap their selectors read, which must outlive the search. Caller holds ``rw``."""
        size = self.next_internal_id
        if conditions:
            mask = self.columns.evaluate(conditions, size) & self.alive[:size]
        elif self.tombstones:
            mask = self.alive[:size]
        else:
            return [None] * self.num_shards, None
        selector, bitmap = bitmap_selector(mask)
        matched = np.flatnonzero(mask)
        if self.num_shards == 1:
            return [ShardSelection(selector, matched)], bitmap
        shard_of = matched % self.num_shards
        return [ShardSelection(selector, matched[shard_of == s]) for s in range(self.num_shards)], bitmap

    def _merge(self, results: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores (higher is better; -squared distance for L2) and labels of the best k over shards."""
        if len(results) == 1:  # FAISS already sorted them
            scores, labels = results[0]
            scores = -scores if self.spec.metric == "l2" else scores.astype(np.float32, copy=False)
            scores[labels < 0] = -np.inf
            return scores, labels
        scores = np.concatenate([distances for distances, _ in results], axis=1).astype(np.float32)
        labels = np.concatenate([labels for _, labels in results], axis=1)
        if self.spec.metric == "l2":
            scores = -scores
        scores[labels < 0] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, axis=1), np.take_along_axis(labels, order, axis=1)

    # -- snapshots (caller holds write_lock) --------------------------------

    def remove_snapshot_leftovers(self) -> int:
        """Deletes what interrupted snapshots left (``.tmp`` files, shard files the manifest
        does not name); returns the bytes freed. With no readable manifest every file goes."""
        if not self.snapshot_dir.is_dir():
            return 0
        try:
            keep = set(json.loads((self.snapshot_dir / MANIFEST).read_text())["shards"]) | {MANIFEST}
        except (OSError, ValueError, KeyError, TypeError):
            keep = set()
        freed = 0
        for path in self.snapshot_dir.iterdir():
            if path.name not in keep and path.is_file():
                freed += path.stat().st_size
                path.unlink(missing_ok=True)
        if freed:
            log.info("collection %s: removed %d bytes of interrupted snapshots", self.name, freed)
        return freed

    def write_snapshot(self) -> list[Path]:
        """Writes every shard and then the manifest (the commit point); returns the files.

        On disk there is at most the last snapshot plus the one being written: leftovers
        of an earlier failed attempt are removed first, and a failure removes its own files."""
        self.snapshot_dir.mkdir(parents=True, exist_ok=True)
        self.remove_snapshot_leftovers()
        if self.compact_changed_shards():
            release_freed_heap()
        token = uuid.uuid4().hex[:8]
        names = []
        try:
            for shard_no, shard in enumerate(self.shards):
                name = f"shard-{shard_no}-{self.applied_sequence}-{token}.faiss"
                tmp = self.snapshot_dir / (name + ".tmp")
                faiss.write_index(shard.index, str(tmp))
                _fsync(tmp)
                os.replace(tmp, self.snapshot_dir / name)
                names.append(name)
        except BaseException:
            for path in self.snapshot_dir.glob(f"*-{token}.faiss*"):
                path.unlink(missing_ok=True)
            raise
        manifest = {
            "sequence": self.applied_sequence,
            "trained": [shard.trained for shard in self.shards],
            "index_spec": self.spec.spec,
            "num_shards": self.num_shards,
            "dim": self.dim,
            "shards": names,
            "created_at": time.time(),
            **self._calibration_fields(),
        }
        self._write_manifest(manifest)
        for path in self.snapshot_dir.iterdir():
            if path.name not in names and path.name != MANIFEST:
                path.unlink(missing_ok=True)
        self.snapshot_sequence = manifest["sequence"]
        self.snapshot_time = manifest["created_at"]
        return [self.snapshot_dir / name for name in names] + [self.snapshot_dir / MANIFEST]

    def _calibration_fields(self) -> dict[str, int]:
        if not self.ef_search_calibrated_at:
            return {}
        return {"hnsw_ef_search": self.hnsw_ef_search, "ef_search_calibrated_at": self.ef_search_calibrated_at}

    def _write_manifest(self, manifest: dict) -> None:
        tmp = self.snapshot_dir / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest))
        _fsync(tmp)
        os.replace(tmp, self.snapshot_dir / MANIFEST)
        _fsync(self.snapshot_dir)

    def save_ef_search_calibration(self) -> bool:
        """Writes the calibrated efSearch into the manifest of the snapshot on disk (the next
        snapshot writes it anyway); False when there is no snapshot. Caller holds ``write_lock``."""
        path = self.snapshot_dir / MANIFEST
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError):
            return False
        self._write_manifest({**manifest, **self._calibration_fields()})
        return True

    def read_snapshot(self, store_sequence: int) -> tuple[int, list[Shard]] | None:
        """(sequence, shards) of the snapshot on disk, or None when there is no usable one."""
        manifest_path = self.snapshot_dir / MANIFEST
        if not manifest_path.exists():
            return None
        try:
            manifest = json.loads(manifest_path.read_text())
            expected = (self.spec.spec, self.num_shards, self.dim)
            if (manifest["index_spec"], manifest["num_shards"], manifest["dim"]) != expected:
                raise ValueError(f"snapshot is of {manifest['index_spec']!r}; the collection has {expected}")
            if manifest["sequence"] > store_sequence:
                raise ValueError(f"snapshot sequence {manifest['sequence']} is ahead of the store ({store_sequence})")
            shards = []
            for name, trained in zip(manifest["shards"], manifest["trained"]):
                index = faiss.read_index(str(self.snapshot_dir / name))
                shards.append(Shard(index, self.spec, trained=trained))
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            log.warning("collection %s: ignoring snapshot in %s: %s", self.name, self.snapshot_dir, exc)
            return None
        self.snapshot_sequence = manifest["sequence"]
        self.snapshot_time = manifest["created_at"]
        if self.spec.calibrates_ef_search and manifest.get("ef_search_calibrated_at"):
            self.hnsw_ef_search = int(manifest["hnsw_ef_search"])
            self.ef_search_calibrated_at = int(manifest["ef_search_calibrated_at"])
        return manifest["sequence"], shards


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
