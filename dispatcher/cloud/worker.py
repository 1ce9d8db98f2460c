"""One cloud VM and the crunch-run processes on it: the worker state machine (reference 5.7).

States and the transitions between them are the table :data:`TRANSITIONS`; any other transition
raises :class:`InvalidTransition` (an unlisted transition is a bug, not a silent no-op). When an
instance may be shut down is the function :func:`shutdown_eligible`, a pure function of state,
idle behavior and times.

A :class:`Worker` never sleeps and never reads the clock directly: it asks its :class:`Pool`
(``self.pool``) for the clock, the timeouts, the command strings and the notifier, so that unit
tests drive it with a fake clock and a stub executor.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dispatcher.cloud.drivers.base import Executor, Instance
from dispatcher.cloud.errors import ExecError
from dispatcher.config import InstanceType

if TYPE_CHECKING:
    from dispatcher.cloud.pool import Pool

log = logging.getLogger("crunchgate.cloud.worker")


class _Log(logging.LoggerAdapter[logging.Logger]):
    """Adds the worker's fields to every record, merged with a call's own ``extra`` (the
    stock LoggerAdapter replaces it, dropping e.g. the container UUID)."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        kwargs["extra"] = {**(self.extra or {}), **(kwargs.get("extra") or {})}
        return msg, kwargs


class State(enum.StrEnum):
    """Worker states (the values are the management API's ``worker_state`` strings)."""

    UNKNOWN = "unknown"    # listed in the cloud, not created by this process, not yet probed OK
    BOOTING = "booting"    # created by this process, boot probe not yet OK
    IDLE = "idle"          # booted, no containers
    RUNNING = "running"    # booted, >= 1 container running or starting
    SHUTDOWN = "shutdown"  # destroy requested


class IdleBehavior(enum.StrEnum):
    """What the pool may do with an instance (``<prefix>IdleBehavior`` tag)."""

    RUN = "run"      # normal
    HOLD = "hold"    # never shut down automatically, no new containers
    DRAIN = "drain"  # no new containers, shut down as soon as idle


class BootOutcome(enum.StrEnum):
    """Label values of ``boot_outcomes``; recorded at most once per worker."""

    SUCCEEDED = "success"
    FAILED = "failure"
    ABORTED = "aborted"
    DISAPPEARED = "disappeared"


# The explicit state table: from-state -> states it may move to.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.UNKNOWN: frozenset({State.IDLE, State.SHUTDOWN}),
    State.BOOTING: frozenset({State.IDLE, State.SHUTDOWN}),
    State.IDLE: frozenset({State.RUNNING, State.SHUTDOWN}),
    State.RUNNING: frozenset({State.IDLE, State.SHUTDOWN}),
    State.SHUTDOWN: frozenset(),
}


class InvalidTransition(RuntimeError):
    """A transition not in :data:`TRANSITIONS` was attempted (a bug)."""


def shutdown_eligible(
    state: State,
    behavior: IdleBehavior,
    *,
    now: float,
    appeared: float,
    busy: float,
    timeout_idle_s: float,
    timeout_booting_s: float,
    all_runners_given_up: bool,
    has_runners: bool = False,
) -> bool:
    """May the pool shut this worker down now? (reference 5.7 "Shutdown eligibility").

    One difference: an adopted (unknown) worker whose run-probe reports containers is not shut
    down just because TimeoutBooting has passed since it appeared. The reference destroys it
    with its containers (reference 8.3), e.g. every VM whose ``systemctl is-system-running``
    says "degraded" after a dispatcher restart; here it goes once they have finished.
    """
    if behavior is IdleBehavior.HOLD:
        return False
    draining = behavior is IdleBehavior.DRAIN
    if state is State.BOOTING:
        return draining
    if state is State.IDLE:
        return draining or now - busy >= timeout_idle_s
    if state is State.RUNNING:
        return draining and all_runners_given_up
    if state is State.UNKNOWN:
        return now - appeared >= timeout_booting_s and not has_runners
    return False


def sh_quote(arg: str) -> str:
    """Single-quote one argument the way the reference does (``'`` -> ``'\\''``)."""
    return "'" + arg.replace("'", "'\\''") + "'"


@dataclass
class ListResult:
    """Parsed ``crunch-run --list`` output (reference 5.8)."""

    running: list[str]
    stale: list[str]
    broken: bool


def parse_list_output(stdout: str, cluster_id: str) -> ListResult:
    """One item per line: ``broken``, ``<uuid>`` or ``<uuid> stale``; other clusters ignored."""
    running: list[str] = []
    stale: list[str] = []
    broken = False
    for line in stdout.split("\n"):
        line = line.strip()
        if not line:
            continue
        if line == "broken":
            broken = True
        elif cluster_id and not line.startswith(cluster_id):
            # Another cluster's crunch-run on a shared host (loopback driver).
            continue
        else:
            toks = line.split(" ")
            if len(toks) == 1:
                running.append(toks[0])
            elif toks[1] == "stale":
                stale.append(toks[0])
    return ListResult(running, stale, broken)


class RemoteRunner:
    """One crunch-run process on a worker: started by us, or detected by a probe.

    ``exited`` is set once ``--kill`` reported the process gone or a probe stopped listing it.
    The kill sequence (``--kill 15`` now, then every TimeoutSignal until TimeoutTERM, then give up
    and drain the worker) runs at most once per runner; SIGKILL is never sent.
    """

    def __init__(self, worker: Worker, uuid: str) -> None:
        self.worker = worker
        self.uuid = uuid
        self.given_up = False
        self.closed = False
        self._kill_task: asyncio.Task[None] | None = None

    def _log(self) -> logging.LoggerAdapter[logging.Logger]:
        return logging.LoggerAdapter(
            log, {"container_uuid": self.uuid, "instance": self.worker.instance.id}
        )

    async def start(self, ctr: dict[str, Any]) -> None:
        """Run ``crunch-run --detach`` for ``ctr`` (errors are logged: the next probe decides)."""
        pool = self.worker.pool
        cmd, stdin = pool.start_command(self.worker, self.uuid)
        try:
            await self.worker.execute(cmd, stdin, timeout_s=pool.start_timeout_s)
            self._log().info("crunch-run process started")
            created = _parse_time(ctr.get("created_at"))
            if created is not None:
                pool.metrics.containers_time_from_queue_to_crunch_run_seconds.observe(
                    max(0.0, pool.clock.now() - created))
        except ExecError as exc:
            # Reference behaviour: the runner counts as running until the next run-probe (which
            # will not list it), then the scheduler requeues the container.
            self._log().warning("error starting crunch-run process: %s (stderr %r)", exc,
                                exc.stderr[-500:])
        self.worker.runner_started(self.uuid)

    def kill(self, reason: str) -> None:
        """Start the kill sequence unless it is already running."""
        if self._kill_task is not None or self.closed:
            return
        self._log().info("killing crunch-run process: %s", reason)
        self._kill_task = self.worker.pool.spawn(self._kill_loop())

    async def _kill_loop(self) -> None:
        pool = self.worker.pool
        clock = pool.clock
        deadline = clock.now() + pool.timeout_term_s
        cmd = pool.runner_command(self.worker, f"--kill 15 {self.uuid}")
        while not self.closed:
            try:
                await self.worker.execute(cmd, None, timeout_s=pool.kill_timeout_s)
                self._log().info("crunch-run process ended")
                self.worker.close_runner(self.uuid)
                return
            except ExecError as exc:
                self._log().info("kill attempt unsuccessful: %s", exc)
            if clock.now() >= deadline:
                self.given_up = True
                self.worker.runner_gave_up(self.uuid)
                return
            await clock.sleep(pool.timeout_signal_s)


def _parse_time(value: Any) -> float | None:
    if not value or not isinstance(value, str):
        return None
    from datetime import datetime

    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class Worker:
    """One VM in the pool. All mutation happens on the event loop thread (no locks needed)."""

    def __init__(
        self,
        pool: Pool,
        instance: Instance,
        instance_type: InstanceType,
        executor: Executor,
        *,
        state: State,
        idle_behavior: IdleBehavior,
        now: float,
    ) -> None:
        self.pool = pool
        self.instance = instance
        self.instance_type = instance_type
        self.executor = executor
        self.state = state
        self.idle_behavior = idle_behavior
        self.appeared = now
        self.probed = now          # last successful probe (initially the appearance time)
        self.updated = now         # last change of state/runners
        self.busy = now            # last time known to run a container
        self.listed = now          # last time a cloud listing showed it
        self.destroyed = 0.0       # when shutdown was requested
        self.first_ssh = 0.0
        self.last_uuid = ""
        self.running: dict[str, RemoteRunner] = {}
        self.starting: dict[str, RemoteRunner] = {}
        self.probing = False
        self.boot_outcome_reported = False
        self.stale_run_lock_since = 0.0
        self.deployed_runner = False
        self.last_stderr = b""
        self.log = _Log(log, {"instance": instance.id})

    # --- state table --------------------------------------------------------------------------

    def set_state(self, new: State) -> None:
        """Move to ``new``; raises :class:`InvalidTransition` if the table does not allow it."""
        if new is self.state:
            return
        if new not in TRANSITIONS[self.state]:
            raise InvalidTransition(f"worker {self.instance.id}: {self.state.value} -> {new.value}")
        self.state = new
        self.updated = self.pool.clock.now()

    def _idle_or_running(self) -> None:
        """Make the state agree with the runner count (only for booted workers)."""
        busy = bool(self.running or self.starting)
        if self.state is State.IDLE and busy:
            self.set_state(State.RUNNING)
        elif self.state is State.RUNNING and not busy:
            self.set_state(State.IDLE)

    # --- views -------------------------------------------------------------------------------

    @property
    def secret(self) -> str:
        return self.instance.tags.get(self.pool.tag_prefix + "InstanceSecret", "")

    def container_uuids(self) -> list[str]:
        """Running and starting containers, sorted."""
        return sorted(set(self.running) | set(self.starting))

    # --- commands ----------------------------------------------------------------------------

    async def execute(self, cmd: str, stdin: bytes | None, *, timeout_s: float) -> bytes:
        """Run ``cmd`` through the executor, recording the first SSH contact; returns stdout."""
        try:
            stdout, _stderr = await self.executor.execute(cmd, stdin, timeout_s=timeout_s)
        except ExecError as exc:
            if not exc.connect_failed and exc.exit_status is not None:
                self._saw_ssh()
            raise
        self._saw_ssh()
        return stdout

    def _saw_ssh(self) -> None:
        if not self.first_ssh:
            self.first_ssh = self.pool.clock.now()
            if self.state is State.BOOTING:
                self.pool.metrics.instances_time_to_ssh_seconds.observe(
                    max(0.0, self.first_ssh - self.appeared))

    # --- probes ------------------------------------------------------------------------------

    async def probe_and_update(self) -> None:
        """One probe: boot probe (+ deploy) until booted, then ``crunch-run --list``.

        Implements reference 5.7 "One probe"; a probe already in progress makes this a no-op.
        """
        if self.probing:
            return
        self.probing = True
        try:
            await self._probe_and_update()
        finally:
            self.probing = False

    async def _probe_and_update(self) -> None:
        pool = self.pool
        initial_state = self.state
        updated = self.updated
        if initial_state is State.SHUTDOWN:
            return
        booted = initial_state in (State.IDLE, State.RUNNING)
        probe_start = pool.clock.now()
        stderr = b""
        if not booted:
            booted, stderr = await self._probe_booted()
            should_deploy = booted or initial_state is State.UNKNOWN
            if not booted and self.state in (State.IDLE, State.RUNNING):
                # A concurrent probe (or a racing update) already brought it into service.
                booted, should_deploy = True, False
            if should_deploy and not await self._deploy_runner():
                booted = False
        ctr_uuids: list[str] = []
        ok = False
        broken = False
        if booted or self.state is State.UNKNOWN:
            ctr_uuids, broken, ok = await self._probe_running()
        if broken and self.idle_behavior is IdleBehavior.RUN:
            self.log.info("probe reported broken instance")
            self.report_boot_outcome(BootOutcome.FAILED)
            self.set_idle_behavior(IdleBehavior.DRAIN)
        if not ok or (not booted and not ctr_uuids and not self.running):
            if self.state is State.SHUTDOWN:
                return
            # Measure from the probe's *start*, so at least one probe attempt is made after the
            # timeout expires (a slow failure must not shut down an instance that recovered).
            elapsed = probe_start - self.probed
            if self._shutdown_if_broken(elapsed) and not booted:
                self.report_boot_outcome(BootOutcome.FAILED)
                self.log.info("boot failed after %.1fs: stderr %r", elapsed, stderr[-1000:])
            return
        now = pool.clock.now()
        self.probed = now
        if updated != self.updated:
            # Started a container while probing: the listing may predate it. Next probe.
            return
        if ctr_uuids:
            self.busy = now
            if not self.last_uuid:
                self.last_uuid = ctr_uuids[0]
        elif self.running:
            self.busy = now
        changed = self._update_running(ctr_uuids)
        became_ready = False
        if booted and self.state in (State.UNKNOWN, State.BOOTING):
            if self.state is State.BOOTING and self.first_ssh:
                pool.metrics.instances_time_to_ready_for_container_seconds.observe(
                    max(0.0, now - self.first_ssh))
            self.set_state(State.IDLE)
            changed = became_ready = True
        if not changed:
            return
        if self.state is State.UNKNOWN:
            self.log.info("crunch-run probe succeeded, but boot probe is still failing "
                          "(%d running)", len(self.running))
        self._idle_or_running()
        self.updated = now
        if became_ready:
            self.report_boot_outcome(BootOutcome.SUCCEEDED)
            self.log.info("probes succeeded, instance is in service (state %s, %d running)",
                          self.state.value, len(self.running))
        pool.notify()

    async def _probe_booted(self) -> tuple[bool, bytes]:
        cmd = self.pool.boot_probe_command or "true"
        try:
            await self.execute(cmd, None, timeout_s=self.pool.probe_timeout_s)
        except ExecError as exc:
            self.last_stderr = exc.stderr
            if exc.connect_failed or exc.exit_status is not None or exc.timed_out:
                self.log.debug("boot probe failed: %s", exc)
            else:
                self.log.warning("boot probe failed: %s", exc)
            return False, exc.stderr
        self.log.info("boot probe succeeded")
        return True, b""

    async def _deploy_runner(self) -> bool:
        """Copy the runner binary if configured and not already there (reference 5.8)."""
        pool = self.pool
        if not pool.runner_data:
            return True
        if self.deployed_runner:
            return True
        path = pool.runner_path
        try:
            out, err = await self.executor.execute(
                f"md5sum {path}", None, timeout_s=pool.probe_timeout_s)
            if not err and out.decode(errors="replace") == f"{pool.runner_md5}  {path}\n":
                self.log.debug("runner binary already exists on worker, with correct hash")
                self.deployed_runner = True
                return True
        except ExecError:
            pass
        directory = pool.runner_path.rsplit("/", 1)[0]
        script = (
            f'set -e; dstdir="{directory}/"; dstfile="{path}"; mkdir -p "$dstdir"; '
            'touch "$dstfile"; chmod 0755 "$dstdir" "$dstfile"; cat >"$dstfile"'
        )
        if self.instance.remote_user != "root":
            script = "sudo sh -c " + sh_quote(script)
        try:
            await self.execute(script, pool.runner_data, timeout_s=pool.deploy_timeout_s)
        except ExecError as exc:
            self.log.warning("error copying runner binary: %s (stderr %r)", exc, exc.stderr[-500:])
            return False
        self.deployed_runner = True
        return True

    async def _probe_running(self) -> tuple[list[str], bool, bool]:
        pool = self.pool
        cmd = pool.runner_command(self, "--list")
        stdin = None
        prices = self.instance.price_history(self.instance_type)
        if prices:
            from datetime import UTC, datetime

            stdin = json.dumps([
                {"StartTime": datetime.fromtimestamp(p.start_time, UTC).strftime(
                    "%Y-%m-%dT%H:%M:%SZ"), "Price": p.price}
                for p in prices
            ]).encode()
            cmd += " --stdin-prices"
        before = pool.clock.now()
        try:
            stdout = await self.execute(cmd, stdin, timeout_s=pool.probe_timeout_s)
        except ExecError as exc:
            self.log.warning("probe failed: %s (stderr %r)", exc, exc.stderr[-500:])
            pool.metrics.instances_run_probe_duration_seconds.labels(outcome="fail").observe(
                max(0.0, pool.clock.now() - before))
            return [], False, False
        pool.metrics.instances_run_probe_duration_seconds.labels(outcome="success").observe(
            max(0.0, pool.clock.now() - before))
        result = parse_list_output(stdout.decode(errors="replace"), pool.cluster_id)
        broken = result.broken
        now = pool.clock.now()
        if not result.stale:
            self.stale_run_lock_since = 0.0
        elif not self.stale_run_lock_since:
            self.stale_run_lock_since = now
        elif now - self.stale_run_lock_since > pool.timeout_stale_run_lock_s:
            self.log.warning("reporting broken after reporting stale run lock for too long")
            broken = True
        return result.running, broken, True

    def _shutdown_if_broken(self, elapsed: float) -> bool:
        if self.idle_behavior is IdleBehavior.HOLD:
            return False
        label, threshold = "", self.pool.timeout_probe_s
        if self.state in (State.UNKNOWN, State.BOOTING):
            label, threshold = "new ", self.pool.timeout_booting_s
        if elapsed < threshold:
            return False
        self.log.warning("%sinstance unresponsive, shutting down (no successful probe for "
                         "%.1fs; try 'crunchgate dispatch-cloud instances')", label, elapsed)
        self.shutdown()
        return True

    def _update_running(self, reported: Iterable[str]) -> bool:
        """Reconcile runners with a probe's list; True if anything changed."""
        changed = False
        alive = set(reported)
        for uuid in alive:
            if uuid in self.running:
                continue
            if uuid in self.starting:
                # --detach returned and the process is listed: it is running now.
                self.running[uuid] = self.starting.pop(uuid)
            else:
                self.log.info("crunch-run process detected", extra={"container_uuid": uuid})
                self.running[uuid] = RemoteRunner(self, uuid)
                self.pool.exited.pop(uuid, None)
            changed = True
        for uuid in list(self.running):
            if uuid not in alive:
                self.log.info("crunch-run process ended", extra={"container_uuid": uuid})
                self.close_runner(uuid, notify=False)
                changed = True
        return changed

    # --- containers --------------------------------------------------------------------------

    def start_container(self, ctr: dict[str, Any]) -> None:
        """Start crunch-run for ``ctr`` (the pool checked the state and behavior)."""
        uuid = ctr["uuid"]
        runner = RemoteRunner(self, uuid)
        self.starting[uuid] = runner
        self.pool.exited.pop(uuid, None)
        if self.state is State.IDLE:
            self.set_state(State.RUNNING)
        now = self.pool.clock.now()
        self.busy = now
        self.updated = now
        self.last_uuid = uuid
        self.pool.spawn(runner.start(ctr))

    def runner_started(self, uuid: str) -> None:
        """``--detach`` returned (successfully or not): starting -> running."""
        runner = self.starting.pop(uuid, None)
        if runner is None or runner.closed:
            return
        self.running[uuid] = runner
        self.updated = self.pool.clock.now()
        self.pool.notify()

    def close_runner(self, uuid: str, *, notify: bool = True) -> None:
        """The process for ``uuid`` is gone: drop the runner, leave an exit placeholder."""
        runner = self.running.pop(uuid, None) or self.starting.pop(uuid, None)
        if runner is None:
            return
        runner.closed = True
        now = self.pool.clock.now()
        self.pool.exited[uuid] = now
        self.busy = now
        self.updated = now
        if self.state in (State.IDLE, State.RUNNING):
            self._idle_or_running()
        if notify:
            self.pool.notify()

    def runner_gave_up(self, uuid: str) -> None:
        """The kill sequence gave up: stop putting containers here (reference 5.8)."""
        if self.idle_behavior is not IdleBehavior.HOLD:
            self.log.warning("unkillable container, draining worker",
                             extra={"container_uuid": uuid})
            self.set_idle_behavior(IdleBehavior.DRAIN)
        self.pool.notify()

    # --- shutdown ----------------------------------------------------------------------------

    def all_runners_given_up(self) -> bool:
        return all(r.given_up for r in (*self.running.values(), *self.starting.values()))

    def eligible_for_shutdown(self) -> bool:
        """Reference 5.7 shutdown eligibility at the pool's current time."""
        return shutdown_eligible(
            self.state, self.idle_behavior, now=self.pool.clock.now(), appeared=self.appeared,
            busy=self.busy, timeout_idle_s=self.pool.timeout_idle_s,
            timeout_booting_s=self.pool.timeout_booting_s,
            all_runners_given_up=self.all_runners_given_up(),
            has_runners=bool(self.running or self.starting),
        )

    def shutdown_if_idle(self) -> bool:
        """Shut down if eligible; True if it did."""
        if not self.eligible_for_shutdown():
            return False
        self.log.info("shutdown worker (state %s, idle behavior %s)", self.state.value,
                      self.idle_behavior.value)
        self.report_boot_outcome(BootOutcome.ABORTED)
        self.shutdown()
        return True

    def shutdown(self) -> None:
        """Enter SHUTDOWN and destroy the instance in the background (sync retries it)."""
        if self.state is State.SHUTDOWN:
            return
        self.set_state(State.SHUTDOWN)
        self.destroyed = self.pool.clock.now()
        self.pool.notify()
        self.pool.spawn(self.pool.destroy_instance(self))

    def set_idle_behavior(self, behavior: IdleBehavior) -> None:
        """Change the behavior (the pool saves it in the instance's tags)."""
        if behavior is self.idle_behavior:
            return
        self.idle_behavior = behavior
        self.updated = self.pool.clock.now()
        self.pool.spawn(self.pool.save_tags(self))

    def report_boot_outcome(self, outcome: BootOutcome) -> None:
        """Count the boot outcome once per worker."""
        if self.boot_outcome_reported:
            return
        self.boot_outcome_reported = True
        self.pool.metrics.boot_outcomes.labels(outcome=outcome.value).inc()


def runner_md5(data: bytes) -> str:
    """The md5 hex digest that names the deployed runner (``crunch-run~<md5>``)."""
    return hashlib.md5(data).hexdigest()  # noqa: S324 - a content name, not security


def quote_argv(args: Iterable[str]) -> str:
    """Arguments as one shell string, each single-quoted (``--detach`` command format)."""
    return " ".join(sh_quote(a) for a in args)


__all__ = [
    "BootOutcome",
    "IdleBehavior",
    "InvalidTransition",
    "ListResult",
    "RemoteRunner",
    "State",
    "TRANSITIONS",
    "Worker",
    "parse_list_output",
    "quote_argv",
    "sh_quote",
    "shutdown_eligible",
]
