"""Background jobs that survive restarts: import and repair.

A job's state is a plain dataclass, written as JSON under
``<data_dir>/<kind>/<job_id>.json`` (a temporary file, then ``os.replace``)
after every step. On start, jobs left running are resumed from their cursor.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Generic, TypeVar

from clipsearch.errors import ClipsearchError, InvalidArgument, NotFound

from gateway.types import JOB_CANCELLED, JOB_FAILED, JOB_RUNNING, JobError, Metadata

log = logging.getLogger(__name__)

J = TypeVar("J")
MAX_REPORTED_ERRORS = 20


def metadata_to_json(metadata: Metadata) -> dict[str, Any]:
    return {key: {"timestamp": value.isoformat()} if isinstance(value, dt.datetime) else value
            for key, value in metadata.items()}


def metadata_from_json(data: dict[str, Any]) -> Metadata:
    return {key: dt.datetime.fromisoformat(value["timestamp"]) if isinstance(value, dict) else value
            for key, value in data.items()}


def record_error(job, key: str, error: ClipsearchError) -> None:
    """Keeps the first errors of a job, for diagnosis."""
    if len(job.errors) < MAX_REPORTED_ERRORS:
        job.errors.append(JobError(key, error.code, error.message))


@dataclasses.dataclass
class Saved(Generic[J]):
    """A job, what it needs to resume (``extra``), and its running task."""

    job: J
    cursor: str = ""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    task: asyncio.Task | None = None

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()


class JobStore(Generic[J]):
    def __init__(self, folder: Path, job_type: type, id_pattern: str):
        self.folder = folder
        self.job_type = job_type
        self.id_pattern = id_pattern
        self.jobs: dict[str, Saved[J]] = {}

    def check_id(self, job_id: str) -> str:
        if not re.fullmatch(self.id_pattern, job_id or ""):
            raise InvalidArgument(f"job_id {job_id[:80]!r} is not a job id of this kind", field="job_id")
        return job_id

    def path(self, job_id: str) -> Path:
        return self.folder / f"{job_id}.json"

    def find(self, job_id: str) -> Saved[J] | None:
        saved = self.jobs.get(job_id)
        if saved is None:
            saved = self._load(self.path(job_id))
            if saved is not None:
                self.jobs[job_id] = saved
        return saved

    def get(self, job_id: str) -> J:
        saved = self.find(self.check_id(job_id))
        if saved is None:
            raise NotFound(f"job {job_id} does not exist", field="job_id")
        return dataclasses.replace(saved.job)

    def _load(self, path: Path) -> Saved[J] | None:
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            job = data["job"]
            job["errors"] = [JobError(**e) for e in job.get("errors", [])]
            return Saved(self.job_type(**job), data.get("cursor", ""), data.get("extra", {}))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable job state %s: %s", path, exc)
            return None

    def save(self, saved: Saved[J]) -> None:
        saved.job.update_time = time.time()
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(saved.job.job_id)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"job": dataclasses.asdict(saved.job), "cursor": saved.cursor,
                                   "extra": saved.extra}))
        os.replace(tmp, path)

    def unfinished(self) -> list[Saved[J]]:
        """Jobs saved as running (by this process or one that stopped)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        found = []
        for path in sorted(self.folder.glob("*.json")):
            saved = self.jobs.get(path.stem) or self._load(path)
            if saved is not None and saved.job.state == JOB_RUNNING and not saved.running:
                self.jobs[saved.job.job_id] = saved
                found.append(saved)
        return found

    def launch(self, saved: Saved[J], run: Callable[[Saved[J]], Awaitable[None]]) -> None:
        """Runs ``run`` in the background; a job ends in a state, never silently."""
        saved.job.state = JOB_RUNNING
        self.jobs[saved.job.job_id] = saved
        self.save(saved)

        async def guarded() -> None:
            try:
                await run(saved)
            except asyncio.CancelledError:
                log.info("job %s interrupted at %r; it resumes on the next start", saved.job.job_id, saved.cursor)
                self.save(saved)
                raise
            except ClipsearchError as exc:
                self.fail(saved, exc)
            except Exception as exc:  # noqa: BLE001
                log.exception("job %s failed", saved.job.job_id)
                self.fail(saved, ClipsearchError(f"{type(exc).__name__}: {exc}"))
            self.save(saved)

        saved.task = asyncio.get_running_loop().create_task(guarded(), name=saved.job.job_id)

    def listed(self, after: str = "") -> list[J]:
        """Every job saved here with an id after ``after``, in id order (copies)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        found = []
        for path in sorted(self.folder.glob("*.json")):
            if path.stem > after and re.fullmatch(self.id_pattern, path.stem):
                saved = self.jobs.get(path.stem) or self._load(path)
                if saved is not None:
                    found.append(dataclasses.replace(saved.job))
        return found

    async def cancel(self, job_id: str) -> J:
        """Stops the job if it runs; it keeps its cursor and ends CANCELLED."""
        saved = self.find(self.check_id(job_id))
        if saved is None:
            raise NotFound(f"job {job_id} does not exist", field="job_id")
        if saved.running:
            saved.task.cancel()
            await asyncio.gather(saved.task, return_exceptions=True)
        if saved.job.state == JOB_RUNNING:
            saved.job.state = JOB_CANCELLED
            self.save(saved)
        return dataclasses.replace(saved.job)

    def fail(self, saved: Saved[J], error: ClipsearchError) -> None:
        log.warning("job %s failed: %s", saved.job.job_id, error)
        saved.job.state = JOB_FAILED
        record_error(saved.job, "", error)

    async def close(self) -> None:
        """Stops running jobs; their state stays running on disk, so they resume later."""
        tasks = [saved.task for saved in self.jobs.values() if saved.running]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
