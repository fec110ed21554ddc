"""Metadata of a collection: typed keys, JSON encoding for the store, and
in-memory columns that evaluate filters with numpy.

Each metadata key of a collection has one kind, fixed by its first value:
``string``, ``number`` or ``timestamp``. Columns are indexed by internal id
(ids are never reused, so a write only ever fills fresh slots):

- number: float64, NaN where missing;
- timestamp: int64 microseconds since the epoch (UTC), ``MISSING_TIME`` where missing;
- string: int32 codes into a per-key vocabulary, -1 where missing.
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
MISSING_TIME = np.iinfo(np.int64).min
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
RANGE_BOUNDS = ("gte", "gt", "lte", "lt")
MAX_KEY_LENGTH = 256


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


class MetadataColumns:
    """Typed metadata columns over the internal ids of one collection."""

    def __init__(self, kinds: Mapping[str, str] | None = None):
        self.kinds: dict[str, str] = dict(kinds or {})
        self.capacity = 0
        self.columns: dict[str, np.ndarray] = {}
        self.vocabularies: dict[str, dict[str, int]] = {}
        for key, kind in self.kinds.items():
            self._add_column(key, kind)

    # -- writes -----------------------------------------------------------

    def new_kinds(self, records: Sequence[Mapping[str, Any] | None], field: str = "metadata") -> dict[str, str]:
        """Checks every record against the known kinds; returns the kinds of keys seen for the first time."""
        new: dict[str, str] = {}
        for position, record in enumerate(records):
            for key, value in (record or {}).items():
                where = f"{field}[{position}].{key}"
                if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH:
                    raise InvalidArgument(
                        f"{field}[{position}] has key {key!r}; keys are non-empty strings of at most "
                        f"{MAX_KEY_LENGTH} characters",
                        field=f"{field}[{position}]",
                    )
                kind = kind_of(value, where)
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
            self._add_column(key, kind)

    def set_records(self, internal_ids: Sequence[int], records: Iterable[Mapping[str, Any] | None]) -> None:
        """Fills the columns of fresh internal ids (grow with ``ensure_capacity`` first)."""
        for internal_id, record in zip(internal_ids, records):
            for key, value in (record or {}).items():
                column = self.columns[key]
                kind = self.kinds[key]
                if kind == STRING:
                    vocabulary = self.vocabularies[key]
                    column[internal_id] = vocabulary.setdefault(value, len(vocabulary))
                elif kind == TIMESTAMP:
                    column[internal_id] = to_micros(value)
                else:
                    column[internal_id] = value

    def ensure_capacity(self, size: int) -> None:
        if size <= self.capacity:
            return
        capacity = max(size, 2 * self.capacity, 1024)
        for key, column in self.columns.items():
            grown = np.full(capacity, _missing(self.kinds[key]), dtype=column.dtype)
            grown[: len(column)] = column
            self.columns[key] = grown
        self.capacity = capacity

    def _add_column(self, key: str, kind: str) -> None:
        dtype = {STRING: np.int32, NUMBER: np.float64, TIMESTAMP: np.int64}[kind]
        self.columns[key] = np.full(self.capacity, _missing(kind), dtype=dtype)
        if kind == STRING:
            self.vocabularies[key] = {}

    # -- filters ----------------------------------------------------------

    def evaluate(self, conditions: Sequence[Condition], size: int, field: str = "filter") -> np.ndarray:
        """A bool mask over internal ids [0, size) of the records matching every condition.

        InvalidArgument for an unknown key, an unknown op or a value of the wrong kind.
        """
        checked = [self._check(condition, f"{field}.conditions[{i}]") for i, condition in enumerate(conditions)]
        mask = np.ones(size, dtype=bool)
        for condition, kind in checked:
            mask &= self._match(condition, kind, self.columns[condition.key][:size])
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
        mask = column != MISSING_TIME if kind == TIMESTAMP else ~np.isnan(column)
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


def _missing(kind: str) -> Any:
    return {STRING: -1, NUMBER: np.nan, TIMESTAMP: MISSING_TIME}[kind]
