"""The controller's HTTP layer (aiohttp): Arvados paths, parameters, auth, errors, metrics.

Requests arrive in every spelling Arvados clients use — the dispatchers' legacy form bodies
(``container={"state":"Cancelled"}``), the Python SDK's JSON bodies
(``{"container_request": {...}}``), GET parameters in the query string (JSON-encoded where not
strings), ``POST`` + ``X-Http-Method-Override: GET`` for long queries, ``?alt=json``. They are
merged into one parameter dict; the handlers validate, then call the :class:`Store` on its
database thread. Errors are ``{"errors": ["..."]}`` with the API status.

The route table is built from the shipped discovery document (:mod:`.discovery`), so every path
and HTTP method served is the one the document announces.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from prometheus_client import CollectorRegistry, Histogram

from dispatcher.logs import register_secret
from dispatcher.service import ROUTE_KEY, request_key

from . import discovery
from .errors import ApiError, BadRequest, NotFound, Unauthorized, Unprocessable
from .filters import ListQuery, parse_list_params, parse_select
from .models import CONTAINER, CONTAINER_REQUEST, LINK, LOG, USER, Resource
from .states import Caller, WebServicesConfig
from .store import ListResult, Store, select_fields

log = logging.getLogger("crunchgate.controller")

STORE_KEY = web.AppKey("crunchgate.controller.store", Store)
CONFIG_KEY = web.AppKey("crunchgate.controller.config", object)
REGISTRY_KEY = web.AppKey("crunchgate.controller.registry", CollectorRegistry)
LISTENERS_KEY = web.AppKey("crunchgate.controller.container_listeners", list)
_METRICS_TASK_KEY = web.AppKey("crunchgate.controller.metrics_task", asyncio.Task[None])
_SWEEP_TASK_KEY = web.AppKey("crunchgate.controller.sweep_task", asyncio.Task[None])
CALLER_KEY = request_key("crunchgate.controller.caller", object)  # the Caller, once known

ContainerCallback = Callable[[dict[str, Any] | None, dict[str, Any]], None]

JSON_TYPE = "application/json"
DEFAULT_ORDER = "modified_at desc"


# --- request context ----------------------------------------------------------------------------


@dataclass
class Call:
    """One API call: the request, its merged parameters and (once checked) the caller."""

    request: web.Request
    params: dict[str, Any]
    store: Store
    caller: Caller | None = None

    @property
    def uuid(self) -> str:
        return self.request.match_info.get("uuid", "")

    def body(self, resource: Resource) -> dict[str, Any]:
        """The resource object of a create/update (``container``, ``container_request``...)."""
        value = self.params.get(resource.singular)
        if value is None:
            return {}
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise BadRequest(f"{resource.singular} parameter is not valid JSON") from None
        if not isinstance(value, dict):
            raise BadRequest(f"{resource.singular} parameter must be a JSON object")
        return value

    def list_query(self, resource: Resource, default_order: str = DEFAULT_ORDER) -> ListQuery:
        max_items = self.store.policy.max_items_per_response
        return parse_list_params(
            self.params, resource, max_items=max_items, default_order=default_order
        )

    def select(self, resource: Resource) -> list[str] | None:
        return parse_select(self.params.get("select"), resource)


def request_token(request: web.Request, params: Mapping[str, Any] | None = None) -> str | None:
    """The API token of a request: ``Authorization: Bearer|OAuth2 <t>`` or ``api_token``."""
    header = request.headers.get("Authorization", "")
    scheme, _, rest = header.partition(" ")
    if scheme.lower() in ("bearer", "oauth2") and rest.strip():
        return rest.strip()
    token = (params or request.query).get("api_token")
    return token if isinstance(token, str) and token else None


async def authenticate_request(request: web.Request, params: Mapping[str, Any] | None = None) -> Caller:
    """The :class:`Caller` of a request (401 if no or an unknown token).

    For routes mounted by ``extra_setup`` (the tunnel broker): ``await authenticate_request(r)``.
    """
    token = request_token(request, params)
    if token is None:
        raise Unauthorized("Not logged in (no API token: send 'Authorization: Bearer <token>')")
    store = request.app[STORE_KEY]
    root = store.policy.system_root_token
    if root and hmac.compare_digest(token.encode(), root.encode()):
        caller = store.system_caller
    else:
        caller = await store.run_small(store.authenticate, token)
    register_secret(token)
    request[CALLER_KEY] = caller
    return caller


async def read_params(request: web.Request) -> dict[str, Any]:
    """Query parameters merged with the body (form fields or a JSON object)."""
    params: dict[str, Any] = dict(request.query)
    if request.body_exists:
        ctype = request.content_type
        if ctype in ("application/x-www-form-urlencoded", "multipart/form-data"):
            form = await request.post()
            params.update({k: v for k, v in form.items() if isinstance(v, str)})
        else:
            raw = await request.read()
            if raw.strip():
                try:
                    body = json.loads(raw)
                except ValueError:
                    raise BadRequest("request body is not valid JSON") from None
                if not isinstance(body, dict):
                    raise BadRequest("request body must be a JSON object")
                params.update(body)
    params.pop("alt", None)
    return params


def json_response(obj: Any, status: int = 200) -> web.Response:
    """``obj`` as JSON; ``str``/``bytes`` are taken as already-encoded JSON."""
    if isinstance(obj, bytes):
        return web.Response(body=obj, status=status, content_type=JSON_TYPE, charset="utf-8")
    text = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return web.Response(text=text, status=status, content_type=JSON_TYPE)


def error_response(status: int, message: str) -> web.Response:
    return json_response({"errors": [message]}, status=status)


# --- handlers -----------------------------------------------------------------------------------

Handler = Callable[[Call], Awaitable[Any]]


def _out(call: Call, resource: Resource, doc: dict[str, Any]) -> dict[str, Any]:
    return select_fields(doc, call.select(resource))


def _make_list(resource: Resource, default_order: str = DEFAULT_ORDER) -> Handler:
    async def handler(call: Call) -> Any:
        q = call.list_query(resource, default_order)
        store, caller = call.store, call.caller

        def page_bytes() -> bytes:
            # Built on the database thread: the event loop only sends the bytes.
            res: ListResult = store.list_page(resource, caller, q)  # type: ignore[arg-type]
            return res.to_json().encode()

        return await store.run(page_bytes)

    return handler


def _make_get(resource: Resource) -> Handler:
    async def handler(call: Call) -> Any:
        doc = await call.store.run_small(call.store.get, resource, call.caller, call.uuid)
        return _out(call, resource, doc)

    return handler


async def containers_create(call: Call) -> Any:
    doc = await call.store.run(call.store.create_container, call.caller, call.body(CONTAINER))
    return _out(call, CONTAINER, doc)


async def containers_update(call: Call) -> Any:
    doc = await call.store.run_small(
        call.store.update_container, call.caller, call.uuid, call.body(CONTAINER)
    )
    return _out(call, CONTAINER, doc)


async def containers_delete(call: Call) -> Any:
    return await call.store.run(call.store.delete_container, call.caller, call.uuid)


async def containers_lock(call: Call) -> Any:
    return await call.store.run_small(call.store.lock_container, call.caller, call.uuid)


async def containers_unlock(call: Call) -> Any:
    return await call.store.run_small(call.store.unlock_container, call.caller, call.uuid)


async def containers_auth(call: Call) -> Any:
    return await call.store.run_small(call.store.container_auth, call.caller, call.uuid)


async def containers_secret_mounts(call: Call) -> Any:
    return await call.store.run_small(call.store.container_secret_mounts, call.caller, call.uuid)


async def requests_create(call: Call) -> Any:
    doc = await call.store.run(
        call.store.create_request, call.caller, call.body(CONTAINER_REQUEST)
    )
    return _out(call, CONTAINER_REQUEST, doc)


async def requests_update(call: Call) -> Any:
    doc = await call.store.run(
        call.store.update_request, call.caller, call.uuid, call.body(CONTAINER_REQUEST)
    )
    return _out(call, CONTAINER_REQUEST, doc)


async def requests_delete(call: Call) -> Any:
    return await call.store.run(call.store.delete_request, call.caller, call.uuid)


async def users_current(call: Call) -> Any:
    assert call.caller is not None
    return await call.store.run_small(call.store.get_user, call.caller, call.caller.user_uuid)


async def users_system(call: Call) -> Any:
    assert call.caller is not None
    return await call.store.run(
        call.store.get_user, call.caller, call.store.policy.system_user_uuid
    )


async def users_get(call: Call) -> Any:
    doc = await call.store.run_small(call.store.get_user, call.caller, call.uuid)
    return _out(call, USER, doc)


async def tokens_current(call: Call) -> Any:
    return await call.store.run_small(call.store.current_token, call.caller)


async def logs_create(call: Call) -> Any:
    doc = await call.store.run(call.store.create_log, call.caller, call.body(LOG))
    return _out(call, LOG, doc)


async def links_create(call: Call) -> Any:
    doc = await call.store.run(call.store.create_link, call.caller, call.body(LINK))
    return _out(call, LINK, doc)


async def links_delete(call: Call) -> Any:
    return await call.store.run(call.store.delete_link, call.caller, call.uuid)


async def config_get(call: Call) -> Any:
    return exported_config(call.request.app[CONFIG_KEY])


# (resource, method) -> handler. ``auth`` False: served without a token.
HANDLERS: dict[tuple[str, str], tuple[Handler, bool]] = {
    ("containers", "list"): (_make_list(CONTAINER), True),
    ("containers", "get"): (_make_get(CONTAINER), True),
    ("containers", "create"): (containers_create, True),
    ("containers", "update"): (containers_update, True),
    ("containers", "delete"): (containers_delete, True),
    ("containers", "lock"): (containers_lock, True),
    ("containers", "unlock"): (containers_unlock, True),
    ("containers", "auth"): (containers_auth, True),
    ("containers", "secret_mounts"): (containers_secret_mounts, True),
    ("container_requests", "list"): (_make_list(CONTAINER_REQUEST), True),
    ("container_requests", "get"): (_make_get(CONTAINER_REQUEST), True),
    ("container_requests", "create"): (requests_create, True),
    ("container_requests", "update"): (requests_update, True),
    ("container_requests", "delete"): (requests_delete, True),
    ("users", "list"): (_make_list(USER), True),
    ("users", "get"): (users_get, True),
    ("users", "current"): (users_current, True),
    ("users", "system"): (users_system, True),
    ("api_client_authorizations", "current"): (tokens_current, True),
    ("logs", "list"): (_make_list(LOG, "id desc"), True),
    ("logs", "get"): (_make_get(LOG), True),
    ("logs", "create"): (logs_create, True),
    ("links", "list"): (_make_list(LINK), True),
    ("links", "get"): (_make_get(LINK), True),
    ("links", "create"): (links_create, True),
    ("links", "delete"): (links_delete, True),
    ("configs", "get"): (config_get, False),
}


def exported_config(cfg: Any) -> dict[str, Any]:
    """The public part of the cluster config (``GET /arvados/v1/config``): no secrets."""
    from dispatcher.config import to_arvados_dict

    full = to_arvados_dict(cfg, redact_secrets=True)
    services = {
        name: {"ExternalURL": svc.get("ExternalURL", "")}
        for name, svc in (full.get("Services") or {}).items()
        if isinstance(svc, dict)
    }
    containers = dict(full.get("Containers") or {})
    containers.pop("DispatchPrivateKey", None)
    cloud = dict(containers.get("CloudVMs") or {})
    cloud.pop("DriverParameters", None)
    containers["CloudVMs"] = cloud
    collections = cfg.collections if isinstance(cfg.collections, dict) else {}
    return {
        "ClusterID": cfg.cluster_id,
        "API": full.get("API", {}),
        "Containers": containers,
        "InstanceTypes": full.get("InstanceTypes", {}),
        "Services": services,
        "TLS": {"Insecure": cfg.tls.insecure},
        "Collections": {
            "DefaultReplication": collections.get("DefaultReplication", 2),
            "CollectionVersioning": collections.get("CollectionVersioning", False),
            "BlobSigning": collections.get("BlobSigning", True),
        },
        "StorageClasses": {"default": {"Default": True, "Priority": 0}},
        "Users": {"AnonymousUserToken": ""},
    }


# --- routing ------------------------------------------------------------------------------------


def _route_key(entry: tuple[str, str, str, str]) -> tuple[int, str]:
    # Literal paths (users/current) must be tried before templated ones (users/{uuid}).
    return (entry[3].count("{"), entry[3])


def _dispatcher(table: dict[str, tuple[str, Handler, bool]]) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def dispatch(request: web.Request) -> web.StreamResponse:
        method = request.method
        override = request.headers.get("X-Http-Method-Override", "").upper()
        if method == "POST" and override:
            method = override
        params = await read_params(request)
        if method == "POST" and isinstance(params.get("_method"), str):
            method = params.pop("_method").upper()
        entry = table.get(method)
        if entry is None:
            allowed = ", ".join(sorted(table))
            raise ApiError(f"method {method} not allowed here (allowed: {allowed})", 405)
        route, handler, needs_auth = entry
        request[ROUTE_KEY] = route
        call = Call(request=request, params=params, store=request.app[STORE_KEY])
        if needs_auth:
            call.caller = await authenticate_request(request, params)
        result = await handler(call)
        return json_response(result)

    return dispatch


def add_api_routes(app: web.Application) -> None:
    """Mount every served method under ``/arvados/v1/`` plus the discovery document."""
    by_path: dict[str, dict[str, tuple[str, Handler, bool]]] = {}
    for res, name, http_method, path in sorted(discovery.served_methods(), key=_route_key):
        handler, needs_auth = HANDLERS[(res, name)]
        route = f"{res}.{name}"
        table = by_path.setdefault("/arvados/v1/" + path, {})
        table[http_method] = (route, handler, needs_auth)
        if name == "update":
            table["PATCH"] = (route, handler, needs_auth)
    for path, table in by_path.items():
        app.router.add_route("*", path, _dispatcher(table), name=None)
    app.router.add_get("/discovery/v1/apis/arvados/v1/rest", discovery_handler)


async def discovery_handler(request: web.Request) -> web.StreamResponse:
    request[ROUTE_KEY] = "discovery"
    store = request.app[STORE_KEY]
    host = request.headers.get("X-Forwarded-Host") or request.host
    cfg: Any = request.app[CONFIG_KEY]
    doc = discovery.discovery_document(
        host, cluster_id=store.policy.cluster_id,
        max_request_size=getattr(getattr(cfg, "api", None), "max_request_size", 134217728),
    )
    return json_response(doc)


# --- middleware: errors, request log, metrics ----------------------------------------------------


def _new_request_id() -> str:
    return "req-" + secrets.token_hex(10)


def _log_request(level: int, request: web.Request, request_id: str, route: str, status: int,
                 elapsed: float) -> None:
    caller: Caller | None = request.get(CALLER_KEY)
    log.log(
        level,
        "request",
        extra={
            "request_id": request_id,
            "user_uuid": caller.user_uuid if caller else None,
            # Path only: the query string may carry api_token.
            "fields": {
                "method": request.method, "path": request.path, "route": route,
                "status": status, "duration_ms": round(elapsed * 1000, 2),
                "token_uuid": caller.token_uuid if caller else None,
                "remote": request.remote,
            },
        },
    )


def _middlewares(registry: CollectorRegistry) -> list[Any]:
    duration = Histogram(
        "crunchgate_controller_request_duration_seconds",
        "Controller API request duration by route, method and status code.",
        ["route", "method", "code"],
        registry=registry,
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    )

    @web.middleware
    async def api_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        start = time.monotonic()
        request_id = request.headers.get("X-Request-Id") or _new_request_id()
        status = 500
        try:
            try:
                response = await handler(request)
            except ApiError as exc:
                response = error_response(exc.status, exc.message)
            except web.HTTPException as exc:
                if exc.status >= 400 and request.path.startswith(("/arvados/", "/discovery/")):
                    response = error_response(exc.status, f"{exc.reason}: {request.path}")
                else:
                    raise
            except Exception:
                log.exception(
                    "internal error handling request",
                    extra={"request_id": request_id,
                           "fields": {"method": request.method, "path": request.path}},
                )
                response = error_response(500, f"internal error (request id {request_id})")
            status = response.status
            if not response.prepared:
                response.headers["X-Request-Id"] = request_id
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            elapsed = time.monotonic() - start
            route = request.get(ROUTE_KEY) or ("other" if status != 404 else "not_found")
            duration.labels(route=route, method=request.method, code=str(status)).observe(elapsed)
            quiet = status < 400 and (request.method == "GET" or route == "logs.create")
            level = logging.DEBUG if quiet else logging.INFO
            if log.isEnabledFor(level):
                _log_request(level, request, request_id, route, status, elapsed)

    return [api_middleware]


# --- the application ----------------------------------------------------------------------------


STATE_METRICS_INTERVAL_S = 15.0


def _add_state_metrics(app: web.Application, store: Store, registry: CollectorRegistry) -> None:
    """``crunchgate_controller_containers{state}``, refreshed in the background (a scrape must
    not query SQLite from the event loop)."""
    from prometheus_client import Gauge

    gauge = Gauge("crunchgate_controller_containers", "Containers by state.", ["state"],
                  registry=registry)

    async def refresh_forever() -> None:
        while True:
            try:
                counts = await store.run(store.container_counts)
            except Exception:
                log.warning("cannot count containers for metrics", exc_info=True)
            else:
                for state in ("Queued", "Locked", "Running", "Complete", "Cancelled"):
                    gauge.labels(state=state).set(counts.get(state, 0))
            await asyncio.sleep(STATE_METRICS_INTERVAL_S)

    _background(app, _METRICS_TASK_KEY, refresh_forever)


def _background(app: web.Application, key: web.AppKey[asyncio.Task[None]],
                body: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``body()`` as a task while the app runs; cancel it at cleanup."""

    async def start(app: web.Application) -> None:
        app[key] = asyncio.get_running_loop().create_task(body())

    async def stop(app: web.Application) -> None:
        task = app.get(key)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app.on_startup.append(start)
    app.on_cleanup.append(stop)


def _add_log_sweeper(app: web.Application, cfg: Any, store: Store) -> None:
    """Delete container logs older than ``Containers.Logging.MaxAge`` every ``SweepInterval``."""
    logging_cfg = getattr(getattr(cfg, "containers", None), "logging", None)
    max_age_s = getattr(logging_cfg, "max_age_s", 0.0)
    interval_s = getattr(logging_cfg, "sweep_interval_s", 0.0)
    if max_age_s <= 0 or interval_s <= 0:
        return

    async def sweep_forever() -> None:
        while True:
            try:
                n = await store.run(store.sweep_logs, max_age_s)
            except Exception:
                log.warning("log sweep failed", exc_info=True)
            else:
                if n:
                    log.info("swept old container logs", extra={"fields": {"deleted": n}})
            await asyncio.sleep(interval_s)

    _background(app, _SWEEP_TASK_KEY, sweep_forever)


def add_container_listener(app: web.Application, callback: ContainerCallback) -> None:
    """Call ``callback(old, new)`` on the event loop after every container create/update.

    ``old`` is None for a new container. For ``extra_setup`` users such as the tunnel broker
    (which watches ``gateway_address``). May be called before the app starts.
    """
    app[LISTENERS_KEY].append(callback)


def web_service_ports(cfg: Any) -> tuple[int, ...]:
    """The external ports this controller listens on itself: the port-range form of
    ``Services.ContainerWebServices`` when the controller terminates TLS (an ``https://``
    InternalURL). Behind nginx (``http://`` InternalURL) nginx listens on them and passes the
    original ``Host`` through, as in Arvados; see docs/tunnel.md."""
    from dispatcher.config import ConfigError, listen_url

    ws = getattr(getattr(cfg, "services", None), "container_web_services", None)
    if ws is None:
        return ()
    web_cfg = WebServicesConfig.from_config(ws)
    if not web_cfg.port_range:
        return ()
    try:
        scheme = urlsplit(listen_url(cfg, "Controller")).scheme
    except ConfigError:
        return ()
    if scheme != "https":
        return ()
    return tuple(range(web_cfg.port_min, web_cfg.port_max + 1))


def build_app(
    cfg: Any,
    store: Store,
    extra_setup: Iterable[Callable[[web.Application], None]] = (),
    *,
    registry: CollectorRegistry | None = None,
    config_path: str | None = None,
) -> web.Application:
    """The controller application: API routes, discovery, health, metrics, then each
    ``extra_setup(app)`` (which may add routes, middlewares, startup hooks)."""
    from dispatcher.metrics import new_registry
    from dispatcher.service import EXTRA_PORTS_KEY, create_service_app, set_health_check

    registry = registry if registry is not None else new_registry()
    max_size = getattr(getattr(cfg, "api", None), "max_request_size", 134217728)
    # The service wrapper serves /_health/ping, /metrics(.json) and request ids.
    app = create_service_app(
        cfg, "Controller", registry, middlewares=_middlewares(registry),
        client_max_size=max_size, config_path=config_path,
    )
    app[STORE_KEY] = store
    app[CONFIG_KEY] = cfg
    app[REGISTRY_KEY] = registry
    app[LISTENERS_KEY] = []
    register_secret(getattr(cfg, "system_root_token", None))
    add_api_routes(app)

    async def _wire_listeners(app: web.Application) -> None:
        loop = asyncio.get_running_loop()
        listeners: list[ContainerCallback] = app[LISTENERS_KEY]

        def from_db_thread(old: dict[str, Any] | None, new: dict[str, Any]) -> None:
            for cb in list(listeners):
                loop.call_soon_threadsafe(cb, old, new)

        store.add_container_listener(from_db_thread)

    app.on_startup.append(_wire_listeners)
    _add_state_metrics(app, store, registry)
    _add_log_sweeper(app, cfg, store)

    async def _health() -> str | None:
        try:
            await store.run(store.ping)
        except Exception as exc:
            return f"database unusable: {exc}"
        return None

    set_health_check(app, _health)
    ports = web_service_ports(cfg)
    if ports:
        app[EXTRA_PORTS_KEY] = (ports, "Services.ContainerWebServices.ExternalPortMin/Max: "
                                       "the controller serves them itself because it serves "
                                       "TLS; behind a TLS proxy give it an http:// InternalURL")
    for setup in extra_setup:
        setup(app)
    return app


__all__ = [
    "build_app",
    "add_container_listener",
    "authenticate_request",
    "request_token",
    "exported_config",
    "STORE_KEY",
    "CONFIG_KEY",
    "REGISTRY_KEY",
    "NotFound",
    "Unprocessable",
]
