"""dispatch-local end to end: real controller, real crunch-run, ``crunchgate dispatch-local``
processes. A ``kill -9`` of the dispatcher mid-workload and a restart still run every container
exactly once; priority 0 stops a running container."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from dispatcher.arvados.client import ArvadosClient
from dispatcher.demo import Child, start_child, stop_child, write_config
from dispatcher.local.backend import LocalBackend
from tests.helpers.core import core_run

pytestmark = pytest.mark.slow


class LocalCluster:
    """A controller and dispatch-local processes on loopback, all stopped by the fixture."""

    def __init__(self, data: Path) -> None:
        from dispatcher.demo import free_port

        self.data = data
        self.config, self.root_token, _ = write_config(data, free_port(), free_port())
        import yaml
        doc = yaml.safe_load(self.config.read_text())
        cluster = doc["Clusters"]["zdemo"]
        self.url = cluster["Services"]["Controller"]["ExternalURL"]
        self.state_dir = data / "dispatch-local"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("ARVADOS_API_")}
        self.children: list[Child] = []
        self.dispatcher: Child | None = None

    def start_controller(self) -> None:
        child = start_child("controller", ["controller", "--config", str(self.config)],
                            self.data / "controller.log", self.env)
        self.children.append(child)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert child.proc.poll() is None, child.tail()
            try:
                core_run(self.call(lambda c: c.current_token()), timeout_s=10)
                return
            except Exception:
                time.sleep(0.2)
        raise AssertionError("controller did not start: " + child.tail())

    def start_dispatcher(self, max_jobs: int = 3) -> Child:
        child = start_child(
            "dispatch-local",
            ["dispatch-local", "--config", str(self.config), "--state-dir", str(self.state_dir),
             "--max-jobs", str(max_jobs)],
            self.data / "dispatch-local.log", self.env)
        self.children.append(child)
        self.dispatcher = child
        return child

    async def _with_client(self, fn):
        async with ArvadosClient(self.url, self.root_token, insecure=True, retries=2) as c:
            return await fn(c)

    def call(self, fn):
        return self._with_client(fn)

    def run(self, fn):
        return core_run(self._with_client(fn), timeout_s=60)

    def submit(self, command: list[str], env: dict[str, str]) -> dict:
        return self.run(lambda c: c.create("container_requests", {
            "state": "Committed", "priority": 500, "command": command,
            "container_image": "local", "cwd": "/tmp", "output_path": "/tmp",
            "environment": env, "runtime_constraints": {"vcpus": 1, "ram": 64 << 20}}))

    def containers(self, uuids: list[str]) -> dict[str, dict]:
        async def fetch(c):
            out = {}
            for i in range(0, len(uuids), 20):
                page = await c.list("containers", filters=[["uuid", "in", uuids[i:i + 20]]],
                                    limit=20)
                out.update({r["uuid"]: r for r in page["items"]})
            return out
        return self.run(fetch)

    def wait(self, cond, timeout_s: float = 120.0, what: str = "condition"):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = cond()
            if value:
                return value
            time.sleep(0.3)
        logs = self.dispatcher.tail(20) if self.dispatcher else ""
        raise AssertionError(f"timed out waiting for {what}\n{logs}")

    def stop(self) -> None:
        for child in reversed(self.children):
            if child.name == "dispatch-local":
                stop_child(child)
        # Jobs are detached on purpose: stop the ones still running (our own records' pids).
        if self.state_dir.is_dir():
            from dispatcher.config import load_config

            async def stop_jobs():
                be = LocalBackend(load_config(self.config), self.state_dir, job_env={},
                                  start_jobs=False)
                for name, job in (await be.list_jobs()).items():
                    await be.cancel(name, job)
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline:
                    if not [j for j in (await be.list_jobs()).values() if not j.pending]:
                        return
                    await asyncio.sleep(0.2)
                for path in self.state_dir.glob("local-jobs/*.job"):
                    import json
                    rec = json.loads(path.read_text())
                    if rec.get("pid") and be._alive(rec):  # noqa: SLF001
                        os.kill(rec["pid"], signal.SIGKILL)
            core_run(stop_jobs(), timeout_s=60)
        for child in reversed(self.children):
            stop_child(child)


@pytest.fixture
def local_cluster(tmp_path):
    cluster = LocalCluster(tmp_path)
    try:
        cluster.start_controller()
        yield cluster
    finally:
        cluster.stop()


def test_kill_9_of_dispatcher_mid_workload_runs_each_container_exactly_once(local_cluster):
    c = local_cluster
    shared = c.data / "ran.txt"
    shared.touch()
    n = 8
    marks, codes, uuids = [], {}, []
    for i in range(n):
        mark = f"mark-{i}-{os.urandom(4).hex()}"
        code = i % 3  # 0, 1, 2: exit codes must come through right
        cr = c.submit(["sh", "-c", f'echo "$MARK" >> {shared}; sleep 1.5; exit {code}'],
                      {"MARK": mark})
        marks.append(mark)
        uuids.append(cr["container_uuid"])
        codes[cr["container_uuid"]] = code
    first = c.start_dispatcher(max_jobs=3)
    # Kill it while some containers run and others still wait for a job slot.
    c.wait(lambda: any(r["state"] == "Running" for r in c.containers(uuids).values()),
           what="a Running container")
    os.kill(first.proc.pid, signal.SIGKILL)
    first.proc.wait(10)
    states = c.containers(uuids)
    assert sum(r["state"] in ("Complete", "Cancelled") for r in states.values()) < n
    c.start_dispatcher(max_jobs=3)
    final = c.wait(
        lambda: (recs := c.containers(uuids)) and all(
            r["state"] in ("Complete", "Cancelled") for r in recs.values()) and recs,
        what="all containers final")
    lines = shared.read_text().split()
    for mark in marks:
        assert lines.count(mark) == 1, (mark, lines)
    for u in uuids:
        assert final[u]["state"] == "Complete", final[u]
        assert final[u]["exit_code"] == codes[u]
    # The restarted dispatcher adopted the running and queued jobs instead of submitting again
    # (crunch-run's own guards would hide a second run: look at what the dispatchers did).
    log_text = (c.data / "dispatch-local.log").read_text()
    for u in uuids:
        assert log_text.count(f"Submitting container {u} to local") == 1, u
    # crunch-run exits just after it records the end; the next poll forgets the job
    c.wait(lambda: not list((c.state_dir / "local-jobs").glob("*.job")), timeout_s=30,
           what="job records cleaned up")


def test_priority_zero_stops_a_running_container(local_cluster):
    c = local_cluster
    cr = c.submit(["sh", "-c", "sleep 60"], {"MARK": "long"})
    uuid = cr["container_uuid"]
    c.start_dispatcher()
    c.wait(lambda: c.containers([uuid])[uuid]["state"] == "Running", what="Running")
    c.run(lambda cl: cl.update("container_requests", cr["uuid"], {"priority": 0}))
    rec = c.wait(lambda: (r := c.containers([uuid])[uuid])["state"] in ("Cancelled", "Complete")
                 and r, timeout_s=60, what="Cancelled")
    assert rec["state"] == "Cancelled"
    c.wait(lambda: not list((c.state_dir / "local-jobs").glob("*.job")), timeout_s=30,
           what="job gone")


def test_dispatch_local_serves_health_and_metrics(local_cluster):
    import yaml
    c = local_cluster
    c.start_dispatcher()
    doc = yaml.safe_load(c.config.read_text())["Clusters"]["zdemo"]
    url = next(iter(doc["Services"]["DispatchLocal"]["InternalURLs"]))
    token = doc["ManagementToken"]

    async def get(path, auth=True):
        import aiohttp
        headers = {"Authorization": f"Bearer {token}"} if auth else {}
        async with aiohttp.ClientSession() as s, s.get(url + path, headers=headers) as r:
            return r.status, await r.text()

    def ping():
        try:
            return core_run(get("/_health/ping"))
        except Exception:
            return None
    status, body = c.wait(ping, timeout_s=30, what="health endpoint")
    assert status == 200 and '"OK"' in body
    c.wait(lambda: "crunchgate_dispatch_poll_duration_seconds_count" in core_run(
        get("/metrics"))[1], timeout_s=30, what="a poll in the metrics")
    assert core_run(get("/metrics", auth=False))[0] == 401
    assert sys.executable  # (the services ran under this interpreter)
