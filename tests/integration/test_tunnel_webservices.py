"""Container web services through the tunnel: vhost routing, token redirect, public/private
ports, websockets end to end."""

from __future__ import annotations

import base64
import http.client
import ssl
from collections.abc import Iterator

import pytest
from aiohttp import WSMsgType, web

from tests.helpers.tunnel import ADMIN_TOKEN, OTHER_TOKEN, USER_TOKEN, TunnelEnv, ctr_uuid
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
