"""Tunnels survive broker restarts and network cuts; users get clean errors, never hangs."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.tunnel import (
    ADMIN_TOKEN,
    BrokerProcess,
    TunnelCerts,
    TunnelEnv,
    ctr_uuid,
)
from tunnel.client.shell import ssh_argv
from tunnel.protocol import TunnelSettings

TICKER = ["sh", "-c", "'while :; do echo tick; sleep 0.05; done'"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ssh_ok(env: TunnelEnv, uuid: str) -> bool:
    res = subprocess.run(ssh_argv(f"root@{uuid}", ["echo", "ok"]), env=env.client_env(),
                         capture_output=True, timeout=30)
    return res.returncode == 0 and res.stdout == b"ok\n"


def wait_for(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def start_ticker(env: TunnelEnv, uuid: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(ssh_argv(f"root@{uuid}", TICKER), env=env.client_env(ADMIN_TOKEN),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"tick\n"
    return proc


def finish(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if f is not None:
            f.close()


@pytest.mark.slow
def test_agent_reconnects_after_broker_kill9(tunnel_certs: TunnelCerts, tmp_path: Path) -> None:
    uuid = ctr_uuid(41)
    port = free_port()
    bp = BrokerProcess(tunnel_certs, port, [uuid], tmp_path / "broker.log")
    env = TunnelEnv(tunnel_certs, tmp_path)
    env.port = port  # agents and clients go to the subprocess broker
    try:
        bp.start()
        agent = env.start_agent(uuid)
        wait_for(lambda: ssh_ok(env, uuid), 20, "first shell")
        bp.kill()
        bp.start()
        wait_for(lambda: ssh_ok(env, uuid), 30, "a shell after the broker restart")
        assert agent.registrations >= 2
    finally:
        bp.kill()
        env.close()


def test_tunnel_cut_mid_session_ends_the_shell_cleanly(tunnel_env: TunnelEnv) -> None:
    uuid = ctr_uuid(42)
    agent = tunnel_env.start_agent(uuid)
    conn = tunnel_env.wait_registered(uuid)
    proc = start_ticker(tunnel_env, uuid)
    try:
        # Cut the tunnel under the running session (as a network failure would).
        tunnel_env.lt.loop.call_soon_threadsafe(conn.abort)
        rc = proc.wait(timeout=20)  # a clean end, not a hang
        assert rc != 0
        assert proc.stderr is not None
        # OpenSSH words the end by what it was doing when the proxy went away: reading
        # ("closed by remote host") or writing ("Broken pipe"). Both are a clean end.
        err = proc.stderr.read()
        assert b"closed by remote host" in err or b"Broken pipe" in err, err
    finally:
        finish(proc)
    # The agent comes back by itself and the next shell works.
    wait_for(lambda: ssh_ok(tunnel_env, uuid), 20, "a shell after the cut")
    assert agent.registrations >= 2


def test_dead_tunnel_is_detected_by_ping_deadline(tunnel_certs: TunnelCerts, tmp_path: Path
                                                  ) -> None:
    fast = TunnelSettings(ping_interval_s=0.2, ping_timeout_s=0.6)
    env = TunnelEnv(tunnel_certs, tmp_path, settings=fast)
    env.start_broker()
    try:
        uuid = ctr_uuid(43)
        agent = env.start_agent(uuid)
        conn = env.wait_registered(uuid)

        async def freeze_agent() -> None:
            # The agent stops reading: no PING answers, as with a silently dead network path.
            for c in agent.connections:
                c._transport.pause_reading()  # type: ignore[union-attr]
            await asyncio.wait_for(asyncio.shield(conn.closed), 10)

        env.lt.run(freeze_agent(), timeout=15)
        assert "ping" in conn.close_reason
    finally:
        env.close()


def test_drain_moves_new_shells_to_a_new_tunnel_while_old_sessions_continue(
        tunnel_env: TunnelEnv) -> None:
    uuid = ctr_uuid(44)
    agent = tunnel_env.start_agent(uuid)
    old = tunnel_env.wait_registered(uuid)
    proc = start_ticker(tunnel_env, uuid)
    try:
        tunnel_env.lt.loop.call_soon_threadsafe(old.drain)
        wait_for(lambda: tunnel_env.broker.tunnels.get(uuid) not in (None, old),  # type: ignore[union-attr]
                 20, "a new tunnel after the drain notice")
        assert ssh_ok(tunnel_env, uuid)  # through the new tunnel
        assert proc.stdout is not None
        for _ in range(5):  # the old session is still alive on the old tunnel
            assert proc.stdout.readline() == b"tick\n"
        assert agent.registrations >= 2
    finally:
        finish(proc)
