"""Bulk import of images from an S3 prefix or a local folder, as background jobs.

- The job id is derived from the collection and the normalized source, so the
  same request always names the same job (idempotent).
- Files are handled in sorted key order, in batches. After each batch the job
  state, with a cursor (the last key done), is written under the gateway's
  data dir (``<data_dir>/imports/<job_id>.json``, replaced atomically).
- A job that was interrupted (gateway stopped or killed) resumes after its
  cursor: on startup, or when ImportImages is called again. Images already in
  the collection are skipped (checked with FetchVectors before embedding), so a
  batch redone after a crash imports nothing twice. Calling ImportImages on a
  finished job runs a fresh pass over the source, which imports only new files.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable

from clipsearch.errors import ClipsearchError, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, Unavailable
from clipsearch.image_formats import is_image_file_name
from clipsearch.s3 import is_missing_error, make_s3_client

from gateway import metrics
from gateway.access import SourceAllowList, source_place
from gateway.collections import Collections
from gateway.deadline import Deadline
from gateway.ingest import Ingestor
from gateway.jobs import JobStore, Saved, metadata_from_json, metadata_to_json, record_error
from gateway.settings import GatewaySettings
from gateway.types import JOB_SUCCEEDED, ImportJob, Metadata, UploadItem
from gateway.validation import DEFAULT_LIST_PAGE_SIZE, MAX_PAGE_SIZE, check_metadata, clamp_page_size

log = logging.getLogger(__name__)

JOB_ID_PATTERN = r"imp-[0-9a-f]{24}"


def job_id_for(collection: str, source: str, collection_uid: str = "") -> str:
    """The same source into the same collection is the same job; a collection created again
    (a new uid) gets a new job, which starts from nothing."""
    return "imp-" + hashlib.sha256(f"{collection}\n{source}\n{collection_uid}".encode()).hexdigest()[:24]


@dataclass
class SourceFile:
    key: str  # relative path (local) or object key (S3); the sort and cursor order
    size: int


class Source:
    """Where an import reads from. Listing is in ascending key order."""

    uri: str

    def list_after(self, cursor: str) -> AsyncIterator[list[SourceFile]]:
        raise NotImplementedError

    def read(self, key: str) -> bytes:
        raise NotImplementedError

    def describe(self, key: str) -> str:
        raise NotImplementedError

    async def check(self) -> None:
        pass


class LocalSource(Source):
    def __init__(self, root: Path):
        self.root = root
        self.uri = str(root)

    async def check(self) -> None:
        if not self.root.is_dir():
            raise InvalidArgument(f"source folder {self.root} does not exist or is not a folder", field="source")

    async def list_after(self, cursor: str) -> AsyncIterator[list[SourceFile]]:
        def walk() -> list[SourceFile]:
            found = []
            for folder, dirs, files in os.walk(self.root, followlinks=False):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                for name in files:
                    if name.startswith(".") or not is_image_file_name(name):
                        continue
                    path = Path(folder) / name
                    if path.is_symlink():
                        continue  # a link could point outside the allowed roots
                    key = path.relative_to(self.root).as_posix()
                    if key > cursor:
                        try:
                            found.append(SourceFile(key, path.stat().st_size))
                        except OSError:
                            continue
            return sorted(found, key=lambda f: f.key)

        files = await asyncio.to_thread(walk)
        for start in range(0, len(files), 1000):
            yield files[start:start + 1000]

    def read(self, key: str) -> bytes:
        return (self.root / key).read_bytes()

    def describe(self, key: str) -> str:
        return str(self.root / key)


class S3Source(Source):
    def __init__(self, bucket: str, prefix: str, client):
        self.bucket, self.prefix, self.client = bucket, prefix, client
        self.uri = f"s3://{bucket}/{prefix}"

    async def check(self) -> None:
        def head() -> None:
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except Exception as exc:  # noqa: BLE001
                if is_missing_error(exc):
                    raise NotFound(f"bucket {self.bucket!r} does not exist", field="source") from None
                raise Unavailable(f"cannot reach bucket {self.bucket!r}: {exc}") from exc

        await asyncio.to_thread(head)

    async def list_after(self, cursor: str) -> AsyncIterator[list[SourceFile]]:
        token = None
        while True:
            kwargs = {"Bucket": self.bucket, "Prefix": self.prefix, "MaxKeys": 1000}
            if token:
                kwargs["ContinuationToken"] = token
            elif cursor:
                kwargs["StartAfter"] = cursor
            page = await asyncio.to_thread(lambda: self.client.list_objects_v2(**kwargs))
            files = [SourceFile(obj["Key"], int(obj["Size"])) for obj in page.get("Contents", [])
                     if is_image_file_name(obj["Key"]) and obj["Key"] > cursor]
            if files:
                yield files
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    def read(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def describe(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"


class ImportJobs:
    def __init__(self, settings: GatewaySettings, collections: Collections, ingestor: Ingestor):
        self.settings = settings
        self.collections = collections
        self.ingestor = ingestor
        self.store: JobStore[ImportJob] = JobStore(Path(settings.data_dir).expanduser() / "imports", ImportJob,
                                                   JOB_ID_PATTERN)
        self.allowed = SourceAllowList(settings.import_sources)
        self._s3 = None

    async def start(self) -> None:
        if not self.settings.import_resume_on_start:
            return
        for saved in self.store.unfinished():
            try:
                source = self._source(saved.job.source)
            except ClipsearchError as exc:
                log.warning("cannot resume import %s: %s", saved.job.job_id, exc.message)
                continue
            log.info("resuming import %s from %s after %r", saved.job.job_id, saved.job.source, saved.cursor)
            self.store.launch(saved, lambda s, source=source: self._run(s, source))

    async def close(self) -> None:
        await self.store.close()

    def _source(self, source: str) -> Source:
        """The source, once it is inside the gateway's import_sources allow-list; nothing
        is listed or read before that check."""
        if not source.strip():
            raise InvalidArgument("source is empty: give s3://bucket/prefix or a folder path", field="source")
        place = source_place(source)
        if not self.allowed.allows(place):
            raise PermissionDenied(
                f"source {str(place)[:200]!r} is outside the places this gateway may import from"
                + ("" if self.allowed else " (imports are off: its operator lists them in --import-sources)"),
                field="source", reason="IMPORT_SOURCE_NOT_ALLOWED",
            )
        if place.path is not None:
            return LocalSource(place.path)
        if self._s3 is None:
            self._s3 = make_s3_client(self.settings.s3_endpoint_url, self.settings.s3_region,
                                      timeout_seconds=self.settings.storage_timeout_seconds)
        return S3Source(place.bucket, place.prefix, self._s3)

    async def import_images(self, collection: str, source_uri: str, metadata: Metadata) -> ImportJob:
        collection = self.collections.resolve(collection)
        source = self._source(source_uri)
        await source.check()
        info = await self.collections.get(collection, Deadline.after(self.settings.index_timeout_seconds))
        check_metadata(metadata, "request")
        job_id = job_id_for(collection, source.uri, info.uid)
        saved = self.store.find(job_id)
        if saved is not None and saved.running:
            return dataclasses.replace(saved.job)
        now = time.time()
        if saved is None or saved.job.state == JOB_SUCCEEDED:
            # New, or a fresh pass over a finished one: new files are imported, the rest are skipped.
            created = saved.job.create_time if saved is not None else now
            saved = Saved(ImportJob(job_id=job_id, collection=collection, source=source.uri, create_time=created))
        saved.extra["metadata"] = metadata_to_json(metadata)
        saved.extra["collection_uid"] = info.uid
        self.store.launch(saved, lambda s: self._run(s, source))
        return dataclasses.replace(saved.job)

    def get(self, job_id: str) -> ImportJob:
        return self.store.get(job_id)

    def list(self, collection: str, page_size: int, page_token: str,
             visible: Callable[[str], bool]) -> tuple[list[ImportJob], str]:
        """The jobs of ``collection`` (every ``visible`` one when empty), a page at a time by job id."""
        size = clamp_page_size(page_size, DEFAULT_LIST_PAGE_SIZE, MAX_PAGE_SIZE)
        after = self.store.check_id(page_token) if page_token else ""
        name = self.collections.resolve(collection) if collection else ""
        jobs = [j for j in self.store.listed(after) if (j.collection == name if name else visible(j.collection))]
        return jobs[:size], jobs[size - 1].job_id if len(jobs) > size else ""

    async def cancel(self, job_id: str) -> ImportJob:
        return await self.store.cancel(job_id)

    async def _run(self, saved: Saved[ImportJob], source: Source) -> None:
        metrics.IMPORT_JOBS_RUNNING.inc()
        job = saved.job
        job.total = job.processed  # files before the cursor were counted by the earlier run
        job.listing_done = False
        started = time.monotonic()
        done_at_start = job.processed
        try:
            await self._check_identity(saved)
            batch: list[SourceFile] = []
            async for files in source.list_after(saved.cursor):
                for f in files:
                    job.total += 1
                    batch.append(f)
                    if len(batch) >= self.settings.import_batch_size:
                        await self._batch(saved, source, batch)
                        batch = []
                        await self._throttle(job.processed - done_at_start, started)
            job.listing_done = True
            if batch:
                await self._batch(saved, source, batch)
            job.state = JOB_SUCCEEDED
            log.info("import %s done: %d imported, %d skipped, %d failed", job.job_id, job.imported,
                     job.skipped, job.failed)
        finally:
            metrics.IMPORT_JOBS_RUNNING.dec()

    async def _check_identity(self, saved: Saved[ImportJob]) -> None:
        """A job resumed after its collection was deleted and created again must not treat the new
        collection as holding what the old one did: it fails, and ImportImages starts a new job."""
        expected = saved.extra.get("collection_uid")
        if expected is None:
            return
        info = await self.collections.get(saved.job.collection, Deadline.after(self.settings.index_timeout_seconds))
        if info.uid != expected:
            raise FailedPrecondition(f"collection {saved.job.collection!r} was created again since this import "
                                     "started; call ImportImages again to import into it", reason="COLLECTION_RECREATED")

    async def _throttle(self, done: int, started: float) -> None:
        rate = self.settings.import_max_images_per_second
        if rate > 0:
            ahead = done / rate - (time.monotonic() - started)
            if ahead > 0:
                await asyncio.sleep(ahead)

    async def _batch(self, saved: Saved[ImportJob], source: Source, files: list[SourceFile]) -> None:
        """One batch through ingest. An outage fails the job (its cursor is kept, so
        ImportImages resumes it); retries are the channels' job, not this loop's."""
        limit = self.settings.max_image_bytes
        failures: dict[int, ClipsearchError] = {}

        def read(i: int, f: SourceFile) -> bytes:
            if f.size > limit:
                failures[i] = InvalidArgument(f"{f.key} is {f.size} bytes; the limit is {limit}")
                return b""
            try:
                return source.read(f.key)
            except Exception as exc:  # noqa: BLE001 - one unreadable file must not stop the job
                failures[i] = Unavailable(f"cannot read {f.key}: {type(exc).__name__}: {exc}")
                return b""

        datas = await asyncio.gather(*(asyncio.to_thread(read, i, f) for i, f in enumerate(files)))
        positions = [i for i in range(len(files)) if i not in failures]
        metadata = metadata_from_json(saved.extra.get("metadata", {}))
        items = [UploadItem(datas[i], metadata, os.path.basename(files[i].key), source.describe(files[i].key))
                 for i in positions]
        results = []
        if items:
            deadline = Deadline.after(self.settings.encoder_timeout_seconds + 2 * self.settings.index_timeout_seconds
                                      + self.settings.storage_timeout_seconds)
            results = await self.ingestor.ingest(saved.job.collection, items, deadline, field="files")
        job = saved.job
        outcomes = [(i, error) for i, error in failures.items()]
        outcomes += [(i, result.error) for i, result in zip(positions, results)]
        for i, error in outcomes:
            if error is not None:
                job.failed += 1
                metrics.IMPORTED_IMAGES.labels("failed").inc()
                record_error(job, source.describe(files[i].key), error)
        for result in results:
            if result.error is None:
                outcome = "imported" if result.created else "skipped"
                setattr(job, outcome, getattr(job, outcome) + 1)
                metrics.IMPORTED_IMAGES.labels(outcome).inc()
        job.processed += len(files)
        saved.cursor = files[-1].key
        self.store.save(saved)
