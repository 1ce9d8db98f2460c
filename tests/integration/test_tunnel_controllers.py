"""The whole path with real processes: two embedded controllers (C1, C2) sharing one database,
a real ``crunch-run`` (local runtime) whose tunnel lands on C2, and OpenSSH talking to C1.

C1 finds ``gateway_address = "tunnel <C2>"`` and forwards the shell to C2 once
(``no_forward=true``); C2 re-checks the user's token and opens a stream on its tunnel.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tunnel.client.shell import run_command, ssh_argv

ROOT = "tunnelc1c2roottoken0123456789abcdefghijklmnopqrstu"
MGMT = "tunnelc1c2management0123456789abcdefghij"

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def crunchgate() -> list[str]:
    return [sys.executable, "-m", "dispatcher.cli"]


@dataclass
class Cluster:
    workdir: Path
    config: Path
    data: Path
    urls: list[str]
    procs: list[subprocess.Popen[bytes]]

    def host(self, i: int) -> str:
        return self.urls[i].removeprefix("https://").rstrip("/")

    def env(self, i: int, token: str) -> dict[str, str]:
        e = dict(os.environ)
        e.update({"ARVADOS_API_HOST": self.host(i), "ARVADOS_API_TOKEN": token,
                  "ARVADOS_API_HOST_INSECURE": "1"})
        e.pop("ARVADOS_API_CA_FILE", None)
        return e

    def api(self, method: str, path: str, token: str = ROOT, body: Any = None) -> Any:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.urls[0]}arvados/v1/{path}", data=data,
                                     method=method, headers={
                                         "Authorization": f"Bearer {token}",
                                         "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=20) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{method} {path}: {exc.code} {exc.read()[:500]!r}") from None

    def log(self, i: int) -> str:
        return (self.workdir / f"c{i + 1}.log").read_text(errors="replace")

    def add_user(self, name: str) -> str:
        """A new user's API token (``crunchgate controller add-user``)."""
        return subprocess.run(
            [*crunchgate(), "controller", "add-user", name, "--config", str(self.config),
             "--data", str(self.data)], capture_output=True, text=True, timeout=60, check=True
        ).stdout.strip()

    def start_crunch_run(self, uuid: str, tmp_path: Path) -> subprocess.Popen[bytes]:
        """crunch-run for the Locked container ``uuid``, talking to C2 so that its tunnel
        terminates there; returns once the container is Running with that tunnel. Its log is
        ``tmp_path / "crunch-run.log"``; the caller stops it."""
        secret = hmac.new(ROOT.encode(), uuid.encode(), hashlib.sha256).hexdigest()
        env = {"PATH": os.environ["PATH"], **self.env(1, ROOT), "GatewayAuthSecret": secret,
               "TMPDIR": str(tmp_path), "CRUNCH_RUN_LOCK_DIR": str(tmp_path)}
        crun_log = tmp_path / "crunch-run.log"
        with open(crun_log, "wb") as errf:
            crun = subprocess.Popen([sys.executable, "-m", "dispatcher.crunchrun.main",
                                     "--runtime-engine=local", "--poll-interval=0.3", uuid],
                                    env=env, stdout=subprocess.DEVNULL, stderr=errf,
                                    start_new_session=True)
        try:
            want = f"tunnel {self.urls[1]}"
            deadline = time.monotonic() + 30
            while True:
                ctr = self.api("GET", f"containers/{uuid}")
                if ctr["state"] == "Running" and ctr.get("gateway_address") == want:
                    return crun
                assert crun.poll() is None, crun_log.read_text()[-3000:]
                assert time.monotonic() < deadline, \
                    f"no tunnel on C2: {ctr.get('gateway_address')}"
                time.sleep(0.2)
        except BaseException:
            if crun.poll() is None:
                os.killpg(crun.pid, signal.SIGKILL)
                crun.wait(10)
            raise


def start_controller(cl: Cluster, i: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["ARVADOS_SERVICE_INTERNAL_URL"] = cl.urls[i]
    with open(cl.workdir / f"c{i + 1}.log", "ab") as logf:
        proc = subprocess.Popen([*crunchgate(), "controller", "--config", str(cl.config),
                                 "--data", str(cl.data)], env=env, stdout=subprocess.DEVNULL,
                                stderr=logf, start_new_session=True)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, cl.log(i)[-3000:]
        try:
            req = urllib.request.Request(f"{cl.urls[i]}_health/ping",
                                         headers={"Authorization": f"Bearer {MGMT}"})
            with urllib.request.urlopen(req, context=ctx, timeout=2) as r:
                if json.loads(r.read()).get("health") == "OK":
                    return proc
        except OSError:
            pass
        assert time.monotonic() < deadline, "controller did not start"
        time.sleep(0.1)


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    urls = [f"https://127.0.0.1:{free_port()}/", f"https://127.0.0.1:{free_port()}/"]
    cfg = {"Clusters": {"zzzzz": {
        "SystemRootToken": ROOT, "ManagementToken": MGMT,
        "Services": {"Controller": {"ExternalURL": urls[0],
                                    "InternalURLs": {u: {} for u in urls}}},
        "TLS": {"Insecure": True},
        "Containers": {"ShellAccess": {"Admin": True, "User": True}},
    }}}
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump(cfg))
    cl = Cluster(tmp_path, config, tmp_path / "data", urls, [])
    try:
        for i in range(2):
            cl.procs.append(start_controller(cl, i))
        yield cl
    finally:
        for p in cl.procs:
            stop(p)


def test_shell_via_c1_to_a_tunnel_on_c2(cluster: Cluster, tmp_path: Path) -> None:
    user_token = cluster.add_user("alice")
    cr = cluster.api("POST", "container_requests", user_token, {"container_request": {
        "command": ["sleep", "120"], "container_image": "debian:12", "output_path": "/out",
        "cwd": "/tmp",
        "runtime_constraints": {"vcpus": 1, "ram": 64 << 20}, "state": "Committed",
        "priority": 1, "environment": {"MARKER": "in-the-container"}}})
    uuid = cr["container_uuid"]
    cluster.api("POST", f"containers/{uuid}/lock")

    # crunch-run talks to C2, so its tunnel terminates there.
    secret = hmac.new(ROOT.encode(), uuid.encode(), hashlib.sha256).hexdigest()
    crun = cluster.start_crunch_run(uuid, tmp_path)
    try:
        ctr = cluster.api("GET", f"containers/{uuid}")
        assert not ctr.get("interactive_session_started")

        # OpenSSH -> connect-ssh -> C1 -> C2 -> tunnel -> crunch-run's gateway.
        res = subprocess.run(ssh_argv(f"root@{uuid}", ["printenv", "MARKER"]),
                             env=cluster.env(0, user_token), capture_output=True, timeout=30)
        assert res.returncode == 0, res.stderr
        assert res.stdout == b"in-the-container\n"
        assert "shell forwarded" in cluster.log(0)

        res = subprocess.run(ssh_argv(f"root@{uuid}", ["-tt"]), env=cluster.env(0, user_token),
                             input=b"tty >/dev/null && echo pty-ok; exit 7\n",
                             capture_output=True, timeout=30)
        assert b"pty-ok" in res.stdout and res.returncode == 7

        # The demo hook, against C1 as well.
        code, out = run_command(cluster.host(0), user_token, uuid, ["echo", "hi"],
                                insecure=True)
        assert (code, out) == (0, "hi\n")
        assert cluster.api("GET", f"containers/{uuid}")["interactive_session_started"] is True

        # Another user is refused by both hops' rules.
        other = cluster.add_user("mallory")
        res = subprocess.run([*crunchgate(), "connect-ssh", "--probe-only", uuid],
                             env=cluster.env(0, other), capture_output=True, text=True,
                             timeout=30)
        assert res.returncode == 1 and "not found" in res.stderr
    finally:
        with_cancel = crun.poll() is None
        if with_cancel:
            os.killpg(crun.pid, signal.SIGTERM)
            try:
                crun.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(crun.pid, signal.SIGKILL)
                crun.wait(10)
    for i in range(2):
        assert ROOT not in cluster.log(i) and user_token.rsplit("/", 1)[-1] not in cluster.log(i)
        assert secret not in cluster.log(i)
