"""The gateway engine: wires collections, search and ingest over the encoder,
the index shards and image storage, and serves the image reads and deletes.
Plain types in and out (gateway.types); no gRPC, no protos. Import and repair
jobs are built beside it (``gateway.__main__``) from its parts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Callable

from clipsearch.errors import ClipsearchError, NotFound
from clipsearch.metadata import metadata_bytes

from gateway.admission import GatewayAdmission
from gateway.collections import Collections
from gateway.deadline import Deadline
from gateway.encoder import EncoderClient
from gateway.ingest import META_CONTENT_TYPE, META_SIZE, Ingestor
from gateway.search import PageTokens, within_bytes
from gateway.searcher import Searcher
from gateway.settings import GatewaySettings
from gateway.shards import Record, ShardSet
from gateway.storage import ImageStorage, image_deletion_marker, make_storage
from gateway.types import (
    BatchSearchItem, CollectionDeletion, CollectionInfo, Image, Metadata, SearchRequest, SearchResult, UploadItem,
    UploadResult,
)
from gateway.validation import (
    DEFAULT_LIST_PAGE_SIZE, MAX_PAGE_SIZE, check_count, check_image_id, check_upload, clamp_page_size, url_ttl,
)

log = logging.getLogger(__name__)


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
        self.collections = Collections(settings, self.shards, self.storage, self.encoder)
        self.ingestor = Ingestor(settings, self.collections, self.encoder, self.shards, self.storage)
        self.searcher = Searcher(settings, self.collections, self.encoder, self.shards, self.storage, self.tokens)
        self.admission = GatewayAdmission(settings)
        self._upkeep: asyncio.Task | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Ready once storage and the encoder answer. Index shards may be down: searches
        then follow the shard-failure policy, and a returning shard is used again as
        soon as its channel reconnects."""
        await self.storage.check()
        info = await self.encoder.wait_ready(self.settings.startup_timeout_seconds)
        log.info("encoder %s serves %s (dim %d, fingerprint %s)", self.settings.encoder, info.name, info.dim,
                 info.fingerprint)
        if self.settings.create_default_collection:
            try:
                await self.collections.ensure_default(info)
            except ClipsearchError as exc:
                log.warning("default collection not checked yet (%s); retrying in the background", exc.message)
        self._upkeep = asyncio.get_running_loop().create_task(self.collections.maintain(), name="collection-upkeep")

    async def close(self) -> None:
        if self._upkeep is not None:
            self._upkeep.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._upkeep
        await self.encoder.close()
        await self.shards.close()
        self.storage.close()

    # ------------------------------------------------------------------ search and upload

    async def search(self, request: SearchRequest, deadline: Deadline) -> SearchResult:
        with self.admission.search(request, deadline):
            return await self.searcher.search(request, deadline)

    async def batch_search(self, collection: str, requests: list[SearchRequest],
                           deadline: Deadline) -> list[BatchSearchItem]:
        """Independent searches in one call, each with its own result or error (see Searcher.batch_search)."""
        check_count(len(requests), self.settings.max_batch_queries, "queries", "query")
        with self.admission.search(requests[0], deadline, *requests[1:]):
            return await self.searcher.batch_search(collection, requests, deadline)

    async def upload(self, collection: str, items: list[UploadItem], deadline: Deadline) -> list[UploadResult]:
        name = self.collections.resolve(collection)
        check_upload(items, self.settings.max_upload_items)
        with self.admission.upload(items, deadline):
            return await self.ingestor.ingest(name, items, deadline)

    # ------------------------------------------------------------------ images

    def _image(self, collection: str, record: Record, ttl_seconds: int) -> Image:
        size = record.metadata.get(META_SIZE)
        content_type = record.metadata.get(META_CONTENT_TYPE)
        return Image(id=record.id, url=self.storage.url(collection, record.id, ttl_seconds), metadata=record.metadata,
                     size_bytes=int(size) if isinstance(size, float) else 0,
                     content_type=content_type if isinstance(content_type, str) else "")

    async def get_image(self, collection: str, image_id: str, deadline: Deadline, url_ttl_seconds: int = 0) -> Image:
        name = self.collections.resolve(collection)
        check_image_id(image_id)
        ttl = url_ttl(url_ttl_seconds, self.settings)
        await self.collections.describe(name, deadline)
        record = (await self.shards.fetch(name, [image_id], deadline)).get(image_id)
        if record is None:
            raise NotFound(f"image {image_id} is not in collection {name!r}", field="id")
        return self._image(name, record, ttl)

    async def update_image(self, collection: str, image_id: str, metadata: Metadata, paths: list[str],
                           deadline: Deadline, url_ttl_seconds: int = 0) -> Image:
        """UpdateImage: merges or replaces the image's metadata by the field mask ``paths``."""
        name = self.collections.resolve(collection)
        check_image_id(image_id)
        ttl = url_ttl(url_ttl_seconds, self.settings)
        record = await self.ingestor.update_metadata(name, image_id, metadata, paths, deadline)
        return self._image(name, record, ttl)

    async def list_images(self, collection: str, page_size: int, page_token: str, deadline: Deadline,
                          url_ttl_seconds: int = 0) -> tuple[list[Image], str]:
        name = self.collections.resolve(collection)
        ttl = url_ttl(url_ttl_seconds, self.settings)
        size = clamp_page_size(page_size, DEFAULT_LIST_PAGE_SIZE, MAX_PAGE_SIZE)
        after = str(self.tokens.open(page_token, "images", name)["a"]) if page_token else ""
        await self.collections.describe(name, deadline)
        records, more = await self.shards.list(name, after, size, deadline)
        fits = within_bytes([metadata_bytes(r.metadata) for r in records], self.settings.max_response_metadata_bytes)
        if fits < len(records):  # the page ends early, at the response's metadata budget
            records, more = records[:fits], True
        token = self.tokens.issue("images", name, a=records[-1].id) if more and records else ""
        return [self._image(name, record, ttl) for record in records], token

    async def read_image(self, collection: str, image_id: str, deadline: Deadline) -> tuple[bytes, str]:
        """An image's stored bytes and content type (the HTTP front's content route)."""
        name = self.collections.resolve(collection)
        check_image_id(image_id)
        timeout = self.settings.storage_timeout_seconds
        info = await deadline.run(self.storage.head(name, image_id), timeout, "checking the image")
        if info is None:
            raise NotFound(f"image {image_id} is not in collection {name!r}", field="id")
        return await deadline.run(self.storage.get(name, image_id), timeout, "reading the image"), info.content_type

    async def delete_image(self, collection: str, image_id: str, deadline: Deadline) -> None:
        """Records the deletion, drops the vector (it leaves search at once), then the
        object, then the record. Every step is idempotent, so a retry after any
        failure finishes the job, and a repair job finishes one nobody retries."""
        name = self.collections.resolve(collection)
        check_image_id(image_id)
        await self.collections.describe(name, deadline)
        marker = image_deletion_marker(name, image_id)
        timeout = self.settings.storage_timeout_seconds
        async with self.ingestor.lock(name, [image_id]):
            indexed = image_id in await self.shards.fetch(name, [image_id], deadline)
            stored = await deadline.run(self.storage.head(name, image_id), timeout, "checking the image") is not None
            if not indexed and not stored:
                raise NotFound(f"image {image_id} is not in collection {name!r}", field="id")
            await deadline.run(self.storage.put_marker(marker), timeout, "recording the deletion")
            if indexed:
                await self.shards.delete(name, [image_id], deadline)
            await deadline.run(self.storage.delete(name, image_id), timeout, "deleting the image")
            await deadline.run(self.storage.delete_marker(marker), timeout, "finishing the deletion")

    # ------------------------------------------------------------------ collections

    async def create_collection(self, name: str, index_spec: str, num_shards: int,
                                deadline: Deadline) -> CollectionInfo:
        return await self.collections.create(name, index_spec, num_shards, deadline)

    async def get_collection(self, name: str, deadline: Deadline) -> CollectionInfo:
        return await self.collections.get(self.collections.resolve(name, "name"), deadline)

    async def list_collections(self, page_size: int, page_token: str, deadline: Deadline,
                               visible: Callable[[str], bool] = lambda name: True,
                               ) -> tuple[list[CollectionInfo], str]:
        """The collections ``visible`` accepts (the caller's readable ones), a page at a time."""
        size = clamp_page_size(page_size, DEFAULT_LIST_PAGE_SIZE, MAX_PAGE_SIZE)
        after = str(self.tokens.open(page_token, "collections", "")["a"]) if page_token else ""
        collections = [c for c in await self.collections.list(deadline) if c.name > after and visible(c.name)]
        chunk = collections[:size]
        token = self.tokens.issue("collections", "", a=chunk[-1].name) if len(collections) > size else ""
        return chunk, token

    async def delete_collection(self, name: str, deadline: Deadline) -> CollectionDeletion:
        return await self.collections.delete(name, deadline)
