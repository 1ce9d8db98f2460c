"""The controller side of the tunnels: accepts them, routes shells to them, forwards C1 -> C2.

Mounted into an aiohttp application (the embedded controller's, through
``build_app(cfg, store, extra_setup=[broker.setup])``, or the standalone ``crunchgate broker``):

* ``POST /arvados/v1/{connect|containers}/{uuid}/gateway_tunnel`` with ``Upgrade: tunnel-h2``
  and form field ``auth_secret``: checked in constant time against
  hex HMAC-SHA256(SystemRootToken, uuid); ``101`` with ``X-Arvados-Internal-Url``; then this
  process is the HTTP/2 client on that connection. The newest tunnel for a UUID replaces the
  older one (which keeps serving its open streams); ``gateway_address`` becomes
  ``tunnel <InternalURL>``.
* ``POST /arvados/v1/{connect|containers}/{uuid}/ssh`` with ``Upgrade: ssh``: the reference's
  authorisation (section 3.1), then one tunnel stream to the gateway's SSH server, spliced to the
  client's connection after a ``101``. If the tunnel is held by another controller listed in
  ``Services.Controller.InternalURLs``, the call is forwarded there once with ``no_forward=true``
  and the user's own token (the receiver checks everything again and will not forward).
* ``GET .../ssh`` answers 410 (obsolete client), as the reference.
* ``GET|HEAD|OPTIONS|PROPFIND /arvados/v1/container_requests/{uuid}/log{path}``: container logs
  as WebDAV, live from crunch-run's gateway while the container runs (:mod:`.containerlogs`).

Limits: ``API.MaxGatewayTunnels`` counts tunnels and shell connections together, as the
reference's tunnel queue does (no queue: over the limit is an immediate 503); each tunnel takes
at most ``TunnelSettings.max_concurrent_streams`` streams (the agent also advertises it in
SETTINGS_MAX_CONCURRENT_STREAMS).

Everything the broker needs from the API goes through :class:`ApiBackend` (the Arvados API
client), so it runs the same beside a real Arvados controller; tests swap in a fake backend.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from aiohttp import web

from dispatcher.arvados.client import ArvadosClient
from dispatcher.arvados.errors import ApiError, ArvadosError, Forbidden, NotFound
from dispatcher.logs import register_secret
from tunnel.connection import LocalPipe, StreamError, TunnelConnection, tune_socket
from tunnel.containerlogs import ContainerLogs
from tunnel.errors import TunnelError
from tunnel.protocol import (
    INTERNAL_URL_HEADER,
    SSH_TARGET,
    UPGRADE_TOKEN,
    ResponseHeadParser,
    TunnelSettings,
    build_upgrade_request,
    check_auth_secret,
    parse_form,
)
from tunnel.webservices import WebServices

log = logging.getLogger("crunchgate.tunnel.broker")

UUID_RE = re.compile(r"^[a-z0-9]{5}-[a-z0-9]{5}-[a-z0-9]{15}$")
FALSE_WORDS = frozenset({"", "false", "0"})
BROKER_KEY: web.AppKey[Broker] = web.AppKey("crunchgate_broker")
# Event types of log records that are files of a container's log (``<event type>.txt``).
LOG_EVENT_TYPES = ("crunch-run", "stderr", "stdout", "crunchstat", "arv-mount", "node",
                   "hoststat")


class BrokerError(TunnelError):
    """A refusal the client sees as ``{"errors": [message]}`` with ``status``."""


def error_response(status: int, message: str) -> web.Response:
    return web.json_response({"errors": [message]}, status=status)


def canonical_url(url: str) -> str:
    """``https://host:port/`` (empty path becomes ``/``), as Arvados compares InternalURLs."""
    parts = urlsplit(url.strip())
    path = parts.path or "/"
    return f"{parts.scheme}://{parts.netloc}{path}"


# --- what the broker needs from the API ---------------------------------------------------------


class Backend(Protocol):
    """The API calls the broker makes; :class:`ApiBackend` is the real one."""

    async def container_as_user(self, token: str, uuid: str) -> dict[str, Any]: ...
    async def container_request_as_user(self, token: str, uuid: str) -> dict[str, Any]: ...
    async def container_logs(self, uuid: str) -> list[dict[str, Any]]: ...
    async def current_user(self, token: str) -> dict[str, Any]: ...
    async def container(self, uuid: str) -> dict[str, Any]: ...
    async def container_request(self, uuid: str) -> dict[str, Any]: ...
    async def requests_for(self, uuid: str) -> tuple[list[dict[str, Any]], int]: ...
    async def running_published_ports(self) -> list[dict[str, Any]]: ...
    async def published_port_link(self, name: str) -> dict[str, Any] | None: ...
    async def update_container(self, uuid: str, attrs: dict[str, Any]) -> None: ...
    async def close(self) -> None: ...


class ApiBackend:
    """:class:`Backend` over the Arvados API (``SystemRootToken`` for the root calls)."""

    def __init__(self, api_host: str, root_token: str, *, insecure: bool = False,
                 ca_file: str | None = None) -> None:
        self.api_host = api_host
        self.insecure = insecure
        self.ca_file = ca_file
        self.root = ArvadosClient(api_host, root_token, insecure=insecure, ca_file=ca_file,
                                  timeout_s=30, retries=3, retry_min_s=0.2, retry_max_s=2.0)

    def _user_client(self, token: str) -> ArvadosClient:
        return ArvadosClient(self.api_host, token, insecure=self.insecure, ca_file=self.ca_file,
                             timeout_s=30, retries=1, retry_min_s=0.2, retry_max_s=1.0)

    async def container_as_user(self, token: str, uuid: str) -> dict[str, Any]:
        async with self._user_client(token) as c:
            return await c.get("containers", uuid)

    async def container_request_as_user(self, token: str, uuid: str) -> dict[str, Any]:
        async with self._user_client(token) as c:
            return await c.get("container_requests", uuid,
                               select=["uuid", "container_uuid", "log_uuid", "state"])

    async def container_logs(self, uuid: str) -> list[dict[str, Any]]:
        """The container's saved log records (``event_type``, ``properties.text``), oldest
        first."""
        return await self.root.list_all(
            "logs", filters=[["object_uuid", "=", uuid],
                             ["event_type", "in", list(LOG_EVENT_TYPES)]],
            order=["id asc"], select=["uuid", "event_type", "properties"])

    async def current_user(self, token: str) -> dict[str, Any]:
        async with self._user_client(token) as c:
            return await c.request("GET", "users/current")

    async def container(self, uuid: str) -> dict[str, Any]:
        return await self.root.get("containers", uuid)

    async def container_request(self, uuid: str) -> dict[str, Any]:
        return await self.root.get("container_requests", uuid)

    async def requests_for(self, uuid: str) -> tuple[list[dict[str, Any]], int]:
        resp = await self.root.list(
            "container_requests", filters=[["container_uuid", "=", uuid]],
            select=["uuid", "modified_by_user_uuid", "published_ports", "container_uuid"],
            limit=1000, count="exact")
        items = list(resp.get("items") or [])
        return items, int(resp.get("items_available", len(items)) or 0)

    async def running_published_ports(self) -> list[dict[str, Any]]:
        """``uuid`` and ``published_ports`` of every Running container (port-range lookup)."""
        return await self.root.list_all("containers", filters=[["state", "=", "Running"]],
                                        select=["uuid", "published_ports"])

    async def published_port_link(self, name: str) -> dict[str, Any] | None:
        """The first ``published_port`` link named ``name`` (a web-service name), or None."""
        resp = await self.root.list(
            "links", filters=[["link_class", "=", "published_port"], ["name", "=", name]],
            select=["uuid", "head_uuid", "properties"], limit=1, count="none")
        items = resp.get("items") or []
        return dict(items[0]) if items else None

    async def update_container(self, uuid: str, attrs: dict[str, Any]) -> None:
        await self.root.update("containers", uuid, attrs)

    async def close(self) -> None:
        await self.root.close()


# --- configuration --------------------------------------------------------------------------------


@dataclass
class BrokerConfig:
    """What the broker takes from the cluster config (see :meth:`from_cluster`)."""

    system_root_token: str
    internal_url: str  # this process's entry of Services.Controller.InternalURLs
    controller_internal_urls: list[str] = field(default_factory=list)
    shell_admin: bool = True
    shell_user: bool = False
    max_gateway_tunnels: int = 1000
    tls_insecure: bool = False  # for C1 -> C2 (Arvados TLS.Insecure)
    ca_file: str | None = None
    settings: TunnelSettings = field(default_factory=TunnelSettings)
    web_services_url: str = ""  # Services.ContainerWebServices.ExternalURL
    web_port_min: int = 0  # ... ExternalPortMin/Max (the port-range form)
    web_port_max: int = 0

    @classmethod
    def from_cluster(cls, cfg: Any, internal_url: str | None = None) -> BrokerConfig:
        """Build from a ``dispatcher.config.ClusterConfig``."""
        if internal_url is None:
            from dispatcher import config as config_mod

            internal_url = config_mod.service_internal_url(cfg, "Controller")
        return cls(
            system_root_token=cfg.system_root_token,
            internal_url=internal_url or "",
            controller_internal_urls=list(cfg.services.controller.internal_urls),
            shell_admin=cfg.containers.shell_access.admin,
            shell_user=cfg.containers.shell_access.user,
            max_gateway_tunnels=cfg.api.max_gateway_tunnels,
            tls_insecure=cfg.tls.insecure,
            web_services_url=cfg.services.container_web_services.external_url,
            web_port_min=cfg.services.container_web_services.external_port_min,
            web_port_max=cfg.services.container_web_services.external_port_max,
        )


# --- the broker -----------------------------------------------------------------------------------


class _Hijacked(web.StreamResponse):
    """What a handler returns after taking the connection over: aiohttp must write nothing."""

    def __init__(self) -> None:
        super().__init__(status=101)

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


def hijack(request: web.Request, head: bytes, protocol: asyncio.BaseProtocol,
           start: Callable[[asyncio.Transport], None]) -> asyncio.Transport:
    """Take the client connection away from aiohttp: write ``head``, give it to ``protocol``.

    Everything is synchronous, so no byte from the client can reach aiohttp's parser between
    the response and the switch. aiohttp's own protocol still learns about the connection's end
    (``protocol.chained``), so its request task and connection count finish normally.
    """
    transport = request.transport
    if transport is None or transport.is_closing():
        raise BrokerError("client went away", 499)
    transport.write(head)
    start(transport)
    protocol.chained = request.protocol  # type: ignore[attr-defined]
    with contextlib.suppress(Exception):
        transport.resume_reading()
    return transport


def response_head(status_line: str, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status_line}"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class _ChainedPipe(LocalPipe):
    chained: asyncio.BaseProtocol | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self.lost.done():
            self.lost.set_result(None)
        chained, self.chained = self.chained, None
        if chained is not None:
            with contextlib.suppress(Exception):
                chained.connection_lost(exc)


class _Splice(asyncio.Protocol):
    """Copies bytes from its transport to a peer transport, with backpressure both ways."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Splice | None = None
        self.chained: asyncio.BaseProtocol | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:  # uvloop's SSL transport is no Transport
        self.transport = transport

    def take(self, transport: asyncio.Transport) -> None:
        """Become the protocol of an already-connected transport."""
        transport.set_protocol(self)
        self.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)

    def eof_received(self) -> bool:
        peer = self.peer.transport if self.peer is not None else None
        if peer is not None and not peer.is_closing():
            try:
                peer.write_eof() if peer.can_write_eof() else peer.close()
            except OSError:
                peer.close()
        return True

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            with contextlib.suppress(Exception):
                self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()
        if not self.done.done():
            self.done.set_result(None)
        chained, self.chained = self.chained, None
        if chained is not None:
            with contextlib.suppress(Exception):
                chained.connection_lost(exc)


class _HeadReader(asyncio.Protocol):
    """Client side of an HTTP/1.1 upgrade: writes the request, parses the response head."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.parser = ResponseHeadParser()
        self.head: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: Any) -> None:  # uvloop's SSL transport is no Transport
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        try:
            head = self.parser.feed(data)
        except TunnelError as exc:
            if not self.head.done():
                self.head.set_exception(exc)
            return
        if head is not None and not self.head.done():
            self.head.set_result(head)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.head.done():
            self.head.set_exception(BrokerError(f"connection closed early ({exc})", 502))


class Broker:
    """Tunnel registry + shell routing. ``setup(app)`` mounts the routes into an aiohttp app."""

    def __init__(self, config: BrokerConfig, backend: Backend) -> None:
        self.config = config
        self.backend = backend
        register_secret(config.system_root_token)
        self.internal_url = canonical_url(config.internal_url) if config.internal_url else ""
        self.tunnels: dict[str, TunnelConnection] = {}
        self.slots_in_use = 0
        self.draining = False
        self.counters = {"tunnels_accepted": 0, "tunnels_refused": 0, "shells": 0,
                         "shells_forwarded": 0, "shells_refused": 0}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.forward_timeout_s = 30.0
        self.webservices = WebServices(self)
        self.container_logs = ContainerLogs(self)

    # --- mounting ----------------------------------------------------------------------------

    def setup(self, app: web.Application) -> None:
        """Add the broker's routes to ``app`` (usable as a ``build_app`` extra_setup callable)."""
        app[BROKER_KEY] = self
        for kind in ("connect", "containers"):
            app.router.add_post(f"/arvados/v1/{kind}/{{uuid}}/gateway_tunnel", self.handle_tunnel)
            app.router.add_post(f"/arvados/v1/{kind}/{{uuid}}/ssh", self.handle_ssh)
            app.router.add_get(f"/arvados/v1/{kind}/{{uuid}}/ssh", self.handle_ssh_get)
        self.container_logs.setup(app)
        app.on_shutdown.append(self._on_shutdown)
        # Always installed; it does nothing while ContainerWebServices.ExternalURL is empty.
        app.middlewares.append(self._web_middleware)

    @web.middleware
    async def _web_middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        return await self.webservices.middleware(request, handler)

    async def _on_shutdown(self, app: web.Application) -> None:
        await self.shutdown()

    async def shutdown(self, grace_s: float = 2.0) -> None:
        """Ask every agent to reconnect elsewhere, give streams a moment, close the rest."""
        self.draining = True
        conns = list(set(self.tunnels.values()))
        for conn in conns:
            conn.drain()
        deadline = asyncio.get_running_loop().time() + grace_s
        while (any(c.stream_count for c in conns)  # noqa: ASYNC110 - bounded poll
               and asyncio.get_running_loop().time() < deadline):
            await asyncio.sleep(0.05)
        for conn in conns:
            conn.close()
        await self.webservices.close()
        await self.backend.close()

    # --- slots -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _slot(self) -> Any:
        limit = self.config.max_gateway_tunnels
        if limit > 0 and self.slots_in_use >= limit:
            raise BrokerError("too many gateway tunnels and shell sessions on this controller "
                              "(API.MaxGatewayTunnels); retry later", 503)
        self.slots_in_use += 1
        try:
            yield
        finally:
            self.slots_in_use -= 1

    # --- tunnel registration -----------------------------------------------------------------

    async def handle_tunnel(self, request: web.Request) -> web.StreamResponse:
        uuid = request.match_info["uuid"]
        if not UUID_RE.match(uuid):
            return error_response(404, "not a container UUID")
        form = await _form(request)
        secret = form.get("auth_secret", "")
        register_secret(secret)
        if not check_auth_secret(self.config.system_root_token, uuid, secret):
            self.counters["tunnels_refused"] += 1
            log.info("received incorrect auth_secret", extra={"container_uuid": uuid})
            return error_response(401, "authentication error")
        if request.headers.get("Upgrade", "").lower() != UPGRADE_TOKEN:
            return error_response(400, f"this endpoint needs 'Upgrade: {UPGRADE_TOKEN}'")
        if self.draining:
            return error_response(503, "controller is shutting down; reconnect elsewhere")
        try:
            with self._slot():
                return await self._serve_tunnel(request, uuid)
        except BrokerError as exc:
            return error_response(exc.status, str(exc))

    async def _serve_tunnel(self, request: web.Request, uuid: str) -> web.StreamResponse:
        ctxlog = logging.LoggerAdapter(log, {"container_uuid": uuid})
        conn = TunnelConnection("broker", self.config.settings, name=uuid, logger=ctxlog)
        headers = {"Upgrade": UPGRADE_TOKEN, "Connection": "Upgrade"}
        if self.internal_url:
            headers[INTERNAL_URL_HEADER] = self.internal_url
        hijack(request, response_head("101 Switching Protocols", headers), conn, conn.start)
        old = self.tunnels.get(uuid)
        self.tunnels[uuid] = conn  # the newest registration wins (chisel#98)
        self.counters["tunnels_accepted"] += 1
        ctxlog.info("tunnel registered%s", " (replacing an older one)" if old else "")
        if old is not None and old.stream_count == 0:
            old.close()
        self._spawn(self._record_address(uuid))
        try:
            await conn.closed
        finally:
            if self.tunnels.get(uuid) is conn:
                del self.tunnels[uuid]
            conn.abort()
        ctxlog.info("tunnel closed: %s", conn.close_reason,
                    extra={"fields": {"bytes_in": conn.bytes_in, "bytes_out": conn.bytes_out}})
        return _Hijacked()

    async def _record_address(self, uuid: str) -> None:
        if not self.internal_url:
            return
        try:
            await self.backend.update_container(uuid, {"gateway_address":
                                                       f"tunnel {self.internal_url}"})
        except ArvadosError as exc:
            log.warning("could not record gateway_address: %s", exc,
                        extra={"container_uuid": uuid})

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- shells ------------------------------------------------------------------------------

    async def handle_ssh_get(self, request: web.Request) -> web.Response:
        return error_response(410, "API endpoint is obsolete -- please upgrade your client "
                                   "program")

    async def handle_ssh(self, request: web.Request) -> web.StreamResponse:
        uuid = request.match_info["uuid"]
        try:
            if not UUID_RE.match(uuid):
                raise BrokerError("not a container UUID", 404)
            form = await _form(request)
            token = request_token(request, form)
            if not token:
                raise BrokerError("no token given: set ARVADOS_API_TOKEN", 401)
            register_secret(token)
            no_forward = form.get("no_forward", request.query.get("no_forward", "")
                                  ).strip().lower() not in FALSE_WORDS
            ctr = await self.authorize_shell(token, uuid)
            with self._slot():
                return await self._route_shell(request, ctr, token, form, no_forward)
        except BrokerError as exc:
            self.counters["shells_refused"] += 1
            return error_response(exc.status, str(exc))

    async def authorize_shell(self, token: str, uuid: str) -> dict[str, Any]:
        """Reference 3.1: token, readability, ShellAccess, ownership, state. Returns the record."""
        try:
            user = await self.backend.current_user(token)
        except (Forbidden, NotFound) as exc:
            raise BrokerError("invalid or expired token", 401) from exc
        except ArvadosError as exc:
            raise BrokerError(f"cannot check the token: {exc}", 503) from exc
        try:
            ctr = await self.backend.container_as_user(token, uuid)
        except NotFound as exc:
            raise BrokerError(f"container {uuid} not found", 404) from exc
        except Forbidden as exc:
            raise BrokerError(f"container {uuid} not found", 404) from exc
        except ArvadosError as exc:
            raise BrokerError(f"cannot read the container: {exc}", 503) from exc
        cfg = self.config
        if not (user.get("is_admin") and cfg.shell_admin):
            if not cfg.shell_user:
                raise BrokerError("shell access is disabled in config", 503)
            await self._check_owner(user, uuid)
        state = ctr.get("state", "")
        if state in ("Queued", "Locked"):
            raise BrokerError(f'container is not running yet (state is "{state}")', 503)
        if state != "Running":
            raise BrokerError(f'container has ended (state is "{state}")', 410)
        return ctr

    async def _check_owner(self, user: dict[str, Any], uuid: str) -> None:
        try:
            items, available = await self.backend.requests_for(uuid)
        except ArvadosError as exc:
            raise BrokerError(f"cannot check permission: {exc}", 503) from exc
        if available != len(items):
            raise BrokerError("incomplete response while checking permission", 500)
        me = user.get("uuid")
        if any(cr.get("modified_by_user_uuid") != me for cr in items):
            raise BrokerError("permission denied: container is associated with requests "
                              "submitted by other users", 403)

    async def _route_shell(self, request: web.Request, ctr: dict[str, Any], token: str,
                           form: dict[str, str], no_forward: bool) -> web.StreamResponse:
        uuid = ctr["uuid"]
        conn = self.tunnels.get(uuid)
        if conn is not None and not conn.closed.done():
            return await self._local_shell(request, conn, ctr, form)
        addr = ctr.get("gateway_address") or ""
        if addr.startswith("tunnel ") and not no_forward:
            url = canonical_url(addr[len("tunnel "):])
            if url != self.internal_url:
                known = {canonical_url(u) for u in self.config.controller_internal_urls}
                if url not in known:
                    log.warning("gateway_address names a controller that is not in "
                                "Services.Controller.InternalURLs: %s", url,
                                extra={"container_uuid": uuid})
                    raise BrokerError("container gateway is running but tunnel endpoint is "
                                      "invalid", 503)
                return await self._forward_shell(request, url, uuid, token, form)
        if not addr:
            raise BrokerError("container is running but gateway is not available", 503)
        raise BrokerError("container is running but tunnel is down", 503)

    async def _local_shell(self, request: web.Request, conn: TunnelConnection,
                           ctr: dict[str, Any], form: dict[str, str]) -> web.StreamResponse:
        uuid = ctr["uuid"]
        if conn.stream_count >= self.config.settings.max_concurrent_streams:
            raise BrokerError("too many connections to this container; close some and retry",
                              503)
        headers = {"x-login-username": form.get("login_username", "") or "root",
                   "x-detach-keys": form.get("detach_keys", "")}
        try:
            st = await conn.open_stream(SSH_TARGET, headers)
        except StreamError as exc:
            raise BrokerError(f"cannot reach the container gateway: {exc}", exc.status) from exc
        if not ctr.get("interactive_session_started"):
            try:
                await self.backend.update_container(uuid, {"interactive_session_started": True})
            except ArvadosError as exc:
                st.abort()
                raise BrokerError(f"cannot record interactive_session_started: {exc}",
                                  500) from exc
        self.counters["shells"] += 1
        pipe = _ChainedPipe(st)
        try:
            hijack(request, response_head("101 Switching Protocols",
                                          {"Upgrade": "ssh", "Connection": "Upgrade"}),
                   pipe, pipe.take_over)
        except BrokerError:
            st.abort()
            raise
        log.info("shell session started", extra={"container_uuid": uuid})
        try:
            await st.done
            if pipe.transport is not None:
                # The stream is over: let the last bytes reach the client, then close.
                pipe.transport.close()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(10):
                        await asyncio.shield(pipe.lost)
        finally:
            if pipe.transport is not None:
                pipe.transport.abort()
        log.info("shell session closed", extra={"container_uuid": uuid, "fields": {
            "bytes_in": st.bytes_out, "bytes_out": st.bytes_in}})
        return _Hijacked()

    async def _forward_shell(self, request: web.Request, url: str, uuid: str, token: str,
                             form: dict[str, str]) -> web.StreamResponse:
        """C1 -> C2: same call to the controller holding the tunnel, ``no_forward=true``."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or 443
        fwd_form = {"detach_keys": form.get("detach_keys", ""),
                    "login_username": form.get("login_username", ""),
                    "no_forward": "true"}
        req = build_upgrade_request(parts.netloc, f"/arvados/v1/connect/{uuid}/ssh", "ssh",
                                    token, fwd_form)
        sslctx = _client_ssl(self.config.tls_insecure, self.config.ca_file)
        loop = asyncio.get_running_loop()
        reader = _HeadReader(req)
        try:
            async with asyncio.timeout(self.forward_timeout_s):
                transport, _ = await loop.create_connection(
                    lambda: reader, host, port, ssl=sslctx, server_hostname=host)
            async with asyncio.timeout(self.forward_timeout_s):
                head = await reader.head
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raise BrokerError(f"cannot reach the controller holding the tunnel: {exc}",
                              503) from exc
        except BrokerError:
            raise
        if head.status != 101:
            transport.close()
            raise BrokerError(_error_text(reader.parser.rest) or f"HTTP {head.status}",
                              head.status)
        self.counters["shells_forwarded"] += 1
        tune_socket(transport, lowat=False)
        upstream, client = _Splice(), _Splice()
        upstream.peer, client.peer = client, upstream
        rest = reader.parser.rest
        hijack(request, response_head("101 Switching Protocols",
                                      {"Upgrade": "ssh", "Connection": "Upgrade"}),
               client, client.take)
        transport.set_protocol(upstream)
        upstream.connection_made(transport)
        if rest:
            client.transport.write(rest)  # type: ignore[union-attr]
        log.info("shell forwarded to %s", url, extra={"container_uuid": uuid})
        try:
            await asyncio.wait([upstream.done, client.done], return_when=asyncio.ALL_COMPLETED)
        finally:
            for t in (upstream.transport, client.transport):
                if t is not None:
                    t.abort()
        return _Hijacked()

    # --- introspection -----------------------------------------------------------------------

    def tunnel_for(self, uuid: str) -> TunnelConnection | None:
        return self.tunnels.get(uuid)

    def stats(self) -> dict[str, Any]:
        return {"tunnels": len(self.tunnels), "slots_in_use": self.slots_in_use,
                **self.counters}


# --- helpers --------------------------------------------------------------------------------------


async def _form(request: web.Request) -> dict[str, str]:
    if request.content_type == "application/x-www-form-urlencoded" and request.can_read_body:
        body = await request.content.read(64 * 1024)
        return parse_form(body)
    if request.content_type == "application/json" and request.can_read_body:
        with contextlib.suppress(ValueError):
            data = json.loads(await request.content.read(64 * 1024))
            if isinstance(data, dict):
                return {k: str(v) for k, v in data.items()}
    return {}


def request_token(request: web.Request, form: dict[str, str] | None = None) -> str:
    """The Arvados token from header, form, query or cookie (reference 2.1 "Auth")."""
    auth = request.headers.get("Authorization", "")
    for scheme in ("Bearer ", "OAuth2 "):
        if auth.startswith(scheme):
            return auth[len(scheme):].strip()
    if auth.startswith("Basic "):
        with contextlib.suppress(ValueError):
            _, _, pw = base64.b64decode(auth[6:]).decode().partition(":")
            if pw:
                return pw
    if form and form.get("api_token"):
        return form["api_token"]
    if request.query.get("api_token"):
        return request.query["api_token"]
    cookie = request.cookies.get("arvados_api_token", "")
    if cookie:
        with contextlib.suppress(ValueError):
            return base64.urlsafe_b64decode(cookie + "=" * (-len(cookie) % 4)).decode()
    return ""


def _client_ssl(insecure: bool, ca_file: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca_file or None)
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _error_text(body: bytes) -> str:
    with contextlib.suppress(ValueError):
        data = json.loads(body.split(b"\r\n\r\n")[-1] or b"{}")
        if isinstance(data, dict) and isinstance(data.get("errors"), list):
            return "; ".join(str(e) for e in data["errors"])
    return body[:300].decode("utf-8", "replace").strip()


def api_error_status(exc: ApiError) -> int:
    return exc.status or 503


def controller_setup(cfg: Any, *, ca_file: str | None = None,
                     internal_url: str | None = None) -> Callable[[web.Application], None]:
    """An ``extra_setup`` callable that mounts a broker into the embedded controller's app.

    The broker talks to the controller through the API like any client (``controller_url``,
    SystemRootToken), trusting ``ca_file`` (the controller's dev CA) or ``TLS.Insecure``.
    """

    def setup(app: web.Application) -> None:
        from dispatcher.config import controller_url

        bcfg = BrokerConfig.from_cluster(cfg, internal_url)
        bcfg.ca_file = ca_file
        backend = ApiBackend(controller_url(cfg), cfg.system_root_token,
                             insecure=cfg.tls.insecure, ca_file=ca_file)
        Broker(bcfg, backend).setup(app)

    return setup
