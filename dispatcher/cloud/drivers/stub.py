"""An in-memory cloud for tests and benchmarks: VMs that misbehave on request.

:class:`StubInstanceSet` is a driver; each :class:`StubVM` understands the commands the pool
sends (boot probe, ``md5sum``/deploy, ``crunch-run --list/--detach/--kill``, the instance-secret
``cat``) through :class:`StubExecutor`, without any SSH. Knobs on a VM make it boot slowly,
fail probes, report ``broken``, leave stale locks, refuse to die, hang, or be unreachable;
knobs on the set inject quota, capacity and rate-limit errors at the driver boundary.

What "running a container" means is up to the test: ``on_start(vm, uuid, config)`` is called on
every ``--detach``; the test ends the process with :meth:`StubVM.finish`.
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dispatcher.cloud.clock import Clock
from dispatcher.cloud.drivers.base import Executor, Instance, InstanceSet, PricePoint
from dispatcher.cloud.errors import ExecError, QuotaError
from dispatcher.config import InstanceType

_ids = itertools.count(1)
_SECRET_RE = re.compile(r'echo -n "([0-9a-f]+)" >/var/run/arvados-instance-secret')


@dataclass
class StubProc:
    uuid: str
    config: dict[str, Any]
    stale: bool = False


@dataclass
class StubVM:
    """One fake VM. Set the public attributes to make it misbehave."""

    id: str
    instance_type: InstanceType
    tags: dict[str, str]
    created: float
    init_command: str = ""
    boot_at: float = 0.0                # boot probe fails before this time
    unreachable: bool = False           # every command: connection refused
    boot_probe_fails: bool = False      # boot probe exits 1 forever
    list_fails: bool = False            # --list exits 1
    default_runner_fails: bool = False  # plain "crunch-run --list" fails; deployed one works
    broken: bool = False                # --list prints "broken"
    unkillable: bool = False            # --kill exits 1
    crash_on_start: bool = False        # --detach "succeeds" but the process is gone at once
    deploy_fails: bool = False
    hangs: bool = False                 # every command hangs until the caller's timeout
    address: str = "10.0.0.1"
    remote_user: str = "root"
    procs: dict[str, StubProc] = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)
    timeouts: list[float | None] = field(default_factory=list)   # timeout_s of each command
    deployed: dict[str, bytes] = field(default_factory=dict)
    destroyed: bool = False

    @property
    def secret(self) -> str:
        m = _SECRET_RE.search(self.init_command)
        return m.group(1) if m else ""

    def finish(self, uuid: str) -> None:
        """The container's crunch-run process exits."""
        self.procs.pop(uuid, None)

    def leave_stale(self, uuid: str) -> None:
        """crunch-run exited but its lock is still held (arv-mount lingering)."""
        if uuid in self.procs:
            self.procs[uuid].stale = True


class StubInstance(Instance):
    """A snapshot of a :class:`StubVM` as listed."""

    def __init__(self, iset: StubInstanceSet, vm: StubVM) -> None:
        self._set = iset
        self.vm = vm
        self._tags = dict(vm.tags)

    @property
    def id(self) -> str:
        return self.vm.id

    @property
    def provider_type(self) -> str:
        return self.vm.instance_type.provider_type or self.vm.instance_type.name

    @property
    def address(self) -> str:
        return self.vm.address

    @property
    def remote_user(self) -> str:
        return self.vm.remote_user

    @property
    def tags(self) -> dict[str, str]:
        return self._tags

    async def set_tags(self, tags: Mapping[str, str]) -> None:
        self._set.ops.append(("SetTags", self.vm.id))
        self.vm.tags = dict(tags)
        self._tags = dict(tags)

    async def destroy(self) -> None:
        self._set.ops.append(("Destroy", self.vm.id))
        err = self._set.destroy_error(self.vm) if self._set.destroy_error else None
        if err is not None:
            raise err
        self.vm.destroyed = True
        self._set.vms.pop(self.vm.id, None)

    def price_history(self, it: InstanceType) -> list[PricePoint]:
        return list(self._set.prices)


class StubInstanceSet(InstanceSet):
    """The fake cloud. ``quota``: max VMs; ``create_error(it)`` may return an exception to raise;
    ``new_vm(vm)`` may tweak each new VM (slow boot, broken, ...)."""

    def __init__(
        self,
        clock: Clock | None = None,
        *,
        quota: int | None = None,
        create_error: Callable[[InstanceType], Exception | None] | None = None,
        destroy_error: Callable[[StubVM], Exception | None] | None = None,
        new_vm: Callable[[StubVM], None] | None = None,
        on_start: Callable[[StubVM, str, dict[str, Any]], None] | None = None,
        boot_delay_s: float = 0.0,
        quota_groups: Mapping[str, str] | None = None,
    ) -> None:
        self.clock = clock or Clock()
        self.quota = quota
        self.create_error = create_error
        self.destroy_error = destroy_error
        self.new_vm = new_vm
        self.on_start = on_start
        self.boot_delay_s = boot_delay_s
        self.quota_groups = dict(quota_groups or {})
        self.vms: dict[str, StubVM] = {}
        self.ops: list[tuple[str, str]] = []
        self.list_calls = 0
        self.prices: list[PricePoint] = []
        self.hidden: set[str] = set()   # VMs the listing does not show (eventual consistency)

    async def create(self, it: InstanceType, image_id: str, tags: Mapping[str, str],
                     init_command: str, public_key: str | None) -> Instance:
        err = self.create_error(it) if self.create_error else None
        if err is not None:
            self.ops.append(("Create!", it.name))
            raise err
        if self.quota is not None and len(self.vms) >= self.quota:
            self.ops.append(("Create!", it.name))
            raise QuotaError("stub quota exceeded")
        self.ops.append(("Create", it.name))
        now = self.clock.now()
        vm = StubVM(id=f"inst{next(_ids)}", instance_type=it, tags=dict(tags), created=now,
                    init_command=init_command, boot_at=now + self.boot_delay_s)
        if self.new_vm is not None:
            self.new_vm(vm)
        self.vms[vm.id] = vm
        return StubInstance(self, vm)

    async def instances(self, tags: Mapping[str, str]) -> list[Instance]:
        self.list_calls += 1
        self.ops.append(("List", ""))
        return [StubInstance(self, vm) for vm in self.vms.values()
                if vm.id not in self.hidden
                and all(vm.tags.get(k) == v for k, v in tags.items())]

    def instance_quota_group(self, it: InstanceType) -> str:
        group = self.quota_groups.get(it.name, it.name)
        return group + ("-spot" if it.preemptible else "")

    def executor(self, inst: Instance, pool: Any = None) -> StubExecutor:
        """Executor factory for :class:`dispatcher.cloud.pool.Pool`."""
        return StubExecutor(self, inst.id)


class StubExecutor(Executor):
    """Interprets the pool's command strings against a :class:`StubVM`."""

    def __init__(self, iset: StubInstanceSet, vm_id: str) -> None:
        self.set = iset
        self.vm_id = vm_id

    async def execute(self, cmd: str, stdin: bytes | None = None, *,
                      env: Mapping[str, str] | None = None,
                      timeout_s: float | None = None) -> tuple[bytes, bytes]:
        vm = self.set.vms.get(self.vm_id)
        if vm is None or vm.unreachable:
            raise ExecError("dial tcp: connection refused", connect_failed=True)
        vm.commands.append(cmd)
        vm.timeouts.append(timeout_s)
        if vm.hangs:
            # A hung remote command: only the caller's timeout ends it (None = forever).
            if timeout_s is None:
                import asyncio

                await asyncio.Event().wait()
            await self.set.clock.sleep(float(timeout_s or 0))
            raise ExecError(f"{cmd.split()[0]}: timed out after {timeout_s}s", timed_out=True)
        out, err, status = self._run(vm, cmd, stdin or b"")
        if status != 0:
            raise ExecError(f"{cmd.split()[0]}: exit status {status}", exit_status=status,
                            stdout=out, stderr=err)
        return out, err

    def _run(self, vm: StubVM, cmd: str, stdin: bytes) -> tuple[bytes, bytes, int]:
        now = self.set.clock.now()
        if cmd.startswith("sudo ") and not cmd.startswith("sudo sh -c"):
            cmd = cmd[5:]
        if "arvados-instance-secret" in cmd and cmd.split()[0] in ("cat", "sudo"):
            return vm.secret.encode(), b"", 0
        if cmd.startswith("md5sum "):
            path = cmd.split()[1]
            if path in vm.deployed:
                import hashlib

                return (f"{hashlib.md5(vm.deployed[path]).hexdigest()}  {path}\n".encode(),  # noqa: S324
                        b"", 0)
            return b"", b"md5sum: no such file\n", 1
        if "dstfile=" in cmd:
            if vm.deploy_fails:
                return b"", b"disk full\n", 1
            m = re.search(r'dstfile="([^"]+)"', cmd)
            if m:
                vm.deployed[m.group(1)] = stdin
            return b"", b"", 0
        if " --list" in cmd:
            runner = cmd.split(" --list")[0]
            if vm.list_fails or (vm.default_runner_fails and "~" not in runner):
                return b"", b"crunch-run: not found\n", 127
            lines = []
            if vm.broken:
                lines.append("broken")
            for p in vm.procs.values():
                lines.append(f"{p.uuid} stale" if p.stale else p.uuid)
            return ("\n".join(lines) + ("\n" if lines else "")).encode(), b"", 0
        if " --detach " in cmd:
            args = shlex.split(cmd.split(" --detach ", 1)[1])
            uuid = args[-1]
            if uuid in vm.procs:
                return b"", b"lock already held\n", 1
            config = json.loads(stdin or b"{}")
            if not vm.crash_on_start:
                vm.procs[uuid] = StubProc(uuid, config)
            if self.set.on_start is not None:
                self.set.on_start(vm, uuid, config)
            return json.dumps({"UUID": uuid, "PID": 4242}).encode() + b"\n", b"", 0
        if " --kill " in cmd:
            uuid = cmd.split()[-1]
            if vm.unkillable and uuid in vm.procs:
                return b"", b"still running\n", 1
            vm.procs.pop(uuid, None)
            return b"", b"", 0
        # Anything else is the boot probe.
        if vm.boot_probe_fails or now < vm.boot_at:
            return b"", b"starting\n", 1
        return b"running\n", b"", 0
