"""Conversions between ``clipsearch.common.v1`` metadata/filters and Python values,
and the limits on metadata that the gateway and the index both enforce."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any, Mapping, Sequence

from google.protobuf import timestamp_pb2

from clipsearch.common.v1 import common_pb2
from clipsearch.errors import InvalidArgument

MetadataScalar = str | float | int | dt.datetime

# google.protobuf.Timestamp's range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z.
MIN_TIMESTAMP_SECONDS = -62_135_596_800
MAX_TIMESTAMP_SECONDS = 253_402_300_799
NUMBER_BYTES = 8  # what a number or a timestamp counts for in the byte limits


@dataclasses.dataclass(frozen=True)
class MetadataLimits:
    """Limits on the metadata of one item, and on the keys of one collection.

    Sizes are UTF-8 bytes; a number or a timestamp value counts 8 bytes. An item's
    bytes are the sum of its keys' and values' bytes.
    """

    max_keys_per_item: int = 64
    max_key_bytes: int = 128
    max_value_bytes: int = 4096
    max_item_bytes: int = 16384
    max_collection_keys: int = 1024  # distinct (filterable) keys of one collection, on one index shard


def value_bytes(value: Any) -> int:
    return len(value.encode()) if isinstance(value, str) else NUMBER_BYTES


def check_metadata_limits(record: Mapping[str, Any], limits: MetadataLimits, field: str) -> None:
    """InvalidArgument naming ``field`` (the item's metadata) when ``record`` breaks a limit."""
    if len(record) > limits.max_keys_per_item:
        raise InvalidArgument(
            f"{field} has {len(record)} keys; the limit is {limits.max_keys_per_item} keys per item",
            field=field, reason="METADATA_TOO_MANY_KEYS")
    total = 0
    for key, value in record.items():
        key_bytes = len(key.encode()) if isinstance(key, str) else 0
        if not key_bytes or key_bytes > limits.max_key_bytes:
            raise InvalidArgument(
                f"{field} has a key of {key_bytes} bytes ({str(key)[:32]!r}); keys are 1 to "
                f"{limits.max_key_bytes} bytes (the limit)", field=field, reason="METADATA_KEY_TOO_LONG")
        size = value_bytes(value)
        if size > limits.max_value_bytes:
            raise InvalidArgument(
                f"{field}.{key} is {size} bytes; the limit is {limits.max_value_bytes} bytes per value",
                field=f"{field}.{key}", reason="METADATA_VALUE_TOO_LARGE")
        total += key_bytes + size
    if total > limits.max_item_bytes:
        raise InvalidArgument(
            f"{field} is {total} bytes (keys and values); the limit is {limits.max_item_bytes} bytes per item",
            field=field, reason="METADATA_TOO_LARGE")


def metadata_bytes(record: Mapping[str, Any] | None) -> int:
    """The size of ``record`` as the limits count it."""
    return sum(len(key.encode()) + value_bytes(value) for key, value in (record or {}).items())


def select_keys(record: Mapping[str, Any] | None, keys: Sequence[str] | frozenset[str] | None) -> dict | None:
    """``record`` with only ``keys`` (all of it when ``keys`` is None)."""
    if record is None or keys is None:
        return None if record is None else dict(record)
    return {key: value for key, value in record.items() if key in keys}


def value_to_proto(value: MetadataScalar) -> common_pb2.MetadataValue:
    if isinstance(value, bool):
        raise TypeError("metadata values are strings, numbers or datetimes; got a bool")
    if isinstance(value, str):
        return common_pb2.MetadataValue(string_value=value)
    if isinstance(value, (int, float)):
        return common_pb2.MetadataValue(number_value=float(value))
    if isinstance(value, dt.datetime):
        ts = timestamp_pb2.Timestamp()
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        ts.FromDatetime(value)
        return common_pb2.MetadataValue(timestamp_value=ts)
    raise TypeError(f"unsupported metadata value {value!r}: use str, int, float or datetime")


def value_from_proto(value: common_pb2.MetadataValue, field: str = "value") -> MetadataScalar | None:
    """The Python value; None when nothing is set. InvalidArgument naming ``field`` for a
    timestamp outside 0001-01-01..9999-12-31 or with nanos outside [0, 1e9)."""
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        return value.number_value
    if kind == "timestamp_value":
        ts = value.timestamp_value
        if not MIN_TIMESTAMP_SECONDS <= ts.seconds <= MAX_TIMESTAMP_SECONDS or not 0 <= ts.nanos < 1_000_000_000:
            raise InvalidArgument(
                f"{field} is out of range (seconds={ts.seconds}, nanos={ts.nanos}); timestamps run from "
                "0001-01-01 to 9999-12-31 UTC with nanos in [0, 999999999]", field=field)
        return ts.ToDatetime(tzinfo=dt.timezone.utc)
    return None


def metadata_to_proto(fields: Mapping[str, MetadataScalar] | None) -> common_pb2.Metadata:
    message = common_pb2.Metadata()
    for key, value in (fields or {}).items():
        message.fields[key].CopyFrom(value_to_proto(value))
    return message


def metadata_from_proto(message: common_pb2.Metadata) -> dict[str, MetadataScalar]:
    out: dict[str, MetadataScalar] = {}
    for key, value in message.fields.items():
        converted = value_from_proto(value, f"metadata.{key}")
        if converted is None:
            raise InvalidArgument(f"metadata field {key!r} has no value set", field=f"metadata.{key}")
        out[key] = converted
    return out


def filter_to_proto(spec: Mapping[str, Any] | None) -> common_pb2.Filter:
    """A Filter from a dict: ``{"color": "red", "size": ["s", "m"], "w": {"gte": 3}}``.

    A scalar means equals, a list or tuple means in-set, and a dict with keys among
    gte/gt/lte/lt means a range.
    """
    message = common_pb2.Filter()
    for key, cond in (spec or {}).items():
        condition = message.conditions.add(key=key)
        if isinstance(cond, Mapping):
            unknown = set(cond) - {"gte", "gt", "lte", "lt"}
            if unknown:
                raise ValueError(f"unknown range bounds {sorted(unknown)} for {key!r}; use gte, gt, lte, lt")
            for bound, value in cond.items():
                getattr(condition.range, bound).CopyFrom(value_to_proto(value))
        elif isinstance(cond, (list, tuple, set, frozenset)):
            condition.in_set.values.extend(value_to_proto(v) for v in cond)
        else:
            condition.equals.CopyFrom(value_to_proto(cond))
    return message
