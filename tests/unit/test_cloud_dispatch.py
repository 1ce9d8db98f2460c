"""The whole cloud dispatcher on a misbehaving stub cloud (reference 7.7
TestDispatchToStubDriver, TestManagementAPI_Containers), on a fake clock.

Real ContainerQueue (over an in-memory controller with the server's lock rules), real
Scheduler, real Pool and Worker; the stub cloud injects create errors, capacity errors, slow
boots, failing run-probes, broken instances, crunch-run crashes, a lost instance, destroy errors
and an API 503 halfway.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

from dispatcher.cloud.clock import FakeClock
from dispatcher.cloud.drivers.stub import StubInstanceSet, StubVM
from dispatcher.cloud.drivers.wrap import wrap_instance_set
from dispatcher.cloud.errors import CapacityError, DriverError
from dispatcher.cloud.metrics import CloudMetrics
from dispatcher.cloud.pool import Pool
from dispatcher.cloud.queue import ContainerQueue
from dispatcher.cloud.scheduler import Scheduler
from dispatcher.config import InstanceType
from tests.helpers.cloud import MemoryApi, container_uuid, stub_config

GiB = 1 << 30


def menu() -> list[InstanceType]:
    return [InstanceType(name=f"type{n}", provider_type=f"providertype{n}", vcpus=n,
                         ram=int(n * 1.1 * GiB), included_scratch=n * GiB, price=n * 0.123)
            for n in (1, 2, 3, 4, 6, 8, 16)]


class Sim:
    def __init__(self, seed: int = 1, *, quota: int = 10, misbehave: bool = True,
                 capacity_types: tuple[str, ...] = ("type6",), initial_quota: int = 8,
                 run_time: tuple[float, float] = (2, 10)) -> None:
        self.rng = random.Random(seed)
        self.clock = FakeClock(auto_advance=False)
        self.api = MemoryApi()
        self.cfg = stub_config(
            menu(), timeout_booting_s=20, timeout_probe_s=10, timeout_idle_s=5,
            timeout_shutdown_s=2, timeout_term_s=6, timeout_signal_s=1,
            timeout_stale_run_lock_s=2, max_instances=0, initial_quota_estimate=initial_quota,
            max_concurrent_instance_create_ops=2, max_cloud_ops_per_second=0,
            resource_tags={"testtag": "yes"}, tag_key_prefix="test:")
        self.cfg.containers.runtime_engine = "stub"
        self.cfg.containers.crunch_run_arguments_list = ["--foo", "--extra='args'"]
        self.misbehave = misbehave
        self.run_time = run_time
        self.capacity_types = set(capacity_types)
        self.type4_broken = 3 if misbehave else 0
        self.iset = StubInstanceSet(self.clock, quota=quota, create_error=self.create_error,
                                    destroy_error=self.destroy_error, new_vm=self.new_vm,
                                    on_start=self.on_start, boot_delay_s=2)
        self.metrics = CloudMetrics()
        self.pool = Pool(self.cfg, wrap_instance_set(self.iset, self.cfg, self.metrics,
                                                     self.clock),
                         self.iset.executor, set_id="setid", clock=self.clock,
                         metrics=self.metrics, api_host="127.0.0.1:9")
        self.queue = ContainerQueue(self.cfg, self.api, clock=self.clock)
        self.sched = Scheduler(self.cfg, self.queue, self.pool, clock=self.clock,
                               metrics=self.metrics, last_503=lambda: self.queue.last_503)
        self.ends: dict[str, tuple[StubVM, float]] = {}
        self.completed: dict[str, int] = {}
        self.start_commands: list[str] = []
        self.stdin_configs: list[dict[str, Any]] = []
        self.double_runs = 0
        self.all_vms: list[StubVM] = []

    # --- misbehaviour ------------------------------------------------------------------------

    def create_error(self, it: InstanceType) -> Exception | None:
        if it.name in self.capacity_types:
            return CapacityError("no capacity", instance_type_specific=True)
        if self.misbehave and self.rng.random() < 0.1:
            return DriverError("random create failure")
        return None

    def destroy_error(self, vm: StubVM) -> Exception | None:
        if self.misbehave and self.rng.random() < 0.1:
            return DriverError("random destroy failure")
        return None

    def new_vm(self, vm: StubVM) -> None:
        self.all_vms.append(vm)
        if not self.misbehave:
            return
        if vm.instance_type.name == "type4" and self.type4_broken > 0:
            self.type4_broken -= 1
            vm.boot_at = self.clock.now() + 10_000   # never boots: TimeoutBooting
            return
        r = self.rng.random()
        if r < 0.05:
            vm.list_fails = True                      # never passes run-probes
        elif r < 0.10:
            vm.broken = True                          # reports "broken": drained

    def on_start(self, vm: StubVM, uuid: str, config: dict[str, Any]) -> None:
        self.start_commands.append(vm.commands[-1])
        self.stdin_configs.append(config)
        c = self.api.containers[uuid]
        if c["state"] != "Locked":
            vm.finish(uuid)  # crunch-run refuses containers that are not Locked
            return
        if any(uuid in other.procs for other in self.iset.vms.values() if other is not vm):
            self.double_runs += 1
        if self.misbehave and self.rng.random() < 0.1:
            vm.finish(uuid)  # crunch-run crashed before setting Running
            return
        self.api._set_state(c, "Running")
        self.ends[uuid] = (vm, self.clock.now() + self.rng.uniform(*self.run_time))

    # --- driving -----------------------------------------------------------------------------

    def restart(self) -> None:
        """A new dispatcher process (kill -9 of the old one: no cleanup, its tasks just stop)."""
        for obj in (self.pool, self.queue, self.sched):
            for t in list(getattr(obj, "_tasks", ())):
                t.cancel()
        self.metrics = CloudMetrics()
        self.pool = Pool(self.cfg, wrap_instance_set(self.iset, self.cfg, self.metrics,
                                                     self.clock),
                         self.iset.executor, set_id="setid", clock=self.clock,
                         metrics=self.metrics, api_host="127.0.0.1:9")
        self.queue = ContainerQueue(self.cfg, self.api, clock=self.clock)
        self.sched = Scheduler(self.cfg, self.queue, self.pool, clock=self.clock,
                               metrics=self.metrics, last_503=lambda: self.queue.last_503)
        self.restarted = True

    def add_containers(self, n: int) -> None:
        for i in range(1, n + 1):
            self.api.add(container_uuid(i), priority=self.rng.randint(1, 20),
                         runtime_constraints={"vcpus": self.rng.randint(1, 8),
                                              "ram": self.rng.randint(1, 3) * GiB})

    async def step(self, i: int) -> None:
        try:
            await self.queue.update()
        except Exception:
            pass
        if i % 2 == 0:
            await self.pool.sync()
        await self.pool.probe_all(wait=True)
        self.sched.run_queue()
        self.sched.sync()
        self.sched.update_metrics()
        self.pool.update_metrics()
        for _ in range(10):
            await asyncio.sleep(0)
        now = self.clock.now()
        for uuid, (vm, end) in list(self.ends.items()):
            if end <= now:
                del self.ends[uuid]
                c = self.api.containers[uuid]
                if uuid in vm.procs and c["state"] == "Running" and not vm.destroyed:
                    self.api._set_state(c, "Complete")
                    self.completed[uuid] = self.completed.get(uuid, 0) + 1
                vm.finish(uuid)
        self.clock.advance(1)

    def done(self) -> bool:
        final = all(c["state"] in ("Complete", "Cancelled") for c in self.api.containers.values())
        return final and not self.iset.vms

    async def run(self, max_steps: int, hook=None) -> int:
        for i in range(max_steps):
            if hook is not None:
                hook(self, i)
            await self.step(i)
            if self.done():
                return i
        return max_steps

    async def close(self) -> None:
        await self.sched.stop()
        await self.pool.stop()
        await self.queue.stop()


def sample(sim: Sim, name: str, labels: dict[str, str] | None = None) -> float:
    v = sim.metrics.registry.get_sample_value(name, labels or {})
    return v or 0.0


def test_dispatch_to_misbehaving_stub_cloud():
    sim = Sim(seed=7)
    sim.add_containers(200)
    lost = []

    def hook(s: Sim, i: int) -> None:
        if i == 60:
            s.api.fail_next = [503]       # one API 503 halfway
        if i == 40 and not lost:
            # The cloud loses an instance that runs nothing.
            for vm in list(s.iset.vms.values()):
                if not vm.procs:
                    lost.append(vm.id)
                    del s.iset.vms[vm.id]
                    break

    async def go() -> int:
        try:
            return await sim.run(3000, hook)
        finally:
            await sim.close()

    steps = asyncio.run(go())
    assert steps < 3000, "did not converge"
    states = [c["state"] for c in sim.api.containers.values()]
    # Every container finished, none ran twice at once, none completed twice.
    assert set(states) <= {"Complete", "Cancelled"}
    assert sim.double_runs == 0
    assert all(n == 1 for n in sim.completed.values())
    # Containers are only cancelled by MaxDispatchAttempts or lost instances: almost all complete.
    assert states.count("Complete") >= 190
    assert not sim.iset.vms and not sim.queue.entries()[0]
    # The exact start command and what crunch-run gets on stdin.
    cmd = sim.start_commands[0]
    assert cmd.startswith("crunch-run --detach --stdin-config '--runtime-engine=stub' '--foo' "
                          "'--extra='\\''args'\\''' 'zzzzz-dz642-")
    env = sim.stdin_configs[0]["Env"]
    assert env["ARVADOS_API_HOST"] == "127.0.0.1:9" and env["ARVADOS_API_TOKEN"]
    m = "arvados_dispatchcloud_"
    assert sample(sim, m + "driver_operations", {"operation": "Create", "error": "0"}) > 0
    assert sample(sim, m + "driver_operations", {"operation": "Create", "error": "1"}) > 0
    assert sample(sim, m + "driver_operations", {"operation": "List", "error": "0"}) > 0
    assert sample(sim, m + "driver_operations", {"operation": "List", "error": "1"}) == 0
    assert sample(sim, m + "driver_operations", {"operation": "Destroy", "error": "0"}) > 0
    for outcome in ("success", "failure", "disappeared"):
        assert sample(sim, m + "boot_outcomes", {"outcome": outcome}) > 0, outcome
    assert sample(sim, m + "instances_disappeared", {"state": "shutdown"}) > 0
    assert sample(sim, m + "instances_disappeared", {"state": "unknown"}) == 0
    assert sample(sim, m + "last_503_time") > 0
    assert sample(sim, m + "instances_time_to_ssh_seconds_count") > 0
    assert sample(sim, m + "containers_time_from_queue_to_crunch_run_seconds_count") > 0
    # Every remote command (probes, deploy, start, kill) was given a timeout (reference 8.3).
    timeouts = [t for vm in sim.all_vms for t in vm.timeouts]
    assert len(timeouts) > 1000 and None not in timeouts
    # The cloud's capacity errors for type6 never produced a type6 instance.
    assert not [o for o in sim.iset.ops if o == ("Create", "type6")]


def test_management_view_converges_to_reference_statuses():
    """Reference 7.7 TestManagementAPI_Containers: 20 containers (priority 100-i), quota 4
    instances, InitialQuotaEstimate 4, capacity errors for type4 and larger."""
    sim = Sim(seed=3, quota=4, misbehave=False, capacity_types=("type4", "type6", "type8"),
              initial_quota=4, run_time=(10_000, 10_001))
    for i in range(20):
        sim.api.add(container_uuid(i + 1), priority=100 - i,
                    runtime_constraints={"vcpus": min(i + 1, 4), "ram": 1 * GiB})

    async def go() -> None:
        try:
            await sim.run(30)
        finally:
            await sim.close()

    asyncio.run(go())
    ents = sorted(sim.sched.last_sorted, key=lambda e: -e.ent.container["priority"])
    got = [(e.ent.container["state"], e.scheduling_status) for e in ents]
    want = [("Running", "")] * 3 + [
        ("Locked", "Waiting in queue at position 1.  Cluster is at capacity for all eligible "
                   "instance types (type4, type6) and cannot start a new instance right now."),
    ] + [("Queued", f"Waiting in queue at position {n}.  Cluster is at capacity and cannot "
                    "start any new instances right now.") for n in range(2, 18)]
    assert got == want


def test_restart_mid_run_loses_nothing_and_runs_nothing_twice():
    sim = Sim(seed=11)
    sim.add_containers(60)
    starts_before: list[int] = []

    def hook(s: Sim, i: int) -> None:
        if i == 25:
            starts_before.append(len(s.start_commands))
            s.restart()
            # The new process waits for the adopted (unknown) workers before unlocking
            # anything (fixStaleLocks); the scheduler does nothing before the first listing.
            asyncio.get_event_loop().create_task(
                s.sched.fix_stale_locks(s.pool.wait_loaded, 5.0))

    async def go() -> int:
        try:
            return await sim.run(3000, hook)
        finally:
            await sim.close()

    steps = asyncio.run(go())
    assert steps < 3000, "did not converge after the restart"
    assert starts_before and starts_before[0] > 0, "nothing was running at the restart"
    states = [c["state"] for c in sim.api.containers.values()]
    assert set(states) <= {"Complete", "Cancelled"}
    # Nothing was lost: the containers running at the restart were adopted, not cancelled.
    assert states.count("Complete") == 60
    assert sim.double_runs == 0
    assert all(n == 1 for n in sim.completed.values())
    assert not sim.iset.vms   # idle instances were still shut down by the new process
