"""Repair jobs: walk a collection's stored objects and index entries in id
order and make them agree again.

- An object with no index entry is re-indexed (embedded again, with the
  metadata the gateway derives from the bytes), unless it is left over from an
  unfinished DeleteImage (its deletion marker says so): then it is removed.
- An index entry whose object is gone is dropped from the index and reported,
  so its owner can upload the image again.
- After the walk, a deletion marker of an image both stored and indexed is
  dropped (the deletion failed before it removed anything; the image stays),
  and so is one of an image neither stored nor indexed (the deletion finished
  but for its marker).

The walk goes in windows of ids after a cursor, saved after each window, so
an interrupted job resumes where it stopped. A dry run counts and changes
nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from pathlib import Path

from clipsearch.errors import ClipsearchError

from gateway import metrics
from gateway.collections import Collections
from gateway.deadline import Deadline
from gateway.ingest import Ingestor
from gateway.jobs import JobStore, Saved, record_error
from gateway.settings import GatewaySettings
from gateway.shards import ShardSet
from gateway.storage import ImageStorage, image_deletion_marker
from gateway.types import JOB_SUCCEEDED, RepairJob, UploadItem

log = logging.getLogger(__name__)

JOB_ID_PATTERN = r"rep-[0-9a-f]{24}"
WINDOW = 256
MAX_REPORTED_IDS = 100
# ids sort below this, so it stands for "the end" of an id range
END = "~"


def job_id_for(collection: str, dry_run: bool) -> str:
    return "rep-" + hashlib.sha256(f"{collection}\n{dry_run}".encode()).hexdigest()[:24]


class RepairJobs:
    def __init__(self, settings: GatewaySettings, collections: Collections, shards: ShardSet,
                 storage: ImageStorage, ingestor: Ingestor):
        self.settings = settings
        self.collections = collections
        self.shards = shards
        self.storage = storage
        self.ingestor = ingestor
        self.store: JobStore[RepairJob] = JobStore(Path(settings.data_dir).expanduser() / "repairs", RepairJob,
                                                   JOB_ID_PATTERN)

    async def start(self) -> None:
        for saved in self.store.unfinished():
            log.info("resuming repair %s of %r after %r", saved.job.job_id, saved.job.collection, saved.cursor)
            self.store.launch(saved, self._run)

    async def close(self) -> None:
        await self.store.close()

    async def repair(self, collection: str, dry_run: bool) -> RepairJob:
        name = self.collections.resolve(collection)
        await self.collections.describe(name, self._deadline())
        job_id = job_id_for(name, dry_run)
        saved = self.store.find(job_id)
        if saved is not None and saved.running:
            return dataclasses.replace(saved.job)
        if saved is None or saved.job.state == JOB_SUCCEEDED:
            saved = Saved(RepairJob(job_id=job_id, collection=name, dry_run=dry_run, create_time=time.time()))
        self.store.launch(saved, self._run)
        return dataclasses.replace(saved.job)

    def get(self, job_id: str) -> RepairJob:
        return self.store.get(job_id)

    def _deadline(self) -> Deadline:
        return Deadline.after(self.settings.encoder_timeout_seconds + 2 * self.settings.index_timeout_seconds
                              + self.settings.storage_timeout_seconds)

    async def _run(self, saved: Saved[RepairJob]) -> None:
        name = saved.job.collection
        while True:
            stored = await self.storage.list_ids(name, saved.cursor, WINDOW)
            upper = stored[-1] if len(stored) == WINDOW else END
            indexed = await self._indexed_ids(name, saved.cursor, upper)
            await self._window(saved, set(stored), indexed)
            if upper == END:
                break
            saved.cursor = upper
            self.store.save(saved)
        await self._settle_markers(saved.job)
        saved.cursor = ""
        saved.job.state = JOB_SUCCEEDED
        job = saved.job
        log.info("repair of %r done: %d checked, %d re-indexed, %d dropped, %d removed, %d failed%s", name,
                 job.checked, job.reindexed, job.dropped, job.removed, job.failed, " (dry run)" if job.dry_run else "")

    async def _indexed_ids(self, name: str, after: str, upper: str) -> set[str]:
        """Index ids in (after, upper]."""
        ids: set[str] = set()
        while True:
            records, more = await self.shards.list(name, after, 1000, self._deadline(), include_metadata=False)
            ids.update(r.id for r in records if r.id <= upper)
            if not more or not records or records[-1].id >= upper:
                return ids
            after = records[-1].id

    async def _window(self, saved: Saved[RepairJob], stored: set[str], indexed: set[str]) -> None:
        job, name = saved.job, saved.job.collection
        job.checked += len(stored | indexed)
        # An upload that finished after the storage listing looks dangling: look again before dropping.
        dangling = [i for i in sorted(indexed - stored) if await self.storage.head(name, i) is None]
        orphans = sorted(stored - indexed)
        if dangling:
            job.dropped += len(dangling)
            metrics.REPAIRED_IDS.labels("dropped").inc(len(dangling))
            room = MAX_REPORTED_IDS - len(job.dropped_ids)
            job.dropped_ids.extend(dangling[:max(room, 0)])
            if not job.dry_run:
                await self._fixing(job, dangling, self.shards.delete(name, dangling, self._deadline()))
                log.warning("repair of %r dropped %d index entries whose image was gone: %s", name, len(dangling),
                            ", ".join(dangling[:10]))
        for image_id in orphans:
            # Looked up now, not listed ahead: a deletion that started during the walk must win.
            if await self.storage.has_marker(image_deletion_marker(name, image_id)):
                job.removed += 1
                metrics.REPAIRED_IDS.labels("removed").inc()
                if not job.dry_run:
                    await self._fixing(job, [image_id], self._finish_deletion(name, image_id))
            else:
                job.reindexed += 1
                metrics.REPAIRED_IDS.labels("reindexed").inc()
                if not job.dry_run:
                    await self._fixing(job, [image_id], self._reindex(name, image_id))

    async def _settle_markers(self, job: RepairJob) -> None:
        """Drops the deletion markers the walk left: of an image both stored and indexed (its
        deletion failed before it removed anything; the image stays) or neither (the deletion
        finished but for its marker)."""
        prefix = image_deletion_marker(job.collection, "")
        for marker in await self.storage.list_markers(prefix):
            image_id = marker[len(prefix):]
            await self._fixing(job, [image_id], self._settle(job, image_id, marker))

    async def _settle(self, job: RepairJob, image_id: str, marker: str) -> None:
        stored = await self.storage.head(job.collection, image_id) is not None
        indexed = image_id in await self.shards.fetch(job.collection, [image_id], self._deadline())
        if stored == indexed and not job.dry_run:
            await self.storage.delete_marker(marker)

    async def _fixing(self, job: RepairJob, ids: list[str], fix) -> None:
        try:
            await fix
        except ClipsearchError as error:
            job.failed += len(ids)
            record_error(job, ids[0], error)

    async def _finish_deletion(self, name: str, image_id: str) -> None:
        await self.storage.delete(name, image_id)
        await self.storage.delete_marker(image_deletion_marker(name, image_id))

    async def _reindex(self, name: str, image_id: str) -> None:
        data = await self.storage.get(name, image_id)
        [result] = await self.ingestor.ingest(name, [UploadItem(data)], self._deadline(), field="object")
        if result.error is not None:
            raise result.error
