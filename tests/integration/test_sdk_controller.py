"""The real Arvados Python SDK against the embedded controller (subprocess, HTTPS)."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import pytest

from tests.helpers.controller import ControllerProcess

pytest.importorskip("arvados")
from googleapiclient.errors import HttpError  # noqa: E402  (after importorskip)

CR_BODY: dict[str, Any] = {
    "command": ["echo", "hello"],
    "container_image": "arvados/jobs",
    "output_path": "/out",
    "cwd": "/tmp",
    "runtime_constraints": {"vcpus": 1, "ram": 256 << 20},
    "state": "Committed",
    "priority": 1,
}


def _cr(api: Any, **extra: Any) -> dict[str, Any]:
    body = {**CR_BODY, **extra}
    return api.container_requests().create(body={"container_request": body}).execute()


def test_sdk_request_lock_unlock_and_logs(controller_session: ControllerProcess) -> None:
    ctl = controller_session
    alice = ctl.add_user("sdk-alice")
    api_user = ctl.api(alice)
    api_root = ctl.api()

    cr = _cr(api_user, command=["echo", "sdk-flow"])
    assert cr["state"] == "Committed"
    assert cr["container_count"] == 1
    uuid = cr["container_uuid"]
    assert uuid.startswith("zzzzz-dz642-")

    ctr = api_user.containers().get(uuid=uuid).execute()
    assert ctr["state"] == "Queued" and ctr["priority"] > 2**49

    listed = api_root.containers().list(
        filters=[["state", "=", "Queued"], ["priority", ">", "0"], ["uuid", "=", uuid]],
        order=["priority desc"], limit=10,
    ).execute()
    assert listed["kind"] == "arvados#containerList"
    assert [i["uuid"] for i in listed["items"]] == [uuid]
    assert listed["items_available"] == 1

    locked = api_root.containers().lock(uuid=uuid).execute()
    assert set(locked) == {"uuid", "state", "priority", "auth_uuid", "locked_by_uuid"}
    assert locked["state"] == "Locked"
    assert locked["locked_by_uuid"] == "zzzzz-gj3su-000000000000000"
    assert locked["auth_uuid"].startswith("zzzzz-gj3su-")

    auth = api_root.containers().auth(uuid=uuid).execute()
    assert auth["uuid"] == locked["auth_uuid"] and auth["api_token"]
    # The runtime token authenticates as the request's owner and sees its container.
    runtime = ctl.api(f"v2/{auth['uuid']}/{auth['api_token']}")
    assert runtime.containers().get(uuid=uuid).execute()["uuid"] == uuid

    with pytest.raises(HttpError) as err:
        api_root.containers().lock(uuid=uuid).execute()
    assert err.value.resp.status == 422
    assert "cannot lock when Locked" in err.value.content.decode()

    unlocked = api_root.containers().unlock(uuid=uuid).execute()
    assert unlocked["state"] == "Queued" and unlocked["locked_by_uuid"] is None
    # The runtime token was expired by the unlock.
    with pytest.raises(HttpError) as err:
        runtime.containers().get(uuid=uuid).execute()
    assert err.value.resp.status == 401

    api_root.logs().create(body={"log": {
        "object_uuid": uuid, "event_type": "stdout", "properties": {"text": "hello\n"}}}).execute()
    logs = api_user.logs().list(filters=[["object_uuid", "=", uuid]], order=["id asc"]).execute()
    assert [entry["properties"]["text"] for entry in logs["items"]] == ["hello\n"]


def test_sdk_users_cannot_see_each_other(controller_session: ControllerProcess) -> None:
    ctl = controller_session
    api_a = ctl.api(ctl.add_user("sdk-vis-a"))
    api_b = ctl.api(ctl.add_user("sdk-vis-b"))
    cr_a = _cr(api_a, command=["echo", "visibility-a"])
    cr_b = _cr(api_b, command=["echo", "visibility-b"])

    mine = api_a.container_requests().list(limit=1000).execute()["items"]
    assert cr_a["uuid"] in {c["uuid"] for c in mine}
    assert cr_b["uuid"] not in {c["uuid"] for c in mine}
    for getter, uuid in (
        (api_a.container_requests().get, cr_b["uuid"]),
        (api_a.containers().get, cr_b["container_uuid"]),
    ):
        with pytest.raises(HttpError) as err:
            getter(uuid=uuid).execute()
        assert err.value.resp.status == 404
    ctrs = api_a.containers().list(filters=[["uuid", "in", [cr_a["container_uuid"],
                                                             cr_b["container_uuid"]]]]).execute()
    assert [c["uuid"] for c in ctrs["items"]] == [cr_a["container_uuid"]]
    # A user may not lock, and admins see everything.
    with pytest.raises(HttpError) as err:
        api_a.containers().lock(uuid=cr_a["container_uuid"]).execute()
    assert err.value.resp.status == 403
    assert ctl.api().container_requests().get(uuid=cr_b["uuid"]).execute()["uuid"] == cr_b["uuid"]


def test_sdk_cancel_by_priority_zero_finalizes_request(controller_session: ControllerProcess) -> None:
    ctl = controller_session
    api = ctl.api(ctl.add_user("sdk-cancel"))
    cr = _cr(api, command=["echo", "cancel-me"])
    api.container_requests().update(uuid=cr["uuid"], body={"container_request": {"priority": 0}}).execute()
    ctr = api.containers().get(uuid=cr["container_uuid"]).execute()
    assert ctr["state"] == "Cancelled" and ctr["priority"] == 0
    assert api.container_requests().get(uuid=cr["uuid"]).execute()["state"] == "Final"


def test_sdk_keyset_paging(controller_session: ControllerProcess) -> None:
    """arvados.util.keyset_list_all pages with ["uuid", ">", last] / order_key filters."""
    import arvados.util

    ctl = controller_session
    image = "keyset-" + ctl.add_user("sdk-keyset")[-8:]
    made = {ctl.create_container(command=["k", str(i)], priority=i + 1,
                                 container_image=image)["uuid"] for i in range(12)}
    api = ctl.api()
    for order_key in ("created_at", "uuid"):
        got = [c["uuid"] for c in arvados.util.keyset_list_all(
            api.containers().list, filters=[["container_image", "=", image]],
            order_key=order_key, limit=5, num_retries=0)]
        assert len(got) == len(made) and set(got) == made


def test_unauthenticated_and_bad_token(controller_session: ControllerProcess) -> None:
    ctl = controller_session
    ctx = ctl.ssl_context()
    for headers in ({}, {"Authorization": "Bearer not-a-token"}):
        req = urllib.request.Request(f"{ctl.url}/arvados/v1/containers", headers=headers)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, context=ctx, timeout=10)
        assert err.value.code == 401
        assert json.loads(err.value.read())["errors"]
    # The discovery document needs no token, and the dev CA verifies the server certificate.
    with urllib.request.urlopen(f"{ctl.url}/discovery/v1/apis/arvados/v1/rest",
                                context=ctx, timeout=10) as resp:
        doc = json.loads(resp.read())
    assert doc["rootUrl"] == f"https://{ctl.host}/"
    assert doc["baseUrl"] == f"https://{ctl.host}/arvados/v1/"


def test_legacy_form_client_and_method_override(controller_session: ControllerProcess) -> None:
    """The dispatchers' wire format: form bodies, string operands, POST + override."""
    ctl = controller_session
    ctx = ctl.ssl_context()
    auth = {"Authorization": f"Bearer {ctl.root_token}"}

    def call(method: str, path: str, form: dict[str, str] | None = None,
             headers: dict[str, str] | None = None) -> Any:
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        req = urllib.request.Request(f"{ctl.url}/arvados/v1/{path}", data=data, method=method,
                                     headers={**auth, **(headers or {})})
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
            return json.loads(resp.read())

    created = call("POST", "containers", {"container": json.dumps(
        {"command": ["true"], "priority": 7, "container_image": "legacy-form",
         "runtime_constraints": {"vcpus": 1, "ram": 1 << 20}})})
    uuid = created["uuid"]
    filters = json.dumps([["container_image", "=", "legacy-form"], ["priority", ">", "0"]])
    listed = call("POST", "containers", {"filters": filters, "order": "priority desc",
                                         "count": "exact", "limit": "10"},
                  headers={"X-Http-Method-Override": "GET"})
    assert [i["uuid"] for i in listed["items"]] == [uuid]
    cancelled = call("PUT", f"containers/{uuid}", {"container": '{"state":"Cancelled"}'})
    assert cancelled["state"] == "Cancelled" and cancelled["finished_at"]


def test_sdk_site_admin_tour(controller_session: ControllerProcess) -> None:
    """What a site admin tries first with the real SDK: who am I, priorities flowing from
    requests to containers, list parameters, and every lock/unlock refusal."""
    ctl = controller_session
    user_token = ctl.add_user("sdk-tour")
    api_user, api_root = ctl.api(user_token), ctl.api()
    api_admin2 = ctl.api(ctl.add_user("sdk-tour-admin", admin=True))

    me = api_user.users().current().execute()
    assert me["username"] == "sdk-tour" and me["is_admin"] is False
    assert api_root.users().current().execute()["is_admin"] is True
    tok = api_user.api_client_authorizations().current().execute()
    assert tok["uuid"] == user_token.split("/")[1] and tok["owner_uuid"] == me["uuid"]
    assert "api_token" not in tok or tok["api_token"] != user_token.split("/")[2]
    assert api_root.api_client_authorizations().current().execute()["uuid"] == \
        "zzzzz-gj3su-000000000000000"

    tag = me["uuid"][-10:]
    crs = [_cr(api_user, command=["echo", "tour", tag, str(i)], priority=1) for i in range(3)]
    uuids = [cr["container_uuid"] for cr in crs]
    before = api_user.containers().get(uuid=uuids[0]).execute()["priority"]
    up = api_user.container_requests().update(
        uuid=crs[0]["uuid"], body={"container_request": {"priority": 500}}).execute()
    assert up["priority"] == 500
    after = api_user.containers().get(uuid=uuids[0]).execute()["priority"]
    assert after > before and after // 2**50 == 499  # 500 * 2^50 - created_at (ms)

    # list parameters: order, select, limit, offset, count
    flt = [["command", "contains", tag], ["state", "=", "Queued"]]
    page = api_root.containers().list(filters=flt, order=["priority desc"],
                                      select=["uuid", "priority"], limit=2, offset=0,
                                      count="exact").execute()
    assert page["items_available"] == 3 and page["limit"] == 2 and page["offset"] == 0
    assert page["items"][0]["uuid"] == uuids[0]
    assert set(page["items"][0]) == {"uuid", "priority", "kind"}
    rest = api_root.containers().list(filters=flt, order=["priority desc"], limit=2, offset=2,
                                      count="none").execute()
    assert len(rest["items"]) == 1 and "items_available" not in rest
    assert {i["uuid"] for i in page["items"] + rest["items"]} == set(uuids)
    requests = api_user.container_requests().list(
        filters=[["container_uuid", "in", uuids]], order=["created_at asc"]).execute()
    assert [r["uuid"] for r in requests["items"]] == [cr["uuid"] for cr in crs]

    # lock / unlock refusals
    target = uuids[1]
    with pytest.raises(HttpError) as err:
        api_user.containers().lock(uuid=target).execute()
    assert err.value.resp.status == 403
    with pytest.raises(HttpError) as err:
        api_root.containers().unlock(uuid=target).execute()
    assert err.value.resp.status == 422 and "cannot unlock when Queued" in err.value.content.decode()
    assert api_root.containers().lock(uuid=target).execute()["state"] == "Locked"
    with pytest.raises(HttpError) as err:
        api_admin2.containers().unlock(uuid=target).execute()
    assert err.value.resp.status == 403
    with pytest.raises(HttpError) as err:
        api_admin2.containers().lock(uuid=target).execute()
    assert err.value.resp.status == 422 and "cannot lock when Locked" in err.value.content.decode()
    unlocked = api_root.containers().unlock(uuid=target).execute()
    assert unlocked["state"] == "Queued" and unlocked["locked_by_uuid"] is None
    assert api_root.containers().get(uuid=target).execute()["lock_count"] == 1
    idle = ctl.create_container(command=["echo", "nobody wants me", tag], priority=0)
    with pytest.raises(HttpError) as err:
        api_root.containers().lock(uuid=idle["uuid"]).execute()
    assert err.value.resp.status == 422 and "priority" in err.value.content.decode()

    # cancel through the request: priority 0 -> the container is Cancelled, the request Final
    api_user.container_requests().update(
        uuid=crs[2]["uuid"], body={"container_request": {"priority": 0}}).execute()
    assert api_user.containers().get(uuid=uuids[2]).execute()["state"] == "Cancelled"
    assert api_user.container_requests().get(uuid=crs[2]["uuid"]).execute()["state"] == "Final"
