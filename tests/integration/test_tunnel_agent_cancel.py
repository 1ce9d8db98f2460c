"""Cancelling the agent's task ends it at every wait: dialling, TLS, the upgrade, the backoff.

Python 3.11's ``asyncio.wait_for`` returns the inner result when a cancellation arrives as
that result does, which once let an agent carry on with a fresh tunnel after crunch-run told it
to stop; the last test reproduces exactly that moment.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import tunnel.agent as agent_mod
from tests.helpers.tunnel import TunnelCerts, ctr_uuid
from tunnel.agent import Agent
from tunnel.protocol import gateway_auth_secret

UUID = ctr_uuid(77)
STOP_WITHIN_S = 5.0  # a deadline for "it ended", not a performance figure


def make_agent(port: int, certs: TunnelCerts, **kw: Any) -> Agent:
    return Agent(f"https://127.0.0.1:{port}", UUID, gateway_auth_secret("root", UUID),
                 stream_handler=lambda conn, st: None, ca_file=certs.ca_file, **kw)


async def until(cond: Callable[[], bool], what: str, limit_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + limit_s
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def cancel_and_check(agent: Agent) -> None:
    task = agent._task
    assert task is not None and not task.done()
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=STOP_WITHIN_S)
    assert task in done, "the agent task is still running after cancel()"
    assert task.cancelled()


class Server:
    """A loopback server whose behaviour after accept() is given by ``serve``."""

    def __init__(self, serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                       Awaitable[None]]) -> None:
        self.serve = serve
        self.accepted = 0
        self.closed = 0
        self.server: asyncio.AbstractServer | None = None

    async def start(self, ssl_ctx: Any) -> int:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.accepted += 1
            try:
                await self.serve(reader, writer)
                await reader.read()  # until the agent goes away
            except (ConnectionError, OSError):
                pass
            finally:
                self.closed += 1
                writer.close()

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ssl_ctx)
        return int(self.server.sockets[0].getsockname()[1])

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def test_cancel_during_backoff_wait(tunnel_certs: TunnelCerts) -> None:
    async def go() -> None:
        with socket.socket() as s:  # a port nobody listens on: connection refused
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        agent = make_agent(port, tunnel_certs, backoff_min_s=60, backoff_max_s=60)
        agent.start()
        await until(lambda: bool(agent.last_error), "the first failed attempt")
        await cancel_and_check(agent)

    asyncio.run(go())


def test_cancel_during_tls_handshake(tunnel_certs: TunnelCerts) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pass  # plain TCP: the agent's TLS handshake never completes

    async def go() -> None:
        srv = Server(silent)
        port = await srv.start(None)
        try:
            agent = make_agent(port, tunnel_certs, connect_timeout_s=600)
            agent.start()
            await until(lambda: srv.accepted == 1, "the agent to connect")
            await cancel_and_check(agent)
            await until(lambda: srv.closed == 1, "the agent to close its connection")
        finally:
            srv.close()

    asyncio.run(go())


def test_cancel_while_waiting_for_the_upgrade_answer(tunnel_certs: TunnelCerts) -> None:
    got_request = asyncio.Event()

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        got_request.set()  # ... and never answer

    async def go() -> None:
        srv = Server(mute)
        port = await srv.start(tunnel_certs.server_context())
        try:
            agent = make_agent(port, tunnel_certs, connect_timeout_s=600)
            agent.start()
            await until(got_request.is_set, "the upgrade request")
            await cancel_and_check(agent)
            await until(lambda: srv.closed == 1, "the agent to close its connection")
        finally:
            srv.close()

    asyncio.run(go())


def test_cancel_arriving_as_the_upgrade_succeeds_is_not_lost(
        tunnel_certs: TunnelCerts, monkeypatch: pytest.MonkeyPatch) -> None:
    async def upgrade(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: tunnel-h2\r\n"
                     b"Connection: Upgrade\r\n\r\n")

    agents: list[Agent] = []
    real = agent_mod.TunnelConnection

    class CancelOnCreate(real):  # type: ignore[misc, valid-type]
        """Cancels the agent's task just before the handshake result is set."""

        def __init__(self, *args: Any, **kw: Any) -> None:
            super().__init__(*args, **kw)
            task = agents[0]._task
            assert task is not None
            task.cancel()

    monkeypatch.setattr(agent_mod, "TunnelConnection", CancelOnCreate)

    async def go() -> None:
        srv = Server(upgrade)
        port = await srv.start(tunnel_certs.server_context())
        try:
            agent = make_agent(port, tunnel_certs)
            agents.append(agent)
            agent.start()
            task = agent._task
            assert task is not None
            done, _ = await asyncio.wait({task}, timeout=STOP_WITHIN_S)
            assert task in done, "the cancellation was swallowed: the agent runs on"
            assert task.cancelled()
            assert agent.registrations == 0
            await until(lambda: srv.closed == 1, "the agent to close its connection")
        finally:
            srv.close()

    asyncio.run(go())
