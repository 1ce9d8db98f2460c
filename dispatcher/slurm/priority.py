"""Container priority -> Slurm nice values ("PrioritySpread", reference ``dispatch.md`` 3.7).

Pure functions. Slurm orders pending jobs by priority; the dispatcher cannot set priority, only
nice (priority = base - nice). Every job is submitted with ``--nice=10000``; after each squeue
poll :func:`plan_renice` computes, from the priorities and nice values squeue reported, the nice
values that put the jobs in the containers' priority order, spaced ``PrioritySpread`` apart, and
returns only the jobs whose nice must change -- so a steady queue costs no ``scontrol`` call.

The computation is idempotent: applied to the priorities that result from its own output it
returns the same nice values (``priority + nice`` of a job is invariant under renicing).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

DEFAULT_SPREAD = 10


def effective_spread(spread: int) -> int:
    """``Containers.SLURM.PrioritySpread``: values below 1 mean the default, 10."""
    return spread if spread >= 1 else DEFAULT_SPREAD


def want_nice(jobs: Sequence[tuple[int, int]], spread: int) -> list[int]:
    """New nice values for ``jobs`` = [(slurm priority, current nice), ...] listed in the wanted
    order (highest first).

    Keeps a running ceiling: each job must end up at least ``spread`` below the previous one,
    unless it already is below it and by less than ``10 * (spread - 1)`` (then it is left
    alone). A job that cannot get under the ceiling even at nice 0 gets nice 0.
    """
    s = effective_spread(spread)
    out: list[int] = []
    ceiling = 0
    for i, (prio, nice) in enumerate(jobs):
        at_nice_zero = prio + nice
        if i == 0:
            new = 0
            ceiling = at_nice_zero
        else:
            gap = ceiling - prio
            if 0 <= gap < 10 * (s - 1):
                new = nice
                ceiling = prio
            else:
                ceiling -= s - 1
                if ceiling > at_nice_zero:
                    new = 0
                    ceiling = at_nice_zero
                else:
                    new = at_nice_zero - ceiling
        out.append(new)
        ceiling -= 1
    return out


def plan_renice(
    wanted: Mapping[str, int],
    jobs: Mapping[str, tuple[int, int]],
    spread: int,
) -> dict[str, int]:
    """Jobs whose nice must change: job name -> new nice.

    ``wanted``: job name (container UUID) -> desired priority (the loop's
    ``desired_priority``, legacy 1..1000 values already spread by creation time); jobs
    without one, or with 0, are not touched (other users' jobs, containers being cancelled).
    ``jobs``: job name -> (slurm priority, current nice) from the latest squeue.
    Ties in desired priority are broken by name, descending, so the order is stable.
    """
    names = [n for n in jobs if wanted.get(n)]
    names.sort(key=lambda n: (wanted[n], n), reverse=True)
    current = [jobs[n] for n in names]
    new = want_nice(current, spread)
    return {n: v for n, (_, nice), v in zip(names, current, new, strict=True) if v != nice}
