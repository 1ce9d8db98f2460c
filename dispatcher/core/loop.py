"""The backend-independent dispatch loop shared by Slurm, LSF and local processes.

One poll, every ``Containers.CloudVMs.PollInterval``:

1. ask the controller for the containers locked by us ("mine") and the dispatchable ones
   (Queued, priority > 0), paged as reference 2.3 with ``API.MaxItemsPerResponse``;
2. ask by UUID (batches of at most 20) for every tracked container those did not return;
3. list the scheduler's jobs ONCE (``backend.list_jobs()``), then look up by UUID the containers
   of any job of this cluster we know nothing about (orphans);
4. decide, per container, from the explicit table :data:`RULES`, keyed by (container state,
   who holds the lock, priority > 0, what we know about its job); then act.

What "what we know about its job" means (:class:`JobView`):

* ``PRESENT`` / ``ABSENT`` — listed / not listed in this poll's complete job listing;
* ``GONE`` — not listed, although we submitted it before this poll started: it vanished;
* ``BUSY`` — an operation on this container (lock, submit, cancel, unlock...) is running, or
  finished after this poll started, so this poll's records may already be stale: decide later;
* ``UNKNOWN`` — ``list_jobs`` failed. Missing data is never read as "the job is gone".

Improvements over the reference (``dispatch.md`` 8.3): containers no query returns are dropped
once their job is cancelled (not re-queried forever); there is no "fallback PUT" of a Running
container to Queued; after a job vanishes the decision (cancel or unlock) is taken on a fresh
GET, and if that GET fails nothing is done this round; a failing queue tool delays decisions
but never blocks the loop; submissions run concurrently (``Crunchgate.SubmitConcurrency``) off
the poll path, so a burst of a thousand containers is submitted quickly.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from dispatcher.config import ClusterConfig
from dispatcher.core.backend import Backend, Job, SubmitFailed
from dispatcher.core.jobscript import JobScriptError
from dispatcher.core.sizing import ConstraintsNotSatisfiable
from dispatcher.core.throttle import MinRetryPeriod

log = logging.getLogger("crunchgate.dispatch")

UUID_BATCH = 20
#: What a poll reads of the containers locked by us. The full record (mounts, constraints ...)
#: is only needed to submit, and is then fetched fresh: 10,000 full records are ~13 MB of JSON
#: per poll, whose decoding and garbage collection were most of a poll's CPU.
MINE_FIELDS = ("uuid", "state", "priority", "locked_by_uuid", "created_at", "runtime_status")
# A job that is still listed after we cancelled it gets cancelled again after this long (the
# reference re-ran scancel every squeue period; once a minute is plenty).
CANCEL_REPEAT_S = 60.0
# Upper bound of the poll backoff after failures, and of the per-container submit backoff.
MAX_POLL_BACKOFF_S = 120.0
MAX_SUBMIT_BACKOFF_S = 600.0
FINAL_STATES = ("Complete", "Cancelled")


class ArvadosAPI(Protocol):
    """The part of :class:`dispatcher.arvados.client.ArvadosClient` the loop uses."""

    async def current_token(self) -> dict[str, Any]: ...
    async def list(
        self, resource: str, *, filters: Sequence[Any] | None = None,
        order: Sequence[str] | str | None = None, select: Sequence[str] | None = None,
        limit: int | None = None, offset: int | None = None, count: str | None = None,
    ) -> dict[str, Any]: ...
    async def get(
        self, resource: str, uuid: str, *, select: Sequence[str] | None = None
    ) -> dict[str, Any]: ...
    async def update(
        self, resource: str, uuid: str, attrs: Mapping[str, Any]
    ) -> dict[str, Any]: ...
    async def lock(self, uuid: str) -> dict[str, Any]: ...
    async def unlock(self, uuid: str) -> dict[str, Any]: ...
    async def create_log(
        self, object_uuid: str, event_type: str, text: str | None = None,
        properties: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]: ...


# --- the decision table -----------------------------------------------------------------------


class Owner(enum.Enum):
    NONE = "none"  # not locked
    ME = "me"  # locked by our token
    OTHER = "other"  # locked by another token: hands off


class JobView(enum.Enum):
    PRESENT = "present"
    ABSENT = "absent"
    GONE = "gone"
    BUSY = "busy"
    UNKNOWN = "unknown"


class Action(enum.Enum):
    NOTHING = "nothing"  # all is as it should be
    IGNORE = "ignore"  # not ours
    LOCK_AND_SUBMIT = "lock+submit"
    SUBMIT = "submit"
    CANCEL_JOB = "cancel-job"
    CHECK_VANISHED = "check-vanished"  # fresh GET; Running -> Cancelled, Locked -> unlock
    UNLOCK = "unlock"
    WAIT = "wait"  # missing or possibly stale data: decide on a later poll
    FORGET = "forget"  # stop tracking


# The state of a container that the controller does not return any more (deleted).
MISSING = "Missing"
ANY_STATE = frozenset({"Queued", "Locked", "Running", "Complete", "Cancelled", MISSING})
ANY_OWNER = frozenset(Owner)
ANY_PRIO = frozenset({True, False})
ANY_JOB = frozenset(JobView)
WAITING = frozenset({JobView.BUSY, JobView.UNKNOWN})
NO_JOB = frozenset({JobView.ABSENT, JobView.GONE})
DONE = frozenset({"Complete", "Cancelled", MISSING})


@dataclass(frozen=True)
class Rule:
    states: frozenset[str]
    owners: frozenset[Owner]
    prio_positive: frozenset[bool]
    jobs: frozenset[JobView]
    action: Action
    why: str

    def matches(self, state: str, owner: Owner, prio: bool, job: JobView) -> bool:
        return (
            state in self.states
            and owner in self.owners
            and prio in self.prio_positive
            and job in self.jobs
        )


def _r(states: Iterable[str], owners: Iterable[Owner], prio: Iterable[bool],
       jobs: Iterable[JobView], action: Action, why: str) -> Rule:
    return Rule(frozenset(states), frozenset(owners), frozenset(prio), frozenset(jobs), action, why)


ME, NONE_, OTHER = [Owner.ME], [Owner.NONE], [Owner.OTHER]
POS, ZERO = [True], [False]
PRESENT, ABSENT, GONE = [JobView.PRESENT], [JobView.ABSENT], [JobView.GONE]

#: Every combination that can happen maps to exactly one rule (checked by the unit tests).
#: Combinations the controller cannot produce (e.g. Locked with nobody holding the lock) are
#: deliberately absent: meeting one is logged as an error.
RULES: tuple[Rule, ...] = (
    # -- someone else's --
    _r(["Queued", "Locked", "Running"], OTHER, ANY_PRIO, ANY_JOB, Action.IGNORE,
       "locked by another token: neither the container nor its job is ours to touch"),
    # -- Queued (not locked) --
    _r(["Queued"], NONE_, POS, NO_JOB, Action.LOCK_AND_SUBMIT, "dispatchable and no job yet"),
    _r(["Queued"], NONE_, ANY_PRIO, PRESENT, Action.CANCEL_JOB,
       "a job for an unlocked container is stale (crunch-run refuses it); lock once it is gone"),
    _r(["Queued"], NONE_, ZERO, NO_JOB, Action.FORGET, "nobody wants it"),
    _r(["Queued"], NONE_, ANY_PRIO, WAITING, Action.WAIT,
       "never lock without a complete job listing"),
    # -- Locked by us --
    _r(["Locked"], ME, POS, PRESENT, Action.NOTHING, "submitted, waiting for crunch-run"),
    _r(["Locked"], ME, POS, ABSENT, Action.SUBMIT, "locked (maybe by a previous run) but no job"),
    _r(["Locked"], ME, ZERO, ABSENT, Action.UNLOCK, "nobody wants it any more"),
    _r(["Locked", "Running"], ME, ZERO, PRESENT, Action.CANCEL_JOB, "priority 0: cancel"),
    _r(["Locked", "Running"], ME, ANY_PRIO, GONE, Action.CHECK_VANISHED,
       "the job we submitted left the queue"),
    _r(["Locked", "Running"], ME, ANY_PRIO, WAITING, Action.WAIT,
       "no submit/cancel/unlock on missing or stale data"),
    # -- Running (crunch-run has it) --
    _r(["Running"], ME, POS, PRESENT, Action.NOTHING, "running"),
    _r(["Running"], ME, ANY_PRIO, ABSENT, Action.CHECK_VANISHED,
       "running but no job (e.g. it ended while we were down)"),
    # -- finished, or unknown to the controller --
    _r(DONE, ANY_OWNER, ANY_PRIO, PRESENT, Action.CANCEL_JOB, "leftover job of a finished container"),
    _r(DONE, ANY_OWNER, ANY_PRIO, NO_JOB, Action.FORGET, "finished and no job left"),
    _r(DONE, ANY_OWNER, ANY_PRIO, WAITING, Action.WAIT, "cancel a leftover job once we know"),
)


def decide(state: str, owner: Owner, prio_positive: bool, job: JobView) -> Rule | None:
    """The rule for one combination, or None if the combination is not in the table."""
    key = (state, owner, prio_positive, job)
    try:
        return _DECIDED[key]
    except KeyError:
        pass
    found = None
    for rule in RULES:
        if rule.matches(state, owner, prio_positive, job):
            found = rule
            break
    if len(_DECIDED) < 1000:  # RULES is fixed: at most a few hundred combinations exist
        _DECIDED[key] = found
    return found


# The table is scanned once per combination, not once per container and poll (10,000 Locked
# containers made the scan a visible part of a poll).
_DECIDED: dict[tuple[str, Owner, bool, JobView], Rule | None] = {}


# --- helpers ----------------------------------------------------------------------------------


def desired_priority(ctr: Mapping[str, Any]) -> int:
    """The priority a job should have in the scheduler (reference 3.7).

    Legacy user-assigned priorities (1..1000) become ``(p << 50) - (created_at_ns >> 14)`` so
    that older containers win ties; server-computed priorities are used as they are.
    """
    p = int(ctr.get("priority") or 0)
    if 0 < p <= 1000:
        created_ns = 0
        created = ctr.get("created_at")
        if isinstance(created, str) and created:
            try:
                dt = datetime.fromisoformat(created.replace("Z", "+00:00"))
                created_ns = int(dt.timestamp()) * 10**9 + dt.microsecond * 1000
            except ValueError:
                created_ns = 0
        return (p << 50) - (created_ns >> 14)
    return p


def _is_not_found(exc: BaseException) -> bool:
    return getattr(exc, "status", None) == 404


def _err(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text


@dataclass
class Tracked:
    """What the loop remembers about one container between polls."""

    uuid: str
    record: dict[str, Any] = field(default_factory=dict)
    busy: bool = False  # an operation is running
    op_finished_tick: int = 0  # when the last operation finished (loop tick)
    submitted: bool = False  # we submitted its job in this process (since the last lock)
    last_cancel_at: float | None = None
    missing_logged: bool = False
    scheduling_status: str | None = None  # last value we wrote


@dataclass
class PollReport:
    """What one poll saw and decided (for tests, metrics and debugging)."""

    ok: bool = True
    jobs_ok: bool = True
    decisions: dict[str, Action] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


class _Metrics:
    def __init__(self, registry: CollectorRegistry, backend: str) -> None:
        self.containers = Gauge(
            "crunchgate_dispatch_containers", "Containers seen in the last poll, by state",
            ["state"], registry=registry)
        self.submits = Counter(
            "crunchgate_dispatch_submits", "Jobs submitted", registry=registry)
        self.submit_errors = Counter(
            "crunchgate_dispatch_submit_errors", "Failed submissions", ["kind"],
            registry=registry)
        self.cancels = Counter(
            "crunchgate_dispatch_cancels", "Job cancellations requested", registry=registry)
        self.errors = Counter(
            "crunchgate_dispatch_errors", "Failed operations", ["op"], registry=registry)
        self.poll_seconds = Histogram(
            "crunchgate_dispatch_poll_duration_seconds", "Time taken by one poll",
            registry=registry)
        self.inflight = Gauge(
            "crunchgate_dispatch_operations_in_flight", "Container operations running",
            registry=registry)


class Dispatcher:
    """The dispatch loop: ``await Dispatcher(cfg, client, backend).run(stop_event)``.

    Tests drive it one poll at a time with :meth:`poll_once` and :meth:`wait_idle`.
    """

    def __init__(
        self,
        cfg: ClusterConfig,
        client: ArvadosAPI,
        backend: Backend,
        *,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
        api_concurrency: int = 8,
    ) -> None:
        self.cfg = cfg
        self.client = client
        self.backend = backend
        self.clock = clock
        self.poll_interval_s = max(0.05, cfg.containers.cloud_vms.poll_interval_s)
        self.batch_size = cfg.api.max_items_per_response or 100
        self.throttle = MinRetryPeriod(cfg.containers.min_retry_period_s, clock=clock)
        self.my_token_uuid = ""
        self.tracked: dict[str, Tracked] = {}
        self._uuid_re = re.compile(rf"^{re.escape(cfg.cluster_id)}-dz642-[a-z0-9]{{15}}$")
        self._tick = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._submit_sem = asyncio.Semaphore(max(1, cfg.crunchgate.submit_concurrency))
        self._api_sem = asyncio.Semaphore(max(1, api_concurrency))
        # uuid -> (consecutive transient failures, earliest next attempt)
        self._backoff: dict[str, tuple[int, float]] = {}
        self._priorities_task: asyncio.Task[None] | None = None
        self.metrics = _Metrics(registry or CollectorRegistry(), backend.name)
        self.consecutive_failures = 0
        self.last_poll: PollReport | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Learn our token UUID (the ``locked_by_uuid`` of our locks)."""
        tok = await self.client.current_token()
        self.my_token_uuid = str(tok["uuid"])

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Poll until ``stop`` is set; failures back off with jitter, never end the loop."""
        stop = stop or asyncio.Event()
        while not self.my_token_uuid and not stop.is_set():
            try:
                await self.start()
            except Exception as exc:
                self.consecutive_failures += 1
                log.warning("error getting my token UUID: %s", _err(exc))
                await self._sleep(self._poll_delay(), stop)
        self.consecutive_failures = 0
        while not stop.is_set():
            started = time.monotonic()
            await self.poll_once()
            await self._sleep(self._poll_delay(time.monotonic() - started), stop)
        await self.close()

    async def close(self, grace_s: float = 10.0) -> None:
        """Let running operations finish (a cancelled submit could leave a job we don't know
        about — harmless, the next run finds it — but better not), then stop them."""
        tasks = [t for t in self._tasks if not t.done()]
        if self._priorities_task and not self._priorities_task.done():
            tasks.append(self._priorities_task)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace_s)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def wait_idle(self) -> None:
        """Wait until no operation started by a poll is running (tests)."""
        while True:
            tasks = [t for t in self._tasks if not t.done()]
            if self._priorities_task and not self._priorities_task.done():
                tasks.append(self._priorities_task)
            if not tasks:
                return
            await asyncio.gather(*tasks, return_exceptions=True)

    @staticmethod
    async def _sleep(delay: float, stop: asyncio.Event) -> None:
        try:
            await asyncio.wait_for(stop.wait(), delay)
        except TimeoutError:
            pass

    def _poll_delay(self, elapsed_s: float = 0.0) -> float:
        """The pause before the next poll, after one that took ``elapsed_s``.

        Healthy: polls start one ``PollInterval`` apart (as the reference's ticker) while a
        poll takes at most half of it; a longer poll is followed by a pause as long as itself,
        at most one interval. So polling never takes more than half of the time: a slow
        controller or scheduler is asked less often (the reference's ticker polls back to back
        then), and a burst of submissions keeps the CPU it needs. After failures: exponential
        backoff with jitter."""
        if self.consecutive_failures == 0:
            interval = self.poll_interval_s
            return max(interval - elapsed_s, min(elapsed_s, interval))
        cap = max(self.poll_interval_s, MAX_POLL_BACKOFF_S)
        delay = min(cap, self.poll_interval_s * 2 ** min(self.consecutive_failures, 10))
        return delay * random.uniform(0.5, 1.0)

    # --- one poll -------------------------------------------------------------------------------

    async def poll_once(self) -> PollReport:
        """Query, list jobs, decide, start operations. Returns what it decided."""
        t0 = time.monotonic()
        if not self.my_token_uuid:
            await self.start()
        self._tick += 1
        poll_tick = self._tick
        report = PollReport()
        try:
            await self._poll(poll_tick, report)
        except Exception as exc:
            # A bug or a malformed record must not end the dispatcher: log, back off, retry.
            report.ok = False
            report.errors.append(f"internal error: {exc!r}")
            self.metrics.errors.labels("internal").inc()
            log.exception("unexpected error in dispatch poll")
        finally:
            self.metrics.poll_seconds.observe(time.monotonic() - t0)
            if report.ok and report.jobs_ok:
                self.consecutive_failures = 0
            else:
                self.consecutive_failures += 1
            self.last_poll = report
        return report

    async def _poll(self, poll_tick: int, report: PollReport) -> None:
        mine_f = [["locked_by_uuid", "=", self.my_token_uuid]]
        queued_f = [["state", "=", "Queued"], ["priority", ">", "0"]]
        records: dict[str, dict[str, Any]] = {}
        # The scheduler is listed while the controller is queried: both start after this
        # poll's tick, which is all the job views below rely on (an operation that finishes
        # after it makes its container BUSY for this poll).
        jobs_task = asyncio.ensure_future(self.backend.list_jobs())
        # Retrieved below on every normal path; this keeps an internal error from also
        # producing "exception was never retrieved" noise.
        jobs_task.add_done_callback(lambda t: t.cancelled() or t.exception())
        # Our own containers are paged by UUID, not "priority desc" as the reference does: the
        # loop orders them itself, a unique key makes offset paging stable while priorities
        # change, and the controller serves it from an index (10,000 Locked containers: 0.5 s
        # for the ten pages instead of 5-13 s sorting all of them for every page).
        for filters, order_by, select in ((mine_f, "uuid", MINE_FIELDS),
                                          (queued_f, "priority desc", None)):
            rows = await self._query_all(filters, report, order_by, select)
            if rows is None:
                report.ok = False
                self.metrics.errors.labels("query").inc()
                # Let the listing finish (the backend may be reporting ended jobs), unused.
                await asyncio.gather(jobs_task, return_exceptions=True)
                return
            for row in rows:
                records[row["uuid"]] = row

        unknown: set[str] = set()
        missing: set[str] = set()
        await self._query_by_uuid(
            [u for u in self.tracked if u not in records], records, missing, unknown, report)

        jobs: dict[str, Job] | None
        try:
            jobs = await jobs_task
        except Exception as exc:
            jobs = None
            report.jobs_ok = False
            report.errors.append(f"list_jobs: {_err(exc)}")
            self.metrics.errors.labels("list_jobs").inc()
            log.warning("error listing %s jobs, decisions that need them wait: %s",
                        self.backend.name, _err(exc))
        if jobs is not None:
            orphans = [n for n in jobs if self._uuid_re.match(n) and n not in records
                       and n not in missing and n not in unknown]
            await self._query_by_uuid(orphans, records, missing, unknown, report)

        by_state: dict[str, int] = {}
        for rec in records.values():
            by_state[rec.get("state", "?")] = by_state.get(rec.get("state", "?"), 0) + 1
        for state in ("Queued", "Locked", "Running", "Complete", "Cancelled"):
            self.metrics.containers.labels(state).set(by_state.get(state, 0))

        # Highest priority first, so the submit queue starts with the most wanted containers.
        order = sorted(records.values(), key=lambda r: -desired_priority(r))
        for rec in order:
            self._decide(rec["uuid"], rec, jobs, poll_tick, report)
        for uuid in missing:
            self._decide(uuid, None, jobs, poll_tick, report)

        if jobs is not None:
            self._update_priorities(records, jobs)

    async def _query_all(
        self, filters: list[list[Any]], report: PollReport, order_by: str = "priority desc",
        select: Sequence[str] | None = None,
    ) -> list[dict[str, Any]] | None:
        """Reference 2.3: a count request, then offset pages of ``API.MaxItemsPerResponse``."""
        order = [order_by]
        try:
            first = await self.client.list(
                "containers", filters=filters, order=order, limit=0, count="exact")
            total = int(first.get("items_available") or 0)
        except Exception as exc:
            report.errors.append(f"count: {_err(exc)}")
            log.warning('error getting count of containers: "%s"', _err(exc))
            return None
        rows: list[dict[str, Any]] = []
        offset = 0
        while offset < total:
            try:
                page = await self.client.list(
                    "containers", filters=filters, order=order, limit=self.batch_size,
                    offset=offset, count="none", select=list(select) if select else None)
            except Exception as exc:
                report.errors.append(f"list: {_err(exc)}")
                log.warning('error getting list of containers: "%s"', _err(exc))
                return None
            items = page.get("items") or []
            if not items:
                break
            rows.extend(items)
            offset += len(items)
        return rows

    async def _query_by_uuid(
        self,
        uuids: list[str],
        records: dict[str, dict[str, Any]],
        missing: set[str],
        unknown: set[str],
        report: PollReport,
    ) -> None:
        """Look containers up by UUID, batches of 20 run concurrently (bounded).

        A UUID absent from a successful answer is ``missing`` (deleted); every UUID of a failed
        batch is ``unknown`` — never "missing" on missing data.
        """

        async def one(batch: list[str]) -> None:
            try:
                async with self._api_sem:
                    page = await self.client.list(
                        "containers", filters=[["uuid", "in", batch]], limit=len(batch),
                        count="none")
            except Exception as exc:
                unknown.update(batch)
                report.errors.append(f"by-uuid: {_err(exc)}")
                self.metrics.errors.labels("query").inc()
                log.warning('error getting list of containers: "%s"', _err(exc))
                return
            found = {row.get("uuid"): row for row in page.get("items") or []}
            if set(found) - set(batch):
                # The server ignored our filter: trust nothing from this answer.
                unknown.update(batch)
                report.errors.append("by-uuid: server response did not match the filter")
                self.metrics.errors.labels("query").inc()
                log.error("BUG? server response did not match requested filters; "
                          "ignoring it rather than act on wrong data")
                return
            for uuid in batch:
                if uuid in found:
                    records[uuid] = found[uuid]
                else:
                    missing.add(uuid)

        await asyncio.gather(*(one(uuids[i:i + UUID_BATCH])
                               for i in range(0, len(uuids), UUID_BATCH)))

    # --- decisions ------------------------------------------------------------------------------

    def _owner(self, rec: Mapping[str, Any]) -> Owner:
        holder = rec.get("locked_by_uuid") or ""
        if not holder:
            return Owner.NONE
        return Owner.ME if holder == self.my_token_uuid else Owner.OTHER

    def _job_view(self, tr: Tracked | None, name: str, jobs: Mapping[str, Job] | None,
                  poll_tick: int) -> JobView:
        if tr is not None and (tr.busy or tr.op_finished_tick > poll_tick):
            return JobView.BUSY
        if jobs is None:
            return JobView.UNKNOWN
        if name in jobs:
            return JobView.PRESENT
        if tr is not None and tr.submitted:
            return JobView.GONE
        return JobView.ABSENT

    def _decide(self, uuid: str, rec: dict[str, Any] | None, jobs: Mapping[str, Job] | None,
                poll_tick: int, report: PollReport) -> None:
        tr = self.tracked.get(uuid)
        state = MISSING if rec is None else str(rec.get("state"))
        owner = Owner.NONE if rec is None else self._owner(rec)
        prio = rec is not None and int(rec.get("priority") or 0) > 0
        view = self._job_view(tr, uuid, jobs, poll_tick)
        rule = decide(state, owner, prio, view)
        ctx = {"container_uuid": uuid}
        if rule is None:
            report.errors.append(f"{uuid}: no rule for {state}/{owner.value}/{prio}/{view.value}")
            self.metrics.errors.labels("decision").inc()
            log.error(
                "no decision rule for container in state %s, lock %s, priority>0 %s, job %s; "
                "leaving it alone (please report this)", state, owner.value, prio, view.value,
                extra=ctx)
            report.decisions[uuid] = Action.WAIT
            return
        action = rule.action
        report.decisions[uuid] = action
        if rec is not None and tr is not None:
            tr.record = rec
        # Track what is ours: locked by us, or with a job we may have to cancel.
        if tr is None and (owner is Owner.ME or view is JobView.PRESENT) and \
                action is not Action.IGNORE:
            tr = self.tracked[uuid] = Tracked(uuid, rec or {})
        if rec is None and tr is not None and not tr.missing_logged:
            tr.missing_logged = True
            log.info('Container "%s" not returned by any query, stopping tracking.', uuid,
                     extra=ctx)
        job = jobs.get(uuid) if jobs is not None else None

        if action is Action.LOCK_AND_SUBMIT:
            assert rec is not None
            if self._backing_off(uuid) or not self.throttle.check(uuid):
                report.decisions[uuid] = Action.WAIT
                return
            tr = self.tracked.setdefault(uuid, Tracked(uuid, rec))
            self._spawn(tr, self._lock_and_submit(tr, rec))
        elif action is Action.SUBMIT:
            assert rec is not None and tr is not None
            if self._backing_off(uuid):
                report.decisions[uuid] = Action.WAIT
                return
            self._spawn(tr, self._fetch_and_submit(tr))
        elif action is Action.CANCEL_JOB:
            assert tr is not None
            now = self.clock()
            if tr.last_cancel_at is not None and now - tr.last_cancel_at < max(
                    CANCEL_REPEAT_S, self.poll_interval_s):
                report.decisions[uuid] = Action.WAIT
                return
            self._spawn(tr, self._cancel(tr, job, state))
        elif action is Action.CHECK_VANISHED:
            assert tr is not None
            self._spawn(tr, self._check_vanished(tr))
        elif action is Action.UNLOCK:
            assert tr is not None
            self._spawn(tr, self._unlock(tr, "priority is 0 and no job was submitted"))
        elif action in (Action.FORGET, Action.IGNORE):
            if tr is not None and not tr.busy:
                del self.tracked[uuid]
                log.info("Done monitoring container %s", uuid, extra=ctx)
        elif action is Action.NOTHING:
            if job is not None and job.pending and state == "Locked" and tr is not None:
                self._update_scheduling_status(tr, job)

    def _backing_off(self, uuid: str) -> bool:
        entry = self._backoff.get(uuid)
        return entry is not None and self.clock() < entry[1]

    def _note_transient_failure(self, uuid: str) -> float:
        n, _ = self._backoff.get(uuid, (0, 0.0))
        delay = min(MAX_SUBMIT_BACKOFF_S, self.poll_interval_s * 2 ** min(n, 12))
        delay *= random.uniform(0.5, 1.0)
        self._backoff[uuid] = (n + 1, self.clock() + delay)
        if len(self._backoff) > 10000:  # forget the oldest, the map must not grow forever
            now = self.clock()
            for key in [k for k, (_, until) in self._backoff.items() if until < now]:
                del self._backoff[key]
        return delay

    # --- operations (each runs as a task; one at a time per container) ----------------------------

    def _spawn(self, tr: Tracked, coro: Awaitable[None]) -> None:
        tr.busy = True
        self.metrics.inflight.inc()

        async def runner() -> None:
            try:
                await coro
            except Exception:
                self.metrics.errors.labels("internal").inc()
                log.exception("unexpected error handling container", extra={
                    "container_uuid": tr.uuid})
            finally:
                tr.busy = False
                self._tick += 1
                tr.op_finished_tick = self._tick
                self.metrics.inflight.dec()

        task = asyncio.get_running_loop().create_task(runner())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _lock_and_submit(self, tr: Tracked, rec: dict[str, Any]) -> None:
        ctx = {"container_uuid": tr.uuid}
        try:
            async with self._api_sem:
                locked = await self.client.lock(tr.uuid)
        except Exception as exc:
            self.metrics.errors.labels("lock").inc()
            log.warning("error locking container %s: %s", tr.uuid, _err(exc), extra=ctx)
            return
        rec = {**rec, **{k: v for k, v in locked.items() if v is not None},
               "state": "Locked", "locked_by_uuid": self.my_token_uuid}
        tr.record = rec
        tr.submitted = False
        tr.scheduling_status = None
        await self._submit(tr, rec)

    async def _fetch_and_submit(self, tr: Tracked) -> None:
        """Submit a container we hold the lock of, from its full and fresh record (polls only
        read :data:`MINE_FIELDS` of our containers)."""
        try:
            async with self._api_sem:
                rec = await self.client.get("containers", tr.uuid)
        except Exception as exc:
            if not _is_not_found(exc):
                self.metrics.errors.labels("get").inc()
                log.warning("error getting container %s to submit it: %s", tr.uuid, _err(exc),
                            extra={"container_uuid": tr.uuid})
            return
        tr.record = rec
        if rec.get("state") != "Locked" or self._owner(rec) is not Owner.ME or \
                int(rec.get("priority") or 0) <= 0:
            return  # changed since the poll: the next poll decides on the new state
        await self._submit(tr, rec)

    async def _submit(self, tr: Tracked, rec: dict[str, Any]) -> None:
        ctx = {"container_uuid": tr.uuid}
        async with self._submit_sem:
            log.info("Submitting container %s to %s", tr.uuid, self.backend.name, extra=ctx)
            try:
                await self.backend.submit(rec)
            except (SubmitFailed, ConstraintsNotSatisfiable, JobScriptError) as exc:
                failure = exc
            except Exception as exc:  # a backend bug or an unexpected OS error: transient
                failure = SubmitFailed(_err(exc))
            else:
                tr.submitted = True
                self._backoff.pop(tr.uuid, None)
                self.metrics.submits.inc()
                log.info('Start monitoring container %s in state "Locked"', tr.uuid, extra=ctx)
                return
        permanent = not isinstance(failure, SubmitFailed) or failure.permanent
        if isinstance(failure, ConstraintsNotSatisfiable):
            message = failure.report(tr.uuid)
        else:
            message = f"Error running container {tr.uuid}: {_err(failure)}"
        self.metrics.submit_errors.labels("permanent" if permanent else "transient").inc()
        log.warning("%s", message.rstrip("\n"), extra=ctx)
        await self._write_log_record(tr.uuid, message)
        if permanent:
            # runtime_status.error carries the bare reason, as arvados-dispatch-lsf and
            # arvados-dispatch-cloud write it; the log record above keeps the full report.
            if isinstance(failure, ConstraintsNotSatisfiable):
                reason = failure.message
                detail = message.rstrip("\n").partition("\n")[2]
            else:
                reason, detail = _err(failure), ""
            await self._cancel_container_with_error(tr, rec, reason, detail)
        else:
            delay = self._note_transient_failure(tr.uuid)
            log.info("unlocking container %s after a failed submission; next attempt in %.0fs",
                     tr.uuid, delay, extra=ctx)
            await self._unlock(tr, "submission failed")

    async def _write_log_record(self, uuid: str, text: str) -> None:
        try:
            async with self._api_sem:
                await self.client.create_log(uuid, "dispatch", text=text)
        except Exception as exc:
            self.metrics.errors.labels("log").inc()
            log.warning("error creating log record for %s: %s", uuid, _err(exc),
                        extra={"container_uuid": uuid})

    async def _cancel_container_with_error(
        self, tr: Tracked, rec: Mapping[str, Any], message: str, detail: str = ""
    ) -> None:
        ctx = {"container_uuid": tr.uuid}
        status = dict(rec.get("runtime_status") or {})
        # Well-known keys (reference 1.4): a one-line error, the rest (e.g. the list of
        # available instance types) as errorDetail.
        first, _, rest = message.partition("\n")
        status["error"] = first
        detail = "\n".join(part for part in (rest.strip(), detail.strip()) if part)
        if detail:
            status["errorDetail"] = detail
        try:
            async with self._api_sem:
                # runtime_status can only be written while we hold the lock: before Cancelled.
                await self.client.update("containers", tr.uuid, {"runtime_status": status})
        except Exception as exc:
            self.metrics.errors.labels("update").inc()
            log.warning("error setting runtime_status on %s: %s", tr.uuid, _err(exc), extra=ctx)
        await self._set_state(tr, "Cancelled")

    async def _set_state(self, tr: Tracked, state: str, error: str = "", detail: str = "") -> bool:
        """Change the state; with ``error`` (and ``detail``), also set ``runtime_status.error``
        (and ``errorDetail``) in the same update (allowed when leaving Running), falling back
        to the state alone if refused."""
        try:
            async with self._api_sem:
                if error:
                    status = {**(tr.record.get("runtime_status") or {}), "error": error}
                    if detail:
                        status["errorDetail"] = detail
                    try:
                        await self.client.update("containers", tr.uuid,
                                                 {"state": state, "runtime_status": status})
                        return True
                    except Exception as exc:
                        if getattr(exc, "status", None) != 422:
                            raise
                await self.client.update("containers", tr.uuid, {"state": state})
            return True
        except Exception as exc:
            self.metrics.errors.labels("update").inc()
            log.warning('error updating container %s to state "%s": %s', tr.uuid, state,
                        _err(exc), extra={"container_uuid": tr.uuid})
            return False

    async def _unlock(self, tr: Tracked, why: str) -> None:
        ctx = {"container_uuid": tr.uuid}
        try:
            async with self._api_sem:
                rec = await self.client.unlock(tr.uuid)
        except Exception as exc:
            self.metrics.errors.labels("unlock").inc()
            log.warning("error unlocking container %s: %s", tr.uuid, _err(exc), extra=ctx)
            return
        tr.submitted = False
        log.info("unlocked container %s (%s); now %s", tr.uuid, why, rec.get("state"),
                 extra=ctx)

    async def _cancel(self, tr: Tracked, job: Job | None, state: str) -> None:
        ctx = {"container_uuid": tr.uuid}
        if job is not None and job.job_id:
            ctx["job_id"] = job.job_id
        why = "is done" if state in DONE else f'has state "{state}", priority 0'
        if state == "Queued":
            why = "is not locked"
        log.info("container %s %s: cancel %s job", tr.uuid, why, self.backend.name, extra=ctx)
        try:
            async with self._submit_sem:
                await self.backend.cancel(tr.uuid, job)
        except Exception as exc:
            self.metrics.errors.labels("cancel").inc()
            log.warning("error cancelling job of container %s: %s", tr.uuid, _err(exc),
                        extra=ctx)
            return
        tr.last_cancel_at = self.clock()
        self.metrics.cancels.inc()

    async def _check_vanished(self, tr: Tracked) -> None:
        """The job left the queue: decide on a *fresh* record, or not at all."""
        ctx = {"container_uuid": tr.uuid}
        log.info("container %s job disappeared from %s queue", tr.uuid, self.backend.name,
                 extra=ctx)
        try:
            async with self._api_sem:
                rec = await self.client.get("containers", tr.uuid)
        except Exception as exc:
            if _is_not_found(exc):
                return  # deleted: the next poll sees it missing and forgets it
            self.metrics.errors.labels("get").inc()
            log.warning("error getting final container state for %s: %s", tr.uuid, _err(exc),
                        extra=ctx)
            return
        tr.record = rec
        if self._owner(rec) is not Owner.ME:
            return
        if rec.get("state") == "Running":
            why = (f"the {self.backend.name} job running this container ended without "
                   "crunch-run finishing it (killed, or its node failed)")
            try:
                detail = await asyncio.wait_for(self.backend.describe_vanished(tr.uuid), 60)
            except Exception as exc:  # the reason is a bonus: never let it block the cancel
                log.info("could not tell how the job of %s ended: %s", tr.uuid, _err(exc),
                         extra=ctx)
                detail = ""
            if await self._set_state(tr, "Cancelled", error=why, detail=detail):
                text = f"container {tr.uuid}: {why}; cancelled it"
                await self._write_log_record(tr.uuid, f"{text}\n{detail}" if detail else text)
        elif rec.get("state") == "Locked":
            await self._unlock(tr, "its job left the queue before crunch-run started it")

    # --- side work: scheduling status and priorities ---------------------------------------------

    def _update_scheduling_status(self, tr: Tracked, job: Job) -> None:
        status = self.backend.scheduling_status(job)
        current = (tr.record.get("runtime_status") or {}).get("scheduling_status")
        if not status or status == current or status == tr.scheduling_status:
            return
        tr.scheduling_status = status
        runtime_status = {**(tr.record.get("runtime_status") or {}),
                          "scheduling_status": status}

        async def write() -> None:
            try:
                async with self._api_sem:
                    await self.client.update("containers", tr.uuid,
                                             {"runtime_status": runtime_status})
            except Exception as exc:
                tr.scheduling_status = None  # try again next poll
                self.metrics.errors.labels("update").inc()
                log.debug("error writing scheduling_status: %s", _err(exc),
                          extra={"container_uuid": tr.uuid})

        task = asyncio.get_running_loop().create_task(write())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _update_priorities(self, records: Mapping[str, Mapping[str, Any]],
                           jobs: Mapping[str, Job]) -> None:
        if self._priorities_task is not None and not self._priorities_task.done():
            return  # the previous renice pass is still running
        wanted = {
            uuid: desired_priority(rec)
            for uuid, rec in records.items()
            if uuid in jobs and self._owner(rec) is Owner.ME
            and int(rec.get("priority") or 0) > 0
        }

        async def run() -> None:
            try:
                await self.backend.set_priorities(wanted, jobs)
            except Exception as exc:
                self.metrics.errors.labels("priority").inc()
                log.warning("error setting job priorities: %s", _err(exc))

        self._priorities_task = asyncio.get_running_loop().create_task(run())
