"""The Slurm backend of the dispatch loop (drop-in for crunch-dispatch-slurm, reference 3).

It only talks to Slurm; the loop (:mod:`dispatcher.core.loop`) decides everything else.

* :meth:`SlurmBackend.list_jobs` -- ONE ``squeue --all --states=all`` per poll. Jobs that ended
  (still listed for ``MinJobAge``) are *not* present; the first time a container's job is seen
  ended, an optional ``on_job_ended`` hook is told how it ended (NODE_FAIL, TIMEOUT, ...) so the
  service can record it on the container before the loop reacts to the vanished job.
* :meth:`SlurmBackend.submit` -- sbatch with the reference's argument list and the job script on
  stdin; ``ARVADOS_API_*`` and ``SbatchEnvironmentVariables`` in sbatch's process environment.
  Rejections Slurm will repeat forever raise ``SubmitFailed(permanent=True)`` quoting Slurm.
  Controller trouble is retried here a few times behind the shared back-off. An sbatch whose
  answer never came may still have created the job: before any resubmission the job name is
  looked up in squeue.
* :meth:`SlurmBackend.cancel` -- scancel pending, then TERM to the batch shell of running and
  suspended jobs (reference 3.8).
* :meth:`SlurmBackend.set_priorities` -- PrioritySpread renice, ``scontrol update JobId=`` only
  for the jobs whose nice must change.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from dispatcher.config import ClusterConfig
from dispatcher.core.backend import Backend, CancelFailed, Job, QueryFailed, SubmitFailed
from dispatcher.core.jobscript import container_job_script
from dispatcher.logs import get_logger, register_secret
from dispatcher.slurm import parse
from dispatcher.slurm.commands import Backoff, SlurmCLI, SlurmCommandError
from dispatcher.slurm.priority import plan_renice
from dispatcher.slurm.sbatch import SbatchArgumentsError, sbatch_args, sbatch_environment

log = get_logger("slurm")

#: How often one submit() tries sbatch when slurmctld is struggling, before giving the
#: container back to the loop (which unlocks it and backs off).
SUBMIT_ATTEMPTS = 3
#: A lookup by name only proves that a lost sbatch did NOT create its job if it started this
#: long after slurmctld came back (requests queued while it was frozen are processed as it
#: resumes, possibly just after our first query).
SETTLE_S = 2.0
#: At most this many scontrol renice calls per poll: a freshly adopted queue of 10,000 jobs is
#: reniced over several polls instead of in one burst.
MAX_RENICE_PER_POLL = 2000
#: A renice pass is cut after max(this, 4 x CommandTimeout): the loop starts no new pass while
#: one runs, so a pass that never ended would freeze the order for good. By job id, 2,000
#: calls take ~20-40 s on the 2-core dev VM.
RENICE_PASS_MIN_S = 60.0
#: runtime_status.scheduling_status is written once a job has been listed pending this many
#: polls after the first listing that showed it (2 = pending for two poll intervals).
STATUS_AFTER_LISTINGS = 2
#: After sacct said the cluster keeps no accounting: do not ask again for this long.
SACCT_RETRY_S = 3600.0

JobEndedHook = Callable[[str, str, parse.SqueueRow], Awaitable[None]]


class SlurmBackend(Backend):
    """Slurm through its command-line tools."""

    name = "slurm"

    def __init__(
        self,
        cfg: ClusterConfig,
        *,
        cli: SlurmCLI | None = None,
        registry: CollectorRegistry | None = None,
        on_job_ended: JobEndedHook | None = None,
    ) -> None:
        self.cfg = cfg
        poll = cfg.containers.cloud_vms.poll_interval_s
        self.cli = cli or SlurmCLI(
            timeout_s=cfg.crunchgate.command_timeout_s,
            submit_concurrency=cfg.crunchgate.submit_concurrency,
            # slow down to at most one attempt per ~10 polls, within [5 s, 60 s]
            backoff=Backoff(base_s=max(0.5, poll), max_s=min(60.0, max(5.0, 10 * poll))),
            registry=registry,
        )
        self.on_job_ended = on_job_ended
        self.env = sbatch_environment(cfg)
        register_secret(self.env.get("ARVADOS_API_TOKEN"))
        self._uuid_re = re.compile(r"^[a-z0-9]{5}-dz642-[a-z0-9]{15}$")
        self._rows: dict[str, parse.SqueueRow] = {}
        self._seen_ended: set[str] = set()  # job ids already reported as ended
        self._live_ids: dict[str, str] = {}  # name -> job id of the live job, last poll
        self._listing = 0  # squeue listings so far
        self._pending_since: dict[str, int] = {}  # job id -> first listing that showed it pending
        # Names whose sbatch got no answer: look them up before submitting again.
        self._maybe_submitted: set[str] = set()
        self._sacct_off_until = 0.0  # monotonic time before which sacct is not asked
        # A squeue started at process start-up for the first poll (prefetch_jobs).
        self._prefetched: tuple[float, asyncio.Future[str]] | None = None
        reg = self.cli.metrics.registry
        self._jobs_gauge = Gauge(
            "crunchgate_slurm_jobs", "Jobs in the last squeue, by Slurm state",
            ["state"], registry=reg,
        )
        self._known_states: set[str] = set()
        self._renice_gauge = Gauge(
            "crunchgate_slurm_renice_pending_jobs",
            "Jobs whose nice had to change when the last renice pass was planned "
            "(0: the Slurm queue follows the containers' priority order)",
            registry=reg,
        )

    async def close(self) -> None:
        if self._prefetched is not None:
            self._prefetched[1].cancel()
            self._prefetched = None
        self.cli.close()

    # --- queue --------------------------------------------------------------------------------

    # A prefetched listing older than this is not used: the first poll runs its own squeue.
    PREFETCH_MAX_AGE_S = 5.0

    async def prefetch_jobs(self) -> None:
        """Start the first poll's squeue now, at process start-up, so that it runs while the
        rest of the service is imported and the API token is checked (~0.15 s; a squeue of a
        busy slurmctld takes as long). Returns once the command has been started.

        Safe for the first poll only, which is the only one that uses it: no operation of
        this process can have changed a job before it, so a listing started before the poll's
        tick says the same as one started after it.
        """
        if self._prefetched is None:
            task = asyncio.ensure_future(self.cli.squeue())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            self._prefetched = (time.monotonic(), task)
            await asyncio.sleep(0)  # let it reach the spawn

    async def _squeue(self) -> str:
        if self._prefetched is not None:
            started, task = self._prefetched
            self._prefetched = None
            if time.monotonic() - started <= self.PREFETCH_MAX_AGE_S:
                return await task
            task.cancel()
        return await self.cli.squeue()

    async def list_jobs(self) -> dict[str, Job]:
        try:
            out = await self._squeue()
        except SlurmCommandError as exc:
            raise QueryFailed(f"squeue failed, job states unknown this poll: {exc}") from None
        rows, bad = parse.parse_squeue(out)
        for line in bad[:5]:
            log.warning("ignoring unparsed line in squeue output: %r", line)
        live, ended = parse.current_jobs(rows)
        for name, ids in parse.duplicate_live_jobs(rows).items():
            if self._uuid_re.match(name):
                log.warning("several live Slurm jobs named %s: %s (only one crunch-run can "
                            "run the container; the others will fail)", name, ", ".join(ids))
        self._update_gauge(rows)
        await self._report_ended(live, ended)
        self._rows = live
        self._live_ids = {n: r.job_id for n, r in live.items()}
        self._listing += 1
        self._pending_since = {
            r.job_id: self._pending_since.get(r.job_id, self._listing)
            for r in live.values() if r.pending
        }
        return {
            name: Job(
                name=name, job_id=r.job_id, state=r.state, reason=r.reason, nice=r.nice,
                priority=r.priority, pending=r.pending,
            )
            for name, r in live.items()
        }

    def _update_gauge(self, rows: list[parse.SqueueRow]) -> None:
        counts: dict[str, int] = {}
        for r in rows:
            if not r.ended:
                counts[r.state] = counts.get(r.state, 0) + 1
        for state in self._known_states | set(counts):
            self._jobs_gauge.labels(state).set(counts.get(state, 0))
        self._known_states |= set(counts)

    async def _report_ended(
        self, live: Mapping[str, parse.SqueueRow], ended: Mapping[str, parse.SqueueRow]
    ) -> None:
        """Tell the hook, once per job, how a container's job ended."""
        fresh = []
        for name, row in ended.items():
            if row.job_id in self._seen_ended or not self._uuid_re.match(name):
                continue
            self._seen_ended.add(row.job_id)
            # COMPLETED means crunch-run exited 0: it has already finalised the container.
            if row.state in parse.BAD_END_STATES or (
                row.state != "COMPLETED" and self._live_ids.get(name) == row.job_id
            ):
                fresh.append((name, row))
        if len(self._seen_ended) > 200000:  # bounded memory over months of uptime
            self._seen_ended = {r.job_id for r in ended.values()}
        if not fresh or self.on_job_ended is None:
            for name, row in fresh:
                if row.state in parse.BAD_END_STATES:
                    log.warning("%s", parse.end_description(row),
                                extra={"container_uuid": name, "job_id": row.job_id})
            return
        hook = self.on_job_ended

        async def one(name: str, row: parse.SqueueRow) -> None:
            try:
                await asyncio.wait_for(hook(name, parse.end_description(row), row), 30)
            except Exception as exc:  # recording the reason must never break the poll
                log.warning("could not record how job %s ended: %s", row.job_id, exc,
                            extra={"container_uuid": name})

        await asyncio.gather(*(one(n, r) for n, r in fresh[:100]))

    def scheduling_status(self, job: Job) -> str:
        # Nothing to say (so nothing is written) until the job has been pending for
        # STATUS_AFTER_LISTINGS polls: most jobs start or settle on their real reason within
        # seconds, and a burst of a thousand submissions should not cost a thousand container
        # updates on the controller while it is also serving their lock calls.
        first = self._pending_since.get(job.job_id)
        if first is None or self._listing - first < STATUS_AFTER_LISTINGS:
            return ""
        row = self._rows.get(job.name)
        partition = row.partition if row is not None else ""
        return parse.scheduling_status(job.reason, partition)

    # --- submit -------------------------------------------------------------------------------

    async def submit(self, ctr: Mapping[str, Any]) -> None:
        uuid = str(ctr.get("uuid") or "")
        ctx = {"container_uuid": uuid}
        if not self._uuid_re.match(uuid):
            raise SubmitFailed(f"refusing to submit a job for malformed container UUID {uuid!r}",
                               permanent=True)
        try:
            args = sbatch_args(self.cfg, ctr)
        except SbatchArgumentsError as exc:
            raise SubmitFailed(str(exc), permanent=True) from None
        # ConstraintsNotSatisfiable propagates: the loop reports it with the type list.
        script = container_job_script(self.cfg, uuid, template="slurm")
        if uuid in self._rows:
            # The loop only submits containers whose job it did not see, but a job listed by
            # our own last squeue must never get a twin.
            log.info("job for %s already in the Slurm queue; not resubmitting", uuid, extra=ctx)
            return
        last: SlurmCommandError | None = None
        for attempt in range(1, SUBMIT_ATTEMPTS + 1):
            if uuid in self._maybe_submitted:
                if await self._exists(uuid):
                    self._maybe_submitted.discard(uuid)
                    log.info("an earlier sbatch for %s did create its job; not resubmitting",
                             uuid, extra=ctx)
                    return
            log.info("running sbatch %s", args, extra=ctx)
            try:
                job_id = await self.cli.sbatch(args, script, self.env)
            except SlurmCommandError as exc:
                last = exc
                if exc.kind == "rejected":
                    raise SubmitFailed(
                        f"Slurm rejected the job: {exc.message} "
                        f"(sbatch {' '.join(args)}); fix the container's resource request "
                        "or the site's SbatchArgumentsList", permanent=True,
                    ) from None
                if exc.kind == "not_found":
                    raise SubmitFailed(exc.message) from None
                if exc.kind in ("timeout", "controller"):
                    # The request may have reached slurmctld and created the job anyway.
                    self._maybe_submitted.add(uuid)
                log.warning("sbatch attempt %d/%d failed: %s", attempt, SUBMIT_ATTEMPTS, exc,
                            extra=ctx)
                if exc.kind not in ("timeout", "controller", "backoff"):
                    break
                continue
            self._maybe_submitted.discard(uuid)
            log.info("submitted Slurm job %s", job_id or "(id unknown)",
                     extra={**ctx, "job_id": job_id})
            return
        assert last is not None
        raise SubmitFailed(f"sbatch failed: {last}")

    async def describe_vanished(self, ctr_uuid: str) -> str:
        """How the newest job of ``ctr_uuid`` ended, from ``sacct``, once squeue has forgotten
        it (it ended more than MinJobAge ago, e.g. while the dispatcher was down).

        "" where the site has no accounting storage (then sacct is not asked again for
        :data:`SACCT_RETRY_S`), when sacct fails or knows no ended job by that name.
        """
        if not self._uuid_re.match(ctr_uuid) or time.monotonic() < self._sacct_off_until:
            return ""
        ctx = {"container_uuid": ctr_uuid}
        try:
            row = parse.parse_sacct(await self.cli.sacct(ctr_uuid), ctr_uuid)
        except SlurmCommandError as exc:
            if "accounting storage is disabled" in exc.message.lower():
                self._sacct_off_until = time.monotonic() + SACCT_RETRY_S
                log.info("sacct: no accounting storage on this cluster; how vanished jobs "
                         "ended stays unknown", extra=ctx)
            else:
                log.warning("sacct failed: %s", exc, extra=ctx)
            return ""
        if row is None or not row.ended:
            return ""
        return parse.end_description(row)

    async def _exists(self, name: str) -> bool:
        """Is there a live job named ``name``? "Cannot tell" raises (never resubmit blind).

        A "no" only counts from a query that started :data:`SETTLE_S` after slurmctld was last
        seen coming back, so a request it processes as it resumes is not missed.
        """
        deadline = time.monotonic() + 10 * SETTLE_S + 2 * self.cli.timeout_s
        while True:
            started = time.monotonic()
            try:
                out = await self.cli.squeue_name(name)
            except SlurmCommandError as exc:
                raise SubmitFailed(
                    f"cannot tell whether an earlier sbatch created the job ({exc}); "
                    "not resubmitting blind"
                ) from None
            rows, _ = parse.parse_squeue(out)
            live, _ = parse.current_jobs(r for r in rows if r.name == name)
            if name in live:
                return True
            settled = started - self.cli.recovered_at
            if settled >= SETTLE_S:
                return False
            if time.monotonic() > deadline:
                raise SubmitFailed("slurmctld keeps failing; not resubmitting blind")
            await asyncio.sleep(SETTLE_S - settled)

    # --- cancel -------------------------------------------------------------------------------

    async def cancel(self, ctr_uuid: str, job: Job | None) -> None:
        # Pending jobs go at once; running/suspended ones get SIGTERM to the batch shell only,
        # never Slurm's TERM+KILL, so crunch-run can stop the container cleanly.
        for args in (
            [f"--name={ctr_uuid}", "--state=pending"],
            [f"--name={ctr_uuid}", "--batch", "--signal=TERM", "--state=running"],
            [f"--name={ctr_uuid}", "--batch", "--signal=TERM", "--state=suspended"],
        ):
            try:
                await self.cli.scancel(args)
            except SlurmCommandError as exc:
                raise CancelFailed(f"scancel {' '.join(args)}: {exc.message}") from None

    # --- priorities ---------------------------------------------------------------------------

    async def set_priorities(self, wanted: Mapping[str, int], jobs: Mapping[str, Job]) -> None:
        # Held jobs (and any job Slurm gives priority 0) are left out: their priority does not
        # move with nice, so renicing them is useless -- and, since "priority + nice" is then
        # not invariant, the spread would change them again on every poll.
        current = {
            n: (j.priority, j.nice)
            for n, j in jobs.items()
            if j.priority is not None and j.priority > 0 and j.nice is not None
        }
        plan = plan_renice(wanted, current, self.cfg.containers.slurm.priority_spread)
        self._renice_gauge.set(len(plan))
        if not plan:
            return
        # The most wanted first: with more than MAX_RENICE_PER_POLL changes, the top of the
        # queue is put in order first and the rest on later polls (each pass is planned again
        # from a fresh squeue, so nothing is remembered as "done" that Slurm did not do).
        items = sorted(plan.items(), key=lambda kv: -wanted.get(kv[0], 0))[:MAX_RENICE_PER_POLL]
        errors = 0

        async def one(name: str, nice: int) -> None:
            nonlocal errors
            try:
                await self.cli.set_nice(name, nice, job_id=jobs[name].job_id)
            except SlurmCommandError as exc:
                if "already finished" in exc.message:
                    return  # it ended after the squeue this pass was planned on: nothing to do
                errors += 1
                if errors <= 3:
                    log.warning("scontrol update JobId=%s Nice=%d: %s", jobs[name].job_id, nice,
                                exc, extra={"container_uuid": name})

        deadline = max(RENICE_PASS_MIN_S, 4 * self.cli.timeout_s)
        try:
            await asyncio.wait_for(asyncio.gather(*(one(n, v) for n, v in items)), deadline)
        except TimeoutError:
            log.warning("renice pass of %d jobs did not finish within %.0fs; the rest is left "
                        "to the next poll", len(items), deadline)
        if errors:
            log.warning("%d of %d renice commands failed; retried next poll", errors, len(items))
