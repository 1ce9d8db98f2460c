"""End to end through the CLI: controller -> ``crunchgate dispatch-lsf`` -> LSF simulator ->
crunch-run (``RuntimeEngine: local``) -> Complete, with exit codes and logs.

Also: ``kill -9`` of the dispatcher in the middle of a burst and a restart (no job submitted
twice, none lost), hostile container fields (run literally), no secrets in the dispatcher's log.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dispatcher.core.jobscript import gateway_auth_secret
from tests.helpers.controller import ControllerProcess, free_port, start_controller
from tests.helpers.lsf import LsfSim

pytestmark = pytest.mark.slow

HOSTS = [{"name": f"lsfhost{i}", "slots": 4, "mem_mb": 16384, "tmp_mb": 102400,
          "gpus": 2 if i == 1 else 0} for i in range(1, 5)]


def wait_for(cond: Callable[[], Any], timeout_s: float, what: str,
             detail: Callable[[], Any] | None = None) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}" + (f": {detail()}" if detail else ""))
        time.sleep(0.1)


class Stack:
    """A controller, an LSF simulator, and a ``crunchgate dispatch-lsf`` process."""

    def __init__(self, tmp: Path, sim: LsfSim, crunchgate: dict[str, Any] | None = None) -> None:
        self.tmp, self.sim = tmp, sim
        self.dispatch_port = free_port()
        # The venv's crunch-run when the venv is not on PATH (pytest run as .venv/bin/pytest).
        crunch_run = shutil.which("crunch-run") or str(Path(sys.executable).parent / "crunch-run")
        self.ctl: ControllerProcess = start_controller(tmp / "controller", extra_config={
            "Crunchgate": crunchgate or {},
            "Services": {"DispatchLSF": {"InternalURLs": {
                f"http://127.0.0.1:{self.dispatch_port}": {}}}},
            "Containers": {
                "RuntimeEngine": "local",
                "CrunchRunCommand": crunch_run,
                "CrunchRunArgumentsList": ["--poll-interval=0.2", "--log-flush-interval=0.2",
                                           "--kill-grace=2"],
                "MinRetryPeriod": "0s",
                "CloudVMs": {"PollInterval": "300ms"},
                "LSF": {
                    "BsubSudoUser": "",
                    "BsubArgumentsList": [
                        "-o", f"{tmp}/crunch-run.%%J.out", "-e", f"{tmp}/crunch-run.%%J.err",
                        "-J", "%U", "-n", "%C", "-D", "%MMB",
                        "-R", "rusage[mem=%MMB:tmp=%TMB] span[hosts=1]",
                        "-R", "select[mem>=%MMB]", "-R", "select[tmp>=%TMB]",
                        "-R", "select[ncpus>=%C]", "-We", "%W"],
                },
            },
        })
        self.api = self.ctl.api()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = tmp / "dispatch-lsf.log"
        (tmp / "locks").mkdir(exist_ok=True)
        (tmp / "scratch").mkdir(exist_ok=True)

    def start_dispatcher(self) -> None:
        env = self.sim.env()
        env.update(CRUNCH_RUN_LOCK_DIR=str(self.tmp / "locks"), TMPDIR=str(self.tmp / "scratch"))
        env.pop("ARVADOS_SERVICE_INTERNAL_URL", None)
        argv = [shutil.which("crunchgate") or sys.executable, "dispatch-lsf", "--config",
                str(self.ctl.config_path)]
        if not shutil.which("crunchgate"):
            argv[1:1] = ["-m", "dispatcher.cli"]
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=logf, env=env,
                                         start_new_session=True)

    def kill_dispatcher(self, sig: int = signal.SIGKILL) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def stop(self) -> None:
        self.kill_dispatcher(signal.SIGTERM)
        self.sim.kill_all()
        self.ctl.stop()

    def submit(self, command: list[str], **extra: Any) -> str:
        body: dict[str, Any] = {
            "name": "lsf-workload", "command": command, "container_image": "debian:12",
            "cwd": "/tmp", "output_path": "/out",
            "mounts": {"/out": {"kind": "tmp", "capacity": 1 << 20}},
            "runtime_constraints": {"vcpus": 1, "ram": 64 << 20},
            "state": "Committed", "priority": 1,
        }
        body.update(extra)
        cr = self.api.container_requests().create(body={"container_request": body}).execute()
        return str(cr["container_uuid"])

    def containers(self, uuids: list[str]) -> dict[str, dict[str, Any]]:
        items = self.api.containers().list(filters=[["uuid", "in", uuids]],
                                           limit=len(uuids)).execute()["items"]
        return {c["uuid"]: c for c in items}

    def log_text(self, uuid: str, event_type: str) -> str:
        items = self.api.logs().list(filters=[["object_uuid", "=", uuid],
                                              ["event_type", "=", event_type]],
                                     order=["id asc"], limit=1000).execute()["items"]
        return "".join((i.get("properties") or {}).get("text", "") for i in items)

    def dispatcher_log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture
def stack(tmp_path: Path, lsf_sim_factory) -> Iterator[Stack]:  # type: ignore[no-untyped-def]
    s = Stack(tmp_path, lsf_sim_factory(hosts=HOSTS))
    try:
        yield s
    finally:
        s.stop()


HOSTILE_ARGS = ["it's", '"double"', "$(echo pwned)", "`echo pwned`", "a\nb", "--help", "-J",
                "; exit 99", "%J %U %%", "\\", "ünï☃"]


def test_thirty_containers_complete_with_exit_codes_and_logs(stack: Stack) -> None:
    uuids: dict[str, int] = {}
    for i in range(26):
        uuids[stack.submit(["sh", "-c", f"echo stdout-{i}; echo stderr-{i} >&2; exit {i % 3}"])] = i
    gpu = [stack.submit(["sh", "-c", f"echo gpu {i}"], runtime_constraints={
        "vcpus": 1, "ram": 64 << 20,
        "gpu": {"stack": "cuda", "device_count": 1, "driver_version": "11.0",
                "hardware_target": ["8.0"], "vram": 0}}) for i in range(2)]
    hostile = stack.submit(["printf", "[%s]", *HOSTILE_ARGS])
    hostile_env = stack.submit(["sh", "-c", 'printf "%s" "$HOSTILE"'],
                               environment={"HOSTILE": "$(echo pwned)'\"`x`\n-J evil"})
    everything = [*uuids, *gpu, hostile, hostile_env]
    assert len(set(everything)) == 30  # distinct commands: no container reuse
    stack.start_dispatcher()

    def all_final() -> bool:
        return all(c["state"] in ("Complete", "Cancelled")
                   for c in stack.containers(everything).values())

    def states() -> list[tuple[str, str, Any]]:
        return [(u, c["state"], c["exit_code"]) for u, c in stack.containers(everything).items()
                if c["state"] not in ("Complete", "Cancelled")]

    wait_for(all_final, 150, "30 containers to finish", states)
    ctrs = stack.containers(everything)
    for uuid, i in uuids.items():
        assert (ctrs[uuid]["state"], ctrs[uuid]["exit_code"]) == ("Complete", i % 3), uuid
    for uuid in [*gpu, hostile, hostile_env]:
        assert (ctrs[uuid]["state"], ctrs[uuid]["exit_code"]) == ("Complete", 0), uuid
    # Logs: a few samples (each is one API query).
    for uuid, i in list(uuids.items())[:3]:
        wait_for(lambda u=uuid, i=i: f"stdout-{i}" in stack.log_text(u, "stdout"), 20, "stdout log")
        wait_for(lambda u=uuid, i=i: f"stderr-{i}" in stack.log_text(u, "stderr"), 20, "stderr log")
    # Hostile fields ran literally: no expansion, no option injection.
    want = "".join(f"[{a}]" for a in HOSTILE_ARGS)
    wait_for(lambda: want in stack.log_text(hostile, "stdout"), 20, "hostile stdout")
    wait_for(lambda: "$(echo pwned)'\"`x`\n-J evil" in stack.log_text(hostile_env, "stdout"),
             20, "hostile env stdout")
    # One job per container; GPU containers (only those) got the GPU arguments.
    calls = stack.sim.calls("bsub")
    assert sorted(c["argv"][c["argv"].index("-J") + 1] for c in calls) == sorted(everything)
    for c in calls:
        name = c["argv"][c["argv"].index("-J") + 1]
        assert (c["argv"][-2:] == ["-gpu", "num=1"]) is (name in gpu), c["argv"]
    assert all(c["argv"][:4] == ["-o", f"{stack.tmp}/crunch-run.%J.out", "-e",
                                 f"{stack.tmp}/crunch-run.%J.err"] for c in calls)
    # The dispatcher never logged a secret or the job script.
    log = stack.dispatcher_log()
    assert "Submitting container" in log
    assert stack.ctl.root_token not in log and "GatewayAuthSecret" not in log
    for uuid in everything:
        assert gateway_auth_secret(stack.ctl.root_token, uuid) not in log


def test_kill_9_mid_burst_and_restart(stack: Stack) -> None:
    uuids = [stack.submit(["sh", "-c", f"sleep 0.5; echo {i}"]) for i in range(16)]
    stack.start_dispatcher()
    wait_for(lambda: len(stack.sim.calls("bsub")) >= 3, 60, "the burst to start")
    stack.kill_dispatcher(signal.SIGKILL)
    killed_after = len(stack.sim.calls("bsub"))
    assert killed_after < len(uuids), "the burst finished before the kill; nothing tested"
    stack.start_dispatcher()
    wait_for(lambda: all(c["state"] == "Complete" for c in stack.containers(uuids).values()),
             120, "all containers to complete after the restart")
    # Each container got exactly one LSF job: the restarted dispatcher found the jobs its
    # predecessor had submitted (by name) instead of submitting them again.
    names = [j["name"] for j in stack.sim.jobs()]
    assert sorted(names) == sorted(uuids)
    assert all(c["exit_code"] == 0 for c in stack.containers(uuids).values())


def test_bjobs_outage_cancels_nothing(tmp_path: Path, lsf_sim_factory) -> None:  # type: ignore[no-untyped-def]
    # bjobs first fails, then hangs past the command timeout, while the containers run and
    # finish: nothing is cancelled, unlocked, killed or submitted twice.
    s = Stack(tmp_path, lsf_sim_factory(hosts=HOSTS), crunchgate={"CommandTimeout": "2s"})
    try:
        uuids = [s.submit(["sh", "-c", f"sleep 2; echo {i}"]) for i in range(4)]
        s.start_dispatcher()
        wait_for(lambda: len([j for j in s.sim.jobs() if j["stat"] == "RUN"]) == 4, 60,
                 "4 running jobs")
        s.sim.inject("bjobs", "fail", message="LSF is down. Please wait ...", count=3)
        wait_for(lambda: not (s.sim.state_dir / "faults" / "bjobs.json").exists(), 60,
                 "3 failed bjobs")
        s.sim.inject("bjobs", "hang", seconds=30, count=2)
        wait_for(lambda: not (s.sim.state_dir / "faults" / "bjobs.json").exists(), 60,
                 "2 hung bjobs")
        wait_for(lambda: all(c["state"] == "Complete" for c in s.containers(uuids).values()),
                 90, "containers to complete")
        assert all(c["exit_code"] == 0 for c in s.containers(uuids).values())
        assert sorted(j["name"] for j in s.sim.jobs()) == sorted(uuids)
        assert all(j["stat"] == "DONE" for j in s.sim.jobs())  # none killed
        assert "timed out" in s.dispatcher_log() or "no answer within" in s.dispatcher_log()
    finally:
        s.stop()


def test_health_and_metrics_endpoint(stack: Stack) -> None:
    import json
    import urllib.request

    stack.start_dispatcher()
    url = f"http://127.0.0.1:{stack.dispatch_port}"
    req = urllib.request.Request(f"{url}/_health/ping", headers={
        "Authorization": f"Bearer {stack.ctl.management_token}"})

    def ping() -> Any:
        try:
            with urllib.request.urlopen(req, timeout=2) as resp:
                return json.loads(resp.read())
        except OSError:
            return None

    assert wait_for(ping, 30, "health endpoint") == {"health": "OK"}
    req = urllib.request.Request(f"{url}/metrics", headers={
        "Authorization": f"Bearer {stack.ctl.management_token}"})
    wait_for(lambda: stack.sim.calls("bjobs"), 30, "a bjobs poll")
    with urllib.request.urlopen(req, timeout=5) as resp:
        text = resp.read().decode()
    assert 'crunchgate_lsf_commands_total{command="bjobs"}' in text
    assert os.environ.get("LSFSIM_STATE") is None  # the test process itself is untouched
