"""The gateway engine: searches, uploads, deletes and collection management over
the encoder, the index shards and image storage.

It takes and returns the public proto messages but knows nothing of gRPC
servers: the servicer hands it a Deadline and maps the errors it raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import AsyncIterator, Sequence

import numpy as np
from google.rpc import code_pb2

from clipsearch.common.v1 import common_pb2
from clipsearch.errors import (
    AlreadyExists, ClipsearchError, FailedPrecondition, InvalidArgument, NotFound, Unavailable,
)
from clipsearch.gateway.v1 import gateway_service_pb2 as gpb
from clipsearch.index.v1 import index_service_pb2 as ipb
from clipsearch.item_status import error_from_status, item_status
from clipsearch.vectors import unpack_vector

from gateway import metrics
from gateway.encoder import EncoderClient, ModelInfo
from gateway.rpc import Deadline
from gateway.search import (
    DEFAULT_NEGATIVE_WEIGHT, DEFAULT_POSITIVE_WEIGHT, Candidate, PageTokens, aggregate_max, check_weight,
    combine_mean, cut_min_score, digest, mmr, page, rocchio, unit,
)
from gateway.settings import GatewaySettings
from gateway.shards import ShardSet
from gateway.storage import (
    ImageStorage, check_collection_name, check_image_id, image_id_for, make_storage, sniff_content_type,
)

log = logging.getLogger(__name__)

MAX_TOP_K = 1000
DEFAULT_TOP_K = 10
MAX_PAGE_SIZE = 1000
DEFAULT_LIST_PAGE_SIZE = 100
MAX_CANDIDATES = 1000
MAX_TEXT_CHARS = 4096
COLLECTION_CACHE_SECONDS = 5.0
SUPPORTED_FORMATS = "JPEG, PNG, GIF, WebP, BMP or TIFF"

# Metadata keys the gateway sets on every image (they overwrite a caller's).
META_FILENAME = "filename"
META_CONTENT_TYPE = "content_type"
META_SIZE = "size_bytes"
META_SOURCE = "source"


@dataclass
class IngestItem:
    data: bytes
    metadata: common_pb2.Metadata | None = None
    filename: str = ""
    source: str = ""  # import source key, kept as metadata "source"


@dataclass
class IngestResult:
    error: ClipsearchError | None = None
    id: str = ""
    created: bool = False


def validate_filter(filter: common_pb2.Filter, field: str = "filter") -> None:
    """Rejects malformed filters before they reach the shards (which check them too)."""
    for i, condition in enumerate(filter.conditions):
        at = f"{field}.conditions[{i}]"
        if not condition.key:
            raise InvalidArgument(f"{at}.key is empty; name the metadata key to filter on", field=f"{at}.key")
        op = condition.WhichOneof("op")
        if op is None:
            raise InvalidArgument(f"{at} sets no condition; use equals, in_set or range", field=at)
        if op == "equals" and condition.equals.WhichOneof("kind") is None:
            raise InvalidArgument(f"{at}.equals has no value set", field=f"{at}.equals")
        if op == "in_set":
            if not condition.in_set.values:
                raise InvalidArgument(f"{at}.in_set is empty, so nothing could match", field=f"{at}.in_set")
            for j, value in enumerate(condition.in_set.values):
                if value.WhichOneof("kind") is None:
                    raise InvalidArgument(f"{at}.in_set.values[{j}] has no value set",
                                          field=f"{at}.in_set.values[{j}]")
        if op == "range":
            bounds = {name: getattr(condition.range, name) for name in ("gte", "gt", "lte", "lt")
                      if condition.range.HasField(name)}
            if not bounds:
                raise InvalidArgument(f"{at}.range sets no bound; use gte, gt, lte or lt", field=f"{at}.range")
            kinds = {name: value.WhichOneof("kind") for name, value in bounds.items()}
            for name, kind in kinds.items():
                if kind not in ("number_value", "timestamp_value"):
                    raise InvalidArgument(f"{at}.range.{name} must be a number or a timestamp",
                                          field=f"{at}.range.{name}")
            if len(set(kinds.values())) > 1:
                raise InvalidArgument(f"{at}.range mixes numbers and timestamps", field=f"{at}.range")


class KeyedLocks:
    """One asyncio lock per key, dropped when unused."""

    def __init__(self):
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, keys: Sequence[str]) -> AsyncIterator[None]:
        keys = sorted(set(keys))  # a fixed order, so two batches cannot deadlock
        for key in keys:
            lock, users = self._locks.get(key, (None, 0))
            self._locks[key] = (lock or asyncio.Lock(), users + 1)
        acquired = []
        try:
            for key in keys:
                await self._locks[key][0].acquire()
                acquired.append(key)
            yield
        finally:
            for key in acquired:
                self._locks[key][0].release()
            for key in keys:
                lock, users = self._locks[key]
                if users <= 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)


class Gateway:
    def __init__(self, settings: GatewaySettings, *, storage: ImageStorage | None = None,
                 encoder: EncoderClient | None = None, shards: ShardSet | None = None):
        self.settings = settings
        self.storage = storage or make_storage(
            settings.storage, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region,
            url_ttl_seconds=settings.url_ttl_seconds, timeout_seconds=settings.storage_timeout_seconds,
        )
        self.encoder = encoder or EncoderClient(settings)
        self.shards = shards or ShardSet(settings)
        if not settings.page_token_secret:
            log.warning("page_token_secret is not set: page tokens are signed with a random per-process key, so "
                        "they do not survive a restart or work across gateway replicas")
        self.tokens = PageTokens(settings.page_token_secret or None)
        self._collections: dict[str, tuple[ipb.Collection, float]] = {}
        self._locks = KeyedLocks()
        from gateway.imports import ImportManager  # imports use the engine

        self.imports = ImportManager(self)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        timeout = self.settings.startup_timeout_seconds
        await self.storage.check()
        info = await self.encoder.wait_ready(timeout)
        log.info("encoder %s serves %s (dim %d, fingerprint %s)", self.settings.encoder, info.name, info.dim,
                 info.fingerprint)
        await self._wait_for_shards(timeout)
        if self.settings.create_default_collection:
            await self.ensure_default_collection(info)
        await self.imports.start()

    async def close(self) -> None:
        await self.imports.close()
        await self.encoder.close()
        await self.shards.close()
        self.storage.close()

    async def _wait_for_shards(self, timeout: float) -> None:
        deadline = Deadline.after(timeout)
        delay = 0.2
        while True:
            try:
                await self.shards.list_collections(Deadline.after(min(5.0, max(deadline.remaining() or 0, 0.1))))
                return
            except Unavailable as exc:
                if (deadline.remaining() or 0) <= delay:
                    raise Unavailable(f"index shards did not come up within {timeout:.0f}s: {exc.message}") from None
                log.info("waiting for index shards: %s", exc.message)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def ensure_default_collection(self, info: ModelInfo) -> None:
        name = self.settings.default_collection
        deadline = Deadline.after(self.settings.index_timeout_seconds * 3)
        try:
            collection = await self.shards.get_collection(name, deadline)
        except (NotFound, FailedPrecondition):
            try:
                collection = await self.shards.create_collection(
                    ipb.CreateCollectionRequest(
                        name=name, dim=info.dim, metric=ipb.METRIC_INNER_PRODUCT,
                        index_spec=self.settings.default_index_spec, model_fingerprint=info.fingerprint,
                    ),
                    deadline,
                )
                log.info("created default collection %r (dim %d, fingerprint %s)", name, info.dim, info.fingerprint)
            except AlreadyExists:  # another gateway replica won the race
                collection = await self.shards.get_collection(name, deadline)
        if collection.dim != info.dim or (collection.model_fingerprint
                                          and collection.model_fingerprint != info.fingerprint):
            log.warning(
                "!!! default collection %r was built by model %s (dim %d) but the encoder serves %s (dim %d); "
                "searches and uploads there will be refused with FAILED_PRECONDITION !!!",
                name, collection.model_fingerprint, collection.dim, info.fingerprint, info.dim,
            )

    # ------------------------------------------------------------------ collections

    def resolve(self, name: str, field: str = "collection") -> str:
        return check_collection_name(name or self.settings.default_collection, field)

    async def collection(self, name: str, deadline: Deadline, fresh: bool = False) -> ipb.Collection:
        cached = self._collections.get(name)
        if cached and not fresh and time.monotonic() - cached[1] < COLLECTION_CACHE_SECONDS:
            return cached[0]
        collection = await self.shards.describe_collection(name, deadline)
        self._collections[name] = (collection, time.monotonic())
        return collection

    def forget_collection(self, name: str) -> None:
        self._collections.pop(name, None)

    def check_model(self, collection: ipb.Collection, fingerprint: str, dim: int) -> None:
        """Refuses vectors of another model than the one the collection was built with."""
        if collection.model_fingerprint and fingerprint and collection.model_fingerprint != fingerprint:
            raise FailedPrecondition(
                f"model mismatch: collection {collection.name!r} holds vectors of model {collection.model_fingerprint} "
                f"but the encoder at {self.settings.encoder} serves model {fingerprint}; its vectors are not "
                "comparable. Point the gateway at the encoder that built the collection, or import the images "
                "into a new collection.",
                reason="MODEL_FINGERPRINT_MISMATCH",
            )
        if dim and collection.dim != dim:
            raise FailedPrecondition(
                f"dimension mismatch: collection {collection.name!r} has dim {collection.dim} but the encoder "
                f"at {self.settings.encoder} makes {dim}-d vectors",
                reason="DIMENSION_MISMATCH",
            )

    async def create_collection(self, request: gpb.CreateCollectionRequest, deadline: Deadline,
                                ) -> gpb.CreateCollectionResponse:
        name = check_collection_name(request.name, "name")
        info = await self.encoder.model_info(deadline)
        collection = await self.shards.create_collection(
            ipb.CreateCollectionRequest(
                name=name, dim=info.dim, metric=ipb.METRIC_INNER_PRODUCT,
                index_spec=request.index_spec or self.settings.default_index_spec,
                num_shards=request.num_shards, model_fingerprint=info.fingerprint,
            ),
            deadline,
        )
        self.forget_collection(name)
        return gpb.CreateCollectionResponse(collection=collection)

    async def get_collection(self, request: gpb.GetCollectionRequest, deadline: Deadline,
                             ) -> gpb.GetCollectionResponse:
        name = self.resolve(request.name, "name")
        collection = await self.shards.get_collection(name, deadline)
        self._collections[name] = (collection, time.monotonic())
        return gpb.GetCollectionResponse(collection=collection)

    async def list_collections(self, request: gpb.ListCollectionsRequest, deadline: Deadline,
                               ) -> gpb.ListCollectionsResponse:
        page_size = _page_size(request.page_size, DEFAULT_LIST_PAGE_SIZE)
        after = ""
        if request.page_token:
            after = str(self.tokens.open(request.page_token, "collections", "")["a"])
        collections = [c for c in await self.shards.list_collections(deadline) if c.name > after]
        chunk = collections[:page_size]
        token = ""
        if len(collections) > page_size:
            token = self.tokens.issue("collections", "", a=chunk[-1].name)
        return gpb.ListCollectionsResponse(collections=chunk, next_page_token=token)

    async def delete_collection(self, request: gpb.DeleteCollectionRequest, deadline: Deadline,
                                ) -> gpb.DeleteCollectionResponse:
        name = check_collection_name(request.name, "name")
        await self.shards.delete_collection(name, deadline)
        self.forget_collection(name)
        removed = await self.storage.delete_collection(name)
        log.info("deleted collection %r and %d stored images", name, removed)
        return gpb.DeleteCollectionResponse()

    # ------------------------------------------------------------------ search

    async def search(self, request: gpb.SearchImagesRequest, deadline: Deadline) -> gpb.SearchImagesResponse:
        name = self.resolve(request.collection)
        if not request.parts:
            raise InvalidArgument(
                "the query is empty: give at least one part (text, image_data, image_id or vector)", field="parts"
            )
        top_k = request.top_k or DEFAULT_TOP_K
        if top_k > MAX_TOP_K:
            raise InvalidArgument(f"top_k must be at most {MAX_TOP_K}, got {request.top_k}", field="top_k")
        if request.page_size > MAX_PAGE_SIZE:
            raise InvalidArgument(f"page_size must be at most {MAX_PAGE_SIZE}, got {request.page_size}",
                                  field="page_size")
        page_size = min(request.page_size or top_k, top_k)
        diversity = float(request.diversity)
        if not math.isfinite(diversity) or not 0.0 <= diversity <= 1.0:
            raise InvalidArgument(f"diversity must be in [0, 1], got {request.diversity}", field="diversity")
        min_score = request.min_score if request.HasField("min_score") else None
        if min_score is not None and not math.isfinite(min_score):
            raise InvalidArgument("min_score must be a finite number", field="min_score")
        if request.aggregation not in (gpb.AGGREGATION_UNSPECIFIED, gpb.AGGREGATION_MEAN, gpb.AGGREGATION_MAX):
            raise InvalidArgument(f"unknown aggregation {request.aggregation}", field="aggregation")
        validate_filter(request.filter)
        feedback = request.feedback
        positive_weight = _feedback_weight(feedback.positive_weight, DEFAULT_POSITIVE_WEIGHT,
                                           "feedback.positive_weight")
        negative_weight = _feedback_weight(feedback.negative_weight, DEFAULT_NEGATIVE_WEIGHT,
                                           "feedback.negative_weight")
        query_key = self._query_digest(request, name)
        offset = 0
        if request.page_token:
            offset = int(self.tokens.open(request.page_token, "search", query_key)["o"])

        collection = await self.collection(name, deadline)
        (vectors, weights), (positive, negative) = await _gather(
            self._part_vectors(request.parts, collection, deadline),
            self._feedback_vectors(feedback, name, collection.dim, deadline),
        )

        def moved(q: np.ndarray) -> np.ndarray:
            if positive is None and negative is None:
                return q
            return rocchio(q, positive, negative, positive_weight, negative_weight)

        k = top_k if diversity == 0 else min(max(top_k * self.settings.mmr_candidates, top_k), MAX_CANDIDATES)
        options = dict(deadline=deadline, filter=request.filter, params=request.params,
                       include_vectors=diversity > 0, policy=self.settings.shard_failure_policy)
        try:
            if request.aggregation == gpb.AGGREGATION_MAX:
                queries = np.stack([moved(v) for v in vectors])
                per_part, missing = await self.shards.search(name, queries, k, **options)
                ranked = aggregate_max(per_part, weights)[:k]
            else:
                query = moved(combine_mean(vectors, weights))
                hits, missing = await self.shards.search(name, query[None, :], k, **options)
                ranked = hits[0]
        except (NotFound, FailedPrecondition):
            self.forget_collection(name)
            raise
        ranked = cut_min_score(ranked, min_score)
        if diversity > 0:
            ranked = mmr(ranked, top_k, diversity)
        ranked = ranked[:top_k]
        chunk, following = page(ranked, offset, page_size)
        response = gpb.SearchImagesResponse(
            hits=[self._hit(name, c) for c in chunk], partial=bool(missing), missing_shards=missing,
        )
        if following is not None:
            response.next_page_token = self.tokens.issue("search", query_key, o=following)
        return response

    @staticmethod
    def _query_digest(request: gpb.SearchImagesRequest, name: str) -> str:
        canonical = gpb.SearchImagesRequest()
        canonical.CopyFrom(request)
        canonical.collection = name
        canonical.ClearField("page_token")
        canonical.ClearField("page_size")
        return digest(canonical.SerializeToString(deterministic=True))

    def _url(self, collection: str, image_id: str) -> str:
        try:
            return self.storage.url(collection, image_id)
        except InvalidArgument:  # an id written to the index by something other than the gateway
            return ""

    def _hit(self, collection: str, candidate: Candidate) -> gpb.SearchHit:
        hit = gpb.SearchHit(id=candidate.id, score=candidate.score, url=self._url(collection, candidate.id))
        if candidate.metadata is not None:
            hit.metadata.CopyFrom(candidate.metadata)
        return hit

    async def _part_vectors(self, parts: Sequence[gpb.QueryPart], collection: ipb.Collection,
                            deadline: Deadline) -> tuple[np.ndarray, list[float]]:
        """One unit vector per query part, and the parts' weights."""
        dim = collection.dim
        vectors: list[np.ndarray | None] = [None] * len(parts)
        weights = [check_weight(part.weight, f"parts[{i}].weight") for i, part in enumerate(parts)]
        texts: list[tuple[int, str]] = []
        images: list[tuple[int, bytes]] = []
        stored: list[tuple[int, str]] = []
        for i, part in enumerate(parts):
            source = part.WhichOneof("source")
            at = f"parts[{i}]"
            if source is None:
                raise InvalidArgument(f"{at} is empty: set one of text, image_data, image_id or vector", field=at)
            if source == "text":
                if not part.text.strip():
                    raise InvalidArgument(f"{at}.text is blank", field=f"{at}.text")
                if len(part.text) > MAX_TEXT_CHARS:
                    raise InvalidArgument(f"{at}.text has {len(part.text)} characters; the limit is "
                                          f"{MAX_TEXT_CHARS}", field=f"{at}.text")
                texts.append((i, part.text))
            elif source == "image_data":
                self._check_image_bytes(part.image_data, f"{at}.image_data")
                images.append((i, part.image_data))
            elif source == "image_id":
                stored.append((i, check_image_id(part.image_id, f"{at}.image_id")))
            else:
                raw = unpack_vector(part.vector, dim=dim, field=f"{at}.vector")
                vectors[i] = unit(raw, f"{at}.vector", field=f"{at}.vector")

        async def embed_texts() -> None:
            if not texts:
                return
            matrix, fingerprint = await self.encoder.embed_texts_cached(
                [t for _, t in texts], deadline, collection.model_fingerprint or None)
            self.check_model(collection, fingerprint, matrix.shape[1])
            for (i, _), vector in zip(texts, matrix):
                vectors[i] = vector

        async def embed_images() -> None:
            if not images:
                return
            result = await self.encoder.embed_images([data for _, data in images], deadline)
            self.check_model(collection, result.fingerprint, result.vectors.shape[1])
            for (i, _), vector, code, message in zip(images, result.vectors, result.codes, result.messages):
                if code != code_pb2.OK:
                    raise InvalidArgument(f"parts[{i}].image_data could not be read as an image: {message}",
                                          field=f"parts[{i}].image_data")
                vectors[i] = vector

        async def fetch_stored() -> None:
            if not stored:
                return
            records = await self.shards.fetch(collection.name, [image_id for _, image_id in stored], deadline,
                                              include_vectors=True)
            for i, image_id in stored:
                record = records.get(image_id)
                if record is None:
                    raise NotFound(f"parts[{i}].image_id {image_id} is not in collection {collection.name!r}",
                                   field=f"parts[{i}].image_id")
                vectors[i] = unit(unpack_vector(record.vector, dim=dim, field="stored vector"),
                                  f"the stored vector of {image_id}", field=f"parts[{i}].image_id")

        await _gather(embed_texts(), embed_images(), fetch_stored())
        return np.stack(vectors).astype(np.float32), weights

    async def _feedback_vectors(self, feedback: gpb.Feedback, collection: str, dim: int, deadline: Deadline,
                                ) -> tuple[np.ndarray | None, np.ndarray | None]:
        lists = {"positive_ids": list(feedback.positive_ids), "negative_ids": list(feedback.negative_ids)}
        wanted = []
        for name, ids in lists.items():
            for j, image_id in enumerate(ids):
                wanted.append(check_image_id(image_id, f"feedback.{name}[{j}]"))
        if not wanted:
            return None, None
        records = await self.shards.fetch(collection, list(dict.fromkeys(wanted)), deadline, include_vectors=True)
        out = []
        for name, ids in lists.items():
            rows = []
            for j, image_id in enumerate(ids):
                record = records.get(image_id)
                if record is None:
                    raise NotFound(f"feedback.{name}[{j}] {image_id} is not in collection {collection!r}",
                                   field=f"feedback.{name}[{j}]")
                rows.append(unpack_vector(record.vector, dim=dim, field="stored vector"))
            out.append(np.stack(rows) if rows else None)
        return out[0], out[1]

    def _check_image_bytes(self, data: bytes, field: str) -> str:
        """The content type of ``data``; InvalidArgument when empty, too large or not an image."""
        if not data:
            raise InvalidArgument(f"{field} is empty", field=field)
        if len(data) > self.settings.max_image_bytes:
            raise InvalidArgument(
                f"{field} is {len(data)} bytes; the limit is {self.settings.max_image_bytes}", field=field,
                reason="IMAGE_TOO_LARGE",
            )
        content_type = sniff_content_type(data)
        if content_type is None:
            raise InvalidArgument(f"{field} is not a {SUPPORTED_FORMATS} image", field=field,
                                  reason="UNSUPPORTED_IMAGE")
        return content_type

    # ------------------------------------------------------------------ uploads

    async def upload(self, request: gpb.UploadImagesRequest, deadline: Deadline) -> gpb.UploadImagesResponse:
        name = self.resolve(request.collection)
        if not request.items:
            raise InvalidArgument("items is empty: send at least one image", field="items")
        if len(request.items) > self.settings.max_upload_items:
            raise InvalidArgument(
                f"{len(request.items)} items in one call; the limit is {self.settings.max_upload_items}",
                field="items",
            )
        items = [IngestItem(item.data, item.metadata, item.filename) for item in request.items]
        results = await self.ingest(name, items, deadline, field="items")
        return gpb.UploadImagesResponse(results=[
            gpb.UploadResult(status=item_status(r.error), id=r.id if r.error is None else "", created=r.created)
            for r in results
        ])

    def _item_metadata(self, item: IngestItem, content_type: str, field: str) -> common_pb2.Metadata:
        metadata = common_pb2.Metadata()
        if item.metadata is not None:
            for key, value in item.metadata.fields.items():
                if not key:
                    raise InvalidArgument(f"{field}.metadata has an empty key", field=f"{field}.metadata")
                if value.WhichOneof("kind") is None:
                    raise InvalidArgument(f"{field}.metadata[{key!r}] has no value set",
                                          field=f"{field}.metadata")
            metadata.CopyFrom(item.metadata)
        if item.filename:
            metadata.fields[META_FILENAME].string_value = item.filename
        if item.source:
            metadata.fields[META_SOURCE].string_value = item.source
        metadata.fields[META_CONTENT_TYPE].string_value = content_type
        metadata.fields[META_SIZE].number_value = float(len(item.data))
        return metadata

    async def ingest(self, collection_name: str, items: Sequence[IngestItem], deadline: Deadline,
                     field: str = "items") -> list[IngestResult]:
        """Stores, embeds and indexes images; one result per item, never half-stored.

        Order per image: check the bytes, skip ids already indexed, embed, store the
        object, index the vector with its metadata. When indexing fails, an object
        this call created is removed again and the item reports the error.
        """
        collection = await self.collection(collection_name, deadline)
        results = [IngestResult() for _ in items]
        first: dict[str, int] = {}  # id -> position of its first item
        prepared: dict[str, tuple[IngestItem, str, common_pb2.Metadata]] = {}
        duplicates: list[tuple[int, str]] = []
        for i, item in enumerate(items):
            at = f"{field}[{i}]"
            try:
                content_type = self._check_image_bytes(item.data, f"{at}.data")
                metadata = self._item_metadata(item, content_type, at)
            except InvalidArgument as error:
                results[i].error = error
                continue
            metrics.UPLOAD_BYTES.inc(len(item.data))
            image_id = image_id_for(item.data)
            results[i].id = image_id
            if image_id in first:
                duplicates.append((i, image_id))
                continue
            first[image_id] = i
            prepared[image_id] = (item, content_type, metadata)

        if prepared:
            existing, unreachable = await self.shards.fetch_each(collection_name, list(prepared), deadline)
            for image_id, error in unreachable.items():
                if isinstance(error, (NotFound, FailedPrecondition)):
                    self.forget_collection(collection_name)
                    raise error  # the collection itself is gone or broken: fail the call
                results[first[image_id]].error = error
                del prepared[image_id]
            for image_id in existing:
                del prepared[image_id]  # already indexed: OK, created=False

        if prepared:
            ids = list(prepared)
            embedded = await self.encoder.embed_images([prepared[i][0].data for i in ids], deadline)
            self.check_model(collection, embedded.fingerprint, embedded.vectors.shape[1])
            good: list[int] = []
            for row, image_id in enumerate(ids):
                if embedded.codes[row] != code_pb2.OK:
                    error = InvalidArgument(f"{field}[{first[image_id]}].data could not be read as an image: "
                                            f"{embedded.messages[row]}", field=f"{field}[{first[image_id]}].data")
                    if embedded.codes[row] != code_pb2.INVALID_ARGUMENT:
                        error = error_from_status(embedded.codes[row], embedded.messages[row])
                    results[first[image_id]].error = error
                else:
                    good.append(row)
            ids = [ids[row] for row in good]
            vectors = embedded.vectors[good] if good else None
            if ids:
                await self._store_and_index(collection_name, ids, vectors, prepared, embedded.fingerprint,
                                            results, first, deadline)

        for i, image_id in duplicates:
            original = results[first[image_id]]
            results[i].error = original.error
            results[i].created = False
        for r in results:
            metrics.UPLOADED_IMAGES.labels(
                "failed" if r.error is not None else "created" if r.created else "existing").inc()
        return results

    async def _store_and_index(self, collection: str, ids: list[str], vectors: np.ndarray,
                               prepared: dict[str, tuple[IngestItem, str, common_pb2.Metadata]], fingerprint: str,
                               results: list[IngestResult], first: dict[str, int], deadline: Deadline) -> None:
        async with self._locks.hold([f"{collection}/{i}" for i in ids]):
            stored = await asyncio.gather(
                *(self.storage.put(collection, image_id, prepared[image_id][0].data, prepared[image_id][1])
                  for image_id in ids),
                return_exceptions=True,
            )
            keep: list[int] = []
            for row, (image_id, outcome) in enumerate(zip(ids, stored)):
                if isinstance(outcome, BaseException):
                    if not isinstance(outcome, ClipsearchError):
                        raise outcome
                    results[first[image_id]].error = outcome
                else:
                    keep.append(row)
            if not keep:
                return
            ids_kept = [ids[row] for row in keep]
            errors = await self.shards.upsert(
                collection, ids_kept, vectors[keep], [prepared[i][2] for i in ids_kept], fingerprint, deadline,
            )
            for row, image_id, error in zip(keep, ids_kept, errors):
                result = results[first[image_id]]
                if error is None:
                    result.created = True
                    continue
                result.error = error
                if stored[row] is True:  # this call created the object: take it back
                    with contextlib.suppress(ClipsearchError):
                        await self.storage.delete(collection, image_id)
            if any(isinstance(e, (NotFound, FailedPrecondition)) for e in errors):
                self.forget_collection(collection)

    # ------------------------------------------------------------------ images

    async def get_image(self, request: gpb.GetImageRequest, deadline: Deadline) -> gpb.GetImageResponse:
        name = self.resolve(request.collection)
        image_id = check_image_id(request.id)
        records = await self.shards.fetch(name, [image_id], deadline)
        record = records.get(image_id)
        if record is None:
            raise NotFound(f"image {image_id} is not in collection {name!r}", field="id")
        return gpb.GetImageResponse(image=await self._image(name, record))

    async def _image(self, collection: str, record: ipb.Record, head: bool = True) -> gpb.Image:
        image = gpb.Image(id=record.id, url=self._url(collection, record.id), metadata=record.metadata)
        fields = record.metadata.fields
        if META_SIZE in fields and META_CONTENT_TYPE in fields:
            image.size_bytes = int(fields[META_SIZE].number_value)
            image.content_type = fields[META_CONTENT_TYPE].string_value
        elif head:
            with contextlib.suppress(InvalidArgument):
                info = await self.storage.head(collection, record.id)
                if info is not None:
                    image.size_bytes, image.content_type = info.size, info.content_type
        return image

    async def list_images(self, request: gpb.ListImagesRequest, deadline: Deadline) -> gpb.ListImagesResponse:
        name = self.resolve(request.collection)
        page_size = _page_size(request.page_size, DEFAULT_LIST_PAGE_SIZE)
        after = ""
        if request.page_token:
            after = str(self.tokens.open(request.page_token, "images", name)["a"])
        records, more = await self.shards.list(name, after, page_size, deadline)
        images = await asyncio.gather(*(self._image(name, record) for record in records))
        token = self.tokens.issue("images", name, a=records[-1].id) if more and records else ""
        return gpb.ListImagesResponse(images=images, next_page_token=token)

    async def delete_image(self, request: gpb.DeleteImageRequest, deadline: Deadline) -> gpb.DeleteImageResponse:
        """Deletes the vector (so it leaves search at once), then the object. A retry
        after a storage failure finishes the job."""
        name = self.resolve(request.collection)
        image_id = check_image_id(request.id)
        await self.collection(name, deadline)
        async with self._locks.hold([f"{name}/{image_id}"]):
            records = await self.shards.fetch(name, [image_id], deadline)
            if image_id in records:
                await self.shards.delete(name, [image_id], deadline)
            removed = await self.storage.delete(name, image_id)
        if image_id not in records and not removed:
            raise NotFound(f"image {image_id} is not in collection {name!r}", field="id")
        return gpb.DeleteImageResponse()


def _page_size(value: int, default: int) -> int:
    if value > MAX_PAGE_SIZE:
        raise InvalidArgument(f"page_size must be at most {MAX_PAGE_SIZE}, got {value}", field="page_size")
    return value or default


def _feedback_weight(value: float, default: float, field: str) -> float:
    if not math.isfinite(value) or value < 0:
        raise InvalidArgument(f"{field} must be a finite number >= 0", field=field)
    return value or default


async def _gather(*aws) -> list:
    """Runs coroutines concurrently; the first error cancels the rest and is raised."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        raise
