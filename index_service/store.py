"""The durable store: SQLite in WAL mode, the source of truth for collections,
ids, vectors and metadata. FAISS indexes are derived from it.

Durability: ``journal_mode=WAL`` with ``synchronous=FULL`` fsyncs the WAL on
every commit, so a write that returned survives a process crash *and* a power
loss. (``NORMAL`` would survive a process crash but could lose the last commits
on power loss; one fsync per write call is cheap next to the rest of a
batched upsert, so we keep FULL.)

Every write transaction takes the next value of one global sequence number.
A vector row carries the sequence of the write that stored it, and every
internal id a write retires (deleted, or replaced by an upsert) is recorded in
``retired`` with that write's sequence. So "what changed after sequence S" is
two indexed range queries, which is how snapshots are caught up on restart and
how a background rebuild catches up with writes it raced.

Internal ids are per-collection int64 counters: every upsert of a record
(new or replacing) gets a fresh internal id, so a FAISS label always names one
exact vector version.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from index_service.metrics import STORE_WRITE_SECONDS

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('sequence', 0);
CREATE TABLE IF NOT EXISTS collections (
    uid INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    dim INTEGER NOT NULL,
    metric TEXT NOT NULL,
    index_spec TEXT NOT NULL,
    num_shards INTEGER NOT NULL,
    model_fingerprint TEXT NOT NULL,
    created_at REAL NOT NULL,
    trained INTEGER NOT NULL DEFAULT 0,
    next_internal_id INTEGER NOT NULL DEFAULT 0,
    last_sequence INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS metadata_keys (
    collection_uid INTEGER NOT NULL,
    key TEXT NOT NULL,
    kind TEXT NOT NULL,
    PRIMARY KEY (collection_uid, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS vectors (
    collection_uid INTEGER NOT NULL,
    internal_id INTEGER NOT NULL,
    id TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    metadata TEXT,
    vector BLOB NOT NULL,
    PRIMARY KEY (collection_uid, internal_id)
);
CREATE UNIQUE INDEX IF NOT EXISTS vectors_by_id ON vectors (collection_uid, id);
CREATE INDEX IF NOT EXISTS vectors_by_sequence ON vectors (collection_uid, sequence);
CREATE TABLE IF NOT EXISTS retired (
    collection_uid INTEGER NOT NULL,
    internal_id INTEGER NOT NULL,
    sequence INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS retired_by_sequence ON retired (collection_uid, sequence);
"""

# SQLite limits the number of host parameters in one statement.
_IN_CHUNK = 900
# Page size of a new store. A row (a 512-d float32 vector is 2 KiB) larger than a quarter
# of a 4 KiB page spills into an overflow page of its own, so 4 KiB pages take ~4.1 KB per
# vector; at 16 KiB, seven rows share a page: ~2.4 KB, with point reads as fast. A store
# made before keeps its page size (changing it takes a VACUUM into a new file).
PAGE_SIZE = 16384
# After a checkpoint the WAL file is cut back to this size: a bulk write grows it to the
# size of its transaction (a 50k-vector upsert: ~120 MB), which otherwise stays on disk.
WAL_SIZE_LIMIT = 64 << 20


@dataclasses.dataclass
class CollectionRecord:
    """One row of ``collections``."""

    name: str
    dim: int
    metric: str  # "ip" or "l2"
    index_spec: str
    num_shards: int
    model_fingerprint: str
    created_at: float = 0.0
    uid: int = 0
    trained: bool = False
    next_internal_id: int = 0
    last_sequence: int = 0


@dataclasses.dataclass
class StoredRow:
    """A vector row to write."""

    internal_id: int
    id: str
    vector: bytes  # little-endian float32
    metadata_json: str | None


@dataclasses.dataclass
class Changes:
    """What a collection's writes changed after some sequence number."""

    retired_ids: np.ndarray  # int64 internal ids retired after it
    added_ids: np.ndarray  # int64 internal ids of rows written after it
    added_vectors: np.ndarray  # float32 (len(added_ids), dim)


def _chunks(items: Sequence, size: int = _IN_CHUNK) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class Store:
    """Thread-safe: one SQLite connection per thread, writes serialized by a lock."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._write_lock = threading.Lock()
        conn = self._conn()
        conn.execute(f"PRAGMA page_size={PAGE_SIZE}")  # takes effect only in a new, empty file
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            self._local.conn = conn
            with self._connections_lock:
                self._connections.append(conn)
        return conn

    def close(self) -> None:
        with self._connections_lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()

    @contextmanager
    def _write(self, op: str) -> Iterator[tuple[sqlite3.Connection, int]]:
        """A write transaction that takes the next sequence number; commits on exit."""
        started = time.perf_counter()
        with self._write_lock:
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                (sequence,) = conn.execute(
                    "UPDATE meta SET value = value + 1 WHERE key = 'sequence' RETURNING value"
                ).fetchone()
                yield conn, sequence
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        STORE_WRITE_SECONDS.labels(op).observe(time.perf_counter() - started)

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: every statement inside sees the same snapshot."""
        conn = self._conn()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    # -- collections -------------------------------------------------------

    def sequence(self) -> int:
        return self._conn().execute("SELECT value FROM meta WHERE key = 'sequence'").fetchone()[0]

    def create_collection(self, record: CollectionRecord) -> CollectionRecord:
        with self._write("create_collection") as (conn, sequence):
            cursor = conn.execute(
                "INSERT INTO collections (name, dim, metric, index_spec, num_shards, model_fingerprint,"
                " created_at, last_sequence) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (record.name, record.dim, record.metric, record.index_spec, record.num_shards,
                 record.model_fingerprint, record.created_at, sequence),
            )
            return dataclasses.replace(record, uid=cursor.lastrowid, last_sequence=sequence)

    def delete_collection(self, uid: int) -> int:
        with self._write("delete_collection") as (conn, sequence):
            for table in ("vectors", "retired", "metadata_keys"):
                conn.execute(f"DELETE FROM {table} WHERE collection_uid = ?", (uid,))
            conn.execute("DELETE FROM collections WHERE uid = ?", (uid,))
            return sequence

    def collections(self) -> list[CollectionRecord]:
        rows = self._conn().execute(
            "SELECT name, dim, metric, index_spec, num_shards, model_fingerprint, created_at, uid, trained,"
            " next_internal_id, last_sequence FROM collections ORDER BY name"
        ).fetchall()
        return [CollectionRecord(*row[:8], bool(row[8]), *row[9:]) for row in rows]

    def set_trained(self, uid: int, trained: bool) -> None:
        with self._write_lock:
            self._conn().execute("UPDATE collections SET trained = ? WHERE uid = ?", (int(trained), uid))

    def metadata_kinds(self, uid: int) -> dict[str, str]:
        rows = self._conn().execute("SELECT key, kind FROM metadata_keys WHERE collection_uid = ?", (uid,))
        return dict(rows.fetchall())

    # -- writes ------------------------------------------------------------

    def upsert(
        self,
        uid: int,
        rows: Sequence[StoredRow],
        retired_ids: Sequence[int],
        new_kinds: dict[str, str],
        next_internal_id: int,
    ) -> int:
        """Stores ``rows`` (fresh internal ids), drops the rows they replace, returns the sequence."""
        with self._write("upsert") as (conn, sequence):
            self._retire(conn, uid, retired_ids, sequence)
            conn.executemany(
                "INSERT INTO metadata_keys (collection_uid, key, kind) VALUES (?, ?, ?)",
                [(uid, key, kind) for key, kind in new_kinds.items()],
            )
            conn.executemany(
                "INSERT INTO vectors (collection_uid, internal_id, id, sequence, metadata, vector)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [(uid, row.internal_id, row.id, sequence, row.metadata_json, row.vector) for row in rows],
            )
            conn.execute(
                "UPDATE collections SET next_internal_id = ?, last_sequence = ? WHERE uid = ?",
                (next_internal_id, sequence, uid),
            )
            return sequence

    def delete(self, uid: int, retired_ids: Sequence[int]) -> int:
        with self._write("delete") as (conn, sequence):
            self._retire(conn, uid, retired_ids, sequence)
            conn.execute("UPDATE collections SET last_sequence = ? WHERE uid = ?", (sequence, uid))
            return sequence

    @staticmethod
    def _retire(conn: sqlite3.Connection, uid: int, internal_ids: Sequence[int], sequence: int) -> None:
        conn.executemany(
            "DELETE FROM vectors WHERE collection_uid = ? AND internal_id = ?",
            [(uid, int(i)) for i in internal_ids],
        )
        conn.executemany(
            "INSERT INTO retired (collection_uid, internal_id, sequence) VALUES (?, ?, ?)",
            [(uid, int(i), sequence) for i in internal_ids],
        )

    def forget_retired(self, uid: int, up_to_sequence: int) -> None:
        """Drops retirement records a snapshot already includes."""
        with self._write_lock:
            self._conn().execute(
                "DELETE FROM retired WHERE collection_uid = ? AND sequence <= ?", (uid, up_to_sequence)
            )

    # -- reads -------------------------------------------------------------

    def iter_records(self, uid: int) -> Iterator[tuple[int, str, str | None]]:
        """(internal_id, id, metadata_json) of every live row, in internal id order."""
        yield from self._conn().execute(
            "SELECT internal_id, id, metadata FROM vectors WHERE collection_uid = ? ORDER BY internal_id", (uid,)
        )

    def internal_ids(self, uid: int, ids: Sequence[str]) -> dict[str, int]:
        """{id: internal id} of the ids that have a live row (the unique index on id answers)."""
        found: dict[str, int] = {}
        with self._read() as conn:
            for chunk in _chunks(ids):
                marks = ",".join("?" * len(chunk))
                found.update(conn.execute(
                    f"SELECT id, internal_id FROM vectors WHERE collection_uid = ? AND id IN ({marks})", (uid, *chunk)
                ).fetchall())
        return found

    def fetch_by_ids(
        self, uid: int, ids: Sequence[str], with_vectors: bool
    ) -> dict[str, tuple[str | None, bytes | None]]:
        """{id: (metadata_json, vector bytes or None)} for the ids that exist."""
        vector_column = "vector" if with_vectors else "NULL"
        found: dict[str, tuple[str | None, bytes | None]] = {}
        with self._read() as conn:
            for chunk in _chunks(ids):
                marks = ",".join("?" * len(chunk))
                for row_id, metadata, vector in conn.execute(
                    f"SELECT id, metadata, {vector_column} FROM vectors WHERE collection_uid = ? AND id IN ({marks})",
                    (uid, *chunk),
                ):
                    found[row_id] = (metadata, vector)
        return found

    def fetch_by_internal_ids(
        self, uid: int, internal_ids: Sequence[int], with_metadata: bool, with_vectors: bool
    ) -> dict[int, tuple[str | None, bytes | None]]:
        """{internal_id: (metadata_json or None, vector bytes or None)} for live rows."""
        metadata_column = "metadata" if with_metadata else "NULL"
        vector_column = "vector" if with_vectors else "NULL"
        found: dict[int, tuple[str | None, bytes | None]] = {}
        with self._read() as conn:
            for chunk in _chunks([int(i) for i in internal_ids]):
                marks = ",".join("?" * len(chunk))
                for internal_id, metadata, vector in conn.execute(
                    f"SELECT internal_id, {metadata_column}, {vector_column} FROM vectors"
                    f" WHERE collection_uid = ? AND internal_id IN ({marks})",
                    (uid, *chunk),
                ):
                    found[internal_id] = (metadata, vector)
        return found

    def page(self, uid: int, after_id: str, limit: int, with_metadata: bool) -> list[tuple[str, str | None]]:
        """(id, metadata_json or None) of up to ``limit`` rows with id > ``after_id``, ascending."""
        metadata_column = "metadata" if with_metadata else "NULL"
        return self._conn().execute(
            f"SELECT id, {metadata_column} FROM vectors WHERE collection_uid = ? AND id > ? ORDER BY id LIMIT ?",
            (uid, after_id, limit),
        ).fetchall()

    def changes_since(self, uid: int, sequence: int, dim: int) -> Changes:
        with self._read() as conn:
            retired = conn.execute(
                "SELECT internal_id FROM retired WHERE collection_uid = ? AND sequence > ?", (uid, sequence)
            ).fetchall()
            added = conn.execute(
                "SELECT internal_id, vector FROM vectors WHERE collection_uid = ? AND sequence > ?"
                " ORDER BY internal_id",
                (uid, sequence),
            ).fetchall()
        vectors = np.frombuffer(b"".join(v for _, v in added), dtype="<f4").reshape(len(added), dim)
        return Changes(
            retired_ids=np.array([i for (i,) in retired], dtype=np.int64),
            added_ids=np.array([i for i, _ in added], dtype=np.int64),
            added_vectors=vectors.astype(np.float32, copy=False),
        )

    def live_vectors(self, uid: int, dim: int, batch: int = 65536) -> tuple[int, np.ndarray, np.ndarray]:
        """(sequence, internal ids, float32 vectors) of every live row, read as one consistent snapshot."""
        with self._read() as conn:
            sequence = conn.execute("SELECT value FROM meta WHERE key = 'sequence'").fetchone()[0]
            (count,) = conn.execute("SELECT COUNT(*) FROM vectors WHERE collection_uid = ?", (uid,)).fetchone()
            ids = np.empty(count, dtype=np.int64)
            vectors = np.empty((count, dim), dtype=np.float32)
            cursor = conn.execute(
                "SELECT internal_id, vector FROM vectors WHERE collection_uid = ? ORDER BY internal_id", (uid,)
            )
            filled = 0
            while rows := cursor.fetchmany(batch):
                end = filled + len(rows)
                ids[filled:end] = [i for i, _ in rows]
                vectors[filled:end] = np.frombuffer(b"".join(v for _, v in rows), dtype="<f4").reshape(-1, dim)
                filled = end
        return sequence, ids, vectors

    def backup_to(self, path: str | Path) -> None:
        """A consistent copy of the whole store (SQLite online backup)."""
        target = sqlite3.connect(path)
        try:
            self._conn().backup(target)
        finally:
            target.close()
