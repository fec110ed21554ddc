"""Admission by cost and deadline: the rule every service uses to turn overload
into fast RESOURCE_EXHAUSTED answers instead of queues that miss every deadline.

A request asks to be admitted with its cost: the items it brings (texts, images,
searches) of one kind, and the bytes it holds while in flight (payload, decoded
pixels). It is refused at once when

- its deadline has already passed (``DEADLINE_PASSED``);
- the work admitted ahead of it, plus its own, would take longer than its
  deadline allows (``DEADLINE_UNMEETABLE``), or longer than ``max_wait`` when
  one is set: the time per item of each kind is measured (an EWMA), so the
  estimate follows the machine and the model;
- its bytes would take the bytes in flight over the budget (``BUDGET_EXHAUSTED``).
  A request alone in an idle service is always admitted, so a large one is
  never starved;
- a service it depends on refused admitted work with a retry hint, and that
  hint has not run out (``DOWNSTREAM_BUSY``): passing more work down would only
  be refused there too, after costing a round trip each.

Every refusal is a ``ResourceExhausted`` with a ``retry_after`` hint: the time the
work ahead needs to drain. Work admitted but found expired before it is computed
is counted as dropped (``dropped``). No gRPC here; the clock can be faked.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from prometheus_client import Counter, Gauge

from clipsearch.errors import ResourceExhausted

# google.rpc.ErrorInfo reasons of a refusal, and the label values of the metrics.
DEADLINE_PASSED = "DEADLINE_PASSED"
DEADLINE_UNMEETABLE = "DEADLINE_UNMEETABLE"
BUDGET_EXHAUSTED = "BUDGET_EXHAUSTED"
DOWNSTREAM_BUSY = "DOWNSTREAM_BUSY"
# Reasons work is dropped after admission, before it is computed.
DROPPED_EXPIRED = "DEADLINE_PASSED"
DROPPED_CANCELLED = "CANCELLED"

MIN_RETRY_AFTER = 0.01
MAX_RETRY_AFTER = 30.0
# The longest a dependency's hint holds new work off: long enough to spare it the
# round trips it would refuse, short enough that one wrong hint costs little.
MAX_HOLD_OFF = 1.0

ADMITTED = Counter("clipsearch_admission_admitted_total", "Requests admitted.", ["service", "kind"])
REJECTED = Counter("clipsearch_admission_rejected_total", "Requests refused at admission, by reason.",
                   ["service", "kind", "reason"])
DROPPED = Counter("clipsearch_admission_dropped_total",
                  "Items admitted but dropped before they were computed, by reason.", ["service", "kind", "reason"])
IN_FLIGHT_BYTES = Gauge("clipsearch_admission_in_flight_bytes",
                        "Bytes held by admitted requests (payloads, decoded pixels).", ["service"])
IN_FLIGHT_ITEMS = Gauge("clipsearch_admission_in_flight_items", "Items admitted and not yet done.",
                        ["service", "kind"])
ITEM_SECONDS = Gauge("clipsearch_admission_item_seconds", "Measured seconds of work per item (EWMA).",
                     ["service", "kind"])


class ServiceTime:
    """An exponentially weighted moving average of seconds per item; 0 until measured."""

    def __init__(self, alpha: float = 0.2):
        self.alpha = alpha
        self.per_item = 0.0
        self.measured = False

    def observe(self, seconds: float, items: float) -> None:
        if items <= 0 or seconds < 0:
            return
        sample = seconds / items
        self.per_item = sample if not self.measured else self.per_item + self.alpha * (sample - self.per_item)
        self.measured = True


@dataclass
class Ticket:
    """One admitted request; ``release`` it when done (``with`` does that)."""

    admission: "Admission"
    kind: str
    items: int
    bytes: int
    started: float
    concurrent_at_start: int
    released: bool = False

    def release(self, succeeded: bool = False) -> None:
        """Frees the request's cost. With ``succeeded`` and an admission that learns from
        latency, the request's time counts as a measurement (latency / items in flight)."""
        if not self.released:
            self.released = True
            self.admission._release(self, succeeded)

    def __enter__(self) -> "Ticket":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release(succeeded=exc_type is None)
        if isinstance(exc, ResourceExhausted) and exc.retry_after:
            self.admission.hold_off(exc.retry_after)  # refused downstream: pass no more work down for a while


class Admission:
    """Admission of one service's work by cost and deadline.

    ``max_bytes``: budget of bytes in flight (0 = none). ``max_wait``: seconds the
    work ahead plus a request's own may be expected to take, at most (0 = only the
    deadline bounds it). ``learn_from_latency``: measure time per item from each
    successful request (latency divided by the items in flight then, Little's law),
    for services whose work is not one queue the caller can time (the gateway);
    otherwise the caller reports measurements with ``observe`` (a batcher's model calls).
    """

    def __init__(self, service: str, *, max_bytes: int = 0, max_wait: float = 0.0, learn_from_latency: bool = False,
                 clock: Callable[[], float] = time.monotonic):
        self.service = service
        self.max_bytes = max_bytes
        self.max_wait = max_wait
        self.learn_from_latency = learn_from_latency
        self.clock = clock
        self.in_flight_bytes = 0
        self.busy_until = 0.0  # a dependency asked for no work before then
        self._items: dict[str, int] = {}
        self._times: dict[str, ServiceTime] = {}

    # ------------------------------------------------------------------ measurements

    def service_time(self, kind: str) -> ServiceTime:
        found = self._times.get(kind)
        if found is None:
            found = self._times[kind] = ServiceTime()
        return found

    def observe(self, kind: str, seconds: float, items: float) -> None:
        """``seconds`` of work done for ``items`` items of ``kind`` (one model call, say)."""
        estimate = self.service_time(kind)
        estimate.observe(seconds, items)
        ITEM_SECONDS.labels(self.service, kind).set(estimate.per_item)

    def in_flight_items(self, kind: str) -> int:
        return self._items.get(kind, 0)

    def backlog_seconds(self) -> float:
        """Estimated seconds for the work admitted and not yet done."""
        return sum(count * self.service_time(kind).per_item for kind, count in self._items.items())

    def dropped(self, kind: str, reason: str, items: int = 1) -> None:
        """Counts admitted items dropped before they were computed."""
        DROPPED.labels(self.service, kind, reason).inc(items)

    # ------------------------------------------------------------------ admission

    def admit(self, kind: str, *, items: int = 1, nbytes: int = 0, expires: float | None = None) -> Ticket:
        """A ticket for ``items`` of ``kind`` holding ``nbytes``, due by ``expires``
        (on this admission's clock; None = no deadline); or ResourceExhausted."""
        now = self.clock()
        backlog = self.backlog_seconds()
        if expires is not None and expires <= now:
            self._refuse(kind, DEADLINE_PASSED, "the request's deadline passed before it was admitted", None)
        if now < self.busy_until:
            self._refuse(kind, DOWNSTREAM_BUSY, f"the {self.service} is overloaded downstream; retry after the "
                         "hinted delay, or on another replica", self.busy_until - now)
        own = items * self.service_time(kind).per_item
        limit = None if expires is None else expires - now
        if self.max_wait > 0:
            limit = self.max_wait if limit is None else min(limit, self.max_wait)
        if limit is not None and backlog + own > limit:
            self._refuse(kind, DEADLINE_UNMEETABLE,
                         f"the {self.service} is overloaded: the work queued ahead needs ~{backlog * 1000:.0f} ms "
                         f"and this request ~{own * 1000:.0f} ms, more than its {limit * 1000:.0f} ms allow; "
                         "retry after the hinted delay, with a longer deadline, or on another replica",
                         backlog + own - limit)
        if self.max_bytes and self.in_flight_bytes and self.in_flight_bytes + nbytes > self.max_bytes:
            self._refuse(kind, BUDGET_EXHAUSTED,
                         f"the {self.service} holds {self.in_flight_bytes} bytes of requests in flight; this one's "
                         f"{nbytes} would pass the budget of {self.max_bytes}; retry after the hinted delay",
                         backlog)
        concurrent = self._items.get(kind, 0)
        self._items[kind] = concurrent + items
        self.in_flight_bytes += nbytes
        ADMITTED.labels(self.service, kind).inc()
        self._publish(kind)
        return Ticket(self, kind, items, nbytes, now, concurrent + items)

    def hold_off(self, seconds: float) -> None:
        """A dependency refused work and asked for none for ``seconds``: refuse new work until then."""
        self.busy_until = max(self.busy_until, self.clock() + min(seconds, MAX_HOLD_OFF))

    def _refuse(self, kind: str, reason: str, message: str, retry_after: float | None) -> None:
        REJECTED.labels(self.service, kind, reason).inc()
        if retry_after is not None:
            retry_after = min(MAX_RETRY_AFTER, max(MIN_RETRY_AFTER, retry_after))
        raise ResourceExhausted(message, reason=reason, retry_after=retry_after)

    def _release(self, ticket: Ticket, succeeded: bool) -> None:
        if succeeded and self.learn_from_latency:
            concurrent = (ticket.concurrent_at_start + self._items.get(ticket.kind, 0)) / 2
            self.observe(ticket.kind, self.clock() - ticket.started, max(concurrent, ticket.items))
        self._items[ticket.kind] = max(0, self._items.get(ticket.kind, 0) - ticket.items)
        self.in_flight_bytes = max(0, self.in_flight_bytes - ticket.bytes)
        self._publish(ticket.kind)

    def _publish(self, kind: str) -> None:
        IN_FLIGHT_BYTES.labels(self.service).set(self.in_flight_bytes)
        IN_FLIGHT_ITEMS.labels(self.service, kind).set(self._items.get(kind, 0))
