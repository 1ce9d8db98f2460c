"""A tiny fake Arvados API server for client and crunch-run tests (plain HTTP on 127.0.0.1).

It runs its own event loop in a background thread, so both ``asyncio.run`` unit tests and
subprocess tests (crunch-run) can talk to it. It records every request and serves:

* ``GET api_client_authorizations/current``, ``GET containers/{uuid}/auth``
* containers: list (filters ``=``/``in``, offset/limit/count), get, PUT update (with the state
  transition table of reference 1.2), lock, unlock
* logs: create (legacy form body), list

Tests can script failures: ``api.script("GET", "/arvados/v1/containers", [(503, {...}, {})])``
makes the next matching requests answer those responses in order before normal handling. Status
0 drops the connection without applying the request; a negative status applies the request and
then answers ``-status`` (a lost answer to a request the server did carry out).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from multidict import CIMultiDict

FAKEAPI_TOKEN = "v2/zzzzz-gj3su-000000000000000/fakeapisecrettoken0123456789abcdef"
FAKEAPI_TOKEN_UUID = "zzzzz-gj3su-000000000000000"
RUNTIME_TOKEN = "v2/zzzzz-gj3su-runtimetoken001/runtimesecret0123456789abcdefghij"

TRANSITIONS = {
    "Queued": {"Locked", "Cancelled"},
    "Locked": {"Queued", "Running", "Cancelled"},
    "Running": {"Complete", "Cancelled"},
    "Complete": {"Cancelled"},
    "Cancelled": set(),
}


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    form: dict[str, str]
    headers: CIMultiDict[str]


@dataclass
class FakeApi:
    """The fake server's state; see the module docstring."""

    token: str = FAKEAPI_TOKEN
    containers: dict[str, dict[str, Any]] = field(default_factory=dict)
    logs: list[dict[str, Any]] = field(default_factory=list)
    requests: list[Recorded] = field(default_factory=list)
    scripted: dict[tuple[str, str], list[tuple[int, Any, dict[str, str]]]] = field(
        default_factory=dict
    )
    max_dispatch_attempts: int = 10
    url: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _runner: web.AppRunner | None = None

    # --- test-side helpers -------------------------------------------------------------------

    def script(self, method: str, path: str, responses: list[tuple[int, Any, dict[str, str]]]
               ) -> None:
        """Answer the next ``len(responses)`` ``method path`` requests with these responses."""
        with self._lock:
            self.scripted.setdefault((method, path), []).extend(responses)

    def add_container(self, uuid: str, **attrs: Any) -> dict[str, Any]:
        ctr = {
            "uuid": uuid, "state": "Queued", "priority": 1, "locked_by_uuid": None,
            "auth_uuid": None, "lock_count": 0, "command": ["true"], "environment": {},
            "cwd": "", "output_path": "", "container_image": "", "exit_code": None,
            "runtime_constraints": {"vcpus": 1, "ram": 1 << 20}, "scheduling_parameters": {},
            "runtime_status": {}, "mounts": {}, "started_at": None, "finished_at": None,
            "gateway_address": "",
        }
        ctr.update(attrs)
        with self._lock:
            self.containers[uuid] = ctr
        return ctr

    def container(self, uuid: str) -> dict[str, Any]:
        with self._lock:
            return dict(self.containers[uuid])

    def set_container(self, uuid: str, **attrs: Any) -> None:
        with self._lock:
            self.containers[uuid].update(attrs)

    def log_text(self, uuid: str, event_type: str) -> str:
        with self._lock:
            return "".join(
                (rec.get("properties") or {}).get("text", "")
                for rec in self.logs
                if rec.get("object_uuid") == uuid and rec.get("event_type") == event_type
            )

    def matching(self, method: str, path: str) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.method == method and r.path == path]

    # --- server ------------------------------------------------------------------------------

    def start(self) -> None:
        ready = threading.Event()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self._handle)
            self._runner = web.AppRunner(app, access_log=None)
            loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            loop.run_until_complete(site.start())
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self.url = f"http://127.0.0.1:{port}"
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=serve, name="fakeapi", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake API server did not start")

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        form: dict[str, str] = {}
        if request.method not in ("GET", "HEAD") and request.can_read_body:
            form = {k: str(v) for k, v in (await request.post()).items()}
        rec = Recorded(request.method, request.path, dict(request.query), form,
                       CIMultiDict(request.headers))
        with self._lock:
            self.requests.append(rec)
            queue = self.scripted.get((request.method, request.path))
            scripted = queue.pop(0) if queue else None
        if scripted is not None and scripted[0] < 0:
            # Apply the request for real, then answer -status: "the answer was lost".
            with self._lock:
                self._route(request.method, request.path, {**rec.query, **form})
            scripted = (-scripted[0], scripted[1], scripted[2])
        if scripted is not None:
            status, body, headers = scripted
            text = body if isinstance(body, str) else json.dumps(body)
            if status == 0:  # drop the connection without an answer
                assert request.transport is not None
                request.transport.close()
                return web.Response(status=500)
            return web.Response(status=status, text=text, headers=headers,
                                content_type="application/json")
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return _err(401, "Not logged in")
        params = {**rec.query, **form}
        try:
            with self._lock:
                status, body = self._route(request.method, request.path, params)
        except _Err as exc:
            return _err(exc.status, exc.msg)
        return web.json_response(body, status=status)

    def _route(self, method: str, path: str, params: dict[str, str]) -> tuple[int, Any]:
        parts = path.strip("/").split("/")
        if parts[:2] != ["arvados", "v1"] or len(parts) < 3:
            raise _Err(404, "not found")
        res, rest = parts[2], parts[3:]
        if res == "api_client_authorizations" and rest == ["current"]:
            return 200, {"uuid": FAKEAPI_TOKEN_UUID, "api_token": self.token,
                         "kind": "arvados#apiClientAuthorization"}
        if res == "containers":
            return self._containers(method, rest, params)
        if res == "logs":
            return self._logs(method, rest, params)
        raise _Err(404, f"no route {method} {path}")

    def _containers(self, method: str, rest: list[str], params: dict[str, str]
                    ) -> tuple[int, Any]:
        if not rest:
            if method != "GET":
                raise _Err(405, "method not allowed")
            return 200, _list(list(self.containers.values()), params, "arvados#containerList")
        ctr = self.containers.get(rest[0])
        if ctr is None:
            raise _Err(404, "Path not found")
        action = rest[1] if len(rest) > 1 else ""
        if method == "GET" and action == "auth":
            return 200, {"uuid": "zzzzz-gj3su-runtimetoken001", "api_token": RUNTIME_TOKEN}
        if method == "GET" and not action:
            return 200, _select(ctr, params)
        if method == "POST" and action == "lock":
            if ctr["state"] != "Queued":
                raise _Err(422, f"cannot lock when {ctr['state']}")
            if ctr["priority"] <= 0:
                raise _Err(422, "cannot lock when priority<=0")
            ctr.update(state="Locked", locked_by_uuid=FAKEAPI_TOKEN_UUID,
                       auth_uuid="zzzzz-gj3su-runtimetoken001", lock_count=ctr["lock_count"] + 1)
            return 200, _reduced(ctr)
        if method == "POST" and action == "unlock":
            if ctr["state"] != "Locked":
                raise _Err(422, f"cannot unlock when {ctr['state']}")
            self._to_queued(ctr)
            return 200, _reduced(ctr)
        if method in ("PUT", "PATCH") and not action:
            attrs = json.loads(params.get("container", "{}"))
            new = attrs.get("state", ctr["state"])
            if new != ctr["state"]:
                if new not in TRANSITIONS[ctr["state"]]:
                    raise _Err(422, f"cannot change from {ctr['state']} to {new}")
                if new == "Queued":
                    self._to_queued(ctr)
                    attrs.pop("state")
                if new == "Running":
                    ctr["started_at"] = time.time()
                if new in ("Complete", "Cancelled"):
                    ctr["finished_at"] = time.time()
                    ctr["locked_by_uuid"] = None
            ctr.update(attrs)
            return 200, dict(ctr)
        raise _Err(404, "no such action")

    def _to_queued(self, ctr: dict[str, Any]) -> None:
        if ctr["lock_count"] >= self.max_dispatch_attempts:
            ctr.update(state="Cancelled", runtime_status={
                "error": "Failed to start container.  Cancelled after exceeding "
                f"'Containers.MaxDispatchAttempts' (lock_count={ctr['lock_count']})"})
        else:
            ctr.update(state="Queued", runtime_status={})
        ctr.update(locked_by_uuid=None, auth_uuid=None)

    def _logs(self, method: str, rest: list[str], params: dict[str, str]) -> tuple[int, Any]:
        if method == "POST" and not rest:
            attrs = json.loads(params["log"])
            attrs["uuid"] = f"zzzzz-57u5n-{len(self.logs):015d}"
            self.logs.append(attrs)
            return 200, attrs
        if method == "GET" and not rest:
            return 200, _list(self.logs, params, "arvados#logList")
        raise _Err(404, "no such log route")


class _Err(Exception):
    def __init__(self, status: int, msg: str) -> None:
        super().__init__(msg)
        self.status = status
        self.msg = msg


def _err(status: int, msg: str) -> web.Response:
    return web.json_response({"errors": [msg]}, status=status)


def _reduced(ctr: dict[str, Any]) -> dict[str, Any]:
    return {k: ctr[k] for k in ("uuid", "state", "priority", "auth_uuid", "locked_by_uuid")}


def _select(obj: dict[str, Any], params: dict[str, str]) -> dict[str, Any]:
    if "select" not in params:
        return dict(obj)
    return {k: obj.get(k) for k in json.loads(params["select"])}


def _matches(obj: dict[str, Any], flt: list[Any]) -> bool:
    attr, op, val = flt
    have = obj.get(attr)
    if op == "=":
        return bool(have == val or str(have) == str(val))
    if op == "in":
        return have in val
    if op == ">":
        return have is not None and float(have) > float(val)
    raise _Err(422, f"unsupported filter operator {op}")


def _list(objs: list[dict[str, Any]], params: dict[str, str], kind: str) -> dict[str, Any]:
    filters = json.loads(params.get("filters", "[]"))
    rows = [o for o in objs if all(_matches(o, f) for f in filters)]
    rows.sort(key=lambda o: o.get("uuid", ""))
    offset = int(params.get("offset", "0"))
    limit = int(params.get("limit", "100"))
    out: dict[str, Any] = {"kind": kind, "offset": offset, "limit": limit,
                           "items": [_select(o, params) for o in rows[offset:offset + limit]]}
    if params.get("count", "exact") != "none":
        out["items_available"] = len(rows)
    return out


@pytest.fixture
def fakeapi() -> Iterator[FakeApi]:
    """A started :class:`FakeApi`, stopped after the test."""
    api = FakeApi()
    api.start()
    try:
        yield api
    finally:
        api.stop()
