"""Container shell through the tunnel with the real OpenSSH client (``connect-ssh`` as ProxyCommand).

The broker runs in-process on a fake API backend (tests/helpers/tunnel.py); the agent and the
gateway run the commands on this host (like the ``local`` runtime).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.server
import os
import shlex
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest

from tests.helpers.tunnel import ADMIN_TOKEN, TunnelEnv, ctr_uuid
from tunnel.client.common import ApiTarget, open_upgraded
from tunnel.client.shell import run_command, ssh_argv

pytestmark = pytest.mark.skipif(not os.path.exists("/usr/bin/ssh"), reason="needs OpenSSH")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def running(tunnel_env: TunnelEnv) -> str:
    uuid = ctr_uuid(7)
    tunnel_env.start_agent(uuid)
    tunnel_env.wait_registered(uuid)
    return uuid


@pytest.fixture
def http_server() -> Iterator[int]:
    """An HTTP server on 127.0.0.1 (the 'container' port) answering 'bar baz'."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = b"bar baz\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


def ssh(env: TunnelEnv, uuid: str, args: list[str], *, token: str = ADMIN_TOKEN,
        timeout: float = 30, stdin: bytes | None = None, extra_env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[bytes]:
    e = env.client_env(token)
    e.update(extra_env or {})
    return subprocess.run(ssh_argv(f"root@{uuid}", args), env=e, capture_output=True,
                          timeout=timeout, input=stdin)


def test_command_runs_in_the_container_environment(tunnel_env: TunnelEnv, running: str) -> None:
    res = ssh(tunnel_env, running, ["printenv", "CONTAINER_MARKER"])
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"{running}\n".encode()
    assert (running, {"interactive_session_started": True}) in tunnel_env.backend.updates


def test_command_exits_although_stdin_stays_open(tunnel_env: TunnelEnv, running: str) -> None:
    proc = subprocess.Popen(ssh_argv(f"root@{running}", ["echo", "ok"]),
                            env=tunnel_env.client_env(), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.wait(timeout=20) == 0
        assert proc.stdout is not None and proc.stdout.read() == b"ok\n"
    finally:
        if proc.poll() is None:
            proc.kill()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f is not None:
                f.close()


def test_exit_status_stderr_and_stdin_are_carried(tunnel_env: TunnelEnv, running: str) -> None:
    res = ssh(tunnel_env, running, ["sh", "-c", "'cat; echo oops >&2; exit 3'"],
              stdin=b"piped input\n")
    assert res.returncode == 3
    assert res.stdout == b"piped input\n"
    assert b"oops" in res.stderr


def test_env_request_reaches_the_command(tunnel_env: TunnelEnv, running: str) -> None:
    res = ssh(tunnel_env, running, ["-o", "SendEnv=CG_TEST_VAR", "printenv", "CG_TEST_VAR"],
              extra_env={"CG_TEST_VAR": "from-client"})
    assert res.returncode == 0, res.stderr
    assert res.stdout == b"from-client\n"


def test_interactive_pty_session(tunnel_env: TunnelEnv, running: str) -> None:
    script = b"tty >/dev/null && echo has-tty; echo marker-$((6*7)); exit 5\n"
    res = ssh(tunnel_env, running, ["-tt"], stdin=script)
    out = res.stdout.replace(b"\r\n", b"\n")
    assert b"has-tty" in out and b"marker-42" in out
    assert res.returncode == 5


def test_pty_window_size_and_window_change(tunnel_env: TunnelEnv, running: str) -> None:
    import asyncssh

    api = ApiTarget(tunnel_env.host, ADMIN_TOKEN, ca_file=tunnel_env.certs.ca_file)

    class _Tunnel:
        async def create_connection(self, factory: object, host: str, port: int) -> object:
            return await open_upgraded(api, running, factory)

        def close(self) -> None:
            pass

        async def wait_closed(self) -> None:
            pass

    script = "trap 'stty size; exit 0' WINCH; stty size; echo ready; while :; do sleep 0.05; done"

    async def go() -> bytes:
        async with asyncssh.connect("c", tunnel=_Tunnel(), username="root", known_hosts=None,
                                    client_keys=None, agent_path=None) as conn:
            proc = await conn.create_process(f"sh -c {shlex.quote(script)}", term_type="xterm",
                                             term_size=(100, 30), encoding=None)
            out = await asyncio.wait_for(proc.stdout.readuntil(b"ready"), 10)
            proc.change_terminal_size(132, 43)
            out += await asyncio.wait_for(proc.stdout.read(), 10)
            await proc.wait_closed()
            return bytes(out)

    out = tunnel_env.lt.run(go(), timeout=30)
    assert b"30 100" in out
    assert b"43 132" in out


def test_local_forward_reaches_container_port(tunnel_env: TunnelEnv, running: str,
                                              http_server: int) -> None:
    lport = free_port()
    proc = subprocess.Popen(
        ssh_argv(f"root@{running}", ["-N", "-o", "ExitOnForwardFailure=yes",
                                     "-L", f"127.0.0.1:{lport}:localhost:{http_server}"]),
        env=tunnel_env.client_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", lport), timeout=1):
                    break
            except OSError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
                assert time.monotonic() < deadline, "forward did not come up"
                time.sleep(0.05)

        def get(_: int) -> bytes:
            with urllib.request.urlopen(f"http://127.0.0.1:{lport}/", timeout=10) as r:
                return bytes(r.read())

        with concurrent.futures.ThreadPoolExecutor(10) as ex:
            bodies = list(ex.map(get, range(10)))
        assert bodies == [b"bar baz\n"] * 10
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:  # seen once on a loaded box, after the test passed
            proc.kill()
            proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()


def test_forward_to_other_hosts_is_refused(tunnel_env: TunnelEnv, running: str,
                                           http_server: int) -> None:
    import asyncssh

    api = ApiTarget(tunnel_env.host, ADMIN_TOKEN, ca_file=tunnel_env.certs.ca_file)

    class _Tunnel:
        async def create_connection(self, factory: object, host: str, port: int) -> object:
            return await open_upgraded(api, running, factory)

        def close(self) -> None:
            pass

        async def wait_closed(self) -> None:
            pass

    async def go() -> tuple[str, bytes]:
        async with asyncssh.connect("c", tunnel=_Tunnel(), username="x", known_hosts=None,
                                    client_keys=None, agent_path=None) as conn:
            try:
                await conn.open_connection("example.com", http_server)
                refused = "no"
            except asyncssh.ChannelOpenError as exc:
                refused = exc.reason
            r, w = await conn.open_connection("localhost", http_server)
            w.write(b"GET / HTTP/1.0\r\n\r\n")
            body = await asyncio.wait_for(r.read(), 10)
            return refused, body

    refused, body = tunnel_env.lt.run(go(), timeout=30)
    assert "only localhost ports" in refused
    assert body.endswith(b"bar baz\n")


def test_run_command_demo_hook(tunnel_env: TunnelEnv, running: str) -> None:
    code, out = run_command(tunnel_env.host, ADMIN_TOKEN, running,
                            ["sh", "-c", "echo hello from $CONTAINER_MARKER; exit 4"],
                            ca_file=tunnel_env.certs.ca_file)
    assert code == 4
    assert out == f"hello from {running}\n"
