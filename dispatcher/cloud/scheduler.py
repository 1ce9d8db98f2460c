"""The cloud scheduler: maps queued containers onto instances (reference 5.5).

One pass is :meth:`Scheduler.run_queue` (lock, start, create, unlock, shut down) followed by
:meth:`Scheduler.sync` (reconcile queue states with what the pool reports running). Both are
synchronous and do no I/O themselves: API calls (lock/unlock/cancel) run as background tasks
guarded by a per-container "operation in progress" marker, and the pool's methods never wait for
the cloud. That keeps a pass over 10,000 containers and 1,000 instances well under a second
(``bench/cloud_scheduler.py``).

Differences from the reference, on purpose (each tested):

* Among instances that fit, a ready (idle/running) one is preferred over a booting one before
  "more containers already allocated" is considered (reference 8.3).
* With ``MaxInstances`` set, Queued containers are only locked as far as the instances still
  allowed (packed) can hold them; the reference locks them all and unlocks the surplus on the
  next pass, burning a dispatch attempt of each.
* A Queued container is not locked on the strength of an adopted instance (state unknown)
  that has not been probed yet: after a restart that instance may well be full of containers
  (the reference locks, then unlocks on the next pass, burning a dispatch attempt).
* Reaching ``MaxInstances`` stops instance creation but does not clamp the concurrency limit to
  the number of instances; only a quota error from the cloud does, and then to
  max(instances, running containers) so packed instances keep their work (reference 8.3). For
  the same reason the limit starts at ``InitialQuotaEstimate`` (0 = none), not MaxInstances.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from dispatcher.cloud.clock import Clock
from dispatcher.cloud.metrics import CloudMetrics
from dispatcher.cloud.pool import InstanceView
from dispatcher.cloud.queue import QueueEnt
from dispatcher.cloud.worker import IdleBehavior, State
from dispatcher.config import ClusterConfig, InstanceType
from dispatcher.core.sizing import InstanceResources

log = logging.getLogger("crunchgate.cloud.scheduler")

# Status strings exactly as the reference (two spaces after each period).
STATUS_PREPARING = "Container is allocated to an instance and preparing to run."
STATUS_WAITING_BOOT = "Waiting for a {type} instance to boot and be ready to accept work."
STATUS_WAITING_PREVIOUS = "Waiting for previous container attempt to exit."
STATUS_PRIORITY_ZERO = ("This container will not be scheduled to run because its priority is 0 "
                        "and state is {state}.")
STATUS_SUPERVISOR_QUEUE = ("Waiting in workflow queue at position {n}.  Cluster is at capacity "
                           "and cannot start any new workflows right now.")
STATUS_TYPES_AT_CAPACITY = ("Waiting in queue at position {n}.  Cluster is at capacity for all "
                            "eligible instance types ({types}) and cannot start a new instance "
                            "right now.")
STATUS_AT_QUOTA = ("Waiting in queue at position {n}.  Cluster is at cloud account limits and "
                   "cannot start any new instances right now.")
STATUS_AT_CAPACITY = ("Waiting in queue at position {n}.  Cluster is at capacity and cannot start "
                      "any new instances right now.")


def _planned_view(it: InstanceType) -> InstanceView:
    """A stand-in for an instance a later pass will create (packing Queued containers)."""
    return InstanceView(instance="", address="", price=it.price, arvados_instance_type=it.name,
                        provider_instance_type=it.provider_type or it.name,
                        last_container_uuid="", last_busy=0.0, running_container_uuids=[],
                        worker_state=State.BOOTING, idle_behavior=IdleBehavior.RUN,
                        instance_type=it)


class QueueLike(Protocol):
    """What the scheduler needs from the container queue (:class:`ContainerQueue`)."""

    def entries(self) -> tuple[dict[str, QueueEnt], float]: ...
    async def lock(self, uuid: str) -> None: ...
    async def unlock(self, uuid: str) -> None: ...
    async def cancel(self, uuid: str) -> None: ...
    def forget(self, uuid: str) -> None: ...
    def subscribe(self) -> asyncio.Event: ...


class PoolLike(Protocol):
    """What the scheduler needs from the worker pool (:class:`Pool`)."""

    loaded: bool  # the first cloud listing has been applied

    def running(self) -> dict[str, float]: ...
    def instances(self) -> list[InstanceView]: ...
    def at_quota(self) -> bool: ...
    def quota_error_active(self) -> bool: ...
    def at_capacity(self, it: InstanceType) -> bool: ...
    def create(self, it: InstanceType) -> InstanceView | None: ...
    def start_container(self, instance_id: str, ctr: dict[str, Any]) -> bool: ...
    def kill_container(self, uuid: str, reason: str) -> bool: ...
    def forget_container(self, uuid: str) -> None: ...
    def shutdown(self, instance_id: str) -> bool: ...
    def count_workers(self) -> dict[State, int]: ...
    def subscribe(self) -> asyncio.Event: ...
    def unsubscribe(self, ev: asyncio.Event) -> None: ...


@dataclass
class _Slot:
    """One instance during a pass: what is left on it."""

    view: InstanceView
    index: int
    remaining: InstanceResources
    n: int                      # containers running or allocated
    full: bool = False
    ready: bool = field(init=False)   # idle/running (computed once: hot in _best_slot)

    def __post_init__(self) -> None:
        self.ready = self.view.worker_state in (State.IDLE, State.RUNNING)


@dataclass
class SortedEnt:
    """One queue entry as the last pass saw it (management API)."""

    ent: QueueEnt
    scheduling_status: str = ""

    def to_json(self) -> dict[str, Any]:
        return self.ent.to_json(self.scheduling_status)


@dataclass
class PassResult:
    """Counters of one :meth:`Scheduler.run_queue` pass (tests, bench, metrics)."""

    locks: int = 0
    starts: int = 0
    creates: int = 0
    unlocks: int = 0
    shutdowns: int = 0
    over_quota: int = 0
    allocated_not_started: int = 0
    statuses: dict[str, str] = field(default_factory=dict)


class Scheduler:
    """See the module docstring."""

    def __init__(
        self,
        cfg: ClusterConfig,
        queue: QueueLike,
        pool: PoolLike,
        *,
        clock: Clock | None = None,
        metrics: CloudMetrics | None = None,
        last_503: Callable[[], float] = lambda: 0.0,
    ) -> None:
        vms = cfg.containers.cloud_vms
        self.cfg = cfg
        self.queue = queue
        self.pool = pool
        self.clock = clock or Clock()
        self.metrics = metrics or CloudMetrics()
        self.last_503 = last_503
        self.max_per_instance = vms.max_running_containers_per_instance
        self.supervisor_fraction = vms.supervisor_fraction
        # The reference starts at MaxInstances when InitialQuotaEstimate is 0. MaxInstances
        # counts instances, not containers, and with packing that limit would hold back work
        # on instances with room to spare (reference 8.3), so 0 (no limit) it is.
        self.max_concurrency = max(0, vms.initial_quota_estimate)
        self.instances_within_quota = 0
        self._last_503_seen = 0.0
        self.in_progress: set[str] = set()
        # Per-container API operations and the workers that run them (see _bg).
        self.api_concurrency = max(1, cfg.api.max_concurrent_requests // 4)
        self._ops: deque[tuple[str, str, Callable[[], Coroutine[Any, Any, Any]]]] = deque()
        self._op_workers = 0
        self.last_sorted: list[SortedEnt] = []
        self.last_sorted_at = 0.0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._wakeup: asyncio.Event | None = None
        self._unexpected_logged: set[str] = set()
        self.stopped = False

    # --- background operations ---------------------------------------------------------------

    def _bg(self, uuid: str, what: str, coro_fn: Callable[[], Coroutine[Any, Any, Any]]) -> bool:
        """Queue one per-container operation unless another is in progress for ``uuid``.

        Operations run on at most ``api_concurrency`` worker tasks, so a pass that locks 5,000
        containers neither creates 5,000 tasks nor sends 5,000 simultaneous API requests.
        """
        if uuid in self.in_progress:
            self._rearm()
            return False
        self.in_progress.add(uuid)
        self._ops.append((uuid, what, coro_fn))
        while self._op_workers < self.api_concurrency and self._op_workers < len(self._ops):
            self._op_workers += 1
            task = asyncio.get_running_loop().create_task(self._op_worker())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return True

    async def _op_worker(self) -> None:
        try:
            while self._ops:
                uuid, what, coro_fn = self._ops.popleft()
                try:
                    await coro_fn()
                except Exception as exc:
                    log.warning("error %s container: %s", what, exc,
                                extra={"container_uuid": uuid})
                finally:
                    self.in_progress.discard(uuid)
        finally:
            self._op_workers -= 1

    def _rearm(self) -> None:
        if self._wakeup is not None and not self._rearm_pending:
            self._rearm_pending = True

            async def later() -> None:
                await self.clock.sleep(0.25)
                self._rearm_pending = False
                if self._wakeup is not None:
                    self._wakeup.set()

            task = asyncio.get_running_loop().create_task(later())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    _rearm_pending = False

    async def settle(self) -> None:
        """Wait for the background operations started so far (tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # --- concurrency limit -------------------------------------------------------------------

    def _update_concurrency(self, running: int, total_instances: int) -> tuple[int, int]:
        """Reference 5.5.2; returns (max_concurrency, max_supervisors)."""
        now = self.clock.now()
        last_503 = self.last_503()
        if last_503 > self._last_503_seen:
            self._last_503_seen = last_503
            self.max_concurrency = max(1, running - 1)
            log.info("API returned 503: max concurrent containers now %d", self.max_concurrency)
        elif self.max_concurrency > 0 and now - last_503 > 60:
            self.max_concurrency = max(self.max_concurrency, running * 11 // 10 + 1)
        if 0 < self.instances_within_quota < total_instances:
            self.instances_within_quota = total_instances
        if self.pool.quota_error_active():
            # Packing: instances may each hold several containers, so the known-good level is
            # the larger of the instance count and the running containers.
            limit = max(total_instances, running) or 1
            if self.max_concurrency == 0 or self.max_concurrency > limit:
                self.max_concurrency = limit
            self.instances_within_quota = limit
        elif self.instances_within_quota > 0 and \
                self.max_concurrency > self.instances_within_quota + 1:
            self.max_concurrency = self.instances_within_quota + 1
        self.metrics.max_concurrent_containers.set(self.max_concurrency)
        max_super = 0
        if self.supervisor_fraction > 0 and self.max_concurrency > 0:
            max_super = max(1, math.floor(self.max_concurrency * self.supervisor_fraction))
        return self.max_concurrency, max_super

    # --- one pass ----------------------------------------------------------------------------

    def run_queue(self) -> PassResult:
        """One scheduling pass (reference 5.5.3). Returns what it did."""
        res = PassResult()
        if not self.pool.loaded:
            # Until the cloud has been listed, "no instance" may just mean "not listed yet":
            # creating instances or cancelling "orphans" now would be wrong.
            return res
        entries, _threshold = self.queue.entries()
        running = self.pool.running()
        views = self.pool.instances()
        max_conc, max_super = self._update_concurrency(len(running), len(views))

        def ent_key(e: QueueEnt) -> tuple[int, int, int, float]:
            c = e.container
            return (
                0 if c["uuid"] in running else 1,
                0 if c.get("state") == "Locked" else 1,
                -int(c.get("priority") or 0),
                e.first_seen_at,
            )

        ordered = sorted(entries.values(), key=ent_key)
        statuses: dict[str, str] = {}

        # Instances, cheapest first, and what is left on each.
        views.sort(key=lambda v: (v.price, -v.instance_type.vcpus, -v.instance_type.ram,
                                  -v.instance_type.scratch, v.instance))
        by_type: dict[str, list[_Slot]] = {}
        slots: list[_Slot] = []
        for i, v in enumerate(views):
            rem = InstanceResources.of_type(v.instance_type)
            full = False
            for uuid in v.running_container_uuids:
                ent = entries.get(uuid)
                if ent is None:
                    full = True  # something we cannot account for: do not pack onto it
                    break
                rem = rem.sub(ent.resources)
            slot = _Slot(v, i, rem, len(v.running_container_uuids), full)
            slots.append(slot)
            usable = (
                not full
                and v.worker_state in (State.UNKNOWN, State.BOOTING, State.IDLE, State.RUNNING)
                and v.idle_behavior is IdleBehavior.RUN
            )
            if usable:
                by_type.setdefault(v.instance_type.name, []).append(slot)

        trying = len(running)
        supervisors = 0
        over_quota: list[QueueEnt] = []
        over_super: list[QueueEnt] = []
        capacity_memo: dict[tuple[str, bool], bool] = {}
        no_fit: set[tuple[str, InstanceResources]] = set()
        at_quota = self.pool.at_quota()
        position = 0
        # How many more instances MaxInstances allows (None: no limit).
        max_instances = self.cfg.containers.cloud_vms.max_instances
        headroom = max(0, max_instances - len(views)) if max_instances > 0 else None

        for idx, ent in enumerate(ordered):
            ctr = ent.container
            uuid = ctr["uuid"]
            state = ctr.get("state")
            if (ctr.get("scheduling_parameters") or {}).get("supervisor"):
                supervisors += 1
                is_super = True
            else:
                is_super = False
            if uuid in running:
                if state in ("Queued", "Locked"):
                    statuses[uuid] = STATUS_PREPARING
                continue
            if int(ctr.get("priority") or 0) < 1:
                statuses[uuid] = STATUS_PRIORITY_ZERO.format(state=state)
                continue
            if is_super and max_super > 0 and supervisors > max_super:
                over_super.append(ent)
                statuses[uuid] = STATUS_SUPERVISOR_QUEUE.format(n=len(over_super))
                continue
            if state not in ("Queued", "Locked"):
                continue
            if max_conc > 0 and trying >= max_conc:
                continue  # keeps its lock if Locked; not locked if Queued
            trying += 1
            fit = self._best_slot(ent, by_type, no_fit)
            available = self._available_type(ent, capacity_memo)
            if state == "Queued":
                if fit is not None and fit.view.worker_state is State.UNKNOWN:
                    # An adopted instance not yet probed may be full of containers its first
                    # probe will report. It counts as capacity (nothing is created for this
                    # container) but locking on its apparent room would lock now and unlock,
                    # burning a dispatch attempt, once the probe reports them.
                    self._allocate(fit, ent, by_type)
                    continue
                if fit is None and at_quota:
                    over_quota = ordered[idx:]
                    break
                if fit is None and available is None:
                    continue
                if fit is None and headroom is not None:
                    # It will need a new instance: only lock as many containers as the
                    # instances MaxInstances still allows can hold, so that they are not
                    # locked now and unlocked (a dispatch attempt burned) on the next pass.
                    if headroom <= 0:
                        continue
                    assert available is not None
                    headroom -= 1
                    fit = _Slot(_planned_view(available), len(slots),
                                InstanceResources.of_type(available), 0)
                    slots.append(fit)
                    by_type.setdefault(available.name, []).append(fit)
                    no_fit = {k for k in no_fit if k[0] != available.name}
                if self._bg(uuid, "locking", functools.partial(self._lock, uuid)):
                    res.locks += 1
                if fit is not None:
                    self._allocate(fit, ent, by_type)
                continue
            # Locked
            if fit is not None:
                self._allocate(fit, ent, by_type)
                v = fit.view
                if not v.instance or v.worker_state not in (State.IDLE, State.RUNNING):
                    statuses[uuid] = STATUS_WAITING_BOOT.format(type=v.instance_type.name)
                    res.allocated_not_started += 1
                elif self.pool.start_container(v.instance, ctr):
                    statuses[uuid] = STATUS_PREPARING
                    res.starts += 1
                else:
                    statuses[uuid] = STATUS_WAITING_BOOT.format(type=v.instance_type.name)
                    res.allocated_not_started += 1
                continue
            if at_quota:
                over_quota = ordered[idx:]
                break
            if available is None:
                position += 1
                statuses[uuid] = STATUS_TYPES_AT_CAPACITY.format(
                    n=position, types=", ".join(t.name for t in ent.instance_types))
                continue
            view = self.pool.create(available)
            if view is None:
                continue
            if headroom is not None:
                headroom -= 1
            log.info("creating new instance (type %s)", available.name,
                     extra={"container_uuid": uuid})
            res.creates += 1
            res.allocated_not_started += 1
            statuses[uuid] = STATUS_WAITING_BOOT.format(type=available.name)
            new_slot = _Slot(view, len(slots), InstanceResources.of_type(available), 0)
            slots.append(new_slot)
            by_type.setdefault(available.name, []).append(new_slot)
            no_fit = {k for k in no_fit if k[0] != available.name}
            self._allocate(new_slot, ent, by_type)
            if self.max_per_instance > 0 and new_slot.n >= self.max_per_instance:
                new_slot.full = True

        res.over_quota = len(over_quota) + len(over_super)
        self.metrics.containers_allocated_not_started.set(res.allocated_not_started)
        self.metrics.containers_not_allocated_over_quota.set(res.over_quota)

        # Everything still without a status waits in line.
        quota_now = self.pool.at_quota()
        for ent in ordered:
            uuid = ent.container["uuid"]
            if uuid in statuses or ent.container.get("state") not in ("Queued", "Locked"):
                continue
            position += 1
            template = STATUS_AT_QUOTA if quota_now else STATUS_AT_CAPACITY
            statuses[uuid] = template.format(n=position)
        self.last_sorted = [SortedEnt(e, statuses.get(e.container["uuid"], "")) for e in ordered]
        self.last_sorted_at = self.clock.now()
        res.statuses = statuses

        # Unlock what cannot run soon, so other dispatch attempts are not burned needlessly
        # except the next in line (keeps its lock through quota flapping) unless there are no
        # instances at all.
        unlock = list(over_super)
        if len(views) == 0 or len(over_quota) == 1:
            unlock += over_quota
        else:
            unlock += over_quota[1:]
        for ent in unlock:
            uuid = ent.container["uuid"]
            if ent.container.get("state") == "Locked" and uuid not in running:
                log.info("unlock because pool capacity is used by higher priority containers",
                         extra={"container_uuid": uuid})
                if self._bg(uuid, "unlocking", functools.partial(self.queue.unlock, uuid)):
                    res.unlocks += 1
        if over_quota:
            for slot in slots:
                if slot.n == 0 and slot.view.instance and \
                        self.pool.shutdown(slot.view.instance):
                    res.shutdowns += 1
        return res

    def _best_slot(self, ent: QueueEnt, by_type: dict[str, list[_Slot]],
                   no_fit: set[tuple[str, InstanceResources]]) -> _Slot | None:
        """The instance to put ``ent`` on: ready before booting, then the one with the most
        containers already (packing), then the cheapest (earliest in sort order).

        ``no_fit`` memoizes (type, need) pairs that fit no instance of that type. Capacity only
        shrinks during a pass, so such a pair stays unfit until an instance of that type is
        added (which clears its memo entries); this keeps a 10,000-container pass fast.
        """
        best: _Slot | None = None
        best_key: tuple[int, int, int] | None = None
        need = ent.resources
        for it in ent.instance_types:
            memo_key = (it.name, need)
            if memo_key in no_fit:
                continue
            found = False
            for slot in by_type.get(it.name, ()):
                if slot.full:
                    continue
                if self.max_per_instance > 0 and slot.n >= self.max_per_instance:
                    continue
                if not slot.remaining.accommodates(need):
                    if slot.n == 0 and slot.ready:
                        log.warning("BUG? insufficient resources on idle instance %s for %s",
                                    slot.view.instance, ent.container["uuid"])
                    continue
                found = True
                key = (1 if slot.ready else 0, slot.n, -slot.index)
                if best_key is None or key > best_key:
                    best, best_key = slot, key
            if not found:
                no_fit.add(memo_key)
        return best

    def _allocate(self, slot: _Slot, ent: QueueEnt, by_type: dict[str, list[_Slot]]) -> None:
        slot.remaining = slot.remaining.sub(ent.resources)
        slot.n += 1
        if slot.remaining.vcpus <= 0 or (self.max_per_instance > 0
                                         and slot.n >= self.max_per_instance):
            # Nothing more can fit (accommodates needs spare VCPUs): keep later searches short.
            slot.full = True
            lst = by_type.get(slot.view.instance_type.name)
            if lst is not None:
                lst.remove(slot)

    def _available_type(self, ent: QueueEnt,
                        memo: dict[tuple[str, bool], bool]) -> InstanceType | None:
        for it in ent.instance_types:
            key = (it.provider_type or it.name, it.preemptible)
            busy = memo.get(key)
            if busy is None:
                busy = memo[key] = self.pool.at_capacity(it)
            if not busy:
                return it
        return None

    async def _lock(self, uuid: str) -> None:
        entries, _ = self.queue.entries()
        ent = entries.get(uuid)
        if ent is None or ent.container.get("state") != "Queued":
            return
        await self.queue.lock(uuid)
        entries, _ = self.queue.entries()
        ent = entries.get(uuid)
        if ent is not None and ent.container.get("state") != "Locked":
            log.warning("lock succeeded but state is %s (race?)", ent.container.get("state"),
                        extra={"container_uuid": uuid})

    # --- sync --------------------------------------------------------------------------------

    def sync(self) -> None:
        """Reconcile queue and pool (reference 5.5.4); nothing before the first listing."""
        if not self.pool.loaded:
            return
        running = self.pool.running()
        entries, q_updated = self.queue.entries()
        any_unknown = self.pool.count_workers().get(State.UNKNOWN, 0) > 0
        for uuid, ent in entries.items():
            ctr = ent.container
            state = ctr.get("state")
            priority = int(ctr.get("priority") or 0)
            exited = running.get(uuid)
            on_worker = exited is not None
            if state == "Running":
                if not on_worker:
                    if not any_unknown:
                        self._cancel(uuid, "not running on any worker")
                elif exited and exited < q_updated:
                    self._cancel(uuid, "state=Running after crunch-run exited")
                elif not exited and priority == 0:
                    self._kill(uuid, "priority=0")
            elif state in ("Complete", "Cancelled"):
                if on_worker:
                    self._kill(uuid, f"state={state}")
                else:
                    log.info("dropping container from queue (state %s)", state,
                             extra={"container_uuid": uuid})
                    self.queue.forget(uuid)
            elif state == "Queued":
                if on_worker:
                    self._kill(uuid, "pool says running, but queue says state=Queued")
                elif priority == 0:
                    log.info("container on hold -- dropping from queue",
                             extra={"container_uuid": uuid})
                    self.queue.forget(uuid)
            elif state == "Locked":
                if on_worker and exited and exited < q_updated:
                    self._requeue(uuid, "crunch-run exited")
                elif on_worker and not exited and priority == 0:
                    self._kill(uuid, "priority=0")
                elif not on_worker and priority == 0:
                    self._requeue(uuid, "priority=0")
            elif uuid not in self._unexpected_logged:
                self._unexpected_logged.add(uuid)
                log.error("BUG: unexpected state %r", state, extra={"container_uuid": uuid})
        for uuid in running:
            if uuid not in entries:
                self._kill(uuid, "not in queue")

    def _kill(self, uuid: str, reason: str) -> None:
        self.pool.kill_container(uuid, reason)
        self.pool.forget_container(uuid)

    def _cancel(self, uuid: str, reason: str) -> None:
        async def run() -> None:
            entries, _ = self.queue.entries()
            ent = entries.get(uuid)
            if ent is None or ent.container.get("state") != "Running":
                return
            log.info("cancelling container because %s", reason, extra={"container_uuid": uuid})
            await self.queue.cancel(uuid)
            self.pool.forget_container(uuid)

        self._bg(uuid, "cancelling", run)

    def _requeue(self, uuid: str, reason: str) -> None:
        async def run() -> None:
            entries, _ = self.queue.entries()
            ent = entries.get(uuid)
            if ent is None or ent.container.get("state") != "Locked":
                return
            log.info("requeueing locked container because %s", reason,
                     extra={"container_uuid": uuid})
            await self.queue.unlock(uuid)
            self.pool.forget_container(uuid)

        self._bg(uuid, "requeueing", run)

    # --- startup -----------------------------------------------------------------------------

    async def fix_stale_locks(self, wait_loaded: Callable[[], Coroutine[Any, Any, None]],
                              stale_lock_timeout_s: float) -> int:
        """Unlock containers a previous dispatcher locked that run nowhere (reference 5.5.5).

        Waits while unknown-state workers (adopted from the previous process) may still report
        them, at most ``stale_lock_timeout_s``. Returns the number unlocked.
        """
        await wait_loaded()
        changed = self.pool.subscribe()
        deadline = self.clock.now() + stale_lock_timeout_s
        stale: list[str] = []
        try:
            while self.pool.count_workers().get(State.UNKNOWN, 0) > 0:
                running = self.pool.running()
                entries, _ = self.queue.entries()
                stale = [u for u, e in entries.items()
                         if e.container.get("state") == "Locked" and u not in running]
                if not stale:
                    return 0
                remaining = deadline - self.clock.now()
                if remaining <= 0:
                    break
                changed.clear()
                waiter = asyncio.ensure_future(changed.wait())
                timer = asyncio.ensure_future(self.clock.sleep(min(remaining, 1.0)))
                try:
                    await asyncio.wait([waiter, timer], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                    timer.cancel()
            else:
                return 0
        finally:
            self.pool.unsubscribe(changed)
        running = self.pool.running()
        entries, _ = self.queue.entries()
        n = 0
        for uuid in stale:
            ent = entries.get(uuid)
            if ent is None or ent.container.get("state") != "Locked" or uuid in running:
                continue
            try:
                await self.queue.unlock(uuid)
                n += 1
            except Exception as exc:
                log.warning("error unlocking stale container: %s", exc,
                            extra={"container_uuid": uuid})
        return n

    # --- main loop ---------------------------------------------------------------------------

    def update_metrics(self) -> None:
        """Queue gauges and the longest wait time."""
        entries, _ = self.queue.entries()
        running = self.pool.running()
        counts: dict[tuple[str, str], int] = {}
        oldest = 0.0
        for ent in entries.values():
            c = ent.container
            it = ent.instance_types[0].name if ent.instance_types else ""
            key = (str(c.get("state")), it)
            counts[key] = counts.get(key, 0) + 1
            if c.get("state") in ("Queued", "Locked") and int(c.get("priority") or 0) > 0 \
                    and c["uuid"] not in running and ent.created_at:
                if not oldest or ent.created_at < oldest:
                    oldest = ent.created_at
        self.metrics.queue_entries.clear()
        for (state, it), n in counts.items():
            self.metrics.queue_entries.labels(state=state, instance_type=it).set(n)
        self.metrics.containers_longest_wait_time_seconds.set(
            max(0.0, self.clock.now() - oldest) if oldest else 0)
        self.metrics.last_503_time.set(self.last_503())

    async def run(self) -> None:
        """The loop: pass, sync, metrics; then wait for a queue/pool change or a wake-up."""
        self._wakeup = asyncio.Event()
        q_ev = self.queue.subscribe()
        p_ev = self.pool.subscribe()
        first = True
        while not self.stopped:
            try:
                self.run_queue()
                self.sync()
                self.update_metrics()
            except Exception:
                log.exception("scheduler pass failed")
            waits = [asyncio.ensure_future(e.wait()) for e in (q_ev, p_ev, self._wakeup)]
            timeout = 1.0 if first else 10.0
            first = False
            try:
                await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            q_ev.clear()
            p_ev.clear()
            self._wakeup.clear()

    async def stop(self) -> None:
        self.stopped = True
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)
