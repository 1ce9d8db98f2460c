"""crunch-run as a real subprocess, with the environment a job script gives it.

The API side is the fake API server (tests/helpers/fakeapi.py), which implements the state
transition table; tests/integration/test_crunchrun_controller.py runs the main path against the
embedded controller.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.fakeapi import FAKEAPI_TOKEN_UUID, RUNTIME_TOKEN, FakeApi
from tests.helpers.procs import alive

SECRET = "gatewaysecret" + "0123456789abcdef" * 3
UUID = "zzzzz-dz642-crunchruntest01"


def wait_for(cond: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class CrunchRun:
    """Starts crunch-run subprocesses and kills leftovers (by PID) at teardown."""

    def __init__(self, api: FakeApi, tmp: Path) -> None:
        self.api = api
        self.lock_dir = tmp / "locks"
        self.scratch = tmp / "scratch"
        self.lock_dir.mkdir()
        self.scratch.mkdir()
        self.procs: list[subprocess.Popen[str]] = []

    def env(self) -> dict[str, str]:
        return {
            "PATH": os.environ["PATH"],
            "ARVADOS_API_HOST": self.api.url,
            "ARVADOS_API_TOKEN": self.api.token,
            "ARVADOS_API_HOST_INSECURE": "1",
            "GatewayAuthSecret": SECRET,
            "CRUNCH_RUN_LOCK_DIR": str(self.lock_dir),
            "TMPDIR": str(self.scratch),
        }

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "dispatcher.crunchrun.main", "-runtime-engine=local",
                "--poll-interval=0.2", "--kill-grace=3", "--log-flush-interval=0.2", *args]

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        p = subprocess.Popen(self.argv(*args), env={**self.env(), **(env or {})},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        return p

    def run(self, *args: str, timeout: float = 60, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
        p = self.start(*args, env=env)
        out, err = p.communicate(timeout=timeout)
        return subprocess.CompletedProcess(p.args, p.returncode, out, err)

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for lock in self.lock_dir.glob("crunch-run-*.lock"):
            try:
                pid = json.loads(lock.read_text() or "{}").get("PID")
            except ValueError:
                continue
            if pid:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


@pytest.fixture
def cr(fakeapi: FakeApi, tmp_path: Path) -> Iterator[CrunchRun]:
    runner = CrunchRun(fakeapi, tmp_path)
    try:
        yield runner
    finally:
        runner.cleanup()


def locked(api: FakeApi, command: list[str], **attrs: Any) -> str:
    uuid = attrs.pop("uuid", UUID)
    api.add_container(uuid, state="Locked", locked_by_uuid=FAKEAPI_TOKEN_UUID, lock_count=1,
                      command=command, **attrs)
    return uuid


def state_updates(api: FakeApi, uuid: str) -> list[dict[str, Any]]:
    return [json.loads(r.form["container"])
            for r in api.matching("PUT", f"/arvados/v1/containers/{uuid}")]


def test_runs_to_complete_with_logs(cr: CrunchRun) -> None:
    api = cr.api
    uuid = locked(api, ["sh", "-c", 'echo "hello $GREETING"; echo oops >&2; pwd'],
                  environment={"GREETING": "world"})
    res = cr.run(uuid)
    assert res.returncode == 0, res.stderr
    ctr = api.container(uuid)
    assert ctr["state"] == "Complete" and ctr["exit_code"] == 0
    assert state_updates(api, uuid) == [{"state": "Running"},
                                        {"state": "Complete", "exit_code": 0}]
    out = api.log_text(uuid, "stdout").splitlines()
    assert out[0] == "hello world"
    assert out[1].startswith(str(cr.scratch))  # local runtime: cwd in scratch
    assert api.log_text(uuid, "stderr") == "oops\n"
    assert "exited with exit code 0" in api.log_text(uuid, "crunch-run")
    # Batched: a handful of log records, not one per line.
    assert len(api.logs) <= 6
    # Scratch removed afterwards.
    assert list(cr.scratch.glob("crunch-run-*")) == []


def test_nonzero_exit_is_recorded(cr: CrunchRun) -> None:
    uuid = locked(cr.api, ["sh", "-c", "exit 7"])
    assert cr.run(uuid).returncode == 0
    ctr = cr.api.container(uuid)
    assert (ctr["state"], ctr["exit_code"]) == ("Complete", 7)


def test_command_not_found_is_exit_127(cr: CrunchRun) -> None:
    uuid = locked(cr.api, ["/nonexistent/program"])
    assert cr.run(uuid).returncode == 0
    ctr = cr.api.container(uuid)
    assert (ctr["state"], ctr["exit_code"]) == ("Complete", 127)
    assert "cannot start" in cr.api.log_text(uuid, "stderr")


def test_big_output_tail_is_not_lost(cr: CrunchRun) -> None:
    uuid = locked(cr.api, [sys.executable, "-c",
                           "import sys\nfor i in range(20000): print(i)\n"
                           "sys.stdout.write('the end')"])
    assert cr.run(uuid).returncode == 0
    text = cr.api.log_text(uuid, "stdout")
    assert text == "".join(f"{i}\n" for i in range(20000)) + "the end"
    assert len(cr.api.logs) < 40


def test_secret_and_tokens_not_visible_to_container_or_logs(cr: CrunchRun) -> None:
    uuid = locked(cr.api, ["env"], runtime_constraints={"vcpus": 1, "ram": 1 << 20, "API": True})
    res = cr.run(uuid)
    assert res.returncode == 0
    env_out = cr.api.log_text(uuid, "stdout")
    assert "GatewayAuthSecret" not in env_out and SECRET not in env_out
    assert cr.api.token not in env_out  # the dispatcher's token stays with crunch-run
    # The container gets its own runtime token (API: true), redacted from stored logs.
    assert "ARVADOS_API_TOKEN=[REDACTED]" in env_out
    assert RUNTIME_TOKEN not in env_out
    everything = res.stdout + res.stderr + json.dumps(cr.api.logs)
    assert SECRET not in everything
    assert cr.api.token.rsplit("/", 1)[1] not in everything


def test_refuses_container_not_locked(cr: CrunchRun) -> None:
    cr.api.add_container(UUID, state="Queued", command=["true"])
    res = cr.run(UUID)
    assert res.returncode == 1
    assert f"dispatch error detected: container {UUID} has state Queued" in res.stderr
    assert cr.api.container(UUID)["state"] == "Queued"
    assert state_updates(cr.api, UUID) == []


def test_failure_before_running_requeues(cr: CrunchRun) -> None:
    uuid = locked(cr.api, ["true"])
    cr.api.script("PUT", f"/arvados/v1/containers/{uuid}",
                  [(422, {"errors": ["cannot change from Locked to Running"]}, {})])
    res = cr.run(uuid)
    assert res.returncode == 1
    ctr = cr.api.container(uuid)
    assert ctr["state"] == "Queued" and ctr["locked_by_uuid"] is None
    assert "failed before the container started" in cr.api.log_text(uuid, "crunch-run")


def test_unrunnable_image_is_cancelled_with_error(cr: CrunchRun) -> None:
    uuid = locked(cr.api, ["true"], container_image="d41d8cd98f00b204e9800998ecf8427e+0")
    res = cr.run("--runtime-engine=docker", uuid)
    assert res.returncode == 1
    ctr = cr.api.container(uuid)
    assert ctr["state"] == "Cancelled"
    assert "portable data hash" in ctr["runtime_status"]["error"]


def test_max_run_time_cancels(cr: CrunchRun) -> None:
    uuid = locked(cr.api, ["sleep", "300"], scheduling_parameters={"max_run_time": 1})
    assert cr.run(uuid).returncode == 0
    ctr = cr.api.container(uuid)
    assert ctr["state"] == "Cancelled"
    assert ctr["runtime_status"] == {"error": "max_run_time exceeded"}
    assert "max_run_time exceeded" in cr.api.log_text(uuid, "crunch-run")


def test_sigterm_cancels(cr: CrunchRun) -> None:
    uuid = locked(cr.api, ["sh", "-c", "echo started; exec sleep 300"])
    p = cr.start(uuid)
    wait_for(lambda: "started" in cr.api.log_text(uuid, "stdout"), what="container output")
    p.send_signal(signal.SIGTERM)
    assert p.wait(30) == 0
    ctr = cr.api.container(uuid)
    assert ctr["state"] == "Cancelled"
    assert ctr["runtime_status"] == {"error": "crunch-run received SIGTERM"}


def test_sigkill_after_grace_for_stubborn_process(cr: CrunchRun) -> None:
    script = "trap '' TERM; echo ready; while :; do sleep 0.1; done"
    uuid = locked(cr.api, ["sh", "-c", script], scheduling_parameters={"max_run_time": 1})
    assert cr.run("--kill-grace=0.5", uuid).returncode == 0
    assert cr.api.container(uuid)["state"] == "Cancelled"
    assert "sending SIGKILL" in cr.api.log_text(uuid, "crunch-run")


def test_priority_zero_cancels(cr: CrunchRun) -> None:
    uuid = locked(cr.api, ["sh", "-c", "echo started; exec sleep 300"])
    p = cr.start(uuid)
    wait_for(lambda: "started" in cr.api.log_text(uuid, "stdout"), what="container output")
    cr.api.set_container(uuid, priority=0)
    assert p.wait(30) == 0
    ctr = cr.api.container(uuid)
    assert ctr["state"] == "Cancelled" and ctr["runtime_status"] == {}


def test_cancelled_elsewhere_stops_process(cr: CrunchRun) -> None:
    uuid = locked(cr.api, ["sh", "-c", "echo started; exec sleep 300"])
    p = cr.start(uuid)
    wait_for(lambda: "started" in cr.api.log_text(uuid, "stdout"), what="container output")
    cr.api.set_container(uuid, state="Cancelled")
    assert p.wait(30) == 0
    assert [u for u in state_updates(cr.api, uuid) if u.get("state") != "Running"] == []


def test_detach_list_kill(cr: CrunchRun) -> None:
    uuid = locked(cr.api, ["sh", "-c", "echo started; exec sleep 300"])
    res = cr.run("-detach", uuid)
    assert res.returncode == 0, res.stderr
    lock = cr.lock_dir / f"crunch-run-{uuid}.lock"
    owner = wait_for(lambda: lock.exists() and lock.read_text() and json.loads(lock.read_text()),
                     what="lock file")
    # Like Arvados' crunch-run: the process info on stdout, the same as in the lock file.
    assert json.loads(res.stdout) == owner == {"UUID": uuid, "PID": owner["PID"]}
    wait_for(lambda: "started" in cr.api.log_text(uuid, "stdout"), what="container output")
    assert cr.api.container(uuid)["state"] == "Running"
    # Exclusive while it runs.
    again = cr.run("-detach", uuid)
    assert again.returncode == 1 and "already running" in again.stderr
    assert cr.run("-list").stdout.splitlines() == [uuid]
    # --kill 15 until it reports the process gone (it waits up to 1 s per call).
    wait_for(lambda: cr.run("-kill", "15", uuid).returncode == 0, what="kill to succeed")
    wait_for(lambda: not alive(owner["PID"]), what="crunch-run process to exit")
    assert cr.api.container(uuid)["state"] == "Cancelled"
    assert cr.run("-list").stdout == ""
    assert not lock.exists()


def test_detach_with_stdin_config_like_dispatch_cloud(cr: CrunchRun) -> None:
    """arvados-dispatch-cloud's way: credentials and secret as JSON on stdin, not in env."""
    uuid = locked(cr.api, ["sh", "-c", "grep SigIgn /proc/$$/status; env; echo done"])
    env = {k: v for k, v in cr.env().items() if not k.startswith(("ARVADOS_", "Gateway"))}
    config = {"Env": {"ARVADOS_API_HOST": cr.api.url, "ARVADOS_API_TOKEN": cr.api.token,
                      "ARVADOS_API_HOST_INSECURE": "1", "GatewayAuthSecret": SECRET,
                      "InstanceType": {"Name": "small"}},
              "KeepBuffers": 0, "EC2SpotCheck": False, "Cluster": None}
    res = subprocess.run(cr.argv("-detach", "-stdin-config", uuid), env=env, text=True,
                         input=json.dumps(config), capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr
    wait_for(lambda: cr.api.container(uuid)["state"] == "Complete", what="Complete")
    out = cr.api.log_text(uuid, "stdout")
    assert out.endswith("done\n")
    assert SECRET not in out and cr.api.token not in out
    assert "InstanceType" not in out  # crunch-run's own environment is not the container's
    # The --list probe signal is not left ignored for the container's processes.
    ignored = int(out.split("SigIgn:", 1)[1].split()[0], 16)
    assert not ignored & (1 << (signal.SIGUSR2 - 1))
    log_file = cr.scratch / f"crunch-run-{uuid}.log"
    assert log_file.exists() and SECRET not in log_file.read_text()


FAKE_DOCKER = r"""#!PYTHON
# A stand-in for the docker CLI: "run" execs the command after the image with the --env
# variables; "kill" signals that process; "inspect" prints an IP. State lives in $DOCKER_CONFIG.
import json, os, signal, sys
state = os.environ["DOCKER_CONFIG"]
args = sys.argv[1:]
with open(os.path.join(state, "calls"), "a") as f:
    f.write(json.dumps(args) + "\n")
if args[0] == "run":
    i, env, name = 1, {}, ""
    while args[i].startswith("-"):
        a = args[i]
        if a.startswith("--env="):
            k, eq, v = a[6:].partition("=")
            env[k] = v if eq else os.environ[k]
        elif a.startswith("--name="):
            name = a[7:]
        i += 1
    with open(os.path.join(state, name + ".pid"), "w") as f:
        f.write(str(os.getpid()))
    env.update(PATH=os.environ["PATH"], FAKE_IMAGE=args[i])
    os.execvpe(args[i + 1], args[i + 1:], env)
elif args[0] == "kill":
    sig = getattr(signal, args[1].split("=", 1)[1])
    with open(os.path.join(state, args[2] + ".pid")) as f:
        os.kill(int(f.read()), sig)
elif args[0] == "inspect":
    print("127.0.0.1")
"""


def test_docker_runtime_through_a_fake_docker_cli(cr: CrunchRun, tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    state = tmp_path / "docker-state"
    bindir.mkdir()
    state.mkdir()
    docker = bindir / "docker"
    docker.write_text(FAKE_DOCKER.replace("PYTHON", sys.executable))
    docker.chmod(0o755)
    uuid = locked(cr.api, ["sh", "-c", "echo img=$FAKE_IMAGE tmp=$TMPDIR; env; exec sleep 300"],
                  container_image="debian:12", cwd="/inside",
                  runtime_constraints={"vcpus": 2, "ram": 1 << 30, "API": True})
    p = cr.start("--runtime-engine=docker", uuid,
                 env={"PATH": f"{bindir}:{os.environ['PATH']}", "DOCKER_CONFIG": str(state)})
    wait_for(lambda: "img=" in cr.api.log_text(uuid, "stdout"), what="container output")
    p.send_signal(signal.SIGTERM)
    assert p.wait(30) == 0
    assert cr.api.container(uuid)["state"] == "Cancelled"
    out = cr.api.log_text(uuid, "stdout")
    assert out.startswith("img=debian:12 tmp=/tmp\n")
    assert "ARVADOS_API_TOKEN=[REDACTED]" in out  # runtime token reached the container
    assert SECRET not in out and "GatewayAuthSecret" not in out
    calls = [json.loads(line) for line in (state / "calls").read_text().splitlines()]
    run_call = next(c for c in calls if c[0] == "run")
    assert f"--name={uuid}" in run_call and "--workdir=/inside" in run_call
    assert "--cpus=2" in run_call and f"--memory={1 << 30}" in run_call
    assert "--env=ARVADOS_API_TOKEN" in run_call  # name only: the value is not in ps output
    assert not any(RUNTIME_TOKEN in a for a in run_call)
    assert ["kill", "--signal=SIGTERM", uuid] in calls


FAKE_SINGULARITY = r"""#!PYTHON
# A stand-in for "singularity exec": the container is the command in a new mount namespace
# (unshare), with the environment built from SINGULARITYENV_* as singularity does.
import json, os, sys
args = sys.argv[1:]
with open(os.path.join(os.environ["SINGULARITY_CACHEDIR"], "calls"), "a") as f:
    f.write(json.dumps(args) + "\n")
assert args[0] == "exec"
i = 1
while args[i].startswith("--"):
    i += 1
env = {k[len("SINGULARITYENV_"):]: v for k, v in os.environ.items()
       if k.startswith("SINGULARITYENV_")}
env.update(PATH=os.environ["PATH"], FAKE_IMAGE=args[i])
os.execvpe("unshare", ["unshare", "--mount", "--fork", *args[i + 1:]], env)
"""


def test_singularity_runtime_through_a_fake_cli(cr: CrunchRun, tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    state = tmp_path / "sing-state"
    bindir.mkdir()
    state.mkdir()
    fake = bindir / "singularity"
    fake.write_text(FAKE_SINGULARITY.replace("PYTHON", sys.executable))
    fake.chmod(0o755)
    uuid = locked(cr.api, ["sh", "-c", 'echo "img=$FAKE_IMAGE v=$V tmp=$TMPDIR"'],
                  container_image="debian:12", cwd="/inside", environment={"V": "a,b c=d"})
    res = cr.run("--runtime-engine=singularity", uuid, env={
        "PATH": f"{bindir}:{os.environ['PATH']}", "SINGULARITY_CACHEDIR": str(state)})
    assert res.returncode == 0, res.stderr
    ctr = cr.api.container(uuid)
    assert (ctr["state"], ctr["exit_code"]) == ("Complete", 0)
    assert cr.api.log_text(uuid, "stdout") == "img=docker://debian:12 v=a,b c=d tmp=/tmp\n"
    (call,) = [json.loads(line) for line in (state / "calls").read_text().splitlines()]
    assert call[:4] == ["exec", "--containall", "--cleanenv", "--pwd=/inside"]
    assert not any("a,b" in a for a in call)  # values travel in SINGULARITYENV_*


def test_nsenter_into_a_namespaced_process() -> None:
    """What the gateway runs for singularity: find the contained process, nsenter into it."""
    from dispatcher.crunchrun.runtimes import find_namespaced_descendant, nsenter_argv

    p = subprocess.Popen(["unshare", "--mount", "--fork", "sleep", "300"])
    try:
        target = wait_for(lambda: find_namespaced_descendant(p.pid), what="namespaced child")
        inner_ns = os.readlink(f"/proc/{target}/ns/mnt")
        assert inner_ns != os.readlink("/proc/self/ns/mnt")
        out = subprocess.run(nsenter_argv(target, ["readlink", "/proc/self/ns/mnt"]),
                             capture_output=True, text=True, timeout=30, check=True)
        assert out.stdout.strip() == inner_ns
    finally:
        p.kill()
        p.wait()
