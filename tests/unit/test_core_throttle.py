"""MinRetryPeriod (reference 3.13, 7.5 TestThrottle), on a fake clock."""

from __future__ import annotations

from dispatcher.core.throttle import MinRetryPeriod


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_zero_hold_always_allows():
    th = MinRetryPeriod(0, clock=Clock())
    assert all(th.check("a") for _ in range(5))


def test_tiny_hold_allows_after_it_passes():
    clock = Clock()
    th = MinRetryPeriod(1e-9, clock=clock)
    assert th.check("a")
    clock.t += 1e-6
    assert th.check("a")


def test_one_minute_hold():
    clock = Clock()
    th = MinRetryPeriod(60, clock=clock)
    assert th.check("a")
    assert not th.check("a")
    assert th.check("b")  # per key
    clock.t += 59
    assert not th.check("a")
    clock.t += 2
    assert th.check("a")
    assert not th.check("a")


def test_stale_entries_are_purged():
    clock = Clock()
    th = MinRetryPeriod(10, clock=clock)
    for i in range(100):
        th.check(str(i))
    assert len(th) == 100
    clock.t += 11
    th.check("new")
    assert len(th) == 1
