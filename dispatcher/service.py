"""The service wrapper every crunchgate daemon uses (controller, dispatchers, broker).

:func:`create_service_app` returns an aiohttp application that already serves

* ``GET /_health/ping`` — requires ``Authorization: Bearer <ManagementToken>``. 404
  ``{"errors": ["disabled"]}`` when no ManagementToken is configured, 401 without the header,
  403 with a wrong token; otherwise 200 with ``{"health": "OK"}`` or
  ``{"health": "ERROR", "error": "..."}`` from the service's health check (200 in both cases, as
  Arvados does: monitoring reads the body).
* ``GET /metrics`` (Prometheus text) and ``GET /metrics.json`` — same Bearer ManagementToken.
  **Deliberate difference from Arvados:** when ManagementToken is empty, Arvados serves metrics
  to anyone; crunchgate answers 404 ``disabled``, exactly like the health check. Metrics reveal
  queue sizes, instance counts and container UUIDs, so they are management data and get the
  management token's protection; a site that wants them sets a ManagementToken.

The service adds its own routes to the same application. :func:`run_service` listens (on the
service's own InternalURL when given the config) and shuts down cleanly on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import logging
import os
import signal
import socket
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from prometheus_client import CollectorRegistry, Histogram

from dispatcher.config import ClusterConfig, ConfigError, listen_url
from dispatcher.logs import redact, register_secret
from dispatcher.metrics import install_standard_metrics, new_registry, render, render_json

log = logging.getLogger("crunchgate.service")

# A health check returns None (or "") when healthy and an error text otherwise; it may be
# async, and an exception it raises counts as unhealthy.
HealthCheck = Callable[[], "Awaitable[str | None] | str | None"]

HEALTH_CHECK_TIMEOUT_S = 10.0
REQUEST_ID_HEADER = "X-Request-Id"


class ServiceError(Exception):
    """The service cannot start: bad listen address, missing TLS files, failed health check."""


@dataclass
class ServiceState:
    """Mutable per-application state of the wrapper (an aiohttp app is frozen once running)."""

    service_name: str
    management_token: str
    registry: CollectorRegistry
    health: HealthCheck | None = None
    # (host, port) pairs actually bound by run_service, e.g. to learn the port after port 0.
    addresses: list[tuple[str, int]] = field(default_factory=list)


STATE_KEY = web.AppKey("crunchgate_service_state", ServiceState)


def create_service_app(
    cfg: ClusterConfig | None = None,
    service_name: str = "",
    registry: CollectorRegistry | None = None,
    *,
    health: HealthCheck | None = None,
    management_token: str | None = None,
    config_path: str | os.PathLike[str] | None = None,
    standard_metrics: bool = True,
    **app_kwargs: Any,
) -> web.Application:
    """Build the application for one service, with health and metrics routes in place.

    ``management_token`` overrides ``cfg.management_token`` (useful in tests). ``registry`` is
    the service's Prometheus registry (a new one if omitted; get it back with
    :func:`registry_of`). ``app_kwargs`` go to :class:`aiohttp.web.Application` (e.g.
    ``client_max_size``).
    """
    token = management_token if management_token is not None else (
        cfg.management_token if cfg is not None else ""
    )
    register_secret(token)
    registry = registry if registry is not None else new_registry()
    if standard_metrics:
        install_standard_metrics(registry, service=service_name, config_path=config_path)
    duration = Histogram(
        "request_duration_seconds", "Time spent serving HTTP requests (until the handler returns).",
        ["method", "code"], registry=registry,
    )
    middlewares = list(app_kwargs.pop("middlewares", ()))
    app = web.Application(middlewares=[_request_middleware(duration), *middlewares],
                          **app_kwargs)
    app[STATE_KEY] = ServiceState(service_name, token, registry, health)
    app.router.add_get("/_health/ping", _health_ping)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/metrics.json", _metrics_json)
    return app


# The name docs/internals.md uses for the factory.
ServiceApp = create_service_app


def set_health_check(app: web.Application, check: HealthCheck | None) -> None:
    """Install (or replace) the service's health check; allowed while the app is running."""
    app[STATE_KEY].health = check


def registry_of(app: web.Application) -> CollectorRegistry:
    """The Prometheus registry served on the app's ``/metrics``."""
    return app[STATE_KEY].registry


def bound_addresses(app: web.Application) -> list[tuple[str, int]]:
    """The (host, port) pairs :func:`run_service` is listening on (empty before it listens)."""
    return list(app[STATE_KEY].addresses)


# --- Handlers ---------------------------------------------------------------------------------


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"errors": [message]}, status=status)


def _management_auth(request: web.Request) -> web.Response | None:
    """None if the request carries the ManagementToken; otherwise the response to send."""
    token = request.app[STATE_KEY].management_token
    if not token:
        return _error(404, "disabled")
    header = request.headers.get("Authorization", "")
    if not header:
        return _error(401, "authorization required")
    scheme, _, given = header.partition(" ")
    # compare_digest: the time taken must not reveal how much of the token was right.
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), token.encode()
    ):
        return _error(403, "authorization error")
    return None


async def _health_ping(request: web.Request) -> web.Response:
    denied = _management_auth(request)
    if denied is not None:
        return denied
    problem = await run_health_check(request.app[STATE_KEY].health)
    if problem:
        return web.json_response({"health": "ERROR", "error": problem})
    return web.json_response({"health": "OK"})


async def run_health_check(check: HealthCheck | None) -> str | None:
    """Run a health check with a deadline; return None when healthy, else the (redacted) error."""
    if check is None:
        return None
    try:
        async with asyncio.timeout(HEALTH_CHECK_TIMEOUT_S):
            result = check()
            if inspect.isawaitable(result):
                result = await result
    except TimeoutError:
        return f"health check did not answer within {HEALTH_CHECK_TIMEOUT_S:g}s"
    except Exception as exc:  # any failure of the check is "unhealthy", not a 500
        return redact(f"{type(exc).__name__}: {exc}")
    return redact(str(result)) if result else None


async def _metrics(request: web.Request) -> web.Response:
    denied = _management_auth(request)
    if denied is not None:
        return denied
    body, content_type = render(request.app[STATE_KEY].registry)
    # content_type carries parameters (version, charset); aiohttp wants them in the header.
    return web.Response(body=body, headers={"Content-Type": content_type})


async def _metrics_json(request: web.Request) -> web.Response:
    denied = _management_auth(request)
    if denied is not None:
        return denied
    return web.Response(body=render_json(request.app[STATE_KEY].registry),
                        content_type="application/json")


def _request_middleware(duration: Histogram) -> Any:
    """Request ID (kept from the client or generated) on every response, plus request timing."""

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        request_id = request.headers.get(REQUEST_ID_HEADER) or f"req-{uuid.uuid4().hex[:20]}"
        started = time.monotonic()
        status = 500
        try:
            response: web.StreamResponse = await handler(request)
            status = response.status
            if not response.prepared:
                response.headers.setdefault(REQUEST_ID_HEADER, request_id)
            return response
        except web.HTTPException as exc:
            status = exc.status
            exc.headers.setdefault(REQUEST_ID_HEADER, request_id)
            raise
        finally:
            duration.labels(method=request.method, code=str(status)).observe(
                time.monotonic() - started
            )

    return middleware


# --- Running ----------------------------------------------------------------------------------


def listen_address(cfg: ClusterConfig, service: str) -> tuple[str, int, bool]:
    """``(host, port, tls)`` this process should listen on for ``service``.

    Uses the service's own InternalURLs entry (see :func:`dispatcher.config.service_internal_url`)
    and its ``ListenURL`` when set; the port defaults to 80/443 by scheme.
    """
    url = listen_url(cfg, service)
    parts = urlsplit(url)
    tls = parts.scheme == "https"
    host = parts.hostname or ""
    port = parts.port or (443 if tls else 80)
    return host, port, tls


def tls_context_from_config(cfg: ClusterConfig) -> ssl.SSLContext:
    """Server TLS context from ``TLS.Certificate`` / ``TLS.Key`` (paths, optionally file://)."""
    cert, key = _strip_file_url(cfg.tls.certificate), _strip_file_url(cfg.tls.key)
    if not cert or not key:
        raise ServiceError(
            "an https InternalURL needs TLS.Certificate and TLS.Key (PEM file paths) in the "
            "config; 'crunchgate certs' creates a development pair"
        )
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ServiceError(f"cannot load TLS certificate {cert} / key {key}: {exc}") from None
    return ctx


def _strip_file_url(value: str) -> str:
    return value[len("file://"):] if value.startswith("file://") else value


async def run_service(
    app: web.Application,
    host: str | ClusterConfig,
    port: int | str = 0,
    *,
    ssl_context: ssl.SSLContext | None = None,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
    shutdown_timeout_s: float = 10.0,
) -> None:
    """Serve ``app`` until SIGTERM/SIGINT (or ``stop`` is set), then shut down cleanly.

    Two ways to say where::

        await run_service(app, "127.0.0.1", 9006)                  # explicit
        await run_service(app, cfg, "DispatchSLURM")               # the service's InternalURL

    With a config, an ``https`` URL gets a TLS context from ``TLS.Certificate``/``TLS.Key``
    unless ``ssl_context`` is given. The service's health check runs once before listening and
    a failure raises :class:`ServiceError` (as Arvados exits 1). ``ready`` is set once the
    socket listens (see :func:`bound_addresses` for the port), and ``READY=1`` goes to systemd
    when ``$NOTIFY_SOCKET`` is set.
    """
    if isinstance(host, ClusterConfig):
        cfg, service = host, str(port)
        try:
            bind_host, bind_port, tls = listen_address(cfg, service)
        except ConfigError as exc:
            raise ServiceError(str(exc)) from None
        if tls and ssl_context is None:
            ssl_context = tls_context_from_config(cfg)
    else:
        bind_host, bind_port = host, int(port)
    state = app[STATE_KEY]
    problem = await run_health_check(state.health)
    if problem:
        raise ServiceError(f"{state.service_name or 'service'} is not healthy at startup: {problem}")

    stop = stop if stop is not None else asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread (tests) or no signal support: rely on ``stop``

    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout_s)
    await runner.setup()
    try:
        site = web.TCPSite(runner, bind_host or None, bind_port, ssl_context=ssl_context)
        try:
            await site.start()
        except OSError as exc:
            raise ServiceError(
                f"cannot listen on {bind_host or '*'}:{bind_port}: {exc.strerror or exc}"
            ) from None
        state.addresses = _sockets_of(runner)
        log.info(
            "listening",
            extra={"service": state.service_name, "addresses": state.addresses,
                   "tls": ssl_context is not None},
        )
        if ready is not None:
            ready.set()
        _sd_notify("READY=1")
        await stop.wait()
        log.info("shutting down", extra={"service": state.service_name})
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await runner.cleanup()
        state.addresses = []


def _sockets_of(runner: web.AppRunner) -> list[tuple[str, int]]:
    return [(str(addr[0]), int(addr[1])) for addr in runner.addresses]


def _sd_notify(message: str) -> None:
    """Tell systemd (Type=notify units) the service is up; a no-op outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # abstract socket namespace
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        s.sendall(message.encode())

