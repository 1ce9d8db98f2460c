"""Port-range container web services end to end: a real ``crunchgate controller`` (which serves
``ExternalPortMin..ExternalPortMax`` itself, as it terminates TLS), the real gateway agent with
its tunnel, an HTTP service standing in for the container, aiohttp as the browser.

The controller assigns external ports when the container enters Running (``published_ports``
gets ``external_port``, ``base_url``, ``initial_url``), a request to ``https://<host>:<external
port>/`` reaches the container through the tunnel, and the assignment is gone once the
container has finished (410).
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.helpers.controller import ControllerProcess, start_controller
from tests.helpers.tunnel import LoopThread, local_context
from tunnel.agent import GatewayService, start_gateway
from tunnel.protocol import gateway_auth_secret


def free_port_pair() -> int:
    """``p`` such that ``p`` and ``p + 1`` are both free on 127.0.0.1 right now."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            p = int(a.getsockname()[1])
            if p >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", p + 1))
                except OSError:
                    continue
            return p
    raise AssertionError("no two consecutive free ports")


@pytest.fixture
def range_controller(tmp_path: Path) -> Iterator[tuple[ControllerProcess, int]]:
    low = free_port_pair()
    ctl = start_controller(tmp_path / "controller", extra_config={"Services": {
        "ContainerWebServices": {"ExternalURL": "https://127.0.0.1",
                                 "ExternalPortMin": low, "ExternalPortMax": low + 1}}})
    try:
        yield ctl, low
    finally:
        ctl.stop()


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    try:
        yield lt
    finally:
        lt.stop()


async def start_service() -> tuple[web.AppRunner, int]:
    async def echo(request: web.Request) -> web.Response:
        return web.Response(text=f"{request.method} {request.path_qs} host={request.host}")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


def start_container_gateway(lt: LoopThread, ctl: ControllerProcess, uuid: str,
                            tmp_path: Path) -> GatewayService:
    """crunch-run's gateway for the Running container ``uuid`` (local runtime), returned once
    its tunnel is registered with ``ctl``; the caller closes it (``lt.run(gw.aclose())``)."""
    ctx = local_context(uuid, ctl.url, str(ctl.ca_file), str(tmp_path))
    ctx.auth_secret = gateway_auth_secret(ctl.root_token, uuid)

    async def start() -> GatewayService:
        return start_gateway(ctx)

    gw = lt.run(start())
    try:
        poll(lambda: ctl.get_container(uuid)["gateway_address"], "the tunnel")
    except BaseException:
        lt.run(gw.aclose())
        raise
    return gw


def poll(fn: Any, what: str, timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = fn()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_port_range_end_to_end(range_controller: tuple[ControllerProcess, int],
                               loop_thread: LoopThread, tmp_path: Path) -> None:
    ctl, low = range_controller
    user = ctl.add_user("webuser")
    bad = {"command": ["true"], "container_image": "img", "output_path": "/out", "cwd": "/",
           "runtime_constraints": {"vcpus": 1, "ram": 1 << 20},
           "published_ports": {"80": {"access": "world", "label": "x", "initial_path": ""}}}
    status, body = ctl.request("POST", "arvados/v1/container_requests",
                               {"container_request": bad}, token=user)
    assert status == 422
    assert "published_ports['80'].access" in body["errors"][0]

    runner, port = loop_thread.run(start_service())
    try:
        ports = {str(port): {"access": "public", "label": "web", "initial_path": "/start"},
                 "65534": {"access": "public", "label": "b", "initial_path": ""},
                 "65535": {"access": "public", "label": "c", "initial_path": ""}}
        ctr = ctl.create_container(command=["sleep"], priority=1, published_ports=ports)
        uuid = ctr["uuid"]
        status, locked = ctl.request("POST", f"arvados/v1/containers/{uuid}/lock")
        assert (status, locked["state"]) == (200, "Locked")
        running = ctl.update_container(uuid, state="Running")["published_ports"]
        # Lowest free external ports in container-port order; the range is then exhausted.
        assert running[str(port)]["external_port"] == low
        assert running[str(port)]["initial_url"] == f"https://127.0.0.1:{low}/start"
        assert running["65534"]["external_port"] == low + 1
        assert "external_port" not in running["65535"] and "base_url" not in running["65535"]

        gw = start_container_gateway(loop_thread, ctl, uuid, tmp_path)
        try:
            ssl_ctx = ssl.create_default_context(cafile=str(ctl.ca_file))

            async def browse(*urls: str) -> list[tuple[int, str]]:
                out = []
                conn = aiohttp.TCPConnector(ssl=ssl_ctx, limit=1)
                async with aiohttp.ClientSession(connector=conn) as s:
                    for url in urls:
                        async with s.get(url) as r:
                            out.append((r.status, await r.text()))
                return out

            svc = running[str(port)]
            answers = loop_thread.run(browse(svc["initial_url"], svc["base_url"] + "a?x=1"))
            assert answers == [(200, f"GET /start host=127.0.0.1:{low}"),
                               (200, f"GET /a?x=1 host=127.0.0.1:{low}")]
            ctl.update_container(uuid, state="Complete")
            done = ctl.get_container(uuid)["published_ports"]
            assert done == ports  # assignments and URLs dropped

            async def status_of(url: str) -> int:
                conn = aiohttp.TCPConnector(ssl=ssl_ctx)
                async with aiohttp.ClientSession(connector=conn) as s, s.get(url) as r:
                    return r.status

            assert loop_thread.run(status_of(f"https://127.0.0.1:{low}/")) == 410
        finally:
            loop_thread.run(gw.aclose())
    finally:
        loop_thread.run(runner.cleanup())
