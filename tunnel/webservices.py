"""Container web services: ``https://<uuid>-<port>.<ContainerWebServices wildcard>/...``.

Requests whose ``Host`` matches ``Services.ContainerWebServices.ExternalURL`` (wildcard form,
e.g. ``https://*.containers.example.com``) are proxied to that port of the container through
its tunnel (reference section 5):

* target ``<container or container request UUID>-<port>``;
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

Each request is one tunnel stream and one client connection (``Connection: close``): the
response is relayed as bytes, so chunked bodies, streaming and upgrades need no special cases.
When the tunnel is held by another controller, the request goes there once with
``X-Arvados-No-Forward: 1``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from http.cookies import SimpleCookie
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from aiohttp import web

from dispatcher.arvados.errors import ArvadosError, Forbidden, NotFound
from dispatcher.logs import register_secret
from tunnel.connection import StreamError
from tunnel.errors import TunnelError

if TYPE_CHECKING:
    from tunnel.broker import Broker

log = logging.getLogger("crunchgate.tunnel.webservices")

TARGET_RE = re.compile(r"^([a-z0-9]{5}-(?:dz642|xvhdp)-[a-z0-9]{15})-(\d{1,5})$")
NO_FORWARD = "X-Arvados-No-Forward"
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer",
                        "transfer-encoding", "content-length", "host", "upgrade",
                        NO_FORWARD.lower()})
MAX_HEAD = 64 * 1024


class WebError(TunnelError):
    """A refusal answered as ``{"errors": [...]}`` with ``status``."""


def vhost_target(external_url: str, host_header: str) -> str | None:
    """The ``<uuid>-<port>`` prefix if ``host_header`` is a container web-service host."""
    if not external_url or not host_header:
        return None
    cfg = urlsplit(external_url)
    cfg_host = (cfg.hostname or "").lower()
    if not cfg_host.startswith("*"):
        return None
    suffix = cfg_host[1:]
    host, _, port = host_header.lower().rpartition(":")
    if not host or not port.isdigit():
        host, port = host_header.lower(), ""
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


class WebServices:
    """The vhost proxy; ``middleware`` is added to the broker's application."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    @web.middleware
    async def middleware(self, request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
        target = vhost_target(self.broker.config.web_services_url, request.host)
        if target is None:
            return await handler(request)
        try:
            return await self.handle(request, target)
        except WebError as exc:
            return web.json_response({"errors": [str(exc)]}, status=exc.status)

    async def handle(self, request: web.Request, target: str) -> web.StreamResponse:
        m = TARGET_RE.match(target)
        if m is None:
            raise WebError("container web service not found", 404)
        uuid, port = m.group(1), int(m.group(2))
        if not 1 <= port <= 65535:
            raise WebError("bad port", 400)
        backend = self.broker.backend
        query_token = request.query.get("arvados_api_token", "")
        token = query_token or _cookie_token(request) or _header_token(request)
        register_secret(token)
        # Resolve the container and whether the port is public (as root).
        try:
            if "-xvhdp-" in uuid:
                cr = await backend.container_request(uuid)
                ports = cr.get("published_ports") or {}
                uuid = cr.get("container_uuid") or ""
                if not uuid:
                    raise WebError("container request has no container", 400)
                ctr = await backend.container(uuid)
            else:
                ctr = await backend.container(uuid)
                ports = ctr.get("published_ports") or {}
        except NotFound as exc:
            raise WebError("container web service not found", 404) from exc
        except ArvadosError as exc:
            raise WebError(f"cannot look up the container: {exc}", 503) from exc
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
        from tunnel.broker import _ChainedPipe, _Hijacked, canonical_url, hijack

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
                return await self._forward(request, url, body)
            raise WebError("container is not reachable: its tunnel is down or it is not "
                           "running", 503)
        head = self._request_head(request, len(body), upgrade, uuid)
        try:
            st = await conn.open_stream(f"container:{port}")
        except StreamError as exc:
            raise WebError(f"cannot reach port {port} in the container: {exc}", 502) from exc
        st.write(head + body)
        # Read the container's response head, add our cookie, then relay the rest as bytes.
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
        lines = rhead.split(b"\r\n")
        out = [lines[0]]
        for line in lines[1:]:
            if not upgrade and line.split(b":", 1)[0].strip().lower() in (b"connection",
                                                                          b"keep-alive"):
                continue
            out.append(line)
        out.append(f"Set-Cookie: arvados_container_uuid={uuid}".encode())
        if not upgrade:
            out.append(b"Connection: close")
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
            if low in HOP_BY_HOP and not (upgrade and low in ("connection", "upgrade")):
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

    async def _forward(self, request: web.Request, url: str, body: bytes) -> web.StreamResponse:
        """C1 -> C2: the same request to the controller holding the tunnel, relayed raw."""
        from tunnel.broker import _client_ssl, _Hijacked, _Splice, hijack

        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port or 443
        lines = [f"{request.method} {request.raw_path} HTTP/1.1", f"Host: {request.host}"]
        for name, value in request.headers.items():
            if name.lower() not in ("host", "content-length", "transfer-encoding",
                                    NO_FORWARD.lower()):
                lines.append(f"{name}: {value}")
        lines += [f"{NO_FORWARD}: 1", f"Content-Length: {len(body)}"]
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
