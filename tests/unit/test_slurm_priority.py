"""PrioritySpread nice computation: every worked example and table case of reference 3.7/7.3/7.4,
idempotence, and the 1000-job churn test."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.slurm.priority import plan_renice, want_nice

# (spread, [(priority, nice) in wanted order], expected new nice values) -- reference 3.7 / 7.4.
TABLE = [
    (10, [], []),
    (10, [(4294000111, 10000)], [0]),
    (10, [(4294000111, 10000)] * 4, [0, 10, 20, 30]),
    # correctly ordered, small gaps: left alone
    (10, [(4294000113, 0), (4294000112, 1), (4294000111, 99)], [0, 1, 99]),
    # correctly ordered, larger but acceptable gaps: left alone
    (10, [(4294000144, 0), (4294000122, 20), (4294000111, 30)], [0, 20, 30]),
    # gaps more than 10x the spread: reduced
    (10, [(4000, 0), (3000, 999), (2000, 1998)], [0, 9, 18]),
    # impossible spread: the second job cannot go higher than nice 0
    (10, [(4000, 0), (3000, 500), (2000, 2000)], [0, 0, 510]),
    # reorder, default spread (worked example B)
    (10, [(4000, 0), (5000, 0), (6000, 0)], [0, 1010, 2020]),
    # reorder, minimum spread
    (1, [(4000, 0), (5000, 0), (6000, 0), (3000, 0)], [0, 1001, 2002, 0]),
    # PrioritySpread < 1 means 10
    (0, [(4000, 0), (5000, 0), (6000, 0)], [0, 1010, 2020]),
]


@pytest.mark.parametrize(("spread", "jobs", "want"), TABLE)
def test_renice_table(spread: int, jobs: list[tuple[int, int]], want: list[int]) -> None:
    assert want_nice(jobs, spread) == want


@pytest.mark.parametrize(("spread", "jobs", "want"), TABLE)
def test_renice_idempotent(spread: int, jobs: list[tuple[int, int]], want: list[int]) -> None:
    adjusted = [(p + n - new, new) for (p, n), new in zip(jobs, want, strict=True)]
    assert want_nice(adjusted, spread) == want


def test_worked_example_a_spread_1_and_100() -> None:
    """fake0/fake1 (reference 3.7 example A, 7.3 TestReniceAll): desired fake1 > fake0."""
    jobs = {"fake0": (4294000777, 10000), "fake1": (4294000444, 10000)}
    wanted = {"fake0": 1, "fake1": 999}
    assert plan_renice(wanted, jobs, 1) == {"fake1": 0, "fake0": 334}
    assert plan_renice(wanted, jobs, 100) == {"fake1": 0, "fake0": 433}


def test_single_job_gets_nice_zero() -> None:
    assert plan_renice({"fake0": 1}, {"fake0": (4294000777, 10000)}, 1) == {"fake0": 0}


def test_job_without_desired_priority_is_ignored() -> None:
    # 7.3: fake0 has no desired priority -> untouched; fake1 alone -> nice 0.
    jobs = {"fake0": (4294000777, 10000), "fake1": (4294000444, 112)}
    assert plan_renice({"fake1": 999}, jobs, 10) == {"fake1": 0}
    # a desired priority of 0 ("cancel it") is the same as none
    assert plan_renice({"fake1": 999, "fake0": 0}, jobs, 10) == {"fake1": 0}


def test_only_changes_are_returned_and_ties_break_by_name_descending() -> None:
    jobs = {"a": (100, 10000), "b": (100, 10000), "c": (100, 10000)}
    plan = plan_renice({"a": 5, "b": 5, "c": 5}, jobs, 10)
    # names descending: c first (nice 0), then b (10), then a (20)
    assert plan == {"c": 0, "b": 10, "a": 20}
    applied = {n: (p + nice - plan.get(n, nice), plan.get(n, nice)) for n, (p, nice) in jobs.items()}
    assert plan_renice({"a": 5, "b": 5, "c": 5}, applied, 10) == {}


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=0, max_value=200),
    st.lists(
        st.tuples(st.integers(1, 10**12), st.integers(0, 100000)), min_size=0, max_size=40
    ),
)
def test_idempotence_property(spread: int, jobs: list[tuple[int, int]]) -> None:
    first = want_nice(jobs, spread)
    assert all(n >= 0 for n in first)
    adjusted = [(p + n - new, new) for (p, n), new in zip(jobs, first, strict=True)]
    assert want_nice(adjusted, spread) == first


def _churn(order: str) -> int:
    spread = 10
    rng = random.Random(1)
    # 1000 jobs, each with its own priority, all submitted with nice 10000
    queue = [[4294000000 - i * 3, 10000] for i in range(1000)]
    adjustments = 0
    while queue:
        new = want_nice([(p, n) for p, n in queue], spread)
        for job, nice in zip(queue, new, strict=True):
            if nice != job[1]:
                job[0] += job[1] - nice
                job[1] = nice
                adjustments += 1
        # one job leaves per round: the head (started) or a random one (cancelled)
        queue.pop(0 if order == "head" else rng.randrange(len(queue)))
    return adjustments


@pytest.mark.parametrize("order", ["head", "random"])
def test_renice_churn_1000_jobs(order: str) -> None:
    assert _churn(order) < 100000
