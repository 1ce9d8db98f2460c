"""The compute-node side of the tunnel (inside crunch-run).

:class:`Agent` dials the broker over TLS, upgrades to the tunnel protocol, and serves the
streams the broker opens: ``ssh.gateway:22`` lands on the gateway's SSH server (through a
``socketpair``, never a listening port), ``log.gateway:80`` likewise on the live-log WebDAV
server (one HTTP/1.1 request per stream), ``container:<port>`` on that port of the container.

Reconnecting (improving on the reference's fixed 5 s sleep, reference 4.4 and 9):

* retries forever from the first attempt (a broker that is not up yet is not fatal, frp#3428);
* jittered exponential backoff, ``backoff_min_s`` doubling to ``backoff_max_s``, each delay
  drawn uniformly from [0.5, 1.0] x the step, so a whole cluster does not reconnect in the same
  second after a broker restart (teleport#6889); the step resets once a tunnel stayed up;
* the broker address is resolved again on every attempt;
* a *drain* notice from the broker starts a new tunnel at once while the old one finishes its
  streams; a missing PING answer (deadline) ends a dead tunnel instead of waiting for TCP.

crunch-run calls :func:`start_gateway` (docs/internals.md, "crunch-run <-> gateway hook").
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from dispatcher.logs import register_secret
from tunnel.connection import LocalPipe, StreamError, TunnelConnection, TunnelStream
from tunnel.errors import TunnelError
from tunnel.gateway import ContextLike, Gateway
from tunnel.protocol import (
    INTERNAL_URL_HEADER,
    LOG_TARGET,
    PORT_TARGET_HOST,
    SSH_TARGET,
    UPGRADE_TOKEN,
    ResponseHeadParser,
    TunnelProtocolError,
    TunnelSettings,
    build_tunnel_request,
)

log = logging.getLogger("crunchgate.tunnel.agent")


class AgentError(TunnelError):
    """A tunnel attempt failed; the message says why (the agent retries)."""


def backoff_delays(min_s: float, max_s: float, rng: random.Random | None = None
                   ) -> Any:
    """Endless jittered exponential delays: step doubles from min_s to max_s, delay in [.5, 1]."""
    r = rng or random.Random()
    step = min_s
    while True:
        yield step * r.uniform(0.5, 1.0)
        step = min(max_s, step * 2)


def make_ssl_context(insecure: bool, ca_file: str | None) -> ssl.SSLContext:
    """Client TLS context: verify the broker unless ``insecure``; ``ca_file`` adds trust."""
    ctx = ssl.create_default_context(cafile=ca_file or None)
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class _Handshake(asyncio.Protocol):
    """Reads the HTTP/1.1 answer to the upgrade request, then hands the transport over."""

    def __init__(self, request: bytes, make_conn: Callable[[], TunnelConnection]) -> None:
        self.request = request
        self.make_conn = make_conn
        self.parser = ResponseHeadParser()
        self.result: asyncio.Future[tuple[TunnelConnection, str]] = (
            asyncio.get_running_loop().create_future())
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: Any) -> None:  # uvloop's SSL transport is no Transport
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.result.done():
            return
        try:
            head = self.parser.feed(data)
        except TunnelProtocolError as exc:
            self._fail(AgentError(f"broker sent garbage: {exc}"))
            return
        if head is None:
            return
        if head.status != 101 or head.header("upgrade").lower() != UPGRADE_TOKEN:
            body = self.parser.rest[:300].decode("utf-8", "replace").strip()
            self._fail(AgentError(f"broker refused the tunnel: HTTP {head.status} {body}"))
            return
        conn = self.make_conn()
        assert self.transport is not None
        # Switch protocols synchronously: the broker's HTTP/2 preface may already be in `rest`.
        conn.start(self.transport, self.parser.rest)
        self.result.set_result((conn, head.header(INTERNAL_URL_HEADER.lower())))

    def _fail(self, exc: Exception) -> None:
        if not self.result.done():
            self.result.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(AgentError(f"broker closed the connection during the upgrade ({exc})"))


class Agent:
    """Keeps one tunnel for one container up, forever, until :meth:`aclose`."""

    def __init__(self, api_url: str, container_uuid: str, auth_secret: str, *,
                 stream_handler: Callable[[TunnelConnection, TunnelStream], Any],
                 insecure: bool = False, ca_file: str | None = None, token: str = "",
                 settings: TunnelSettings | None = None, backoff_min_s: float = 1.0,
                 backoff_max_s: float = 60.0, connect_timeout_s: float = 30.0) -> None:
        register_secret(auth_secret)
        register_secret(token)
        if "://" not in api_url:
            api_url = "https://" + api_url
        parts = urlsplit(api_url)
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.use_tls = parts.scheme == "https"
        self.host_header = parts.netloc
        self.uuid = container_uuid
        self._secret = auth_secret
        self._token = token
        self.insecure = insecure
        self.ca_file = ca_file
        self.settings = settings or TunnelSettings()
        self.stream_handler = stream_handler
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self.connect_timeout_s = connect_timeout_s
        self.log = logging.LoggerAdapter(log, {"container_uuid": container_uuid})
        self.connections: set[TunnelConnection] = set()
        self.broker_url = ""
        self.registrations = 0
        self.last_error = ""  # why the last attempt failed (set before the backoff wait)
        self.registered = asyncio.Event()
        self._drain_now = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(), name="tunnel-agent")

    async def connect_once(self) -> tuple[TunnelConnection, str]:
        """Dial, upgrade, and return the live tunnel and the broker's InternalURL."""
        loop = asyncio.get_running_loop()
        request = build_tunnel_request(self.host_header, self.uuid, self._secret, self._token)
        conn_holder: list[TunnelConnection] = []

        def make_conn() -> TunnelConnection:
            conn = TunnelConnection("agent", self.settings, on_drain=self._drain_now.set,
                                    name=self.uuid, logger=self.log)
            conn._on_stream = lambda st: self.stream_handler(conn, st)
            conn_holder.append(conn)
            return conn

        hs = _Handshake(request, make_conn)
        sslctx = make_ssl_context(self.insecure, self.ca_file) if self.use_tls else None
        try:
            # asyncio.timeout(), not wait_for(): on Python 3.11 wait_for() returns the inner
            # result when a cancellation arrives as that result does, so the task would go on
            # with a fresh tunnel although it was told to stop.
            async with asyncio.timeout(self.connect_timeout_s):
                await loop.create_connection(lambda: hs, self.host, self.port, ssl=sslctx,
                                             server_hostname=self.host if sslctx else None)
            async with asyncio.timeout(self.connect_timeout_s):
                return await hs.result
        except (OSError, ssl.SSLError) as exc:
            raise AgentError(f"cannot reach the broker at {self.host}:{self.port}: {exc}") from exc
        except TimeoutError:
            if hs.transport is not None:
                hs.transport.abort()
            raise AgentError("broker did not answer the upgrade in time") from None
        except asyncio.CancelledError:
            # Whatever got this far (a TLS session, maybe a registered tunnel) goes with us.
            if hs.transport is not None:
                hs.transport.abort()
            raise

    async def run(self) -> None:
        """Reconnect loop; see the module docstring. Cancelling it ends it at any await."""
        delays = backoff_delays(self.backoff_min_s, self.backoff_max_s)
        while True:
            self._drain_now.clear()
            try:
                conn, url = await self.connect_once()
            except AgentError as exc:
                delay = next(delays)
                self.last_error = str(exc)
                self.log.warning("tunnel: %s; retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                continue
            self.connections.add(conn)
            self.broker_url = url
            self.registrations += 1
            self.registered.set()
            self.log.info("tunnel registered with broker %s", url or f"{self.host}:{self.port}")
            started = asyncio.get_running_loop().time()
            drain: asyncio.Future[Any] = asyncio.ensure_future(self._drain_now.wait())
            try:
                await asyncio.wait([conn.closed, drain], return_when=asyncio.FIRST_COMPLETED)
            finally:
                drain.cancel()
            if not conn.closed.done():
                # Drain: a new tunnel now, the old one lives until its streams are done.
                self.log.info("broker asked to reconnect; dialling a new tunnel")
                retire = asyncio.get_running_loop().create_task(self._retire(conn))
                self._retiring.add(retire)
                retire.add_done_callback(self._retiring.discard)
                delays = backoff_delays(self.backoff_min_s, self.backoff_max_s)
                await asyncio.sleep(random.uniform(0, 0.2))
                continue
            self.connections.discard(conn)
            self.registered.clear()
            if asyncio.get_running_loop().time() - started > 30:
                delays = backoff_delays(self.backoff_min_s, self.backoff_max_s)
            delay = next(delays)
            self.last_error = conn.close_reason
            self.log.warning("tunnel closed (%s); reconnecting in %.1fs", conn.close_reason, delay)
            await asyncio.sleep(delay)

    async def _retire(self, conn: TunnelConnection) -> None:
        try:
            while conn.stream_count and not conn.closed.done():  # noqa: ASYNC110 - bounded poll
                await asyncio.sleep(0.5)
        finally:
            conn.close()
            self.connections.discard(conn)

    async def aclose(self) -> None:
        """Stop reconnecting and close every tunnel (returns once the agent task has ended)."""
        tasks = [t for t in (self._task, *self._retiring) if t is not None]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for conn in list(self.connections):
            conn.close()
        self.connections.clear()


async def serve_gateway_stream(gateway: Gateway, target_ip: str, conn: TunnelConnection,
                               st: TunnelStream, connect_timeout_s: float = 10.0) -> None:
    """Connect one stream to its target (SSH server or a container port)."""
    loop = asyncio.get_running_loop()
    host, _, port_text = st.target.rpartition(":")

    async def over_socketpair(serve: Callable[[socket.socket], Awaitable[None]]) -> None:
        # An in-process server gets its end of a socketpair; the stream is spliced to ours.
        ours, theirs = socket.socketpair()
        _, pipe = await loop.create_connection(lambda: LocalPipe(st, defer=True), sock=ours)
        conn.accept(st)
        pipe.activate()
        await serve(theirs)

    try:
        if st.target == SSH_TARGET:
            await over_socketpair(gateway.serve_socket)
        elif st.target == LOG_TARGET:
            if gateway.logs is None:
                conn.refuse(st, 404, "no live log filesystem (crunch-run keeps no local logs)")
                return
            await over_socketpair(gateway.logs.serve_socket)
        elif host == PORT_TARGET_HOST and port_text.isdigit() and 0 < int(port_text) < 65536:
            port = int(port_text)
            try:
                async with asyncio.timeout(connect_timeout_s):
                    _, pipe = await loop.create_connection(
                        lambda: LocalPipe(st, defer=True), target_ip, port)
            except (OSError, TimeoutError) as exc:
                conn.refuse(st, 502, f"cannot connect to port {port} in the container: {exc}")
                return
            conn.accept(st)
            pipe.activate()
        else:
            conn.refuse(st, 400, f"unknown stream target {st.target[:100]!r}")
    except StreamError:
        pass
    except Exception as exc:  # never let one stream take the agent down
        log.warning("stream %s failed: %s", st.target, exc)
        if not st.accepted.done():
            conn.refuse(st, 502, f"gateway error: {exc}")
        else:
            st.abort()


class GatewayService:
    """What :func:`start_gateway` returns: the agent plus the SSH server; ``aclose()`` stops."""

    def __init__(self, agent: Agent, gateway: Gateway) -> None:
        self.agent = agent
        self.gateway = gateway

    async def aclose(self) -> None:
        await self.agent.aclose()
        self.gateway.close()


def start_gateway(ctx: ContextLike, *, settings: TunnelSettings | None = None) -> GatewayService:
    """Start the gateway and the tunnel for a running container (called by crunch-run).

    The broker address and TLS trust come from crunch-run's API client (``ctx.client``:
    ``ARVADOS_API_HOST``, ``ARVADOS_API_HOST_INSECURE``, its CA file).
    """
    client: Any = getattr(ctx, "client", None)
    if client is None:
        raise AgentError("no API client in the gateway context")
    gateway = Gateway(ctx)
    target_ip = ctx.target_ip or "127.0.0.1"
    tasks: set[asyncio.Task[None]] = set()

    def on_stream(conn: TunnelConnection, st: TunnelStream) -> None:
        t = asyncio.get_running_loop().create_task(
            serve_gateway_stream(gateway, target_ip, conn, st))
        tasks.add(t)
        t.add_done_callback(tasks.discard)

    agent = Agent(client.base_url, ctx.container_uuid, getattr(ctx, "auth_secret", ""),
                  stream_handler=on_stream, insecure=bool(getattr(client, "insecure", False)),
                  ca_file=getattr(client, "ca_file", None), settings=settings)
    agent.start()
    return GatewayService(agent, gateway)
