"""Container web services: ``https://<uuid>-<port>.<ContainerWebServices wildcard>/...`` and
``https://<ContainerWebServices host>:<external port>/...``.

Requests whose ``Host`` matches ``Services.ContainerWebServices.ExternalURL`` are proxied to a
port of a container through its tunnel (reference section 5):

* wildcard form (``https://*.containers.example.com``): target ``<container or container request
  UUID>-<port>``;
* a published name (``https://<name>.containers.example.com``): the first ``published_port``
  link named ``<name>`` gives the target, ``<head_uuid>-<properties.port>``;
* port-range form (a plain host plus ``ExternalPortMin``/``ExternalPortMax``): a ``Host`` of that
  host with a port in the range is the container port that the controller assigned that
  external port while the container is Running (``published_ports[p].external_port``, see
  :class:`ExternalPorts`); an unassigned one is ``410``;
* a token in ``?arvados_api_token=`` is moved into an HttpOnly cookie by a ``303`` to the same
  URL without it (other query parameters kept); the cookie ``arvados_api_token`` (base64url) or
  an ``Authorization`` header authenticate later requests;
* ``published_ports[<port>].access == "public"`` needs no token; any other port needs a token
  that can read the container and, for non-admins, owns every request for it (401/404/403);
* a stale ``arvados_container_uuid`` cookie (the port now belongs to another container): GET/HEAD
  get their cookies cleared by a 303, other methods 410;
* the ``arvados_api_token`` cookie never reaches the container; responses set
  ``arvados_container_uuid``;
* websockets (any ``Upgrade``) are passed end to end: after the request head both directions
  are spliced, which the reference does not support (its section 9).

Each request is one tunnel stream (the container sees ``Connection: close``), but the client
keeps its connection: :class:`BodyReader` finds where the container's response body ends
(``Content-Length``, chunked, or the end of the stream) and aiohttp frames it for the client, so
several requests can share one client connection (HTTP keep-alive). Upgrades (websockets) take
the connection over and relay bytes both ways until either end closes. When the tunnel is held
by another controller, the request goes there with ``X-Arvados-No-Forward: 1`` over a pooled
keep-alive session per controller (:class:`Forwarder`), so a client's keep-alive connection
carries several forwarded requests, each one marked; an upgrade is spliced to that controller
on a connection of its own.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from http.cookies import SimpleCookie
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from dispatcher.arvados.errors import ArvadosError, Forbidden, NotFound
from dispatcher.logs import register_secret
from tunnel.connection import StreamError, TunnelStream
from tunnel.errors import TunnelError

if TYPE_CHECKING:
    from tunnel.broker import Backend, Broker

log = logging.getLogger("crunchgate.tunnel.webservices")

TARGET_RE = re.compile(r"^([a-z0-9]{5}-(?:dz642|xvhdp)-[a-z0-9]{15})-(\d{1,5})$")
NO_FORWARD = "X-Arvados-No-Forward"
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer",
                        "transfer-encoding", "content-length", "host", "upgrade", "expect",
                        NO_FORWARD.lower()})
MAX_HEAD = 64 * 1024


class WebError(TunnelError):
    """A refusal answered as ``{"errors": [...]}`` with ``status``."""


def vhost_target(external_url: str, host_header: str, port_min: int = 0, port_max: int = 0
                 ) -> str | None:
    """The target if ``host_header`` is a container web-service host (reference 5.1):
    ``:<external port>`` (port-range form) or the ``<uuid>-<port>`` prefix (wildcard form)."""
    if not external_url or not host_header:
        return None
    cfg = urlsplit(external_url)
    cfg_host = (cfg.hostname or "").lower()
    host, _, port = host_header.lower().rpartition(":")
    if not host or not port.isdigit():
        host, port = host_header.lower(), ""
    if (0 < port_min <= port_max and port and host.strip("[]") == cfg_host
            and port_min <= int(port) <= port_max):
        return f":{int(port)}"
    if not cfg_host.startswith("*"):
        return None
    suffix = cfg_host[1:]
    default = "443" if cfg.scheme == "https" else "80"
    if (port or default) != str(cfg.port or default):
        return None
    if not host.endswith(suffix) or len(host) == len(suffix):
        return None
    return host[: -len(suffix)]


def _cookie_token(request: web.Request) -> str:
    raw = request.cookies.get("arvados_api_token", "")
    if not raw:
        return ""
    with contextlib.suppress(ValueError, UnicodeDecodeError):
        return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
    return ""


def _header_token(request: web.Request) -> str:
    auth = request.headers.get("Authorization", "")
    for scheme in ("Bearer ", "OAuth2 "):
        if auth.startswith(scheme):
            return auth[len(scheme):].strip()
    return ""


def _redirect(location: str, cookies: list[str], clear_site: bool) -> web.Response:
    resp = web.Response(status=303, headers={"Location": location})
    for c in cookies:
        resp.headers.add("Set-Cookie", c)
    if clear_site:
        resp.headers["Clear-Site-Data"] = '"cache", "storage"'
    return resp


# Response headers that describe the container connection or the body's framing: aiohttp
# writes its own for the client connection.
RESPONSE_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection",
                                 "transfer-encoding", "content-length", "trailer", "upgrade"})


class BodyReader:
    """Sans-I/O: the body of one HTTP/1.1 response, out of the bytes that follow its head.

    ``feed(data)`` returns the body bytes in ``data`` (chunked framing removed); ``done`` turns
    True at the end of the body. ``length`` is the ``Content-Length`` (None when unknown); with
    neither a length nor chunked framing the body ends with the stream (:meth:`feed_eof`).
    Bytes after the end are ignored (the container sees ``Connection: close``).
    """

    MAX_LINE = 4096

    def __init__(self, status: int, headers: list[tuple[str, str]], method: str) -> None:
        names = {k.lower(): v for k, v in headers}
        te = names.get("transfer-encoding", "").lower()
        self.chunked = te.endswith("chunked")
        self.length: int | None = None
        self.done = False
        self._state = "size"  # chunked: size, data, data-crlf, trailer
        self._left = 0
        self._line = bytearray()
        if method == "HEAD" or 100 <= status < 200 or status in (204, 304):
            self.done = True
            return
        if not self.chunked and "content-length" in names:
            text = names["content-length"].strip()
            if not text.isdigit():
                raise WebError("bad Content-Length from the container", 502)
            self.length = self._left = int(text)
            self.done = self.length == 0

    def feed(self, data: bytes) -> bytes:
        if self.done or not data:
            return b""
        if self.chunked:
            return self._feed_chunked(data)
        if self.length is None:
            return data
        take = data[: self._left]
        self._left -= len(take)
        self.done = self._left == 0
        return take

    def feed_eof(self) -> None:
        """The stream ended: fine for a body delimited by it, a truncated one otherwise."""
        if not self.done and (self.chunked or self.length is not None):
            raise WebError("the container closed the connection in the middle of a response",
                           502)
        self.done = True

    def _feed_chunked(self, data: bytes) -> bytes:
        out = bytearray()
        pos = 0
        while pos < len(data) and not self.done:
            if self._state == "data":
                take = data[pos:pos + self._left]
                out += take
                pos += len(take)
                self._left -= len(take)
                if not self._left:
                    self._state = "data-crlf"
                continue
            end = data.find(b"\n", pos)
            piece = data[pos:] if end < 0 else data[pos:end + 1]
            self._line += piece
            pos += len(piece)
            if len(self._line) > self.MAX_LINE:
                raise WebError("bad chunked framing from the container", 502)
            if end < 0:
                break
            line = bytes(self._line).strip()
            self._line.clear()
            if self._state == "size":
                size_text = line.split(b";", 1)[0].strip()
                try:
                    self._left = int(size_text, 16)
                except ValueError:
                    raise WebError("bad chunked framing from the container", 502) from None
                self._state = "data" if self._left else "trailer"
            elif self._state == "data-crlf":
                if line:
                    raise WebError("bad chunked framing from the container", 502)
                self._state = "size"
            elif not line:  # trailer: an empty line ends the body (trailers are dropped)
                self.done = True
        return bytes(out)


def parse_response_head(raw: bytes) -> tuple[int, str, list[tuple[str, str]]]:
    """``HTTP/1.1 200 OK\\r\\nName: value...`` (without the blank line) as parts."""
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise WebError("the container did not answer with HTTP/1.x", 502)
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise WebError("bad response header from the container", 502)
        headers.append((name.strip(), value.strip()))
    return int(parts[1]), parts[2] if len(parts) > 2 else "", headers


class ExternalPorts:
    """Port-range form: external port -> (Running container, container port).

    The assignments live in the container records (``published_ports[p].external_port``, set
    by the controller when the container enters Running, dropped when it leaves), so the map
    is rebuilt from a list of the Running containers and every hit is re-checked against the
    container's current record: a reused port never reaches the container that had it before.
    Concurrent misses share one scan.
    """

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._map: dict[int, tuple[str, int]] = {}
        self._scan: asyncio.Task[None] | None = None

    async def resolve(self, external: int) -> tuple[dict[str, Any], int] | None:
        """The container holding ``external`` and its container port, or None."""
        found = await self._check(external)
        if found is None:
            await self._rescan()
            found = await self._check(external)
        return found

    async def _check(self, external: int) -> tuple[dict[str, Any], int] | None:
        hit = self._map.get(external)
        if hit is None:
            return None
        uuid, port = hit
        try:
            ctr = await self.backend.container(uuid)
        except NotFound:
            return None
        entry = (ctr.get("published_ports") or {}).get(str(port)) or {}
        if ctr.get("state") != "Running" or entry.get("external_port") != external:
            return None
        return ctr, port

    async def _rescan(self) -> None:
        if self._scan is None or self._scan.done():
            self._scan = asyncio.ensure_future(self._load())
        await asyncio.shield(self._scan)

    async def _load(self) -> None:
        fresh: dict[int, tuple[str, int]] = {}
        for ctr in await self.backend.running_published_ports():
            for key, entry in (ctr.get("published_ports") or {}).items():
                ext = entry.get("external_port") if isinstance(entry, dict) else None
                if isinstance(ext, int) and key.isdigit():
                    fresh[ext] = (ctr["uuid"], int(key))
        self._map = fresh


class Forwarder:
    """C1 -> C2 for ordinary requests: one pooled keep-alive session per controller URL.

    Every request sent through it carries ``X-Arvados-No-Forward: 1`` (C2 then answers from its
    own tunnel or refuses, never forwards again), the client's ``Host``, path and query
    unchanged. No cookie jar (the session is shared by every user), no redirects followed, no
    decompression: the response goes back to the client as C2 sent it.
    """

    CONNECT_TIMEOUT_S = 30.0
    RESPONSE_HEAD_TIMEOUT_S = 60.0

    def __init__(self, insecure: bool, ca_file: str | None) -> None:
        self.insecure = insecure
        self.ca_file = ca_file
        self._sessions: dict[str, aiohttp.ClientSession] = {}

    def _session(self, url: str) -> aiohttp.ClientSession:
        session = self._sessions.get(url)
        if session is None or session.closed:
            from tunnel.broker import _client_ssl

            connector = aiohttp.TCPConnector(ssl=_client_ssl(self.insecure, self.ca_file),
                                             limit=0, keepalive_timeout=30)
            session = aiohttp.ClientSession(
                connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.CONNECT_TIMEOUT_S))
            self._sessions[url] = session
        return session

    async def close(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            await session.close()

    async def forward(self, request: web.Request, url: str, body: bytes) -> web.StreamResponse:
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in request.headers.items():
            # HOP_BY_HOP: aiohttp frames the forwarded request itself, and the mark is ours.
            if name.lower() not in HOP_BY_HOP:
                headers.add(name, value)
        headers["Host"] = request.host
        headers[NO_FORWARD] = "1"
        send_body = body if body or request.method in ("POST", "PUT", "PATCH") else None
        target = URL(url.rstrip("/") + request.raw_path, encoded=True)
        try:
            async with asyncio.timeout(self.RESPONSE_HEAD_TIMEOUT_S):
                upstream = await self._session(url).request(
                    request.method, target, headers=headers, data=send_body,
                    allow_redirects=False)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise WebError(f"cannot reach the controller holding the tunnel: {exc}",
                           503) from exc
        async with upstream:
            length = upstream.headers.get("Content-Length", "")
            bodyless = request.method == "HEAD" or upstream.status in (204, 304)
            return await send_response(
                request, upstream.status, upstream.reason or "", list(upstream.headers.items()),
                None if bodyless or not length.isdigit() else int(length),
                upstream.content.iter_any(), errors=(aiohttp.ClientError, OSError),
                what="forwarded container web service response")


async def relay_response(request: web.Request, st: TunnelStream, uuid: str, status: int,
                         reason: str, headers: list[tuple[str, str]], rest: bytes, *,
                         decorate: Callable[[web.StreamResponse], Any], what: str
                         ) -> web.StreamResponse:
    """Send a response whose head came over the tunnel stream ``st`` (``rest``: the body bytes
    read with the head) to the client; ``decorate`` adds our headers. Container web services
    and live container logs both answer this way."""
    body = BodyReader(status, headers, request.method)

    async def chunks() -> AsyncIterator[bytes]:
        data = body.feed(rest)
        while True:
            if data:
                yield data
            if body.done:
                return
            chunk = await st.read()
            if not chunk:
                body.feed_eof()
                return
            data = body.feed(chunk)

    return await send_response(request, status, reason, headers, body.length, chunks(),
                               errors=(StreamError, WebError), what=what, decorate=decorate,
                               log_extra={"container_uuid": uuid})


async def send_response(request: web.Request, status: int, reason: str,
                        headers: Iterable[tuple[str, str]], length: int | None,
                        chunks: AsyncIterator[bytes], *, errors: tuple[type[Exception], ...],
                        what: str, decorate: Callable[[web.StreamResponse], Any] | None = None,
                        log_extra: Mapping[str, Any] | None = None) -> web.StreamResponse:
    """Write an upstream response (the container's, or another controller's) to the client.
    aiohttp frames the body, so the client's connection stays open for its next request.
    ``length`` is the body's Content-Length when it has a body and one is known; a bodyless
    answer (HEAD, 204, 304) keeps the Content-Length a GET would have carried."""
    headers = list(headers)
    resp = web.StreamResponse(status=status, reason=reason or None)
    for name, value in headers:
        if name.lower() not in RESPONSE_HOP_BY_HOP:
            resp.headers.add(name, value)
    if decorate is not None:
        decorate(resp)
    if length is not None:
        resp.content_length = length
    elif request.method == "HEAD" or status in (204, 304):
        for name, value in headers:
            if name.lower() == "content-length":
                resp.headers["Content-Length"] = value
    await resp.prepare(request)
    try:
        async for chunk in chunks:
            await resp.write(chunk)
    except errors as exc:
        # The head is out: all the client can be told is that the connection broke.
        log.info("%s cut short: %s", what, exc, extra=dict(log_extra or {}))
        if request.transport is not None:
            request.transport.abort()
        return resp
    await resp.write_eof()
    return resp


class WebServices:
    """The vhost proxy; ``middleware`` is added to the broker's application."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.external_ports = ExternalPorts(broker.backend)
        self.forwarder = Forwarder(broker.config.tls_insecure, broker.config.ca_file)

    async def close(self) -> None:
        await self.forwarder.close()

    @web.middleware
    async def middleware(self, request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
        cfg = self.broker.config
        target = vhost_target(cfg.web_services_url, request.host, cfg.web_port_min,
                              cfg.web_port_max)
        if target is None:
            return await handler(request)
        try:
            return await self.handle(request, target)
        except WebError as exc:
            return web.json_response({"errors": [str(exc)]}, status=exc.status)

    async def _resolve(self, target: str) -> tuple[dict[str, Any], int, dict[str, Any]]:
        """Target -> (container, container port, published_ports), looked up as root (5.2);
        the ports are the container request's for a request target."""
        backend = self.broker.backend
        try:
            if target.startswith(":"):
                found = await self.external_ports.resolve(int(target[1:]))
                if found is None:
                    raise WebError("unassigned port: no running container holds this port",
                                   410)
                ctr, port = found
                return ctr, port, ctr.get("published_ports") or {}
            m = TARGET_RE.match(target)
            if m is None:
                m = TARGET_RE.match(await self._link_target(target))
            if m is None:
                raise WebError("container web service not found", 404)
            uuid, port = m.group(1), int(m.group(2))
            if not 1 <= port <= 65535:
                raise WebError("bad port", 400)
            if "-xvhdp-" in uuid:
                cr = await backend.container_request(uuid)
                uuid = cr.get("container_uuid") or ""
                if not uuid:
                    raise WebError("container request has no container", 400)
                return await backend.container(uuid), port, cr.get("published_ports") or {}
            ctr = await backend.container(uuid)
            return ctr, port, ctr.get("published_ports") or {}
        except NotFound as exc:
            raise WebError("container web service not found", 404) from exc
        except ArvadosError as exc:
            raise WebError(f"cannot look up the container: {exc}", 503) from exc

    async def _link_target(self, name: str) -> str:
        """A web service published under a name: the first ``published_port`` link called
        ``name`` (looked up as root) stands for ``<head_uuid>-<properties.port>``."""
        link = await self.broker.backend.published_port_link(name)
        if link is None:
            raise WebError("container web service not found", 404)
        port = (link.get("properties") or {}).get("port")
        # JSON has one number type: 8080.0 is 8080, but a string or a boolean is no port.
        if isinstance(port, float) and port.is_integer():
            port = int(port)
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            log.warning("published_port link %s has an invalid port %r", link.get("uuid"), port)
            raise WebError(f"published_port link {link.get('uuid')} has an invalid port "
                           "(properties.port must be a number 1..65535)", 500)
        return f"{link.get('head_uuid') or ''}-{port}"

    async def handle(self, request: web.Request, target: str) -> web.StreamResponse:
        backend = self.broker.backend
        query_token = request.query.get("arvados_api_token", "")
        token = query_token or _cookie_token(request) or _header_token(request)
        register_secret(token)
        ctr, port, ports = await self._resolve(target)
        uuid = ctr["uuid"]
        public = (ports.get(str(port)) or {}).get("access") == "public"

        redirect_cookies: list[str] = []
        clear_site = False
        stale = request.cookies.get("arvados_container_uuid")
        if stale and stale != uuid:
            if request.method not in ("GET", "HEAD"):
                return web.Response(status=410)
            clear_site = True
            redirect_cookies += [f"{name}=; Path=/; Max-Age=-1" for name in request.cookies
                                 if name != "arvados_api_token"]
        if query_token:
            enc = base64.urlsafe_b64encode(query_token.encode()).decode().rstrip("=")
            redirect_cookies.append(f"arvados_api_token={enc}; Path=/; HttpOnly; SameSite=Lax")
        if query_token or clear_site:
            rest = [(k, v) for k, v in parse_qsl(request.query_string, keep_blank_values=True)
                    if k != "arvados_api_token"]
            location = request.path + (("?" + urlencode(rest)) if rest else "")
            return _redirect(location, redirect_cookies, clear_site)

        if not public:
            if not token:
                raise WebError("this container port is private: log in (send a token)", 401)
            try:
                user = await backend.current_user(token)
                await backend.container_as_user(token, uuid)
            except Forbidden as exc:
                raise WebError("invalid or expired token", 401) from exc
            except NotFound as exc:
                raise WebError("container web service not found", 404) from exc
            except ArvadosError as exc:
                raise WebError(f"cannot check permission: {exc}", 503) from exc
            if not user.get("is_admin"):
                items, available = await backend.requests_for(uuid)
                if available != len(items) or any(
                        cr.get("modified_by_user_uuid") != user.get("uuid") for cr in items):
                    raise WebError("permission denied: container is associated with requests "
                                   "submitted by other users", 403)
        return await self._proxy(request, ctr, port)

    async def _proxy(self, request: web.Request, ctr: dict[str, Any], port: int
                     ) -> web.StreamResponse:
        from tunnel.broker import canonical_url

        uuid = ctr["uuid"]
        body = await request.read()
        no_forward = request.headers.get(NO_FORWARD, "") not in ("", "0", "false")
        upgrade = "upgrade" in request.headers.get("Connection", "").lower()
        conn = self.broker.tunnels.get(uuid)
        if conn is None or conn.closed.done():
            addr = ctr.get("gateway_address") or ""
            url = canonical_url(addr[len("tunnel "):]) if addr.startswith("tunnel ") else ""
            if url and url != self.broker.internal_url and not no_forward:
                known = {canonical_url(u) for u in self.broker.config.controller_internal_urls}
                if url not in known:
                    raise WebError("container gateway is running but tunnel endpoint is "
                                   "invalid", 503)
                if upgrade:
                    return await self._forward_upgrade(request, url, body)
                return await self.forwarder.forward(request, url, body)
            raise WebError("container is not reachable: its tunnel is down or it is not "
                           "running", 503)
        head = self._request_head(request, len(body), upgrade, uuid)
        try:
            st = await conn.open_stream(f"container:{port}")
        except StreamError as exc:
            raise WebError(f"cannot reach port {port} in the container: {exc}", 502) from exc
        st.write(head + body)
        # Read the container's response head, then relay the body (or splice an upgrade).
        buf = b""
        try:
            while b"\r\n\r\n" not in buf:
                async with asyncio.timeout(60):
                    chunk = await st.read()
                if not chunk:
                    raise WebError("the container closed the connection without answering", 502)
                buf += chunk
                if len(buf) > MAX_HEAD:
                    raise WebError("response head from the container is too long", 502)
        except (StreamError, TimeoutError) as exc:
            st.abort()
            raise WebError(f"proxy error: {exc}", 502) from exc
        except WebError:
            st.abort()
            raise
        rhead, _, rest = buf.partition(b"\r\n\r\n")
        if upgrade:
            return await self._splice_upgrade(request, st, uuid, rhead, rest)
        try:
            status, reason, headers = parse_response_head(rhead)
            return await relay_response(
                request, st, uuid, status, reason, headers, rest,
                decorate=lambda resp: resp.headers.add("Set-Cookie",
                                                       f"arvados_container_uuid={uuid}"),
                what="container web service response")
        finally:
            if not st.done.done():
                st.abort()

    async def _splice_upgrade(self, request: web.Request, st: TunnelStream, uuid: str,
                              rhead: bytes, rest: bytes) -> web.StreamResponse:
        """Websockets and other upgrades: the connection is spliced to the stream for good."""
        from tunnel.broker import _ChainedPipe, _Hijacked, hijack

        out = [*rhead.split(b"\r\n"), f"Set-Cookie: arvados_container_uuid={uuid}".encode()]
        pipe = _ChainedPipe(st)
        hijack(request, b"\r\n".join(out) + b"\r\n\r\n" + rest, pipe, pipe.take_over)
        try:
            await st.done
            if pipe.transport is not None:
                pipe.transport.close()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(10):
                        await asyncio.shield(pipe.lost)
        finally:
            if pipe.transport is not None:
                pipe.transport.abort()
        return _Hijacked()

    def _request_head(self, request: web.Request, body_len: int, upgrade: bool, uuid: str
                      ) -> bytes:
        lines = [f"{request.method} {request.raw_path} HTTP/1.1", f"Host: {request.host}"]
        for name, value in request.headers.items():
            low = name.lower()
            if upgrade and low == "connection":
                value = "Upgrade"  # one request per stream; a "close" token is moot here
            elif low in HOP_BY_HOP and not (upgrade and low == "upgrade"):
                continue
            if low == "cookie":
                jar = SimpleCookie()
                with contextlib.suppress(Exception):
                    jar.load(value)
                kept = [f"{k}={m.value}" for k, m in jar.items() if k != "arvados_api_token"]
                if not kept:
                    continue
                value = "; ".join(kept)
            lines.append(f"{name}: {value}")
        if not upgrade:
            lines.append("Connection: close")
        if body_len or request.method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {body_len}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _forward_upgrade(self, request: web.Request, url: str, body: bytes
                               ) -> web.StreamResponse:
        """C1 -> C2 for an upgrade (websocket): the client connection is spliced to a new
        connection to C2 for good; it carries this one marked request and the upgraded bytes."""
        from tunnel.broker import _client_ssl, _Hijacked, _Splice, hijack

        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port or 443
        lines = [f"{request.method} {request.raw_path} HTTP/1.1", f"Host: {request.host}"]
        for name, value in request.headers.items():
            low = name.lower()
            if low in ("host", "content-length", "transfer-encoding", "expect", "connection",
                       NO_FORWARD.lower()):
                continue
            lines.append(f"{name}: {value}")
        # "close": if C2 answers without switching protocols, it closes the connection, so no
        # further request of this client can reach C2 without the no-forward mark.
        lines += ["Connection: Upgrade, close", f"{NO_FORWARD}: 1",
                  f"Content-Length: {len(body)}"]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        loop = asyncio.get_running_loop()
        upstream, client = _Splice(), _Splice()
        upstream.peer, client.peer = client, upstream
        try:
            async with asyncio.timeout(30):
                transport, _ = await loop.create_connection(
                    lambda: upstream, host, port,
                    ssl=_client_ssl(self.broker.config.tls_insecure, self.broker.config.ca_file),
                    server_hostname=host)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raise WebError(f"cannot reach the controller holding the tunnel: {exc}",
                           503) from exc
        transport.write(head + body)
        hijack(request, b"", client, client.take)
        try:
            await asyncio.wait([upstream.done, client.done], return_when=asyncio.ALL_COMPLETED)
        finally:
            for t in (upstream.transport, client.transport):
                if t is not None:
                    t.abort()
        return _Hijacked()
