"""Admission of searches and uploads by cost and deadline (the rule lives in
``clipsearch.admission``; this module prices the gateway's requests).

A search costs one item and the bytes of its query parts; an upload costs its
images and their bytes. The time per item of each is learned from the gateway's
own successful calls (latency divided by the calls in flight), since its work is
done downstream. A request the work in flight would make miss its deadline, or
whose bytes would pass ``max_in_flight_mb``, gets RESOURCE_EXHAUSTED at once,
with a retry hint. No gRPC here: the servicer hands over the deadline.
"""

from __future__ import annotations

from typing import Sequence

from clipsearch.admission import Admission, Ticket

from gateway.deadline import Deadline
from gateway.settings import GatewaySettings
from gateway.types import SearchRequest, UploadItem

SEARCH = "search"
UPLOAD = "upload"


class GatewayAdmission:
    def __init__(self, settings: GatewaySettings, admission: Admission | None = None):
        self.admission = admission or Admission(
            "gateway", max_bytes=settings.max_in_flight_mb * 1024 * 1024,
            max_wait=settings.max_queue_wait_ms / 1000.0, learn_from_latency=True,
        )

    def search(self, request: SearchRequest, deadline: Deadline, *more: SearchRequest) -> Ticket:
        """One search, or a batch of them (each query is one item)."""
        requests = (request, *more)
        nbytes = sum(len(p.text or "") + len(p.image_data or b"") + len(p.vector or b"")
                     for r in requests for p in r.parts)
        return self.admission.admit(SEARCH, items=len(requests), nbytes=nbytes, expires=deadline.expires)

    def upload(self, items: Sequence[UploadItem], deadline: Deadline) -> Ticket:
        return self.admission.admit(UPLOAD, items=max(1, len(items)), nbytes=sum(len(i.data) for i in items),
                                    expires=deadline.expires)
