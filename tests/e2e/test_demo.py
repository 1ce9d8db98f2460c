"""``crunchgate demo`` through its CLI: exit status, the result table, the cleanup, --keep."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from dispatcher.arvados.client import ArvadosClient
from tests.helpers.core import core_run
from tests.helpers.procs import alive

pytestmark = pytest.mark.slow

UUID_RE = re.compile(r"zdemo-dz642-[a-z0-9]{15}")


def run_demo(tmp_path, *args: str, timeout_s: float = 240) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARVADOS_API_")}
    env["COLUMNS"] = "120"
    return subprocess.run(
        [sys.executable, "-m", "dispatcher.cli", "demo", "--data", str(tmp_path / "demo"), *args],
        capture_output=True, text=True, timeout=timeout_s, env=env)


def test_demo_runs_the_workload_and_cleans_up(tmp_path):
    out = run_demo(tmp_path, "--containers", "6")
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    # 6 sample containers + the one visited with a shell through the tunnel broker
    assert "7 of 7 containers finished as expected" in text
    uuids = set(UUID_RE.findall(text))
    assert len(uuids) == 7
    # table rows: uuid, kind, state, exit code (of 6: one "fail", which exits 3 on purpose)
    rows = [line for line in text.splitlines() if UUID_RE.search(line) and "yes" in line]
    assert sum(1 for r in rows if re.search(r"\bfail\b.*Complete\s+3\b", r)) == 1
    assert sum(1 for r in rows if re.search(r"Complete\s+0\b", r)) == 5
    assert sum(1 for r in rows if re.search(r"\bshell\b.*Cancelled", r)) == 1
    assert "hello from inside container 0, cwd " in text
    assert "line 3 from " in text  # a container's stdout, read back from its log records
    # Everything it started is gone: the services (pids in its logs) and the jobs.
    data = tmp_path / "demo"
    assert not list((data / "dispatch-local" / "local-jobs").glob("*.job"))
    pids = {int(m) for m in re.findall(r"\(pid (\d+)\)", text)}
    assert len(pids) == 2
    assert not [p for p in pids if alive(p)]
    # no secret in anything it printed
    import yaml
    cfg = yaml.safe_load((data / "config.yml").read_text())["Clusters"]["zdemo"]
    assert cfg["SystemRootToken"] not in text + out.stderr


def test_demo_keep_leaves_a_usable_controller(tmp_path):
    out = run_demo(tmp_path, "--containers", "1", "--keep", "--no-shell")
    pids = [int(p) for p in re.search(r"kill ([\d ]+)", out.stdout).group(1).split()]
    try:
        assert out.returncode == 0, out.stdout + out.stderr
        assert all(alive(p) for p in pids)
        host = re.search(r"export ARVADOS_API_HOST=(\S+)", out.stdout).group(1)
        token = re.search(r"export ARVADOS_API_TOKEN=(\S+)", out.stdout).group(1)

        async def whoami():
            async with ArvadosClient(host, token, insecure=True, retries=1) as c:
                return await c.current_token()
        assert core_run(whoami())["uuid"]
    finally:
        for p in pids:
            if alive(p):
                os.kill(p, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        for p in pids:
            if alive(p):
                os.kill(p, signal.SIGKILL)
