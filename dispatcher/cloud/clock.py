"""Time for the cloud dispatcher, injectable so that tests never sleep.

Everything in ``dispatcher.cloud`` that needs "now" or a pause takes a :class:`Clock`. The real
one uses wall-clock epoch seconds (instance tags and the API's ``created_at`` are wall-clock
times) and ``asyncio.sleep``; :class:`FakeClock` is advanced by the test and its ``sleep``
advances it instead of waiting.
"""

from __future__ import annotations

import asyncio
import time


class Clock:
    """Wall-clock time in epoch seconds and an awaitable pause."""

    def now(self) -> float:
        """Seconds since the epoch."""
        return time.time()

    async def sleep(self, seconds: float) -> None:
        """Pause the calling task."""
        await asyncio.sleep(max(0.0, seconds))


class FakeClock(Clock):
    """A clock that only moves when told to: ``advance(s)`` or an awaited ``sleep(s)``."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.t = start

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        """Move time forward."""
        self.t += seconds

    async def sleep(self, seconds: float) -> None:
        # Yield to the loop so that other tasks make progress, then jump forward.
        await asyncio.sleep(0)
        self.t += max(0.0, seconds)
