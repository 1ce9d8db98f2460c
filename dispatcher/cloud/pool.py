"""The worker pool: every VM of this dispatcher and what runs on it (reference 5.6).

The pool creates instances (with the reference's tags and init command), adopts the ones a
cloud listing shows, probes them, starts and kills crunch-run on them, and shuts them down when
the state machine says so. It applies the back-off rules of reference 5.6.1:

* ``QuotaError`` — "at quota until fewer than N instances" (or for 1 minute when nothing runs);
* ``CapacityError`` — that type / quota group / everything is "at capacity" for 1 minute;
* ``RateLimitError`` — creates (or lists) are suspended until the provider's earliest retry.

Everything the scheduler calls (``create``, ``start_container``, ``kill_container``,
``shutdown``, ``instances``, ``running`` ...) is synchronous and never waits for the cloud: slow
work is spawned as a task (tracked in ``self._tasks``; tests await :meth:`settle`).

Deliberate differences from the reference (each tested):

* MaxConcurrentInstanceCreateOps only refuses while that many creates are in flight; it does not
  add a fixed 5 s hold-off after they finish.
* A booting worker this process created is not dropped as "disappeared" by a listing that
  started less than ``create_list_grace_s`` after its creation (eventually consistent lists).
* Every SSH command has a timeout (probe, deploy, start, kill).
* ``at_quota()`` (no more creates) is separate from ``quota_error_active()`` (the cloud said
  so); only the latter clamps the scheduler's concurrency (packing vs quota, reference 8.3).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import statistics
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from dispatcher.cloud.clock import Clock
from dispatcher.cloud.drivers.base import Executor, Instance, InstanceSet
from dispatcher.cloud.errors import (
    CapacityError,
    DriverError,
    NotFoundError,
    QuotaError,
    RateLimitError,
)
from dispatcher.cloud.metrics import CloudMetrics
from dispatcher.cloud.throttle import Holdoff
from dispatcher.cloud.worker import (
    BootOutcome,
    IdleBehavior,
    State,
    Worker,
    quote_argv,
    runner_md5,
)
from dispatcher.config import ClusterConfig, InstanceType
from dispatcher.core.jobscript import gateway_auth_secret

log = logging.getLogger("crunchgate.cloud.pool")

QUOTA_ERROR_TTL_S = 60.0
CAPACITY_ERROR_TTL_S = 60.0
INSTANCE_SECRET_PATH = "/var/run/arvados-instance-secret"

ExecutorFactory = Callable[[Instance, "Pool"], Executor]


@dataclass
class InstanceView:
    """What the scheduler and the management API see of one worker (reference 5.9)."""

    instance: str
    address: str
    price: float
    arvados_instance_type: str
    provider_instance_type: str
    last_container_uuid: str
    last_busy: float
    running_container_uuids: list[str]
    worker_state: State
    idle_behavior: IdleBehavior
    instance_type: InstanceType = field(repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        """The management API's JSON form."""
        from datetime import UTC, datetime

        return {
            "instance": self.instance,
            "address": self.address,
            "price": self.price,
            "arvados_instance_type": self.arvados_instance_type,
            "provider_instance_type": self.provider_instance_type,
            "last_container_uuid": self.last_container_uuid,
            "last_busy": datetime.fromtimestamp(self.last_busy, UTC).isoformat().replace(
                "+00:00", "Z") if self.last_busy else None,
            "running_container_uuids": list(self.running_container_uuids),
            "worker_state": self.worker_state.value,
            "idle_behavior": self.idle_behavior.value,
        }


@dataclass
class _Create:
    instance_type: InstanceType
    started: float


class Notifier:
    """Fan-out "something changed" signal: each subscriber gets its own event."""

    def __init__(self) -> None:
        self._events: set[asyncio.Event] = set()

    def subscribe(self) -> asyncio.Event:
        ev = asyncio.Event()
        self._events.add(ev)
        return ev

    def unsubscribe(self, ev: asyncio.Event) -> None:
        self._events.discard(ev)

    def notify(self) -> None:
        for ev in self._events:
            ev.set()


def instance_set_id(token: str) -> str:
    """Reference 5.2: ``<uuid>`` of a v2 token, else the md5 hex of the token."""
    import hashlib

    if token.startswith("v2/") and token.count("/") == 2:
        return token.split("/")[1]
    return hashlib.md5(token.encode()).hexdigest()  # noqa: S324 - an identifier, as Arvados


class Pool:
    """All workers of this dispatcher. See the module docstring."""

    def __init__(
        self,
        cfg: ClusterConfig,
        instance_set: InstanceSet,
        executor_factory: ExecutorFactory,
        *,
        set_id: str,
        clock: Clock | None = None,
        metrics: CloudMetrics | None = None,
        public_key: str | None = None,
        runner_data: bytes | None = None,
        api_host: str = "",
    ) -> None:
        vms = cfg.containers.cloud_vms
        self.cfg = cfg
        self.cluster_id = cfg.cluster_id
        self.instance_set = instance_set
        self.executor_factory = executor_factory
        self.set_id = set_id
        self.clock = clock or Clock()
        self.metrics = metrics or CloudMetrics()
        self.public_key = public_key
        self.api_host = api_host
        self.tag_prefix = vms.tag_key_prefix
        # Reference fallbacks when a duration is configured as 0 (5.14).
        self.sync_interval_s = vms.sync_interval_s or 60.0
        self.probe_interval_s = vms.probe_interval_s or 10.0
        self.timeout_idle_s = vms.timeout_idle_s or 60.0
        self.timeout_booting_s = vms.timeout_booting_s or 600.0
        self.timeout_probe_s = vms.timeout_probe_s or 600.0
        self.timeout_shutdown_s = vms.timeout_shutdown_s or 10.0
        self.timeout_term_s = vms.timeout_term_s or 120.0
        self.timeout_signal_s = vms.timeout_signal_s or 5.0
        self.timeout_stale_run_lock_s = vms.timeout_stale_run_lock_s or 5.0
        self.max_probes_per_second = vms.max_probes_per_second if vms.max_probes_per_second >= 1 else 10
        self.max_instances = vms.max_instances
        self.max_concurrent_creates = vms.max_concurrent_instance_create_ops
        self.boot_probe_command = vms.boot_probe_command
        # Timeouts on every remote command (reference 8.3: the original had none).
        self.probe_timeout_s = max(10.0, self.probe_interval_s)
        self.start_timeout_s = 60.0
        self.kill_timeout_s = 30.0
        self.deploy_timeout_s = 300.0
        self.create_list_grace_s = 60.0
        # Runner binary deployment (empty = use Containers.CrunchRunCommand as installed).
        self.runner_data = runner_data or b""
        self.runner_md5 = runner_md5(self.runner_data) if self.runner_data else ""
        directory = vms.deploy_runner_directory.rstrip("/") or "/tmp/arvados-crunch-run"
        self.runner_path = f"{directory}/crunch-run~{self.runner_md5}" if self.runner_data else ""

        self.workers: dict[str, Worker] = {}
        self.creating: dict[str, _Create] = {}     # secret -> pending create
        self.exited: dict[str, float] = {}         # uuid -> exit time (placeholders)
        self.at_quota_until_fewer = 0
        self.at_quota_until = 0.0
        self.at_capacity_until: dict[str, float] = {}
        self.create_holdoff = Holdoff(self.clock, notify=self.notify)
        self.list_holdoff = Holdoff(self.clock, notify=self.notify)
        self.loaded = False
        self.stopped = False
        self._notifier = Notifier()
        self._loaded_event = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[Any]] = []
        self.max_instances_logged = False

    # --- plumbing ----------------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` in the background, keeping a reference and logging crashes."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    async def settle(self, rounds: int = 50) -> None:
        """Wait until no background task is left (tests; also used at stop)."""
        for _ in range(rounds):
            pending = [t for t in self._tasks if not t.done()]
            if not pending:
                await asyncio.sleep(0)
                if not [t for t in self._tasks if not t.done()]:
                    return
                continue
            await asyncio.gather(*pending, return_exceptions=True)

    def subscribe(self) -> asyncio.Event:
        """An event set whenever the pool changes."""
        return self._notifier.subscribe()

    def unsubscribe(self, ev: asyncio.Event) -> None:
        self._notifier.unsubscribe(ev)

    def notify(self) -> None:
        self._notifier.notify()

    # --- commands ----------------------------------------------------------------------------

    def runner_command(self, worker: Worker, rest: str) -> str:
        """``[sudo ]<runner> <rest>`` for ``worker``."""
        runner = self.runner_path or self.cfg.containers.crunch_run_command
        sudo = "" if worker.instance.remote_user == "root" else "sudo "
        return f"{sudo}{runner} {rest}"

    def start_command(self, worker: Worker, uuid: str) -> tuple[str, bytes]:
        """The ``--detach`` command and its ``--stdin-config`` JSON (reference 5.8)."""
        args = [f"--runtime-engine={self.cfg.containers.runtime_engine}",
                *self.cfg.containers.crunch_run_arguments_list, uuid]
        cmd = self.runner_command(worker, "--detach --stdin-config " + quote_argv(args))
        it = worker.instance_type
        host = worker.instance.address.rsplit(":", 1)[0] if worker.instance.address else ""
        env: dict[str, str] = {
            "ARVADOS_API_HOST": self.api_host,
            "ARVADOS_API_TOKEN": self.cfg.system_root_token,
            "InstanceType": json.dumps(instance_type_json(it), indent=4),
            "GatewayAddress": f"{host}:0",
            "GatewayAuthSecret": gateway_auth_secret(self.cfg.system_root_token, uuid),
        }
        if self.cfg.tls.insecure:
            env["ARVADOS_API_HOST_INSECURE"] = "1"
        buffers = self.cfg.containers.local_keep_blob_buffers_per_vcpu
        config = {
            "Env": env,
            "KeepBuffers": buffers * it.vcpus if buffers > 0 else 0,
            "EC2SpotCheck": self.cfg.containers.cloud_vms.driver == "ec2" and it.preemptible,
            # The reference sends the whole cluster config (with every secret in it) here when
            # LocalKeepBlobBuffersPerVCPU > 0. crunchgate's crunch-run runs no local keepstore,
            # so it gets nothing it does not need (reference 8.3).
            "Cluster": None,
        }
        return cmd, json.dumps(config).encode()

    # --- quota and capacity ------------------------------------------------------------------

    def at_quota(self) -> bool:
        """True if no instance can be created now (cloud quota error or MaxInstances)."""
        if self.quota_error_active():
            return True
        return self.max_instances > 0 and len(self.workers) + len(self.creating) >= self.max_instances

    def quota_error_active(self) -> bool:
        """True while a cloud quota error is in force (not merely MaxInstances reached)."""
        return self.at_quota_until_fewer > 0 or self.clock.now() < self.at_quota_until

    def capacity_keys(self, it: InstanceType) -> list[str]:
        """Keys under which a capacity error can block ``it``: all, its quota group, its type."""
        type_key = it.provider_type or it.name
        if it.preemptible:
            type_key += "-preemptible"
        return ["", "group:" + self.instance_set.instance_quota_group(it), "type:" + type_key]

    def at_capacity(self, it: InstanceType) -> bool:
        """True if a recent capacity error blocks creating ``it``."""
        if not self.at_capacity_until:
            return False
        now = self.clock.now()
        return any(self.at_capacity_until.get(k, 0.0) > now for k in self.capacity_keys(it))

    # --- creating ----------------------------------------------------------------------------

    def create(self, it: InstanceType) -> InstanceView | None:
        """Start creating an instance of ``it``; None (and no cloud call) if refused."""
        now = self.clock.now()
        if self.stopped or self.at_capacity(it) or self.at_quota() or self.create_holdoff.check():
            return None
        if self.max_concurrent_creates > 0 and len(self.creating) >= self.max_concurrent_creates:
            log.debug("reached MaxConcurrentInstanceCreateOps (%d)", self.max_concurrent_creates)
            return None
        secret = secrets.token_hex(20)
        p = self.tag_prefix
        tags = {
            p + "InstanceSetID": self.set_id,
            p + "InstanceType": it.name,
            p + "IdleBehavior": IdleBehavior.RUN.value,
            p + "InstanceSecret": secret,
        }
        self.creating[secret] = _Create(it, now)
        if self.max_instances > 0 and len(self.workers) + len(self.creating) == self.max_instances:
            log.info("now at MaxInstances limit of %d instances", self.max_instances)
        self.spawn(self._create(it, secret, tags))
        self.notify()
        return InstanceView(
            instance="", address="", price=it.price, arvados_instance_type=it.name,
            provider_instance_type=it.provider_type or it.name, last_container_uuid="",
            last_busy=0.0, running_container_uuids=[], worker_state=State.BOOTING,
            idle_behavior=IdleBehavior.RUN, instance_type=it,
        )

    def init_command(self, secret: str) -> str:
        """The first-boot script: write the instance secret, then InstanceInitCommand."""
        return (f'umask 0177 && echo -n "{secret}" >{INSTANCE_SECRET_PATH}\n'
                f"{self.cfg.containers.cloud_vms.instance_init_command}")

    async def _create(self, it: InstanceType, secret: str, tags: dict[str, str]) -> None:
        vms = self.cfg.containers.cloud_vms
        try:
            inst = await self.instance_set.create(
                it, vms.image_id, tags, self.init_command(secret), self.public_key)
        except Exception as exc:  # classified below; any failure must release the slot
            self._create_failed(it, secret, exc)
            return
        self._update_worker(inst, it)
        self.creating.pop(secret, None)
        self.notify()

    def _create_failed(self, it: InstanceType, secret: str, exc: Exception) -> None:
        now = self.clock.now()
        is_quota = isinstance(exc, QuotaError)
        is_capacity = isinstance(exc, CapacityError)
        log.warning("create failed (instance type %s, quota error %s, capacity error %s): %s",
                    it.name, is_quota, is_capacity, exc)
        if is_quota:
            n = len(self.workers) + len(self.creating) - 1
            if n < 1:
                log.warning("quota error with 0 running -- waiting for quotaErrorTTL")
                self.at_quota_until = now + QUOTA_ERROR_TTL_S
            elif self.at_quota_until_fewer == 0 or n < self.at_quota_until_fewer:
                log.warning("quota error -- waiting for next instance shutdown (%d)", n)
                self.at_quota_until_fewer = n
        elif isinstance(exc, CapacityError):
            keys = self.capacity_keys(it)
            if exc.instance_type_specific:
                key = keys[2]
            elif exc.quota_group_specific:
                key = keys[1]
            else:
                key = keys[0]
            # No timer: the scheduler re-evaluates at least every few seconds anyway.
            self.at_capacity_until[key] = now + CAPACITY_ERROR_TTL_S
        elif isinstance(exc, RateLimitError):
            log.warning("suspending remote calls due to rate-limit error until %.1f",
                        exc.earliest_retry)
            self.create_holdoff.error_until(exc, exc.earliest_retry)
        elif not isinstance(exc, DriverError):
            log.error("create failed with an unexpected error", exc_info=exc)
        self.creating.pop(secret, None)
        self.notify()

    # --- syncing with the cloud --------------------------------------------------------------

    def _update_worker(self, inst: Instance, it: InstanceType) -> Worker:
        """Add or refresh the worker for a created or listed instance."""
        now = self.clock.now()
        p = self.tag_prefix
        wkr = self.workers.get(inst.id)
        if wkr is not None:
            wkr.instance = inst
            wkr.listed = now
            wkr.executor.set_target(inst)
            want_type, want_behavior = wkr.instance_type.name, wkr.idle_behavior.value
            if (inst.tags.get(p + "InstanceType") != want_type
                    or inst.tags.get(p + "IdleBehavior") != want_behavior):
                self.spawn(self.save_tags(wkr))
            if (wkr.state is State.SHUTDOWN
                    and now - wkr.destroyed > self.timeout_shutdown_s):
                log.info("worker still listed after shutdown; retrying",
                         extra={"instance": inst.id})
                wkr.destroyed = now
                self.spawn(self.destroy_instance(wkr))
            return wkr
        secret = inst.tags.get(p + "InstanceSecret", "")
        state = State.BOOTING if secret in self.creating else State.UNKNOWN
        try:
            behavior = IdleBehavior(inst.tags.get(p + "IdleBehavior", "run"))
        except ValueError:
            behavior = IdleBehavior.RUN
        if it.name not in self.cfg.instance_types and behavior is not IdleBehavior.HOLD:
            # Its type was removed from the config: let it finish and go.
            behavior = IdleBehavior.DRAIN
        executor = self.executor_factory(inst, self)
        wkr = Worker(self, inst, it, executor, state=state, idle_behavior=behavior, now=now)
        self.workers[inst.id] = wkr
        log.info("instance appeared in cloud (state %s, type %s, idle behavior %s)",
                 state.value, it.name, behavior.value, extra={"instance": inst.id})
        return wkr

    def _type_for(self, inst: Instance) -> InstanceType:
        name = inst.tags.get(self.tag_prefix + "InstanceType", "")
        it = self.cfg.instance_types.get(name)
        if it is None:
            it = InstanceType(name=name or inst.provider_type, provider_type=inst.provider_type)
        return it

    async def sync(self) -> bool:
        """One cloud listing, reconciled with the workers; False if the list call failed."""
        if self.list_holdoff.check():
            return False
        threshold = self.clock.now()
        try:
            listed = await self.instance_set.instances({self.tag_prefix + "InstanceSetID":
                                                        self.set_id})
        except RateLimitError as exc:
            self.list_holdoff.error_until(exc, exc.earliest_retry)
            log.warning("suspending instance listing due to rate-limit error: %s", exc)
            return False
        except Exception as exc:  # a failed list must never look like "everything vanished"
            log.warning("error listing instances: %s", exc)
            return False
        seen: set[str] = set()
        for inst in listed:
            if inst.id in seen:
                continue
            seen.add(inst.id)
            self._update_worker(inst, self._type_for(inst))
        for wid, wkr in list(self.workers.items()):
            if wid in seen or wkr.listed > threshold:
                continue
            if (wkr.state is State.BOOTING and wkr.appeared + self.create_list_grace_s > threshold):
                continue  # created by us moments ago; the listing may lag behind
            self._disappeared(wkr)
        if self.at_quota_until_fewer and len(self.workers) + len(self.creating) < self.at_quota_until_fewer:
            self.at_quota_until_fewer = 0
        if not self.loaded:
            self.loaded = True
            self._loaded_event.set()
        self.notify()
        return True

    def _disappeared(self, wkr: Worker) -> None:
        now = self.clock.now()
        log.info("instance disappeared in cloud (state %s)", wkr.state.value,
                 extra={"instance": wkr.instance.id})
        wkr.report_boot_outcome(BootOutcome.DISAPPEARED)
        self.metrics.instances_disappeared.labels(state=wkr.state.value).inc()
        if wkr.destroyed:
            self.metrics.instances_time_from_shutdown_request_to_disappearance_seconds.observe(
                max(0.0, now - wkr.destroyed))
        for runner in (*wkr.running.values(), *wkr.starting.values()):
            runner.closed = True  # abandoned: no exit placeholder
        del self.workers[wkr.instance.id]
        self.spawn(wkr.executor.close())

    async def wait_loaded(self) -> None:
        """Return once the first cloud listing has been applied."""
        await self._loaded_event.wait()

    # --- probing -----------------------------------------------------------------------------

    async def probe_all(self, *, wait: bool = False) -> None:
        """One probe round: idle-shutdown check, then a probe per worker, paced."""
        tasks = []
        for wkr in list(self.workers.values()):
            if wkr.state is State.SHUTDOWN:
                continue
            if wkr.shutdown_if_idle():
                continue
            if wkr.probing:
                continue
            tasks.append(self.spawn(wkr.probe_and_update()))
            if not wait and self.max_probes_per_second > 0:
                await self.clock.sleep(1.0 / self.max_probes_per_second)
        if wait and tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # --- operations for the scheduler and the management API --------------------------------

    def instances(self) -> list[InstanceView]:
        """One view per worker and per pending create, sorted by instance ID then type."""
        views = [self._view(w) for w in self.workers.values()]
        for c in self.creating.values():
            it = c.instance_type
            views.append(InstanceView(
                instance="", address="", price=it.price, arvados_instance_type=it.name,
                provider_instance_type=it.provider_type or it.name, last_container_uuid="",
                last_busy=0.0, running_container_uuids=[], worker_state=State.BOOTING,
                idle_behavior=IdleBehavior.RUN, instance_type=it,
            ))
        views.sort(key=lambda v: (v.instance, v.arvados_instance_type))
        return views

    def _view(self, w: Worker) -> InstanceView:
        it = w.instance_type
        return InstanceView(
            instance=w.instance.id, address=w.instance.address, price=it.price,
            arvados_instance_type=it.name, provider_instance_type=w.instance.provider_type,
            last_container_uuid=w.last_uuid, last_busy=w.busy,
            running_container_uuids=w.container_uuids(), worker_state=w.state,
            idle_behavior=w.idle_behavior, instance_type=it,
        )

    def running(self) -> dict[str, float]:
        """uuid -> 0.0 for running/starting crunch-run processes, or the exit time of exited
        ones whose placeholder was not forgotten yet."""
        out = dict(self.exited)
        for w in self.workers.values():
            for uuid in w.running:
                out[uuid] = 0.0
            for uuid in w.starting:
                out[uuid] = 0.0
        return out

    def count_workers(self) -> dict[State, int]:
        """Number of workers per state."""
        counts = dict.fromkeys(State, 0)
        for w in self.workers.values():
            counts[w.state] += 1
        return counts

    def start_container(self, instance_id: str, ctr: dict[str, Any]) -> bool:
        """Start ``ctr`` on the worker; False unless it is idle/running with behavior run."""
        wkr = self.workers.get(instance_id)
        if wkr is None or wkr.state not in (State.IDLE, State.RUNNING):
            return False
        if wkr.idle_behavior is not IdleBehavior.RUN:
            return False
        if ctr["uuid"] in wkr.running or ctr["uuid"] in wkr.starting:
            return True
        wkr.start_container(ctr)
        self.notify()
        return True

    def kill_container(self, uuid: str, reason: str) -> bool:
        """Start the kill sequence for ``uuid`` wherever it runs; False if it runs nowhere."""
        for wkr in self.workers.values():
            runner = wkr.running.get(uuid) or wkr.starting.get(uuid)
            if runner is not None:
                runner.kill(reason)
                return True
        log.debug("cannot kill: already disappeared", extra={"container_uuid": uuid})
        return False

    def forget_container(self, uuid: str) -> None:
        """Drop the exited placeholder of ``uuid``."""
        self.exited.pop(uuid, None)

    def shutdown(self, instance_id: str) -> bool:
        """Shut down a booting or idle worker that is not on hold (scheduler, over quota)."""
        wkr = self.workers.get(instance_id)
        if wkr is None or wkr.idle_behavior is IdleBehavior.HOLD:
            return False
        if wkr.state not in (State.BOOTING, State.IDLE):
            return False
        log.info("shutdown worker (requested by scheduler)", extra={"instance": instance_id})
        wkr.report_boot_outcome(BootOutcome.ABORTED)
        wkr.shutdown()
        return True

    def kill_instance(self, instance_id: str, reason: str) -> None:
        """Destroy now, whatever its state (management API)."""
        wkr = self.workers.get(instance_id)
        if wkr is None:
            raise NotFoundError("instance not found")
        log.info("shutdown worker: %s", reason, extra={"instance": instance_id})
        wkr.report_boot_outcome(BootOutcome.ABORTED)
        wkr.shutdown()

    def set_idle_behavior(self, instance_id: str, behavior: IdleBehavior) -> None:
        """Set run/hold/drain; saves the tag; a drained idle worker goes at once."""
        wkr = self.workers.get(instance_id)
        if wkr is None:
            raise NotFoundError("requested instance does not exist")
        wkr.set_idle_behavior(behavior)
        wkr.shutdown_if_idle()
        self.notify()

    async def save_tags(self, wkr: Worker) -> None:
        """Write the worker's type and idle behavior back to its instance tags."""
        p = self.tag_prefix
        tags = dict(wkr.instance.tags)
        tags[p + "InstanceType"] = wkr.instance_type.name
        tags[p + "IdleBehavior"] = wkr.idle_behavior.value
        try:
            await wkr.instance.set_tags(tags)
        except Exception as exc:
            log.warning("error updating instance tags: %s", exc, extra={"instance": wkr.instance.id})

    async def destroy_instance(self, wkr: Worker) -> None:
        try:
            await wkr.instance.destroy()
        except Exception as exc:
            log.warning("shutdown failed: %s", exc, extra={"instance": wkr.instance.id})
        await wkr.executor.close()

    # --- metrics -----------------------------------------------------------------------------

    def update_metrics(self) -> None:
        """Refresh the pool's gauges (instances_total, prices, probe ages ...)."""
        m = self.metrics
        now = self.clock.now()
        categories = ("inuse", "hold", "booting", "unknown", "idle")
        counts: dict[tuple[str, str], int] = {}
        price = dict.fromkeys(categories, 0.0)
        vcpus = dict.fromkeys(categories, 0)
        ram = dict.fromkeys(categories, 0)
        running = 0
        ages = []
        for name in self.cfg.instance_types:
            for cat in categories:
                counts[(cat, name)] = 0
        for w in self.workers.values():
            n = len(w.running) + len(w.starting)
            running += n
            if n:
                cat = "inuse"
            elif w.idle_behavior is IdleBehavior.HOLD:
                cat = "hold"
            elif w.state is State.BOOTING:
                cat = "booting"
            elif w.state is State.UNKNOWN:
                cat = "unknown"
            else:
                cat = "idle"
            key = (cat, w.instance_type.name)
            counts[key] = counts.get(key, 0) + 1
            price[cat] += w.instance_type.price
            vcpus[cat] += w.instance_type.vcpus
            ram[cat] += w.instance_type.ram
            if w.state is not State.SHUTDOWN:
                ages.append(now - w.probed)
        for (cat, name), n in counts.items():
            m.instances_total.labels(category=cat, instance_type=name).set(n)
        for cat in categories:
            m.instances_price.labels(category=cat).set(price[cat])
            m.vcpus_total.labels(category=cat).set(vcpus[cat])
            m.memory_bytes_total.labels(category=cat).set(ram[cat])
        m.containers_running.set(running)
        m.at_quota.set(1 if self.at_quota() else 0)
        m.probe_age_seconds_max.set(max(ages) if ages else 0)
        m.probe_age_seconds_median.set(statistics.median(ages) if ages else 0)

    # --- loops -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the sync, probe and metrics loops."""
        self._loops = [
            asyncio.get_running_loop().create_task(self._sync_loop()),
            asyncio.get_running_loop().create_task(self._probe_loop()),
        ]

    async def _sync_loop(self) -> None:
        while not self.stopped:
            await self.sync()
            self.update_metrics()
            await self.clock.sleep(self.sync_interval_s)

    async def _probe_loop(self) -> None:
        import random

        while not self.stopped:
            await self.probe_all()
            self.update_metrics()
            # A little jitter so that many dispatchers' probes do not align (reference 5.7).
            await self.clock.sleep(self.probe_interval_s * (1 + random.random() / 23))

    async def stop(self) -> None:
        """Stop the loops and close SSH connections. Instances are left running (re-adopted by
        the next dispatcher process through their tags)."""
        self.stopped = True
        for t in self._loops:
            t.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for w in self.workers.values():
            await w.executor.close()


def instance_type_json(it: InstanceType) -> dict[str, Any]:
    """Arvados' InstanceType JSON (``Name`` and ``Scratch`` are not serialized)."""
    return {
        "ProviderType": it.provider_type or it.name,
        "VCPUs": it.vcpus,
        "RAM": it.ram,
        "IncludedScratch": it.included_scratch,
        "AddedScratch": it.added_scratch,
        "Price": it.price,
        "Preemptible": it.preemptible,
        "GPU": {
            "Stack": it.gpu.stack,
            "DriverVersion": it.gpu.driver_version,
            "HardwareTarget": it.gpu.hardware_target,
            "DeviceCount": it.gpu.device_count,
            "VRAM": it.gpu.vram,
        },
    }

