"""The API client and crunch-run against the real embedded controller (HTTPS subprocess)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from dispatcher.arvados.client import ApiUnavailable, ArvadosClient, NotFound, Unprocessable
from tests.helpers.controller import ControllerProcess

T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


def client(ctl: ControllerProcess, token: str | None = None, **kw: Any) -> ArvadosClient:
    kw.setdefault("ca_file", str(ctl.ca_file))
    kw.setdefault("retry_min_s", 0.01)
    return ArvadosClient(ctl.host, token or ctl.root_token, **kw)


def wait_for(cond: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def user_token(controller_session: ControllerProcess) -> str:
    return controller_session.add_user("crunchrun-user")


def new_locked_container(ctl: ControllerProcess, user_token: str, command: list[str],
                         **extra: Any) -> str:
    body = {"command": command, "container_image": "debian:12", "output_path": "/out",
            "cwd": "/nonexistent-cwd", "runtime_constraints": {"vcpus": 1, "ram": 64 << 20},
            "state": "Committed", "priority": 1, "use_existing": False, **extra}
    # Identical requests would share one container (reuse): make each one distinct.
    body["environment"] = {**body.get("environment", {}), "TEST_NONCE": os.urandom(8).hex()}

    async def go() -> str:
        async with client(ctl, user_token) as user, client(ctl) as root:
            cr = await user.create("container_requests", body)
            uuid = str(cr["container_uuid"])
            locked = await root.lock(uuid)
            assert locked["state"] == "Locked"
            return uuid

    return run(go())


def get_container(ctl: ControllerProcess, uuid: str) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        async with client(ctl) as c:
            return await c.get("containers", uuid)

    return run(go())


def log_text(ctl: ControllerProcess, uuid: str, event_type: str) -> str:
    async def go() -> list[dict[str, Any]]:
        async with client(ctl) as c:
            return await c.list_all("logs", filters=[["object_uuid", "=", uuid],
                                                     ["event_type", "=", event_type]],
                                    order=["id asc"], page_size=50)

    return "".join((r.get("properties") or {}).get("text", "") for r in run(go()))


class Runs:
    def __init__(self, ctl: ControllerProcess, tmp: Path) -> None:
        self.ctl = ctl
        self.tmp = tmp
        self.procs: list[subprocess.Popen[str]] = []

    def env(self, uuid: str) -> dict[str, str]:
        secret = hmac.new(self.ctl.root_token.encode(), uuid.encode(), hashlib.sha256).hexdigest()
        return {"PATH": os.environ["PATH"], **self.ctl.env(), "GatewayAuthSecret": secret,
                "TMPDIR": str(self.tmp), "CRUNCH_RUN_LOCK_DIR": str(self.tmp)}

    def start(self, uuid: str, *args: str) -> subprocess.Popen[str]:
        argv = [sys.executable, "-m", "dispatcher.crunchrun.main", "--runtime-engine=local",
                "--poll-interval=0.3", "--kill-grace=3", "--log-flush-interval=0.2", *args, uuid]
        p = subprocess.Popen(argv, env=self.env(uuid), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        return p

    def run(self, uuid: str, *args: str) -> subprocess.CompletedProcess[str]:
        p = self.start(uuid, *args)
        out, err = p.communicate(timeout=90)
        return subprocess.CompletedProcess(p.args, p.returncode, out, err)


@pytest.fixture
def runs(controller_session: ControllerProcess, tmp_path: Path) -> Iterator[Runs]:
    r = Runs(controller_session, tmp_path)
    try:
        yield r
    finally:
        for p in r.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_client_tls_paging_lock_errors(controller_session: ControllerProcess,
                                       user_token: str) -> None:
    ctl = controller_session
    uuids = [new_locked_container(ctl, user_token, ["true"]) for _ in range(3)]

    async def go() -> None:
        async with client(ctl) as c:
            me = await c.token_uuid()
            mine = await c.list_all("containers", filters=[["locked_by_uuid", "=", me],
                                                            ["uuid", "in", uuids]],
                                    order=["priority desc"], page_size=2)
            assert sorted(i["uuid"] for i in mine) == sorted(uuids)
            with pytest.raises(Unprocessable, match="cannot lock when Locked"):
                await c.lock(uuids[0])
            unlocked = await c.unlock(uuids[0])
            assert unlocked["state"] == "Queued"
            with pytest.raises(NotFound):
                await c.get("containers", "zzzzz-dz642-000000000000000")
        # Without the dev CA the certificate is not trusted: a clear error, no retries.
        async with ArvadosClient(ctl.host, ctl.root_token, retries=3) as bad:
            with pytest.raises(ApiUnavailable, match="certificate"):
                await bad.get("containers", uuids[0])

    run(go())


def test_crunch_run_complete_with_logs_and_no_secret(runs: Runs, user_token: str) -> None:
    ctl = runs.ctl
    uuid = new_locked_container(ctl, user_token, [
        "sh", "-c", 'echo "hello $WHO"; echo to-stderr >&2; env; exit 3'],
        environment={"WHO": "controller"})
    res = runs.run(uuid)
    assert res.returncode == 0, res.stderr
    ctr = get_container(ctl, uuid)
    assert ctr["state"] == "Complete" and ctr["exit_code"] == 3
    out = log_text(ctl, uuid, "stdout")
    assert out.startswith("hello controller\n")
    assert "GatewayAuthSecret" not in out
    assert runs.env(uuid)["GatewayAuthSecret"] not in out
    assert ctl.root_token not in out
    assert log_text(ctl, uuid, "stderr") == "to-stderr\n"
    assert "exited with exit code 3" in log_text(ctl, uuid, "crunch-run")
    assert runs.env(uuid)["GatewayAuthSecret"] not in res.stderr


def test_crunch_run_refuses_unlocked(runs: Runs, user_token: str) -> None:
    uuid = new_locked_container(runs.ctl, user_token, ["true"])
    run(client(runs.ctl).unlock(uuid))
    res = runs.run(uuid)
    assert res.returncode == 1
    assert f"dispatch error detected: container {uuid} has state Queued" in res.stderr


def test_crunch_run_max_run_time_and_sigterm(runs: Runs, user_token: str) -> None:
    ctl = runs.ctl
    slow = new_locked_container(ctl, user_token, ["sleep", "300"],
                                scheduling_parameters={"max_run_time": 1})
    term = new_locked_container(ctl, user_token, ["sh", "-c", "echo up; exec sleep 300"])
    p_slow = runs.start(slow)
    p_term = runs.start(term)
    wait_for(lambda: "up" in log_text(ctl, term, "stdout"), what="container output")
    assert get_container(ctl, term)["state"] == "Running"
    p_term.send_signal(signal.SIGTERM)
    assert p_term.wait(60) == 0
    assert p_slow.wait(60) == 0
    ctr = get_container(ctl, slow)
    assert ctr["state"] == "Cancelled"
    assert ctr["runtime_status"].get("error") == "max_run_time exceeded"
    ctr = get_container(ctl, term)
    assert ctr["state"] == "Cancelled"
    assert "SIGTERM" in ctr["runtime_status"].get("error", "")
