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
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator

from google.protobuf import json_format, timestamp_pb2

from clipsearch.common.v1 import common_pb2
from clipsearch.errors import (
    ClipsearchError, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, Unavailable,
)
from clipsearch.gateway.v1 import gateway_service_pb2 as gpb
from clipsearch.item_status import item_status
from clipsearch.s3 import is_missing_error, make_s3_client, parse_s3_uri

from gateway import metrics
from gateway.rpc import Deadline

if TYPE_CHECKING:
    from gateway.engine import Gateway

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"}
MAX_REPORTED_ERRORS = 20
JOB_ID_RE = re.compile(r"^imp-[0-9a-f]{24}$")
BATCH_RETRIES = 3


def job_id_for(collection: str, source: str) -> str:
    return "imp-" + hashlib.sha256(f"{collection}\n{source}".encode()).hexdigest()[:24]


def _now() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
    return ts


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


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
                    if name.startswith(".") or not _is_image_name(name):
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
                     if _is_image_name(obj["Key"]) and obj["Key"] > cursor]
            if files:
                yield files
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    def read(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def describe(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"


@dataclass
class Job:
    proto: gpb.ImportJob
    metadata: common_pb2.Metadata
    cursor: str = ""
    task: asyncio.Task | None = field(default=None, repr=False)

    def to_json(self) -> str:
        return json.dumps({
            "job": json_format.MessageToDict(self.proto),
            "metadata": json_format.MessageToDict(self.metadata),
            "cursor": self.cursor,
        })

    @classmethod
    def from_json(cls, text: str) -> "Job":
        data = json.loads(text)
        job = json_format.ParseDict(data["job"], gpb.ImportJob())
        metadata = json_format.ParseDict(data.get("metadata", {}), common_pb2.Metadata())
        return cls(job, metadata, data.get("cursor", ""))

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()


class ImportManager:
    def __init__(self, gateway: "Gateway"):
        self.gateway = gateway
        self.settings = gateway.settings
        self.folder = Path(self.settings.data_dir).expanduser() / "imports"
        self.jobs: dict[str, Job] = {}
        self._s3 = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if not self.settings.import_resume_on_start:
            return
        for path in sorted(self.folder.glob("imp-*.json")):
            try:
                job = Job.from_json(path.read_text())
            except (ValueError, KeyError, json_format.ParseError) as exc:
                log.warning("ignoring unreadable import job state %s: %s", path, exc)
                continue
            if job.proto.state == gpb.IMPORT_STATE_RUNNING:
                try:
                    source = self._source(job.proto.source)
                except ClipsearchError as exc:
                    log.warning("cannot resume import %s: %s", job.proto.job_id, exc.message)
                    continue
                log.info("resuming import %s from %s after %r", job.proto.job_id, job.proto.source, job.cursor)
                self.jobs[job.proto.job_id] = job
                self._launch(job, source)

    async def close(self) -> None:
        """Stops running jobs; their state stays RUNNING on disk, so they resume later."""
        tasks = [job.task for job in self.jobs.values() if job.running]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------ API

    def _source(self, source: str) -> Source:
        source = source.strip()
        if not source:
            raise InvalidArgument("source is empty: give s3://bucket/prefix or a folder path", field="source")
        if source.startswith("s3://"):
            location = parse_s3_uri(source, field="source")
            if self._s3 is None:
                self._s3 = make_s3_client(self.settings.s3_endpoint_url, self.settings.s3_region)
            return S3Source(location.bucket, location.key.lstrip("/"), self._s3)
        if "://" in source:
            raise InvalidArgument(f"source {source!r} must be s3://bucket/prefix or a folder path", field="source")
        if not self.settings.import_roots:
            raise FailedPrecondition(
                "imports from local folders are disabled on this gateway; its operator can allow folders with "
                "--import-roots (or import from s3://bucket/prefix)", reason="LOCAL_IMPORT_DISABLED",
            )
        path = Path(os.path.realpath(os.path.expanduser(source)))
        roots = [Path(os.path.realpath(os.path.expanduser(r))) for r in self.settings.import_roots]
        if not any(path == root or path.is_relative_to(root) for root in roots):
            raise PermissionDenied(
                f"source folder {source!r} is outside the folders this gateway may import from", field="source",
            )
        return LocalSource(path)

    async def import_images(self, request: gpb.ImportImagesRequest) -> gpb.ImportJob:
        collection = self.gateway.resolve(request.collection)
        source = self._source(request.source)
        await source.check()
        await self.gateway.collection(collection, Deadline.after(self.settings.index_timeout_seconds))
        for key, value in request.metadata.fields.items():
            if not key or value.WhichOneof("kind") is None:
                raise InvalidArgument(f"metadata[{key!r}] needs a key and a value", field="metadata")
        job_id = job_id_for(collection, source.uri)
        job = self.jobs.get(job_id) or self._load(job_id)
        if job is not None and job.running:
            return _copy(job.proto)
        now = _now()
        if job is None:
            job = Job(gpb.ImportJob(job_id=job_id, collection=collection, source=source.uri, create_time=now),
                      common_pb2.Metadata())
        elif job.proto.state == gpb.IMPORT_STATE_SUCCEEDED:
            # A fresh pass: new files are imported, the rest are skipped.
            created = job.proto.create_time
            job = Job(gpb.ImportJob(job_id=job_id, collection=collection, source=source.uri, create_time=created),
                      common_pb2.Metadata())
        job.metadata.CopyFrom(request.metadata)
        job.proto.state = gpb.IMPORT_STATE_RUNNING
        job.proto.update_time.CopyFrom(now)
        self.jobs[job_id] = job
        self._save(job)
        self._launch(job, source)
        return _copy(job.proto)

    def get(self, job_id: str) -> gpb.ImportJob:
        if not JOB_ID_RE.match(job_id or ""):
            raise InvalidArgument(f"job_id {job_id[:80]!r} is not an import job id", field="job_id")
        job = self.jobs.get(job_id) or self._load(job_id)
        if job is None:
            raise NotFound(f"import job {job_id} does not exist", field="job_id")
        return _copy(job.proto)

    # ------------------------------------------------------------------ state

    def _path(self, job_id: str) -> Path:
        return self.folder / f"{job_id}.json"

    def _load(self, job_id: str) -> Job | None:
        path = self._path(job_id)
        if not path.exists():
            return None
        try:
            return Job.from_json(path.read_text())
        except (ValueError, KeyError, json_format.ParseError) as exc:
            log.warning("unreadable import job state %s (%s); starting over", path, exc)
            return None

    def _save(self, job: Job) -> None:
        job.proto.update_time.CopyFrom(_now())
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(job.proto.job_id)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(job.to_json())
        os.replace(tmp, path)

    # ------------------------------------------------------------------ running

    def _launch(self, job: Job, source: Source) -> None:
        job.task = asyncio.get_running_loop().create_task(self._run(job, source), name=job.proto.job_id)

    async def _run(self, job: Job, source: Source) -> None:
        metrics.IMPORT_JOBS_RUNNING.inc()
        proto = job.proto
        proto.total = proto.processed  # files before the cursor were counted by the earlier run
        proto.listing_done = False
        started = time.monotonic()
        done_at_start = proto.processed
        try:
            batch: list[SourceFile] = []
            async for files in source.list_after(job.cursor):
                for f in files:
                    proto.total += 1
                    batch.append(f)
                    if len(batch) >= self.settings.import_batch_size:
                        await self._batch(job, source, batch)
                        batch = []
                        await self._throttle(proto.processed - done_at_start, started)
            proto.listing_done = True
            if batch:
                await self._batch(job, source, batch)
            proto.state = gpb.IMPORT_STATE_SUCCEEDED
            log.info("import %s done: %d imported, %d skipped, %d failed", proto.job_id, proto.imported,
                     proto.skipped, proto.failed)
        except asyncio.CancelledError:
            log.info("import %s interrupted at %r; it resumes on the next start", proto.job_id, job.cursor)
            self._save(job)
            raise
        except ClipsearchError as exc:
            self._fail(job, "", exc)
        except Exception as exc:  # noqa: BLE001 - a job must end in a state, never silently
            log.exception("import %s failed", proto.job_id)
            self._fail(job, "", Unavailable(f"{type(exc).__name__}: {exc}"))
        finally:
            metrics.IMPORT_JOBS_RUNNING.dec()
        self._save(job)

    def _fail(self, job: Job, key: str, error: ClipsearchError) -> None:
        log.warning("import %s failed: %s", job.proto.job_id, error)
        job.proto.state = gpb.IMPORT_STATE_FAILED
        self._record_error(job, key, error)

    @staticmethod
    def _record_error(job: Job, key: str, error: ClipsearchError) -> None:
        if len(job.proto.errors) < MAX_REPORTED_ERRORS:
            job.proto.errors.add(source_key=key, status=item_status(error))

    async def _throttle(self, done: int, started: float) -> None:
        rate = self.settings.import_max_images_per_second
        if rate > 0:
            ahead = done / rate - (time.monotonic() - started)
            if ahead > 0:
                await asyncio.sleep(ahead)

    async def _batch(self, job: Job, source: Source, files: list[SourceFile]) -> None:
        from gateway.engine import IngestItem

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
        items = [IngestItem(datas[i], job.metadata, os.path.basename(files[i].key), source.describe(files[i].key))
                 for i in positions]
        results = []
        if items:
            for attempt in range(BATCH_RETRIES + 1):
                deadline = Deadline.after(self.settings.encoder_timeout_seconds + 2 * self.settings.index_timeout_seconds
                                          + self.settings.storage_timeout_seconds)
                try:
                    results = await self.gateway.ingest(job.proto.collection, items, deadline, field="files")
                    break
                except Unavailable as exc:
                    if attempt == BATCH_RETRIES:
                        raise
                    delay = 0.5 * 2 ** attempt
                    log.info("import %s: %s; retrying the batch in %.1fs", job.proto.job_id, exc.message, delay)
                    await asyncio.sleep(delay)
        proto = job.proto
        for i, error in failures.items():
            proto.failed += 1
            metrics.IMPORTED_IMAGES.labels("failed").inc()
            self._record_error(job, source.describe(files[i].key), error)
        for i, result in zip(positions, results):
            if result.error is not None:
                proto.failed += 1
                metrics.IMPORTED_IMAGES.labels("failed").inc()
                self._record_error(job, source.describe(files[i].key), result.error)
            elif result.created:
                proto.imported += 1
                metrics.IMPORTED_IMAGES.labels("imported").inc()
            else:
                proto.skipped += 1
                metrics.IMPORTED_IMAGES.labels("skipped").inc()
        proto.processed += len(files)
        job.cursor = files[-1].key
        self._save(job)


def _copy(job: gpb.ImportJob) -> gpb.ImportJob:
    out = gpb.ImportJob()
    out.CopyFrom(job)
    return out
