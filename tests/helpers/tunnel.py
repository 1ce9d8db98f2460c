"""Test fixtures for the tunnel: an in-process broker on a tiny fake backend, and agents.

Everything runs on one event loop in a background thread (:class:`LoopThread`), so tests that
drive real OpenSSH subprocesses and tests written as coroutines both use it:

* ``tunnel_certs`` (session): a dev CA + server certificate for 127.0.0.1 (``TunnelCerts``).
* ``tunnel_env`` (function): a :class:`TunnelEnv` — broker on ``https://127.0.0.1:PORT``
  backed by :class:`FakeBackend`, plus helpers to start agents for containers whose gateway runs
  commands on this host (``exec_argv`` = the command itself, like the ``local`` runtime).

The fake backend knows tokens (:data:`ADMIN_TOKEN`, :data:`USER_TOKEN`, :data:`OTHER_TOKEN`),
containers (all readable by default) and container requests; it records updates.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest
from aiohttp import web

from dispatcher.arvados.errors import Forbidden, NotFound
from tunnel.agent import Agent, serve_gateway_stream
from tunnel.broker import Broker, BrokerConfig
from tunnel.certs import make_certs
from tunnel.connection import TunnelConnection, TunnelStream
from tunnel.gateway import Gateway
from tunnel.protocol import TunnelSettings, gateway_auth_secret

T = TypeVar("T")

TUNNEL_ROOT_TOKEN = "tunnelroottoken0123456789abcdefghijklmnopqrstuvwx"
ADMIN_TOKEN = "v2/zzzzz-gj3su-adminadminadmin/admintokensecret0123456789abcdefghij"
USER_TOKEN = "v2/zzzzz-gj3su-useruseruseruse/usertokensecret0123456789abcdefghijk"
OTHER_TOKEN = "v2/zzzzz-gj3su-otherotherother/othertokensecret0123456789abcdefghi"
ADMIN_UUID = "zzzzz-tpzed-adminadminadmin"
USER_UUID = "zzzzz-tpzed-useruseruseruse"
OTHER_UUID = "zzzzz-tpzed-otherotherother"


def ctr_uuid(n: int) -> str:
    """A container UUID numbered ``n``."""
    return f"zzzzz-dz642-{n:015d}"


class LoopThread:
    """An event loop (uvloop when available) running in a daemon thread."""

    def __init__(self) -> None:
        try:
            import uvloop

            self.loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        except ImportError:  # pragma: no cover
            self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="tunnel-loop",
                                       daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        async def _cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.run(_cancel_all(), timeout=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


@dataclass
class FakeBackend:
    """The broker's view of the API, in memory (see the module docstring)."""

    users: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        ADMIN_TOKEN: {"uuid": ADMIN_UUID, "is_admin": True},
        USER_TOKEN: {"uuid": USER_UUID, "is_admin": False},
        OTHER_TOKEN: {"uuid": OTHER_UUID, "is_admin": False},
    })
    containers: dict[str, dict[str, Any]] = field(default_factory=dict)
    unreadable: dict[str, set[str]] = field(default_factory=dict)  # token -> uuids
    requests: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    updates: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    port_scans: int = 0  # calls of running_published_ports
    logs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # ctr uuid -> records
    links: list[dict[str, Any]] = field(default_factory=list)  # in lookup order

    def add_container(self, uuid: str, owner: str = USER_UUID, **attrs: Any) -> dict[str, Any]:
        ctr = {"uuid": uuid, "state": "Running", "gateway_address": "",
               "interactive_session_started": False}
        ctr.update(attrs)
        self.containers[uuid] = ctr
        self.requests[uuid] = [{"uuid": uuid.replace("dz642", "xvhdp"),
                                "modified_by_user_uuid": owner, "container_uuid": uuid}]
        return ctr

    async def container_as_user(self, token: str, uuid: str) -> dict[str, Any]:
        if token not in self.users:
            raise Forbidden(401, ["not logged in"], "GET", "containers")
        if uuid not in self.containers or uuid in self.unreadable.get(token, set()):
            raise NotFound(404, ["not found"], "GET", "containers")
        return dict(self.containers[uuid])

    async def container_request_as_user(self, token: str, uuid: str) -> dict[str, Any]:
        if token not in self.users:
            raise Forbidden(401, ["not logged in"], "GET", "container_requests")
        cr = await self.container_request(uuid)
        if cr["container_uuid"] in self.unreadable.get(token, set()):
            raise NotFound(404, ["not found"], "GET", "container_requests")
        return cr

    async def container_logs(self, uuid: str) -> list[dict[str, Any]]:
        return list(self.logs.get(uuid, []))

    def add_log(self, uuid: str, event_type: str, text: str) -> None:
        self.logs.setdefault(uuid, []).append({"event_type": event_type,
                                               "properties": {"text": text}})

    async def current_user(self, token: str) -> dict[str, Any]:
        if token not in self.users:
            raise Forbidden(401, ["not logged in"], "GET", "users/current")
        return dict(self.users[token])

    async def container(self, uuid: str) -> dict[str, Any]:
        if uuid not in self.containers:
            raise NotFound(404, ["not found"], "GET", "containers")
        return dict(self.containers[uuid])

    async def container_request(self, uuid: str) -> dict[str, Any]:
        for ctr_uuid_, crs in self.requests.items():
            for cr in crs:
                if cr["uuid"] == uuid:
                    return {**cr, "container_uuid": ctr_uuid_,
                            "published_ports": self.containers[ctr_uuid_].get("published_ports",
                                                                               {})}
        raise NotFound(404, ["not found"], "GET", "container_requests")

    async def requests_for(self, uuid: str) -> tuple[list[dict[str, Any]], int]:
        items = list(self.requests.get(uuid, []))
        return items, len(items)

    async def running_published_ports(self) -> list[dict[str, Any]]:
        self.port_scans += 1
        return [{"uuid": u, "published_ports": c.get("published_ports") or {}}
                for u, c in self.containers.items() if c.get("state") == "Running"]

    def add_link(self, name: str, head_uuid: str, port: Any,
                 link_class: str = "published_port") -> dict[str, Any]:
        link = {"uuid": f"zzzzz-o0j2j-{len(self.links):015d}", "link_class": link_class,
                "name": name, "head_uuid": head_uuid, "properties": {"port": port}}
        self.links.append(link)
        return link

    async def published_port_link(self, name: str) -> dict[str, Any] | None:
        return next((dict(link) for link in self.links
                     if link["link_class"] == "published_port" and link["name"] == name), None)

    async def update_container(self, uuid: str, attrs: dict[str, Any]) -> None:
        self.updates.append((uuid, dict(attrs)))
        if uuid in self.containers:
            self.containers[uuid].update(attrs)

    async def close(self) -> None:
        pass


@dataclass
class TunnelCerts:
    ca_file: str
    cert: str
    key: str

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert, self.key)
        return ctx


@pytest.fixture(scope="session")
def tunnel_certs(tmp_path_factory: pytest.TempPathFactory) -> TunnelCerts:
    # The wildcard: container web services (curl verifies the name).
    paths = make_certs(tmp_path_factory.mktemp("tunnel-certs"), ["*.containers.localhost"])
    return TunnelCerts(str(paths.ca_cert), str(paths.cert), str(paths.key))


class LocalContext(SimpleNamespace):
    """A GatewayContext whose "container" is this host (exec_argv runs the command as is)."""


def local_context(uuid: str, api_url: str, ca_file: str, workdir: str) -> LocalContext:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": workdir, "LANG": "C.UTF-8",
           "CONTAINER_MARKER": uuid}
    return LocalContext(
        container_uuid=uuid, auth_secret=gateway_auth_secret(TUNNEL_ROOT_TOKEN, uuid),
        client=SimpleNamespace(base_url=api_url, insecure=False, ca_file=ca_file),
        exec_argv=lambda cmd, tty: list(cmd), container_env=env, container_cwd=workdir,
        target_ip="127.0.0.1")


class TunnelEnv:
    """A broker (in-process, TLS) on a fake backend, plus agents; see the module docstring."""

    def __init__(self, certs: TunnelCerts, workdir: Path, *, settings: TunnelSettings | None
                 = None, **config: Any) -> None:
        self.certs = certs
        self.workdir = workdir
        self.lt = LoopThread()
        self.backend = FakeBackend()
        self.settings = settings or TunnelSettings()
        self.config_overrides = config
        self.port = 0
        self.broker: Broker | None = None
        self._runner: web.AppRunner | None = None
        self.agents: list[Agent] = []

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start_broker(self, port: int = 0) -> None:
        async def _start() -> None:
            cfg = BrokerConfig(system_root_token=TUNNEL_ROOT_TOKEN, internal_url="",
                               settings=self.settings, ca_file=self.certs.ca_file,
                               **self.config_overrides)
            self.broker = Broker(cfg, self.backend)
            app = web.Application()
            self.broker.setup(app)
            self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", port,
                               ssl_context=self.certs.server_context(), reuse_address=True)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            url = f"https://127.0.0.1:{self.port}/"
            self.broker.internal_url = url
            self.broker.config.controller_internal_urls.append(url)

        self.lt.run(_start())

    def stop_broker(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            self.lt.run(runner.cleanup())

    def start_agent(self, uuid: str, *, secret: str | None = None,
                    settings: TunnelSettings | None = None, log_dir: str = "") -> Agent:
        """Register ``uuid`` with the fake backend (Running) and connect an agent for it;
        ``log_dir`` is served as the container's live logs."""
        if uuid not in self.backend.containers:
            self.backend.add_container(uuid)
        ctx = local_context(uuid, self.url, self.certs.ca_file, str(self.workdir))
        ctx.log_dir = log_dir
        if secret is not None:
            ctx.auth_secret = secret

        async def _start() -> Agent:
            gw = Gateway(ctx)

            def on_stream(conn: TunnelConnection, st: TunnelStream) -> None:
                asyncio.get_running_loop().create_task(
                    serve_gateway_stream(gw, "127.0.0.1", conn, st))

            agent = Agent(self.url, uuid, ctx.auth_secret, stream_handler=on_stream,
                          ca_file=self.certs.ca_file, settings=settings or self.settings,
                          backoff_min_s=0.2, backoff_max_s=1.0)
            agent.start()
            return agent

        agent = self.lt.run(_start())
        self.agents.append(agent)
        return agent

    def wait_registered(self, uuid: str, timeout: float = 15.0) -> TunnelConnection:
        async def _wait() -> TunnelConnection:
            deadline = asyncio.get_running_loop().time() + timeout
            while asyncio.get_running_loop().time() < deadline:
                assert self.broker is not None
                conn = self.broker.tunnels.get(uuid)
                if conn is not None and not conn.closed.done():
                    return conn
                await asyncio.sleep(0.02)
            raise AssertionError(f"no tunnel for {uuid} after {timeout}s")

        return self.lt.run(_wait(), timeout + 5)

    def client_env(self, token: str = ADMIN_TOKEN) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"ARVADOS_API_HOST": self.host, "ARVADOS_API_TOKEN": token,
                    "ARVADOS_API_CA_FILE": self.certs.ca_file})
        env.pop("ARVADOS_API_HOST_INSECURE", None)
        return env

    def close(self) -> None:
        async def _close_agents() -> None:
            for a in self.agents:
                await a.aclose()

        try:
            self.lt.run(_close_agents())
            self.stop_broker()
        finally:
            self.lt.stop()


@pytest.fixture
def tunnel_env(tunnel_certs: TunnelCerts, tmp_path: Path) -> Iterator[TunnelEnv]:
    env = TunnelEnv(tunnel_certs, tmp_path)
    env.start_broker()
    try:
        yield env
    finally:
        env.close()


# --- a broker in its own process (for kill -9 tests) --------------------------------------------


class BrokerProcess:
    """``python -m tests.helpers.tunnel serve``: a broker on a fake backend, in a subprocess."""

    def __init__(self, certs: TunnelCerts, port: int, uuids: list[str], log_path: Path) -> None:
        self.certs = certs
        self.port = port
        self.uuids = uuids
        self.log_path = log_path
        self.proc: Any = None

    def start(self, timeout: float = 20.0) -> None:
        import subprocess
        import sys
        import time

        argv = [sys.executable, "-m", "tests.helpers.tunnel", "serve", "--port", str(self.port),
                "--cert", self.certs.cert, "--key", self.certs.key, "--ca", self.certs.ca_file,
                *self.uuids]
        repo = Path(__file__).resolve().parents[2]
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(argv, cwd=repo, stdout=subprocess.PIPE, stderr=logf,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith(b"READY") or time.monotonic() > deadline:
            self.kill()
            raise RuntimeError(f"broker process did not start: {line!r}")

    def kill(self) -> None:
        """SIGKILL by PID (no chance to drain or say goodbye)."""
        import signal

        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()


def _serve_main(argv: list[str]) -> None:
    import argparse
    import signal

    parser = argparse.ArgumentParser()
    parser.add_argument("cmd", choices=["serve"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("uuids", nargs="*")
    args = parser.parse_intermixed_args(argv)
    certs = TunnelCerts(args.ca, args.cert, args.key)

    async def main() -> None:
        backend = FakeBackend()
        for u in args.uuids:
            backend.add_container(u)
        url = f"https://127.0.0.1:{args.port}/"
        cfg = BrokerConfig(system_root_token=TUNNEL_ROOT_TOKEN, internal_url=url,
                           controller_internal_urls=[url], ca_file=args.ca)
        broker = Broker(cfg, backend)
        app = web.Application()
        broker.setup(app)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", args.port, ssl_context=certs.server_context(),
                           reuse_address=True)
        await site.start()
        print("READY", flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await runner.cleanup()

    import uvloop

    uvloop.run(main())


if __name__ == "__main__":
    import sys

    _serve_main(sys.argv[1:])
