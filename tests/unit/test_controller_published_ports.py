"""``published_ports`` (tunnel.md 5.7): validation, URLs and external ports while Running."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dispatcher.arvados.controller.errors import Unprocessable
from dispatcher.arvados.controller.models import CONTAINER
from dispatcher.arvados.controller.states import (
    WebServicesConfig,
    published_port_urls,
    validate_published_ports,
)
from dispatcher.arvados.controller.store import Policy, Store
from tests.unit.test_controller_store import ROOT_TOKEN, Clock, cr_attrs, user

PORTS = {"8080": {"access": "public", "label": "web", "initial_path": "/start"},
         "443": {"access": "private", "label": "api", "initial_path": ""},
         "9000": {"access": "private", "label": "extra", "initial_path": "x"}}
_names = itertools.count()


def make_store(tmp_path: Path, web: WebServicesConfig) -> Store:
    return Store(tmp_path / "db.sqlite3",
                 Policy(system_root_token=ROOT_TOKEN, web_services=web), clock=Clock())


@pytest.fixture
def range_store(tmp_path: Path) -> Iterator[Store]:
    s = make_store(tmp_path, WebServicesConfig("https://ws.example.com", 2000, 2001))
    yield s
    s.close()


def run_container(store: Store, ports: dict[str, Any]) -> str:
    n = next(_names)
    owner = user(store, f"user{n}")
    # A distinct command each time: no container reuse between the calls.
    cr = store.create_request(owner, cr_attrs(published_ports=ports, command=["x", str(n)]))
    uuid: str = cr["container_uuid"]
    root = store.system_caller
    store.lock_container(root, uuid)
    store.update_container(root, uuid, {"state": "Running"})
    return uuid


@pytest.mark.parametrize("ports, message", [
    ([1], "must be an object keyed by port number"),
    ({"0": {}}, "port number from 1 to 65535"),
    ({"65536": {}}, "port number from 1 to 65535"),
    ({"080": {}}, "port number from 1 to 65535"),
    ({"http": {}}, "port number from 1 to 65535"),
    ({"80": "public"}, "must be an object"),
    ({"80": {"access": "open", "label": "l", "initial_path": ""}}, '"public" or "private"'),
    ({"80": {"access": "public", "label": "", "initial_path": ""}}, "non-empty string"),
    ({"80": {"access": "public", "label": "l"}}, "initial_path: must be a string"),
    ({"80": {"access": "public", "label": "l", "initial_path": "", "x": 1}}, "unknown keys"),
])
def test_validation_names_the_problem(ports: Any, message: str) -> None:
    with pytest.raises(Unprocessable, match=message) as info:
        validate_published_ports(ports)
    assert info.value.status == 422


def test_requests_are_validated_on_create_and_update(range_store: Store) -> None:
    alice = user(range_store, "alice")
    with pytest.raises(Unprocessable, match="published_ports\\['80'\\].label"):
        range_store.create_request(alice, cr_attrs(published_ports={
            "80": {"access": "public", "label": "", "initial_path": ""}}))
    draft = range_store.create_request(alice, cr_attrs(state="Uncommitted"))
    with pytest.raises(Unprocessable, match="port number"):
        range_store.update_request(alice, draft["uuid"], {"published_ports": {"0": {}}})
    with pytest.raises(Unprocessable, match="use_existing: cannot be true when service"):
        range_store.create_request(alice, cr_attrs(service=True))
    ok = range_store.create_request(alice, cr_attrs(service=True, use_existing=False,
                                                    published_ports=PORTS))
    assert ok["published_ports"] == PORTS
    with pytest.raises(Unprocessable, match="port number"):
        range_store.create_container(range_store.system_caller,
                                     {"command": ["x"], "published_ports": {"x": {}}})


def test_wildcard_urls_appear_on_running_and_disappear_after(tmp_path: Path) -> None:
    store = make_store(tmp_path, WebServicesConfig("https://*.containers.example.com"))
    try:
        uuid = run_container(store, PORTS)
        ctr = store.get(CONTAINER, store.system_caller, uuid)
        web = ctr["published_ports"]["8080"]
        assert web["base_url"] == f"https://{uuid}-8080.containers.example.com/"
        assert web["initial_url"] == f"https://{uuid}-8080.containers.example.com/start"
        assert "external_port" not in web
        assert ctr["published_ports"]["443"]["initial_url"] == web["base_url"].replace(
            "8080", "443")
        store.update_container(store.system_caller, uuid, {"state": "Complete"})
        done = store.get(CONTAINER, store.system_caller, uuid)
        assert done["published_ports"] == PORTS
    finally:
        store.close()


def test_port_range_assigns_lowest_free_ports_until_exhausted(range_store: Store) -> None:
    first = run_container(range_store, PORTS)
    ports = range_store.get(CONTAINER, range_store.system_caller, first)["published_ports"]
    # Assigned in numeric port order, lowest free external port first; the third is left out.
    assert ports["443"]["external_port"] == 2000
    assert ports["443"]["base_url"] == "https://ws.example.com:2000/"
    assert ports["8080"]["external_port"] == 2001
    assert ports["8080"]["initial_url"] == "https://ws.example.com:2001/start"
    assert ports["9000"] == PORTS["9000"]  # exhausted: no assignment, no URL
    second_ports = {"80": {"access": "public", "label": "w", "initial_path": ""}}
    second = run_container(range_store, second_ports)
    assert range_store.get(CONTAINER, range_store.system_caller, second)[
        "published_ports"] == second_ports
    range_store.update_container(range_store.system_caller, first, {"state": "Cancelled"})
    assert range_store.get(CONTAINER, range_store.system_caller, first)[
        "published_ports"] == PORTS
    third = run_container(range_store, second_ports | {"81": second_ports["80"]})
    got = range_store.get(CONTAINER, range_store.system_caller, third)["published_ports"]
    assert (got["80"]["external_port"], got["81"]["external_port"]) == (2000, 2001)


def test_no_urls_without_a_web_services_url() -> None:
    assert published_port_urls("u", PORTS, WebServicesConfig(), {}) == PORTS
    # A non-wildcard URL without a port range has no way to reach a port.
    assert published_port_urls("u", PORTS, WebServicesConfig("https://h.example"), {}) == PORTS
    with_port = WebServicesConfig("https://*.c.example:9443")
    assert published_port_urls("u", PORTS, with_port, {})["8080"]["base_url"] == \
        "https://u-8080.c.example:9443/"
