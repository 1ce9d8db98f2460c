#!/usr/bin/env python3
"""Slurm dispatch benchmark: ``crunchgate dispatch-slurm`` against the real Slurm dev cluster.

1. **Burst**: N queued containers (default 1,000) in the embedded controller; time from
   ``crunchgate dispatch-slurm`` start until squeue lists a job for every one of them. Jobs are
   held (``--hold`` in SbatchArgumentsList) so they stay pending. The anchor, in the same run,
   is a plain ``xargs -P4 sbatch --hold`` loop submitting the same N job scripts with the same
   arguments (as ``#SBATCH`` lines) -- the cost of sbatch alone. Goal: ours <= 1.3x. Several
   rounds (``--rounds``, default 4) with fresh containers; they alternate which side runs
   first, because slurmctld slows down with the cancelled jobs it keeps for MinJobAge and the
   second side always meets the first one's. The median ratio is the result.
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


def burst(work: Path, n: int, poll: str, conc: int, ours_first: bool
          ) -> tuple[tuple[float, float], tuple[float, float]]:
    """One round: (first, all) jobs in squeue, seconds after the start: (plain loop, ours).

    Every job a side submitted is cancelled before the other side starts, but slurmctld keeps
    cancelled jobs for MinJobAge and gets slower with them: the side that runs second meets
    n more of them. Rounds alternate which side goes first.
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

        # Both sides are timed the same way: from the start of the submitting process until
        # the same squeue watch loop (every 0.2 s, running all along) sees every job.
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

        def ours() -> tuple[float, float]:
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
            print(f"    CPU while ours ran: dispatcher {disp_cpu:.2f}s (incl. startup), "
                  f"controller {ctl_cpu:.2f}s", flush=True)
            return first - t0, last - t0

        if ours_first:
            mine = ours()
            return plain(), mine
        anchor = plain()
        return anchor, ours()
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
                    help="burst rounds; odd rounds start with ours, even ones with the plain loop")
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
            ratios = []
            for r in range(args.rounds):
                plain, ours = burst(work / f"burst{r}", args.containers, args.poll,
                                    args.submit_concurrency, ours_first=r % 2 == 1)
                ratios.append(ours[1] / plain[1])
                print(f"[1] burst of {args.containers} held jobs, round {r + 1}/{args.rounds} "
                      f"({'ours' if r % 2 else 'plain'} first): plain xargs "
                      f"-P{args.submit_concurrency} sbatch {plain[1]:.2f}s, "
                      f"crunchgate dispatch-slurm {ours[1]:.2f}s (from start, incl. startup), "
                      f"ratio {ratios[-1]:.2f}; first job in squeue after "
                      f"{plain[0]:.2f}s / {ours[0]:.2f}s", flush=True)
            print(f"[1] burst ratio over {len(ratios)} rounds: median "
                  f"{statistics.median(ratios):.2f} (goal <= 1.3), all "
                  + " ".join(f"{x:.2f}" for x in ratios), flush=True)
        if args.steady > 0:
            r = steady(work, args.steady, args.steady_seconds, args.poll)
            pm = r["per_min"]
            polls = pm["polls"] or 1
            print(f"[2] steady state, {r['jobs']} pending jobs ({args.steady} containers, "
                  f"PollInterval {args.poll}; created in {r['created_s']:.0f}s, all in squeue "
                  f"{r['submit_s']:.0f}s after start, ordered {r['settle_s']:.0f}s later with "
                  f"{r['initial_scontrol']:.0f} renice calls; {r['distinct_nice']} distinct nice "
                  f"values, {r['nice10000']} jobs still at nice 10000, last renice pass found "
                  f"{r['renice_pending']:.0f} to change):")
            print(f"    per minute: {pm['polls']:.1f} polls, {pm['squeue']:.1f} squeue "
                  f"({pm['squeue'] / polls:.2f} per poll), {pm['scontrol']:.1f} scontrol, "
                  f"{pm['sbatch']:.1f} sbatch, {pm['scancel']:.1f} scancel, "
                  f"{pm['sinfo']:.1f} sinfo")
            print(f"    poll duration {r['poll_avg_s']:.2f}s on average; dispatcher CPU "
                  f"{r['cpu_pct']:.1f}% of one core, RSS {r['rss_mib']:.0f} MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if started:
            sh(str(SCRIPT), "stop", check=False)
    return 0


if __name__ == "__main__":
    # SIGTERM (a timeout, kill) unwinds like Ctrl-C: the finally blocks stop what was started.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main())
