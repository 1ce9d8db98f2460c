"""Container logs as WebDAV (reference section 6) through a real tunnel: an in-process broker on
the fake backend, an agent whose gateway serves a log directory, HTTP requests from a client.

The two-controller path with a real crunch-run is in ``test_container_logs_e2e.py``.
"""

from __future__ import annotations

import base64
import logging
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.helpers.tunnel import (
    ADMIN_TOKEN,
    OTHER_TOKEN,
    TUNNEL_ROOT_TOKEN,
    USER_TOKEN,
    TunnelEnv,
    ctr_uuid,
)
from tunnel.protocol import gateway_auth_secret

HELLO = b"hello world\n"


@dataclass
class Reply:
    status: int
    headers: Any
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()


@dataclass
class LogEnv:
    env: TunnelEnv
    uuid: str
    cr: str
    log_dir: Path

    @property
    def base(self) -> str:
        return f"/arvados/v1/container_requests/{self.cr}/log"

    def request(self, method: str, path: str, *, token: str | None = USER_TOKEN,
                headers: dict[str, str] | None = None, body: bytes = b"") -> Reply:
        hdrs = dict(headers or {})
        if token is not None and "Authorization" not in hdrs:
            hdrs["Authorization"] = f"Bearer {token}"
        url = self.env.url + path

        async def go() -> Reply:
            sslctx = ssl.create_default_context(cafile=self.env.certs.ca_file)
            async with aiohttp.ClientSession() as s, s.request(
                    method, aiohttp.client.URL(url, encoded=True), headers=hdrs,
                    data=body or None, ssl=sslctx, allow_redirects=False) as r:
                return Reply(r.status, r.headers, await r.read())

        return self.env.lt.run(go(), timeout=30)


@pytest.fixture
def logs_env(tunnel_env: TunnelEnv, tmp_path: Path) -> Iterator[LogEnv]:
    uuid = ctr_uuid(61)
    log_dir = tmp_path / "logs"
    (log_dir / "a" / "b" / "c").mkdir(parents=True)
    (log_dir / "stderr.txt").write_bytes(HELLO)
    (log_dir / "crunch-run.txt").write_bytes(b"2026-01-01T00:00:00.000Z started\n")
    (log_dir / "a" / "b" / "c" / "d.html").write_bytes(b"<p>hi</p>\n")
    tunnel_env.backend.add_container(uuid, state="Running")
    tunnel_env.start_agent(uuid, log_dir=str(log_dir))
    tunnel_env.wait_registered(uuid)
    le = LogEnv(tunnel_env, uuid, uuid.replace("dz642", "xvhdp"), log_dir)
    # The broker records gateway_address after the 101; wait for it (the route needs it).
    wait_for(lambda: tunnel_env.backend.containers[uuid].get("gateway_address"))
    yield le


def wait_for(cond: Any, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_live_get_range_options_propfind(logs_env: LogEnv) -> None:
    le, ctr = logs_env, logs_env.uuid
    r = le.request("GET", f"{le.base}/{ctr}/stderr.txt")
    assert (r.status, r.body) == (200, HELLO)
    assert r.headers["Content-Type"] == "text/plain; charset=utf-8"
    r = le.request("GET", f"{le.base}/{ctr}/stderr.txt", headers={"Range": "bytes=-6"})
    assert (r.status, r.body, r.headers["Content-Range"]) == (206, b"world\n", "bytes 6-11/12")
    r = le.request("GET", f"{le.base}/{ctr}/stderr.txt", headers={"Range": "bytes=2-4"})
    assert (r.status, r.body, r.headers["Content-Range"]) == (206, b"llo", "bytes 2-4/12")
    # arvados-client logs learns the size with bytes=-0, then polls from its mark.
    r = le.request("GET", f"{le.base}/{ctr}/stderr.txt", headers={"Range": "bytes=-0"})
    assert (r.status, r.body, r.headers["Content-Range"]) == (206, b"", "bytes 12-11/12")
    r = le.request("GET", f"{le.base}/{ctr}/stderr.txt", headers={"Range": "bytes=12-"})
    assert (r.status, r.headers["Content-Range"]) == (416, "bytes */12")
    # The file grows while the container runs: the next poll sees the new bytes.
    with open(le.log_dir / "stderr.txt", "ab") as f:
        f.write(b"more\n")
    r = le.request("GET", f"{le.base}/{ctr}/stderr.txt", headers={"Range": "bytes=12-"})
    assert (r.status, r.body, r.headers["Content-Range"]) == (206, b"more\n", "bytes 12-16/17")
    r = le.request("HEAD", f"{le.base}/{ctr}/stderr.txt")
    assert (r.status, r.body, r.headers["Content-Length"]) == (200, b"", "17")
    r = le.request("GET", f"{le.base}/{ctr}/a/b/c/d.html")
    assert (r.status, r.headers["Content-Type"]) == (200, "text/html; charset=utf-8")

    r = le.request("OPTIONS", f"{le.base}/{ctr}/")
    assert r.status == 200 and r.headers["Dav"] == "1, 2"
    assert {"GET", "PROPFIND", "OPTIONS"} <= {m.strip() for m in r.headers["Allow"].split(",")}

    for path in (f"{le.base}/{ctr}/", f"{le.base}/{ctr}"):
        r = le.request("PROPFIND", path, headers={"Depth": "1"})
        assert r.status == 207, r.text
        assert f"<D:href>{le.base}/{ctr}/stderr.txt</D:href>" in r.text
        assert "<D:getcontentlength>17</D:getcontentlength>" in r.text
        assert f"<D:href>{le.base}/{ctr}/a/</D:href>" in r.text
    r = le.request("PROPFIND", f"{le.base}/{ctr}/a/b/c/", headers={"Depth": "1"},
                   body=b'<?xml version="1.0"?><propfind xmlns="DAV:"><allprop/></propfind>')
    assert r.status == 207 and "d.html" in r.text
    r = le.request("PROPFIND", f"{le.base}/{ctr}/stderr.txt", headers={"Depth": "0"})
    assert r.status == 207 and r.text.count("<D:response>") == 1

    r = le.request("GET", f"{le.base}/{ctr}/nothere.txt")
    assert r.status == 404


def test_methods_other_than_read_are_refused(logs_env: LogEnv) -> None:
    le, ctr = logs_env, logs_env.uuid
    for method in ("PUT", "DELETE", "POST", "MKCOL"):
        r = le.request(method, f"{le.base}/{ctr}/stderr.txt", body=b"x")
        assert r.status == 405, (method, r.status)
    assert (le.log_dir / "stderr.txt").read_bytes() == HELLO


def test_path_traversal_is_refused(logs_env: LogEnv, tmp_path: Path) -> None:
    le, ctr = logs_env, logs_env.uuid
    (tmp_path / "secret.txt").write_text("top secret\n")
    (le.log_dir / "link.txt").symlink_to(tmp_path / "secret.txt")
    (le.log_dir / "linkdir").symlink_to(tmp_path)
    for path in (f"{ctr}/%2e%2e/secret.txt", f"{ctr}/a/%2e%2e/%2e%2e/secret.txt",
                 f"{ctr}/..%2fsecret.txt", f"{ctr}/link.txt", f"{ctr}/linkdir/secret.txt",
                 f"{ctr}/%00"):
        r = le.request("GET", f"{le.base}/{path}")
        assert r.status in (400, 404), (path, r.status)
        assert b"top secret" not in r.body
    r = le.request("PROPFIND", f"{le.base}/{ctr}/", headers={"Depth": "infinity"})
    assert r.status == 207 and "link" not in r.text and "secret" not in r.text


def test_auth_401_404_and_cors(logs_env: LogEnv) -> None:
    le, ctr = logs_env, logs_env.uuid
    r = le.request("GET", f"{le.base}/{ctr}/stderr.txt", token=None)
    assert r.status == 401 and r.headers["Www-Authenticate"] == 'Basic realm="collections"'
    r = le.request("GET", f"{le.base}/{ctr}/stderr.txt", token="v2/zzzzz-gj3su-bad/bad")
    assert r.status == 401 and r.headers["Www-Authenticate"] == 'Basic realm="collections"'
    # WebDAV clients send the token as the Basic password after that challenge.
    basic = base64.b64encode(f"user:{USER_TOKEN}".encode()).decode()
    r = le.request("GET", f"{le.base}/{ctr}/stderr.txt", token=None,
                   headers={"Authorization": f"Basic {basic}"})
    assert (r.status, r.body) == (200, HELLO)
    # A container request the caller cannot read, and one that does not exist.
    le.env.backend.unreadable[OTHER_TOKEN] = {ctr}
    r = le.request("GET", f"{le.base}/{ctr}/stderr.txt", token=OTHER_TOKEN)
    assert r.status == 404
    r = le.request("GET", f"/arvados/v1/container_requests/{ctr_uuid(99).replace('dz642', 'xvhdp')}"
                          "/log/", token=ADMIN_TOKEN)
    assert r.status == 404
    # No such route for containers (reference 2.6).
    r = le.request("GET", f"/arvados/v1/containers/{ctr}/log/{ctr}/stderr.txt")
    assert r.status in (404, 405)
    # CORS preflight: no token needed.
    r = le.request("OPTIONS", f"{le.base}/{ctr}/stderr.txt", token=None,
                   headers={"Access-Control-Request-Method": "GET", "Origin": "https://wb"})
    assert r.status == 200
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    assert r.headers["Access-Control-Max-Age"] == "86400"
    assert "PROPFIND" in r.headers["Access-Control-Allow-Methods"]
    assert "Range" in r.headers["Access-Control-Allow-Headers"]


def test_saved_logs_when_not_live_and_after_the_end(logs_env: LogEnv) -> None:
    le, ctr = logs_env, logs_env.uuid
    backend = le.env.backend
    backend.add_log(ctr, "stderr", "hello ")
    backend.add_log(ctr, "stdout", "out\n")
    backend.add_log(ctr, "stderr", "world\n")
    # Running: the top level does not show the unfinished container.
    r = le.request("PROPFIND", f"{le.base}/", headers={"Depth": "1"})
    assert r.status == 207 and "stderr.txt" not in r.text and ctr not in r.text
    # Finished: the saved records are the files, at the top and under the container.
    backend.containers[ctr]["state"] = "Complete"
    for path in (f"{le.base}/stderr.txt", f"{le.base}/{ctr}/stderr.txt"):
        r = le.request("GET", path)
        assert (r.status, r.body) == (200, HELLO), path
        assert r.headers["Content-Type"] == "text/plain; charset=utf-8"
    r = le.request("GET", f"{le.base}/{ctr}/stderr.txt", headers={"Range": "bytes=-6"})
    assert (r.status, r.body, r.headers["Content-Range"]) == (206, b"world\n", "bytes 6-11/12")
    r = le.request("PROPFIND", f"{le.base}/{ctr}", headers={"Depth": "1"})
    assert r.status == 207 and "stderr.txt" in r.text and "stdout.txt" in r.text
    r = le.request("PROPFIND", f"{le.base}", headers={"Depth": "1"})
    assert r.status == 207 and f"{le.base}/{ctr}/" in r.text
    r = le.request("OPTIONS", f"{le.base}")
    assert r.status == 200 and r.headers["Dav"] == "1, 2"
    # No records: an empty directory.
    backend.logs.clear()
    r = le.request("PROPFIND", f"{le.base}/", headers={"Depth": "1"})
    assert r.status == 207 and r.text.count("<D:response>") == 1


def test_earlier_attempt_is_served_from_saved_logs(logs_env: LogEnv) -> None:
    le, first = logs_env, logs_env.uuid
    backend = le.env.backend
    backend.add_log(first, "stderr", "attempt one\n")
    backend.containers[first]["state"] = "Cancelled"
    # The request was retried: its container is now another one.
    second = ctr_uuid(63)
    backend.add_container(second, state="Queued")
    backend.requests[second] = [{**backend.requests.pop(first)[0], "container_uuid": second}]
    r = le.request("GET", f"{le.base}/{first}/stderr.txt")
    assert (r.status, r.body) == (200, b"attempt one\n")
    r = le.request("PROPFIND", f"{le.base}/", headers={"Depth": "1"})
    assert r.status == 207 and "stderr.txt" not in r.text  # Queued: nothing at the top
    backend.unreadable[USER_TOKEN] = {first}
    r = le.request("GET", f"{le.base}/{first}/stderr.txt")
    assert r.status == 404


def test_gateway_unreachable(logs_env: LogEnv) -> None:
    le, ctr = logs_env, logs_env.uuid
    backend = le.env.backend

    async def drop_tunnel() -> None:
        for a in le.env.agents:
            await a.aclose()

    le.env.lt.run(drop_tunnel())
    assert le.env.broker is not None
    wait_for(lambda: ctr not in le.env.broker.tunnels)  # type: ignore[union-attr]
    # Still Running: 503 proxy error (the logs table is not the live log).
    r = le.request("GET", f"{le.base}/{ctr}/stderr.txt")
    assert r.status == 503 and "proxy error" in r.text
    # The container has just finished: the saved logs.
    backend.add_log(ctr, "stderr", "saved\n")
    backend.containers[ctr]["state"] = "Cancelled"
    r = le.request("GET", f"{le.base}/{ctr}/stderr.txt")
    assert (r.status, r.body) == (200, b"saved\n")


def test_c1_forwards_to_the_broker_holding_the_tunnel(logs_env: LogEnv,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """A second broker (C1) on the same backend forwards once to the first (C2)."""
    from aiohttp import web

    from tunnel.broker import Broker, BrokerConfig

    le, ctr = logs_env, logs_env.uuid
    c2 = le.env.broker
    assert c2 is not None

    async def start_c1() -> tuple[web.AppRunner, int]:
        cfg = BrokerConfig(system_root_token=TUNNEL_ROOT_TOKEN, internal_url="",
                           controller_internal_urls=[c2.internal_url],
                           ca_file=le.env.certs.ca_file)
        broker = Broker(cfg, le.env.backend)
        app = web.Application()
        broker.setup(app)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=le.env.certs.server_context())
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        broker.internal_url = f"https://127.0.0.1:{port}/"
        return runner, port

    caplog.set_level(logging.DEBUG)
    runner, port = le.env.lt.run(start_c1())
    try:
        c1 = LogEnv(le.env, ctr, le.cr, le.log_dir)

        def via_c1(method: str, path: str, **kw: Any) -> Reply:
            saved = le.env.port
            le.env.port = port
            try:
                return c1.request(method, path, **kw)
            finally:
                le.env.port = saved

        r = via_c1("GET", f"{le.base}/{ctr}/stderr.txt")
        assert (r.status, r.body) == (200, HELLO)
        r = via_c1("GET", f"{le.base}/{ctr}/stderr.txt", headers={"Range": "bytes=-6"})
        assert (r.status, r.body) == (206, b"world\n")
        r = via_c1("PROPFIND", f"{le.base}/{ctr}/", headers={"Depth": "1"})
        assert r.status == 207 and "stderr.txt" in r.text
        assert "live log request forwarded" in caplog.text
        # The receiving side must not forward again: a marked request on C1 is not forwarded.
        r = via_c1("GET", f"{le.base}/{ctr}/stderr.txt?no_forward=true")
        assert r.status == 503 and "tunnel is down" in r.text
        # C2 not listed in InternalURLs: refused with the reference's words.
        c2_url = c2.internal_url
        le.env.backend.containers[ctr]["gateway_address"] = "tunnel https://127.0.0.1:1/"
        r = via_c1("GET", f"{le.base}/{ctr}/stderr.txt")
        assert r.status == 503 and "tunnel endpoint is invalid" in r.text
        le.env.backend.containers[ctr]["gateway_address"] = f"tunnel {c2_url}"
    finally:
        le.env.lt.run(runner.cleanup())
    for secret in (USER_TOKEN.rsplit("/", 1)[-1], TUNNEL_ROOT_TOKEN,
                   gateway_auth_secret(TUNNEL_ROOT_TOKEN, ctr)):
        assert secret not in caplog.text


def test_no_live_log_directory_is_404(tunnel_env: TunnelEnv) -> None:
    uuid = ctr_uuid(62)
    tunnel_env.backend.add_container(uuid, state="Running")
    tunnel_env.start_agent(uuid)  # a gateway without local logs
    tunnel_env.wait_registered(uuid)
    wait_for(lambda: tunnel_env.backend.containers[uuid].get("gateway_address"))
    le = LogEnv(tunnel_env, uuid, uuid.replace("dz642", "xvhdp"), Path("/nonexistent"))
    r = le.request("GET", f"{le.base}/{uuid}/stderr.txt")
    assert r.status == 404 and "no live log filesystem" in r.text


def test_gateway_sees_no_token_or_cookie(logs_env: LogEnv, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    import tunnel.webdav as webdav

    seen: list[dict[str, str]] = []
    real_serve = webdav.serve

    async def spy(request: Any, fs: Any, prefix: str, extra: Any = None) -> Any:
        seen.append(dict(request.headers))
        return await real_serve(request, fs, prefix, extra)

    monkeypatch.setattr(webdav, "serve", spy)  # crunch-run's side only (see containerlogs)
    le, ctr = logs_env, logs_env.uuid
    r = le.request("GET", f"{le.base}/{ctr}/stderr.txt?api_token=x",
                   headers={"Cookie": "arvados_api_token=abc", "Range": "bytes=0-4"})
    assert (r.status, r.body) == (206, b"hello")
    assert len(seen) == 1
    names = {k.lower() for k in seen[0]}
    assert not names & {"authorization", "cookie"}
    assert seen[0]["X-Webdav-Prefix"] == f"{le.base}/{ctr}"
    assert seen[0]["X-Webdav-Source"] == "/log" and seen[0]["Range"] == "bytes=0-4"
