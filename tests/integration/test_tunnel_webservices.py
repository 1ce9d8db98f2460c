"""Container web services through the tunnel: vhost routing, token redirect, public/private
ports, websockets end to end."""

from __future__ import annotations

import base64
import http.client
import shutil
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from aiohttp import WSMsgType, web

from tests.helpers.tunnel import (
    ADMIN_TOKEN,
    OTHER_TOKEN,
    TUNNEL_ROOT_TOKEN,
    USER_TOKEN,
    TunnelEnv,
    ctr_uuid,
)
from tunnel.broker import Broker, BrokerConfig
from tunnel.webservices import vhost_target


def test_vhost_target_matching() -> None:
    url = "https://*.containers.example.com"
    assert vhost_target(url, "zzzzz-dz642-000000000000001-8080.containers.example.com") == \
        "zzzzz-dz642-000000000000001-8080"
    assert vhost_target(url, "x.containers.example.com:443") == "x"
    assert vhost_target(url, "x.containers.example.com:8443") is None
    assert vhost_target(url, ".containers.example.com") is None
    assert vhost_target(url, "containers.example.com") is None
    assert vhost_target("https://containers.example.com", "x.containers.example.com") is None
    assert vhost_target("https://*.c.example:9000", "A.C.EXAMPLE:9000") == "a"
    # Port-range form: the configured host with a port inside [min, max].
    ranged = "https://ws.example.com"
    assert vhost_target(ranged, "WS.example.com:2000", 2000, 2001) == ":2000"
    assert vhost_target(ranged, "ws.example.com:2001", 2000, 2001) == ":2001"
    assert vhost_target(ranged, "ws.example.com:2002", 2000, 2001) is None
    assert vhost_target(ranged, "ws.example.com", 2000, 2001) is None
    assert vhost_target(ranged, "other.example.com:2000", 2000, 2001) is None
    assert vhost_target(ranged, "ws.example.com:2000") is None  # no range configured


@pytest.fixture
def web_env(tunnel_env: TunnelEnv) -> Iterator[tuple[TunnelEnv, str, int]]:
    """A running container with an HTTP + websocket service on a 'container' port."""
    uuid = ctr_uuid(51)

    async def start_service() -> tuple[web.AppRunner, int]:
        async def echo_http(request: web.Request) -> web.Response:
            body = await request.read()
            peer = request.transport.get_extra_info("peername") if request.transport else None
            return web.Response(text=(f"{request.method} {request.path_qs} host={request.host} "
                                      f"cookie={request.headers.get('Cookie', '')} "
                                      f"body={body.decode()} from={peer[1] if peer else 0}"))

        async def echo_ws(request: web.Request) -> web.WebSocketResponse:
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await ws.send_str("echo:" + msg.data)
            return ws

        async def chunked(request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse()
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for i in range(5):
                await resp.write(f"part{i};".encode() * 1000)
            await resp.write_eof()
            return resp

        app = web.Application()
        app.router.add_get("/ws", echo_ws)
        app.router.add_get("/chunked", chunked)
        app.router.add_route("*", "/{tail:.*}", echo_http)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    runner, port = tunnel_env.lt.run(start_service())
    tunnel_env.broker.config.web_services_url = (  # type: ignore[union-attr]
        f"https://*.containers.localhost:{tunnel_env.port}")
    tunnel_env.backend.add_container(uuid, published_ports={str(port): {"access": "private"}})
    tunnel_env.start_agent(uuid)
    tunnel_env.wait_registered(uuid)
    try:
        yield tunnel_env, uuid, port
    finally:
        tunnel_env.lt.run(runner.cleanup())


def request(env: TunnelEnv, host: str, method: str, path: str, headers: dict[str, str]
            | None = None, body: bytes | None = None) -> tuple[int, dict[str, list[str]], bytes]:
    ctx = ssl.create_default_context(cafile=env.certs.ca_file)
    c = http.client.HTTPSConnection("127.0.0.1", env.port, context=ctx, timeout=20)
    try:
        c.putrequest(method, path, skip_host=True)
        c.putheader("Host", host)
        for k, v in (headers or {}).items():
            c.putheader(k, v)
        if body is not None:
            c.putheader("Content-Length", str(len(body)))
        c.endheaders(body)
        r = c.getresponse()
        hdrs: dict[str, list[str]] = {}
        for k, v in r.getheaders():
            hdrs.setdefault(k.lower(), []).append(v)
        return r.status, hdrs, r.read()
    finally:
        c.close()


def cookie_for(token: str) -> str:
    return "arvados_api_token=" + base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")


def test_private_port_token_redirect_cookie_and_proxy(web_env: tuple[TunnelEnv, str, int]
                                                      ) -> None:
    env, uuid, port = web_env
    host = f"{uuid}-{port}.containers.localhost:{env.port}"
    status, _, _ = request(env, host, "GET", "/x")
    assert status == 401
    status, hdrs, _ = request(env, host, "GET",
                              f"/foo?baz&arvados_api_token={ADMIN_TOKEN}&waz=quux")
    assert status == 303
    assert hdrs["location"] == ["/foo?baz=&waz=quux"]
    set_cookie = hdrs["set-cookie"][0]
    assert set_cookie.startswith(cookie_for(ADMIN_TOKEN) + ";") and "HttpOnly" in set_cookie
    status, hdrs, body = request(env, host, "POST", "/foo?baz=&waz=quux",
                                 {"Cookie": cookie_for(ADMIN_TOKEN) + "; app=1"}, b"payload")
    assert status == 200, body
    text = body.decode()
    assert text.startswith("POST /foo?baz=&waz=quux ")
    assert f"host={host}" in text and "body=payload" in text
    assert "cookie=app=1" in text and "arvados_api_token" not in text  # token never leaks
    assert f"arvados_container_uuid={uuid}" in hdrs["set-cookie"]


def test_private_port_permissions(web_env: tuple[TunnelEnv, str, int]) -> None:
    env, uuid, port = web_env
    host = f"{uuid}-{port}.containers.localhost:{env.port}"
    bearer = {"Authorization": f"Bearer {USER_TOKEN}"}
    assert request(env, host, "GET", "/", bearer)[0] == 200  # the owner
    assert request(env, host, "GET", "/", {"Authorization": f"Bearer {OTHER_TOKEN}"})[0] == 403
    assert request(env, host, "GET", "/", {"Authorization": "Bearer v2/x/bogus12345678"})[0] \
        == 401
    env.backend.unreadable[OTHER_TOKEN] = {uuid}
    assert request(env, host, "GET", "/", {"Authorization": f"Bearer {OTHER_TOKEN}"})[0] == 404
    assert request(env, f"zzzzz-dz642-000000000000999-{port}.containers.localhost:{env.port}",
                   "GET", "/", bearer)[0] == 404


def test_public_port_needs_no_token_and_stale_cookie_is_cleared(
        web_env: tuple[TunnelEnv, str, int]) -> None:
    env, uuid, port = web_env
    env.backend.containers[uuid]["published_ports"] = {str(port): {"access": "public"}}
    host = f"{uuid}-{port}.containers.localhost:{env.port}"
    status, _, body = request(env, host, "GET", "/hello")
    assert status == 200 and body.startswith(b"GET /hello ")
    stale = {"Cookie": "arvados_container_uuid=zzzzz-dz642-000000000000777; app=1"}
    status, hdrs, _ = request(env, host, "GET", "/hello", stale)
    assert status == 303 and hdrs["clear-site-data"] == ['"cache", "storage"']
    assert any(c.startswith("app=;") for c in hdrs["set-cookie"])
    assert request(env, host, "POST", "/hello", stale, b"x")[0] == 410


def test_websocket_end_to_end(web_env: tuple[TunnelEnv, str, int]) -> None:
    from websockets.sync.client import connect

    env, uuid, port = web_env
    host = f"{uuid}-{port}.containers.localhost:{env.port}"
    ctx = ssl.create_default_context(cafile=env.certs.ca_file)
    import socket

    sock = socket.create_connection(("127.0.0.1", env.port), timeout=10)
    with connect(f"wss://{host}/ws", sock=sock, ssl=ctx, server_hostname="127.0.0.1",
                 compression=None, additional_headers={"Authorization":
                                                       f"Bearer {ADMIN_TOKEN}"},
                 open_timeout=10) as ws:
        for i in range(3):
            ws.send(f"hello {i}")
            assert ws.recv(timeout=10) == f"echo:hello {i}"


def test_keep_alive_several_requests_on_one_client_connection(
        web_env: tuple[TunnelEnv, str, int]) -> None:
    """Each request is its own stream (a new connection inside the container), while the
    client keeps one connection: plain, POST, HEAD, chunked and close-delimited answers."""
    import asyncio

    env, uuid, port = web_env

    async def raw_http10() -> tuple[asyncio.AbstractServer, int]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nno length here")
            await writer.drain()
            writer.close()  # the end of the body is the end of the connection

        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        return srv, srv.sockets[0].getsockname()[1]

    srv, port10 = env.lt.run(raw_http10())
    env.backend.containers[uuid]["published_ports"] = {str(port): {"access": "public"},
                                                       str(port10): {"access": "public"}}
    try:
        ctx = ssl.create_default_context(cafile=env.certs.ca_file)
        c = http.client.HTTPSConnection("127.0.0.1", env.port, context=ctx, timeout=20)
        host = f"{uuid}-{port}.containers.localhost:{env.port}"
        seen_from: set[str] = set()

        def call(method: str, path: str, body: bytes | None = None, h: str = host
                 ) -> tuple[int, bytes, http.client.HTTPResponse]:
            c.request(method, path, body=body, headers={"Host": h})
            r = c.getresponse()
            return r.status, r.read(), r

        status, body, _ = call("GET", "/one")
        assert status == 200 and body.startswith(b"GET /one ")
        sock = c.sock
        assert sock is not None
        seen_from.add(body.decode().rsplit("from=", 1)[1])
        status, body, _ = call("POST", "/two", b"payload")
        assert status == 200 and b"body=payload" in body
        seen_from.add(body.decode().rsplit("from=", 1)[1])
        status, body, r = call("HEAD", "/three")
        assert status == 200 and body == b""
        status, body, r = call("GET", "/chunked")
        assert status == 200 and body == b"".join(f"part{i};".encode() * 1000 for i in range(5))
        status, body, r = call("GET", "/", h=f"{uuid}-{port10}.containers.localhost:{env.port}")
        assert status == 200 and body == b"no length here"
        status, body, _ = call("GET", "/last")
        assert status == 200 and body.startswith(b"GET /last ")
        seen_from.add(body.decode().rsplit("from=", 1)[1])
        assert c.sock is sock  # one client connection for all six
        assert len(seen_from) == 3  # a new stream (connection in the container) per request
        c.close()
    finally:
        srv.close()


def test_port_range_form_routes_by_external_port(web_env: tuple[TunnelEnv, str, int]) -> None:
    """What nginx in front does: listen on the range and pass ``Host: host:port`` through."""
    env, uuid, port = web_env
    assert env.broker is not None
    cfg = env.broker.config
    cfg.web_services_url, cfg.web_port_min, cfg.web_port_max = "https://ws.localhost", 2000, 2001
    env.backend.containers[uuid]["published_ports"] = {
        str(port): {"access": "private", "label": "web", "initial_path": "",
                    "external_port": 2000}}
    bearer = {"Authorization": f"Bearer {USER_TOKEN}"}
    status, hdrs, body = request(env, "ws.localhost:2000", "GET", "/hi?x=1", bearer)
    assert status == 200, body
    assert body.startswith(b"GET /hi?x=1 host=ws.localhost:2000 ")
    assert f"arvados_container_uuid={uuid}" in hdrs["set-cookie"]
    scans = env.backend.port_scans
    assert request(env, "ws.localhost:2000", "GET", "/hi")[0] == 401  # private: token needed
    assert request(env, "ws.localhost:2000", "GET", "/hi",
                   {"Authorization": f"Bearer {OTHER_TOKEN}"})[0] == 403
    assert env.backend.port_scans == scans  # known assignments are checked, not rescanned
    status, _, body = request(env, "ws.localhost:2001", "GET", "/", bearer)
    assert status == 410 and b"unassigned port" in body
    # The container leaves Running and another one gets 2000: the cached assignment is
    # re-checked against the records, so nothing reaches the old container.
    env.backend.containers[uuid]["state"] = "Complete"
    env.backend.add_container(ctr_uuid(52), published_ports={
        "80": {"access": "public", "label": "w", "initial_path": "", "external_port": 2000}})
    status, _, body = request(env, "ws.localhost:2000", "GET", "/", bearer)
    assert status == 503 and b"tunnel is down" in body  # the new one has no tunnel here
    del env.backend.containers[ctr_uuid(52)]
    assert request(env, "ws.localhost:2000", "GET", "/", bearer)[0] == 410


def start_second_broker(env: TunnelEnv) -> tuple[web.AppRunner, int]:
    """C1: a broker on the same backend that does not hold the tunnel (env's broker is C2)."""
    assert env.broker is not None
    c2 = env.broker.config
    cfg = BrokerConfig(system_root_token=TUNNEL_ROOT_TOKEN, internal_url="",
                       ca_file=env.certs.ca_file, web_services_url=c2.web_services_url,
                       controller_internal_urls=list(c2.controller_internal_urls))

    async def start() -> tuple[web.AppRunner, int]:
        broker = Broker(cfg, env.backend)
        app = web.Application()
        broker.setup(app)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=env.certs.server_context())
        await site.start()
        return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    return env.lt.run(start())


def wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_forwarded_requests_keep_the_client_connection(web_env: tuple[TunnelEnv, str, int],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """C1 -> C2: several requests over one client connection to C1, each reaching C2 with the
    no-forward mark, over one pooled C1 -> C2 connection."""
    env, uuid, port = web_env
    assert env.broker is not None
    wait_for(lambda: env.backend.containers[uuid]["gateway_address"].startswith("tunnel "),
             "gateway_address")
    seen: list[tuple[str | None, int]] = []
    original = env.broker.webservices.middleware

    async def spy(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.host.endswith(f".containers.localhost:{env.port}"):
            peer = request.transport.get_extra_info("peername") if request.transport else None
            seen.append((request.headers.get("X-Arvados-No-Forward"), peer[1] if peer else 0))
        return await original(request, handler)

    monkeypatch.setattr(env.broker.webservices, "middleware", spy)
    runner, c1_port = start_second_broker(env)
    try:
        ctx = ssl.create_default_context(cafile=env.certs.ca_file)
        c = http.client.HTTPSConnection("127.0.0.1", c1_port, context=ctx, timeout=20)
        host = f"{uuid}-{port}.containers.localhost:{env.port}"
        auth = {"Host": host, "Cookie": cookie_for(USER_TOKEN) + "; app=1"}
        answers = []
        for method, path, body in [("GET", "/fwd/1?q=a%20b", None), ("POST", "/fwd/2", b"data"),
                                   ("HEAD", "/fwd/3", None), ("GET", "/chunked", None),
                                   ("GET", "/fwd/5", None)]:
            c.request(method, path, body=body, headers=auth)
            r = c.getresponse()
            answers.append((r.status, r.read(), r.getheader("Set-Cookie")))
            if len(answers) == 1:
                sock = c.sock
        assert c.sock is sock  # the client kept one connection to C1 for all five
        c.close()
        assert [a[0] for a in answers] == [200] * 5, answers
        assert answers[0][1].startswith(f"GET /fwd/1?q=a%20b host={host} cookie=app=1 ".encode())
        assert b"body=data" in answers[1][1] and answers[2][1] == b""
        assert answers[3][1] == b"".join(f"part{i};".encode() * 1000 for i in range(5))
        assert answers[4][2] == f"arvados_container_uuid={uuid}"
        assert [mark for mark, _ in seen] == ["1"] * 5  # C2 saw the mark on every request
        assert len({peer for _, peer in seen}) == 1  # ... over one pooled C1 -> C2 connection
        # A client cannot make C1 skip the forward (and C2 would never forward again anyway).
        status, _, _ = request_to(env, c1_port, host, {"X-Arvados-No-Forward": "1",
                                                       "Cookie": cookie_for(USER_TOKEN)})
        assert status == 503 and len(seen) == 5
    finally:
        env.lt.run(runner.cleanup())


def request_to(env: TunnelEnv, port: int, host: str, headers: dict[str, str]
               ) -> tuple[int, dict[str, str], bytes]:
    ctx = ssl.create_default_context(cafile=env.certs.ca_file)
    c = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=20)
    try:
        c.request("GET", "/fwd/x", headers={"Host": host, **headers})
        r = c.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        c.close()


def test_websocket_forwarded_to_the_controller_holding_the_tunnel(
        web_env: tuple[TunnelEnv, str, int]) -> None:
    """An upgrade through C1 is spliced to C2 (marked), then to the container."""
    import socket

    from websockets.sync.client import connect

    env, uuid, port = web_env
    wait_for(lambda: env.backend.containers[uuid]["gateway_address"].startswith("tunnel "),
             "gateway_address")
    runner, c1_port = start_second_broker(env)
    try:
        host = f"{uuid}-{port}.containers.localhost:{env.port}"
        ctx = ssl.create_default_context(cafile=env.certs.ca_file)
        sock = socket.create_connection(("127.0.0.1", c1_port), timeout=10)
        with connect(f"wss://{host}/ws", sock=sock, ssl=ctx, server_hostname="127.0.0.1",
                     compression=None, open_timeout=10,
                     additional_headers={"Authorization": f"Bearer {USER_TOKEN}"}) as ws:
            for i in range(3):
                ws.send(f"via c1 {i}")
                assert ws.recv(timeout=10) == f"echo:via c1 {i}"
    finally:
        env.lt.run(runner.cleanup())


def test_published_port_by_name(web_env: tuple[TunnelEnv, str, int]) -> None:
    """Reference _PublishedPortByName(_ProxyTunnel): a ``published_port`` link names the
    service; any method reaches the container with the original Host, here and via C1.
    ("Any" known to aiohttp's request parser: the reference's made-up ``METHOD`` is refused
    with 400 by the HTTP server before any routing.)"""
    env, uuid, port = web_env
    env.backend.containers[uuid]["published_ports"] = {str(port): {"access": "public"}}
    env.backend.add_link("warthogfacedbuffoon", uuid.replace("-dz642-", "-xvhdp-"), port)
    host = f"warthogfacedbuffoon.containers.localhost:{env.port}"
    for method in ("GET", "PURGE"):
        status, hdrs, body = request(env, host, method, "/path?q=1")
        assert status == 200, body
        assert body.startswith(f"{method} /path?q=1 host={host} ".encode())
        assert hdrs["set-cookie"] == [f"arvados_container_uuid={uuid}"]
    wait_for(lambda: env.backend.containers[uuid]["gateway_address"].startswith("tunnel "),
             "gateway_address")
    runner, c1_port = start_second_broker(env)
    try:
        ctx = ssl.create_default_context(cafile=env.certs.ca_file)
        c = http.client.HTTPSConnection("127.0.0.1", c1_port, context=ctx, timeout=20)
        c.request("PURGE", "/path", headers={"Host": host})
        r = c.getresponse()
        assert r.status == 200 and r.read().startswith(f"PURGE /path host={host} ".encode())
        c.close()
    finally:
        env.lt.run(runner.cleanup())


def test_published_port_name_not_found_or_bad_port(web_env: tuple[TunnelEnv, str, int]) -> None:
    env, uuid, port = web_env
    env.backend.containers[uuid]["published_ports"] = {str(port): {"access": "public"}}
    cr = uuid.replace("-dz642-", "-xvhdp-")

    def get(name: str) -> tuple[int, bytes]:
        status, _, body = request(env, f"{name}.containers.localhost:{env.port}", "GET", "/")
        return status, body

    status, body = get("nosuchname")
    assert status == 404 and b"container web service not found" in body
    env.backend.add_link("notaport", cr, port, link_class="tag")  # another class: not a service
    assert get("notaport")[0] == 404
    for i, bad in enumerate([0, 65536, -1, str(port), True, None, 80.5, [port]]):
        env.backend.add_link(f"bad{i}", cr, bad)
        status, body = get(f"bad{i}")
        assert status == 500 and b"invalid port" in body, (bad, body)
    env.backend.add_link("float", cr, float(port))  # JSON numbers may come back as floats
    assert get("float")[0] == 200
    env.backend.add_link("nohead", "zzzzz-xvhdp-000000000000999", port)
    assert get("nohead")[0] == 404


def test_published_port_name_private_needs_token(web_env: tuple[TunnelEnv, str, int]) -> None:
    env, uuid, port = web_env  # the port is private
    env.backend.add_link("private-svc", uuid.replace("-dz642-", "-xvhdp-"), port)
    host = f"private-svc.containers.localhost:{env.port}"
    assert request(env, host, "GET", "/")[0] == 401
    assert request(env, host, "GET", "/", {"Authorization": f"Bearer {OTHER_TOKEN}"})[0] == 403
    status, _, body = request(env, host, "GET", "/", {"Authorization": f"Bearer {USER_TOKEN}"})
    assert status == 200 and body.startswith(f"GET / host={host} ".encode())


# --- with curl, as the reference's tests do (8.1 _Curl_*) -------------------------------------


def curl(env: TunnelEnv, host: str, *args: str) -> tuple[int, str]:
    """curl (verifying the dev CA) on ``https://<host>...`` reached on 127.0.0.1; (HTTP status
    of the last response, body)."""
    name = host.rsplit(":", 1)[0]
    res = subprocess.run(
        ["curl", "-sS", "--max-time", "20", "--cacert", env.certs.ca_file,
         "--resolve", f"{name}:{env.port}:127.0.0.1", "-w", "\n%{http_code}", *args],
        capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 0, res.stderr
    body, _, code = res.stdout.rpartition("\n")
    return int(code), body


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_query_token_redirect_cookie_jar_and_methods(web_env: tuple[TunnelEnv, str, int],
                                                           tmp_path: Any) -> None:
    env, uuid, port = web_env
    host = f"{uuid}-{port}.containers.localhost:{env.port}"
    jar = str(tmp_path / "jar")
    # Token in the query: curl follows the redirect with the cookie it was given; the
    # query (repeated and empty parameters too) arrives upstream without the token.
    status, body = curl(env, host, "-L", "-c", jar, "-b", jar,
                        f"https://{host}/foobar?baz&baz&arvados_api_token={USER_TOKEN}&waz=quux")
    assert status == 200, body
    assert body.startswith("GET /foobar?baz=&baz=&waz=quux ") and f"host={host}" in body
    assert USER_TOKEN not in body
    assert "#HttpOnly_" in (tmp_path / "jar").read_text()  # the token cookie is HttpOnly
    # Cookie authentication, other methods, a body.
    status, body = curl(env, host, "-b", jar, "-X", "PATCH", "--data-binary", "patched",
                        f"https://{host}/p")
    assert status == 200 and body.startswith("PATCH /p ") and "body=patched" in body, body
    status, body = curl(env, host, "-b", jar, "-X", "POST", "--data-binary", "posted",
                        f"https://{host}/q?x=1")
    assert status == 200 and body.startswith("POST /q?x=1 ") and "body=posted" in body, body
    # No token, private port: refused.
    assert curl(env, host, f"https://{host}/")[0] == 401


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_public_port_and_reused_port(web_env: tuple[TunnelEnv, str, int],
                                          tmp_path: Any) -> None:
    env, uuid, port = web_env
    env.backend.containers[uuid]["published_ports"] = {str(port): {"access": "public"}}
    host = f"{uuid}-{port}.containers.localhost:{env.port}"
    status, body = curl(env, host, f"https://{host}/anon")
    assert status == 200 and body.startswith("GET /anon "), body
    status, body = curl(env, host, "-X", "OPTIONS", f"https://{host}/anon")
    assert status == 200 and body.startswith("OPTIONS /anon "), body
    # A cookie from another container that used this port before: a POST is refused with
    # 410 and an empty body, never redirected (its body could not follow).
    stale = "arvados_container_uuid=zzzzz-dz642-000000000000777"
    status, body = curl(env, host, "-L", "-b", stale, "-X", "POST", "--data-binary", "x",
                        f"https://{host}/anon")
    assert (status, body) == (410, "")
    # A GET with that cookie in a cookie jar: exactly one redirect, which expires the stale
    # cookie in the jar, then the service.
    jar = tmp_path / "jar"
    name = host.rsplit(":", 1)[0]
    jar.write_text(f"{name}\tFALSE\t/\tTRUE\t0\t{stale.replace('=', chr(9))}\n")
    status, body = curl(env, host, "-L", "--max-redirs", "1", "-b", str(jar), "-c", str(jar),
                        f"https://{host}/anon")
    assert status == 200 and body.startswith("GET /anon "), body
    assert "zzzzz-dz642-000000000000777" not in jar.read_text()
