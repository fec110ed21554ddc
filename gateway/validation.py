"""Every check of a gateway request, in one place. Each failure is an
InvalidArgument naming the field and saying what to send instead."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from clipsearch.errors import InvalidArgument
from clipsearch.image_formats import ACCEPTED_DESCRIPTION, sniff_content_type
from clipsearch.metadata import MetadataLimits, check_metadata_limits
from clipsearch.names import check_collection_name, check_image_id
from clipsearch.paging import clamp_page_size

from gateway.types import (
    AGGREGATION_MAX, AGGREGATION_MEAN, HIT_FIELDS, Condition, Feedback, Metadata, QueryPart, SearchRequest,
    UploadItem,
)

__all__ = ["check_collection_name", "check_image_id", "clamp_page_size"]

MAX_TOP_K = 1000
DEFAULT_TOP_K = 10
MAX_PAGE_SIZE = 1000
DEFAULT_LIST_PAGE_SIZE = 100
MAX_TEXT_CHARS = 4096
DEFAULT_POSITIVE_WEIGHT = 0.75
DEFAULT_NEGATIVE_WEIGHT = 0.25
RANGE_BOUNDS = ("gte", "gt", "lte", "lt")


@dataclass
class SearchPlan:
    """A checked search request with its defaults filled in."""

    top_k: int
    page_size: int
    positive_weight: float
    negative_weight: float
    part_weights: list[float]


def check_search(request: SearchRequest) -> SearchPlan:
    if not request.parts:
        raise InvalidArgument(
            "the query is empty: give at least one part (text, image_data, image_id or vector)", field="parts"
        )
    top_k = request.top_k or DEFAULT_TOP_K
    if top_k > MAX_TOP_K:
        raise InvalidArgument(f"top_k must be at most {MAX_TOP_K}, got {request.top_k}", field="top_k")
    page_size = min(clamp_page_size(request.page_size, top_k, MAX_PAGE_SIZE), top_k)
    if not math.isfinite(request.diversity) or not 0.0 <= request.diversity <= 1.0:
        raise InvalidArgument(f"diversity must be in [0, 1], got {request.diversity}", field="diversity")
    if request.min_score is not None and not math.isfinite(request.min_score):
        raise InvalidArgument("min_score must be a finite number", field="min_score")
    if request.aggregation not in (AGGREGATION_MEAN, AGGREGATION_MAX):
        raise InvalidArgument(f"unknown aggregation {request.aggregation}; use MEAN or MAX", field="aggregation")
    unknown = request.hit_fields - HIT_FIELDS
    if unknown:
        raise InvalidArgument(
            f"read_mask names {', '.join(sorted(unknown))}, which search hits do not have; use any of "
            f"{', '.join(sorted(HIT_FIELDS))}", field="read_mask",
        )
    check_filter(request.filter)
    for i, part in enumerate(request.parts):
        check_query_part(part, f"parts[{i}]")
    weights = [part_weight(part.weight, f"parts[{i}].weight") for i, part in enumerate(request.parts)]
    feedback = request.feedback
    check_feedback_ids(feedback)
    return SearchPlan(
        top_k=top_k,
        page_size=page_size,
        positive_weight=feedback_weight(feedback.positive_weight, DEFAULT_POSITIVE_WEIGHT, "feedback.positive_weight"),
        negative_weight=feedback_weight(feedback.negative_weight, DEFAULT_NEGATIVE_WEIGHT, "feedback.negative_weight"),
        part_weights=weights,
    )


def check_query_part(part: QueryPart, at: str) -> None:
    sources = [name for name in ("text", "image_data", "image_id", "vector") if getattr(part, name) is not None]
    if not sources:
        raise InvalidArgument(f"{at} is empty: set one of text, image_data, image_id or vector", field=at)
    if part.text is not None:
        check_text(part.text, f"{at}.text")
    if part.image_id is not None:
        check_image_id(part.image_id, f"{at}.image_id")


def check_text(text: str, field: str) -> None:
    if not text.strip():
        raise InvalidArgument(f"{field} is blank", field=field)
    if len(text) > MAX_TEXT_CHARS:
        raise InvalidArgument(f"{field} has {len(text)} characters; the limit is {MAX_TEXT_CHARS}", field=field)


def part_weight(weight: float, field: str) -> float:
    """The effective weight of a query part: zero means 1."""
    if not math.isfinite(weight):
        raise InvalidArgument(f"{field} must be a finite number", field=field)
    return 1.0 if weight == 0 else float(weight)


def feedback_weight(value: float, default: float, field: str) -> float:
    if not math.isfinite(value) or value < 0:
        raise InvalidArgument(f"{field} must be a finite number >= 0", field=field)
    return value or default


def check_feedback_ids(feedback: Feedback) -> None:
    for name in ("positive_ids", "negative_ids"):
        for j, image_id in enumerate(getattr(feedback, name)):
            check_image_id(image_id, f"feedback.{name}[{j}]")


def check_filter(conditions: Sequence[Condition], field: str = "filter") -> None:
    """Rejects malformed filters before they reach the shards (which check them too)."""
    for i, condition in enumerate(conditions):
        at = f"{field}.conditions[{i}]"
        if not condition.key:
            raise InvalidArgument(f"{at}.key is empty; name the metadata key to filter on", field=f"{at}.key")
        if condition.equals is None and condition.in_set is None and condition.range is None:
            raise InvalidArgument(f"{at} sets no condition; use equals, in_set or range", field=at)
        if condition.in_set is not None:
            if not condition.in_set:
                raise InvalidArgument(f"{at}.in_set is empty, so nothing could match", field=f"{at}.in_set")
            for j, value in enumerate(condition.in_set):
                if value is None:
                    raise InvalidArgument(f"{at}.in_set.values[{j}] has no value set", field=f"{at}.in_set.values[{j}]")
        if condition.range is not None:
            bounds = condition.range
            if not bounds:
                raise InvalidArgument(f"{at}.range sets no bound; use gte, gt, lte or lt", field=f"{at}.range")
            kinds = set()
            for name, value in bounds.items():
                if value is None or isinstance(value, str):
                    raise InvalidArgument(f"{at}.range.{name} must be a number or a timestamp",
                                          field=f"{at}.range.{name}")
                kinds.add(type(value) is float)
            if len(kinds) > 1:
                raise InvalidArgument(f"{at}.range mixes numbers and timestamps", field=f"{at}.range")


def check_metadata(metadata: Metadata, field: str, limits: MetadataLimits | None = None) -> None:
    """Values must be set; with ``limits``, keys, values and the whole must fit them. ``field``
    names the item ("items[3]"), or is empty where the request's own ``metadata`` is meant."""
    field = f"{field}.metadata" if field else "metadata"
    for key, value in metadata.items():
        if not key:
            raise InvalidArgument(f"{field} has an empty key", field=field)
        if value is None:
            raise InvalidArgument(f"{field}[{key!r}] has no value set", field=field)
    if limits is not None:
        check_metadata_limits(metadata, limits, field)


def check_image_bytes(data: bytes, max_bytes: int, field: str) -> str:
    """The content type of ``data``; InvalidArgument when empty, too large or not an accepted format."""
    if not data:
        raise InvalidArgument(f"{field} is empty", field=field)
    if len(data) > max_bytes:
        raise InvalidArgument(f"{field} is {len(data)} bytes; the limit is {max_bytes}", field=field,
                              reason="IMAGE_TOO_LARGE")
    content_type = sniff_content_type(data)
    if content_type is None:
        raise InvalidArgument(f"{field} is not a {ACCEPTED_DESCRIPTION} image", field=field,
                              reason="UNSUPPORTED_IMAGE")
    return content_type


def check_upload(items: Sequence[UploadItem], max_items: int, field: str = "items") -> None:
    check_count(len(items), max_items, field, "image")


def check_count(count: int, max_items: int, field: str, what: str) -> None:
    """A batch of ``count`` items: at least one, at most ``max_items``."""
    if not count:
        raise InvalidArgument(f"{field} is empty: send at least one {what}", field=field)
    if count > max_items:
        raise InvalidArgument(f"{count} {field} in one call; the limit is {max_items}", field=field)


def url_ttl(requested: int, settings, field: str = "url_ttl_seconds") -> int:
    """The lifetime of presigned URLs for a request: 0 = the gateway's default, at most its maximum."""
    if requested > settings.max_url_ttl_seconds:
        raise InvalidArgument(f"{field} {requested} is above this gateway's maximum of "
                              f"{settings.max_url_ttl_seconds} seconds", field=field)
    return requested or settings.url_ttl_seconds
