"""Collections over the index shards: a short cache of their settings, the
model check, and deletions that complete even when a shard is down.

A deletion is recorded as a marker in object storage before any shard is
touched. While the marker exists the collection answers FAILED_PRECONDITION
(reason COLLECTION_DELETING) and cannot be created again; the gateway drops it
from every shard it can reach, and a background pass finishes the rest when the
missing shards return. Objects go last, so every indexed id keeps its object.
"""

from __future__ import annotations

import asyncio
import logging
import time

from clipsearch.errors import AlreadyExists, ClipsearchError, FailedPrecondition, NotFound, Unavailable

from gateway import metrics
from gateway.deadline import Deadline
from gateway.encoder import EncoderClient, ModelInfo
from gateway.settings import GatewaySettings
from gateway.shards import ShardSet
from gateway.storage import ImageStorage, collection_deletion_marker, image_deletion_marker
from gateway.types import CollectionDeletion, CollectionInfo
from gateway.validation import check_collection_name

log = logging.getLogger(__name__)

CACHE_SECONDS = 5.0
COLLECTION_DELETING = "COLLECTION_DELETING"
DELETION_MARKERS = collection_deletion_marker("")


class Collections:
    def __init__(self, settings: GatewaySettings, shards: ShardSet, storage: ImageStorage, encoder: EncoderClient):
        self.settings = settings
        self.shards = shards
        self.storage = storage
        self.encoder = encoder
        self._cache: dict[str, tuple[CollectionInfo, float]] = {}
        self.deleting: dict[str, list[str]] = {}  # collection -> shards it still waits for
        self.default_ready = not settings.create_default_collection

    # ------------------------------------------------------------------ reads

    def resolve(self, name: str, field: str = "collection") -> str:
        return check_collection_name(name or self.settings.default_collection, field)

    def check_not_deleting(self, name: str) -> None:
        if name in self.deleting:
            waiting = self.deleting[name]
            raise FailedPrecondition(
                f"collection {name!r} is being deleted"
                + (f"; the deletion finishes when index shard(s) {', '.join(waiting)} return" if waiting else "")
                + ". Create it again once GetCollection answers NOT_FOUND.",
                reason=COLLECTION_DELETING,
            )

    async def describe(self, name: str, deadline: Deadline) -> CollectionInfo:
        """The collection's settings, cached briefly; the first shard that answers is enough."""
        self.check_not_deleting(name)
        cached = self._cache.get(name)
        if cached and time.monotonic() - cached[1] < CACHE_SECONDS:
            return cached[0]
        collection = await self.shards.describe_collection(name, deadline)
        self._cache[name] = (collection, time.monotonic())
        return collection

    def forget(self, name: str) -> None:
        self._cache.pop(name, None)

    def check_model(self, collection: CollectionInfo, fingerprint: str, dim: int) -> None:
        """Refuses vectors of another model than the one the collection was built with."""
        if collection.model_fingerprint and fingerprint and collection.model_fingerprint != fingerprint:
            raise FailedPrecondition(
                f"model mismatch: collection {collection.name!r} holds vectors of model {collection.model_fingerprint} "
                f"but the encoder serves model {fingerprint}; its vectors are not comparable. Point the gateway at "
                "the encoder that built the collection, or import the images into a new collection.",
                reason="MODEL_FINGERPRINT_MISMATCH",
            )
        if dim and collection.dim != dim:
            raise FailedPrecondition(
                f"dimension mismatch: collection {collection.name!r} has dim {collection.dim} but the encoder "
                f"makes {dim}-d vectors",
                reason="DIMENSION_MISMATCH",
            )

    async def get(self, name: str, deadline: Deadline) -> CollectionInfo:
        self.check_not_deleting(name)
        collection = await self.shards.get_collection(name, deadline)
        self._cache[name] = (collection, time.monotonic())
        return collection

    async def list(self, deadline: Deadline) -> list[CollectionInfo]:
        return [c for c in await self.shards.list_collections(deadline) if c.name not in self.deleting]

    # ------------------------------------------------------------------ writes

    async def create(self, name: str, index_spec: str, num_shards: int, deadline: Deadline) -> CollectionInfo:
        name = check_collection_name(name, "name")
        self.check_not_deleting(name)
        if await self.storage.has_marker(collection_deletion_marker(name)):
            self.deleting.setdefault(name, [])
            self.check_not_deleting(name)
        info = await self.encoder.model_info(deadline)
        collection = await self.shards.create_collection(
            name, info.dim, index_spec or self.settings.default_index_spec, num_shards, info.fingerprint, deadline,
        )
        self.forget(name)
        return collection

    async def delete(self, name: str, deadline: Deadline) -> CollectionDeletion:
        name = check_collection_name(name, "name")
        if name not in self.deleting:
            await self.shards.describe_collection(name, deadline)  # NOT_FOUND when no shard has it
            await self.storage.put_marker(collection_deletion_marker(name))  # the durable intent
            self.deleting[name] = []
            self.forget(name)
        waiting = await self._finish_deletion(name, deadline)
        return CollectionDeletion(pending=bool(waiting), waiting_for_shards=waiting)

    async def _finish_deletion(self, name: str, deadline: Deadline) -> list[str]:
        """Drops the collection from every shard, then its objects, then the marker;
        the shards still to do, when some could not be reached."""
        waiting = await self.shards.delete_collection(name, deadline)
        if waiting:
            self.deleting[name] = waiting
            log.warning("collection %r is deleted except on shard(s) %s; finishing when they return",
                        name, ", ".join(waiting))
            return waiting
        removed = await self.storage.delete_collection(name)
        for marker in await self.storage.list_markers(image_deletion_marker(name, "")):
            await self.storage.delete_marker(marker)
        await self.storage.delete_marker(collection_deletion_marker(name))
        self.deleting.pop(name, None)
        self.forget(name)
        log.info("deleted collection %r and %d stored images", name, removed)
        return []

    async def finish_deletions(self) -> None:
        """One pass over the recorded deletions (this gateway's and other replicas')."""
        names = [marker[len(DELETION_MARKERS):] for marker in await self.storage.list_markers(DELETION_MARKERS)]
        for name in list(self.deleting):
            if name not in names:
                self.deleting.pop(name)  # finished by another replica
        for name in names:
            self.deleting.setdefault(name, [])
            try:
                await self._finish_deletion(name, Deadline.after(self.settings.index_timeout_seconds * 2))
            except ClipsearchError as exc:
                log.warning("could not finish deleting collection %r yet: %s", name, exc.message)
        metrics.PENDING_COLLECTION_DELETIONS.set(len(self.deleting))

    async def ensure_default(self, info: ModelInfo) -> None:
        name = self.settings.default_collection
        deadline = Deadline.after(self.settings.index_timeout_seconds * 3)
        try:
            collection = await self.shards.get_collection(name, deadline)
        except (NotFound, FailedPrecondition):  # on no shard, or not on every shard
            try:
                collection = await self.shards.create_collection(
                    name, info.dim, self.settings.default_index_spec, 0, info.fingerprint, deadline)
                log.info("created default collection %r (dim %d, fingerprint %s)", name, info.dim, info.fingerprint)
            except AlreadyExists:  # another gateway replica won the race
                collection = await self.shards.get_collection(name, deadline)
        self.default_ready = True
        if collection.dim != info.dim or (collection.model_fingerprint
                                          and collection.model_fingerprint != info.fingerprint):
            log.warning(
                "!!! default collection %r was built by model %s (dim %d) but the encoder serves %s (dim %d); "
                "searches and uploads there will be refused with FAILED_PRECONDITION !!!",
                name, collection.model_fingerprint, collection.dim, info.fingerprint, info.dim,
            )

    async def maintain(self) -> None:
        """Background work until cancelled: finish recorded deletions, and create the
        default collection once every shard can be reached."""
        while True:
            try:
                await self.finish_deletions()
                if not self.default_ready and self.encoder.info is not None:
                    await self.ensure_default(self.encoder.info)
            except ClipsearchError as exc:
                log.info("collection upkeep will retry: %s", exc.message)
            except Exception:  # noqa: BLE001 - the loop must survive anything
                log.exception("collection upkeep failed; retrying")
            await asyncio.sleep(self.settings.reconcile_interval_seconds)
