"""The LSF backend of the dispatch loop (drop-in for arvados-dispatch-lsf, reference 4).

It only talks to LSF; the loop (:mod:`dispatcher.core.loop`) makes every decision.

* :meth:`LsfBackend.list_jobs`: one ``bjobs -u all -o "jobid stat job_name pend_reason" -json``
  per poll. A failed, hung or unparseable bjobs is :class:`QueryFailed` ("we do not know"),
  never an empty queue.
* :meth:`LsfBackend.submit`: first the reference's impossible-request check (no configured
  instance type fits -> permanent failure ``constraints not satisfiable by any configured
  instance type``; the loop sets ``runtime_status.error`` and cancels), then bsub with the
  substituted ``BsubArgumentsList`` (+ ``BsubGPUArguments`` when GPUs are requested) and the job
  script on stdin. Rejections LSF will repeat ("Bad resource requirement syntax", "No such
  queue", ...) are permanent; the rest transient. After a transient failure (timeout, lost
  reply, no job id, "not responding") the backend looks for the job by name before reporting
  failure, so a job that was created anyway is adopted, not submitted twice.
* :meth:`LsfBackend.cancel`: ``bkill <jobid>``; "Job has already finished" and "No matching job
  found" count as done.
* :meth:`LsfBackend.scheduling_status`: LSF's pending reason, for
  ``runtime_status.scheduling_status`` (the reference fetched it and threw it away).

Differences from the reference, on purpose: every command has a timeout; the job script (which
carries the gateway secret) and bsub's environment (the API token) are never logged; priority is
still not propagated to LSF (as in the reference; see docs/lsf.md).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry

from dispatcher.config import ClusterConfig
from dispatcher.config import controller_url as config_controller_url
from dispatcher.core import sizing
from dispatcher.core.backend import Backend, CancelFailed, Job, QueryFailed, SubmitFailed
from dispatcher.logs import get_logger, register_secret
from dispatcher.lsf import bsub as bsubargs
from dispatcher.lsf.commands import LsfCLI, LsfCommandError
from dispatcher.lsf.parse import BkillOutcome, LsfJob, pending_reason_text

log = get_logger("lsf")

# The job name is the container UUID; anything else is refused before it reaches bsub.
UUID_RE = re.compile(r"^[a-z0-9]{5}-dz642-[a-z0-9]{15}$")


def to_job(lj: LsfJob) -> Job:
    """A bjobs record as the loop's :class:`Job`."""
    return Job(name=lj.name, job_id=lj.job_id, state=lj.stat,
               reason=pending_reason_text(lj.pend_reason), pending=lj.pending)


class LsfBackend(Backend):
    """Runs containers as LSF jobs named by container UUID."""

    name = "lsf"

    def __init__(
        self,
        cfg: ClusterConfig,
        *,
        cli: LsfCLI | None = None,
        controller_url: str | None = None,
        env: Mapping[str, str] | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.cfg = cfg
        register_secret(cfg.system_root_token)
        self.cli = cli or LsfCLI(
            sudo_user=cfg.containers.lsf.bsub_sudo_user,
            timeout_s=cfg.crunchgate.command_timeout_s,
            submit_concurrency=cfg.crunchgate.submit_concurrency,
            env=env,
            registry=registry,
        )
        url = controller_url if controller_url is not None else config_controller_url(cfg)
        self.bsub_env = bsubargs.bsub_environment(cfg, url)

    async def close(self) -> None:
        self.cli.close()

    async def start(self) -> None:
        """Probe bjobs once, so that a missing LSF client or an LSF without ``-o``/``-json``
        support is reported loudly at startup rather than as a poll warning (field lesson 29).
        Not fatal: LSF may simply be down for now, and the loop keeps trying."""
        try:
            await self.cli.bjobs()
        except LsfCommandError as exc:
            log.error("LSF is not usable yet (the dispatcher keeps trying): %s", exc)

    async def list_jobs(self) -> dict[str, Job]:
        try:
            jobs = await self.cli.bjobs()
        except LsfCommandError as exc:
            raise QueryFailed(str(exc)) from None
        return {name: to_job(lj) for name, lj in jobs.items()}

    def check_constraints(self, ctr: Mapping[str, Any]) -> None:
        """Refuse a container no configured instance type can hold (reference 4.2 step 2a).

        Raises :class:`~dispatcher.core.sizing.ConstraintsNotSatisfiable`: the loop cancels the
        container with its bare reason in ``runtime_status.error`` (exactly the reference's
        ``constraints not satisfiable by any configured instance type``) and the configured
        types in ``errorDetail``. With no ``InstanceTypes`` nothing is checked (LSF decides).
        """
        try:
            sizing.choose_instance_type(self.cfg, ctr)
        except sizing.InstanceTypesNotConfigured:
            return

    async def submit(self, ctr: Mapping[str, Any]) -> None:
        uuid = str(ctr.get("uuid") or "")
        ctx = {"container_uuid": uuid}
        if not UUID_RE.match(uuid):
            raise SubmitFailed(f"refusing to submit an LSF job for malformed container UUID "
                               f"{uuid!r}", permanent=True)
        self.check_constraints(ctr)
        try:
            args = bsubargs.bsub_arguments(self.cfg, ctr)
        except bsubargs.BsubArgumentsError as exc:
            raise SubmitFailed(
                f"{exc}; fix Containers.LSF.BsubArgumentsList / BsubGPUArguments", permanent=True
            ) from None
        script = bsubargs.job_script(self.cfg, uuid)  # JobScriptError: the loop cancels
        try:
            job_id = await self.cli.bsub(args, script, self.bsub_env)
        except LsfCommandError as exc:
            # Any failure that is not an outright rejection may have created the job anyway
            # (a lost reply, a timeout, "not responding" after mbatchd accepted it).
            if not exc.permanent and exc.kind != "not_found" and await self._exists(uuid):
                log.warning("bsub for %s failed (%s) but the job exists: adopting it",
                            uuid, exc, extra=ctx)
                return
            raise SubmitFailed(str(exc), permanent=exc.permanent) from None
        log.info("container %s submitted as LSF job %s", uuid, job_id,
                 extra={**ctx, "job_id": job_id})

    async def _exists(self, uuid: str) -> bool:
        """Is a job named ``uuid`` listed? False also when we cannot tell (the loop then
        unlocks, and its next complete listing shows the job if it exists)."""
        try:
            return uuid in await self.cli.bjobs()
        except LsfCommandError:
            return False

    async def cancel(self, ctr_uuid: str, job: Job | None) -> None:
        ctx = {"container_uuid": ctr_uuid}
        if job is None or not job.job_id:
            # bkill needs a job id, which only a listing gives; nothing listed, nothing to kill.
            log.debug("container %s: no LSF job listed, nothing to bkill", ctr_uuid, extra=ctx)
            return
        try:
            outcome = await self.cli.bkill(job.job_id)
        except LsfCommandError as exc:
            raise CancelFailed(f"{ctr_uuid}: bkill({job.job_id}): {exc.message}") from None
        log.info("container %s: bkill %s: %s", ctr_uuid, job.job_id, outcome.value,
                 extra={**ctx, "job_id": job.job_id})
        if outcome is BkillOutcome.NOT_FOUND:
            log.debug("LSF no longer knows job %s", job.job_id, extra=ctx)

    def scheduling_status(self, job: Job) -> str:
        if not job.pending:
            return ""
        reason = job.reason or "pending"
        return f"waiting for LSF (job {job.job_id}): {reason}"
