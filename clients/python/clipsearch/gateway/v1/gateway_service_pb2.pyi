import datetime

from clipsearch.common.v1 import common_pb2 as _common_pb2
from clipsearch.index.v1 import index_service_pb2 as _index_service_pb2
from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Aggregation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AGGREGATION_UNSPECIFIED: _ClassVar[Aggregation]
    AGGREGATION_MEAN: _ClassVar[Aggregation]
    AGGREGATION_MAX: _ClassVar[Aggregation]

class ImportState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMPORT_STATE_UNSPECIFIED: _ClassVar[ImportState]
    IMPORT_STATE_RUNNING: _ClassVar[ImportState]
    IMPORT_STATE_SUCCEEDED: _ClassVar[ImportState]
    IMPORT_STATE_FAILED: _ClassVar[ImportState]
    IMPORT_STATE_CANCELLED: _ClassVar[ImportState]

class RepairState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REPAIR_STATE_UNSPECIFIED: _ClassVar[RepairState]
    REPAIR_STATE_RUNNING: _ClassVar[RepairState]
    REPAIR_STATE_SUCCEEDED: _ClassVar[RepairState]
    REPAIR_STATE_FAILED: _ClassVar[RepairState]
AGGREGATION_UNSPECIFIED: Aggregation
AGGREGATION_MEAN: Aggregation
AGGREGATION_MAX: Aggregation
IMPORT_STATE_UNSPECIFIED: ImportState
IMPORT_STATE_RUNNING: ImportState
IMPORT_STATE_SUCCEEDED: ImportState
IMPORT_STATE_FAILED: ImportState
IMPORT_STATE_CANCELLED: ImportState
REPAIR_STATE_UNSPECIFIED: RepairState
REPAIR_STATE_RUNNING: RepairState
REPAIR_STATE_SUCCEEDED: RepairState
REPAIR_STATE_FAILED: RepairState

class QueryPart(_message.Message):
    __slots__ = ("text", "image_data", "image_id", "vector", "weight")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_DATA_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    text: str
    image_data: bytes
    image_id: str
    vector: bytes
    weight: float
    def __init__(self, text: _Optional[str] = ..., image_data: _Optional[bytes] = ..., image_id: _Optional[str] = ..., vector: _Optional[bytes] = ..., weight: _Optional[float] = ...) -> None: ...

class Feedback(_message.Message):
    __slots__ = ("positive_ids", "negative_ids", "positive_weight", "negative_weight")
    POSITIVE_IDS_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_IDS_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    positive_ids: _containers.RepeatedScalarFieldContainer[str]
    negative_ids: _containers.RepeatedScalarFieldContainer[str]
    positive_weight: float
    negative_weight: float
    def __init__(self, positive_ids: _Optional[_Iterable[str]] = ..., negative_ids: _Optional[_Iterable[str]] = ..., positive_weight: _Optional[float] = ..., negative_weight: _Optional[float] = ...) -> None: ...

class SearchImagesRequest(_message.Message):
    __slots__ = ("collection", "parts", "aggregation", "feedback", "top_k", "min_score", "filter", "diversity", "page_size", "page_token", "params", "read_mask", "url_ttl_seconds")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    DIVERSITY_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    READ_MASK_FIELD_NUMBER: _ClassVar[int]
    URL_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    parts: _containers.RepeatedCompositeFieldContainer[QueryPart]
    aggregation: Aggregation
    feedback: Feedback
    top_k: int
    min_score: float
    filter: _common_pb2.Filter
    diversity: float
    page_size: int
    page_token: str
    params: _common_pb2.SearchParams
    read_mask: _field_mask_pb2.FieldMask
    url_ttl_seconds: int
    def __init__(self, collection: _Optional[str] = ..., parts: _Optional[_Iterable[_Union[QueryPart, _Mapping]]] = ..., aggregation: _Optional[_Union[Aggregation, str]] = ..., feedback: _Optional[_Union[Feedback, _Mapping]] = ..., top_k: _Optional[int] = ..., min_score: _Optional[float] = ..., filter: _Optional[_Union[_common_pb2.Filter, _Mapping]] = ..., diversity: _Optional[float] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., params: _Optional[_Union[_common_pb2.SearchParams, _Mapping]] = ..., read_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ..., url_ttl_seconds: _Optional[int] = ...) -> None: ...

class SearchHit(_message.Message):
    __slots__ = ("id", "score", "metadata", "url")
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    id: str
    score: float
    metadata: _common_pb2.Metadata
    url: str
    def __init__(self, id: _Optional[str] = ..., score: _Optional[float] = ..., metadata: _Optional[_Union[_common_pb2.Metadata, _Mapping]] = ..., url: _Optional[str] = ...) -> None: ...

class SearchImagesResponse(_message.Message):
    __slots__ = ("hits", "next_page_token", "partial", "missing_shards")
    HITS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    MISSING_SHARDS_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[SearchHit]
    next_page_token: str
    partial: bool
    missing_shards: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, hits: _Optional[_Iterable[_Union[SearchHit, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., partial: _Optional[bool] = ..., missing_shards: _Optional[_Iterable[str]] = ...) -> None: ...

class BatchSearchImagesRequest(_message.Message):
    __slots__ = ("collection", "queries")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    collection: str
    queries: _containers.RepeatedCompositeFieldContainer[SearchImagesRequest]
    def __init__(self, collection: _Optional[str] = ..., queries: _Optional[_Iterable[_Union[SearchImagesRequest, _Mapping]]] = ...) -> None: ...

class BatchSearchResult(_message.Message):
    __slots__ = ("status", "hits", "partial", "missing_shards")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    MISSING_SHARDS_FIELD_NUMBER: _ClassVar[int]
    status: _common_pb2.ItemStatus
    hits: _containers.RepeatedCompositeFieldContainer[SearchHit]
    partial: bool
    missing_shards: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, status: _Optional[_Union[_common_pb2.ItemStatus, _Mapping]] = ..., hits: _Optional[_Iterable[_Union[SearchHit, _Mapping]]] = ..., partial: _Optional[bool] = ..., missing_shards: _Optional[_Iterable[str]] = ...) -> None: ...

class BatchSearchImagesResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[BatchSearchResult]
    def __init__(self, results: _Optional[_Iterable[_Union[BatchSearchResult, _Mapping]]] = ...) -> None: ...

class UploadItem(_message.Message):
    __slots__ = ("data", "metadata", "filename")
    DATA_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    metadata: _common_pb2.Metadata
    filename: str
    def __init__(self, data: _Optional[bytes] = ..., metadata: _Optional[_Union[_common_pb2.Metadata, _Mapping]] = ..., filename: _Optional[str] = ...) -> None: ...

class UploadImagesRequest(_message.Message):
    __slots__ = ("collection", "items")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    items: _containers.RepeatedCompositeFieldContainer[UploadItem]
    def __init__(self, collection: _Optional[str] = ..., items: _Optional[_Iterable[_Union[UploadItem, _Mapping]]] = ...) -> None: ...

class UploadResult(_message.Message):
    __slots__ = ("status", "id", "created", "metadata_updated")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    METADATA_UPDATED_FIELD_NUMBER: _ClassVar[int]
    status: _common_pb2.ItemStatus
    id: str
    created: bool
    metadata_updated: bool
    def __init__(self, status: _Optional[_Union[_common_pb2.ItemStatus, _Mapping]] = ..., id: _Optional[str] = ..., created: _Optional[bool] = ..., metadata_updated: _Optional[bool] = ...) -> None: ...

class UploadImagesResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[UploadResult]
    def __init__(self, results: _Optional[_Iterable[_Union[UploadResult, _Mapping]]] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("id", "url", "metadata", "size_bytes", "content_type")
    ID_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    id: str
    url: str
    metadata: _common_pb2.Metadata
    size_bytes: int
    content_type: str
    def __init__(self, id: _Optional[str] = ..., url: _Optional[str] = ..., metadata: _Optional[_Union[_common_pb2.Metadata, _Mapping]] = ..., size_bytes: _Optional[int] = ..., content_type: _Optional[str] = ...) -> None: ...

class GetImageRequest(_message.Message):
    __slots__ = ("collection", "id", "url_ttl_seconds")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    URL_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    id: str
    url_ttl_seconds: int
    def __init__(self, collection: _Optional[str] = ..., id: _Optional[str] = ..., url_ttl_seconds: _Optional[int] = ...) -> None: ...

class GetImageResponse(_message.Message):
    __slots__ = ("image",)
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    image: Image
    def __init__(self, image: _Optional[_Union[Image, _Mapping]] = ...) -> None: ...

class UpdateImageRequest(_message.Message):
    __slots__ = ("collection", "id", "metadata", "update_mask", "url_ttl_seconds")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    URL_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    id: str
    metadata: _common_pb2.Metadata
    update_mask: _field_mask_pb2.FieldMask
    url_ttl_seconds: int
    def __init__(self, collection: _Optional[str] = ..., id: _Optional[str] = ..., metadata: _Optional[_Union[_common_pb2.Metadata, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ..., url_ttl_seconds: _Optional[int] = ...) -> None: ...

class UpdateImageResponse(_message.Message):
    __slots__ = ("image",)
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    image: Image
    def __init__(self, image: _Optional[_Union[Image, _Mapping]] = ...) -> None: ...

class ListImagesRequest(_message.Message):
    __slots__ = ("collection", "page_size", "page_token", "url_ttl_seconds")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    URL_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    page_size: int
    page_token: str
    url_ttl_seconds: int
    def __init__(self, collection: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., url_ttl_seconds: _Optional[int] = ...) -> None: ...

class ListImagesResponse(_message.Message):
    __slots__ = ("images", "next_page_token")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    next_page_token: str
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteImageRequest(_message.Message):
    __slots__ = ("collection", "id")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    collection: str
    id: str
    def __init__(self, collection: _Optional[str] = ..., id: _Optional[str] = ...) -> None: ...

class DeleteImageResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ImportImagesRequest(_message.Message):
    __slots__ = ("collection", "source", "metadata")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    collection: str
    source: str
    metadata: _common_pb2.Metadata
    def __init__(self, collection: _Optional[str] = ..., source: _Optional[str] = ..., metadata: _Optional[_Union[_common_pb2.Metadata, _Mapping]] = ...) -> None: ...

class ImportError(_message.Message):
    __slots__ = ("source_key", "status")
    SOURCE_KEY_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    source_key: str
    status: _common_pb2.ItemStatus
    def __init__(self, source_key: _Optional[str] = ..., status: _Optional[_Union[_common_pb2.ItemStatus, _Mapping]] = ...) -> None: ...

class ImportJob(_message.Message):
    __slots__ = ("job_id", "collection", "source", "state", "total", "processed", "imported", "skipped", "failed", "errors", "create_time", "update_time", "listing_done")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    PROCESSED_FIELD_NUMBER: _ClassVar[int]
    IMPORTED_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    LISTING_DONE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    collection: str
    source: str
    state: ImportState
    total: int
    processed: int
    imported: int
    skipped: int
    failed: int
    errors: _containers.RepeatedCompositeFieldContainer[ImportError]
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    listing_done: bool
    def __init__(self, job_id: _Optional[str] = ..., collection: _Optional[str] = ..., source: _Optional[str] = ..., state: _Optional[_Union[ImportState, str]] = ..., total: _Optional[int] = ..., processed: _Optional[int] = ..., imported: _Optional[int] = ..., skipped: _Optional[int] = ..., failed: _Optional[int] = ..., errors: _Optional[_Iterable[_Union[ImportError, _Mapping]]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., listing_done: _Optional[bool] = ...) -> None: ...

class ImportImagesResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: ImportJob
    def __init__(self, job: _Optional[_Union[ImportJob, _Mapping]] = ...) -> None: ...

class ListImportJobsRequest(_message.Message):
    __slots__ = ("collection", "page_size", "page_token")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    collection: str
    page_size: int
    page_token: str
    def __init__(self, collection: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListImportJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[ImportJob]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[ImportJob, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelImportJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelImportJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: ImportJob
    def __init__(self, job: _Optional[_Union[ImportJob, _Mapping]] = ...) -> None: ...

class GetImportJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetImportJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: ImportJob
    def __init__(self, job: _Optional[_Union[ImportJob, _Mapping]] = ...) -> None: ...

class CreateCollectionRequest(_message.Message):
    __slots__ = ("name", "index_spec", "num_shards")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INDEX_SPEC_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    index_spec: str
    num_shards: int
    def __init__(self, name: _Optional[str] = ..., index_spec: _Optional[str] = ..., num_shards: _Optional[int] = ...) -> None: ...

class CreateCollectionResponse(_message.Message):
    __slots__ = ("collection",)
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    collection: _index_service_pb2.Collection
    def __init__(self, collection: _Optional[_Union[_index_service_pb2.Collection, _Mapping]] = ...) -> None: ...

class GetCollectionRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetCollectionResponse(_message.Message):
    __slots__ = ("collection",)
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    collection: _index_service_pb2.Collection
    def __init__(self, collection: _Optional[_Union[_index_service_pb2.Collection, _Mapping]] = ...) -> None: ...

class ListCollectionsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListCollectionsResponse(_message.Message):
    __slots__ = ("collections", "next_page_token")
    COLLECTIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    collections: _containers.RepeatedCompositeFieldContainer[_index_service_pb2.Collection]
    next_page_token: str
    def __init__(self, collections: _Optional[_Iterable[_Union[_index_service_pb2.Collection, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteCollectionRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteCollectionResponse(_message.Message):
    __slots__ = ("pending", "waiting_for_shards")
    PENDING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FOR_SHARDS_FIELD_NUMBER: _ClassVar[int]
    pending: bool
    waiting_for_shards: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, pending: _Optional[bool] = ..., waiting_for_shards: _Optional[_Iterable[str]] = ...) -> None: ...

class RepairCollectionRequest(_message.Message):
    __slots__ = ("collection", "dry_run")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    collection: str
    dry_run: bool
    def __init__(self, collection: _Optional[str] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class RepairCollectionResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: RepairJob
    def __init__(self, job: _Optional[_Union[RepairJob, _Mapping]] = ...) -> None: ...

class GetRepairJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetRepairJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: RepairJob
    def __init__(self, job: _Optional[_Union[RepairJob, _Mapping]] = ...) -> None: ...

class RepairJob(_message.Message):
    __slots__ = ("job_id", "collection", "dry_run", "state", "checked", "reindexed", "dropped", "removed", "failed", "dropped_ids", "errors", "create_time", "update_time")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CHECKED_FIELD_NUMBER: _ClassVar[int]
    REINDEXED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_IDS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    collection: str
    dry_run: bool
    state: RepairState
    checked: int
    reindexed: int
    dropped: int
    removed: int
    failed: int
    dropped_ids: _containers.RepeatedScalarFieldContainer[str]
    errors: _containers.RepeatedCompositeFieldContainer[ImportError]
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    def __init__(self, job_id: _Optional[str] = ..., collection: _Optional[str] = ..., dry_run: _Optional[bool] = ..., state: _Optional[_Union[RepairState, str]] = ..., checked: _Optional[int] = ..., reindexed: _Optional[int] = ..., dropped: _Optional[int] = ..., removed: _Optional[int] = ..., failed: _Optional[int] = ..., dropped_ids: _Optional[_Iterable[str]] = ..., errors: _Optional[_Iterable[_Union[ImportError, _Mapping]]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
