"""Metadata of a collection: typed keys, JSON encoding for the store, and
in-memory columns that evaluate filters with numpy.

Each metadata key of a collection has one kind, fixed by its first value:
``string``, ``number`` or ``timestamp``. Columns are sparse: a key's column
holds the internal ids of the records that carry it and their values, so
filter memory grows with the (record, key) pairs stored, never with keys x
capacity. Ids are never reused, so a write only appends. Values are encoded as

- number: float64;
- timestamp: int64 microseconds since the epoch (UTC);
- string: int32 codes into a per-key vocabulary.

A filter turns each condition into a bool mask over internal ids by matching
a column's values and scattering the matching ids; the collection hands the
mask to FAISS as an IDSelector.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from clipsearch.errors import UNKNOWN_FILTER_KEY, InvalidArgument

STRING, NUMBER, TIMESTAMP = "string", "number", "timestamp"
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
RANGE_BOUNDS = ("gte", "gt", "lte", "lt")
DTYPES = {STRING: np.int32, NUMBER: np.float64, TIMESTAMP: np.int64}


def kind_of(value: Any, field: str) -> str:
    """The kind of a metadata value; InvalidArgument for anything else."""
    if isinstance(value, str):
        return STRING
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise InvalidArgument(f"{field} must be a finite number, got {value!r}", field=field)
        return NUMBER
    if isinstance(value, dt.datetime):
        return TIMESTAMP
    raise InvalidArgument(
        f"{field} has unsupported type {type(value).__name__}; use a string, a number or a timestamp", field=field
    )


def to_micros(value: dt.datetime) -> int:
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return (value - EPOCH) // dt.timedelta(microseconds=1)


def from_micros(micros: int) -> dt.datetime:
    return EPOCH + dt.timedelta(microseconds=micros)


@dataclasses.dataclass(frozen=True)
class Condition:
    """One filter condition on one key.

    ``op`` is ``equals`` (value: a scalar), ``in`` (value: a sequence of
    scalars) or ``range`` (value: a mapping with some of gte/gt/lte/lt).
    """

    key: str
    op: str
    value: Any


FilterSpec = Mapping[str, Any] | Sequence[Condition] | None


def parse_filter(spec: FilterSpec) -> list[Condition]:
    """Conditions (ANDed) from a list of Conditions or the dict form of
    ``clipsearch.metadata.filter_to_proto``: a scalar means equals, a list
    means in-set, and a dict of gte/gt/lte/lt means a range."""
    if not spec:
        return []
    if not isinstance(spec, Mapping):
        return list(spec)
    conditions = []
    for key, cond in spec.items():
        if isinstance(cond, Mapping):
            conditions.append(Condition(key, "range", dict(cond)))
        elif isinstance(cond, (list, tuple, set, frozenset)):
            conditions.append(Condition(key, "in", list(cond)))
        else:
            conditions.append(Condition(key, "equals", cond))
    return conditions


class SparseColumn:
    """The (internal id, value) pairs of one key, in arrays grown by doubling."""

    __slots__ = ("ids", "values", "size")

    def __init__(self, dtype: Any):
        self.ids = np.empty(4, dtype=np.int64)
        self.values = np.empty(4, dtype=dtype)
        self.size = 0

    def append(self, internal_id: int, value: Any) -> None:
        if self.size == len(self.ids):
            self.ids = np.resize(self.ids, 2 * self.size)
            self.values = np.resize(self.values, 2 * self.size)
        self.ids[self.size] = internal_id
        self.values[self.size] = value
        self.size += 1

    def nbytes(self) -> int:
        return self.ids.nbytes + self.values.nbytes


class MetadataColumns:
    """Typed, sparse metadata columns over the internal ids of one collection."""

    def __init__(self, kinds: Mapping[str, str] | None = None):
        self.kinds: dict[str, str] = {}
        self.columns: dict[str, SparseColumn] = {}
        self.vocabularies: dict[str, dict[str, int]] = {}
        self.add_kinds(kinds or {})

    # -- writes -----------------------------------------------------------

    def new_kinds(self, records: Sequence[Mapping[str, Any] | None], field: str = "metadata",
                  max_keys: int | None = None) -> dict[str, str]:
        """Checks every record against the known kinds; returns the kinds of keys seen for the first time.
        InvalidArgument when they would take the collection past ``max_keys`` distinct keys."""
        new: dict[str, str] = {}
        for position, record in enumerate(records):
            for key, value in (record or {}).items():
                where = f"{field}[{position}].{key}"
                if not isinstance(key, str) or not key:
                    raise InvalidArgument(f"{field}[{position}] has an empty key", field=f"{field}[{position}]")
                kind = kind_of(value, where)
                if max_keys is not None and key not in self.kinds and key not in new \
                        and len(self.kinds) + len(new) >= max_keys:
                    raise InvalidArgument(
                        f"{field}[{position}] adds key {key[:64]!r}, but the collection already has "
                        f"{len(self.kinds) + len(new)} distinct metadata keys; the limit is {max_keys} per "
                        "collection. Reuse existing keys (put varying names in values)",
                        field=f"{field}[{position}]", reason="METADATA_TOO_MANY_COLLECTION_KEYS")
                expected = self.kinds.get(key) or new.setdefault(key, kind)
                if kind != expected:
                    raise InvalidArgument(
                        f"{where} is a {kind}, but key {key!r} holds {expected} values in this collection",
                        field=where,
                    )
        return new

    def encode(self, record: Mapping[str, Any] | None) -> str | None:
        """JSON for the store (timestamps as integer microseconds)."""
        if not record:
            return None
        plain = {
            key: to_micros(value) if isinstance(value, dt.datetime) else value for key, value in record.items()
        }
        return json.dumps(plain, separators=(",", ":"))

    def decode(self, text: str | None) -> dict[str, Any]:
        if not text:
            return {}
        record = json.loads(text)
        for key, value in record.items():
            kind = self.kinds.get(key)
            if kind == TIMESTAMP:
                record[key] = from_micros(value)
            elif kind == NUMBER:
                record[key] = float(value)
        return record

    def add_kinds(self, kinds: Mapping[str, str]) -> None:
        for key, kind in kinds.items():
            self.kinds[key] = kind
            self.columns[key] = SparseColumn(DTYPES[kind])
            if kind == STRING:
                self.vocabularies[key] = {}

    def set_records(self, internal_ids: Sequence[int], records: Iterable[Mapping[str, Any] | None]) -> None:
        """Adds the values of fresh internal ids."""
        for internal_id, record in zip(internal_ids, records):
            for key, value in (record or {}).items():
                kind = self.kinds[key]
                if kind == STRING:
                    vocabulary = self.vocabularies[key]
                    value = vocabulary.setdefault(value, len(vocabulary))
                elif kind == TIMESTAMP:
                    value = to_micros(value)
                self.columns[key].append(int(internal_id), value)

    def memory_bytes(self) -> int:
        """A rough size of the columns and vocabularies (keys and strings at their UTF-8 length + 64)."""
        total = sum(column.nbytes() + len(key) + 64 for key, column in self.columns.items())
        return total + sum(len(text) + 64 for vocabulary in self.vocabularies.values() for text in vocabulary)

    # -- filters ----------------------------------------------------------

    def evaluate(self, conditions: Sequence[Condition], size: int, field: str = "filter") -> np.ndarray:
        """A bool mask over internal ids [0, size) of the records matching every condition.

        InvalidArgument for an unknown key, an unknown op or a value of the wrong kind.
        """
        checked = [self._check(condition, f"{field}.conditions[{i}]") for i, condition in enumerate(conditions)]
        mask = np.ones(size, dtype=bool)
        for condition, kind in checked:
            column = self.columns[condition.key]
            ids = column.ids[: column.size]
            matched = ids[self._match(condition, kind, column.values[: column.size])]
            condition_mask = np.zeros(size, dtype=bool)
            condition_mask[matched[matched < size]] = True
            mask &= condition_mask
        return mask

    def _check(self, condition: Condition, where: str) -> tuple[Condition, str]:
        kind = self.kinds.get(condition.key)
        if kind is None:
            known = ", ".join(sorted(self.kinds)) or "none yet"
            raise InvalidArgument(
                f"{where}.key: unknown metadata key {condition.key!r}; this collection's keys: {known}",
                field=f"{where}.key",
                reason=UNKNOWN_FILTER_KEY,
            )

        def check_value(value: Any, path: str) -> None:
            got = kind_of(value, path)
            if got != kind:
                raise InvalidArgument(
                    f"{path} is a {got}, but key {condition.key!r} holds {kind} values", field=path
                )

        if condition.op == "equals":
            check_value(condition.value, f"{where}.equals")
        elif condition.op == "in":
            if not condition.value:
                raise InvalidArgument(f"{where}.in_set needs at least one value", field=f"{where}.in_set")
            for i, value in enumerate(condition.value):
                check_value(value, f"{where}.in_set.values[{i}]")
        elif condition.op == "range":
            bounds = condition.value or {}
            unknown = set(bounds) - set(RANGE_BOUNDS)
            if unknown or not bounds:
                raise InvalidArgument(
                    f"{where}.range needs bounds among gte, gt, lte, lt; got {sorted(bounds)}", field=f"{where}.range"
                )
            if kind == STRING:
                raise InvalidArgument(
                    f"{where}.range: key {condition.key!r} holds strings; ranges apply to numbers and timestamps",
                    field=f"{where}.range",
                )
            for bound, value in bounds.items():
                check_value(value, f"{where}.range.{bound}")
        else:
            raise InvalidArgument(
                f"{where}: set one of equals, in_set or range (got {condition.op!r})", field=where
            )
        return condition, kind

    def _match(self, condition: Condition, kind: str, column: np.ndarray) -> np.ndarray:
        def encoded(value: Any) -> Any:
            if kind == STRING:
                return self.vocabularies[condition.key].get(value, -2)  # -2 matches nothing
            return to_micros(value) if kind == TIMESTAMP else float(value)

        if condition.op == "equals":
            return column == encoded(condition.value)
        if condition.op == "in":
            return np.isin(column, [encoded(v) for v in condition.value])
        mask = np.ones(len(column), dtype=bool)
        for bound, value in condition.value.items():
            target = encoded(value)
            if bound == "gte":
                mask &= column >= target
            elif bound == "gt":
                mask &= column > target
            elif bound == "lte":
                mask &= column <= target
            else:
                mask &= column < target
        return mask
