#!/usr/bin/env python3
"""Slurm dispatch benchmark: ``crunchgate dispatch-slurm`` against the real Slurm dev cluster.

1. **Burst**: N queued containers (default 1,000) in the embedded controller, until squeue
   lists a job for every one of them. Jobs are held (``--hold`` in SbatchArgumentsList) so they
   stay pending. Ours is timed twice, each time with its own fresh containers: *cold*, from
   ``crunchgate dispatch-slurm`` start (Python start-up, imports and the first poll included:
   a restart with a backlog), and *warm*, a dispatcher already up when the burst is queued
   (it is held with SIGSTOP while the containers are created and continued when a poll is
   due, so neither the creation nor the PollInterval wait is counted). The anchor, in the same
   run, is a plain ``xargs -P4 sbatch --hold`` loop submitting the same N job scripts with the
   same arguments (as ``#SBATCH`` lines) -- the cost of sbatch alone. Goal: ours <= 1.3x.
   Several rounds (``--rounds``, default 4) rotate which side runs first, because slurmctld
   slows down with the cancelled jobs it keeps for MinJobAge and a later side meets the
   earlier ones'. The median ratio is the result.
2. **Steady state**: M queued containers (default 10,000) submitted to the ``parked`` partition
   (State=DOWN: pending with a real priority, never started). Once all are submitted and
   reniced, count Slurm commands for a while. Goal: one squeue per poll, and scontrol only for
   jobs whose nice must change (none, in a steady queue). Also: dispatcher CPU and RSS.

Everything started here is stopped here (by PID), every job is cancelled afterwards. Loopback
only. Needs root and slurm-wlm (as the dev cluster does).

Usage: python bench/slurm_dispatch.py [--containers 1000] [--rounds 4] [--steady 10000]
       [--steady-seconds 60] [--poll 2s]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dispatcher.arvados.client import ArvadosClient  # noqa: E402
from dispatcher.config import load_config  # noqa: E402
from dispatcher.core.jobscript import container_job_script  # noqa: E402
from dispatcher.slurm.sbatch import sbatch_args  # noqa: E402
from tests.helpers.controller import free_port, start_controller  # noqa: E402
from tests.helpers.slurm import SCRIPT, SlurmDispatcherProcess  # noqa: E402

SLURM_DIR = Path(os.environ.get("CRUNCHGATE_SLURM_DIR") or "/tmp/crunchgate-slurm")
CONF = SLURM_DIR / "etc" / "slurm.conf"
ENV = {**os.environ, "SLURM_CONF": str(CONF), "CRUNCHGATE_SLURM_DIR": str(SLURM_DIR)}
TICKS = os.sysconf("SC_CLK_TCK")


def sh(*argv: str, check: bool = True, timeout: float = 600) -> str:
    res = subprocess.run(list(argv), env=ENV, capture_output=True, text=True, timeout=timeout,
                         check=False)
    if check and res.returncode != 0:
        raise SystemExit(f"{argv[0]} failed: {res.stderr.strip()[-500:]}")
    return res.stdout


def job_names() -> list[str]:
    return sh("squeue", "--all", "--noheader", "--format=%j").split()


def cancel_all() -> None:
    sh("scancel", "--user=root", check=False)
    deadline = time.monotonic() + 120
    while sh("squeue", "--all", "--noheader", "--format=%i").strip():
        if time.monotonic() > deadline:
            raise SystemExit("jobs did not leave the queue after scancel")
        time.sleep(0.5)


async def create_requests(ctl: Any, n: int, tag: str, partitions: list[str]) -> list[str]:
    """n distinct container requests (concurrently, 16 at a time); their container UUIDs."""
    sem = asyncio.Semaphore(16)
    uuids: list[str] = [""] * n
    async with ArvadosClient(ctl.host, ctl.root_token, insecure=True) as c:
        async def one(i: int) -> None:
            async with sem:
                cr = await c.create("container_requests", {
                    "command": ["echo", f"{tag}-{i}"], "container_image": "arvados/jobs",
                    "output_path": "/out", "cwd": "/tmp", "use_existing": False,
                    "runtime_constraints": {"vcpus": 1, "ram": 64 << 20},
                    "scheduling_parameters": {"partitions": partitions},
                    "state": "Committed", "priority": 1,
                })
                uuids[i] = cr["container_uuid"]

        await asyncio.gather(*(one(i) for i in range(n)))
    return uuids


def wait_all_in_squeue(names: set[str], timeout_s: float) -> tuple[float, float]:
    """Poll squeue (cheaply: names only) until every name is listed; returns the times the
    first and the last of them were seen."""
    deadline = time.monotonic() + timeout_s
    first = 0.0
    while True:
        listed = names & set(job_names())
        if listed and not first:
            first = time.monotonic()
        if len(listed) == len(names):
            return first, time.monotonic()
        if time.monotonic() > deadline:
            raise SystemExit(f"only {len(listed)}/{len(names)} jobs in squeue after {timeout_s}s")
        time.sleep(0.2)


def metrics(port: int, token: str) -> dict[str, float]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r'^crunchgate_slurm_commands_total\{command="(\w+)"\} ([0-9.e+]+)$', line)
        if m:
            out[m.group(1)] = float(m.group(2))
        m = re.match(r"^crunchgate_dispatch_poll_duration_seconds_count ([0-9.e+]+)$", line)
        if m:
            out["polls"] = float(m.group(1))
        m = re.match(r"^crunchgate_dispatch_poll_duration_seconds_sum ([0-9.e+]+)$", line)
        if m:
            out["poll_s"] = float(m.group(1))
        m = re.match(r"^crunchgate_slurm_renice_pending_jobs ([0-9.e+]+)$", line)
        if m:
            out["renice_pending"] = float(m.group(1))
    return out


def metrics_or_none(port: int, token: str) -> dict[str, float]:
    """:func:`metrics`, or nothing while the service is not listening yet."""
    try:
        return metrics(port, token)
    except OSError:
        return {}


def cpu_rss(pid: int) -> tuple[float, float]:
    """(CPU seconds used, RSS MiB) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / TICKS
    rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)
    return cpu, rss


class Site:
    def __init__(self, work: Path, poll: str, hold: bool, partition: str | None,
                 submit_concurrency: int = 4) -> None:
        self.port = free_port()
        extra_args = ["--hold"] if hold else []
        extra_args += [f"--partition={partition}"] if partition else []
        cfg = {
            "Services": {"DispatchSLURM": {"InternalURLs": {f"http://127.0.0.1:{self.port}": {}}}},
            "Containers": {
                "RuntimeEngine": "local",
                "CloudVMs": {"PollInterval": poll},
                "SLURM": {"SbatchArgumentsList": [
                    "--job-name=%U", "--mem=%M", "--cpus-per-task=%C", "--tmp=%T",
                    "--partition=%P", *extra_args, "--output=/dev/null",
                ]},
            },
            "Crunchgate": {"SubmitConcurrency": submit_concurrency, "CommandTimeout": "30s"},
            "SystemLogs": {"LogLevel": "warning"},
            "API": {"MaxItemsPerResponse": 1000},
        }
        self.ctl = start_controller(work / "controller", extra_config=cfg)
        self.disp = SlurmDispatcherProcess(self.ctl.config_path, work / "dispatch.log",
                                           {**ENV, "CRUNCHGATE_LOG_LEVEL": "warning"})

    def close(self) -> None:
        self.disp.stop()
        self.ctl.stop()


def burst(work: Path, n: int, poll: str, conc: int, first: int
          ) -> dict[str, tuple[float, float]]:
    """One round: (first, all) jobs in squeue, in seconds, for each side: ``plain`` (the xargs
    loop, timed from its start), ``cold`` (ours, timed from ``crunchgate dispatch-slurm``
    start: Python start-up, imports and the first poll included) and ``warm`` (ours, already
    running: timed from the moment the burst is queued and a poll is due).

    Every job a side submitted is cancelled before the next side starts, but slurmctld keeps
    cancelled jobs for MinJobAge and gets slower with them: the sides that run later meet
    more of them. Rounds rotate which side goes first (``first``).
    """
    site = Site(work, poll, hold=True, partition=None, submit_concurrency=conc)
    try:
        uuids = asyncio.run(create_requests(site.ctl, n, "burst", []))
        cfg = load_config(site.ctl.config_path)
        # The anchor: the same n scripts and arguments, plain sbatch through xargs -P4.
        scripts = work / "plain"
        scripts.mkdir()
        for u in uuids:
            ctr = {"uuid": u, "runtime_constraints": {"vcpus": 1, "ram": 64 << 20},
                   "scheduling_parameters": {}, "mounts": {}}
            args = sbatch_args(cfg, ctr)
            body = container_job_script(cfg, u).split("\n", 1)
            header = "".join(f"#SBATCH {a}\n" for a in args)
            (scripts / f"{u}.sh").write_text(f"{body[0]}\n{header}{body[1]}")
        files = "\n".join(str(p) for p in sorted(scripts.glob("*.sh"))) + "\n"
        (work / "plain.list").write_text(files)

        # Every side is timed the same way: from its start until the same squeue watch loop
        # (every 0.2 s, running all along) sees every job.
        def plain() -> tuple[float, float]:
            t0 = time.monotonic()
            with open(work / "plain.list") as listing:
                xargs = subprocess.Popen(
                    ["xargs", f"-P{conc}", "-n1", "sbatch", "--hold", "--quiet"],
                    stdin=listing, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                first, last = wait_all_in_squeue(set(uuids), 600)
                _, err = xargs.communicate(timeout=600)
            if xargs.returncode != 0:
                raise SystemExit(f"xargs sbatch failed: {err.decode()[-500:]}")
            cancel_all()
            return first - t0, last - t0

        def cold() -> tuple[float, float]:
            assert site.ctl.pid is not None
            ctl_cpu0, _ = cpu_rss(site.ctl.pid)
            t0 = time.monotonic()
            site.disp.start()
            first, last = wait_all_in_squeue(set(uuids), 600)
            assert site.disp.proc is not None
            disp_cpu, _ = cpu_rss(site.disp.proc.pid)
            ctl_cpu = cpu_rss(site.ctl.pid)[0] - ctl_cpu0
            site.disp.stop()
            cancel_all()
            print(f"    CPU while ours (cold) ran: dispatcher {disp_cpu:.2f}s (incl. startup), "
                  f"controller {ctl_cpu:.2f}s", flush=True)
            return first - t0, last - t0

        def warm() -> tuple[float, float]:
            # A dispatcher that is up and polling an empty queue when the burst arrives. It is
            # stopped (SIGSTOP, our own child) while the n containers are created -- which
            # takes seconds -- and continued once a poll is due: t0 is "n containers queued,
            # the dispatcher's next poll starts now", so neither the creation nor the
            # PollInterval wait (a setting, 10 s by default) is counted.
            w = Site(work / "warm", poll, hold=True, partition=None, submit_concurrency=conc)
            try:
                w.disp.start()
                assert w.disp.proc is not None and w.ctl.pid is not None
                deadline = time.monotonic() + 60
                while metrics_or_none(w.port, w.ctl.management_token).get("polls", 0) < 1:
                    if time.monotonic() > deadline:
                        raise SystemExit("the warm dispatcher did not poll within 60 s")
                    time.sleep(0.1)
                pid = w.disp.proc.pid
                os.kill(pid, signal.SIGSTOP)
                try:
                    stopped = time.monotonic()
                    warm_uuids = asyncio.run(create_requests(w.ctl, n, "warm", []))
                    time.sleep(max(0.0, stopped + float(poll.rstrip("s")) - time.monotonic()))
                    disp_cpu0, _ = cpu_rss(pid)
                    ctl_cpu0, _ = cpu_rss(w.ctl.pid)
                    t0 = time.monotonic()
                finally:
                    os.kill(pid, signal.SIGCONT)
                first, last = wait_all_in_squeue(set(warm_uuids), 600)
                disp_cpu = cpu_rss(pid)[0] - disp_cpu0
                ctl_cpu = cpu_rss(w.ctl.pid)[0] - ctl_cpu0
                print(f"    CPU while ours (warm) ran: dispatcher {disp_cpu:.2f}s, "
                      f"controller {ctl_cpu:.2f}s", flush=True)
            finally:
                w.close()
                cancel_all()
            return first - t0, last - t0

        sides = {"plain": plain, "cold": cold, "warm": warm}
        names = list(sides)
        order = names[first % 3:] + names[:first % 3]
        return {name: sides[name]() for name in order}
    finally:
        site.close()
        cancel_all()


def steady(work: Path, m: int, seconds: float, poll: str) -> dict[str, Any]:
    site = Site(work / "steady", poll, hold=False, partition="parked")
    try:
        t = time.monotonic()
        uuids = asyncio.run(create_requests(site.ctl, m, "steady", []))
        created_s = time.monotonic() - t
        t0 = time.monotonic()
        site.disp.start()
        wait_all_in_squeue(set(uuids), 1800)
        submit_s = time.monotonic() - t0
        assert site.disp.proc is not None
        pid = site.disp.proc.pid
        # Wait until renicing has settled: the last renice pass, planned on a squeue taken
        # after every job was listed, found nothing to change, and no scontrol ran between two
        # looks a few polls apart (the counter counts commands that ran, not queued ones).
        prev = metrics(site.port, site.ctl.management_token).get("scontrol", 0)
        settle_deadline = time.monotonic() + 900
        while True:
            time.sleep(max(5.0, 3 * float(poll.rstrip("s"))))
            now = metrics(site.port, site.ctl.management_token)
            cur = now.get("scontrol", 0)
            if (cur == prev and now.get("renice_pending", 1) == 0) or \
                    time.monotonic() > settle_deadline:
                break
            prev = cur
        settle_s = time.monotonic() - t0 - submit_s
        m0 = metrics(site.port, site.ctl.management_token)
        c0, _ = cpu_rss(pid)
        t0 = time.monotonic()
        time.sleep(seconds)
        m1 = metrics(site.port, site.ctl.management_token)
        c1, rss = cpu_rss(pid)
        dt = time.monotonic() - t0
        per_min = {k: (m1.get(k, 0) - m0.get(k, 0)) * 60 / dt
                   for k in ("squeue", "sbatch", "scontrol", "scancel", "sinfo", "polls")}
        polls = m1.get("polls", 0) - m0.get("polls", 0)
        poll_avg = (m1.get("poll_s", 0) - m0.get("poll_s", 0)) / polls if polls else 0.0
        nices = sh("squeue", "--all", "--noheader", "--format=%y").split()
        return {"created_s": created_s, "submit_s": submit_s, "per_min": per_min,
                "cpu_pct": 100 * (c1 - c0) / dt, "rss_mib": rss, "initial_scontrol": prev,
                "settle_s": settle_s, "poll_avg_s": poll_avg,
                "renice_pending": m1.get("renice_pending", -1),
                "distinct_nice": len(set(nices)), "nice10000": nices.count("10000"),
                "jobs": len(nices)}
    finally:
        site.close()
        cancel_all()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--containers", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=4,
                    help="burst rounds; they rotate which side (plain, cold, warm) goes first")
    ap.add_argument("--steady", type=int, default=10000)
    ap.add_argument("--steady-seconds", type=float, default=60)
    ap.add_argument("--poll", default="2s", help="Containers.CloudVMs.PollInterval")
    ap.add_argument("--submit-concurrency", type=int, default=4,
                    help="Crunchgate.SubmitConcurrency, and xargs -P of the anchor")
    args = ap.parse_args()
    if os.geteuid() != 0 or shutil.which("slurmctld") is None:
        print("needs root and slurm-wlm (contrib/slurm/dev-cluster.sh)", file=sys.stderr)
        return 2
    started = subprocess.run([str(SCRIPT), "status"], env=ENV, capture_output=True,
                             check=False).returncode != 0
    if started:
        sh(str(SCRIPT), "start")
    work = Path(tempfile.mkdtemp(prefix="crunchgate-bench-slurm-"))
    try:
        cancel_all()
        if args.containers > 0:
            ratios: dict[str, list[float]] = {"cold": [], "warm": []}
            for r in range(args.rounds):
                res = burst(work / f"burst{r}", args.containers, args.poll,
                            args.submit_concurrency, first=r)
                plain = res["plain"]
                for side in ratios:
                    ratios[side].append(res[side][1] / plain[1])
                print(f"[1] burst of {args.containers} held jobs, round {r + 1}/{args.rounds} "
                      f"(order {', '.join(res)}): plain xargs -P{args.submit_concurrency} sbatch "
                      f"{plain[1]:.2f}s; crunchgate dispatch-slurm warm {res['warm'][1]:.2f}s "
                      f"(ratio {ratios['warm'][-1]:.2f}), cold {res['cold'][1]:.2f}s "
                      f"(ratio {ratios['cold'][-1]:.2f}); first job in squeue after "
                      f"{plain[0]:.2f}s / {res['warm'][0]:.2f}s / {res['cold'][0]:.2f}s",
                      flush=True)
            for side, what in (("warm", "dispatcher running when the burst is queued"),
                               ("cold", "from dispatcher start, incl. Python start-up")):
                print(f"[1] burst ratio {side} ({what}) over {len(ratios[side])} rounds: median "
                      f"{statistics.median(ratios[side]):.2f} (goal <= 1.3), all "
                      + " ".join(f"{x:.2f}" for x in ratios[side]), flush=True)
        if args.steady > 0:
            st = steady(work, args.steady, args.steady_seconds, args.poll)
            pm = st["per_min"]
            polls = pm["polls"] or 1
            print(f"[2] steady state, {st['jobs']} pending jobs ({args.steady} containers, "
                  f"PollInterval {args.poll}; created in {st['created_s']:.0f}s, all in squeue "
                  f"{st['submit_s']:.0f}s after start, ordered {st['settle_s']:.0f}s later with "
                  f"{st['initial_scontrol']:.0f} renice calls; {st['distinct_nice']} distinct nice "
                  f"values, {st['nice10000']} jobs still at nice 10000, last renice pass found "
                  f"{st['renice_pending']:.0f} to change):")
            print(f"    per minute: {pm['polls']:.1f} polls, {pm['squeue']:.1f} squeue "
                  f"({pm['squeue'] / polls:.2f} per poll), {pm['scontrol']:.1f} scontrol, "
                  f"{pm['sbatch']:.1f} sbatch, {pm['scancel']:.1f} scancel, "
                  f"{pm['sinfo']:.1f} sinfo")
            print(f"    poll duration {st['poll_avg_s']:.2f}s on average; dispatcher CPU "
                  f"{st['cpu_pct']:.1f}% of one core, RSS {st['rss_mib']:.0f} MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if started:
            sh(str(SCRIPT), "stop", check=False)
    return 0


if __name__ == "__main__":
    # SIGTERM (a timeout, kill) unwinds like Ctrl-C: the finally blocks stop what was started.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main())
