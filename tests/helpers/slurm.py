"""The real Slurm dev cluster (contrib/slurm/dev-cluster.sh) as a session fixture.

``slurm_cluster`` starts the cluster once per test session -- or reuses one that is already
running in ``$CRUNCHGATE_SLURM_DIR`` (then it is left running) -- and stops what it started at
the end. It sets ``SLURM_CONF`` in ``os.environ`` for the session so that every Slurm command
run by the code under test talks to it. ``slurm`` is the per-test view: it cancels every job of
the cluster after the test.

Skipped (with the reason) only if slurm-wlm is not installed or we are not root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

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
