"""Where the index service's memory goes, and giving freed heap back to the OS.

- ``process_rss_bytes``: the process's resident set (``/proc/self/statm``).
- ``store_cache_bytes``: what SQLite holds in this process (page caches of every
  connection, schemas, statements): ``sqlite3_status64(SQLITE_STATUS_MEMORY_USED)``
  of the library Python's ``sqlite3`` module uses.
- ``compact_inverted_lists``: an IVF index's lists without their growth slack.
- ``configure_malloc``: the service process uses two malloc arenas, not one per
  worker thread, and a fixed mmap threshold, so request-sized buffers go back to
  the OS when freed.
- ``release_freed_heap``: glibc keeps freed small blocks in its arenas (one per
  thread that allocated), so after a build frees hundreds of MB of staging
  index, copies of vectors and hash-map nodes, RSS stays where it peaked until
  ``malloc_trim`` hands the free pages back. It is a no-op where there is no glibc.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
from typing import ContextManager
import sqlite3  # noqa: F401 - loads the SQLite library that store_cache_bytes asks

import faiss

log = logging.getLogger(__name__)

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_SQLITE_STATUS_MEMORY_USED = 0
_M_ARENA_MAX = -8  # mallopt parameters
_M_MMAP_THRESHOLD = -3
# glibc gives each thread that allocates while another holds an arena an arena of its own (up
# to 8 per core). The service's worker threads take turns at upserts, and each left its arena
# with tens of MB nobody uses: after ingesting 100k 512-d vectors the heap and arenas held
# 141 MiB with one per thread, 105 MiB with 2.
SERVICE_MALLOC_ARENAS = 2
# glibc raises its mmap threshold to the size of each large block freed (up to 32 MiB) and
# keeps up to twice that free in the heap without trimming, so after an ingest of 10 MB
# upserts ~40-90 MB of their freed buffers stayed resident. A fixed threshold keeps blocks
# from 1 MiB up in mmaps of their own (returned to the OS when freed) and the trim threshold
# at 128 KiB. HNSW32 over 50k vectors after ingest: 5.0 KB/vector RSS instead of 5.8 KB.
SERVICE_MMAP_THRESHOLD = 1 << 20


def _load(name: str):
    path = ctypes.util.find_library(name)
    try:
        return ctypes.CDLL(path) if path else None
    except OSError:
        return None


_LIBC = _load("c")
_SQLITE = _load("sqlite3")


def process_rss_bytes() -> int:
    """Resident bytes of this process (0 where ``/proc`` is missing)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return 0


def store_cache_bytes() -> int:
    """Bytes SQLite has allocated in this process (0 when it cannot be asked)."""
    if _SQLITE is None or not hasattr(_SQLITE, "sqlite3_status64"):
        return 0
    current, highest = ctypes.c_int64(), ctypes.c_int64()
    if _SQLITE.sqlite3_status64(_SQLITE_STATUS_MEMORY_USED, ctypes.byref(current), ctypes.byref(highest), 0):
        return 0
    return current.value


def configure_malloc(arenas: int = SERVICE_MALLOC_ARENAS, mmap_threshold: int = SERVICE_MMAP_THRESHOLD) -> None:
    """Caps glibc's malloc arenas and fixes its mmap threshold (what ``MALLOC_ARENA_MAX`` and
    ``MALLOC_MMAP_THRESHOLD_`` do; those variables, when set, win). Call it before threads
    start allocating."""
    if _LIBC is None or not hasattr(_LIBC, "mallopt"):
        return
    if "MALLOC_ARENA_MAX" not in os.environ:
        _LIBC.mallopt(_M_ARENA_MAX, arenas)
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)


def release_freed_heap() -> None:
    """Returns the free pages of every malloc arena to the OS (glibc ``malloc_trim(0)``)."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def compact_inverted_lists(index: faiss.Index, swap_guard: ContextManager | None = None) -> bool:
    """Copies an IVF index's lists into exactly sized buffers and frees the old ones;
    returns whether it did (False for indexes without array inverted lists).

    FAISS adds to an inverted list one entry at a time, so each list's buffer grows by
    doubling and holds ~1.4x the codes in it (IVF1024,Flat over 200k vectors: ~430 B
    per vector of slack). A copy made with one ``add_entries`` per list is exact, as a
    snapshot read back from disk is. Peak: one more copy of the lists. The copy only
    reads the index; ``swap_guard`` (a lock excluding searches) is held while the
    index switches to it. The caller keeps writes out for the whole call.
    """
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None or not isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.ArrayInvertedLists):
        return False
    old = ivf.invlists
    exact = faiss.ArrayInvertedLists(old.nlist, old.code_size)
    for list_no in range(old.nlist):
        size = old.list_size(list_no)
        if size:
            exact.add_entries(list_no, size, old.get_ids(list_no), old.get_codes(list_no))
    with swap_guard or contextlib.nullcontext():
        ivf.replace_invlists(exact, True)  # the index owns the copy and deletes the old lists
    exact.this.disown()
    return True
