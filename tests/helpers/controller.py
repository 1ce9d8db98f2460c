"""Run the embedded controller (``crunchgate controller``) as a subprocess for tests.

Fixtures (auto-loaded for every test by ``tests/conftest.py``):

* ``controller`` (function scope): a fresh controller with its own config and data directory.
* ``controller_session`` (session scope): one controller shared by many tests — tests using it
  must not depend on each other's data (filter on the UUIDs they created).

Both yield a :class:`ControllerProcess`::

    def test_something(controller):
        controller.url            # "https://127.0.0.1:PORT"
        controller.host           # "127.0.0.1:PORT" (ARVADOS_API_HOST)
        controller.root_token     # SystemRootToken (admin; token UUID zzzzz-gj3su-000000000000000)
        controller.management_token
        controller.ca_file        # the generated dev CA (or use insecure=True / ARVADOS_API_HOST_INSECURE=1)
        controller.config_path    # the cluster config file (reuse it for dispatchers: same cluster)
        controller.data_dir
        controller.cluster_id     # "zzzzz"
        token = controller.add_user("alice")            # a user's API token ("v2/...")
        admin = controller.add_user("bob", admin=True)
        controller.env()          # ARVADOS_API_HOST/TOKEN/HOST_INSECURE for child processes
        controller.api()          # the real Arvados Python SDK client (root token by default)
        controller.restart()      # same port, config and data
        controller.stop()
        # Direct API calls in the dispatchers' wire format (form bodies, root token default):
        status, body = controller.request("GET", "arvados/v1/containers", {"limit": 1})
        ctr = controller.create_container(command=["true"], priority=1)   # admin create, Queued
        controller.get_container(ctr["uuid"]); controller.update_container(uuid, state="Cancelled")
        controller.wait_container(uuid, {"Complete", "Cancelled"}, timeout_s=60)  # poll

For extra config (e.g. ``Containers.MaxDispatchAttempts``) call :func:`start_controller`
yourself with ``extra_config={"Containers": {"MaxDispatchAttempts": 2}}`` and stop it in a
finaliser; the dict is deep-merged into ``Clusters.zzzzz``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

CLUSTER_ID = "zzzzz"
ROOT_TOKEN = "zzzzzroottoken0123456789abcdefghijklmnopqrstuvwxyz01"
MANAGEMENT_TOKEN = "zzzzzmanagementtoken0123456789abcdefghijklmnop"
START_TIMEOUT_S = 30.0


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            _deep_merge(base[k], v)
        else:
            base[k] = v
    return base


def _crunchgate_argv() -> list[str]:
    exe = shutil.which("crunchgate")
    return [exe] if exe else [sys.executable, "-m", "dispatcher.cli"]


@dataclass
class ControllerProcess:
    """A running ``crunchgate controller`` subprocess (see the module docstring)."""

    workdir: Path
    port: int
    config_path: Path
    data_dir: Path
    cluster_id: str = CLUSTER_ID
    root_token: str = ROOT_TOKEN
    management_token: str = MANAGEMENT_TOKEN
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.workdir / "controller.log"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"https://{self.host}"

    @property
    def ca_file(self) -> Path:
        return self.data_dir / "tls" / "ca.crt"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts the controller's dev CA."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    def env(self, token: str | None = None) -> dict[str, str]:
        """Environment for a child process that talks to this controller."""
        return {
            "ARVADOS_API_HOST": self.host,
            "ARVADOS_API_TOKEN": token or self.root_token,
            "ARVADOS_API_HOST_INSECURE": "1",
        }

    def api(self, token: str | None = None) -> Any:
        """The real Arvados Python SDK client for this controller."""
        import arvados

        return arvados.api("v1", host=self.host, token=token or self.root_token, insecure=True,
                           num_retries=0)

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        argv = [*_crunchgate_argv(), "controller", "--config", str(self.config_path),
                "--data", str(self.data_dir)]
        env = dict(os.environ)
        env.pop("ARVADOS_SERVICE_INTERNAL_URL", None)
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=logf, env=env,
                                         start_new_session=True)
        self.wait_ready()

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Poll ``/_health/ping`` until it answers OK (or the process dies / time runs out)."""
        deadline = time.monotonic() + timeout_s
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        req = urllib.request.Request(
            f"{self.url}/_health/ping",
            headers={"Authorization": f"Bearer {self.management_token}"},
        )
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"crunchgate controller exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(req, context=ctx, timeout=2) as resp:
                    if json.loads(resp.read()).get("health") == "OK":
                        return
            except (OSError, urllib.error.URLError, ValueError) as exc:
                last = exc
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"controller not ready after {timeout_s}s ({last}):\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def log_text(self) -> str:
        """Everything the controller wrote on stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s — by PID, only our own process."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def request(self, method: str, path: str, params: Mapping[str, Any] | None = None,
                token: str | None = None) -> tuple[int, Any]:
        """One API call as the dispatchers make it: GET params in the query string, others in a
        form body; strings raw, everything else JSON. Returns (status, decoded JSON or text);
        HTTP errors are returned, not raised."""
        encoded = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (params or {}).items()}
        url = f"{self.url}/{path.lstrip('/')}"
        data = None
        if method == "GET":
            if encoded:
                url += "?" + urllib.parse.urlencode(encoded)
        else:
            data = urllib.parse.urlencode(encoded).encode()
        req = urllib.request.Request(
            url, data=data, method=method,
            headers={"Authorization": f"Bearer {token or self.root_token}"},
        )
        try:
            with urllib.request.urlopen(req, context=self.ssl_context(), timeout=30) as resp:
                status, body = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, body = exc.code, exc.read()
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body.decode(errors="replace")

    def _ok(self, method: str, path: str, params: Mapping[str, Any] | None = None) -> Any:
        status, body = self.request(method, path, params)
        if status != 200:
            raise RuntimeError(f"{method} {path} -> {status}: {body}")
        return body

    def create_container(self, **attrs: Any) -> dict[str, Any]:
        """Create a Queued container directly (admin), e.g. ``command=[...], priority=1``."""
        result: dict[str, Any] = self._ok("POST", "arvados/v1/containers", {"container": attrs})
        return result

    def get_container(self, uuid: str) -> dict[str, Any]:
        result: dict[str, Any] = self._ok("GET", f"arvados/v1/containers/{uuid}")
        return result

    def update_container(self, uuid: str, **attrs: Any) -> dict[str, Any]:
        result: dict[str, Any] = self._ok("PUT", f"arvados/v1/containers/{uuid}",
                                          {"container": attrs})
        return result

    def wait_container(self, uuid: str, states: set[str] | frozenset[str],
                       timeout_s: float = 60.0, poll_s: float = 0.1) -> dict[str, Any]:
        """Poll until the container's state is one of ``states``; return it (or raise with the
        last record seen when the deadline passes)."""
        deadline = time.monotonic() + timeout_s
        ctr = self.get_container(uuid)
        while ctr["state"] not in states:
            if time.monotonic() > deadline:
                raise TimeoutError(f"container {uuid} still {ctr['state']} after {timeout_s}s "
                                   f"(wanted {sorted(states)}): {ctr}")
            time.sleep(poll_s)
            ctr = self.get_container(uuid)
        return ctr

    def add_user(self, name: str, admin: bool = False) -> str:
        """Create a user (``crunchgate controller add-user``) and return its API token."""
        argv = [*_crunchgate_argv(), "controller", "add-user", name, "--config",
                str(self.config_path), "--data", str(self.data_dir)]
        if admin:
            argv.append("--admin")
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"add-user {name} failed ({out.returncode}): {out.stderr}")
        return out.stdout.strip()


def start_controller(
    workdir: Path,
    *,
    extra_config: Mapping[str, Any] | None = None,
    port: int | None = None,
) -> ControllerProcess:
    """Write a config under ``workdir`` and start a controller; the caller must ``stop()`` it."""
    workdir.mkdir(parents=True, exist_ok=True)
    for attempt in range(3):
        p = port or free_port()
        cluster: dict[str, Any] = {
            "SystemRootToken": ROOT_TOKEN,
            "ManagementToken": MANAGEMENT_TOKEN,
            "Services": {
                "Controller": {
                    "ExternalURL": f"https://127.0.0.1:{p}",
                    "InternalURLs": {f"https://127.0.0.1:{p}": {}},
                },
            },
            "TLS": {"Insecure": True},
            "SystemLogs": {"LogLevel": "debug"},
        }
        _deep_merge(cluster, extra_config or {})
        config_path = workdir / "config.yml"
        config_path.write_text(yaml.safe_dump({"Clusters": {CLUSTER_ID: cluster}}))
        ctl = ControllerProcess(workdir=workdir, port=p, config_path=config_path,
                                data_dir=workdir / "data")
        try:
            ctl.start()
            return ctl
        except RuntimeError:
            # The free port may have been taken between probing and binding: try another.
            if attempt == 2 or port is not None:
                raise
    raise AssertionError("unreachable")


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[ControllerProcess]:
    """A fresh controller for one test (see the module docstring)."""
    ctl = start_controller(tmp_path / "controller")
    try:
        yield ctl
    finally:
        ctl.stop()


@pytest.fixture(scope="session")
def controller_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControllerProcess]:
    """One controller shared by the session; do not depend on other tests' data."""
    ctl = start_controller(tmp_path_factory.mktemp("controller-session"))
    try:
        yield ctl
    finally:
        ctl.stop()
