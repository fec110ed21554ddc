"""The Python SDK: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

    from clipsearch.client import Client

    with Client("127.0.0.1:50050", api_key="...") as client:
        client.upload_file("cat.jpg", metadata={"album": "pets"})
        for hit in client.search(text="a cat on a sofa", top_k=5, filter={"album": "pets"}):
            print(hit.score, hit.id, hit.url)

Both clients have the same methods; on ``AsyncClient`` they are awaited.
Results are plain dataclasses. Failed calls raise ``clipsearch.errors``
exceptions (``InvalidArgument``, ``NotFound``, ``Unauthenticated``, ...) that
carry the gRPC ``code`` name, the server's message, and the request ``field``
and ``reason`` the server named. Idempotent calls are
retried on ``UNAVAILABLE`` with exponential backoff, and every call has a deadline.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import grpc
import numpy as np

from clipsearch.gateway.v1 import gateway_service_pb2 as pb
from clipsearch.gateway.v1 import gateway_service_pb2_grpc
from clipsearch.index.v1 import index_service_pb2
from clipsearch.item_status import OK, code_name
from clipsearch.metadata import MetadataScalar, filter_to_proto, metadata_from_proto, metadata_to_proto
from clipsearch.status import error_from_rpc
from clipsearch.vectors import pack_vector

DEFAULT_TARGET = "127.0.0.1:50050"
SERVICE = "clipsearch.gateway.v1.GatewayService"
# Retried by the channel on UNAVAILABLE: reads and idempotent writes (uploads are
# content-addressed, imports are keyed by source).
IDEMPOTENT_METHODS = [
    "SearchImages", "BatchSearchImages", "GetImage", "ListImages", "GetImportJob", "ListImportJobs",
    "CancelImportJob", "GetCollection", "ListCollections",
    "UploadImages", "ImportImages", "DeleteImage", "UpdateImage", "RepairCollection", "GetRepairJob",
]
# SearchHit fields a search returns when metadata is not wanted (read_mask).
HIT_FIELDS_WITHOUT_METADATA = ["id", "score", "url"]


@dataclasses.dataclass
class SearchHit:
    id: str
    score: float
    url: str
    metadata: dict[str, MetadataScalar]


@dataclasses.dataclass
class SearchResults:
    hits: list[SearchHit]
    next_page_token: str = ""
    partial: bool = False
    missing_shards: list[str] = dataclasses.field(default_factory=list)
    # In a batch search: None when the query succeeded; otherwise the gRPC code name and message.
    error_code: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error_code is None

    def __iter__(self) -> Iterator[SearchHit]:
        return iter(self.hits)

    def __len__(self) -> int:
        return len(self.hits)

    def __getitem__(self, index: int) -> SearchHit:
        return self.hits[index]


@dataclasses.dataclass
class Image:
    id: str
    url: str
    metadata: dict[str, MetadataScalar]
    size_bytes: int
    content_type: str


@dataclasses.dataclass
class ImagePage:
    images: list[Image]
    next_page_token: str


@dataclasses.dataclass
class UploadResult:
    id: str
    created: bool
    # None when the item succeeded; otherwise the gRPC code name and message.
    error_code: str | None = None
    error: str | None = None
    # The bytes were already stored and this item's metadata was merged into theirs.
    metadata_updated: bool = False

    @property
    def ok(self) -> bool:
        return self.error_code is None


class _Job:
    state: str  # RUNNING, SUCCEEDED, FAILED (or CANCELLED, imports)

    @property
    def done(self) -> bool:
        return self.state in ("SUCCEEDED", "FAILED", "CANCELLED")


@dataclasses.dataclass
class ImportJob(_Job):
    job_id: str
    collection: str
    source: str
    state: str  # RUNNING, SUCCEEDED, FAILED
    total: int
    processed: int
    imported: int
    skipped: int
    failed: int
    listing_done: bool
    errors: list[tuple[str, str]]


@dataclasses.dataclass
class RepairJob(_Job):
    """A server-side repair of one collection (``Client.repair``); counts grow while it runs."""

    job_id: str
    collection: str
    dry_run: bool
    state: str  # RUNNING, SUCCEEDED, FAILED
    checked: int
    reindexed: int
    dropped: int
    removed: int
    failed: int
    # The first index entries dropped because their image was gone: upload them again.
    dropped_ids: list[str]
    # (id, message) for the first ids that could not be fixed.
    errors: list[tuple[str, str]]
    create_time: datetime.datetime | None = None
    update_time: datetime.datetime | None = None


@dataclasses.dataclass
class CollectionDeletion:
    """``pending``: some index shards were unreachable; the gateway finishes the
    deletion when they return (``waiting_for_shards`` names them)."""

    pending: bool
    waiting_for_shards: list[str]


@dataclasses.dataclass
class Collection:
    name: str
    dim: int
    metric: str
    index_spec: str
    num_shards: int
    model_fingerprint: str
    vector_count: int
    trained: bool
    memory_bytes: int
    snapshot_age_seconds: float
    uid: str = ""  # identity: new when the collection is deleted and created again


@dataclasses.dataclass
class Query:
    """One part of a multi-part query; build with the class methods."""

    part: pb.QueryPart

    @classmethod
    def text(cls, text: str, weight: float = 1.0) -> "Query":
        return cls(pb.QueryPart(text=text, weight=weight))

    @classmethod
    def image(cls, image: bytes | str | Path, weight: float = 1.0) -> "Query":
        return cls(pb.QueryPart(image_data=_image_bytes(image), weight=weight))

    @classmethod
    def image_id(cls, image_id: str, weight: float = 1.0) -> "Query":
        return cls(pb.QueryPart(image_id=image_id, weight=weight))

    @classmethod
    def vector(cls, vector: Sequence[float] | np.ndarray, weight: float = 1.0) -> "Query":
        return cls(pb.QueryPart(vector=pack_vector(np.asarray(vector, dtype=np.float32)), weight=weight))


def _image_bytes(image: bytes | str | Path) -> bytes:
    return image if isinstance(image, (bytes, bytearray)) else Path(image).read_bytes()


# -- request builders and response parsers, shared by both clients ---------------

def _search_request(collection: str, *, text=None, image=None, image_id=None, vector=None, parts=None,
                    aggregation="mean", positive_ids=(), negative_ids=(), top_k=10, min_score=None,
                    filter=None, diversity=0.0, page_size=0, page_token="", nprobe=0, ef_search=0,
                    with_metadata=True):
    query = [Query.text(text)] if text is not None else []
    if image is not None:
        query.append(Query.image(image))
    if image_id is not None:
        query.append(Query.image_id(image_id))
    if vector is not None:
        query.append(Query.vector(vector))
    query.extend(parts or ())
    aggregations = {"mean": pb.AGGREGATION_MEAN, "max": pb.AGGREGATION_MAX}
    if aggregation not in aggregations:
        raise ValueError(f"aggregation must be 'mean' or 'max', got {aggregation!r}")
    request = pb.SearchImagesRequest(
        collection=collection, parts=[q.part for q in query], aggregation=aggregations[aggregation],
        top_k=top_k, filter=filter_to_proto(filter), diversity=diversity, page_size=page_size,
        page_token=page_token,
    )
    request.params.nprobe, request.params.ef_search = nprobe, ef_search
    if min_score is not None:
        request.min_score = min_score
    if positive_ids or negative_ids:
        request.feedback.positive_ids.extend(positive_ids)
        request.feedback.negative_ids.extend(negative_ids)
    if not with_metadata:
        request.read_mask.paths.extend(HIT_FIELDS_WITHOUT_METADATA)
    return request


def _parse_search(response) -> SearchResults:
    return SearchResults(
        hits=[SearchHit(h.id, h.score, h.url, metadata_from_proto(h.metadata)) for h in response.hits],
        next_page_token=getattr(response, "next_page_token", ""), partial=response.partial,
        missing_shards=list(response.missing_shards),
    )


def _parse_batch_search(response) -> list[SearchResults]:
    return [_parse_search(r) if r.status.code == OK else
            SearchResults([], error_code=code_name(r.status.code), error=r.status.message)
            for r in response.results]


def _parse_image(image) -> Image:
    return Image(image.id, image.url, metadata_from_proto(image.metadata), image.size_bytes, image.content_type)


def _parse_upload(response) -> list[UploadResult]:
    results = []
    for item in response.results:
        if item.status.code == OK:
            results.append(UploadResult(item.id, item.created, metadata_updated=item.metadata_updated))
        else:
            results.append(UploadResult(item.id, False, code_name(item.status.code), item.status.message))
    return results


def _job_errors(job) -> list[tuple[str, str]]:
    return [(e.source_key, e.status.message) for e in job.errors]


def _parse_job(job) -> ImportJob:
    return ImportJob(
        job_id=job.job_id, collection=job.collection, source=job.source,
        state=pb.ImportState.Name(job.state).removeprefix("IMPORT_STATE_"), total=job.total,
        processed=job.processed, imported=job.imported, skipped=job.skipped, failed=job.failed,
        listing_done=job.listing_done, errors=_job_errors(job),
    )


def _time(job, field: str) -> datetime.datetime | None:
    return getattr(job, field).ToDatetime(tzinfo=datetime.timezone.utc) if job.HasField(field) else None


def _parse_repair_job(job) -> RepairJob:
    return RepairJob(
        job_id=job.job_id, collection=job.collection, dry_run=job.dry_run,
        state=pb.RepairState.Name(job.state).removeprefix("REPAIR_STATE_"), checked=job.checked,
        reindexed=job.reindexed, dropped=job.dropped, removed=job.removed, failed=job.failed,
        dropped_ids=list(job.dropped_ids), errors=_job_errors(job),
        create_time=_time(job, "create_time"), update_time=_time(job, "update_time"),
    )


def _parse_collection(c) -> Collection:
    return Collection(
        name=c.name, dim=c.dim, metric=index_service_pb2.Metric.Name(c.metric).removeprefix("METRIC_"),
        index_spec=c.index_spec, num_shards=c.num_shards, model_fingerprint=c.model_fingerprint,
        vector_count=c.vector_count, trained=c.trained, memory_bytes=c.memory_bytes,
        snapshot_age_seconds=c.snapshot_age_seconds, uid=c.uid,
    )


def _upload_items(items: Sequence[tuple[bytes, Mapping[str, MetadataScalar] | None, str]]):
    return [pb.UploadItem(data=data, metadata=metadata_to_proto(meta), filename=name) for data, meta, name in items]


UPLOAD_BATCH_ITEMS = 64  # files per UploadImages call (the gateway allows max_upload_items, 256 by default)
UPLOAD_BATCH_BYTES = 32 * 1024 * 1024  # bytes per call, under the 64 MiB message limit


def _batches(items: Sequence[tuple[bytes, Any, str]], max_items: int) -> list[list]:
    """``items`` in order, cut into lists of at most ``max_items`` and about UPLOAD_BATCH_BYTES."""
    batches: list[list] = [[]]
    size = 0
    for item in items:
        if batches[-1] and (len(batches[-1]) >= max_items or size + len(item[0]) > UPLOAD_BATCH_BYTES):
            batches.append([])
            size = 0
        batches[-1].append(item)
        size += len(item[0])
    return batches


def _service_config(retries: int) -> str:
    return json.dumps({"methodConfig": [{
        "name": [{"service": SERVICE, "method": m} for m in IDEMPOTENT_METHODS],
        "retryPolicy": {
            "maxAttempts": max(2, retries + 1), "initialBackoff": "0.1s", "maxBackoff": "2s",
            "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"],
        },
    }]})


@dataclasses.dataclass
class TlsConfig:
    """TLS to the gateway: a CA bundle to trust (None = system roots) and an optional client certificate."""

    root_certificates: bytes | None = None
    client_certificate: bytes | None = None
    client_key: bytes | None = None


def _channel_args(target: str, tls: bool | TlsConfig, retries: int):
    options = [
        ("grpc.service_config", _service_config(retries)),
        ("grpc.enable_retries", 1),
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ]
    if not tls:
        return None, options
    config = tls if isinstance(tls, TlsConfig) else TlsConfig()
    return grpc.ssl_channel_credentials(config.root_certificates, config.client_key, config.client_certificate), options


class _ClientBase:
    """Every public method, written once. ``_call`` is blocking in ``Client`` and
    returns an awaitable in ``AsyncClient``."""

    def __init__(self, target: str = DEFAULT_TARGET, *, api_key: str | None = None, tls: bool | TlsConfig = False,
                 collection: str = "", timeout: float = 30.0, retries: int = 3):
        self.target = target
        self.collection = collection
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._credentials, self._options = _channel_args(target, tls, retries)

    def _call(self, method: str, request, parse: Callable[[Any], Any], timeout: float | None = None):
        raise NotImplementedError

    def _call_each(self, method: str, requests: Sequence, parse: Callable[[Any], Any],
                   combine: Callable[[list], Any], timeout: float | None = None):
        """The calls one after another; ``combine`` of their parsed results."""
        raise NotImplementedError

    def _collection(self, collection: str | None) -> str:
        return self.collection if collection is None else collection

    def search(self, text: str | None = None, *, image: bytes | str | Path | None = None, image_id: str | None = None,
               vector: Sequence[float] | np.ndarray | None = None, parts: Sequence[Query] = (),
               aggregation: str = "mean", positive_ids: Sequence[str] = (), negative_ids: Sequence[str] = (),
               top_k: int = 10, min_score: float | None = None, filter: Mapping[str, Any] | None = None,
               diversity: float = 0.0, page_size: int = 0, page_token: str = "", nprobe: int = 0,
               ef_search: int = 0, collection: str | None = None, with_metadata: bool = True):
        """Search by text, image (path or bytes), stored image id, raw vector, or several ``parts``
        (combined by ``aggregation``: "mean" or "max"). ``filter``: {"key": value | [values] |
        {"gte": x, "lt": y}}. Feedback: ``positive_ids`` / ``negative_ids``. ``with_metadata=False``
        returns hits with empty metadata and lets the index take its fastest path."""
        request = _search_request(
            self._collection(collection), text=text, image=image, image_id=image_id, vector=vector, parts=parts,
            aggregation=aggregation, positive_ids=positive_ids, negative_ids=negative_ids, top_k=top_k,
            min_score=min_score, filter=filter, diversity=diversity, page_size=page_size, page_token=page_token,
            nprobe=nprobe, ef_search=ef_search, with_metadata=with_metadata)
        return self._call("SearchImages", request, _parse_search)

    def batch_search(self, queries: Sequence[str | Mapping[str, Any]], *, collection: str | None = None,
                     **options):
        """Independent searches in one call: each query is a text, or a dict of ``search()``'s
        keyword arguments (text, image, parts, filter, ...); ``options`` (top_k, filter, ...)
        apply to every query that does not set them. One SearchResults per query, in order; a
        failed query has ``ok`` False and ``error_code``/``error`` set, and the others still answer."""
        requests = [_search_request("", **{**options, **({"text": q} if isinstance(q, str) else q)})
                    for q in queries]
        request = pb.BatchSearchImagesRequest(collection=self._collection(collection), queries=requests)
        return self._call("BatchSearchImages", request, _parse_batch_search)

    def upload(self, items: Sequence[bytes | tuple[bytes, Mapping[str, MetadataScalar] | None]], *,
               collection: str | None = None):
        """Uploads a batch of images (bytes, or (bytes, metadata) pairs); one UploadResult per item."""
        normalized = [(i, None, "") if isinstance(i, (bytes, bytearray)) else (i[0], i[1], "") for i in items]
        request = pb.UploadImagesRequest(collection=self._collection(collection), items=_upload_items(normalized))
        return self._call("UploadImages", request, _parse_upload, timeout=max(self.timeout, 120))

    def upload_files(self, paths: Sequence[str | Path], *, metadata: Mapping[str, MetadataScalar] | None = None,
                     file_metadata: Sequence[Mapping[str, MetadataScalar] | None] | None = None,
                     collection: str | None = None, batch_size: int = UPLOAD_BATCH_ITEMS):
        """Uploads image files; each keeps its file name as metadata "filename". ``metadata`` goes
        with every file, ``file_metadata`` (one mapping per path) with each one, over it. Calls hold
        at most ``batch_size`` files and about UPLOAD_BATCH_BYTES (the gateway's per-call limits);
        one UploadResult per path. On AsyncClient the batches are sent one after another too."""
        own = list(file_metadata) if file_metadata is not None else [None] * len(paths)
        items = [(Path(p).read_bytes(), {**(metadata or {}), **(own[i] or {})}, Path(p).name)
                 for i, p in enumerate(paths)]
        requests = [pb.UploadImagesRequest(collection=self._collection(collection), items=_upload_items(batch))
                    for batch in _batches(items, batch_size)]
        return self._call_each("UploadImages", requests, _parse_upload, lambda parts: [r for p in parts for r in p],
                               timeout=max(self.timeout, 120))

    def upload_file(self, path: str | Path, *, metadata: Mapping[str, MetadataScalar] | None = None,
                    collection: str | None = None):
        request = pb.UploadImagesRequest(collection=self._collection(collection), items=_upload_items(
            [(Path(path).read_bytes(), metadata, Path(path).name)]))
        return self._call("UploadImages", request, lambda r: _parse_upload(r)[0])

    def import_images(self, source: str, *, metadata: Mapping[str, MetadataScalar] | None = None,
                      collection: str | None = None):
        """Starts (or resumes) a server-side import of ``s3://bucket/prefix`` or a folder on the gateway."""
        request = pb.ImportImagesRequest(collection=self._collection(collection), source=source,
                                         metadata=metadata_to_proto(metadata))
        return self._call("ImportImages", request, lambda r: _parse_job(r.job))

    def list_import_jobs(self, *, collection: str = "", page_size: int = 0, page_token: str = ""):
        """Import jobs (of ``collection``, or of every collection the key may read): (jobs, next_page_token)."""
        request = pb.ListImportJobsRequest(collection=collection, page_size=page_size, page_token=page_token)
        return self._call("ListImportJobs", request,
                          lambda r: ([_parse_job(j) for j in r.jobs], r.next_page_token))

    def cancel_import_job(self, job_id: str):
        """Stops a running import; ImportImages with the same source resumes it."""
        return self._call("CancelImportJob", pb.CancelImportJobRequest(job_id=job_id), lambda r: _parse_job(r.job))

    def get_import_job(self, job_id: str):
        return self._call("GetImportJob", pb.GetImportJobRequest(job_id=job_id), lambda r: _parse_job(r.job))

    def repair(self, collection: str | None = None, *, dry_run: bool = False):
        """Starts (or resumes) a repair of the collection: stored images missing from the index are
        re-indexed, index entries whose image is gone are dropped. ``dry_run`` only counts.
        Follow it with ``get_repair_job`` until ``done``."""
        request = pb.RepairCollectionRequest(collection=self._collection(collection), dry_run=dry_run)
        return self._call("RepairCollection", request, lambda r: _parse_repair_job(r.job))

    def get_repair_job(self, job_id: str):
        return self._call("GetRepairJob", pb.GetRepairJobRequest(job_id=job_id), lambda r: _parse_repair_job(r.job))

    def get(self, image_id: str, *, collection: str | None = None):
        request = pb.GetImageRequest(collection=self._collection(collection), id=image_id)
        return self._call("GetImage", request, lambda r: _parse_image(r.image))

    def update_metadata(self, image_id: str, metadata: Mapping[str, MetadataScalar] | None = None, *,
                        replace: bool = False, remove: Sequence[str] = (), collection: str | None = None):
        """Changes an image's metadata: merges ``metadata`` into it (default), or with ``replace``
        makes ``metadata`` its whole caller metadata; ``remove`` drops keys. Returns the Image."""
        metadata = dict(metadata or {})
        paths = ["metadata"] if replace else [f"metadata.{k}" for k in [*metadata, *remove]] if remove else []
        request = pb.UpdateImageRequest(collection=self._collection(collection), id=image_id,
                                        metadata=metadata_to_proto(metadata), update_mask={"paths": paths})
        return self._call("UpdateImage", request, lambda r: _parse_image(r.image))

    def list(self, *, page_size: int = 100, page_token: str = "", collection: str | None = None):
        request = pb.ListImagesRequest(collection=self._collection(collection), page_size=page_size,
                                       page_token=page_token)
        return self._call("ListImages", request,
                          lambda r: ImagePage([_parse_image(i) for i in r.images], r.next_page_token))

    def delete(self, image_id: str, *, collection: str | None = None):
        request = pb.DeleteImageRequest(collection=self._collection(collection), id=image_id)
        return self._call("DeleteImage", request, lambda r: None)

    def create_collection(self, name: str, *, index_spec: str = "", num_shards: int = 1):
        """Creates a collection; an empty ``index_spec`` means the service's default (HNSW32)."""
        request = pb.CreateCollectionRequest(name=name, index_spec=index_spec, num_shards=num_shards)
        return self._call("CreateCollection", request, lambda r: _parse_collection(r.collection))

    def get_collection(self, name: str = ""):
        return self._call("GetCollection", pb.GetCollectionRequest(name=name or self.collection),
                          lambda r: _parse_collection(r.collection))

    def list_collections(self):
        return self._call("ListCollections", pb.ListCollectionsRequest(page_size=1000),
                          lambda r: [_parse_collection(c) for c in r.collections])

    def delete_collection(self, name: str):
        """Deletes a collection; the result says whether some shards still have to catch up."""
        return self._call("DeleteCollection", pb.DeleteCollectionRequest(name=name),
                          lambda r: CollectionDeletion(r.pending, list(r.waiting_for_shards)))


class Client(_ClientBase):
    """Blocking client. Use as a context manager or call ``close()``."""

    def __init__(self, target: str = DEFAULT_TARGET, **kwargs):
        super().__init__(target, **kwargs)
        if self._credentials is None:
            self._channel = grpc.insecure_channel(target, options=self._options)
        else:
            self._channel = grpc.secure_channel(target, self._credentials, options=self._options)
        self._stub = gateway_service_pb2_grpc.GatewayServiceStub(self._channel)

    def _call(self, method, request, parse, timeout=None):
        try:
            response = getattr(self._stub, method)(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None
        return parse(response)

    def _call_each(self, method, requests, parse, combine, timeout=None):
        return combine([self._call(method, request, parse, timeout) for request in requests])

    def iter_images(self, *, page_size: int = 500, collection: str | None = None) -> Iterator[Image]:
        token = ""
        while True:
            page = self.list(page_size=page_size, page_token=token, collection=collection)
            yield from page.images
            token = page.next_page_token
            if not token:
                return

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(_ClientBase):
    """asyncio client: ``async with AsyncClient(target) as client: await client.search(...)``."""

    def __init__(self, target: str = DEFAULT_TARGET, **kwargs):
        super().__init__(target, **kwargs)
        if self._credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=self._options)
        else:
            self._channel = grpc.aio.secure_channel(target, self._credentials, options=self._options)
        self._stub = gateway_service_pb2_grpc.GatewayServiceStub(self._channel)

    async def _call(self, method, request, parse, timeout=None):
        try:
            response = await getattr(self._stub, method)(request, timeout=timeout or self.timeout,
                                                         metadata=self._metadata)
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None
        return parse(response)

    async def _call_each(self, method, requests, parse, combine, timeout=None):
        return combine([await self._call(method, request, parse, timeout) for request in requests])

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
