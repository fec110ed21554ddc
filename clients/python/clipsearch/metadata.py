"""Conversions between ``clipsearch.common.v1`` metadata/filters and Python values."""

from __future__ import annotations

import datetime as dt
from typing import Any, Mapping

from google.protobuf import timestamp_pb2

from clipsearch.common.v1 import common_pb2
from clipsearch.errors import InvalidArgument

MetadataScalar = str | float | int | dt.datetime


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


def value_from_proto(value: common_pb2.MetadataValue) -> MetadataScalar | None:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        return value.number_value
    if kind == "timestamp_value":
        return value.timestamp_value.ToDatetime(tzinfo=dt.timezone.utc)
    return None


def metadata_to_proto(fields: Mapping[str, MetadataScalar] | None) -> common_pb2.Metadata:
    message = common_pb2.Metadata()
    for key, value in (fields or {}).items():
        message.fields[key].CopyFrom(value_to_proto(value))
    return message


def metadata_from_proto(message: common_pb2.Metadata) -> dict[str, MetadataScalar]:
    out: dict[str, MetadataScalar] = {}
    for key, value in message.fields.items():
        converted = value_from_proto(value)
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
