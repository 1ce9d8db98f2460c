"""Container logs as WebDAV: ``/arvados/v1/container_requests/{uuid}/log{path}`` (reference 6).

Mounted by the broker (it holds the tunnels) into the controller's application, for ``GET``,
``HEAD``, ``OPTIONS`` and ``PROPFIND``:

* ``OPTIONS`` with ``Access-Control-Request-Method`` is a CORS preflight, answered here without
  a token. Everything else needs a token (``Authorization: Bearer``, or the Basic password, which
  is what WebDAV clients send after the ``401`` with ``Www-Authenticate: Basic
  realm="collections"``) that can read the container request.
* While the request's current container is ``Locked``/``Running`` with a ``gateway_address`` and
  the path is ``/<container uuid>`` or below, the request goes to crunch-run's live-log server:
  one ``log.gateway:80`` tunnel stream carrying one HTTP/1.1 request with ``X-Webdav-Prefix:
  /arvados/v1/container_requests/<cr>/log/<ctr>`` and ``X-Webdav-Source: /log``, or, when
  another controller holds the tunnel, to that controller (once: the forwarded request carries
  ``?no_forward=true`` and ``X-Arvados-No-Forward: 1``).
* Otherwise, or when the gateway cannot be reached and the container has just finished, the
  logs saved in the ``logs`` table are served as the same files (``<event type>.txt``) from
  memory: at the top level once the container has finished, and under ``/<container uuid>/`` in
  any state, also for an earlier attempt (a container the caller can read); an empty directory
  when there are none. The gateway failing while the container is
  still ``Locked``/``Running`` is ``503 proxy error: ...``.

Neither the user's token nor any cookie reaches crunch-run: the stream carries only the
WebDAV headers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from dispatcher.arvados.errors import ArvadosError, Forbidden, NotFound
from dispatcher.logs import register_secret
from dispatcher.service import ROUTE_KEY
from tunnel.connection import StreamError
from tunnel.errors import TunnelError
from tunnel.protocol import LOG_TARGET
from tunnel.webdav import (
    GATEWAY_UUID_HEADER,
    LOG_SOURCE,
    PREFIX_HEADER,
    SOURCE_HEADER,
    MemFS,
    Tree,
    serve,
)
from tunnel.webservices import (
    MAX_HEAD,
    NO_FORWARD,
    WebError,
    parse_response_head,
    relay_response,
)

if TYPE_CHECKING:
    from tunnel.broker import Broker

log = logging.getLogger("crunchgate.tunnel.containerlogs")

ROUTE = r"/arvados/v1/container_requests/{uuid}/log{path:(/.*)?}"
METHODS = ("GET", "HEAD", "OPTIONS", "PROPFIND")
LIVE_STATES = frozenset({"Locked", "Running"})
FINAL_STATES = frozenset({"Complete", "Cancelled"})
# Request headers the live-log server may use; nothing else (no token, no cookie) is passed on.
PASSED_HEADERS = ("Range", "If-Range", "Depth", "Content-Type", "Accept")
CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": ", ".join(METHODS),
    "Access-Control-Allow-Headers": "Authorization, Content-Type, Range, Depth, Cache-Control",
    "Access-Control-Max-Age": "86400",
}
EXPOSE = {"Access-Control-Allow-Origin": "*",
          "Access-Control-Expose-Headers": "Content-Range, Dav, Allow"}
RESPONSE_HEAD_TIMEOUT_S = 60.0


class _ProxyFailed(TunnelError):
    """The live-log server could not be asked (before any response byte reached the client)."""


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    resp = web.json_response({"errors": [message]}, status=status)
    resp.headers.update(EXPOSE)
    if headers:
        resp.headers.update(headers)
    return resp


def saved_log_files(records: list[dict[str, Any]]) -> dict[str, bytes]:
    """``logs`` records (in id order) -> ``{"stderr.txt": b"...", ...}`` by event type."""
    parts: dict[str, list[str]] = {}
    for rec in records:
        text = (rec.get("properties") or {}).get("text")
        if isinstance(text, str) and text:
            parts.setdefault(f"{rec.get('event_type')}.txt", []).append(text)
    return {name: "".join(texts).encode("utf-8") for name, texts in parts.items()}


class ContainerLogs:
    """The route handler; :meth:`setup` mounts it (the broker does, see ``Broker.setup``)."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def setup(self, app: web.Application) -> None:
        for method in METHODS:
            app.router.add_route(method, ROUTE, self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        from tunnel.broker import FALSE_WORDS, UUID_RE, request_token

        request[ROUTE_KEY] = "container_requests.log"
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            return web.Response(status=200, headers=CORS_HEADERS)
        cr_uuid = request.match_info["uuid"]
        path = request.match_info.get("path", "")
        if not UUID_RE.match(cr_uuid) or "-xvhdp-" not in cr_uuid:
            return _error(404, "not found")
        token = request_token(request)
        register_secret(token)
        no_forward = any(v.strip().lower() not in FALSE_WORDS for v in (
            request.query.get("no_forward", ""), request.headers.get(NO_FORWARD, "")))
        backend = self.broker.backend
        unauthorized = {"Www-Authenticate": 'Basic realm="collections"'}
        if not token:
            return _error(401, "not logged in: send a token", unauthorized)
        try:
            cr = await backend.container_request_as_user(token, cr_uuid)
        except Forbidden:
            return _error(401, "invalid or expired token", unauthorized)
        except NotFound:
            return _error(404, f"container request {cr_uuid} not found")
        except ArvadosError as exc:
            return _error(503, f"cannot read the container request: {exc}")
        ctr_uuid = str(cr.get("container_uuid") or "")
        ctr: dict[str, Any] | None = None
        if ctr_uuid:
            try:
                ctr = await backend.container_as_user(token, ctr_uuid)
            except NotFound:
                ctr = None
            except Forbidden:
                return _error(401, "invalid or expired token", unauthorized)
            except ArvadosError as exc:
                return _error(503, f"cannot read the container: {exc}")
        base = f"/arvados/v1/container_requests/{cr_uuid}/log"
        first = path.split("/", 2)[1] if path.startswith("/") else ""
        if first and first != ctr_uuid and UUID_RE.match(first) and "-dz642-" in first:
            # An earlier attempt of this request (reference 6.3): its saved logs, if the
            # caller can read that container.
            try:
                old = await backend.container_as_user(token, first)
            except (NotFound, Forbidden):
                return _error(404, f"container {first} not found")
            except ArvadosError as exc:
                return _error(503, f"cannot read the container: {exc}")
            return await self._saved(request, base, first, old, True)
        in_ctr = bool(ctr_uuid) and first == ctr_uuid
        if (ctr is not None and in_ctr and ctr.get("state") in LIVE_STATES
                and ctr.get("gateway_address")):
            try:
                return await self._live(request, base, ctr, no_forward)
            except _ProxyFailed as exc:
                try:
                    ctr = await backend.container(ctr_uuid)
                except ArvadosError as fetch_exc:
                    return _error(503, f"error re-fetching container record: {fetch_exc}")
                if ctr.get("state") in LIVE_STATES:
                    return _error(503, f"proxy error: {exc}")
                # It has just finished: what it left is in the logs table.
        return await self._saved(request, base, ctr_uuid, ctr, in_ctr)

    # --- live: crunch-run's gateway -------------------------------------------------------------

    async def _live(self, request: web.Request, base: str, ctr: dict[str, Any],
                    no_forward: bool) -> web.StreamResponse:
        from tunnel.broker import canonical_url

        uuid = ctr["uuid"]
        conn = self.broker.tunnels.get(uuid)
        if conn is not None and not conn.closed.done():
            return await self._via_stream(request, conn, f"{base}/{uuid}", uuid)
        addr = str(ctr.get("gateway_address") or "")
        if not addr.startswith("tunnel "):
            raise _ProxyFailed("container gateway is not reachable through a tunnel")
        url = canonical_url(addr[len("tunnel "):])
        if url == self.broker.internal_url or no_forward:
            raise _ProxyFailed("container is running but tunnel is down")
        known = {canonical_url(u) for u in self.broker.config.controller_internal_urls}
        if url not in known:
            log.warning("gateway_address names a controller that is not in "
                        "Services.Controller.InternalURLs: %s", url,
                        extra={"container_uuid": uuid})
            raise _ProxyFailed("container gateway is running but tunnel endpoint is invalid")
        # Cloned before the body is read (aiohttp refuses to clone a request after that): a
        # WebDAV client's PROPFIND carries an XML body.
        marked = request.clone(rel_url=request.rel_url.update_query(no_forward="true"))
        body = await request.read()
        try:
            resp = await self.broker.webservices.forwarder.forward(marked, url, body)
        except WebError as exc:
            raise _ProxyFailed(str(exc)) from exc
        log.debug("live log request forwarded to %s", url, extra={"container_uuid": uuid})
        return resp

    async def _via_stream(self, request: web.Request, conn: Any, prefix: str, uuid: str
                          ) -> web.StreamResponse:
        body = await request.read() if request.method == "PROPFIND" else b""
        path = request.raw_path.split("?", 1)[0]
        lines = [f"{request.method} {path} HTTP/1.1", "Host: log.gateway"]
        for name in PASSED_HEADERS:
            if name in request.headers:
                lines.append(f"{name}: {request.headers[name]}")
        lines += [f"{PREFIX_HEADER}: {prefix}", f"{SOURCE_HEADER}: {LOG_SOURCE}",
                  f"{GATEWAY_UUID_HEADER}: {uuid}", "Connection: close",
                  f"Content-Length: {len(body)}"]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        try:
            st = await conn.open_stream(LOG_TARGET)
        except StreamError as exc:
            if exc.status == 404:  # the gateway is up but keeps no live logs (reference 6.2)
                return _error(404, str(exc))
            raise _ProxyFailed(f"cannot reach the container gateway: {exc}") from exc
        try:
            st.write(head + body)
            buf = b""
            while b"\r\n\r\n" not in buf:
                async with asyncio.timeout(RESPONSE_HEAD_TIMEOUT_S):
                    chunk = await st.read()
                if not chunk:
                    raise _ProxyFailed("the container gateway closed the stream without "
                                       "answering")
                buf += chunk
                if len(buf) > MAX_HEAD:
                    raise _ProxyFailed("response head from the container gateway is too long")
            rhead, _, rest = buf.partition(b"\r\n\r\n")
            try:
                status, reason, headers = parse_response_head(rhead)
            except WebError as exc:
                raise _ProxyFailed(str(exc)) from exc
            return await relay_response(
                request, st, uuid, status, reason, headers, rest,
                decorate=lambda resp: resp.headers.update(EXPOSE), what="live log response")
        except (StreamError, TimeoutError) as exc:
            raise _ProxyFailed(f"container gateway: {exc or 'no answer in time'}") from exc
        finally:
            if not st.done.done():
                st.abort()

    # --- saved: the logs table ------------------------------------------------------------------

    async def _saved(self, request: web.Request, base: str, ctr_uuid: str,
                     ctr: dict[str, Any] | None, in_ctr: bool) -> web.StreamResponse:
        files: dict[str, bytes] = {}
        if ctr_uuid:
            try:
                files = saved_log_files(await self.broker.backend.container_logs(ctr_uuid))
            except ArvadosError as exc:
                return _error(503, f"cannot read the saved logs: {exc}")
        mtime = time.time()
        if in_ctr:
            fs, prefix = MemFS(files, mtime), f"{base}/{ctr_uuid}"
        else:
            tree: dict[str, Tree | bytes] = {}
            if ctr is not None and ctr.get("state") in FINAL_STATES and files:
                # The finished container's logs, and the same under its own directory (the
                # listing shows no directory for a container that has not finished).
                tree = {**files, ctr_uuid: files}
            fs, prefix = MemFS(tree, mtime), base
        return await serve(request, fs, prefix, EXPOSE)
