"""Admission by cost and deadline (clipsearch.admission): pure logic on a fake clock."""

from __future__ import annotations

import pytest

from clipsearch.admission import (
    BUDGET_EXHAUSTED, DEADLINE_PASSED, DOWNSTREAM_BUSY, MAX_HOLD_OFF, DEADLINE_UNMEETABLE, MAX_RETRY_AFTER, MIN_RETRY_AFTER, Admission, ServiceTime,
)
from clipsearch.errors import ResourceExhausted


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def refusal(admission: Admission, kind: str, **cost) -> ResourceExhausted:
    with pytest.raises(ResourceExhausted) as caught:
        admission.admit(kind, **cost)
    return caught.value


def test_service_time_is_an_ewma_per_item_starting_from_the_first_measurement():
    estimate = ServiceTime(alpha=0.5)
    assert estimate.per_item == 0 and not estimate.measured
    estimate.observe(1.0, 10)  # 0.1 s per item
    assert estimate.per_item == pytest.approx(0.1)
    estimate.observe(3.0, 10)  # 0.3: halfway with alpha 0.5
    assert estimate.per_item == pytest.approx(0.2)
    estimate.observe(1.0, 0)  # nothing to learn from
    assert estimate.per_item == pytest.approx(0.2)


def test_unmeasured_work_is_admitted_whatever_the_deadline(clock):
    admission = Admission("test", clock=clock)
    for _ in range(100):
        admission.admit("image", items=8, expires=clock.now + 0.001)
    assert admission.in_flight_items("image") == 800


def test_a_passed_deadline_is_refused_without_a_retry_hint(clock):
    admission = Admission("test", clock=clock)
    error = refusal(admission, "text", expires=clock.now)
    assert error.reason == DEADLINE_PASSED and error.retry_after is None
    assert admission.in_flight_items("text") == 0


def test_a_deadline_the_work_ahead_cannot_meet_is_refused_with_the_drain_time_as_hint(clock):
    admission = Admission("test", clock=clock)
    admission.observe("image", 1.0, 10)  # 0.1 s per image
    ahead = admission.admit("image", items=5)  # 0.5 s of work ahead
    admission.admit("image", items=4, expires=clock.now + 1.0)  # 0.5 + 0.4 <= 1.0: admitted
    assert admission.backlog_seconds() == pytest.approx(0.9)
    error = refusal(admission, "image", items=2, expires=clock.now + 1.0)  # 0.9 + 0.2 > 1.0
    assert error.reason == DEADLINE_UNMEETABLE
    assert error.retry_after == pytest.approx(0.1)
    assert "overloaded" in error.message
    ahead.release()
    admission.admit("image", items=2, expires=clock.now + 1.0)  # 0.4 + 0.2 now fits


def test_every_kind_queued_ahead_counts_at_its_own_time_per_item(clock):
    admission = Admission("test", clock=clock)
    admission.observe("image", 0.1, 1)
    admission.observe("text", 0.01, 1)
    admission.admit("image", items=3)
    admission.admit("text", items=10)
    assert admission.backlog_seconds() == pytest.approx(0.4)
    assert refusal(admission, "text", expires=clock.now + 0.405).reason == DEADLINE_UNMEETABLE
    admission.admit("text", expires=clock.now + 0.42)


def test_max_wait_bounds_the_queue_even_without_a_deadline(clock):
    admission = Admission("test", max_wait=0.25, clock=clock)
    admission.observe("image", 0.1, 1)
    admission.admit("image", items=2)
    error = refusal(admission, "image")
    assert error.reason == DEADLINE_UNMEETABLE and error.retry_after == pytest.approx(0.05)
    admission.admit("text", items=1000)  # text unmeasured: costs no time yet


def test_the_byte_budget_refuses_a_request_that_would_pass_it_but_never_one_alone(clock):
    admission = Admission("test", max_bytes=1000, clock=clock)
    big = admission.admit("image", nbytes=5000)  # alone: admitted although over the budget
    assert refusal(admission, "image", nbytes=1).reason == BUDGET_EXHAUSTED
    big.release()
    first = admission.admit("image", nbytes=600)
    error = refusal(admission, "image", nbytes=500)
    assert error.reason == BUDGET_EXHAUSTED and error.retry_after == MIN_RETRY_AFTER
    admission.admit("image", nbytes=400)
    assert admission.in_flight_bytes == 1000
    first.release()
    first.release()  # twice is harmless
    assert admission.in_flight_bytes == 400


def test_retry_hints_are_clamped(clock):
    admission = Admission("test", clock=clock)
    admission.observe("image", 100.0, 1)
    admission.admit("image")
    assert refusal(admission, "image", expires=clock.now + 1).retry_after == MAX_RETRY_AFTER


def test_tickets_release_on_exit_and_learn_from_latency_when_asked(clock):
    admission = Admission("test", learn_from_latency=True, clock=clock)
    with admission.admit("search"):
        with admission.admit("search"):
            clock.now += 0.2  # two in flight for 0.2 s: 0.1 s per search
        clock.now += 0.1  # alone at its start and end, for 0.3 s in all: 0.3 s per search
    assert admission.in_flight_items("search") == 0
    assert admission.service_time("search").per_item == pytest.approx(0.1 + 0.2 * (0.3 - 0.1))
    with pytest.raises(RuntimeError):
        with admission.admit("search"):
            clock.now += 10
            raise RuntimeError("failed calls teach nothing")
    assert admission.service_time("search").per_item == pytest.approx(0.14)
    assert admission.in_flight_items("search") == 0


def test_observed_times_are_kept_when_not_learning_from_latency(clock):
    admission = Admission("test", clock=clock)
    with admission.admit("image"):
        clock.now += 5
    assert not admission.service_time("image").measured


def test_work_refused_downstream_with_a_hint_holds_off_new_work_until_the_hint_runs_out(clock):
    admission = Admission("test", clock=clock)
    with pytest.raises(ResourceExhausted):
        with admission.admit("search"):
            raise ResourceExhausted("the encoder is full", retry_after=0.2)
    assert admission.in_flight_items("search") == 0
    error = refusal(admission, "search")
    assert error.reason == DOWNSTREAM_BUSY and error.retry_after == pytest.approx(0.2)
    clock.now += 0.15
    assert refusal(admission, "search").retry_after == pytest.approx(0.05)
    clock.now += 0.06
    admission.admit("search").release()  # the hint ran out: work goes down again
    with pytest.raises(ResourceExhausted):
        with admission.admit("search"):
            raise ResourceExhausted("a refusal with no hint")
    admission.admit("search")  # holds nothing off
    with pytest.raises(ResourceExhausted):
        with admission.admit("search"):
            raise ResourceExhausted("a long hint", retry_after=20.0)
    assert refusal(admission, "search").retry_after == pytest.approx(MAX_HOLD_OFF)
