"""Cloud dispatcher test helpers: stub queue/pool for scheduler tests, a real sshd on loopback,
and moto's EC2 server on loopback.

Non-fixture helpers are imported by the cloud tests (``from tests.helpers.cloud import ...``);
fixtures are area-prefixed (``cloud_sshd``, ``cloud_moto``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dispatcher.cloud.pool import InstanceView
from dispatcher.cloud.queue import QueueEnt
from dispatcher.cloud.worker import IdleBehavior, State
from dispatcher.config import ClusterConfig, InstanceType
from dispatcher.core.sizing import InstanceResources

GiB = 1 << 30


# --- instance types and queue entries ---------------------------------------------------------


def itype(i: int, *, scratch: int = 0, preemptible: bool = False) -> InstanceType:
    """``typeN``: N VCPUs, N GiB RAM, price N × 0.123 (as the reference's scheduler tests)."""
    return InstanceType(name=f"type{i}", provider_type=f"providertype{i}", vcpus=i, ram=i * GiB,
                        included_scratch=scratch, price=i * 0.123, preemptible=preemptible)


def container_uuid(i: int) -> str:
    return f"zzzzz-dz642-{i:015d}"


def choose(menu: list[InstanceType], need: InstanceResources,
           factor: float = 1.5) -> list[InstanceType]:
    """Fitting types of ``menu``, cheapest first, within ``factor`` of the cheapest."""
    fit = sorted((t for t in menu if t.vcpus >= need.vcpus and t.ram >= need.ram
                  and t.scratch >= need.scratch),
                 key=lambda t: (t.price, -t.ram, -t.vcpus, t.name))
    if not fit:
        return []
    limit = fit[0].price * max(factor, 1.0)
    return [t for i, t in enumerate(fit) if i == 0 or t.price <= limit + 1e-9]


def make_ent(i: int, state: str, *, menu: list[InstanceType], priority: int | None = None,
             vcpus: int = 1, ram: int = GiB, supervisor: bool = False, factor: float = 1.5,
             first_seen: float = 0.0, created_at: str = "") -> QueueEnt:
    need = InstanceResources(vcpus=vcpus, ram=ram)
    ctr = {
        "uuid": container_uuid(i),
        "state": state,
        "priority": i if priority is None else priority,
        "runtime_constraints": {"vcpus": vcpus, "ram": ram},
        "scheduling_parameters": {"supervisor": supervisor},
        "container_image": "",
        "created_at": created_at,
    }
    return QueueEnt.make(ctr, choose(menu, need, factor), need, first_seen or float(i))


def view(instance: str, it: InstanceType, state: State = State.IDLE,
         behavior: IdleBehavior = IdleBehavior.RUN, running: list[str] | None = None) -> InstanceView:
    return InstanceView(
        instance=instance, address="", price=it.price, arvados_instance_type=it.name,
        provider_instance_type=it.provider_type, last_container_uuid="", last_busy=0.0,
        running_container_uuids=list(running or []), worker_state=state, idle_behavior=behavior,
        instance_type=it,
    )


# --- stub queue and pool for scheduler unit tests ----------------------------------------------


@dataclass
class StubQueue:
    """In-memory queue: lock/unlock/cancel change states and are recorded."""

    ents: dict[str, QueueEnt] = field(default_factory=dict)
    threshold: float = 0.0
    changes: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, *ents: QueueEnt) -> None:
        for e in ents:
            self.ents[e.container["uuid"]] = e

    def entries(self) -> tuple[dict[str, QueueEnt], float]:
        return dict(self.ents), self.threshold

    def _move(self, uuid: str, frm: str, to: str) -> None:
        c = self.ents[uuid].container
        if c["state"] != frm:
            raise RuntimeError(f"cannot change {uuid} from {c['state']} to {to}")
        c["state"] = to
        self.changes.append((uuid, frm, to))

    async def lock(self, uuid: str) -> None:
        self._move(uuid, "Queued", "Locked")

    async def unlock(self, uuid: str) -> None:
        self._move(uuid, "Locked", "Queued")

    async def cancel(self, uuid: str) -> None:
        c = self.ents[uuid].container
        self.changes.append((uuid, c["state"], "Cancelled"))
        c["state"] = "Cancelled"

    def forget(self, uuid: str) -> None:
        c = self.ents[uuid].container
        if c["state"] in ("Complete", "Cancelled") or (c["state"] == "Queued"
                                                         and not c["priority"]):
            del self.ents[uuid]

    def subscribe(self) -> asyncio.Event:
        return asyncio.Event()

    def unsubscribe(self, ev: asyncio.Event) -> None:
        pass

    def state(self, i: int) -> str:
        return str(self.ents[container_uuid(i)].container["state"])


@dataclass
class StubPool:
    """In-memory pool for the scheduler (the reference's ``stubPool``)."""

    views: list[InstanceView] = field(default_factory=list)
    quota: int | None = None
    quota_error: bool = False
    capacity: set[str] = field(default_factory=set)     # type names at capacity
    can_create: int | None = None
    run: dict[str, float] = field(default_factory=dict)
    creates: list[str] = field(default_factory=list)
    starts: list[str] = field(default_factory=list)
    kills: list[tuple[str, str]] = field(default_factory=list)
    shutdowns: list[str] = field(default_factory=list)
    forgotten: list[str] = field(default_factory=list)
    loaded: bool = True

    def running(self) -> dict[str, float]:
        return dict(self.run)

    def instances(self) -> list[InstanceView]:
        return [InstanceView(**{**v.__dict__, "running_container_uuids":
                                list(v.running_container_uuids)}) for v in self.views]

    def at_quota(self) -> bool:
        return self.quota_error or (self.quota is not None
                                    and len(self.views) >= self.quota)

    def quota_error_active(self) -> bool:
        return self.quota_error

    def at_capacity(self, it: InstanceType) -> bool:
        return it.name in self.capacity

    def create(self, it: InstanceType) -> InstanceView | None:
        if self.at_quota() or (self.can_create is not None and self.can_create <= 0):
            return None
        if self.can_create is not None:
            self.can_create -= 1
        self.creates.append(it.name)
        v = view("", it, State.BOOTING)
        self.views.append(v)
        return v

    def start_container(self, instance_id: str, ctr: dict[str, Any]) -> bool:
        for v in self.views:
            if v.instance == instance_id:
                if v.worker_state not in (State.IDLE, State.RUNNING) or \
                        v.idle_behavior is not IdleBehavior.RUN:
                    return False
                self.starts.append(ctr["uuid"])
                v.running_container_uuids.append(ctr["uuid"])
                v.worker_state = State.RUNNING
                self.run[ctr["uuid"]] = 0.0
                return True
        return False

    def kill_container(self, uuid: str, reason: str) -> bool:
        self.kills.append((uuid, reason))
        return uuid in self.run and not self.run[uuid]

    def forget_container(self, uuid: str) -> None:
        self.forgotten.append(uuid)
        if self.run.get(uuid):
            del self.run[uuid]

    def shutdown(self, instance_id: str) -> bool:
        for v in self.views:
            if v.instance == instance_id and v.worker_state in (State.BOOTING, State.IDLE) \
                    and v.idle_behavior is not IdleBehavior.HOLD:
                v.worker_state = State.SHUTDOWN
                self.shutdowns.append(instance_id)
                return True
        return False

    def count_workers(self) -> dict[State, int]:
        counts = dict.fromkeys(State, 0)
        for v in self.views:
            if v.instance:
                counts[v.worker_state] += 1
        return counts

    def subscribe(self) -> asyncio.Event:
        return asyncio.Event()

    def unsubscribe(self, ev: asyncio.Event) -> None:
        pass


def stub_config(menu: list[InstanceType], **vms: Any) -> ClusterConfig:
    """A cluster config with ``menu`` as InstanceTypes and CloudVMs overrides (snake_case)."""
    cfg = ClusterConfig()
    cfg.cluster_id = "zzzzz"
    cfg.system_root_token = "v2/zzzzz-gj3su-000000000000000/systemroottokensecret0123456789"
    cfg.instance_types = {t.name: t for t in menu}
    cfg.containers.reserve_extra_ram = 0
    cfg.containers.local_keep_blob_buffers_per_vcpu = 0
    for k, v in vms.items():
        setattr(cfg.containers.cloud_vms, k, v)
    return cfg


# --- processes, ports -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, deadline_s: float = 15.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {deadline_s}s")


def stop_pid(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@dataclass
class SshdInfo:
    port: int
    host_key_path: Path
    client_key_path: Path
    client_key_pem: str
    user: str
    directory: Path


@pytest.fixture
def cloud_sshd() -> Iterator[SshdInfo]:
    """A real OpenSSH sshd on a free loopback port, with a temp host key, accepting one
    generated client key for the current user (root). Stopped by PID at teardown."""
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    keygen = shutil.which("ssh-keygen")
    if not os.path.exists(sshd) or keygen is None:
        pytest.skip("openssh-server is not installed")
    import pwd

    user = pwd.getpwuid(os.getuid()).pw_name
    d = Path(tempfile.mkdtemp(prefix="cg-sshd-"))
    os.chmod(d, 0o700)
    host_key = d / "host_ed25519"
    client_key = d / "client_ed25519"
    subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
    subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(client_key)], check=True)
    auth = d / "authorized_keys"
    auth.write_text((d / "client_ed25519.pub").read_text())
    os.chmod(auth, 0o600)
    port = free_port()
    conf = d / "sshd_config"
    conf.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\n"
        f"AuthorizedKeysFile {auth}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nUsePAM no\n"
        f"PidFile {d / 'sshd.pid'}\nStrictModes no\nMaxStartups 100\nMaxSessions 100\n"
        "AcceptEnv *\nLogLevel ERROR\nSubsystem sftp internal-sftp\n"
    )
    os.makedirs("/run/sshd", exist_ok=True)
    proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=open(d / "sshd.log", "wb"))
    try:
        wait_port(port)
        yield SshdInfo(port, host_key, client_key, client_key.read_text(), user, d)
    finally:
        stop_pid(proc)
        shutil.rmtree(d, ignore_errors=True)


@dataclass
class MotoInfo:
    url: str
    port: int


@pytest.fixture(scope="session")
def cloud_moto() -> Iterator[MotoInfo]:
    """moto's EC2 server mode on a free loopback port (one per test session; tests keep apart
    by using their own InstanceSetID tags)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        _, port = server.get_host_and_port()
        yield MotoInfo(f"http://127.0.0.1:{port}", int(port))
    finally:
        server.stop()


# --- an in-memory controller for the real ContainerQueue ----------------------------------------


class MemoryApiError(Exception):
    def __init__(self, status: int, msg: str) -> None:
        super().__init__(msg)
        self.status = status


class MemoryApi:
    """The subset of ``ArvadosClient`` the cloud queue uses, over an in-memory container table
    with the server's lock rules and MaxDispatchAttempts (reference 1.2/1.3)."""

    TOKEN_UUID = "zzzzz-gj3su-000000000000000"

    def __init__(self, max_dispatch_attempts: int = 10) -> None:
        self.containers: dict[str, dict[str, Any]] = {}
        self.max_dispatch_attempts = max_dispatch_attempts
        self.calls: list[tuple[str, str]] = []
        self.fail_next: list[int] = []   # statuses to raise on the next calls (e.g. 503)
        self.transitions: list[tuple[str, str, str]] = []

    def add(self, uuid: str, **attrs: Any) -> dict[str, Any]:
        c = {"uuid": uuid, "state": "Queued", "priority": 1, "locked_by_uuid": None,
             "lock_count": 0, "runtime_constraints": {"vcpus": 1, "ram": 1 << 30},
             "scheduling_parameters": {}, "container_image": "", "mounts": {},
             "created_at": "2026-01-01T00:00:00Z", "runtime_status": {}}
        c.update(attrs)
        self.containers[uuid] = c
        return c

    def _maybe_fail(self, what: str) -> None:
        self.calls.append((what, ""))
        if self.fail_next:
            from dispatcher.arvados.errors import ApiError

            raise ApiError(self.fail_next.pop(0), ["injected"], "GET", what)

    def _set_state(self, c: dict[str, Any], new: str) -> None:
        self.transitions.append((c["uuid"], c["state"], new))
        c["state"] = new

    async def token_uuid(self) -> str:
        return self.TOKEN_UUID

    async def list(self, resource: str, *, filters: Any = None, order: Any = None,
                   select: Any = None, limit: int | None = None, offset: int | None = None,
                   count: str | None = None) -> dict[str, Any]:
        self._maybe_fail("list")

        def match(c: dict[str, Any], f: list[Any]) -> bool:
            attr, op, val = f
            have = c.get(attr)
            if op == "=":
                return bool(have == val)
            if op == "in":
                return have in val
            if op == ">":
                if attr == "uuid":
                    return str(have) > str(val)
                return have is not None and float(have) > float(val)
            raise ValueError(op)

        rows = [c for c in self.containers.values() if all(match(c, f) for f in filters or [])]
        orders = [order] if isinstance(order, str) else list(order or ["uuid"])
        for o in reversed(orders):
            field_, _, direction = o.partition(" ")
            rows.sort(key=lambda c, f=field_: c.get(f) or 0, reverse=direction == "desc")
        off = offset or 0
        rows = rows[off:off + (limit if limit is not None else 1000)]
        keys = select or list(self.containers[next(iter(self.containers))].keys()) \
            if self.containers else []
        return {"items": [{k: c.get(k) for k in keys} for c in rows]}

    async def get(self, resource: str, uuid: str, *, select: Any = None) -> dict[str, Any]:
        self._maybe_fail("get")
        c = self.containers[uuid]
        return {k: c.get(k) for k in (select or c.keys())}

    async def lock(self, uuid: str) -> dict[str, Any]:
        self._maybe_fail("lock")
        c = self.containers[uuid]
        if c["state"] != "Queued" or c["priority"] <= 0:
            raise MemoryApiError(422, f"cannot lock when {c['state']}")
        self._set_state(c, "Locked")
        c["locked_by_uuid"] = self.TOKEN_UUID
        c["lock_count"] += 1
        return dict(c)

    async def unlock(self, uuid: str) -> dict[str, Any]:
        self._maybe_fail("unlock")
        c = self.containers[uuid]
        if c["state"] != "Locked":
            raise MemoryApiError(422, f"cannot unlock when {c['state']}")
        self._set_state(c, "Cancelled" if c["lock_count"] >= self.max_dispatch_attempts
                        else "Queued")
        c["locked_by_uuid"] = None
        return dict(c)

    async def update(self, resource: str, uuid: str, attrs: dict[str, Any]) -> dict[str, Any]:
        self._maybe_fail("update")
        c = self.containers[uuid]
        if "state" in attrs and attrs["state"] != c["state"]:
            self._set_state(c, attrs["state"])
            if attrs["state"] in ("Complete", "Cancelled"):
                c["locked_by_uuid"] = None
        for k, v in attrs.items():
            if k != "state":
                c[k] = v
        return dict(c)
