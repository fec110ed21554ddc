"""The gateway prices searches and uploads for admission (gateway.admission)."""

from __future__ import annotations

import pytest

from clipsearch.admission import BUDGET_EXHAUSTED, DEADLINE_UNMEETABLE, Admission
from clipsearch.errors import ResourceExhausted
from gateway.admission import SEARCH, UPLOAD, GatewayAdmission
from gateway.deadline import Deadline
from gateway.settings import GatewaySettings
from gateway.types import QueryPart, SearchRequest, UploadItem


def test_settings_build_a_learning_admission_with_the_byte_budget_and_wait_bound():
    admission = GatewayAdmission(GatewaySettings(max_in_flight_mb=3, max_queue_wait_ms=250)).admission
    assert (admission.max_bytes, admission.max_wait, admission.learn_from_latency) == (3 * 2**20, 0.25, True)


def test_searches_cost_their_query_bytes_and_uploads_their_images():
    gateway = GatewayAdmission(GatewaySettings(), Admission("test", max_bytes=1000))
    search = SearchRequest(parts=[QueryPart(text="abc"), QueryPart(image_data=b"x" * 100)])
    with gateway.search(search, Deadline(None)) as ticket:
        assert (ticket.kind, ticket.items, ticket.bytes) == (SEARCH, 1, 103)
        upload = gateway.upload([UploadItem(b"y" * 400, {}), UploadItem(b"z" * 400, {})], Deadline(None))
        assert (upload.kind, upload.items, upload.bytes) == (UPLOAD, 2, 800)
        with pytest.raises(ResourceExhausted) as caught:
            gateway.upload([UploadItem(b"w" * 200, {})], Deadline(None))
        assert caught.value.reason == BUDGET_EXHAUSTED and caught.value.retry_after
        upload.release()
    assert gateway.admission.in_flight_bytes == 0


def test_the_callers_deadline_bounds_the_work_admitted_ahead():
    gateway = GatewayAdmission(GatewaySettings(), Admission("test"))
    gateway.admission.observe(SEARCH, 0.5, 1)
    held = gateway.search(SearchRequest(parts=[QueryPart(text="a")]), Deadline(None))
    with pytest.raises(ResourceExhausted) as caught:
        gateway.search(SearchRequest(parts=[QueryPart(text="b")]), Deadline(0.8))
    assert caught.value.reason == DEADLINE_UNMEETABLE and caught.value.retry_after == pytest.approx(0.2, abs=0.05)
    held.release()
    gateway.search(SearchRequest(parts=[QueryPart(text="b")]), Deadline(0.8)).release()
