"""The interface between the dispatch loop and a scheduler (Slurm, LSF, local processes).

A backend only talks to its scheduler: list the queue, submit one container's job, cancel a
job, adjust priorities. Every decision (lock, submit, cancel, unlock, "job vanished", orphans,
MaxDispatchAttempts) belongs to :class:`dispatcher.core.loop.Dispatcher`.

Job name = container UUID, always: that is what makes submission idempotent across restarts.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dispatcher.core.errors import CoreError


@dataclass(frozen=True)
class Job:
    """One entry of the scheduler's queue, keyed by job name (= container UUID)."""

    name: str
    job_id: str = ""  # the scheduler's id: Slurm job id, LSF JOBID, pid
    state: str = ""  # the scheduler's own state word (PENDING, RUNNING, PEND, RUN, ...)
    reason: str = ""  # pending reason, human readable
    nice: int | None = None
    priority: int | None = None
    # True while the scheduler has not started the job (waiting for resources). The loop writes
    # ``runtime_status.scheduling_status`` only for pending jobs.
    pending: bool = False


class BackendError(CoreError):
    """A scheduler operation failed."""


class QueryFailed(BackendError):
    """The queue could not be listed. Means "we do not know", never "no jobs"."""


class SubmitFailed(BackendError):
    """A submission failed.

    ``permanent`` means retrying cannot help (unsatisfiable constraints, a job script that cannot
    be built, an invalid partition): the loop cancels the container with ``message`` in
    ``runtime_status.error``. Otherwise the loop unlocks the container (one dispatch attempt
    spent) and tries again after a backoff.
    """

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.permanent = permanent


class CancelFailed(BackendError):
    """A job could not be cancelled; the loop tries again on a later poll."""


class Backend(abc.ABC):
    """What the dispatch loop needs from a scheduler."""

    name: str = "backend"

    async def start(self) -> None:
        """Prepare (check the scheduler CLI exists, create state directories, ...)."""
        return None

    async def close(self) -> None:
        """Release resources. Jobs keep running: they belong to the scheduler."""
        return None

    @abc.abstractmethod
    async def list_jobs(self) -> dict[str, Job]:
        """ONE scheduler query for all jobs, keyed by job name.

        Raises :class:`QueryFailed`; never returns partial data.
        """

    @abc.abstractmethod
    async def submit(self, ctr: Mapping[str, Any]) -> None:
        """Submit the job for container record ``ctr`` (Locked by us).

        Raises :class:`SubmitFailed`.
        """

    @abc.abstractmethod
    async def cancel(self, ctr_uuid: str, job: Job | None) -> None:
        """Cancel the job of ``ctr_uuid`` (``job`` from the latest listing, if any). A running
        job gets SIGTERM only, so crunch-run can stop the container cleanly.

        Raises :class:`CancelFailed`.
        """

    async def set_priorities(self, wanted: Mapping[str, int], jobs: Mapping[str, Job]) -> None:
        """Make the scheduler's order follow ``wanted`` (container UUID -> desired priority,
        reference 3.7) for the jobs in ``jobs``. Called once per poll. Default: nothing."""
        return None

    async def describe_vanished(self, ctr_uuid: str) -> str:
        """How the job of ``ctr_uuid`` ended, once the scheduler no longer lists it (e.g. from
        the scheduler's accounting); "" when unknown. Default: unknown."""
        return ""

    def scheduling_status(self, job: Job) -> str:
        """Why a pending job is waiting, for ``runtime_status.scheduling_status``."""
        return job.reason
