"""The index engine: durable, sharded FAISS collections, without gRPC.

Use it in-process (benchmarks, tests) or through ``index_service.servicer``::

    from index_service.engine import IndexEngine

    with IndexEngine("/tmp/idx") as engine:          # opens (loads) on enter, snapshots on exit
        engine.create_collection("images", dim=512, metric="ip", index_spec="IVF1024,Flat", num_shards=2)
        engine.upsert("images", ["a", "b"], vectors, metadata=[{"color": "red"}, {"year": 2020}])
        hits = engine.search("images", queries, k=10, filter={"color": ["red", "blue"]})
        hits[0][0].id, hits[0][0].score

Every method validates its input and raises ``clipsearch.errors`` exceptions
(InvalidArgument, NotFound, AlreadyExists, FailedPrecondition,
ResourceExhausted, Unavailable); a failed call stores nothing. A write returns
after the store committed it (fsync) and the in-memory indexes applied it.

Lifecycle: ``open()`` restores from S3 when configured and the data dir has
no store, loads every collection (snapshot + replay of later store rows, or a
rebuild from the store), and starts the periodic snapshot thread.
Trainable indexes are trained in a background thread once they hold enough
vectors (or by ``train``); until then their search is exact.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping, Sequence

import faiss
import numpy as np

from clipsearch.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from clipsearch.metadata import MetadataLimits, check_metadata_limits
from clipsearch.names import check_collection_name
from clipsearch.paging import clamp_page_size
from index_service.backup import S3Backup
from index_service.calibration import calibrate_ef_search
from index_service.collection import MANIFEST, MEMORY_PARTS, Collection, WouldBlock
from index_service.filters import FilterSpec, parse_filter
from index_service.memory import compact_inverted_lists, process_rss_bytes, release_freed_heap, store_cache_bytes
from index_service.metrics import (
    BUILD_SECONDS,
    HNSW_EF_SEARCH,
    MEMORY_BYTES,
    PROCESS_MEMORY_BYTES,
    SEARCH_SECONDS,
    SNAPSHOT_AGE_SECONDS,
    VECTORS,
)
from index_service.shards import IndexSpec
from index_service.store import CollectionRecord, Store, StoredRow

log = logging.getLogger(__name__)

MAX_ID_LENGTH = 512
MAX_K = 10_000
MAX_RESULTS_PER_CALL = 1_000_000  # queries x k
MAX_DIM = 65_536
MAX_SHARDS = 64
MAX_FINGERPRINT_LENGTH = 512
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
# A page of list_vectors stops early once its metadata (as stored, JSON) passes this.
MAX_PAGE_METADATA_BYTES = 16 * 1024 * 1024
# k-means training sample: this many points per centroid (FAISS warns below 39).
TRAIN_POINTS_PER_CENTROID = 40
# Upserts give freed heap back to the OS once this many vector bytes have been written
# (``_count_written_bytes``).
TRIM_AFTER_WRITTEN_BYTES = 64 << 20


@dataclasses.dataclass
class CollectionInfo:
    name: str
    dim: int
    metric: str  # "ip" or "l2"
    index_spec: str
    num_shards: int
    model_fingerprint: str
    vector_count: int
    trained: bool
    memory_bytes: int
    snapshot_age_seconds: float  # -1 when there is no snapshot
    sequence: int  # store sequence of the collection's last write
    uid: str = ""  # the store's uid of the collection: new each time it is created
    hnsw_ef_search: int = 0  # HNSW: efSearch of a search that asks for none (calibrated or from the spec)


@dataclasses.dataclass
class WriteResult:
    count: int  # vectors upserted / deleted
    sequence: int  # store sequence that includes the write


@dataclasses.dataclass
class Hit:
    id: str
    score: float  # inner product, or -squared L2 distance; higher is better
    metadata: dict[str, Any] | None = None
    vector: np.ndarray | None = None


@dataclasses.dataclass
class Record:
    id: str
    metadata: dict[str, Any] | None = None
    vector: np.ndarray | None = None


class IndexEngine:
    """Named collections of vectors with metadata, stored durably in ``data_dir``."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        *,
        snapshot_interval_seconds: float = 0.0,
        snapshot_on_close: bool = True,
        auto_train: bool = True,
        backup: S3Backup | None = None,
        build_threads: int | None = None,
        metadata_limits: MetadataLimits | None = None,
    ):
        """
        Args:
            data_dir: holds ``store.sqlite`` and ``snapshots/<collection uid>/``.
            snapshot_interval_seconds: snapshot changed collections this often (0: never on a timer).
            snapshot_on_close: snapshot changed collections in ``close()``.
            auto_train: train IVF/PQ indexes in the background once they hold enough vectors.
            backup: upload snapshots and the store there, and restore from it when ``data_dir`` is empty.
            build_threads: FAISS threads for training and bulk builds (default: every core).
            metadata_limits: limits on each record's metadata and on a collection's distinct keys.

        "Every core" is ``$OMP_NUM_THREADS`` when set (a pod sets it to its CPU limit) else
        ``os.cpu_count()``; in-process shards are searched by a pool of that many threads.
        """
        self.data_dir = Path(data_dir)
        self.snapshot_interval_seconds = snapshot_interval_seconds
        self.snapshot_on_close = snapshot_on_close
        self.auto_train = auto_train
        self.backup = backup
        self.metadata_limits = metadata_limits or MetadataLimits()
        omp_threads = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
        cores = int(omp_threads) if omp_threads.isdigit() and int(omp_threads) > 0 else os.cpu_count() or 1
        self.build_threads = build_threads or cores
        self.store: Store | None = None
        self._collections: dict[str, Collection] = {}
        self._registry_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=cores, thread_name_prefix="shard-search")
        self._stop = threading.Event()
        self._snapshotter: threading.Thread | None = None
        self._builds: list[threading.Thread] = []
        self._trim_lock = threading.Lock()
        self._written_since_trim = 0

    # -- lifecycle ------------------------------------------------------------

    def __enter__(self) -> "IndexEngine":
        self.open()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def open(self) -> None:
        """Restores from backup if needed, loads every collection, starts the snapshot timer."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        store_path = self.data_dir / "store.sqlite"
        restored = not store_path.exists() and self.backup is not None and self.backup.restore_store(store_path)
        store = Store(store_path)
        records = store.collections()
        if restored:
            for record in records:
                self.backup.restore_snapshot(record.uid, self._snapshot_dir(record.uid))
        self._remove_orphan_snapshots({record.uid for record in records})
        for record in records:
            collection = self._load_collection(store, record)
            self._collections[record.name] = collection
            self._export_metrics(collection)
        self.store = store
        release_freed_heap()  # what loading read from the store and the snapshots
        PROCESS_MEMORY_BYTES.labels("rss").set_function(process_rss_bytes)
        PROCESS_MEMORY_BYTES.labels("store_cache").set_function(store_cache_bytes)
        for collection in self._collections.values():
            self._maybe_start_build(collection)
        if self.snapshot_interval_seconds > 0:
            self._snapshotter = threading.Thread(target=self._snapshot_periodically, name="snapshots", daemon=True)
            self._snapshotter.start()
        log.info("index engine opened %s with %d collections", self.data_dir, len(records))

    def close(self) -> None:
        """Stops background work, snapshots changed collections (if configured), closes the store."""
        if self.store is None:
            return
        self._stop.set()
        if self._snapshotter is not None:
            self._snapshotter.join()
        if self.snapshot_on_close:
            try:
                self.snapshot()
            except Exception:  # noqa: BLE001 - still close the store; the next start replays from it
                log.exception("snapshot on close failed")
        for thread in self._builds:  # a training run cannot be interrupted; don't wait for it forever
            thread.join(timeout=1.0)
        self._pool.shutdown(wait=True)
        self.store.close()
        self.store = None

    def _snapshot_dir(self, uid: int) -> Path:
        return self.data_dir / "snapshots" / str(uid)

    def _remove_orphan_snapshots(self, live_uids: set[int]) -> None:
        root = self.data_dir / "snapshots"
        if root.is_dir():
            for path in root.iterdir():
                if not (path.name.isdigit() and int(path.name) in live_uids):
                    shutil.rmtree(path, ignore_errors=True)

    def _load_collection(self, store: Store, record: CollectionRecord) -> Collection:
        started = time.perf_counter()
        spec = IndexSpec.parse(record.index_spec, record.dim, record.metric)
        collection = Collection(record, spec, store.metadata_kinds(record.uid), self._snapshot_dir(record.uid))
        collection.remove_snapshot_leftovers()
        collection.load_records(store.iter_records(record.uid))
        snapshot = collection.read_snapshot(store.sequence())
        if snapshot is not None:
            sequence, shards = snapshot
            exact_sizes = [shard.ntotal for shard in shards]  # read_index sizes lists exactly
            changes = store.changes_since(record.uid, sequence, record.dim)
            collection.replay(shards, changes)
            source = (f"snapshot at sequence {sequence} + {len(changes.added_ids)} added and "
                      f"{len(changes.retired_ids)} retired after it")
            in_indexes = sum(shard.ntotal for shard in shards)
            if not any(shard.keeps_tombstones for shard in shards) and in_indexes != collection.count:
                log.warning("collection %s: snapshot + replay holds %d vectors, the store %d; rebuilding",
                            record.name, in_indexes, collection.count)
                snapshot = None
                collection.snapshot_sequence, collection.snapshot_time = -1, None
        if snapshot is None:
            source = "store"
            _, ids, vectors = store.live_vectors(record.uid, record.dim)
            shards = collection.build_shards(ids, vectors, template=None)
            exact_sizes = None
        collection.swap_shards(shards, exact_sizes)
        log.info("collection %s: loaded %d vectors from %s in %.2fs (trained=%s)", record.name,
                 collection.count, source, time.perf_counter() - started, collection.trained)
        return collection

    # -- collections ------------------------------------------------------------

    def _store(self) -> Store:
        if self.store is None:
            raise Unavailable("the index is not open (still loading, or shut down)")
        return self.store

    def _collection(self, name: str) -> Collection:
        self._store()
        collection = self._collections.get(name)
        if collection is None:
            raise NotFound(f"collection {name!r} does not exist", field="collection")
        return collection

    def create_collection(
        self,
        name: str,
        dim: int,
        metric: str = "ip",
        index_spec: str = "",
        num_shards: int = 1,
        model_fingerprint: str = "",
    ) -> CollectionInfo:
        """Creates an empty collection. ``metric`` is "ip" (inner product) or "l2"
        (score = -squared distance); ``index_spec`` is a FAISS factory string, with optional
        HNSW parameters (``HNSW32,efConstruction=80``); empty means ``shards.DEFAULT_INDEX_SPEC``."""
        store = self._store()
        check_collection_name(name, field="name")
        if not 1 <= dim <= MAX_DIM:
            raise InvalidArgument(f"dim must be between 1 and {MAX_DIM}, got {dim}", field="dim")
        if metric not in ("ip", "l2"):
            raise InvalidArgument(f"metric must be 'ip' or 'l2', got {metric!r}", field="metric")
        if not 1 <= num_shards <= MAX_SHARDS:
            raise InvalidArgument(f"num_shards must be between 1 and {MAX_SHARDS}, got {num_shards}",
                                  field="num_shards")
        if len(model_fingerprint) > MAX_FINGERPRINT_LENGTH:
            raise InvalidArgument(f"model_fingerprint is longer than {MAX_FINGERPRINT_LENGTH} characters",
                                  field="model_fingerprint")
        spec = IndexSpec.parse(index_spec, dim, metric)
        with self._registry_lock:
            if name in self._collections:
                raise AlreadyExists(f"collection {name!r} already exists", field="name")
            record = store.create_collection(CollectionRecord(
                name=name, dim=dim, metric=metric, index_spec=spec.spec, num_shards=num_shards,
                model_fingerprint=model_fingerprint, created_at=time.time(),
            ))
            collection = Collection(record, spec, {}, self._snapshot_dir(record.uid))
            self._collections[name] = collection
        self._export_metrics(collection)
        return self._info(collection)

    def get_collection(self, name: str) -> CollectionInfo:
        return self._info(self._collection(name))

    def list_collections(self, page_size: int = 0, page_token: str = "") -> tuple[list[CollectionInfo], str]:
        """Collections in name order after ``page_token``; returns (page, next_page_token or "")."""
        self._store()
        size = clamp_page_size(page_size, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        collections = dict(self._collections)
        names = sorted(name for name in collections if name > page_token)
        infos = [self._info(collections[name]) for name in names[:size]]
        return infos, (names[size - 1] if len(names) > size else "")

    def delete_collection(self, name: str) -> None:
        store = self._store()
        with self._registry_lock:
            collection = self._collection(name)
            with collection.write_lock:
                store.delete_collection(collection.uid)
                collection.deleted = True
                del self._collections[name]
            shutil.rmtree(collection.snapshot_dir, ignore_errors=True)
        for shard_no in range(collection.num_shards):
            _remove_metric(VECTORS, name, str(shard_no))
        _remove_metric(SNAPSHOT_AGE_SECONDS, name)
        _remove_metric(HNSW_EF_SEARCH, name)
        for part in MEMORY_PARTS:
            _remove_metric(MEMORY_BYTES, name, part)

    def _info(self, collection: Collection) -> CollectionInfo:
        record = collection.record
        return CollectionInfo(
            name=record.name, dim=record.dim, metric=record.metric, index_spec=record.index_spec,
            num_shards=record.num_shards, model_fingerprint=record.model_fingerprint,
            vector_count=collection.count, trained=collection.trained, memory_bytes=collection.memory_bytes(),
            snapshot_age_seconds=collection.snapshot_age(), sequence=collection.applied_sequence,
            uid=str(record.uid), hnsw_ef_search=collection.hnsw_ef_search,
        )

    def _export_metrics(self, collection: Collection) -> None:
        for shard_no in range(collection.num_shards):
            VECTORS.labels(collection.name, str(shard_no)).set_function(
                lambda collection=collection, shard_no=shard_no: collection.shard_counts[shard_no]
            )
        SNAPSHOT_AGE_SECONDS.labels(collection.name).set_function(collection.snapshot_age)
        if collection.spec.family == "hnsw":
            HNSW_EF_SEARCH.labels(collection.name).set_function(
                lambda collection=collection: collection.hnsw_ef_search
            )
        for part in MEMORY_PARTS:
            MEMORY_BYTES.labels(collection.name, part).set_function(
                lambda collection=collection, part=part: collection.memory_part(part)
            )

    # -- writes -----------------------------------------------------------------

    def upsert(
        self,
        collection: str,
        ids: Sequence[str],
        vectors: np.ndarray | Sequence[Sequence[float]],
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
        model_fingerprint: str = "",
    ) -> WriteResult:
        """Inserts or replaces vectors (all or nothing). ``metadata`` is empty or one
        mapping per id of str / number / datetime values."""
        col = self._collection(collection)
        _check_fingerprint(col, model_fingerprint)
        ids = _check_ids(ids)
        vectors = _check_matrix(vectors, col.dim, "vectors", rows=len(ids))
        records = _check_metadata(metadata, len(ids), self.metadata_limits)
        with col.write_lock:
            _check_not_deleted(col)
            new_kinds = col.columns.new_kinds(records, max_keys=self.metadata_limits.max_collection_keys)
            retired = np.array(list(self._store().internal_ids(col.uid, ids).values()), dtype=np.int64)
            first = col.next_internal_id
            internal_ids = np.arange(first, first + len(ids), dtype=np.int64)
            packed = vectors.astype("<f4", copy=False)
            rows = [
                StoredRow(int(internal_id), record_id, packed[row].tobytes(), col.columns.encode(records[row]))
                for row, (internal_id, record_id) in enumerate(zip(internal_ids, ids))
            ]
            sequence = self._store().upsert(col.uid, rows, retired, new_kinds, first + len(ids))
            # FAISS adds (HNSW graph inserts, IVF assignment) run on the build threads, not on
            # whatever this worker thread was last set to (a search sets it to 1; OpenMP is per thread).
            faiss.omp_set_num_threads(self.build_threads)
            col.apply_upsert(ids, internal_ids, vectors, records, retired, new_kinds, sequence)
        del rows, packed
        self._count_written_bytes(vectors.nbytes)
        self._maybe_start_build(col)
        return WriteResult(len(ids), sequence)

    def _count_written_bytes(self, nbytes: int) -> None:
        """Trims the heap once every ``TRIM_AFTER_WRITTEN_BYTES`` of upserted vectors: growing
        indexes reallocate their buffers and the freed ones stay in malloc's arenas.

        IVF lists are not compacted here but in snapshots: a list made exact doubles its
        buffer at its next add, so compacting while vectors still arrive gives the slack back
        at once (a 200k IVF ingest held 4.6 KB/vector with that, 4.1 KB without)."""
        with self._trim_lock:
            self._written_since_trim += nbytes
            if self._written_since_trim < TRIM_AFTER_WRITTEN_BYTES:
                return
            self._written_since_trim = 0
        release_freed_heap()

    def delete(self, collection: str, ids: Sequence[str]) -> WriteResult:
        """Deletes vectors by id; unknown ids are ignored and not counted."""
        col = self._collection(collection)
        ids = _check_ids(ids)
        with col.write_lock:
            _check_not_deleted(col)
            found = self._store().internal_ids(col.uid, ids)
            existing = [record_id for record_id in ids if record_id in found]
            if not existing:
                return WriteResult(0, col.applied_sequence)
            retired = np.array([found[record_id] for record_id in existing], dtype=np.int64)
            sequence = self._store().delete(col.uid, retired)
            col.apply_delete(existing, retired, sequence)
        self._maybe_start_build(col)
        return WriteResult(len(existing), sequence)

    # -- reads ------------------------------------------------------------------

    def search(
        self,
        collection: str,
        queries: np.ndarray | Sequence[Sequence[float]],
        k: int = 10,
        filter: FilterSpec = None,
        nprobe: int = 0,
        ef_search: int = 0,
        include_metadata: bool = False,
        include_vectors: bool = False,
        wait: bool = True,
    ) -> list[list[Hit]]:
        """Top-k hits per query (best first) among the vectors matching ``filter``.

        ``filter`` is a list of ``filters.Condition`` or a dict: ``{"color": "red"}``
        (equals), ``{"size": ["s", "m"]}`` (in-set), ``{"year": {"gte": 2020}}``
        (range on numbers or datetimes); conditions are ANDed. ``nprobe`` (IVF)
        and ``ef_search`` (HNSW) of 0 use the defaults.

        ``wait=False`` is for callers that must not block (an event loop): the
        shards are searched in the calling thread, and ``WouldBlock`` is raised
        instead of waiting while a write is being applied.
        """
        col = self._collection(collection)
        if not 1 <= k <= MAX_K:
            raise InvalidArgument(f"k must be between 1 and {MAX_K}, got {k}", field="k")
        if nprobe < 0 or ef_search < 0:
            raise InvalidArgument("nprobe and ef_search must be >= 0", field="params")
        queries = _check_matrix(queries, col.dim, "queries")
        if len(queries) * k > MAX_RESULTS_PER_CALL:
            raise ResourceExhausted(
                f"{len(queries)} queries x k={k} exceeds {MAX_RESULTS_PER_CALL} results per call; split the batch",
                field="queries",
            )
        conditions = parse_filter(filter)
        started = time.perf_counter()
        found = col.search(queries, k, conditions, nprobe, ef_search, self._pool if wait else None, wait)
        _search_seconds(col.spec.index_type).observe(time.perf_counter() - started)
        if not (include_metadata or include_vectors):
            return [[Hit(record_id, score) for record_id, _, score in row] for row in found]
        wanted = {internal_id for row in found for _, internal_id, _ in row}
        rows = self._store().fetch_by_internal_ids(col.uid, sorted(wanted), include_metadata, include_vectors)
        # A hit whose row is gone was deleted while this search ran: leave it out.
        return [
            [
                Hit(
                    record_id,
                    score,
                    col.columns.decode(rows[internal_id][0]) if include_metadata else None,
                    _unpack(rows[internal_id][1]) if include_vectors else None,
                )
                for record_id, internal_id, score in row
                if internal_id in rows
            ]
            for row in found
        ]

    def estimated_search_seconds(self, collection: str, n_queries: int, k: int = 10, nprobe: int = 0,
                                 ef_search: int = 0) -> float:
        """A rough single-thread time of an unfiltered search (a cost model, not a measurement;
        right within a factor of ~2), so callers can tell cheap searches from expensive ones."""
        return self._collection(collection).estimated_search_seconds(n_queries, k, nprobe, ef_search)

    def fetch(
        self, collection: str, ids: Sequence[str], include_vectors: bool = False
    ) -> tuple[list[Record], list[str]]:
        """(records found, in request order; ids not found)."""
        col = self._collection(collection)
        ids = _check_ids(ids)
        rows = self._store().fetch_by_ids(col.uid, ids, include_vectors)
        records = [
            Record(record_id, col.columns.decode(rows[record_id][0]), _unpack(rows[record_id][1]))
            for record_id in ids
            if record_id in rows
        ]
        return records, [record_id for record_id in ids if record_id not in rows]

    def list_vectors(
        self, collection: str, page_size: int = 0, page_token: str = "", include_metadata: bool = False
    ) -> tuple[list[Record], str]:
        """Records with ids after ``page_token``, ascending; returns (page, next_page_token or "").
        A page ends early (with a token) once its metadata passes ``MAX_PAGE_METADATA_BYTES``."""
        col = self._collection(collection)
        size = clamp_page_size(page_size, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        rows = self._store().page(col.uid, page_token, size + 1, include_metadata)
        records, budget = [], MAX_PAGE_METADATA_BYTES
        for record_id, metadata in rows[:size]:
            if records and budget < 0:
                break
            budget -= len(metadata or "")
            records.append(Record(record_id, col.columns.decode(metadata) if include_metadata else None))
        return records, (records[-1].id if len(rows) > len(records) else "")

    # -- training and background builds ---------------------------------------------

    def train(self, collection: str) -> CollectionInfo:
        """Trains a trainable index now on the vectors stored so far (waits for a
        build already running instead). A no-op for indexes that need no training."""
        col = self._collection(collection)
        if not col.spec.needs_training:
            return self._info(col)
        if col.count < col.spec.min_train_vectors:
            raise FailedPrecondition(
                f"collection {collection!r} has {col.count} vectors; {col.spec.spec} needs at least "
                f"{col.spec.min_train_vectors} to train (training starts by itself at {col.spec.auto_train_vectors})",
                field="collection",
            )
        builds_before = col.builds_done
        with col.build_lock:
            if col.builds_done == builds_before or not col.trained:
                self._build(col)
        return self._info(col)

    def calibrate_ef_search(self, collection: str) -> CollectionInfo:
        """Calibrates the default efSearch of an HNSW collection whose spec sets none, now,
        on the vectors it holds (waits for a build running first); a no-op for other specs.
        Collections also do this by themselves in the background (``_maybe_start_build``)."""
        col = self._collection(collection)
        if col.spec.calibrates_ef_search and col.trained and col.count:
            with col.build_lock:
                self._calibrate_ef_search(col)
        return self._info(col)

    def _maybe_start_build(self, col: Collection) -> None:
        """Starts a background build when an index should be trained or an HNSW graph compacted,
        or a background calibration of an HNSW collection's efSearch (after a compaction too)."""
        # A collection trained before (by TrainIndex, maybe below the auto-train size) retrains
        # after a restart that found no usable snapshot.
        train_at = col.spec.min_train_vectors if col.record.trained else col.spec.auto_train_vectors
        wants_training = self.auto_train and col.spec.needs_training and not col.trained and col.count >= train_at
        wants_compaction = col.tombstones > max(1000, col.count)
        wants_build = wants_training or wants_compaction
        if not (wants_build or col.wants_ef_search_calibration) or col.build_lock.locked() or self._stop.is_set():
            return

        def run() -> None:
            if not col.build_lock.acquire(blocking=False):
                return
            try:
                if wants_build:
                    self._build(col)
                if col.wants_ef_search_calibration:
                    self._calibrate_ef_search(col)
            except Exception:  # noqa: BLE001 - a failed background build must not kill the service
                log.exception("collection %s: background build failed", col.name)
            finally:
                col.build_lock.release()

        thread = threading.Thread(target=run, name=f"build-{col.name}", daemon=True)
        self._builds = [t for t in self._builds if t.is_alive()] + [thread]
        thread.start()

    def wait_for_builds(self, timeout: float | None = None) -> None:
        """Waits until background builds (training, HNSW compaction) running now have finished."""
        for thread in list(self._builds):
            thread.join(timeout)

    def _build(self, col: Collection) -> None:
        """Rebuilds the collection's indexes from the store (training them if needed)
        without blocking searches or writes, then catches up and swaps them in.
        The caller holds ``col.build_lock``."""
        started = time.perf_counter()
        store = self._store()
        sequence, ids, vectors = store.live_vectors(col.uid, col.dim)
        template = None
        if col.spec.needs_training:
            if len(ids) < col.spec.min_train_vectors:
                return
            sample_size = min(len(ids), TRAIN_POINTS_PER_CENTROID * col.spec.min_train_vectors)
            sample = vectors[np.random.default_rng(sequence).choice(len(ids), sample_size, replace=False)]
            template = col.spec.train(sample, self.build_threads)
            del sample
        else:
            faiss.omp_set_num_threads(self.build_threads)
        shards = col.build_shards(ids, vectors, template)
        del vectors, template
        for shard in shards:
            compact_inverted_lists(shard.index)
        exact_sizes = [shard.ntotal for shard in shards]  # the replay below grows some lists again
        with col.write_lock:
            if col.deleted or self.store is None:
                return
            col.replay(shards, store.changes_since(col.uid, sequence, col.dim))
            col.swap_shards(shards, exact_sizes)
            col.ef_search_calibrated_at = 0  # another graph: calibrated again (its efSearch serves meanwhile)
        del shards  # the collection holds them; the staging indexes they replaced are free now
        release_freed_heap()
        store.set_trained(col.uid, col.trained)
        col.record.trained = col.trained
        col.builds_done += 1
        BUILD_SECONDS.labels(col.spec.index_type).observe(time.perf_counter() - started)
        log.info("collection %s: built %s over %d vectors in %.1fs", col.name, col.spec.spec, len(ids),
                 time.perf_counter() - started)
        self._snapshot_collection(col)
        self._upload_store()

    def _calibrate_ef_search(self, col: Collection) -> None:
        """Measures the collection's default efSearch on a sample of its own vectors (see
        ``index_service.calibration``) and serves it from now on; searches and writes go on
        meanwhile. The caller holds ``col.build_lock`` (so the shards are not swapped)."""
        count = col.count
        faiss.omp_set_num_threads(self.build_threads)
        result = calibrate_ef_search([shard.index for shard in col.shards], col.spec.faiss_metric,
                                     read_guard=col.rw.read, seed=count)
        with col.write_lock:
            if col.deleted or self.store is None:
                return
            col.hnsw_ef_search = result.ef_search
            col.ef_search_calibrated_at = count
            saved = col.save_ef_search_calibration()
        log.info("collection %s: efSearch %d calibrated over %d vectors: recall@10 %.3f on %d of its vectors "
                 "(by efSearch: %s) in %.2fs%s", col.name, result.ef_search, result.vectors, result.recall,
                 result.queries, ", ".join(f"{ef}: {recall:.3f}" for ef, recall in result.sweep.items()),
                 result.seconds, "" if saved else "; saved with the next snapshot")

    # -- snapshots --------------------------------------------------------------

    def snapshot(self, collection: str = "") -> list[str]:
        """Snapshots one collection, or every collection changed since its last snapshot."""
        self._store()
        if collection:
            targets = [self._collection(collection)]
        else:
            targets = [col for col in list(self._collections.values())
                       if col.applied_sequence != col.snapshot_sequence]
        names = [col.name for col in targets if self._snapshot_collection(col)]
        if names:
            self._upload_store()
        return names

    def snapshot_files(self, collection: str) -> list[Path]:
        """The shard files of the collection's latest snapshot, in shard order (empty when it
        has none): the FAISS indexes it serves, readable with ``faiss.read_index``."""
        col = self._collection(collection)
        manifest = col.snapshot_dir / MANIFEST
        if not manifest.exists():
            return []
        return [col.snapshot_dir / name for name in json.loads(manifest.read_text())["shards"]]

    def _snapshot_collection(self, col: Collection) -> bool:
        with col.write_lock:
            if col.deleted or self.store is None:
                return False
            files = col.write_snapshot()
            sequence = col.snapshot_sequence
        if self.backup is not None:
            self.backup.upload_snapshot(col.uid, files)
        # Retirements the snapshot holds are no longer needed for replay, unless a running build
        # started before it must still replay them (or the upload above failed: the backup's
        # snapshot is older, and the store copy uploaded next must keep them).
        if not col.build_lock.locked():
            self._store().forget_retired(col.uid, sequence)
        return True

    def _upload_store(self) -> None:
        if self.backup is not None and self.store is not None:
            self.backup.upload_store(self.store, [col.uid for col in list(self._collections.values())])

    def _snapshot_periodically(self) -> None:
        poll = min(self.snapshot_interval_seconds, 5.0)
        while not self._stop.wait(poll):
            now = time.time()
            due = [
                col.name for col in list(self._collections.values())
                if col.applied_sequence != col.snapshot_sequence
                and now - (col.snapshot_time or col.loaded_time) >= self.snapshot_interval_seconds
            ]
            for name in due:
                try:
                    self.snapshot(name)
                except NotFound:
                    pass
                except Exception:  # noqa: BLE001 - keep the timer alive
                    log.exception("periodic snapshot of %s failed", name)


_SEARCH_TIMERS: dict[str, Any] = {}


def _search_seconds(index_type: str):
    """The search-time histogram child of an index type (``labels()`` locks and hashes on every call)."""
    timer = _SEARCH_TIMERS.get(index_type)
    if timer is None:
        timer = _SEARCH_TIMERS[index_type] = SEARCH_SECONDS.labels(index_type)
    return timer


# -- validation helpers ----------------------------------------------------------


def _check_not_deleted(col: Collection) -> None:
    if col.deleted:
        raise NotFound(f"collection {col.name!r} does not exist", field="collection")


def _check_fingerprint(col: Collection, fingerprint: str) -> None:
    expected = col.record.model_fingerprint
    if expected and fingerprint != expected:
        raise FailedPrecondition(
            f"collection {col.name!r} holds vectors of model {expected!r}; this request carries "
            f"{fingerprint or 'no fingerprint'!r}",
            field="model_fingerprint",
            reason="MODEL_FINGERPRINT_MISMATCH",
        )


def _check_ids(ids: Sequence[str], field: str = "ids") -> list[str]:
    ids = list(ids)
    if not ids:
        raise InvalidArgument(f"{field} must not be empty", field=field)
    first_seen: dict[str, int] = {}
    for position, record_id in enumerate(ids):
        where = f"{field}[{position}]"
        if not isinstance(record_id, str) or not record_id:
            raise InvalidArgument(f"{where} is empty; ids are non-empty strings", field=where)
        if len(record_id) > MAX_ID_LENGTH:
            raise InvalidArgument(f"{where} has {len(record_id)} characters; the limit is {MAX_ID_LENGTH}",
                                  field=where)
        if record_id in first_seen:
            raise InvalidArgument(f"{where} {record_id!r} repeats {field}[{first_seen[record_id]}]", field=where)
        first_seen[record_id] = position
    return ids


def _check_matrix(matrix: Any, dim: int, field: str, rows: int | None = None) -> np.ndarray:
    try:
        array = np.asarray(matrix, dtype=np.float32)
    except (TypeError, ValueError):
        raise InvalidArgument(f"{field} must be a matrix of numbers", field=field) from None
    if array.ndim == 1 and array.size:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] != dim:
        got = array.shape[1] if array.ndim == 2 else f"shape {array.shape}"
        raise InvalidArgument(f"{field} have dim {got}; the collection's dim is {dim}", field=f"{field}.dim")
    if rows is not None and len(array) != rows:
        raise InvalidArgument(f"{field} has {len(array)} rows for {rows} ids", field=f"{field}.rows")
    if not len(array):
        raise InvalidArgument(f"{field} has no rows", field=f"{field}.rows")
    if not np.isfinite(array).all():
        finite = np.isfinite(array).all(axis=1)
        row = int(np.flatnonzero(~finite)[0])
        raise InvalidArgument(f"{field} row {row} contains NaN or Inf", field=f"{field}[{row}]")
    return np.ascontiguousarray(array)


def _check_metadata(metadata: Sequence[Mapping[str, Any] | None] | None, count: int,
                    limits: MetadataLimits) -> list:
    if not metadata:
        return [None] * count
    if len(metadata) != count:
        raise InvalidArgument(f"metadata has {len(metadata)} entries for {count} ids; send none or one per id",
                              field="metadata")
    for position, record in enumerate(metadata):
        check_metadata_limits(record or {}, limits, f"metadata[{position}]")
    return list(metadata)


def _unpack(data: bytes | None) -> np.ndarray | None:
    return None if data is None else np.frombuffer(data, dtype="<f4").astype(np.float32)


def _remove_metric(metric, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:
        pass


__all__ = ["IndexEngine", "CollectionInfo", "WriteResult", "Hit", "Record", "WouldBlock", "MAX_K", "MAX_ID_LENGTH"]
