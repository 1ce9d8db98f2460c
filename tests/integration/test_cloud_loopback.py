"""Cloud dispatcher end to end on the loopback driver: real controller, real OpenSSH sshd on a
loopback port, the asyncssh executor, real ``crunch-run --detach/--list/--kill`` with
``--runtime-engine=local``, and ``crunchgate dispatch-cloud`` as a subprocess.

* 10 containers run to Complete through SSH, each exactly once; the idle instance is then shut
  down (destroyed) after TimeoutIdle.
* kill -9 of the dispatcher while containers run; a restarted dispatcher re-adopts the instance
  (unknown state, ``--list`` shows the running containers), nothing is lost or run twice, and
  the instance is still shut down when idle.
* The SSH executor against the same sshd: exit statuses, stdin/stdout/stderr, timeouts, a host
  key that does not match is refused before any command runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from dispatcher.arvados.client import ArvadosClient
from dispatcher.cloud.drivers.loopback import LoopbackInstanceSet
from dispatcher.cloud.errors import ExecError, HostKeyError, QuotaError
from dispatcher.cloud.sshexec import SSHExecutor, load_private_key
from dispatcher.config import ClusterConfig, InstanceType
from tests.helpers.cloud import SshdInfo, free_port, stop_pid

pytestmark = [pytest.mark.sshd, pytest.mark.slow]

GiB = 1 << 30


def crunch_run_exe() -> str:
    # The console script sits beside the interpreter running the tests (.venv/bin), whether or
    # not that directory is on PATH.
    beside = Path(sys.executable).parent / "crunch-run"
    exe = str(beside) if os.access(beside, os.X_OK) else shutil.which("crunch-run")
    if exe is None:
        pytest.skip("crunch-run console script not installed")
    return exe


class CloudCluster:
    def __init__(self, controller: Any, sshd: SshdInfo, work: Path) -> None:
        self.ctl = controller
        self.sshd = sshd
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.lock_dir = work / "locks"
        self.lock_dir.mkdir()
        self.scratch = work / "scratch"
        self.scratch.mkdir()
        self.state_file = work / "loopback-state.json"
        self.http_port = free_port()
        doc = yaml.safe_load(Path(controller.config_path).read_text())
        cluster = doc["Clusters"][controller.cluster_id]
        cluster["Services"]["DispatchCloud"] = {
            "InternalURLs": {f"http://127.0.0.1:{self.http_port}": {}}}
        self.runner = (f"{crunch_run_exe()} --lock-dir={self.lock_dir} "
                       f"--scratch-base={self.scratch} --poll-interval=0.5")
        cluster["InstanceTypes"] = {"localhost": {
            "ProviderType": "localhost", "VCPUs": 4, "RAM": "16GiB", "IncludedScratch": "50GiB",
            "Price": 0.1}}
        cluster["Containers"] = {
            "DispatchPrivateKey": f"file://{sshd.client_key_path}",
            "RuntimeEngine": "local",
            "CrunchRunCommand": self.runner,
            "StaleLockTimeout": "2s",
            "CloudVMs": {
                "Driver": "loopback",
                "DriverParameters": {"Port": str(sshd.port), "User": sshd.user,
                                     "HostKeyFile": f"{sshd.host_key_path}.pub",
                                     "StateFile": str(self.state_file)},
                "BootProbeCommand": "true",
                "DeployRunnerBinary": "",
                # Every probe runs a real `crunch-run --list` (a Python start-up, ~1 s of CPU
                # on this machine): probing more often only competes with the containers.
                "PollInterval": "1s", "ProbeInterval": "1s", "SyncInterval": "1s",
                "TimeoutIdle": "3s", "TimeoutBooting": "60s", "TimeoutProbe": "60s",
                "TimeoutShutdown": "2s", "MaxInstances": 1,
            },
        }
        cluster["SystemLogs"] = {"LogLevel": "info", "Format": "json"}
        self.doc, self.cluster = doc, cluster
        self.config = work / "dispatch-cloud.yml"
        self.config.write_text(yaml.safe_dump(doc))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = work / "dispatch-cloud.log"
        self.ran = work / "ran.txt"

    def set_vcpus(self, n: int) -> None:
        """How many 1-VCPU containers the one instance holds at once (before start())."""
        self.cluster["InstanceTypes"]["localhost"]["VCPUs"] = n
        self.config.write_text(yaml.safe_dump(self.doc))

    # --- processes ---------------------------------------------------------------------------

    def start(self) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ARVADOS_API_")}
        # This test's own host lock: another test run on this machine may run a zzzzz
        # dispatch-cloud at the same time.
        env["CRUNCHGATE_LOCK_DIR"] = str(self.work)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dispatcher.cli", "dispatch-cloud", "--config",
                 str(self.config)], stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        return self.proc

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc)
        # Detached crunch-run processes are ours (our lock dir): stop any left over.
        out = subprocess.run(self.runner.split() + ["--list"], capture_output=True, text=True,
                             timeout=30, check=False)
        for line in out.stdout.split():
            if line.startswith("zzzzz-dz642-"):
                subprocess.run(self.runner.split() + ["--kill", "9", line], timeout=30,
                               check=False, capture_output=True)

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    # --- API ---------------------------------------------------------------------------------

    def call(self, fn: Any) -> Any:
        async def go() -> Any:
            async with ArvadosClient(self.ctl.host, self.ctl.root_token, insecure=True,
                                     retries=2) as c:
                return await fn(c)

        return asyncio.run(asyncio.wait_for(go(), 60))

    def submit(self, n: int, gate: Path | None = None) -> list[str]:
        """``n`` containers that each append ``run-<i>`` to ``ran.txt`` (so a second run shows)
        and then, with ``gate``, wait until that file exists (no timing guesses)."""
        crs = []
        for i in range(n):
            cmd = f"echo run-$N >> {self.ran}"
            if gate is not None:
                cmd += f"; while [ ! -e {gate} ]; do sleep 0.2; done"
            crs.append(self.call(lambda c, cmd=cmd, i=i: c.create("container_requests", {
                "state": "Committed", "priority": 500, "command": ["sh", "-c", cmd],
                "container_image": "local", "cwd": "/tmp", "output_path": "/tmp",
                "environment": {"N": str(i)},
                "runtime_constraints": {"vcpus": 1, "ram": 64 << 20}})))
        uuids = []
        deadline = time.monotonic() + 30
        for cr in crs:
            while True:
                rec = self.call(lambda c, u=cr["uuid"]: c.get("container_requests", u))
                if rec.get("container_uuid"):
                    uuids.append(rec["container_uuid"])
                    break
                assert time.monotonic() < deadline, "container requests got no container"
                time.sleep(0.2)
        return uuids

    def states(self, uuids: list[str]) -> dict[str, dict[str, Any]]:
        async def fetch(c: ArvadosClient) -> dict[str, dict[str, Any]]:
            page = await c.list("containers", filters=[["uuid", "in", uuids]], limit=1000)
            return {r["uuid"]: r for r in page["items"]}

        return self.call(fetch)

    def wait(self, cond: Any, timeout_s: float, what: str) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is None or self.proc.poll() is None or self.proc.returncode == -9, \
                f"dispatcher exited:\n{self.tail()}"
            value = cond()
            if value:
                return value
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what}\n{self.tail()}")

    def management(self, path: str) -> Any:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", headers={
            "Authorization": f"Bearer {self.ctl.management_token}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def try_management(self, path: str) -> Any:
        """Like :meth:`management`, None while the dispatcher is not listening yet."""
        try:
            return self.management(path)
        except OSError:
            return None

    def instances_in_state_file(self) -> dict[str, Any]:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}


@pytest.fixture
def cloud_cluster(controller, cloud_sshd, tmp_path):
    cluster = CloudCluster(controller, cloud_sshd, tmp_path / "cloud")
    try:
        yield cluster
    finally:
        cluster.stop()


def ran_lines(c: CloudCluster) -> list[str]:
    try:
        return c.ran.read_text().split()
    except OSError:
        return []


def test_ten_containers_run_to_complete_over_ssh(cloud_cluster):
    c = cloud_cluster
    c.set_vcpus(8)   # two rounds on the one instance: eight packed, then two
    c.start()
    uuids = c.submit(10)
    # While it works: the instance is visible through the CLI (management API).
    c.wait(lambda: (c.try_management("/arvados/v1/dispatch/instances") or {}).get("items"), 60,
           "an instance in the management API")
    out = subprocess.run([sys.executable, "-m", "dispatcher.cli", "dispatch-cloud", "instances",
                          "--tsv", "--config", str(c.config)], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.split("\t")[0] == "localhost" and "\tlocalhost\tlocalhost\t0.100000\t" in out
    final = c.wait(lambda: (lambda s: s if all(r["state"] in ("Complete", "Cancelled")
                                               for r in s.values()) and len(s) == 10 else None)(
        c.states(uuids)), 150, "10 containers to finish")
    assert {r["state"] for r in final.values()} == {"Complete"}, final
    assert all(r["exit_code"] == 0 for r in final.values())
    assert sorted(ran_lines(c)) == sorted(f"run-{i}" for i in range(10))
    # The management API saw the instance; after TimeoutIdle it is shut down and destroyed.
    c.wait(lambda: not c.instances_in_state_file(), 30, "idle instance to be destroyed")
    c.wait(lambda: c.management("/arvados/v1/dispatch/instances")["items"] == [], 10,
           "the destroyed instance to leave the pool")
    req = urllib.request.Request(f"http://127.0.0.1:{c.http_port}/metrics", headers={
        "Authorization": f"Bearer {c.ctl.management_token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        metrics = resp.read().decode()
    assert 'arvados_dispatchcloud_boot_outcomes{outcome="success"} 1.0' in metrics
    assert "arvados_dispatchcloud_containers_time_from_queue_to_crunch_run_seconds_count 10.0" \
        in metrics
    log = c.log.read_text()
    assert "crunch-run process started" in log
    assert c.ctl.root_token not in log


def test_kill_9_and_restart_loses_nothing_and_runs_nothing_twice(cloud_cluster):
    """Reference fault scenario: kill -9 the dispatcher while the instance runs containers.
    The restarted dispatcher re-adopts the instance (unknown state) and the containers still
    running on it (``crunch-run --list``), runs the rest, nothing twice, and still shuts the
    instance down once it is idle."""
    c = cloud_cluster
    gate = c.work / "gate"
    c.start()
    uuids = c.submit(6, gate=gate)
    # Until the gate opens, running containers stay running: kill while at least two do.
    c.wait(lambda: len(ran_lines(c)) >= 2
           and sum(r["state"] == "Running" for r in c.states(uuids).values()) >= 2, 90,
           "containers to start running")
    first_pid = c.proc.pid if c.proc else 0
    c.kill9()
    running_before = {u for u, r in c.states(uuids).items() if r["state"] == "Running"}
    assert c.instances_in_state_file(), "the instance must survive the dispatcher"
    log_size = c.log.stat().st_size
    c.start()
    assert c.proc is not None and c.proc.pid != first_pid
    # The new process adopts the instance and finds the containers that are still running.
    adopted = c.wait(lambda: (lambda items: set(items[0]["running_container_uuids"])
                              if items and running_before <= set(
                                  items[0]["running_container_uuids"]) else None)(
        (c.try_management("/arvados/v1/dispatch/instances") or {}).get("items")), 60,
        "the restarted dispatcher to adopt the running containers")
    assert running_before <= adopted
    gate.touch()
    final = c.wait(lambda: (lambda s: s if all(r["state"] in ("Complete", "Cancelled")
                                               for r in s.values()) else None)(c.states(uuids)),
                   150, "all containers to finish after restart")
    assert {r["state"] for r in final.values()} == {"Complete"}, final
    lines = ran_lines(c)
    assert sorted(lines) == sorted(f"run-{i}" for i in range(6)), "a container ran twice or never"
    c.wait(lambda: not c.instances_in_state_file(), 30, "idle instance to be shut down")
    with open(c.log, "rb") as fh:
        fh.seek(log_size)
        after = fh.read().decode(errors="replace")
    assert "instance appeared in cloud (state unknown" in after
    assert after.count("crunch-run process detected") >= len(running_before)
    assert "shutdown worker (state idle" in after
    # The queued ones were not locked on the adopted instance's apparent room and then
    # unlocked (a dispatch attempt burned) once its probe showed it full.
    assert "unlock because pool capacity" not in after


# --- the SSH executor against a real sshd ------------------------------------------------------


def _loopback_instance(sshd: SshdInfo, host_key_file: str, tmp: Path):
    cfg = ClusterConfig()
    cfg.instance_types = {"localhost": InstanceType(name="localhost", provider_type="localhost")}
    iset = LoopbackInstanceSet(cfg, "t", {"Port": str(sshd.port), "User": sshd.user,
                                          "HostKeyFile": host_key_file,
                                          "StateFile": str(tmp / "state.json")})

    async def make():
        return await iset.create(cfg.instance_types["localhost"], "", {"a": "b"}, "", None)

    return iset, asyncio.run(make())


def test_ssh_executor_exec_semantics(cloud_sshd, tmp_path):
    iset, inst = _loopback_instance(cloud_sshd, f"{cloud_sshd.host_key_path}.pub", tmp_path)
    key = load_private_key(f"file://{cloud_sshd.client_key_path}")

    async def go():
        ex = SSHExecutor(inst, key)
        out, err = await ex.execute("cat; echo err >&2", b"hello stdin", timeout_s=20)
        assert (out, err) == (b"hello stdin", b"err\n")
        for status in (1, 2):
            with pytest.raises(ExecError) as ei:
                await ex.execute(f"echo o; exit {status}", timeout_s=20)
            assert ei.value.exit_status == status and ei.value.stdout == b"o\n"
        # The connection is reused, and a hung command times out instead of blocking.
        conn = ex._conn
        with pytest.raises(ExecError) as ei:
            await ex.execute("sleep 5", timeout_s=0.5)
        assert ei.value.timed_out
        out, _ = await ex.execute("echo still works", timeout_s=20)
        assert out == b"still works\n"
        assert ex._conn is conn
        await ex.close()
        # A key the sshd does not accept: refused at login, nothing runs.
        import asyncssh

        stranger = SSHExecutor(inst, asyncssh.generate_private_key("ssh-ed25519"))
        with pytest.raises(ExecError) as ei:
            await stranger.execute("echo should-not-run", timeout_s=20)
        assert ei.value.connect_failed and ei.value.exit_status is None
        await stranger.close()
        # Nothing listens on port 1: connect failure, not an exit status.
        bad = SSHExecutor(inst, key, default_port="1")
        bad.instance = type(inst)(iset, inst.id, "localhost", {})
        iset.port = "1"
        with pytest.raises(ExecError) as ei:
            await bad.execute("true", timeout_s=5)
        assert ei.value.connect_failed

    asyncio.run(go())
    # Reference 7.16 loopback: one instance at most, listed as "localhost"; destroy frees it.
    it = InstanceType(name="localhost", provider_type="localhost")
    with pytest.raises(QuotaError, match="always at quota"):
        asyncio.run(iset.create(it, "", {}, "", None))
    assert [i.id for i in asyncio.run(iset.instances({"a": "b"}))] == ["localhost"]
    assert asyncio.run(iset.instances({"a": "other"})) == []
    asyncio.run(inst.destroy())
    assert asyncio.run(iset.instances({})) == []
    asyncio.run(iset.create(it, "", {}, "", None))
    assert len(asyncio.run(iset.instances({}))) == 1


def test_ssh_executor_refuses_wrong_host_key_before_running_anything(cloud_sshd, tmp_path):
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    marker = tmp_path / "ran"
    iset, inst = _loopback_instance(cloud_sshd, f"{other}.pub", tmp_path)
    key = load_private_key(f"file://{cloud_sshd.client_key_path}")

    async def go():
        ex = SSHExecutor(inst, key)
        with pytest.raises(HostKeyError):
            await ex.execute(f"touch {marker}", timeout_s=20)
        await ex.close()

    asyncio.run(go())
    assert not marker.exists()


def test_ssh_executor_instance_secret_check(cloud_sshd, tmp_path):
    """With no host-key mechanism, the instance secret file must match the tag exactly."""
    iset, inst = _loopback_instance(cloud_sshd, "", tmp_path)
    key = load_private_key(f"file://{cloud_sshd.client_key_path}")

    class NoVerify(type(inst)):  # type: ignore[misc]
        async def verify_host_key(self, k):
            from dispatcher.cloud.errors import NotImplementedByDriver

            raise NotImplementedByDriver("no")

    inst2 = NoVerify(iset, inst.id, "localhost", {})
    secret_path = Path("/var/run/arvados-instance-secret")
    if secret_path.exists():
        pytest.skip("a real instance secret exists on this host")

    async def go(secret: str):
        ex = SSHExecutor(inst2, key, secret=lambda: secret)
        try:
            return await ex.execute("echo ok", timeout_s=20)
        finally:
            await ex.close()

    secret_path.write_text("s3cr3t-value")
    try:
        assert asyncio.run(go("s3cr3t-value"))[0] == b"ok\n"
        with pytest.raises(HostKeyError, match="bad instance secret"):
            asyncio.run(go("another-secret"))
    finally:
        secret_path.unlink()
