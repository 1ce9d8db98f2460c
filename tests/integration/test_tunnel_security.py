"""Refusals: every way a shell or a tunnel registration must fail, and the broker stays healthy.

Clients are the real ``crunchgate connect-ssh`` (for the user-facing messages) and raw TLS
sockets (for forged registrations, garbage and floods).
"""

from __future__ import annotations

import logging
import socket
import ssl
import subprocess
import sys
import time

import pytest

from tests.helpers.tunnel import (
    ADMIN_TOKEN,
    OTHER_TOKEN,
    OTHER_UUID,
    TUNNEL_ROOT_TOKEN,
    USER_TOKEN,
    TunnelEnv,
    ctr_uuid,
)
from tunnel.protocol import build_tunnel_request, build_upgrade_request, gateway_auth_secret


def probe(env: TunnelEnv, uuid: str, token: str | None = ADMIN_TOKEN
          ) -> subprocess.CompletedProcess[str]:
    e = env.client_env(token or "")
    if token is None:
        e.pop("ARVADOS_API_TOKEN", None)
    return subprocess.run([sys.executable, "-m", "dispatcher.cli", "connect-ssh", "--probe-only",
                           uuid], env=e, capture_output=True, text=True, timeout=30)


def raw_conn(env: TunnelEnv) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=env.certs.ca_file)
    sock = socket.create_connection(("127.0.0.1", env.port), timeout=10)
    return ctx.wrap_socket(sock, server_hostname="127.0.0.1")


def read_head(s: ssl.SSLSocket) -> bytes:
    """The response head, plus its body unless it is a 101 (then the rest is the new protocol)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            return buf
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    if head.startswith(b"HTTP/1.1 101"):
        return buf
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = s.recv(4096)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def shell_request(env: TunnelEnv, uuid: str, token: str = ADMIN_TOKEN) -> bytes:
    return build_upgrade_request(env.host, f"/arvados/v1/connect/{uuid}/ssh", "ssh", token,
                                 {"login_username": "root"})


@pytest.fixture
def running(tunnel_env: TunnelEnv) -> str:
    uuid = ctr_uuid(11)
    tunnel_env.start_agent(uuid)
    tunnel_env.wait_registered(uuid)
    return uuid


# --- who may open a shell ---------------------------------------------------------------------


def test_missing_token_is_a_clear_local_error(tunnel_env: TunnelEnv, running: str) -> None:
    res = probe(tunnel_env, running, token=None)
    assert res.returncode == 2
    assert "ARVADOS_API_TOKEN" in res.stderr


def test_wrong_token_is_refused(tunnel_env: TunnelEnv, running: str) -> None:
    res = probe(tunnel_env, running, token="v2/zzzzz-gj3su-xxxxxxxxxxxxxxx/notatoken0123456789")
    assert res.returncode == 1
    assert "error setting up tunnel: invalid or expired token" in res.stderr
    assert "check ARVADOS_API_TOKEN" in res.stderr


def test_unreadable_container_is_not_found(tunnel_env: TunnelEnv, running: str) -> None:
    tunnel_env.backend.unreadable[USER_TOKEN] = {running}
    tunnel_env.broker.config.shell_user = True  # type: ignore[union-attr]
    res = probe(tunnel_env, running, token=USER_TOKEN)
    assert res.returncode == 1 and "not found" in res.stderr


def test_shell_access_matrix(tunnel_env: TunnelEnv, running: str) -> None:
    cfg = tunnel_env.broker.config  # type: ignore[union-attr]
    # Defaults: Admin true, User false. The container belongs to USER.
    assert probe(tunnel_env, running, ADMIN_TOKEN).returncode == 0
    res = probe(tunnel_env, running, USER_TOKEN)
    assert res.returncode == 1 and "shell access is disabled in config" in res.stderr
    cfg.shell_user = True
    assert probe(tunnel_env, running, USER_TOKEN).returncode == 0
    res = probe(tunnel_env, running, OTHER_TOKEN)
    assert res.returncode == 1 and "submitted by other users" in res.stderr
    # Admin with Admin=false is treated as a user (and is not the owner).
    cfg.shell_admin = False
    res = probe(tunnel_env, running, ADMIN_TOKEN)
    assert res.returncode == 1 and "submitted by other users" in res.stderr
    cfg.shell_user = False
    res = probe(tunnel_env, running, ADMIN_TOKEN)
    assert res.returncode == 1 and "shell access is disabled in config" in res.stderr


def test_container_with_requests_by_two_users_refuses_both_non_admins(
        tunnel_env: TunnelEnv, running: str) -> None:
    tunnel_env.broker.config.shell_user = True  # type: ignore[union-attr]
    tunnel_env.backend.requests[running].append(
        {"uuid": "zzzzz-xvhdp-000000000000099", "modified_by_user_uuid": OTHER_UUID})
    res = probe(tunnel_env, running, USER_TOKEN)
    assert res.returncode == 1 and "submitted by other users" in res.stderr


@pytest.mark.parametrize(("state", "message"), [
    ("Queued", 'container is not running yet (state is "Queued")'),
    ("Locked", 'container is not running yet (state is "Locked")'),
    ("Complete", 'container has ended (state is "Complete")'),
    ("Cancelled", 'container has ended (state is "Cancelled")'),
])
def test_container_state_refusals(tunnel_env: TunnelEnv, running: str, state: str,
                                  message: str) -> None:
    tunnel_env.backend.containers[running]["state"] = state
    res = probe(tunnel_env, running)
    assert res.returncode == 1
    assert message in res.stderr


def test_gateway_address_refusals(tunnel_env: TunnelEnv) -> None:
    uuid = ctr_uuid(12)  # Running, but no agent
    tunnel_env.backend.add_container(uuid, gateway_address="")
    res = probe(tunnel_env, uuid)
    assert "container is running but gateway is not available" in res.stderr
    tunnel_env.backend.containers[uuid]["gateway_address"] = f"tunnel {tunnel_env.url}/"
    res = probe(tunnel_env, uuid)
    assert "container is running but tunnel is down" in res.stderr
    assert "retry in a few seconds" in res.stderr
    tunnel_env.backend.containers[uuid]["gateway_address"] = "tunnel https://127.0.0.1:9/"
    res = probe(tunnel_env, uuid)
    assert "tunnel endpoint is invalid" in res.stderr


def test_not_a_container_uuid(tunnel_env: TunnelEnv) -> None:
    res = probe(tunnel_env, "zzzzz-tpzed-000000000000000")
    assert res.returncode == 1
    assert "not a container or container request UUID" in res.stderr


# --- who may register a tunnel ----------------------------------------------------------------


def register(env: TunnelEnv, uuid: str, secret: str) -> tuple[ssl.SSLSocket, bytes]:
    s = raw_conn(env)
    s.sendall(build_tunnel_request(env.host, uuid, secret))
    return s, read_head(s)


def test_forged_registrations_are_refused_and_never_logged(
        tunnel_env: TunnelEnv, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    uuid, other = ctr_uuid(21), ctr_uuid(22)
    tunnel_env.backend.add_container(uuid)
    wrong = "ab" * 32
    for secret in (wrong, gateway_auth_secret(TUNNEL_ROOT_TOKEN, other), ""):
        s, head = register(tunnel_env, uuid, secret)
        s.close()
        assert head.startswith(b"HTTP/1.1 401"), head
        assert b"authentication error" in head
    assert uuid not in tunnel_env.broker.tunnels  # type: ignore[union-attr]
    assert tunnel_env.broker.counters["tunnels_refused"] == 3  # type: ignore[union-attr]
    # The right secret still works: the broker is healthy.
    good = gateway_auth_secret(TUNNEL_ROOT_TOKEN, uuid)
    s, head = register(tunnel_env, uuid, good)
    try:
        assert head.startswith(b"HTTP/1.1 101"), head
    finally:
        s.close()
    text = caplog.text
    for secret in (wrong, good, gateway_auth_secret(TUNNEL_ROOT_TOKEN, other), TUNNEL_ROOT_TOKEN):
        assert secret not in text


def test_registration_without_upgrade_header_is_refused(tunnel_env: TunnelEnv) -> None:
    uuid = ctr_uuid(23)
    s = raw_conn(tunnel_env)
    req = build_tunnel_request(tunnel_env.host, uuid, gateway_auth_secret(TUNNEL_ROOT_TOKEN, uuid))
    s.sendall(req.replace(b"Upgrade: tunnel-h2\r\n", b""))
    head = read_head(s)
    s.close()
    assert head.startswith(b"HTTP/1.1 400")


def test_garbage_after_upgrade_closes_only_that_tunnel(tunnel_env: TunnelEnv, running: str
                                                       ) -> None:
    uuid = ctr_uuid(24)
    tunnel_env.backend.add_container(uuid)
    s, head = register(tunnel_env, uuid, gateway_auth_secret(TUNNEL_ROOT_TOKEN, uuid))
    assert head.startswith(b"HTTP/1.1 101")
    s.sendall(b"\x00\xff garbage, not HTTP/2 " * 100)
    s.settimeout(10)
    deadline = time.monotonic() + 10
    closed = False
    while time.monotonic() < deadline:
        try:
            if not s.recv(65536):
                closed = True
                break
        except (ssl.SSLError, ConnectionError):
            closed = True
            break
    s.close()
    assert closed, "broker kept a tunnel that sent garbage"
    # The broker and the other tunnel are fine.
    assert probe(tunnel_env, running).returncode == 0


def test_stream_flood_on_one_tunnel_is_bounded(tunnel_env: TunnelEnv) -> None:
    from tunnel.protocol import TunnelSettings

    tunnel_env.broker.config.settings = TunnelSettings(max_concurrent_streams=4)  # type: ignore[union-attr]
    uuid = ctr_uuid(25)
    tunnel_env.start_agent(uuid, settings=TunnelSettings(max_concurrent_streams=4))
    tunnel_env.wait_registered(uuid)
    held = []
    try:
        for _ in range(4):
            s = raw_conn(tunnel_env)
            s.sendall(shell_request(tunnel_env, uuid))
            head = read_head(s)
            assert head.startswith(b"HTTP/1.1 101"), head
            held.append(s)
        s = raw_conn(tunnel_env)
        s.sendall(shell_request(tunnel_env, uuid))
        head = read_head(s)
        s.close()
        assert head.startswith(b"HTTP/1.1 503") and b"too many connections" in head
    finally:
        for h in held:
            h.close()
    # Once they are closed, a new shell gets through.
    deadline = time.monotonic() + 10
    while probe(tunnel_env, uuid).returncode != 0:
        assert time.monotonic() < deadline


def test_max_gateway_tunnels_counts_tunnels_and_shells(tunnel_env: TunnelEnv, running: str
                                                        ) -> None:
    tunnel_env.broker.config.max_gateway_tunnels = 2  # type: ignore[union-attr]
    # One slot is the tunnel itself; one shell fits, the next is refused at once.
    s1 = raw_conn(tunnel_env)
    s1.sendall(shell_request(tunnel_env, running))
    assert read_head(s1).startswith(b"HTTP/1.1 101")
    try:
        s2 = raw_conn(tunnel_env)
        s2.sendall(shell_request(tunnel_env, running))
        head = read_head(s2)
        s2.close()
        assert head.startswith(b"HTTP/1.1 503") and b"MaxGatewayTunnels" in head
        uuid = ctr_uuid(26)
        tunnel_env.backend.add_container(uuid)
        s3, head = register(tunnel_env, uuid, gateway_auth_secret(TUNNEL_ROOT_TOKEN, uuid))
        s3.close()
        assert head.startswith(b"HTTP/1.1 503")
    finally:
        s1.close()
