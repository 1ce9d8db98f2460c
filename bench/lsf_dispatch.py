#!/usr/bin/env python3
"""LSF dispatch benchmark: crunchgate dispatch-lsf against the LSF simulator.

1. **Burst**: N queued containers (default 1,000) in the embedded controller; time from
   ``crunchgate dispatch-lsf`` start until LSF holds a job for every one of them. The anchor, in
   the same run and on an identical fresh simulator, is a plain sequential ``bsub`` loop
   submitting the same N jobs (same arguments, same script size) -- the cost of the LSF
   commands alone, with no API, no locking, no sizing. Printed: both times and the ratio.
2. **Steady state**: M containers (default 10,000) locked by the dispatcher whose LSF jobs are
   all pending (a simulator with zero hosts), the real dispatch loop + LSF backend polling for
   a while. Printed: LSF commands per second and per poll, bjobs wall time with M records, API
   calls per poll. The reference (arvados-dispatch-lsf) also runs one bjobs per PollInterval;
   the number to watch is that nothing grows with M except that one call's size.

The simulator's jobs never run (hosts have no free slots), so only dispatching is measured.
Bounded: loopback only, everything started here is stopped here, by PID.

Usage: python bench/lsf_dispatch.py [--containers 1000] [--steady 10000] [--steady-seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dispatcher.config import ClusterConfig  # noqa: E402
from dispatcher.core.jobscript import container_job_script  # noqa: E402
from dispatcher.lsf.bsub import bsub_arguments  # noqa: E402
from tests.helpers.controller import free_port, start_controller  # noqa: E402
from tests.helpers.lsf import LsfSim  # noqa: E402
from tests.lsfsim import sim as simmod  # noqa: E402

NO_HOSTS: dict[str, Any] = {"hosts": []}  # every job stays PEND: only dispatching is measured


def counts(s: LsfSim, since: float = 0.0) -> dict[str, int]:
    out = {"bsub": 0, "bjobs": 0, "bkill": 0}
    for c in s.calls():
        if c["t"] >= since:
            out[c["command"]] += 1
    return out


# --- 1. burst ------------------------------------------------------------------------------------


def anchor_bsub_loop(work: Path, n: int) -> float:
    """A plain sequential bsub loop: the same N submissions, one after the other."""
    s = LsfSim(work / "anchor-sim", NO_HOSTS)
    cfg = ClusterConfig(cluster_id="zzzzz", system_root_token="bench-root-token-0123456789")
    cfg.containers.lsf.bsub_sudo_user = ""
    env = s.env()
    t0 = time.monotonic()
    for i in range(n):
        uuid = f"zzzzz-dz642-{i:015d}"
        ctr = {"uuid": uuid, "runtime_constraints": {"vcpus": 1, "ram": 64 << 20},
               "mounts": {}, "container_image": "", "scheduling_parameters": {}}
        subprocess.run(["bsub", *bsub_arguments(cfg, ctr)], input=container_job_script(
            cfg, uuid, template="lsf", runtime_engine_first=True), text=True, env=env,
            check=True, capture_output=True)
    elapsed = time.monotonic() - t0
    assert len(s.jobs()) == n
    return elapsed


def ours_burst(work: Path, n: int) -> tuple[float, dict[str, int], int]:
    """N containers through controller -> crunchgate dispatch-lsf -> simulator."""
    s = LsfSim(work / "ours-sim", NO_HOSTS)
    port = free_port()
    ctl = start_controller(work / "controller", extra_config={
        "Services": {"DispatchLSF": {"InternalURLs": {f"http://127.0.0.1:{port}": {}}}},
        "Containers": {"RuntimeEngine": "local", "CloudVMs": {"PollInterval": "1s"},
                       "LSF": {"BsubSudoUser": ""}},
        "SystemLogs": {"LogLevel": "info"},
    })
    proc = None
    try:
        api = ctl.api()
        t_setup = time.monotonic()
        uuids = []
        for i in range(n):
            cr = api.container_requests().create(body={"container_request": {
                "name": f"bench-{i}", "command": ["true", str(i)], "container_image": "x",
                "cwd": "/tmp", "output_path": "/out",
                "mounts": {"/out": {"kind": "tmp", "capacity": 1 << 20}},
                "runtime_constraints": {"vcpus": 1, "ram": 64 << 20},
                "state": "Committed", "priority": 1}}).execute()
            uuids.append(cr["container_uuid"])
        print(f"  (setup: {n} container requests in {time.monotonic() - t_setup:.1f}s)")
        exe = shutil.which("crunchgate")
        argv = ([exe] if exe else [sys.executable, "-m", "dispatcher.cli"]) + [
            "dispatch-lsf", "--config", str(ctl.config_path)]
        t0 = time.monotonic()
        with open(work / "dispatch-lsf.log", "ab") as logf:
            proc = subprocess.Popen(argv, env=s.env(), stdout=subprocess.DEVNULL, stderr=logf,
                                    start_new_session=True)
        want = set(uuids)
        deadline = t0 + 1800
        while True:
            names = {j["name"] for j in s.jobs()}
            if want <= names:
                break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"only {len(want & names)}/{n} submitted; see {work}")
            time.sleep(0.2)
        elapsed = time.monotonic() - t0
        dup = len(s.jobs()) - len(want)
        return elapsed, counts(s), dup
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        ctl.stop()


# --- 2. steady state -----------------------------------------------------------------------------


def prepopulate(s: LsfSim, uuids: list[str]) -> None:
    """Write M pending jobs straight into the simulator's state (as if submitted earlier)."""
    now = time.time()
    state = {"next_id": 101 + len(uuids), "jobs": {}}
    for i, uuid in enumerate(uuids):
        jid = str(101 + i)
        state["jobs"][jid] = {
            "id": jid, "name": uuid, "queue": "normal", "user": "crunch", "from_host": "bench",
            "stat": "PEND", "pend_reason": "There are no suitable hosts for the job;",
            "submit_time": now, "slots": 1, "mem_mb": 614.0, "tmp_mb": 2049.0, "gpus": 0,
            "select": [], "data_limit_mb": None, "out": "", "err": "", "cwd": "/tmp",
            "argv": [],
        }
    (s.state_dir / simmod.STATE_FILE).write_text(json.dumps(state))


async def steady(work: Path, m: int, seconds: float, poll_s: float) -> dict[str, float]:
    from dispatcher.core.loop import Dispatcher
    from dispatcher.lsf.backend import LsfBackend
    from dispatcher.lsf.commands import LsfCLI
    from tests.helpers.core import FakeArvados

    s = LsfSim(work / "steady-sim", NO_HOSTS)
    api = FakeArvados()
    uuids = [api.add_container("Locked", priority=1) for _ in range(m)]
    prepopulate(s, uuids)
    cfg = ClusterConfig(cluster_id="zzzzz", system_root_token="bench-root-token-0123456789")
    cfg.services.controller.external_url = "https://127.0.0.1:1"
    cfg.containers.cloud_vms.poll_interval_s = poll_s
    cfg.containers.lsf.bsub_sudo_user = ""
    backend = LsfBackend(cfg, cli=LsfCLI(timeout_s=60, env=s.env()))
    bjobs_wall: list[float] = []
    list_jobs = backend.list_jobs

    async def timed_list_jobs() -> Any:
        t = time.monotonic()
        try:
            return await list_jobs()
        finally:
            bjobs_wall.append(time.monotonic() - t)

    backend.list_jobs = timed_list_jobs  # type: ignore[method-assign]
    disp = Dispatcher(cfg, api, backend)
    # Warm-up: the first polls adopt every job and write scheduling_status once per container.
    t = time.monotonic()
    for _ in range(2):
        await disp.poll_once()
        await disp.wait_idle()
    warm = time.monotonic() - t
    api.calls.clear()
    bjobs_wall.clear()
    t0, wall0 = time.monotonic(), time.time()
    cpu0 = time.process_time()
    polls = 0
    poll_wall = []
    while time.monotonic() - t0 < seconds:
        tp = time.monotonic()
        await disp.poll_once()
        await disp.wait_idle()
        poll_wall.append(time.monotonic() - tp)
        polls += 1
        await asyncio.sleep(max(0.0, poll_s - (time.monotonic() - tp)))
    elapsed = time.monotonic() - t0
    cpu = time.process_time() - cpu0
    c = counts(s, since=wall0)
    assert all(api.containers[u]["state"] == "Locked" for u in uuids)
    return {
        "containers": m, "seconds": elapsed, "polls": polls, "warmup_s": warm,
        "bjobs_per_s": c["bjobs"] / elapsed, "bsub_per_s": c["bsub"] / elapsed,
        "bkill_per_s": c["bkill"] / elapsed,
        "lsf_commands_per_poll": sum(c.values()) / max(polls, 1),
        "api_calls_per_poll": len(api.calls) / max(polls, 1),
        "poll_wall_s_avg": sum(poll_wall) / max(len(poll_wall), 1),
        "bjobs_wall_s_avg": sum(bjobs_wall) / max(len(bjobs_wall), 1),
        "dispatcher_cpu_s_per_poll": cpu / max(polls, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--containers", type=int, default=1000)
    ap.add_argument("--steady", type=int, default=10000)
    ap.add_argument("--steady-seconds", type=float, default=20.0)
    ap.add_argument("--poll", type=float, default=1.0, help="PollInterval for the steady state")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, state)")
    args = ap.parse_args()
    os.environ.pop("ARVADOS_SERVICE_INTERNAL_URL", None)
    ctx = (contextlib.nullcontext(tempfile.mkdtemp(prefix="lsf-bench-")) if args.keep
           else tempfile.TemporaryDirectory(prefix="lsf-bench-"))
    with ctx as tmp:
        work = Path(tmp)
        if args.keep:
            print(f"work directory: {work}")
        n = args.containers
        print(f"1. burst: {n} containers")
        anchor = anchor_bsub_loop(work, n)
        print(f"  anchor  plain sequential bsub loop:          {anchor:7.1f}s "
              f"({n / anchor:6.1f} submits/s)")
        ours, c, dup = ours_burst(work, n)
        print(f"  ours    controller -> dispatch-lsf -> bsub:  {ours:7.1f}s "
              f"({n / ours:6.1f} submits/s; {c['bsub']} bsub, {c['bjobs']} bjobs, "
              f"{c['bkill']} bkill; duplicates {dup})")
        print(f"  ratio   ours/anchor = {ours / anchor:.2f} (lower is better)")
        print(f"2. steady state: {args.steady} pending jobs, PollInterval {args.poll}s, "
              f"{args.steady_seconds:.0f}s")
        r = asyncio.run(steady(work, args.steady, args.steady_seconds, args.poll))
        print(f"  warm-up (adopt {args.steady} jobs, write scheduling_status): "
              f"{r['warmup_s']:.1f}s")
        print(f"  polls {r['polls']}; LSF commands/s: bjobs {r['bjobs_per_s']:.2f}, "
              f"bsub {r['bsub_per_s']:.2f}, bkill {r['bkill_per_s']:.2f}; "
              f"LSF commands/poll {r['lsf_commands_per_poll']:.2f}")
        print(f"  bjobs with {args.steady} records (command + parse): "
              f"{r['bjobs_wall_s_avg'] * 1000:.0f} ms; whole poll "
              f"{r['poll_wall_s_avg'] * 1000:.0f} ms incl. the in-process fake controller; "
              f"process CPU/poll {r['dispatcher_cpu_s_per_poll'] * 1000:.0f} ms; "
              f"API calls/poll {r['api_calls_per_poll']:.1f}")
        print(f"  reference: 1 bjobs per poll, 0 bsub/bkill in steady state; "
              f"ratio ours/reference (LSF commands per poll) = {r['lsf_commands_per_poll']:.2f}")
    return 0


if __name__ == "__main__":
    # SIGTERM (a timeout, kill) unwinds like Ctrl-C: the finally blocks stop what was started.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main())
