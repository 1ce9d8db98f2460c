"""The real Slurm dev cluster (contrib/slurm/dev-cluster.sh) as a session fixture.

``slurm_cluster`` starts the cluster once per test session -- or reuses one that is already
running in ``$CRUNCHGATE_SLURM_DIR`` (then it is left running) -- and stops what it started at
the end. It sets ``SLURM_CONF`` in ``os.environ`` for the session so that every Slurm command
run by the code under test talks to it. ``slurm`` is the per-test view: it cancels every job of
the cluster after the test.

Skipped (with the reason) only if slurm-wlm is not installed or we are not root.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dispatcher.proc import CommandResult, CommandRunner
from dispatcher.slurm.commands import SlurmCLI
from tests.helpers.paths import REPO_ROOT

SCRIPT = REPO_ROOT / "contrib" / "slurm" / "dev-cluster.sh"
DEFAULT_DIR = "/tmp/crunchgate-slurm"


def slurm_wait_for(cond: Callable[[], object], timeout_s: float = 30.0, interval_s: float = 0.2,
                   what: str = "condition") -> object:
    """Poll ``cond`` until it returns something truthy; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


@dataclass
class SlurmCluster:
    """Handle on the running dev cluster."""

    dir: Path
    conf: Path
    started_here: bool

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *argv: str, check: bool = True, timeout: float = 60) -> str:
        res = subprocess.run(list(argv), env=self.env, capture_output=True, text=True,
                             timeout=timeout, check=False)
        if check and res.returncode != 0:
            raise AssertionError(f"{argv} failed ({res.returncode}): {res.stderr.strip()}")
        return res.stdout

    def script(self, *args: str, timeout: float = 120) -> str:
        env = {**self.env, "CRUNCHGATE_SLURM_DIR": str(self.dir)}
        res = subprocess.run([str(SCRIPT), *args], env=env, capture_output=True, text=True,
                             timeout=timeout, check=False)
        if res.returncode != 0:
            raise AssertionError(f"dev-cluster.sh {' '.join(args)} failed: {res.stderr[-2000:]}")
        return res.stdout

    def jobs(self, states: str = "all") -> list[tuple[str, str, str, str, int]]:
        """(job id, name, state, reason, nice) of every job."""
        out = self.run("squeue", "--all", "--noheader", f"--states={states}",
                       "--format=%i|%j|%T|%r|%y")
        rows = []
        for line in out.splitlines():
            if line.strip():
                jid, name, state, reason, nice = line.split("|", 4)
                rows.append((jid, name, state, reason, int(nice)))
        return rows

    def live_jobs(self) -> dict[str, list[tuple[str, str, str, str, int]]]:
        """Live (pending/running/...) jobs by name."""
        out: dict[str, list[tuple[str, str, str, str, int]]] = {}
        for row in self.jobs(states="PD,R,CG,CF,S,RQ,RH,SI,ST,SO,RS"):
            out.setdefault(row[1], []).append(row)
        return out

    def cancel_all(self) -> None:
        self.run("scancel", "--user=root", check=False)
        slurm_wait_for(lambda: not self.live_jobs(), 30, what="all jobs to leave the queue")

    def ctld_pid(self) -> int:
        return int((self.dir / "run" / "slurmctld.pid").read_text().strip())

    @contextlib.contextmanager
    def ctld_paused(self) -> Iterator[None]:
        """slurmctld frozen (SIGSTOP): commands hang until Slurm's MessageTimeout."""
        pid = self.ctld_pid()
        os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(pid, signal.SIGCONT)

    def node_state(self, node: str) -> str:
        out = self.run("sinfo", "--noheader", "--Node", f"--nodes={node}", "--format=%t")
        return out.split()[0] if out.split() else ""

    @contextlib.contextmanager
    def node_down(self, node: str) -> Iterator[None]:
        """``scontrol update nodename=NODE state=down``: Slurm ends its jobs with NODE_FAIL. The
        node is resumed afterwards (slurmd may already have brought it back: ReturnToService=2)
        and the context waits until it is usable again."""
        self.run("scontrol", "update", f"nodename={node}", "state=down",
                 "reason=crunchgate-test")
        try:
            yield
        finally:
            self.run("scontrol", "update", f"nodename={node}", "state=resume", check=False)
            slurm_wait_for(lambda: self.node_state(node) in ("idle", "mix", "alloc"), 30,
                           what=f"node {node} back in service")

    @contextlib.contextmanager
    def ctld_stopped(self) -> Iterator[None]:
        """slurmctld shut down (connection refused), restarted with its saved job state."""
        self.script("ctld-stop")
        try:
            yield
        finally:
            self.script("ctld-start")
            slurm_wait_for(lambda: self.run("scontrol", "ping", check=False) and
                           "UP" in self.run("scontrol", "ping", check=False), 30,
                           what="slurmctld to answer")


def _running(directory: Path) -> bool:
    env = {**os.environ, "CRUNCHGATE_SLURM_DIR": str(directory),
           "SLURM_CONF": str(directory / "etc" / "slurm.conf")}
    res = subprocess.run([str(SCRIPT), "status"], env=env, capture_output=True, text=True,
                         timeout=60, check=False)
    return res.returncode == 0


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """The real Slurm cluster, started once for the session."""
    if shutil.which("slurmctld") is None or shutil.which("sbatch") is None:
        pytest.skip("slurm-wlm is not installed (apt-get install slurm-wlm munge, or dev/setup)")
    if os.geteuid() != 0:
        pytest.skip("the Slurm dev cluster needs root (its slurmd run jobs as root)")
    directory = Path(os.environ.get("CRUNCHGATE_SLURM_DIR") or DEFAULT_DIR)
    started = not _running(directory)
    cluster = SlurmCluster(directory, directory / "etc" / "slurm.conf", started)
    if started:
        cluster.script("start", timeout=300)
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        cluster.cancel_all()
        yield cluster
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        if started:
            cluster.script("stop", timeout=120)


@pytest.fixture
def slurm(slurm_cluster: SlurmCluster) -> Iterator[SlurmCluster]:
    """The cluster for one test; every job is cancelled afterwards."""
    yield slurm_cluster
    slurm_cluster.cancel_all()


class SlurmDispatcherProcess:
    """``crunchgate dispatch-slurm --config FILE`` as a subprocess, stopped by PID."""

    def __init__(self, config_path: Path, log_path: Path, env: dict[str, str]) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import sys

        exe = shutil.which("crunchgate")
        argv = [exe] if exe else [sys.executable, "-m", "dispatcher.cli"]
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                [*argv, "dispatch-slurm", "--config", str(self.config_path)],
                stdout=subprocess.DEVNULL, stderr=logf, env=self.env, start_new_session=True,
            )

    def kill9(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 15 s -- our own process only."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


# --- an in-memory Slurm for tests at scale ------------------------------------------------------


@dataclass
class ModelJob:
    job_id: int
    name: str
    nice: int
    partition: str
    held: bool = False
    state: str = "PENDING"
    reason: str = "PartitionDown"

    def priority(self, base: int) -> int:
        # priority/multifactor with only a partition weight, as the dev cluster: weight - nice.
        return 0 if self.held else max(1, base - self.nice)


class SlurmModel:
    """squeue / sbatch / scancel / scontrol as an in-memory model, plugged under a real
    :class:`dispatcher.slurm.commands.SlurmCLI` by replacing its runners (:meth:`attach`): the
    CLI layer, its metrics and the backend are the real code, only the processes are not.

    Spawning 10,000 processes would take minutes; this answers in microseconds, so the loop's
    behaviour at scale (renice passes, the per-poll cap, steady state) is testable in seconds.
    It mimics what matters of Slurm 22.05 as measured on the dev cluster: ``priority = weight -
    nice``, updated at once; ``scontrol update JobName=`` loads the whole job table (counted in
    :attr:`job_table_loads`) and also targets ended jobs of that name, failing with "Job has
    already finished"; ended jobs stay listed by ``squeue --states=all``.
    """

    BASE_PRIORITY = 10_000_000

    def __init__(self) -> None:
        self.jobs: dict[int, ModelJob] = {}
        self._next_id = 1
        self.calls: list[tuple[str, ...]] = []
        self.job_table_loads = 0
        self.in_flight = 0
        self._changed = asyncio.Condition()
        #: cleared: scontrol calls wait until it is set (observe a pass in progress)
        self.scontrol_gate = asyncio.Event()
        self.scontrol_gate.set()

    # -- the model --

    def submit(self, name: str, nice: int = 10000, partition: str = "parked",
               held: bool = False) -> ModelJob:
        job = ModelJob(self._next_id, name, nice, partition, held)
        self.jobs[job.job_id] = job
        self._next_id += 1
        return job

    def live(self) -> dict[str, ModelJob]:
        return {j.name: j for j in self.jobs.values() if j.state in ("PENDING", "RUNNING")}

    def order(self) -> list[str]:
        """Live job names, highest Slurm priority first (ties: lowest job id first)."""
        live = self.live().values()
        return [j.name for j in sorted(live, key=lambda j: (-j.priority(self.BASE_PRIORITY),
                                                             j.job_id))]

    def count(self, command: str) -> int:
        return sum(1 for c in self.calls if c[0] == command)

    # -- the commands --

    def _squeue(self, argv: tuple[str, ...]) -> tuple[int, str, str]:
        name = next((a.split("=", 1)[1] for a in argv if a.startswith("--name=")), None)
        lines = [
            f"{j.job_id} {j.nice} {j.priority(self.BASE_PRIORITY)} {j.state} {j.partition} "
            f"{j.name} {j.reason if j.state == 'PENDING' else 'None'}"
            for j in self.jobs.values() if name is None or j.name == name
        ]
        return 0, "".join(line + "\n" for line in lines), ""

    def _sbatch(self, argv: tuple[str, ...]) -> tuple[int, str, str]:
        opts = dict(a[2:].split("=", 1) for a in argv[1:] if a.startswith("--") and "=" in a)
        job = self.submit(opts.get("job-name", "sbatch"), int(opts.get("nice", "0")),
                          opts.get("partition", "compute"), held="--hold" in argv)
        return 0, f"Submitted batch job {job.job_id}\n", ""

    def _scancel(self, argv: tuple[str, ...]) -> tuple[int, str, str]:
        opts = dict(a[2:].split("=", 1) for a in argv[1:] if a.startswith("--") and "=" in a)
        for j in self.jobs.values():
            if j.name == opts.get("name") and j.state == opts.get("state", "").upper():
                j.state = "CANCELLED"
        return 0, "", ""

    async def _scontrol(self, argv: tuple[str, ...]) -> tuple[int, str, str]:
        await self.scontrol_gate.wait()
        if argv[1:2] != ("update",) or len(argv) != 4 or not argv[3].startswith("Nice="):
            return 1, "", f"scontrol: model does not know {argv[1:]}"
        target, nice = argv[2], int(argv[3][5:])
        if target.startswith("JobId="):
            found = [self.jobs[int(target[6:])]] if int(target[6:]) in self.jobs else []
        else:
            self.job_table_loads += 1  # scontrol lists every job to find the name
            found = [j for j in self.jobs.values() if j.name == target[8:]]
        if not found:
            return 1, "", f"scontrol: error: Invalid job id specified for {target}"
        errors = []
        for j in found:
            if j.state not in ("PENDING", "RUNNING"):
                errors.append(f"Job has already finished for job {j.job_id}")
            else:
                j.nice = nice
        return (1 if errors else 0), "", "; ".join(errors)

    async def wait_in_flight(self, n: int) -> None:
        """Wait until at least ``n`` commands are running."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.in_flight >= n)

    async def run(self, argv: tuple[str, ...]) -> tuple[int, str, str]:
        self.calls.append(argv)
        self.in_flight += 1
        async with self._changed:
            self._changed.notify_all()
        try:
            if argv[0] == "scontrol":
                return await self._scontrol(argv)
            handler = {"squeue": self._squeue, "sbatch": self._sbatch,
                       "scancel": self._scancel}.get(argv[0])
            if handler is None:
                return 127, "", f"{argv[0]}: not in the model"
            return handler(argv)
        finally:
            self.in_flight -= 1

    def attach(self, cli: SlurmCLI) -> None:
        """Swap the runners of a SlurmCLI for this model (same limits, same metrics hook)."""
        for attr in ("submit_runner", "renice_runner", "query_runner"):
            old: CommandRunner = getattr(cli, attr)
            setattr(cli, attr, ModelRunner(self, max_concurrency=old._sem._value,
                                           default_timeout_s=old.default_timeout_s,
                                           on_finish=old._on_finish))


class ModelRunner(CommandRunner):
    """A CommandRunner whose processes are a :class:`SlurmModel`'s commands."""

    def __init__(self, model: SlurmModel, **kw: Any) -> None:
        super().__init__(**kw)
        self.model = model

    async def _run_one(self, argv: tuple[str, ...], data: bytes | None, limit_s: float,
                       env: dict[str, str]) -> CommandResult:
        rc, out, err = await self.model.run(argv)
        return CommandResult(argv, rc, out, err, 0.0)
