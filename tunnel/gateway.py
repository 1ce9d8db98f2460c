"""The container gateway inside crunch-run: an SSH server (asyncssh), a port proxy, and the
live-log WebDAV server (:class:`tunnel.webdav.LogServer`, when crunch-run keeps local log
copies: ``GatewayContext.log_dir``).

It is reached only through the tunnel: each SSH connection arrives as a tunnel stream that
:mod:`tunnel.agent` splices to one end of a ``socketpair`` whose other end this server runs on.
Nothing listens on a network port, so a local user of the compute node cannot reach it (the
reference's gateway listens on 127.0.0.1 and protects itself with TLS + HMAC instead).

SSH behaviour follows reference section 4.2, with ``env`` requests implemented:

* No SSH-level authentication: the broker already checked the user's token and permissions,
  any user name is accepted.
* ``session`` channels: ``shell`` / ``exec`` (command split with shell quoting, empty command
  runs a login shell), ``pty-req`` (a real pty, ``TERM`` set), ``window-change``, ``env``,
  ``signal``; exit status is sent back. Subsystems (sftp), X11 and agent forwarding are declined.
* ``direct-tcpip`` (``ssh -L``): only to ``localhost``/``127.0.0.1``/``::1``/``0.0.0.0``/``::``,
  and the connection goes to the container's address (``GatewayContext.target_ip``).
* Remote forwarding (``-R``) is refused.

Commands run through the runtime: ``ctx.exec_argv(command, tty)`` gives the argv that runs a
command inside the container; it is started with the container's environment and working
directory. An interactive session is not a batch command with a timeout and captured output,
so it is started here with ``asyncio.create_subprocess_exec`` (argv only, never a shell string)
rather than through ``dispatcher.proc.CommandRunner``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import shlex
import signal
import socket
import struct
import termios
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import asyncssh

from tunnel.webdav import LogServer

log = logging.getLogger("crunchgate.tunnel.gateway")

LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "0.0.0.0", "::"})
LOGIN_SHELL = ["/bin/bash", "-login"]
SIGNALS = {"INT": signal.SIGINT, "TERM": signal.SIGTERM, "KILL": signal.SIGKILL,
           "HUP": signal.SIGHUP, "QUIT": signal.SIGQUIT, "USR1": signal.SIGUSR1,
           "USR2": signal.SIGUSR2}


class ContextLike(Protocol):
    """What the gateway needs from crunch-run (``dispatcher.crunchrun.gateway.GatewayContext``)."""

    container_uuid: str
    exec_argv: Callable[[list[str], bool], list[str]]
    container_env: dict[str, str]
    container_cwd: str
    target_ip: str


def _set_winsize(fd: int, cols: int, rows: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class _Session(asyncssh.SSHServerSession):
    """One ``session`` channel: runs one command, with or without a pty."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.chan: Any = None
        self.command: str | None = None
        self.term: str | None = None
        self.size = (80, 24)
        self.proc: asyncio.subprocess.Process | None = None
        self.master: int | None = None
        self.task: asyncio.Task[None] | None = None
        self._write_paused = False
        self._stdin_eof = False
        self._early: list[bytes] = []  # stdin that arrived before the command started

    # --- channel requests ------------------------------------------------------------------

    def connection_made(self, chan: Any) -> None:
        self.chan = chan

    def pty_requested(self, term_type: str, term_size: tuple[int, int, int, int],
                      term_modes: Mapping[int, int]) -> bool:
        self.term = term_type or "xterm"
        if term_size[0] and term_size[1]:
            self.size = (term_size[0], term_size[1])
        return True

    def shell_requested(self) -> bool:
        self.command = ""
        return True

    def exec_requested(self, command: str) -> bool:
        self.command = command
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        return False

    def session_started(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    def terminal_size_changed(self, width: int, height: int, pixwidth: int,
                              pixheight: int) -> None:
        self.size = (width, height)
        if self.master is not None:
            _set_winsize(self.master, width, height)

    def signal_received(self, signame: str) -> None:
        sig = SIGNALS.get(signame.upper())
        if sig is not None and self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def break_received(self, msec: int) -> bool:
        self.signal_received("INT")
        return True

    def data_received(self, data: bytes, datatype: Any) -> None:
        if self.master is None and self.proc is None:
            self._early.append(data)
        elif self.master is not None:
            with contextlib.suppress(OSError):
                os.write(self.master, data)
        elif self.proc is not None and self.proc.stdin is not None:
            with contextlib.suppress(Exception):
                self.proc.stdin.write(data)

    def eof_received(self) -> bool:
        self._stdin_eof = True
        if self.master is None and self.proc is not None and self.proc.stdin is not None:
            with contextlib.suppress(Exception):
                self.proc.stdin.close()
        return True  # keep our direction open until the command exits

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.master is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.master)

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.master is not None:
            asyncio.get_running_loop().add_reader(self.master, self._read_master)

    def connection_lost(self, exc: Exception | None) -> None:
        self._kill()

    # --- running the command -----------------------------------------------------------------

    def _argv(self) -> list[str]:
        if not self.command:
            inner = LOGIN_SHELL if os.path.exists(LOGIN_SHELL[0]) else ["/bin/sh", "-l"]
        else:
            inner = shlex.split(self.command)
        return self.gw.ctx.exec_argv(inner, self.term is not None)

    def _env(self) -> dict[str, str]:
        env = dict(self.gw.ctx.container_env)
        env.update(self.chan.get_environment())
        if self.term is not None:
            env["TERM"] = self.term
            env["USE_TTY"] = "1"
        return env

    async def _run(self) -> None:
        chan = self.chan
        try:
            argv = self._argv()
        except ValueError as exc:
            chan.write_stderr(f"cannot parse command: {exc}\r\n".encode())
            chan.exit(1)
            return
        cwd: str | None = self.gw.ctx.container_cwd
        if not cwd or not os.path.isdir(cwd):  # noqa: ASYNC240 - one stat, local disk
            cwd = None
        try:
            code = await (self._run_pty(argv, cwd) if self.term is not None
                          else self._run_pipes(argv, cwd))
        except (OSError, ValueError) as exc:
            chan.write_stderr(f"cannot start {argv[0] if argv else 'command'}: {exc}\r\n".encode())
            code = 1
        except asyncio.CancelledError:
            self._kill()
            raise
        with contextlib.suppress(Exception):
            chan.exit(code)

    async def _run_pipes(self, argv: list[str], cwd: str | None) -> int:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=self._env(), cwd=cwd, start_new_session=True)
        self.proc = proc
        if proc.stdin is not None:
            for chunk in self._early:
                proc.stdin.write(chunk)
            self._early.clear()
            if self._stdin_eof:
                proc.stdin.close()

        async def pump(reader: asyncio.StreamReader | None, write: Callable[[bytes], None]
                       ) -> None:
            assert reader is not None
            while chunk := await reader.read(65536):
                write(chunk)
                with contextlib.suppress(Exception):
                    await self.chan.drain()

        await asyncio.gather(pump(proc.stdout, self.chan.write),
                             pump(proc.stderr, self.chan.write_stderr))
        return await proc.wait()

    async def _run_pty(self, argv: list[str], cwd: str | None) -> int:
        master, slave = os.openpty()
        _set_winsize(master, *self.size)
        os.set_blocking(master, False)

        def make_controlling_tty() -> None:
            # Runs in the child. Event loops differ on whether stdio is already the pty and
            # whether setsid() already happened (uvloop: neither), so do both by hand, on the
            # slave descriptor, which is still open until exec.
            with contextlib.suppress(OSError):
                os.setsid()
            fcntl.ioctl(slave, termios.TIOCSCTTY, 0)

        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=slave, stdout=slave, stderr=slave, env=self._env(), cwd=cwd,
                preexec_fn=make_controlling_tty)
        finally:
            os.close(slave)
        self.proc = proc
        self.master = master
        for chunk in self._early:
            with contextlib.suppress(OSError):
                os.write(master, chunk)
        self._early.clear()
        self._master_done = asyncio.get_running_loop().create_future()
        if not self._write_paused:
            asyncio.get_running_loop().add_reader(master, self._read_master)
        try:
            code = await proc.wait()
            # Output written just before exit is still in the pty: read it to the end.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await asyncio.shield(self._master_done)
            return code
        finally:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(master)
            self.master = None
            os.close(master)

    def _read_master(self) -> None:
        assert self.master is not None
        try:
            data = os.read(self.master, 65536)
        except BlockingIOError:
            return
        except OSError:  # EIO: every holder of the slave side has exited
            data = b""
        if data:
            self.chan.write(data)
            return
        asyncio.get_running_loop().remove_reader(self.master)
        if not self._master_done.done():
            self._master_done.set_result(None)

    def _kill(self) -> None:
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGHUP)


class _Server(asyncssh.SSHServer):
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.conn: Any = None

    def connection_made(self, conn: Any) -> None:
        self.conn = conn

    def begin_auth(self, username: str) -> bool:
        return False  # already authenticated by the broker (reference 3.2, SSH layer)

    def session_requested(self) -> _Session:
        return _Session(self.gw)

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str,
                             orig_port: int) -> Any:
        if dest_host.strip("[]").lower() not in LOCAL_HOSTS:
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                f"only localhost ports of the container can be forwarded, not {dest_host!r}")
        return self.conn.forward_connection(self.gw.ctx.target_ip, dest_port)

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        return False


class Gateway:
    """The SSH server of one container; :meth:`serve_socket` runs it on a connected socket."""

    def __init__(self, ctx: ContextLike) -> None:
        self.ctx = ctx
        # A fresh host key per run, as the reference (clients use StrictHostKeyChecking no).
        self.host_key = asyncssh.generate_private_key("ssh-ed25519")
        self._conns: set[Any] = set()
        # The live-log WebDAV server, when crunch-run keeps local copies of the logs
        # (``GatewayContext.log_dir``); streams for ``log.gateway:80`` land on it.
        log_dir = getattr(ctx, "log_dir", "") or ""
        self.logs: LogServer | None = LogServer(ctx.container_uuid, log_dir) if log_dir else None

    async def serve_socket(self, sock: socket.socket) -> None:
        """Run one SSH server connection on ``sock`` (one end of a socketpair)."""
        conn = await asyncssh.run_server(
            sock, server_factory=lambda: _Server(self), server_host_keys=[self.host_key],
            encoding=None, keepalive_interval=0, login_timeout=60,
            server_version="crunchgate", allow_scp=False, agent_forwarding=False,
            x11_forwarding=False)
        self._conns.add(conn)
        asyncio.get_running_loop().create_task(self._forget(conn))

    async def _forget(self, conn: Any) -> None:
        with contextlib.suppress(Exception):
            await conn.wait_closed()
        self._conns.discard(conn)

    def close(self) -> None:
        """Close every SSH connection (their commands get SIGHUP) and live-log request."""
        for conn in list(self._conns):
            conn.close()
        if self.logs is not None:
            self.logs.close()
