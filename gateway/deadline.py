"""The time left for one incoming request, split across the calls it makes.

Every downstream call gets what is left of the caller's deadline, less a small
margin, so the gateway always has time to answer with what it has (partial
results, per-item failures) before the caller gives up.
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, TypeVar

from clipsearch.errors import DeadlineExceeded

T = TypeVar("T")

# Kept back from every downstream call for the gateway's own answer: a tenth of
# what is left, at most half a second.
MARGIN_FRACTION = 0.1
MAX_MARGIN_SECONDS = 0.5


class Deadline:
    def __init__(self, seconds: float | None):
        self.expires = None if seconds is None else time.monotonic() + max(seconds, 0.0)

    @classmethod
    def after(cls, seconds: float | None) -> "Deadline":
        return cls(seconds)

    def remaining(self) -> float | None:
        return None if self.expires is None else self.expires - time.monotonic()

    @property
    def expired(self) -> bool:
        left = self.remaining()
        return left is not None and left <= 0

    def timeout(self, cap: float) -> float:
        """Seconds for the next downstream call: at most ``cap``, and over before the
        request's own deadline by the margin the gateway needs to answer."""
        left = self.remaining()
        if left is None:
            return cap
        budget = left - min(MAX_MARGIN_SECONDS, left * MARGIN_FRACTION)
        if budget <= 0.001:
            raise DeadlineExceeded("the request deadline passed before the gateway could finish")
        return min(cap, budget)

    async def run(self, awaitable: Awaitable[T], cap: float, what: str) -> T:
        """``awaitable`` under ``timeout(cap)``; DeadlineExceeded naming ``what`` when it runs out."""
        seconds = self.timeout(cap)
        try:
            return await asyncio.wait_for(awaitable, seconds)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"{what} did not finish within {seconds:.1f}s") from None
