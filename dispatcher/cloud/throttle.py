"""Pacing and hold-offs for cloud API calls (reference 5.10, 5.6.1, 7.12).

* :class:`RateLimiter` — ``CloudVMs.MaxCloudOpsPerSecond``: calls are spaced at least
  1/N seconds apart (a shared ticker, as the reference), 0 = unlimited.
* :class:`Holdoff` — "do not call before T" after a provider's rate-limit error, with a callback
  when it expires (so the scheduler retries without waiting for an unrelated event).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from dispatcher.cloud.clock import Clock


class RateLimiter:
    """At most ``per_second`` acquisitions per second, first come first served."""

    def __init__(self, per_second: float, clock: Clock | None = None) -> None:
        self.interval = 1.0 / per_second if per_second > 0 else 0.0
        self.clock = clock or Clock()
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def wait(self) -> None:
        """Return when the caller may make one call."""
        if self.interval <= 0:
            return
        async with self._lock:
            now = self.clock.now()
            slot = max(now, self._next)
            self._next = slot + self.interval
            if slot > now:
                await self.clock.sleep(slot - now)


class Holdoff:
    """An error that blocks calls until a deadline; ``notify`` runs when the deadline passes."""

    def __init__(self, clock: Clock | None = None, notify: Callable[[], None] | None = None) -> None:
        self.clock = clock or Clock()
        self.notify = notify
        self.until = 0.0
        self.error: Exception | None = None
        self._task: asyncio.Task[None] | None = None

    def error_until(self, error: Exception, until: float) -> None:
        """Hold calls off until ``until`` (epoch s); a past deadline clears the hold-off."""
        self.error = error if until > self.clock.now() else None
        self.until = until
        if self.error is not None and self.notify is not None:
            if self._task is not None:
                self._task.cancel()
            self._task = asyncio.get_running_loop().create_task(self._wake(until))

    async def _wake(self, until: float) -> None:
        await self.clock.sleep(max(0.0, until - self.clock.now()))
        if self.notify is not None:
            self.notify()

    def check(self) -> Exception | None:
        """The holding error, or None if calls may proceed."""
        if self.error is not None and self.clock.now() >= self.until:
            self.error = None
        return self.error
