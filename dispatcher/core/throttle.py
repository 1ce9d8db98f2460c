"""``Containers.MinRetryPeriod``: at most one dispatch attempt per container per period.

Reference 3.13 / 7.5: per container UUID, remember when the last *allowed* attempt happened; a
new attempt is refused while that is less than ``hold_s`` ago. The first attempt is always
allowed, and ``hold_s == 0`` disables the throttle. Entries older than the hold are purged, so
the map does not grow with every container ever seen.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class MinRetryPeriod:
    """Per-key attempt throttle with an injectable monotonic clock (for tests)."""

    def __init__(self, hold_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.hold_s = max(0.0, hold_s)
        self._clock = clock
        self._last: dict[str, float] = {}
        self._last_purge = clock()

    def check(self, key: str) -> bool:
        """True (and record the attempt) if an attempt for ``key`` is allowed now."""
        if self.hold_s <= 0:
            return True
        now = self._clock()
        self._maybe_purge(now)
        last = self._last.get(key)
        if last is not None and now - last < self.hold_s:
            return False
        self._last[key] = now
        return True

    def _maybe_purge(self, now: float) -> None:
        if now - self._last_purge < self.hold_s:
            return
        self._last_purge = now
        for key in [k for k, t in self._last.items() if now - t >= self.hold_s]:
            del self._last[key]

    def __len__(self) -> int:
        return len(self._last)
