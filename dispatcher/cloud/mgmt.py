"""The cloud dispatcher's management API (reference 5.12), mounted on the service app.

Every route requires ``Authorization: Bearer <ManagementToken>``: 401 without it, 403 with a
wrong one, and 403 "Management API authentication is not configured" when no ManagementToken is
set. Parameters come from the query string or a form body. Errors are ``{"errors": [...]}``.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any, Protocol

from aiohttp import web

from dispatcher.cloud.errors import NotFoundError
from dispatcher.cloud.pool import Pool
from dispatcher.cloud.queue import ContainerQueue
from dispatcher.cloud.scheduler import Scheduler
from dispatcher.cloud.worker import IdleBehavior

log = logging.getLogger("crunchgate.cloud.mgmt")

PREFIX = "/arvados/v1/dispatch"


class Dispatchish(Protocol):
    scheduler: Scheduler
    pool: Pool
    queue: ContainerQueue


def _err(status: int, msg: str) -> web.Response:
    return web.json_response({"errors": [msg]}, status=status)


async def _params(request: web.Request) -> dict[str, str]:
    out = dict(request.query)
    if request.method == "POST" and request.can_read_body:
        try:
            form = await request.post()
            out.update({k: str(v) for k, v in form.items()})
        except Exception:
            pass
    return out


def add_management_routes(app: web.Application, disp: Dispatchish, management_token: str) -> None:
    """Register the routes of reference 5.12 on ``app``."""

    def auth(request: web.Request) -> web.Response | None:
        if not management_token:
            return _err(403, "Management API authentication is not configured")
        header = request.headers.get("Authorization", "")
        if not header:
            return _err(401, "authorization required")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), management_token.encode()):
            return _err(403, "invalid authorization token")
        return None

    def guarded(handler: Any) -> Any:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            denied = auth(request)
            if denied is not None:
                return denied
            return await handler(request)

        return wrapped

    def queue_items() -> list[dict[str, Any]]:
        if disp.scheduler.last_sorted:
            return [s.to_json() for s in disp.scheduler.last_sorted]
        ents, _ = disp.queue.entries()
        return [e.to_json() for e in ents.values()]

    async def containers(request: web.Request) -> web.Response:
        return web.json_response({"items": queue_items()})

    async def container(request: web.Request) -> web.Response:
        uuid = (await _params(request)).get("container_uuid", "")
        for item in queue_items():
            if item["container"].get("uuid") == uuid:
                return web.json_response(item)
        return _err(404, "container not found")

    async def kill_container(request: web.Request) -> web.Response:
        p = await _params(request)
        uuid = p.get("container_uuid", "")
        if not uuid:
            return _err(400, "container_uuid parameter not provided")
        if not disp.pool.kill_container(uuid, f"via management API: {p.get('reason', '')}"):
            return _err(404, "container not found")
        return web.Response(status=200)

    async def instances(request: web.Request) -> web.Response:
        return web.json_response({"items": [v.to_json() for v in disp.pool.instances()]})

    def behavior(b: IdleBehavior) -> Any:
        async def handler(request: web.Request) -> web.Response:
            iid = (await _params(request)).get("instance_id", "")
            if not iid:
                return _err(400, "instance_id parameter not provided")
            try:
                disp.pool.set_idle_behavior(iid, b)
            except NotFoundError as exc:
                return _err(404, str(exc))
            return web.Response(status=200)

        return handler

    async def kill_instance(request: web.Request) -> web.Response:
        p = await _params(request)
        iid = p.get("instance_id", "")
        if not iid:
            return _err(400, "instance_id parameter not provided")
        try:
            disp.pool.kill_instance(iid, f"via management API: {p.get('reason', '')}")
        except NotFoundError as exc:
            return _err(404, str(exc))
        return web.Response(status=200)

    r = app.router
    r.add_get(PREFIX + "/containers", guarded(containers))
    r.add_get(PREFIX + "/container", guarded(container))
    r.add_post(PREFIX + "/containers/kill", guarded(kill_container))
    r.add_get(PREFIX + "/instances", guarded(instances))
    for name, b in (("hold", IdleBehavior.HOLD), ("drain", IdleBehavior.DRAIN),
                    ("run", IdleBehavior.RUN)):
        r.add_post(f"{PREFIX}/instances/{name}", guarded(behavior(b)))
    r.add_post(PREFIX + "/instances/kill", guarded(kill_instance))
