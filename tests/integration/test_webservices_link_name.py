"""A container web service reached by a published name, end to end: a real ``crunchgate
controller`` (links resource + broker with its API backend), the real gateway agent and tunnel,
an HTTP service standing in for the container (reference section 8.1, _PublishedPortByName).

``https://warthogfacedbuffoon.containers.localhost/`` → the ``published_port`` link of that
name → its container request and port → the container, with the client's ``Host``.
"""

from __future__ import annotations

import http.client
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.controller import ControllerProcess, start_controller
from tests.helpers.tunnel import LoopThread
from tests.integration.test_webservices_port_range import start_container_gateway, start_service


@pytest.fixture
def wildcard_controller(tmp_path: Path) -> Iterator[ControllerProcess]:
    ctl = start_controller(tmp_path / "controller", extra_config={"Services": {
        "ContainerWebServices": {"ExternalURL": "https://*.containers.localhost"}}})
    try:
        yield ctl
    finally:
        ctl.stop()


def vhost_request(ctl: ControllerProcess, host: str, method: str, path: str
                  ) -> tuple[int, bytes]:
    ctx = ssl.create_default_context(cafile=str(ctl.ca_file))
    c = http.client.HTTPSConnection("127.0.0.1", ctl.port, context=ctx, timeout=20)
    try:
        c.request(method, path, headers={"Host": host})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def test_published_port_by_name_end_to_end(wildcard_controller: ControllerProcess,
                                           tmp_path: Path) -> None:
    ctl = wildcard_controller
    user = ctl.add_user("webuser")
    lt = LoopThread()
    try:
        runner, port = lt.run(start_service())
        cr_attrs = {"command": ["sleep"], "container_image": "img", "output_path": "/out",
                    "cwd": "/", "runtime_constraints": {"vcpus": 1, "ram": 1 << 20},
                    "state": "Committed", "priority": 1, "published_ports": {
                        str(port): {"access": "public", "label": "web", "initial_path": ""}}}
        status, cr = ctl.request("POST", "arvados/v1/container_requests",
                                 {"container_request": cr_attrs}, token=user)
        assert status == 200, cr
        uuid = cr["container_uuid"]
        status, _ = ctl.request("POST", f"arvados/v1/containers/{uuid}/lock")
        assert status == 200
        ctl.update_container(uuid, state="Running")
        status, link = ctl.request("POST", "arvados/v1/links", {"link": {
            "link_class": "published_port", "name": "warthogfacedbuffoon",
            "head_uuid": cr["uuid"], "properties": {"port": port}}}, token=user)
        assert status == 200 and link["kind"] == "arvados#link", link
        status, _ = ctl.request("POST", "arvados/v1/links", {"link": {
            "link_class": "published_port", "name": "badport", "head_uuid": cr["uuid"],
            "properties": {"port": "http"}}}, token=user)
        assert status == 200

        gw = start_container_gateway(lt, ctl, uuid, tmp_path)
        try:
            host = "warthogfacedbuffoon.containers.localhost"
            for method in ("GET", "PURGE"):
                status, body = vhost_request(ctl, host, method, "/path?x=1")
                assert (status, body) == (200, f"{method} /path?x=1 host={host}".encode())
            status, body = vhost_request(ctl, "nosuchname.containers.localhost", "GET", "/")
            assert status == 404 and b"container web service not found" in body
            status, body = vhost_request(ctl, "badport.containers.localhost", "GET", "/")
            assert status == 500 and b"invalid port" in body
            # The link gone, the name is gone.
            status, _ = ctl.request("DELETE", f"arvados/v1/links/{link['uuid']}", token=user)
            assert status == 200
            assert vhost_request(ctl, host, "GET", "/")[0] == 404
        finally:
            lt.run(gw.aclose())
            lt.run(runner.cleanup())
    finally:
        lt.stop()
