"""Container logs with a real WebDAV client: cadaver (reference 8.1 TestContainerRequestLogViaCadaver).

cadaver logs in with the Arvados token as its Basic password (after our 401 with
``WWW-Authenticate: Basic``), lists the log directory and fetches ``stderr.txt``: live from
crunch-run's gateway through the tunnel (C1 forwarding to C2) while the container runs, and from
the saved logs after it ended.
"""

from __future__ import annotations

import contextlib
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import termios
import time
from pathlib import Path

import pytest

from tests.integration import test_tunnel_controllers as c1c2
from tests.integration.test_container_logs_e2e import end_hello, hello_request
from tests.integration.test_tunnel_controllers import Cluster

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("cadaver") is None,
                       reason="cadaver is not installed (dev/setup installs it)"),
]
cluster = c1c2.cluster  # the two-controller fixture


class Terminal:
    """A program on a pseudo-terminal, driven like expect(1): wait for a prompt, answer it."""

    def __init__(self, argv: list[str], cwd: Path) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=cwd,
                                     start_new_session=True)
        os.close(slave)
        self.out = b""
        self.seen = 0  # what expect() has matched up to

    def expect(self, *prompts: bytes, timeout: float = 20) -> bytes:
        """Read until one of ``prompts`` appears after what was read so far; returns it."""
        deadline = time.monotonic() + timeout
        start = self.seen
        while True:
            for p in prompts:
                at = self.out.find(p, start)
                if at >= 0:
                    self.seen = at + len(p)
                    return p
            left = deadline - time.monotonic()
            assert left > 0, f"no {prompts} from cadaver: {self.out[-1500:]!r}"
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:  # the program ended
                    chunk = b""
                assert chunk, f"cadaver ended before {prompts}: {self.out[-1500:]!r}"
                self.out += chunk

    def wait_echo_off(self, timeout: float = 10) -> None:
        """Wait until the program has turned echo off (a password prompt flushes what was
        typed before it does; tcgetattr on the master reads the terminal's settings)."""
        deadline = time.monotonic() + timeout
        while termios.tcgetattr(self.master)[3] & termios.ECHO:
            assert time.monotonic() < deadline, "cadaver did not turn echo off"
            time.sleep(0.01)

    def send(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\n")

    def close(self) -> str:
        if self.master >= 0:
            os.close(self.master)
            self.master = -1
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        return self.out.decode(errors="replace")


def cadaver(cl: Cluster, path: str, token: str, commands: list[str], cwd: Path) -> str:
    """Run cadaver on ``https://<C1><path>``, log in with ``token``, run ``commands``; its
    whole output.

    cadaver (neon on GnuTLS) trusts only the system CAs and asks on its terminal whether to
    accept the development certificate, then for a user name and password (the token, as
    Arvados' WebDAV clients send it), discarding anything typed ahead: each answer waits for
    its prompt.
    """
    cwd.mkdir(exist_ok=True)
    term = Terminal(["cadaver", cl.urls[0].rstrip("/") + path], cwd)
    try:
        term.expect(b"(y/n)")
        term.send("y")
        term.expect(b"Username:")
        term.send("arvados")
        term.expect(b"Password:")
        term.wait_echo_off()
        term.send(token)
        if term.expect(b"dav:", b"Username:") == b"Username:":
            return term.close() + "\n[login rejected]"  # cadaver asks again
        for i, command in enumerate(commands):
            if i:
                term.expect(b"dav:")
            term.send(command)
        term.send("quit")
        with contextlib.suppress(AssertionError):
            term.expect(b"Connection to", timeout=5)
    finally:
        out = term.close()
    return out


def test_cadaver_lists_and_gets_live_and_saved_logs(cluster: Cluster, tmp_path: Path) -> None:
    token = cluster.add_user("carol")
    uuid, cr_uuid = hello_request(cluster, token, tmp_path)
    base = f"/arvados/v1/container_requests/{cr_uuid}/log/{uuid}/"
    cluster.api("POST", f"containers/{uuid}/lock")
    crun = cluster.start_crunch_run(uuid, tmp_path)
    try:
        deadline = time.monotonic() + 30
        while True:
            out = cadaver(cluster, base, token, ["ls"], tmp_path / "live")
            if re.search(r"stderr\.txt\s+12\s", out):  # name, size in bytes, date
                break
            assert time.monotonic() < deadline, out[-1500:] + cluster.log(0)[-3000:]
            time.sleep(0.3)
        out = cadaver(cluster, base, token, ["get stderr.txt"], tmp_path / "live")
        assert (tmp_path / "live" / "stderr.txt").read_bytes() == b"hello world\n", out

        (tmp_path / "stop").touch()
        crun.wait(30)
        assert cluster.api("GET", f"containers/{uuid}")["state"] == "Complete"
        out = cadaver(cluster, base, token, ["ls", "get stderr.txt"], tmp_path / "saved")
        assert "stderr.txt" in out and "crunch-run.txt" in out, out
        assert (tmp_path / "saved" / "stderr.txt").read_bytes() == b"hello world\n", out
    finally:
        end_hello(crun, tmp_path)
    # A wrong token: cadaver is refused, not shown anything.
    out = cadaver(cluster, base, "v2/zzzzz-gj3su-000000000000000/nope", ["ls"],
                  tmp_path / "wrong")
    assert out.endswith("[login rejected]") and "stderr.txt" not in out, out
