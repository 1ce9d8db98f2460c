"""ArvadosClient against the in-process fake API server (tests/helpers/fakeapi.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
from collections.abc import Awaitable
from typing import Any, TypeVar

import pytest

from dispatcher.arvados.client import (
    ApiError,
    ApiUnavailable,
    ArvadosClient,
    ArvadosError,
    Forbidden,
    NotFound,
    Unprocessable,
    encode_params,
    new_request_id,
    parse_retry_after,
)
from tests.helpers.fakeapi import FAKEAPI_TOKEN, FAKEAPI_TOKEN_UUID, FakeApi

T = TypeVar("T")
UUID = "zzzzz-dz642-000000000000001"
SECRET_PART = FAKEAPI_TOKEN.rsplit("/", 1)[1]


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


def client_for(api: FakeApi, **kw: Any) -> ArvadosClient:
    kw.setdefault("retry_min_s", 0.001)
    kw.setdefault("retry_max_s", 0.01)
    return ArvadosClient(api.url, api.token, **kw)


async def call(api: FakeApi, method: str, *args: Any, client_kw: dict[str, Any] | None = None,
               **kwargs: Any) -> Any:
    async with client_for(api, **(client_kw or {})) as c:
        return await getattr(c, method)(*args, **kwargs)


def test_encode_params_strings_raw_everything_else_json() -> None:
    assert encode_params({
        "filters": [["state", "=", "Queued"], ["priority", ">", "0"]],
        "order": ["priority desc"], "limit": 0, "count": "exact", "flag": True, "skip": None,
    }) == [
        ("filters", '[["state","=","Queued"],["priority",">","0"]]'),
        ("order", '["priority desc"]'), ("limit", "0"), ("count", "exact"), ("flag", "true"),
    ]


def test_request_id_shape() -> None:
    ids = {new_request_id() for _ in range(50)}
    assert len(ids) == 50
    assert all(re.fullmatch(r"req-[a-z0-9]{20}", i) for i in ids)


def test_list_sends_params_in_query_string(fakeapi: FakeApi) -> None:
    fakeapi.add_container(UUID)
    out = run(call(fakeapi, "list", "containers",
                   filters=[["state", "=", "Queued"], ["priority", ">", "0"]],
                   order=["priority desc"], limit=10, count="exact"))
    assert [i["uuid"] for i in out["items"]] == [UUID]
    (req,) = fakeapi.matching("GET", "/arvados/v1/containers")
    assert req.query == {
        "filters": '[["state","=","Queued"],["priority",">","0"]]',
        "order": '["priority desc"]', "limit": "10", "count": "exact",
    }
    assert req.headers["Authorization"] == f"Bearer {FAKEAPI_TOKEN}"
    assert re.fullmatch(r"req-[a-z0-9]{20}", req.headers["X-Request-Id"])


def test_update_sends_form_body(fakeapi: FakeApi) -> None:
    fakeapi.add_container(UUID, state="Locked", locked_by_uuid=FAKEAPI_TOKEN_UUID)
    out = run(call(fakeapi, "update", "containers", UUID,
                   {"state": "Cancelled", "runtime_status": {"error": "x y"}}))
    assert out["state"] == "Cancelled"
    (req,) = fakeapi.matching("PUT", f"/arvados/v1/containers/{UUID}")
    assert req.headers["Content-Type"].startswith("application/x-www-form-urlencoded")
    assert req.query == {}
    assert json.loads(req.form["container"]) == {"state": "Cancelled",
                                                 "runtime_status": {"error": "x y"}}
    assert req.form["container"] == '{"state":"Cancelled","runtime_status":{"error":"x y"}}'


def test_create_log_form_body(fakeapi: FakeApi) -> None:
    run(call(fakeapi, "create_log", UUID, "stdout", "hello\n"))
    (req,) = fakeapi.matching("POST", "/arvados/v1/logs")
    assert json.loads(req.form["log"]) == {
        "object_uuid": UUID, "event_type": "stdout", "properties": {"text": "hello\n"}}
    assert fakeapi.log_text(UUID, "stdout") == "hello\n"


def test_get_retries_503_then_succeeds_with_same_request_id(fakeapi: FakeApi) -> None:
    fakeapi.add_container(UUID)
    path = f"/arvados/v1/containers/{UUID}"
    fakeapi.script("GET", path, [(503, {"errors": ["busy"]}, {}), (502, "bad gateway", {})])
    out = run(call(fakeapi, "get", "containers", UUID))
    assert out["uuid"] == UUID
    reqs = fakeapi.matching("GET", path)
    assert len(reqs) == 3
    assert len({r.headers["X-Request-Id"] for r in reqs}) == 1


def test_get_gives_up_after_bounded_retries(fakeapi: FakeApi) -> None:
    path = f"/arvados/v1/containers/{UUID}"
    fakeapi.script("GET", path, [(503, {"errors": ["down for maintenance"]}, {})] * 10)
    with pytest.raises(ApiUnavailable) as ei:
        run(call(fakeapi, "get", "containers", UUID, client_kw={"retries": 3}))
    assert ei.value.status == 503
    assert ei.value.errors == ["down for maintenance"]
    assert len(fakeapi.matching("GET", path)) == 4


def test_429_with_retry_after_is_retried(fakeapi: FakeApi) -> None:
    fakeapi.add_container(UUID)
    path = f"/arvados/v1/containers/{UUID}"
    fakeapi.script("GET", path, [(429, {"errors": ["slow down"]}, {"Retry-After": "0"})])
    assert run(call(fakeapi, "get", "containers", UUID))["uuid"] == UUID
    assert len(fakeapi.matching("GET", path)) == 2


def test_backoff_honours_retry_after_and_cap() -> None:
    c = ArvadosClient("127.0.0.1:1", "tok-" + "x" * 20, retry_min_s=1, retry_max_s=30)
    for attempt in range(10):
        d = c._backoff(attempt, None)
        assert 0.5 * min(30, 2**attempt) <= d <= min(30, 2**attempt)
    assert c._backoff(0, 7.0) >= 7.0
    assert c._backoff(0, 3600.0) <= 30


def test_parse_retry_after() -> None:
    assert parse_retry_after("12") == 12.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Thu, 01 Jan 1970 00:01:40 GMT", now=40.0) == 60.0


@pytest.mark.parametrize(
    ("status", "cls"),
    [(404, NotFound), (401, Forbidden), (403, Forbidden), (422, Unprocessable), (400, ApiError),
     (501, ApiError)],
)
def test_4xx_and_501_are_typed_and_not_retried(fakeapi: FakeApi, status: int,
                                               cls: type[ApiError]) -> None:
    path = f"/arvados/v1/containers/{UUID}"
    fakeapi.script("PUT", path, [(status, {"errors": ["nope: cannot change"]}, {})])
    with pytest.raises(cls) as ei:
        run(call(fakeapi, "update", "containers", UUID, {"state": "Running"}))
    assert type(ei.value) is cls
    assert ei.value.status == status
    assert ei.value.errors == ["nope: cannot change"]
    assert ei.value.method == "PUT" and ei.value.path == path
    assert len(fakeapi.matching("PUT", path)) == 1


def test_real_422_from_server(fakeapi: FakeApi) -> None:
    fakeapi.add_container(UUID, state="Locked")
    with pytest.raises(Unprocessable) as ei:
        run(call(fakeapi, "lock", UUID))
    assert ei.value.errors == ["cannot lock when Locked"]
    assert "cannot lock when Locked" in str(ei.value)


def test_post_create_not_retried_after_send(fakeapi: FakeApi) -> None:
    fakeapi.script("POST", "/arvados/v1/container_requests", [(503, {"errors": ["x"]}, {})])
    with pytest.raises(ApiUnavailable):
        run(call(fakeapi, "create", "container_requests", {"name": "a"}))
    assert len(fakeapi.matching("POST", "/arvados/v1/container_requests")) == 1


def test_create_log_is_retried(fakeapi: FakeApi) -> None:
    fakeapi.script("POST", "/arvados/v1/logs", [(503, {"errors": ["x"]}, {})])
    run(call(fakeapi, "create_log", UUID, "crunch-run", "tail"))
    assert fakeapi.log_text(UUID, "crunch-run") == "tail"


def test_lock_whose_answer_was_lost_but_applied_is_success(fakeapi: FakeApi) -> None:
    fakeapi.add_container(UUID)
    path = f"/arvados/v1/containers/{UUID}/lock"
    fakeapi.script("POST", path, [(-502, "proxy error", {})])
    out = run(call(fakeapi, "lock", UUID))
    assert out["state"] == "Locked" and out["locked_by_uuid"] == FAKEAPI_TOKEN_UUID
    assert len(fakeapi.matching("POST", path)) == 1
    assert fakeapi.container(UUID)["lock_count"] == 1


def test_lock_whose_request_was_dropped_is_repeated(fakeapi: FakeApi) -> None:
    fakeapi.add_container(UUID)
    path = f"/arvados/v1/containers/{UUID}/lock"
    fakeapi.script("POST", path, [(0, "", {})])
    out = run(call(fakeapi, "lock", UUID))
    assert out["state"] == "Locked"
    assert len(fakeapi.matching("POST", path)) == 2
    assert fakeapi.container(UUID)["lock_count"] == 1


def test_lock_lost_and_someone_else_holds_it(fakeapi: FakeApi) -> None:
    fakeapi.add_container(UUID)
    path = f"/arvados/v1/containers/{UUID}/lock"
    fakeapi.script("POST", path, [(0, "", {})])
    fakeapi.set_container(UUID, state="Locked", locked_by_uuid="zzzzz-gj3su-someoneelse0000")
    with pytest.raises(Unprocessable, match="cannot lock when Locked"):
        run(call(fakeapi, "lock", UUID))
    assert len(fakeapi.matching("POST", path)) == 1


def test_unlock_whose_answer_was_lost_but_applied_is_success(fakeapi: FakeApi) -> None:
    fakeapi.add_container(UUID, state="Locked", locked_by_uuid=FAKEAPI_TOKEN_UUID, lock_count=1)
    path = f"/arvados/v1/containers/{UUID}/unlock"
    fakeapi.script("POST", path, [(-503, {"errors": ["x"]}, {})])
    out = run(call(fakeapi, "unlock", UUID))
    assert out["state"] == "Queued"
    assert len(fakeapi.matching("POST", path)) == 1


def test_list_all_pages_like_the_reference(fakeapi: FakeApi) -> None:
    uuids = [f"zzzzz-dz642-{i:015d}" for i in range(7)]
    for u in uuids:
        fakeapi.add_container(u)
    items = run(call(fakeapi, "list_all", "containers", filters=[["state", "=", "Queued"]],
                     order=["priority desc"], page_size=3))
    assert [i["uuid"] for i in items] == uuids
    reqs = fakeapi.matching("GET", "/arvados/v1/containers")
    assert [(r.query["count"], r.query["limit"], r.query.get("offset")) for r in reqs] == [
        ("exact", "0", None), ("none", "3", "0"), ("none", "3", "3"), ("none", "3", "6")]
    assert all(r.query["order"] == '["priority desc"]' for r in reqs)


def test_list_all_stops_at_empty_page(fakeapi: FakeApi) -> None:
    fakeapi.add_container(UUID)
    fakeapi.script("GET", "/arvados/v1/containers", [
        (200, {"items": [], "items_available": 5}, {}),
        (200, {"items": [{"uuid": UUID}], "items_available": 5}, {}),
        (200, {"items": []}, {}),
    ])
    items = run(call(fakeapi, "list_all", "containers", filters=[], page_size=1))
    assert items == [{"uuid": UUID}]
    assert len(fakeapi.matching("GET", "/arvados/v1/containers")) == 3


def test_get_refuses_non_uuid_without_request(fakeapi: FakeApi) -> None:
    with pytest.raises(ArvadosError):
        run(call(fakeapi, "get", "containers", "../../etc/passwd"))
    assert fakeapi.requests == []


def test_token_never_in_errors_repr_or_logs(fakeapi: FakeApi,
                                             caplog: pytest.LogCaptureFixture) -> None:
    path = f"/arvados/v1/containers/{UUID}"
    # A misbehaving server that echoes the token back in its error body.
    responses: list[tuple[int, Any, dict[str, str]]] = [
        (503, {"errors": [f"bad token {FAKEAPI_TOKEN}"]}, {}),
        (503, {"errors": [f"bad token {FAKEAPI_TOKEN}"]}, {}),
        (401, {"errors": [f"token {FAKEAPI_TOKEN} unknown"]}, {}),
    ]
    fakeapi.script("GET", path, responses)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(Forbidden) as ei:
        run(call(fakeapi, "get", "containers", UUID))
    texts = [str(ei.value), repr(ei.value), *ei.value.errors,
             repr(client_for(fakeapi)), *(r.getMessage() for r in caplog.records)]
    for t in texts:
        assert SECRET_PART not in t
    assert "[REDACTED]" in str(ei.value)


def test_connection_refused_is_unavailable_and_tokenless() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = "v2/zzzzz-gj3su-aaaaaaaaaaaaaaa/refusedsecret0123456789"

    async def go() -> None:
        async with ArvadosClient(f"http://127.0.0.1:{port}", token, retries=2,
                                 retry_min_s=0.001, retry_max_s=0.002) as c:
            await c.get("containers", UUID)

    with pytest.raises(ApiUnavailable) as ei:
        run(go())
    assert ei.value.status == 0
    assert "cannot connect" in str(ei.value)
    assert "refusedsecret" not in str(ei.value)


def test_base_url_and_env() -> None:
    assert ArvadosClient("ctl.example:8443", "t" * 10).base_url == "https://ctl.example:8443"
    assert ArvadosClient("http://127.0.0.1:9/x/", "t" * 10).base_url == "http://127.0.0.1:9"
    c = ArvadosClient.from_env({"ARVADOS_API_HOST": "h:1", "ARVADOS_API_TOKEN": "t" * 10,
                                "ARVADOS_API_HOST_INSECURE": "yes"})
    assert c.insecure and c.base_url == "https://h:1"
    c = ArvadosClient.from_env({"ARVADOS_API_HOST": "h:1", "ARVADOS_API_TOKEN": "t" * 10,
                                "ARVADOS_API_HOST_INSECURE": "0"})
    assert not c.insecure
    with pytest.raises(ArvadosError, match="ARVADOS_API_TOKEN"):
        ArvadosClient.from_env({"ARVADOS_API_HOST": "h:1"})


def test_from_config_uses_controller_and_root_token() -> None:
    from dispatcher.config import ClusterConfig

    cfg = ClusterConfig()
    cfg.system_root_token = "rootroot" * 4
    cfg.services.controller.external_url = "https://ctl.example:4440/"
    cfg.tls.insecure = True
    c = ArvadosClient.from_config(cfg)
    assert c.base_url == "https://ctl.example:4440"
    assert c.insecure
    assert "rootroot" not in repr(c)


def test_current_token_and_container_auth(fakeapi: FakeApi) -> None:
    fakeapi.add_container(UUID, state="Locked")

    async def go() -> tuple[str, dict[str, Any]]:
        async with client_for(fakeapi) as c:
            return await c.token_uuid(), await c.container_auth(UUID)

    me, auth = run(go())
    assert me == FAKEAPI_TOKEN_UUID
    assert auth["api_token"].startswith("v2/")


def test_redirect_is_not_followed(fakeapi: FakeApi) -> None:
    path = f"/arvados/v1/containers/{UUID}"
    fakeapi.script("GET", path, [(302, "", {"Location": "http://127.0.0.1:9/steal"})])
    with pytest.raises(ApiError) as ei:
        run(call(fakeapi, "get", "containers", UUID))
    assert ei.value.status == 302
    assert len(fakeapi.requests) == 1
