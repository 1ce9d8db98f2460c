"""The service wrapper: health/metrics auth matrix, health check outcomes, run_service."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import Counter

from dispatcher.config import ClusterConfig, InternalURL, parse_config
from dispatcher.service import (
    ServiceError,
    bound_addresses,
    create_service_app,
    listen_address,
    registry_of,
    run_service,
    set_health_check,
)

TOKEN = "mgmt-token-0123456789abcdef"


def with_client(app: web.Application, fn: Callable[[TestClient], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            return await fn(client)

    return asyncio.run(main())


def gets(app: web.Application, *requests: tuple[str, dict[str, str] | None]
         ) -> list[tuple[int, str, Any]]:
    """Several GETs against one running app (an aiohttp app runs on one loop only)."""

    async def fn(client: TestClient) -> list[tuple[int, str, Any]]:
        out = []
        for path, headers in requests:
            resp = await client.get(path, headers=headers or {})
            out.append((resp.status, await resp.text(), resp.headers.copy()))
        return out

    return with_client(app, fn)


def get(app: web.Application, path: str, headers: dict[str, str] | None = None
        ) -> tuple[int, str, Any]:
    return gets(app, (path, headers))[0]


AUTH_CASES = [
    # (configured token, Authorization header, expected status)
    ("", None, 404),
    ("", f"Bearer {TOKEN}", 404),
    (TOKEN, None, 401),
    (TOKEN, "Bearer wrong-token", 403),
    (TOKEN, f"Bearer {TOKEN}x", 403),
    (TOKEN, f"Basic {TOKEN}", 403),
    (TOKEN, f"Bearer {TOKEN}", 200),
    (TOKEN, f"bearer {TOKEN}", 200),
]


@pytest.mark.parametrize("path", ["/_health/ping", "/metrics", "/metrics.json"])
@pytest.mark.parametrize(("token", "header", "status"), AUTH_CASES)
def test_management_auth_matrix(path: str, token: str, header: str | None, status: int) -> None:
    cfg = ClusterConfig(management_token=token)
    app = create_service_app(cfg, "DispatchSLURM")
    code, body, _ = get(app, path, {"Authorization": header} if header else None)
    assert code == status
    if status != 200:
        errors = json.loads(body)["errors"]
        expected = {404: "disabled", 401: "authorization required", 403: "authorization error"}
        assert errors == [expected[status]]
        # Nothing about metrics leaks through a refusal.
        assert "arvados_version_running" not in body


def test_metrics_not_served_unauthenticated_when_token_empty() -> None:
    # Deliberate difference from Arvados, which serves /metrics to anyone in this case.
    app = create_service_app(ClusterConfig(), "DispatchLSF")
    code, body, _ = get(app, "/metrics")
    assert code == 404
    assert "process_" not in body


def test_health_ok_and_error_bodies() -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    app = create_service_app(management_token=TOKEN)
    code, body, headers = get(app, "/_health/ping", auth)
    assert (code, json.loads(body)) == (200, {"health": "OK"})
    assert headers["Content-Type"].startswith("application/json")

    app = create_service_app(management_token=TOKEN, health=lambda: "dispatch loop stopped")
    code, body, _ = get(app, "/_health/ping", auth)
    assert (code, json.loads(body)) == (200, {"health": "ERROR", "error": "dispatch loop stopped"})

    async def failing() -> str | None:
        raise RuntimeError("squeue unreachable")

    async def healthy() -> None:
        return None

    app = create_service_app(management_token=TOKEN)

    async def swap(client: TestClient) -> list[Any]:
        bodies = []
        for check in (failing, healthy):
            set_health_check(app, check)  # replaced while the app is running
            resp = await client.get("/_health/ping", headers=auth)
            bodies.append(await resp.json())
        return bodies

    assert with_client(app, swap) == [
        {"health": "ERROR", "error": "RuntimeError: squeue unreachable"},
        {"health": "OK"},
    ]


def test_health_error_text_is_redacted() -> None:
    secret = "v2/zzzzz-gj3su-000000000000000/secretsecretsecretsecret"
    cfg = ClusterConfig(management_token=TOKEN, system_root_token=secret)
    from dispatcher.logs import register_secret

    register_secret(secret)
    app = create_service_app(cfg, health=lambda: f"bad token {secret}")
    _, body, _ = get(app, "/_health/ping", {"Authorization": f"Bearer {TOKEN}"})
    assert "secretsecret" not in body
    assert json.loads(body)["health"] == "ERROR"


def test_metrics_content_standard_and_component_metrics() -> None:
    app = create_service_app(management_token=TOKEN, service_name="DispatchSLURM")
    Counter("crunchgate_test_things", "things", registry=registry_of(app)).inc(3)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    (code, body, headers), (_, json_body, _) = gets(app, ("/metrics", auth), ("/metrics.json", auth))
    assert code == 200
    assert headers["Content-Type"].startswith("text/plain")
    assert "arvados_version_running{version=" in body
    assert 'crunchgate_build_info{' in body and 'service="DispatchSLURM"' in body
    assert "crunchgate_test_things_total 3.0" in body
    names = {f["name"] for f in json.loads(json_body)}
    assert {"arvados_version_running", "crunchgate_test_things"} <= names


def test_registries_are_per_app() -> None:
    a = create_service_app(management_token=TOKEN)
    b = create_service_app(management_token=TOKEN)  # same metric names, no collision
    Counter("crunchgate_only_in_a", "x", registry=registry_of(a)).inc()
    _, body_b, _ = get(b, "/metrics", {"Authorization": f"Bearer {TOKEN}"})
    assert "crunchgate_only_in_a" not in body_b


def test_request_id_echoed_or_generated() -> None:
    app = create_service_app(management_token=TOKEN)
    (_, _, given), (_, _, generated) = gets(
        app, ("/_health/ping", {"X-Request-Id": "req-abc"}), ("/_health/ping", None)
    )
    assert given["X-Request-Id"] == "req-abc"
    assert generated["X-Request-Id"].startswith("req-") and generated["X-Request-Id"] != "req-abc"


def test_service_routes_coexist() -> None:
    app = create_service_app(management_token=TOKEN)

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app.router.add_get("/hello", hello)
    assert get(app, "/hello")[:2] == (200, "hello")


def _cfg_with_url(url: str, **extra: Any) -> ClusterConfig:
    data = {"Clusters": {"zzzzz": {
        "ManagementToken": TOKEN,
        "Services": {"DispatchSLURM": {"InternalURLs": {url: extra}}},
    }}}
    return parse_config(data)


def test_listen_address_from_config() -> None:
    cfg = _cfg_with_url("http://127.0.0.1:9006")
    assert listen_address(cfg, "DispatchSLURM") == ("127.0.0.1", 9006, False)
    cfg = _cfg_with_url("https://localhost", ListenURL="http://127.0.0.1:9100")
    assert listen_address(cfg, "dispatch_slurm") == ("127.0.0.1", 9100, False)
    cfg.services.dispatch_slurm.internal_urls = {"https://127.0.0.1": InternalURL()}
    assert listen_address(cfg, "DispatchSLURM") == ("127.0.0.1", 443, True)


def test_run_service_serves_and_stops() -> None:
    app = create_service_app(management_token=TOKEN)

    async def main() -> tuple[int, str, list[tuple[str, int]]]:
        ready, stop = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(run_service(app, "127.0.0.1", 0, ready=ready, stop=stop))
        await asyncio.wait_for(ready.wait(), 10)
        host, port = bound_addresses(app)[0]
        async with aiohttp.ClientSession() as s, s.get(
            f"http://{host}:{port}/_health/ping", headers={"Authorization": f"Bearer {TOKEN}"}
        ) as resp:
            status, text = resp.status, await resp.text()
        stop.set()
        await asyncio.wait_for(task, 10)
        return status, text, [(host, port)]

    status, text, addrs = asyncio.run(main())
    assert status == 200 and json.loads(text) == {"health": "OK"}
    # After shutdown the port is free again: nothing is left listening.
    with socket.socket() as s:
        assert s.connect_ex(addrs[0]) != 0


def test_run_service_from_config_uses_internal_url() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _cfg_with_url(f"http://127.0.0.1:{port}")
    app = create_service_app(cfg, "DispatchSLURM")

    async def main() -> list[tuple[str, int]]:
        ready, stop = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(run_service(app, cfg, "DispatchSLURM", ready=ready, stop=stop))
        await asyncio.wait_for(ready.wait(), 10)
        addrs = bound_addresses(app)
        stop.set()
        await asyncio.wait_for(task, 10)
        return addrs

    assert asyncio.run(main()) == [("127.0.0.1", port)]


def test_run_service_refuses_to_start_unhealthy() -> None:
    app = create_service_app(management_token=TOKEN, health=lambda: "no scheduler")
    with pytest.raises(ServiceError, match="no scheduler"):
        asyncio.run(run_service(app, "127.0.0.1", 0, stop=asyncio.Event()))


def test_run_service_https_without_tls_files_is_clear_error() -> None:
    cfg = _cfg_with_url("https://127.0.0.1:9443")
    app = create_service_app(cfg)
    with pytest.raises(ServiceError, match="TLS.Certificate and TLS.Key"):
        asyncio.run(run_service(app, cfg, "DispatchSLURM"))


def test_run_service_port_in_use_is_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        app = create_service_app(management_token=TOKEN)
        with pytest.raises(ServiceError, match=f"cannot listen on 127.0.0.1:{port}"):
            asyncio.run(run_service(app, "127.0.0.1", port, stop=asyncio.Event()))


def test_run_service_extra_port_in_use_names_the_config_keys() -> None:
    from dispatcher.service import EXTRA_PORTS_KEY

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        app = create_service_app(management_token=TOKEN)
        app[EXTRA_PORTS_KEY] = ((port,), "Services.ContainerWebServices.ExternalPortMin/Max")
        with pytest.raises(ServiceError, match=f"127.0.0.1:{port} "
                                               r"\(Services.ContainerWebServices"):
            asyncio.run(run_service(app, "127.0.0.1", 0, stop=asyncio.Event()))


def test_controller_serves_the_port_range_only_when_it_terminates_tls() -> None:
    from dispatcher.arvados.controller.app import web_service_ports

    def cfg(controller_url: str, external_url: str, low: int, high: int) -> ClusterConfig:
        return parse_config({"Clusters": {"zzzzz": {"Services": {
            "Controller": {"InternalURLs": {controller_url: {}}},
            "ContainerWebServices": {"ExternalURL": external_url, "ExternalPortMin": low,
                                     "ExternalPortMax": high}}}}})

    assert web_service_ports(cfg("https://127.0.0.1:9000", "https://ws.example", 2000, 2002)
                             ) == (2000, 2001, 2002)
    # Behind nginx (plain http internally) nginx listens on the range, as in Arvados.
    assert web_service_ports(cfg("http://127.0.0.1:9000", "https://ws.example", 2000, 2002)
                             ) == ()
    assert web_service_ports(cfg("https://127.0.0.1:9000", "https://*.ws.example", 2000, 2002)
                             ) == ()
    assert web_service_ports(cfg("https://127.0.0.1:9000", "https://ws.example", 0, 0)) == ()


SIGTERM_SCRIPT = r"""
import asyncio, sys
from dispatcher.service import bound_addresses, create_service_app, run_service

async def main():
    app = create_service_app(management_token="tok-0123456789")
    ready = asyncio.Event()
    task = asyncio.create_task(run_service(app, "127.0.0.1", 0, ready=ready))
    await ready.wait()
    print(bound_addresses(app)[0][1], flush=True)
    await task
    print("stopped", flush=True)

asyncio.run(main())
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_run_service_stops_cleanly_on_signal(sig: str) -> None:
    import signal
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_SCRIPT], cwd=repo,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            pass  # it is listening
        proc.send_signal(getattr(signal, sig))
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert out.strip() == "stopped"
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_request_id_available_to_handlers() -> None:
    from dispatcher.service import request_id_of

    app = create_service_app(management_token=TOKEN)

    async def echo(request: web.Request) -> web.Response:
        return web.Response(text=request_id_of(request))

    app.router.add_get("/rid", echo)
    (_, given, _), (_, generated, headers) = gets(
        app, ("/rid", {"X-Request-Id": "req-mine"}), ("/rid", None))
    assert given == "req-mine"
    assert generated.startswith("req-") and headers["X-Request-Id"] == generated


def test_environment_warnings_never_show_tokens() -> None:
    from dispatcher.service import environment_warnings

    cfg = parse_config({"Clusters": {"zzzzz": {
        "SystemRootToken": "root-token-abcdefgh",
        "Services": {"Controller": {"ExternalURL": "https://127.0.0.1:8000"}},
    }}})
    assert environment_warnings(cfg, {}) == []
    same = {"ARVADOS_API_HOST": "127.0.0.1:8000", "ARVADOS_API_TOKEN": "root-token-abcdefgh",
            "ARVADOS_API_HOST_INSECURE": "false"}
    assert environment_warnings(cfg, same) == []
    other = {"ARVADOS_API_HOST": "other:443", "ARVADOS_API_TOKEN": "user-token-zyxwvuts",
             "ARVADOS_API_HOST_INSECURE": "1"}
    warnings = environment_warnings(cfg, other)
    assert len(warnings) == 3
    assert not any("user-token" in w or "root-token" in w for w in warnings)


def test_config_metrics_carry_file_hash(tmp_path: Any) -> None:
    import hashlib

    from prometheus_client import generate_latest

    from dispatcher.metrics import install_standard_metrics, new_registry

    p = tmp_path / "config.yml"
    p.write_text("Clusters: {zzzzz: {}}\n")
    digest = hashlib.sha256(p.read_bytes()).hexdigest()
    registry = new_registry()
    install_standard_metrics(registry, service="Controller", config_path=p)
    text = generate_latest(registry).decode()
    assert f'arvados_config_source_timestamp_seconds{{sha256="{digest}"}}' in text
    assert f'arvados_config_load_timestamp_seconds{{sha256="{digest}"}}' in text
    assert "process_start_time_seconds" in text
