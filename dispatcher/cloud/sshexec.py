"""Run commands on a worker over SSH with asyncssh (reference 5.8 "SSH executor").

One multiplexed SSH connection per worker, opened lazily and re-opened when opening a session
on it fails. Each command runs in its own session with stdin, stdout and stderr captured; a
non-zero exit is an :class:`ExecError` carrying the status. Unlike the reference, **every
command has a timeout** (reference 8.3): a hung probe can no longer block a worker's probes.

Host keys: any key is accepted at the SSH layer; whenever the server's key differs from the last
verified one, the instance must vouch for it — first the driver (``verify_host_key``); if the
driver has no mechanism, the executor runs ``cat /var/run/arvados-instance-secret`` (with
``sudo`` for non-root users) on the new connection and requires exactly the secret from the
instance's ``InstanceSecret`` tag. Until then no other command is run on that connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

import asyncssh

from dispatcher.cloud.drivers.base import Executor, Instance
from dispatcher.cloud.errors import (
    ConfigurationError,
    ExecError,
    HostKeyError,
    NotImplementedByDriver,
)

log = logging.getLogger("crunchgate.cloud.ssh")

SECRET_PATH = "/var/run/arvados-instance-secret"


def load_private_key(value: str) -> asyncssh.SSHKey:
    """``Containers.DispatchPrivateKey``: PEM text, or ``file:///abs/path``."""
    if not value:
        raise ConfigurationError(
            "Containers.DispatchPrivateKey is empty: set it to a PEM private key or "
            "file:///path/to/key")
    text = value
    if value.startswith("file://"):
        path = value[len("file://"):]
        try:
            with open(path) as fh:
                text = fh.read()
        except OSError as exc:
            raise ConfigurationError(
                f"Containers.DispatchPrivateKey: cannot read {path}: {exc.strerror}") from None
    try:
        return asyncssh.import_private_key(text)
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise ConfigurationError(
            f"Containers.DispatchPrivateKey: not a usable private key ({exc})") from None


def public_key_openssh(key: asyncssh.SSHKey) -> str:
    """The ``ssh-ed25519 AAAA...`` line for ``key``."""
    return key.export_public_key("openssh").decode().strip()


class SSHExecutor(Executor):
    """See the module docstring."""

    def __init__(
        self,
        instance: Instance,
        private_key: asyncssh.SSHKey,
        *,
        default_port: str = "22",
        connect_timeout_s: float = 60.0,
        secret: Callable[[], str] = lambda: "",
        on_verified: Callable[[], None] | None = None,
    ) -> None:
        self.instance = instance
        self.private_key = private_key
        self.default_port = default_port or "ssh"
        self.connect_timeout_s = connect_timeout_s
        self.secret = secret
        self.on_verified = on_verified
        self._conn: asyncssh.SSHClientConnection | None = None
        self._verified_key: bytes | None = None
        self._lock = asyncio.Lock()

    def set_target(self, instance: Instance) -> None:
        if instance.address != self.instance.address and self._conn is not None:
            # The address changed: the old connection points at the wrong place.
            self._conn.close()
            self._conn = None
        self.instance = instance

    def _target(self) -> tuple[str, int]:
        addr = self.instance.address
        if not addr:
            raise ExecError("instance has no address yet", connect_failed=True)
        host, port = addr, self.default_port
        if addr.startswith("["):
            host, _, rest = addr[1:].partition("]")
            if rest.startswith(":"):
                port = rest[1:]
        elif addr.count(":") == 1:
            host, port = addr.split(":")
        try:
            return host, 22 if port == "ssh" else int(port)
        except ValueError:
            raise ExecError(f"bad SSH port {port!r}", connect_failed=True) from None

    async def _connect(self) -> asyncssh.SSHClientConnection:
        host, port = self._target()
        try:
            conn = await asyncio.wait_for(
                asyncssh.connect(
                    host, port, username=self.instance.remote_user,
                    client_keys=[self.private_key], known_hosts=None, agent_path=None,
                    config=None, keepalive_interval=30, keepalive_count_max=4,
                    login_timeout=self.connect_timeout_s,
                ),
                timeout=self.connect_timeout_s,
            )
        except TimeoutError:
            raise ExecError(f"ssh {host}:{port}: connect timed out", connect_failed=True,
                            timed_out=True) from None
        except (OSError, asyncssh.Error) as exc:
            raise ExecError(f"ssh {host}:{port}: {exc}", connect_failed=True) from None
        try:
            await self._verify(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    async def _verify(self, conn: asyncssh.SSHClientConnection) -> None:
        key = conn.get_server_host_key()
        blob = key.public_data if key is not None else b""
        if self._verified_key is not None and blob == self._verified_key:
            return
        try:
            await self.instance.verify_host_key(key)
        except NotImplementedByDriver:
            await self._verify_secret(conn)
        except HostKeyError:
            raise
        except Exception as exc:
            raise HostKeyError(f"host key verification failed: {exc}") from None
        self._verified_key = blob
        if self.on_verified is not None:
            self.on_verified()

    async def _verify_secret(self, conn: asyncssh.SSHClientConnection) -> None:
        want = self.secret()
        if not want:
            raise HostKeyError("cannot verify host key: instance has no InstanceSecret tag and "
                               "the driver cannot verify host keys")
        cmd = f"cat {SECRET_PATH}"
        if self.instance.remote_user != "root":
            cmd = "sudo " + cmd
        try:
            res = await asyncio.wait_for(conn.run(cmd, encoding=None, check=False), 30)
        except (TimeoutError, asyncssh.Error, OSError) as exc:
            raise HostKeyError(f"cannot read instance secret: {exc}") from None
        if res.exit_status != 0 or res.stdout != want.encode():
            raise HostKeyError("bad instance secret")

    async def _get_conn(self) -> asyncssh.SSHClientConnection:
        async with self._lock:
            if self._conn is None:
                self._conn = await self._connect()
            return self._conn

    async def execute(
        self,
        cmd: str,
        stdin: bytes | None = None,
        *,
        env: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> tuple[bytes, bytes]:
        for attempt in (1, 2):
            conn = await self._get_conn()
            try:
                proc = await conn.create_process(cmd, env=dict(env or {}) or (),
                                                 encoding=None)
            except (asyncssh.Error, OSError) as exc:
                # Opening a session failed: the connection is dead. Re-dial once.
                await self._drop(conn)
                if attempt == 2:
                    raise ExecError(f"ssh: cannot open session: {exc}",
                                    connect_failed=True) from None
                continue
            return await self._finish(proc, cmd, stdin, timeout_s)
        raise AssertionError("unreachable")

    async def _finish(self, proc: Any, cmd: str, stdin: bytes | None,
                      timeout_s: float | None) -> tuple[bytes, bytes]:
        try:
            res = await asyncio.wait_for(proc.communicate(stdin or b""), timeout_s)
        except TimeoutError:
            proc.close()
            raise ExecError(f"{_short(cmd)}: timed out after {timeout_s}s",
                            timed_out=True) from None
        except (asyncssh.Error, OSError) as exc:
            raise ExecError(f"{_short(cmd)}: {exc}", connect_failed=True) from None
        stdout, stderr = res
        status = proc.exit_status
        if status is None:
            status = -1 if proc.exit_signal else 0
        if status != 0:
            raise ExecError(f"{_short(cmd)}: exit status {status}", exit_status=status,
                            stdout=stdout or b"", stderr=stderr or b"")
        return stdout or b"", stderr or b""

    async def _drop(self, conn: asyncssh.SSHClientConnection) -> None:
        async with self._lock:
            if self._conn is conn:
                self._conn = None
        conn.close()

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
            try:
                await asyncio.wait_for(conn.wait_closed(), 5)
            except (TimeoutError, Exception):
                pass


def _short(cmd: str) -> str:
    """The command's first words, for error messages (never its stdin)."""
    words = cmd.split()
    if words and words[0] == "sudo":
        words = words[1:]
    return " ".join(words[:2]) if words else "(empty)"
