"""Plain request and result types of the gateway engine.

The servicer turns protos into these and back; nothing behind it imports a
proto module. Metadata is a dict of str -> str | float | datetime; a value of
None stands for a proto value with nothing set, which validation refuses.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Optional, Union

MetadataValue = Union[str, float, dt.datetime]
Metadata = dict[str, Optional[MetadataValue]]

AGGREGATION_MEAN = "mean"
AGGREGATION_MAX = "max"

JOB_RUNNING = "running"
JOB_SUCCEEDED = "succeeded"
JOB_FAILED = "failed"
JOB_CANCELLED = "cancelled"

HIT_FIELDS = frozenset({"id", "score", "url", "metadata"})


@dataclass(frozen=True)
class Condition:
    """One filter condition; exactly one of equals, in_set and range is set."""

    key: str
    equals: MetadataValue | None = None
    in_set: tuple[MetadataValue | None, ...] | None = None
    range: dict[str, MetadataValue | None] | None = None  # bounds among gte, gt, lte, lt


@dataclass
class QueryPart:
    """One part of a query: exactly one of the sources is set."""

    text: str | None = None
    image_data: bytes | None = None
    image_id: str | None = None
    vector: bytes | None = None  # packed little-endian float32
    weight: float = 0.0  # zero means 1


@dataclass
class Feedback:
    positive_ids: list[str] = field(default_factory=list)
    negative_ids: list[str] = field(default_factory=list)
    positive_weight: float = 0.0
    negative_weight: float = 0.0


@dataclass
class SearchRequest:
    collection: str = ""
    parts: list[QueryPart] = field(default_factory=list)
    aggregation: str = AGGREGATION_MEAN
    feedback: Feedback = field(default_factory=Feedback)
    top_k: int = 0
    min_score: float | None = None
    filter: list[Condition] = field(default_factory=list)
    diversity: float = 0.0
    page_size: int = 0
    page_token: str = ""
    nprobe: int = 0
    ef_search: int = 0
    hit_fields: frozenset[str] = HIT_FIELDS  # the read mask
    metadata_keys: tuple[str, ...] | None = None  # read mask paths "metadata.<key>", sorted; None = every key
    url_ttl_seconds: int = 0  # 0 = the gateway's url_ttl_seconds


@dataclass
class Hit:
    id: str
    score: float
    url: str = ""
    metadata: Metadata | None = None


@dataclass
class SearchResult:
    hits: list[Hit]
    next_page_token: str = ""
    missing_shards: list[str] = field(default_factory=list)


@dataclass
class BatchSearchItem:
    """One query's outcome in a batch search: a result, or the error of that query alone."""

    result: SearchResult | None = None
    error: Exception | None = None  # a ClipsearchError, or None when OK


@dataclass
class UploadItem:
    data: bytes
    metadata: Metadata = field(default_factory=dict)
    filename: str = ""
    source: str = ""  # the import source it came from, kept as metadata "source"


@dataclass
class UploadResult:
    error: Exception | None = None  # a ClipsearchError, or None when OK
    id: str = ""
    created: bool = False
    metadata_updated: bool = False  # the bytes were already indexed and the item's metadata changed theirs


@dataclass
class Image:
    id: str
    url: str
    metadata: Metadata = field(default_factory=dict)
    size_bytes: int = 0
    content_type: str = ""


@dataclass
class CollectionInfo:
    name: str
    dim: int
    metric: str  # "ip" or "l2"
    index_spec: str
    num_shards: int
    model_fingerprint: str
    vector_count: int = 0
    trained: bool = False
    memory_bytes: int = 0
    snapshot_age_seconds: float = -1.0
    sequence: int = 0
    uid: str = ""  # identity: new when the collection is created again (its shards' uids, in shard order)


@dataclass
class CollectionDeletion:
    pending: bool = False
    waiting_for_shards: list[str] = field(default_factory=list)


@dataclass
class JobError:
    key: str
    code: str  # a grpc.StatusCode name
    message: str


@dataclass
class ImportJob:
    job_id: str
    collection: str
    source: str
    state: str = JOB_RUNNING
    total: int = 0
    processed: int = 0
    imported: int = 0
    skipped: int = 0
    failed: int = 0
    errors: list[JobError] = field(default_factory=list)
    create_time: float = 0.0
    update_time: float = 0.0
    listing_done: bool = False


@dataclass
class RepairJob:
    job_id: str
    collection: str
    dry_run: bool = False
    state: str = JOB_RUNNING
    checked: int = 0
    reindexed: int = 0
    dropped: int = 0
    removed: int = 0
    failed: int = 0
    dropped_ids: list[str] = field(default_factory=list)
    errors: list[JobError] = field(default_factory=list)
    create_time: float = 0.0
    update_time: float = 0.0
