"""Ingest: store, embed and index images so that storage and index agree under
every fault.

The invariant: every indexed id has its stored object. So an object is written
before its vector, and never deleted because an index write failed or timed
out (its outcome is unknown: the shard may still commit it). Such an item is
reported with a retryable status, and what it leaves behind is at worst an
object with no index entry, which a retry or a repair job finishes.

A retry converges: for ids already indexed, ingest checks that the object is
there and writes it again when it is not; ids whose index entry lacks the
gateway's own metadata are indexed again.

Uploading bytes that are already indexed merges the item's metadata into the
stored metadata (its keys replace the same keys; the others stay), and the
result says ``metadata_updated`` when that changed anything. ``update_metadata``
(UpdateImage) merges or replaces metadata by a field mask (AIP-134).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import AsyncIterator, Sequence

import numpy as np

from clipsearch.errors import ClipsearchError, FailedPrecondition, InvalidArgument, NotFound

from gateway import metrics
from gateway.collections import Collections
from gateway.deadline import Deadline
from gateway.encoder import EncoderClient
from gateway.settings import GatewaySettings
from gateway.shards import Record, ShardSet
from gateway.storage import ImageStorage, image_id_for
from gateway.types import Metadata, UploadItem, UploadResult
from gateway.validation import check_image_bytes, check_metadata

log = logging.getLogger(__name__)

# Metadata keys the gateway sets on every image (they overwrite a caller's).
META_FILENAME = "filename"
META_CONTENT_TYPE = "content_type"
META_SIZE = "size_bytes"
META_SOURCE = "source"
# Keys that describe the stored bytes: no caller may set or remove them.
FIXED_KEYS = (META_CONTENT_TYPE, META_SIZE)


def masked_metadata(stored: Metadata, given: Metadata, paths: Sequence[str]) -> Metadata:
    """The metadata an UpdateImage leaves (AIP-134 field mask over ``metadata``):

    - no paths: merge, every given key is set and the others stay;
    - ``metadata`` or ``*``: replace, the given keys become the caller's metadata
      (``content_type`` and ``size_bytes`` stay);
    - ``metadata.<key>``: that key alone is set from ``given``, or removed when absent.
    """
    fixed = [key for key in given if key in FIXED_KEYS]
    if fixed:
        raise InvalidArgument(f"metadata key {fixed[0]!r} is set by the gateway from the image bytes",
                              field="metadata")
    if not paths:
        return {**stored, **given}
    out = dict(stored)
    for path in paths:
        if path in ("metadata", "*"):
            out = {**{k: v for k, v in stored.items() if k in FIXED_KEYS}, **given}
        elif path.startswith("metadata.") and path[len("metadata."):] not in FIXED_KEYS + ("",):
            key = path[len("metadata."):]
            if key in given:
                out[key] = given[key]
            else:
                out.pop(key, None)
        else:
            raise InvalidArgument(f"update_mask path {path!r} cannot be updated; use 'metadata' (replace) or "
                                  "'metadata.<key>' (set or remove one key)", field="update_mask")
    return out


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


@dataclass
class Prepared:
    position: int  # of the first item with these bytes
    data: bytes
    content_type: str
    metadata: Metadata


def item_metadata(item: UploadItem, content_type: str) -> Metadata:
    metadata = dict(item.metadata)
    if item.filename:
        metadata[META_FILENAME] = item.filename
    if item.source:
        metadata[META_SOURCE] = item.source
    metadata[META_CONTENT_TYPE] = content_type
    metadata[META_SIZE] = float(len(item.data))
    return metadata


class Ingestor:
    def __init__(self, settings: GatewaySettings, collections: Collections, encoder: EncoderClient,
                 shards: ShardSet, storage: ImageStorage):
        self.settings = settings
        self.collections = collections
        self.encoder = encoder
        self.shards = shards
        self.storage = storage
        self.locks = KeyedLocks()
        self.limits = settings.metadata_limits()

    def lock(self, collection: str, ids: Sequence[str]):
        """Serializes writes of the same images within this gateway."""
        return self.locks.hold([f"{collection}/{i}" for i in ids])

    async def ingest(self, name: str, items: Sequence[UploadItem], deadline: Deadline,
                     field: str = "items") -> list[UploadResult]:
        """One result per item, in order."""
        results = [UploadResult() for _ in items]
        prepared: dict[str, Prepared] = {}
        duplicates: list[tuple[int, str]] = []
        for i, item in enumerate(items):
            at = f"{field}[{i}]"
            try:
                content_type = check_image_bytes(item.data, self.settings.max_image_bytes, f"{at}.data")
                metadata = item_metadata(item, content_type)
                check_metadata(metadata, at, self.limits)
            except InvalidArgument as error:
                results[i].error = error
                continue
            metrics.UPLOAD_BYTES.inc(len(item.data))
            image_id = image_id_for(item.data)
            results[i].id = image_id
            if image_id in prepared:
                duplicates.append((i, image_id))
            else:
                prepared[image_id] = Prepared(i, item.data, content_type, metadata)

        if prepared:
            collection = await self.collections.describe(name, deadline)
            indexed = await self._indexed(name, prepared, results, deadline)
            fresh = [image_id for image_id in prepared if image_id not in indexed and results[
                prepared[image_id].position].error is None]
            vectors, fingerprint = await self._embed(collection, fresh, prepared, results, field, deadline)
            async with self.lock(name, prepared):
                present = await self._store(name, list(indexed), prepared, results, deadline)
                await self._merge_metadata(name, {i: indexed[i] for i in present}, prepared, collection, results,
                                           field, deadline)
                embedded = [image_id for image_id in fresh if image_id in vectors]
                stored = await self._store(name, embedded, prepared, results, deadline)
                await self._index(name, stored, vectors, prepared, fingerprint, results, field, deadline)

        for i, image_id in duplicates:
            original = results[prepared[image_id].position]
            results[i].error = original.error
            results[i].created = False
        for r in results:
            metrics.UPLOADED_IMAGES.labels(
                "failed" if r.error is not None else "created" if r.created else "existing").inc()
        return results

    async def _indexed(self, name: str, prepared: dict[str, Prepared], results: list[UploadResult],
                       deadline: Deadline) -> dict[str, Record]:
        """Records of the ids already indexed with the gateway's metadata; ids whose shard failed
        get its error."""
        records, unreachable = await self.shards.fetch_each(name, list(prepared), deadline)
        for image_id, error in unreachable.items():
            if isinstance(error, (NotFound, FailedPrecondition)):
                self.collections.forget(name)
                raise error  # the collection itself is gone or broken: fail the call
            results[prepared[image_id].position].error = error
        return {image_id: record for image_id, record in records.items() if META_CONTENT_TYPE in record.metadata}

    async def _merge_metadata(self, name: str, records: dict[str, Record], prepared: dict[str, Prepared],
                              collection, results: list[UploadResult], field: str, deadline: Deadline) -> None:
        """Re-uploaded images: the item's metadata merged into the stored one, written when it changed."""
        changed: dict[str, Metadata] = {}
        for image_id, record in records.items():
            item = prepared[image_id]
            merged = {**record.metadata, **item.metadata}
            if merged == record.metadata:
                continue
            try:
                check_metadata(merged, f"{field}[{item.position}]", self.limits)
            except InvalidArgument as error:
                results[item.position].error = error
                continue
            changed[image_id] = merged
        if not changed:
            return
        # Only now the stored vectors, and only of the images whose metadata changed.
        stored, unreachable = await self.shards.fetch_each(name, list(changed), deadline, include_vectors=True)
        for image_id, error in unreachable.items():
            results[prepared[image_id].position].error = error
        present = [i for i in changed if i in stored]
        errors = await self._rewrite(name, [Record(i, changed[i], stored[i].vector) for i in present],
                                     collection.model_fingerprint, deadline)
        for image_id, error in zip(present, errors):
            results[prepared[image_id].position].error = error
            results[prepared[image_id].position].metadata_updated = error is None

    async def _rewrite(self, name: str, records: list[Record], fingerprint: str,
                       deadline: Deadline) -> list[ClipsearchError | None]:
        """Writes records again with their stored vectors and new metadata (the upsert replaces it)."""
        if not records:
            return []
        return await self.shards.upsert(name, [r.id for r in records], np.stack([r.vector for r in records]),
                                        [r.metadata for r in records], fingerprint, deadline)

    async def update_metadata(self, name: str, image_id: str, given: Metadata, paths: Sequence[str],
                              deadline: Deadline) -> Record:
        """UpdateImage: the image's metadata after ``masked_metadata``; NotFound when it is not indexed."""
        collection = await self.collections.describe(name, deadline)
        async with self.lock(name, [image_id]):
            record = (await self.shards.fetch(name, [image_id], deadline, include_vectors=True)).get(image_id)
            if record is None:
                raise NotFound(f"image {image_id} is not in collection {name!r}", field="id")
            updated = masked_metadata(record.metadata, given, paths)
            check_metadata(updated, "", self.limits)
            if updated != record.metadata:
                error = (await self._rewrite(name, [Record(image_id, updated, record.vector)],
                                             collection.model_fingerprint, deadline))[0]
                if error is not None:
                    raise error
        return Record(image_id, updated)

    async def _embed(self, collection, ids: list[str], prepared: dict[str, Prepared], results: list[UploadResult],
                     field: str, deadline: Deadline):
        """Vectors by id for the images that decoded; decode errors go to their items."""
        if not ids:
            return {}, ""
        embedded = await self.encoder.embed_images([prepared[i].data for i in ids], deadline)
        self.collections.check_model(collection, embedded.fingerprint, embedded.vectors.shape[1])
        vectors = {}
        for row, image_id in enumerate(ids):
            error = embedded.errors[row]
            position = prepared[image_id].position
            if error is None:
                vectors[image_id] = embedded.vectors[row]
            elif isinstance(error, InvalidArgument):
                results[position].error = InvalidArgument(
                    f"{field}[{position}].data could not be read as an image: {error.message}",
                    field=f"{field}[{position}].data")
            else:
                results[position].error = error
        return vectors, embedded.fingerprint

    async def _store(self, name: str, ids: list[str], prepared: dict[str, Prepared], results: list[UploadResult],
                     deadline: Deadline) -> list[str]:
        """Writes the objects that are missing; the ids whose object is now stored."""

        async def put(image_id: str) -> bool:
            item = prepared[image_id]
            return await deadline.run(self.storage.put(name, image_id, item.data, item.content_type),
                                      self.settings.storage_timeout_seconds, f"storing image {image_id}")

        outcomes = await asyncio.gather(*(put(i) for i in ids), return_exceptions=True)
        stored = []
        for image_id, outcome in zip(ids, outcomes):
            if isinstance(outcome, ClipsearchError):
                results[prepared[image_id].position].error = outcome
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                if outcome:
                    log.debug("stored object of %s/%s", name, image_id)
                stored.append(image_id)
        return stored

    async def _index(self, name: str, ids: list[str], vectors: dict, prepared: dict[str, Prepared],
                     fingerprint: str, results: list[UploadResult], field: str, deadline: Deadline) -> None:
        if not ids:
            return
        errors = await self.shards.upsert(name, ids, np.stack([vectors[i] for i in ids]),
                                          [prepared[i].metadata for i in ids], fingerprint, deadline)
        for image_id, error in zip(ids, errors):
            result = results[prepared[image_id].position]
            if error is None:
                result.created = True
            elif isinstance(error, (NotFound, FailedPrecondition)):
                self.collections.forget(name)
                raise error
            elif isinstance(error, InvalidArgument):
                # Refused (say, the collection's metadata keys are used up): nothing was written.
                at = f"{field}[{prepared[image_id].position}].metadata"
                result.error = InvalidArgument(f"{at} was refused by the index: {error.message}", field=at,
                                               reason=error.reason)
            else:
                # Unknown outcome: the shard may still commit it. The object stays, so a
                # retry (or repair) finishes the job; deleting it could leave a vector with no image.
                error.message = f"{error.message}; the image is stored, upload it again to finish indexing it"
                result.error = error
