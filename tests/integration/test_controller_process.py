"""``crunchgate controller`` as a process: restart, HTTP errors, metrics, log hygiene."""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.controller import ControllerProcess, start_controller


class Http:
    """The helper's legacy-format caller, bound to one token (None: no Authorization)."""

    def __init__(self, ctl: ControllerProcess, token: str | None) -> None:
        self.ctl = ctl
        self.token = token

    def call(self, method: str, path: str, params: dict[str, Any] | None = None) -> tuple[int, Any]:
        if self.token is None:
            return self._anonymous(method, path, params)
        return self.ctl.request(method, path, params, token=self.token)

    def _anonymous(self, method: str, path: str, params: dict[str, Any] | None) -> tuple[int, Any]:
        url = f"{self.ctl.url}/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        req = urllib.request.Request(url, method=method)
        try:
            with urllib.request.urlopen(req, context=self.ctl.ssl_context(), timeout=10) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()


def test_restart_keeps_data(controller: ControllerProcess) -> None:
    token = controller.add_user("restart-user")
    root = Http(controller, controller.root_token)
    status, ctr = root.call("POST", "arvados/v1/containers",
                            {"container": {"command": ["x"], "priority": 3}})
    assert status == 200
    status, _ = root.call("POST", f"arvados/v1/containers/{ctr['uuid']}/lock")
    assert status == 200
    ca_before = controller.ca_file.read_bytes()
    controller.restart()
    assert controller.ca_file.read_bytes() == ca_before  # clients keep trusting the CA
    status, got = root.call("GET", f"arvados/v1/containers/{ctr['uuid']}")
    assert status == 200 and got["state"] == "Locked" and got["lock_count"] == 1
    status, me = Http(controller, token).call("GET", "arvados/v1/users/current")
    assert status == 200 and me["username"] == "restart-user"


def test_http_errors(controller_session: ControllerProcess) -> None:
    ctl = controller_session
    root = Http(ctl, ctl.root_token)
    status, body = root.call("GET", "arvados/v1/containers/zzzzz-dz642-doesnotexist000")
    assert status == 404 and body["errors"]
    status, body = root.call("GET", "arvados/v1/nosuchresource")
    assert status == 404 and body["errors"]
    status, body = root.call("GET", "arvados/v1/containers",
                             {"filters": [["nosuchattr", "=", 1]]})
    assert status == 422 and "Invalid attribute 'nosuchattr'" in body["errors"][0]
    status, body = root.call("GET", "arvados/v1/containers", {"filters": [["state", "≈", "x"]]})
    assert status == 422 and "Invalid operator" in body["errors"][0]
    status, body = root.call("DELETE", "arvados/v1/containers")
    assert status == 405

    status, ctr = root.call("POST", "arvados/v1/containers",
                            {"container": {"command": ["y"], "priority": 1}})
    uuid = ctr["uuid"]
    status, body = root.call("PUT", f"arvados/v1/containers/{uuid}",
                             {"container": {"exit_code": 3}})
    assert status == 422 and "exit_code cannot be modified in state 'Queued'" in body["errors"][0]
    status, body = root.call("PUT", f"arvados/v1/containers/{uuid}",
                             {"container": {"state": "Complete"}})
    assert status == 422 and body["errors"] == ["state: cannot change from Queued to Complete"]
    # Locked by the root token; another admin may not unlock.
    assert root.call("POST", f"arvados/v1/containers/{uuid}/lock")[0] == 200
    other = Http(ctl, ctl.add_user("errors-admin", admin=True))
    status, body = other.call("POST", f"arvados/v1/containers/{uuid}/unlock")
    assert status == 403 and "locked by a different token" in body["errors"][0]
    status, body = other.call("PATCH", f"arvados/v1/containers/{uuid}",
                              {"container": {"state": "Cancelled"}})
    assert status == 200 and body["state"] == "Cancelled"
    status, body = root.call("POST", f"arvados/v1/containers/{uuid}/lock")
    assert status == 422 and body["errors"] == ["cannot lock when Cancelled"]


def test_queue_listing_as_dispatchers_do(controller_session: ControllerProcess) -> None:
    ctl = controller_session
    root = Http(ctl, ctl.root_token)
    image = "listing-" + ctl.add_user("listing-marker")[-8:]
    made = []
    for prio in (5, 9, 0, 7):
        status, ctr = root.call("POST", "arvados/v1/containers", {
            "container": {"command": ["z"], "priority": prio, "container_image": image}})
        made.append(ctr)
    flt = [["container_image", "=", image], ["state", "=", "Queued"], ["priority", ">", "0"]]
    status, count = root.call("GET", "arvados/v1/containers",
                              {"filters": flt, "count": "exact", "limit": 0,
                               "order": ["priority desc"]})
    assert status == 200 and count["items_available"] == 3 and count["items"] == []
    status, page = root.call("GET", "arvados/v1/containers",
                             {"filters": flt, "count": "none", "limit": 2, "offset": 1,
                              "order": ["priority desc"], "select": ["uuid", "priority"]})
    assert "items_available" not in page
    assert [i["priority"] for i in page["items"]] == [7, 5]
    assert set(page["items"][0]) == {"uuid", "priority", "kind"}
    # Keyset paging the cloud dispatcher uses: order=uuid plus ["uuid", ">", last].
    first = min(c["uuid"] for c in made)
    status, rest = root.call("GET", "arvados/v1/containers", {
        "filters": [["container_image", "=", image], ["uuid", ">", first]], "order": "uuid",
        "count": "none"})
    assert [i["uuid"] for i in rest["items"]] == sorted(c["uuid"] for c in made)[1:]
    me = root.call("GET", "arvados/v1/api_client_authorizations/current")[1]
    assert me["uuid"] == "zzzzz-gj3su-000000000000000"


def test_metrics_and_health(controller_session: ControllerProcess) -> None:
    ctl = controller_session
    Http(ctl, ctl.root_token).call("GET", "arvados/v1/containers", {"limit": 1})
    status, _ = Http(ctl, None).call("GET", "metrics")
    assert status in (401, 403, 404)
    status, text = Http(ctl, ctl.management_token).call("GET", "metrics")
    assert status == 200
    assert 'crunchgate_controller_request_duration_seconds_count{code="200",method="GET",route="containers.list"}' in text
    status, _ = Http(ctl, ctl.root_token).call("GET", "_health/ping")
    assert status == 403
    status, body = Http(ctl, ctl.management_token).call("GET", "_health/ping")
    assert status == 200 and body == {"health": "OK"}
    status, text = Http(ctl, ctl.management_token).call("GET", "metrics")
    assert "crunchgate_controller_containers{state=\"Queued\"}" in text


def test_tokens_never_logged(tmp_path: Path) -> None:
    ctl = start_controller(tmp_path / "ctl")
    try:
        token = ctl.add_user("log-user")
        secret = token.rsplit("/", 1)[1]
        Http(ctl, token).call("GET", "arvados/v1/users/current")
        # api_token as a query parameter must not reach the request log either.
        Http(ctl, None).call("GET", "arvados/v1/container_requests", {"api_token": token})
        Http(ctl, "v2/zzzzz-gj3su-aaaaaaaaaaaaaaa/wrongsecretwrongsecret").call(
            "GET", "arvados/v1/containers")
        Http(ctl, ctl.root_token).call("GET", "arvados/v1/containers",
                                       {"filters": [["bad", "=", 1]]})
        ctl.stop()
        text = ctl.log_text()
        assert '"route": "container_requests.list"' in text  # requests are logged...
        for s in (secret, ctl.root_token, ctl.management_token, "wrongsecretwrongsecret"):
            assert s not in text  # ...without their tokens
    finally:
        ctl.stop()


def test_max_dispatch_attempts_from_config(tmp_path: Path) -> None:
    ctl = start_controller(tmp_path / "ctl", extra_config={"Containers": {"MaxDispatchAttempts": 1}})
    try:
        root = Http(ctl, ctl.root_token)
        _, ctr = root.call("POST", "arvados/v1/containers",
                           {"container": {"command": ["x"], "priority": 1}})
        root.call("POST", f"arvados/v1/containers/{ctr['uuid']}/lock")
        status, body = root.call("POST", f"arvados/v1/containers/{ctr['uuid']}/unlock")
        assert status == 200 and body["state"] == "Cancelled"
        _, got = root.call("GET", f"arvados/v1/containers/{ctr['uuid']}")
        assert got["runtime_status"]["error"].endswith(
            "'Containers.MaxDispatchAttempts' (lock_count=1)")
    finally:
        ctl.stop()


@pytest.mark.parametrize("args", [["add-user"], ["serve", "extra"]])
def test_cli_usage_errors(controller_session: ControllerProcess, args: list[str]) -> None:
    import subprocess

    from tests.helpers.controller import _crunchgate_argv

    out = subprocess.run([*_crunchgate_argv(), "controller", *args, "--config",
                          str(controller_session.config_path), "--data",
                          str(controller_session.data_dir)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 2 and out.stdout == ""


def test_helper_container_calls(controller_session: ControllerProcess) -> None:
    ctl = controller_session
    ctr = ctl.create_container(command=["true"], priority=2)
    assert ctl.get_container(ctr["uuid"])["state"] == "Queued"
    with pytest.raises(TimeoutError):
        ctl.wait_container(ctr["uuid"], {"Complete"}, timeout_s=0.2)
    ctl.update_container(ctr["uuid"], state="Cancelled")
    assert ctl.wait_container(ctr["uuid"], {"Complete", "Cancelled"})["state"] == "Cancelled"
    with pytest.raises(RuntimeError, match="422"):
        ctl.update_container(ctr["uuid"], state="Queued")


def test_controller_hosts_the_tunnel_broker(controller_session: ControllerProcess) -> None:
    pytest.importorskip("tunnel.broker")
    ctl = controller_session
    # The broker's routes are mounted: the pre-POST shell endpoint answers 410 as in Arvados.
    status, _ = ctl.request("GET", "arvados/v1/connect/zzzzz-dz642-000000000000000/ssh")
    assert status == 410


def test_configured_tls_certificate_is_served(tmp_path: Path) -> None:
    """With ``TLS.Certificate``/``TLS.Key`` (Arvados' keys, ``file://`` form accepted) the
    controller serves that certificate and generates none; clients trusting its CA verify it,
    and the real SDK works with ``insecure=True``."""
    import ssl

    from dispatcher.arvados.controller.tls import ensure_dev_certs

    site = ensure_dev_certs(tmp_path / "site-pki", ["127.0.0.1"])
    ctl = start_controller(tmp_path / "ctl", extra_config={"TLS": {
        "Certificate": f"file://{site.cert}", "Key": str(site.key), "Insecure": False}})
    try:
        assert not (ctl.data_dir / "tls").exists()  # nothing generated
        ctx = ssl.create_default_context(cafile=str(site.ca_cert))
        with urllib.request.urlopen(f"{ctl.url}/discovery/v1/apis/arvados/v1/rest",
                                    context=ctx, timeout=10) as resp:
            assert resp.status == 200
        untrusting = ssl.create_default_context(cafile=str(ensure_dev_certs(
            tmp_path / "other-pki", ["127.0.0.1"]).ca_cert))
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            urllib.request.urlopen(f"{ctl.url}/discovery/v1/apis/arvados/v1/rest",
                                   context=untrusting, timeout=10)
        assert ctl.api().users().current().execute()["is_admin"] is True
    finally:
        ctl.stop()
