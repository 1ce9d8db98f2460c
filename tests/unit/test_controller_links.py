"""The ``links`` resource (only what ``published_port`` web-service names need): create, get,
list with filters, delete, who may do what; and the same over HTTP."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from dispatcher.arvados.controller.app import build_app
from dispatcher.arvados.controller.errors import Forbidden, NotFound, Unprocessable
from dispatcher.arvados.controller.filters import parse_list_params
from dispatcher.arvados.controller.models import LINK
from dispatcher.arvados.controller.states import Caller
from dispatcher.arvados.controller.store import Policy, Store
from dispatcher.config import parse_config
from tests.unit.test_controller_store import ROOT_TOKEN, Clock, cr_attrs, user


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "db.sqlite3", Policy(system_root_token=ROOT_TOKEN), clock=Clock())
    yield s
    s.close()


def listed(store: Store, caller: Caller, filters: list[Any]) -> list[dict[str, Any]]:
    q = parse_list_params({"filters": filters}, LINK, max_items=100,
                          default_order="created_at asc")
    res = store.list_page(LINK, caller, q)
    return [json.loads(d) for d in res.docs] if res.docs is not None else res.items


def test_create_get_list_filter_delete(store: Store) -> None:
    alice = user(store, "alice")
    cr = store.create_request(alice, cr_attrs())
    link = store.create_link(alice, {"link_class": "published_port", "name": "web",
                                     "head_uuid": cr["uuid"], "properties": {"port": 8080}})
    assert link["kind"] == "arvados#link" and link["uuid"].startswith("zzzzz-o0j2j-")
    assert link["owner_uuid"] == alice.user_uuid and link["etag"]
    assert link["created_at"] == link["modified_at"] and link["tail_uuid"] is None
    assert store.get(LINK, alice, link["uuid"]) == link
    tag = store.create_link(alice, {"link_class": "tag", "name": "web", "head_uuid": cr["uuid"]})
    assert tag["properties"] == {}
    assert [x["uuid"] for x in listed(store, alice, [["name", "=", "web"]])] == \
        [link["uuid"], tag["uuid"]]
    wanted = [["link_class", "=", "published_port"], ["name", "=", "web"]]
    assert [x["uuid"] for x in listed(store, alice, wanted)] == [link["uuid"]]
    assert [x["uuid"] for x in listed(store, alice, [["properties.port", "=", 8080]])] == \
        [link["uuid"]]
    assert listed(store, alice, [["name", "=", "other"]]) == []
    assert store.delete_link(alice, link["uuid"])["uuid"] == link["uuid"]
    with pytest.raises(NotFound):
        store.get(LINK, alice, link["uuid"])
    assert listed(store, store.system_caller, wanted) == []


def test_validation(store: Store) -> None:
    alice = user(store, "alice")
    with pytest.raises(Unprocessable, match="needs a link_class"):
        store.create_link(alice, {"name": "x"})
    with pytest.raises(Unprocessable, match="permission links"):
        store.create_link(alice, {"link_class": "permission", "name": "can_read"})
    with pytest.raises(Unprocessable, match="cannot set"):
        store.create_link(alice, {"link_class": "tag", "uuid": "zzzzz-o0j2j-000000000000000"})
    with pytest.raises(Unprocessable, match="expected hash"):
        store.create_link(alice, {"link_class": "tag", "properties": [1]})


def test_permissions(store: Store) -> None:
    alice, bob = user(store, "alice"), user(store, "bob")
    admin = user(store, "admin", admin=True)
    cr = store.create_request(alice, cr_attrs())
    # Only objects the caller can read; only itself as owner (an admin may choose).
    with pytest.raises(Forbidden, match="head_uuid"):
        store.create_link(bob, {"link_class": "published_port", "head_uuid": cr["uuid"]})
    with pytest.raises(Forbidden, match="tail_uuid"):
        store.create_link(bob, {"link_class": "tag", "tail_uuid": "zzzzz-xvhdp-000000000000999"})
    with pytest.raises(Forbidden, match="owned by someone else"):
        store.create_link(bob, {"link_class": "tag", "owner_uuid": alice.user_uuid})
    mine = store.create_link(bob, {"link_class": "tag", "tail_uuid": bob.user_uuid})
    by_admin = store.create_link(admin, {"link_class": "published_port", "name": "svc",
                                         "head_uuid": cr["uuid"], "owner_uuid": bob.user_uuid,
                                         "properties": {"port": 80}})
    assert by_admin["owner_uuid"] == bob.user_uuid
    # Visible to the owner and to the owner of the request it points at; not to others.
    assert {x["uuid"] for x in listed(store, bob, [])} == {mine["uuid"], by_admin["uuid"]}
    assert [x["uuid"] for x in listed(store, alice, [])] == [by_admin["uuid"]]
    assert store.get(LINK, alice, by_admin["uuid"])["name"] == "svc"
    with pytest.raises(NotFound):
        store.get(LINK, alice, mine["uuid"])
    # Deleting: the owner or an admin, not someone who can merely read it.
    with pytest.raises(Forbidden, match="owner or an admin"):
        store.delete_link(alice, by_admin["uuid"])
    with pytest.raises(NotFound):
        store.delete_link(alice, mine["uuid"])
    store.delete_link(bob, by_admin["uuid"])
    store.delete_link(admin, mine["uuid"])
    assert listed(store, admin, []) == []


def test_links_over_http(tmp_path: Path) -> None:
    cfg = parse_config({"Clusters": {"zzzzz": {"SystemRootToken": ROOT_TOKEN}}})
    store = Store(tmp_path / "db", Policy.from_config(cfg))
    _, alice = store.create_user("alice")
    _, bob = store.create_user("bob")

    async def main() -> None:
        async with TestClient(TestServer(build_app(cfg, store), host="127.0.0.1")) as client:
            def auth(token: str) -> dict[str, str]:
                return {"Authorization": f"Bearer {token}"}

            r = await client.post("/arvados/v1/links", headers=auth(alice), json={"link": {
                "link_class": "published_port", "name": "warthogfacedbuffoon",
                "properties": {"port": 8080}}})
            assert r.status == 200, await r.text()
            link = await r.json()
            flt = json.dumps([["link_class", "=", "published_port"],
                              ["name", "=", "warthogfacedbuffoon"]])
            r = await client.get("/arvados/v1/links", headers=auth(ROOT_TOKEN),
                                 params={"filters": flt, "limit": "1", "count": "none"})
            body = await r.json()
            assert r.status == 200 and body["kind"] == "arvados#linkList"
            assert [x["uuid"] for x in body["items"]] == [link["uuid"]]
            r = await client.get(f"/arvados/v1/links/{link['uuid']}", headers=auth(bob))
            assert r.status == 404
            r = await client.delete(f"/arvados/v1/links/{link['uuid']}", headers=auth(bob))
            assert r.status == 404
            r = await client.delete(f"/arvados/v1/links/{link['uuid']}", headers=auth(alice))
            assert r.status == 200 and (await r.json())["uuid"] == link["uuid"]
            r = await client.get(f"/arvados/v1/links/{link['uuid']}", headers=auth(alice))
            assert r.status == 404

    try:
        asyncio.run(main())
    finally:
        store.close()
