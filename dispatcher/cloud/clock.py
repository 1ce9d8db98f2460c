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
    """A clock that only moves when told to.

    With ``auto_advance`` (the default, for unit tests of one component) an awaited
    ``sleep(s)`` yields once and then moves the clock ``s`` forward. Without it (simulations of
    the whole dispatcher) ``sleep`` waits until the test's ``advance()`` calls have moved the
    clock past the wake-up time, so concurrent sleepers do not push time for each other.
    """

    def __init__(self, start: float = 1_800_000_000.0, *, auto_advance: bool = True) -> None:
        self.t = start
        self.auto_advance = auto_advance
        self._waiters: list[asyncio.Future[None]] = []

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        """Move time forward and wake sleepers (they re-check their deadline)."""
        self.t += seconds
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def sleep(self, seconds: float) -> None:
        if self.auto_advance:
            # Yield to the loop so that other tasks make progress, then jump forward.
            await asyncio.sleep(0)
            self.t += max(0.0, seconds)
            return
        target = self.t + max(0.0, seconds)
        while self.t < target:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            await fut
