"""A dynamic batcher: concurrent requests are merged into one model call.

Each request submits its items; a worker takes items off a bounded queue until
the batch is full (``max_batch_size``) or the oldest item has waited
``max_queue_delay_ms``, runs one model call in the model thread, and hands every
request back its own rows. With a delay of 0 a lone request runs at once, and
whatever arrives while the model is busy forms the next batch, so batches grow
with load and an idle service adds no latency. A full queue refuses new work at once
(ResourceExhausted) instead of letting memory grow. Items whose deadline passed
while they waited, or whose caller went away, are dropped before the model call;
each model call's time per item is reported to the admission (clipsearch.admission).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

from clipsearch.admission import DROPPED_CANCELLED, DROPPED_EXPIRED, Admission
from clipsearch.errors import DeadlineExceeded, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

BATCH_SIZE = Histogram(
    "clipsearch_encoder_batch_size", "Items per model call.", ["kind"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
QUEUE_DEPTH = Gauge("clipsearch_encoder_queue_depth", "Items waiting for a model call.", ["kind"])
MODEL_SECONDS = Histogram(
    "clipsearch_encoder_model_seconds", "Seconds per model call.", ["kind"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
MODEL_CALLS = Counter("clipsearch_encoder_model_calls_total", "Model calls made.", ["kind"])
REJECTED = Counter(
    "clipsearch_encoder_queue_rejected_total", "Requests refused because the queue was full.", ["kind"]
)


@dataclass
class _Pending:
    item: Any
    future: asyncio.Future
    enqueued: float
    expires: float | None = None  # time.monotonic() deadline; None = none


class DynamicBatcher:
    def __init__(
        self,
        kind: str,
        run_batch: Callable[[list[Any]], Sequence[Any]],  # one row (or exception) per item
        executor: Executor,
        *,
        max_batch_size: int,
        max_queue_delay_ms: float,
        max_queue_size: int,
        admission: Admission | None = None,
    ):
        self.kind = kind
        self.admission = admission
        self.run_batch = run_batch
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.max_queue_delay = max_queue_delay_ms / 1000.0
        self.max_queue_size = max_queue_size
        self._queue: collections.deque[_Pending] = collections.deque()
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self._closed = False

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.kind}")

    async def close(self) -> None:
        self._closed = True
        self._wakeup.set()
        if self._worker is not None:
            await self._worker
        for pending in self._queue:
            if not pending.future.done():
                pending.future.set_exception(Unavailable("the encoder is shutting down"))
        self._queue.clear()

    async def submit(self, items: Sequence[Any], expires: float | None = None) -> np.ndarray:
        """Rows for ``items`` (in order), computed in shared batches; DeadlineExceeded when
        ``expires`` (``time.monotonic()``) passes before their model call."""
        return np.stack(await self._submit(items, return_exceptions=False, expires=expires))

    async def submit_each(self, items: Sequence[Any], expires: float | None = None) -> list[Any]:
        """Like ``submit``, but an item the model call rejected gets its exception in place of a row."""
        return await self._submit(items, return_exceptions=True, expires=expires)

    async def _submit(self, items: Sequence[Any], return_exceptions: bool, expires: float | None) -> list[Any]:
        if self._closed:
            raise Unavailable("the encoder is shutting down")
        if len(self._queue) + len(items) > self.max_queue_size:
            REJECTED.labels(self.kind).inc()
            raise ResourceExhausted(
                f"the {self.kind} queue is full ({len(self._queue)} waiting, limit {self.max_queue_size}); "
                "retry with backoff or add encoder replicas"
            )
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        futures = []
        for item in items:
            future = loop.create_future()
            self._queue.append(_Pending(item, future, now, expires))
            futures.append(future)
        QUEUE_DEPTH.labels(self.kind).set(len(self._queue))
        self._wakeup.set()
        return list(await asyncio.gather(*futures, return_exceptions=return_exceptions))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # Wait until the batch is full or the oldest item has waited long enough.
            oldest = self._queue[0].enqueued
            while len(self._queue) < self.max_batch_size and not self._closed:
                remaining = oldest + self.max_queue_delay - time.monotonic()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = [self._queue.popleft() for _ in range(min(self.max_batch_size, len(self._queue)))]
            QUEUE_DEPTH.labels(self.kind).set(len(self._queue))
            batch = self._drop_dead(batch)
            if not batch:
                continue
            started = time.perf_counter()
            try:
                rows = await loop.run_in_executor(self.executor, self.run_batch, [p.item for p in batch])
            except Exception as exc:  # noqa: BLE001 - delivered to every waiting request
                log.exception("%s model call failed", self.kind)
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                continue
            seconds = time.perf_counter() - started
            MODEL_SECONDS.labels(self.kind).observe(seconds)
            if self.admission is not None:
                self.admission.observe(self.kind, seconds, len(batch))
            MODEL_CALLS.labels(self.kind).inc()
            BATCH_SIZE.labels(self.kind).observe(len(batch))
            for pending, row in zip(batch, rows):
                if pending.future.done():
                    continue
                if isinstance(row, BaseException):  # this item alone failed
                    pending.future.set_exception(row)
                else:
                    pending.future.set_result(row)

    def _drop_dead(self, batch: list[_Pending]) -> list[_Pending]:
        """The items still worth computing: not cancelled by their caller, deadline not passed."""
        now = time.monotonic()
        live = []
        for pending in batch:
            if pending.future.cancelled():
                reason = DROPPED_CANCELLED
            elif pending.expires is not None and pending.expires <= now:
                reason = DROPPED_EXPIRED
                pending.future.set_exception(DeadlineExceeded(
                    f"the request's deadline passed while its {self.kind} waited in the queue"))
            else:
                live.append(pending)
                continue
            if self.admission is not None:
                self.admission.dropped(self.kind, reason)
        return live
