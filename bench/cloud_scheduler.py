"""Benchmark: one cloud scheduling pass (run_queue + sync) over a large queue and pool.

A stub driver with 16 instance types (typeN: N VCPUs, 4N GiB RAM, price 0.05 N); M instances
(half idle, half running one container each) that the real Pool has adopted and probed; N queued
containers (half Locked, half Queued; 1-8 VCPUs, 1-16 GiB) with eligible types chosen by the
real ``choose_instance_type``. Prints pass time (wall and CPU) for each (N, M), how it grows,
and the process RSS.

    python bench/cloud_scheduler.py            # the full table (about a minute)
    python bench/cloud_scheduler.py --quick    # smaller sizes
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import resource
import signal
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dispatcher.cloud.clock import FakeClock  # noqa: E402
from dispatcher.cloud.drivers.stub import StubInstanceSet, StubProc, StubVM  # noqa: E402
from dispatcher.cloud.pool import Pool  # noqa: E402
from dispatcher.cloud.queue import QueueEnt  # noqa: E402
from dispatcher.cloud.scheduler import Scheduler  # noqa: E402
from dispatcher.config import ClusterConfig, InstanceType  # noqa: E402
from dispatcher.core.sizing import choose_instance_type, instance_resources_needed  # noqa: E402

GiB = 1 << 30


class BenchQueue:
    def __init__(self, ents: dict[str, QueueEnt]) -> None:
        self.ents = ents

    def entries(self):
        return dict(self.ents), 0.0

    async def lock(self, uuid: str) -> None:
        self.ents[uuid].container["state"] = "Locked"

    async def unlock(self, uuid: str) -> None:
        self.ents[uuid].container["state"] = "Queued"

    async def cancel(self, uuid: str) -> None:
        self.ents[uuid].container["state"] = "Cancelled"

    def forget(self, uuid: str) -> None:
        pass

    def subscribe(self):
        return asyncio.Event()

    def unsubscribe(self, ev) -> None:
        pass


def config() -> ClusterConfig:
    cfg = ClusterConfig()
    cfg.cluster_id = "zzzzz"
    cfg.system_root_token = "v2/zzzzz-gj3su-000000000000000/benchsecret0123456789"
    cfg.instance_types = {
        f"type{n}": InstanceType(name=f"type{n}", provider_type=f"p{n}", vcpus=n, ram=4 * n * GiB,
                                 included_scratch=100 * GiB, price=0.05 * n)
        for n in range(1, 17)
    }
    vms = cfg.containers.cloud_vms
    vms.max_instances = 0
    vms.max_concurrent_instance_create_ops = 1
    return cfg


async def setup(n_ctr: int, n_inst: int, seed: int = 1):
    rng = random.Random(seed)
    cfg = config()
    clock = FakeClock()
    iset = StubInstanceSet(clock)
    pool = Pool(cfg, iset, iset.executor, set_id="bench", clock=clock)
    types = list(cfg.instance_types.values())
    ents: dict[str, QueueEnt] = {}

    def add(i: int, state: str) -> QueueEnt:
        ctr = {"uuid": f"zzzzz-dz642-{i:015d}", "state": state, "priority": rng.randint(1, 1000),
               "runtime_constraints": {"vcpus": rng.randint(1, 8), "ram": rng.randint(1, 16) * GiB},
               "scheduling_parameters": {}, "container_image": "", "created_at": ""}
        ent = QueueEnt.make(ctr, choose_instance_type(cfg, ctr),
                            instance_resources_needed(cfg, ctr), float(i))
        ents[ctr["uuid"]] = ent
        return ent

    for j in range(n_inst):
        it = types[rng.randrange(len(types))]
        vm = StubVM(id=f"i{j:06d}", instance_type=it, created=clock.now(),
                    tags={"ArvadosInstanceSetID": "bench", "ArvadosInstanceType": it.name,
                          "ArvadosIdleBehavior": "run"})
        if j % 2:
            ent = add(10_000_000 + j, "Running")
            vm.procs[ent.container["uuid"]] = StubProc(ent.container["uuid"], {})
        iset.vms[vm.id] = vm
    await pool.sync()
    await pool.probe_all(wait=True)
    for i in range(n_ctr):
        add(i, "Locked" if i % 2 else "Queued")
    return cfg, clock, pool, BenchQueue(ents)


async def one_pass(n_ctr: int, n_inst: int) -> tuple[float, float]:
    """(wall, CPU) seconds of one pass. CPU time is what the pass costs; wall time is what it
    takes on this machine now (other processes competing for the cores stretch it)."""
    cfg, clock, pool, queue = await setup(n_ctr, n_inst)
    sched = Scheduler(cfg, queue, pool, clock=clock)
    c0, t0 = time.process_time(), time.perf_counter()
    sched.run_queue()
    sched.sync()
    took, cpu = time.perf_counter() - t0, time.process_time() - c0
    await sched.stop()
    await pool.stop()
    return took, cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes, one repetition")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    sizes = [(1_000, 100), (1_000, 1_000), (10_000, 100), (10_000, 1_000)]
    if args.quick:
        sizes = [(1_000, 100), (2_000, 200)]
        args.reps = 1
    rows = []
    for n, m in sizes:
        runs = [asyncio.run(one_pass(n, m)) for _ in range(args.reps)]
        rows.append((n, m, statistics.median(w for w, _ in runs),
                     statistics.median(c for _, c in runs)))
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    base, base_cpu = rows[0][2], rows[0][3]
    print(f"{'containers':>10} {'instances':>9} {'pass (ms)':>10} {'vs first':>9} "
          f"{'CPU (ms)':>9} {'vs first':>9} {'us/container':>12}")
    for n, m, t, c in rows:
        print(f"{n:>10} {m:>9} {t * 1000:>10.1f} {t / base:>8.1f}x {c * 1000:>9.1f} "
              f"{c / base_cpu:>8.1f}x {t / n * 1e6:>12.1f}")
    print(f"max RSS of this process: {rss_mib:.0f} MiB")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average (1 min) at the end: {load:.1f} on {os.cpu_count()} CPUs")
    worst = rows[-1]
    goal = "meets" if worst[2] < 1.0 else "MISSES"
    print(f"goal: {worst[0]} x {worst[1]} under 1 s: {goal} (wall {worst[2]:.3f} s, "
          f"CPU {worst[3]:.3f} s)")
    return 0


if __name__ == "__main__":
    # SIGTERM (a timeout, kill) unwinds like Ctrl-C: the finally blocks stop what was started.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main())
