"""The string id of every internal id, packed for memory.

A collection needs internal id -> string id on every search hit. A Python list of
str costs ~70 B per id (the str object, its list slot) and, with a dict for the
other direction, ~140 B; and millions of small objects made while requests come
and go fragment the Python heap, so an ingested collection held ~400 B/vector
more than the same collection after a restart. Here the ids are one UTF-8
buffer and an int64 end offset per internal id: 8 B + the id's length. The
other direction (string id -> internal id) is asked of the store, whose unique
index on (collection, id) answers it on writes; searches never need it.
"""

from __future__ import annotations

from array import array
from itertools import accumulate
from typing import Iterable, Sequence


class PackedIds:
    """Append-only: internal id ``i`` names ``self[i]`` (``""`` for a gap: an internal
    id retired before the collection was loaded). The collection keeps searches out while it appends."""

    def __init__(self) -> None:
        self._text = bytearray()
        self._ends = array("q")  # _ends[i]: where internal id i's text ends (array: fast scalar reads)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, internal_id: int) -> str:
        ends = self._ends
        return self._text[ends[internal_id - 1] if internal_id else 0:ends[internal_id]].decode()

    def extend(self, ids: Sequence[str]) -> None:
        """Names the next ``len(ids)`` internal ids."""
        encoded = [record_id.encode() for record_id in ids]
        ends = accumulate(map(len, encoded), initial=self._ends[-1] if self._ends else 0)
        next(ends)  # the initial value: where the previous id ends
        self._ends.extend(ends)
        self._text += b"".join(encoded)

    def fill(self, rows: Iterable[tuple[int, str]], size: int, batch: int = 65536) -> None:
        """Names internal ids [0, size) from (internal id, id) rows in ascending internal id
        order; ids without a row become gaps."""
        pending: list[str] = []
        for internal_id, record_id in rows:
            gap = internal_id - len(self) - len(pending)
            if gap:
                pending.extend([""] * gap)
            pending.append(record_id)
            if len(pending) >= batch:
                self.extend(pending)
                pending = []
        self.extend(pending)
        self.extend([""] * (size - len(self)))

    @property
    def nbytes(self) -> int:
        return len(self._text) + self._ends.itemsize * len(self._ends)
