"""``crunchgate connect-ssh [user@]UUID``: stdin/stdout bridge for OpenSSH's ProxyCommand.

Opens the shell connection to the container through the controller
(``POST /arvados/v1/connect/{uuid}/ssh``, ``Upgrade: ssh``) and copies bytes between it and
stdin/stdout. Every refusal is printed as ``error setting up tunnel: <reason>`` with a hint, and
the exit status is 1. ``--probe-only`` checks that a shell could be opened and prints the
container UUID (``crunchgate shell`` uses it before starting ssh).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from typing import Any

from tunnel.client.common import (
    ApiTarget,
    ShellRefused,
    open_upgraded,
    resolve_container,
    split_target,
)


class _Bridge(asyncio.Protocol):
    """The upgraded connection: bytes go to stdout; EOF or loss ends the bridge."""

    def __init__(self, out_fd: int) -> None:
        self.out_fd = out_fd
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's SSL transport is no asyncio.Transport

    def data_received(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.out_fd, view)
            except BlockingIOError:
                continue
            except OSError:  # stdout closed: ssh went away
                self._finish("")
                return
            view = view[n:]

    def eof_received(self) -> bool:
        self._finish("")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(f"connection to the container was cut ({exc})" if exc else "")

    def _finish(self, message: str) -> None:
        if not self.done.done():
            self.done.set_result(message)


async def bridge(api: ApiTarget, target: str, detach_keys: str = "", probe_only: bool = False,
                 stdin_fd: int = 0, stdout_fd: int = 1) -> int:
    """Run the bridge; returns the exit status."""
    user, uuid = split_target(target)
    try:
        uuid = await resolve_container(api, uuid)
        print(f"connecting to container {uuid}", file=sys.stderr)
        transport, proto = await open_upgraded(
            api, uuid, lambda: _Bridge(stdout_fd), login_username=user, detach_keys=detach_keys)
    except ShellRefused as exc:
        print(f"error setting up tunnel: {exc}", file=sys.stderr)
        return 1
    if probe_only:
        transport.close()
        print(uuid)
        return 0
    loop = asyncio.get_running_loop()
    stdin_done = loop.create_future()

    def on_stdin() -> None:
        try:
            data = os.read(stdin_fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            transport.write(data)
            return
        loop.remove_reader(stdin_fd)
        if not stdin_done.done():
            stdin_done.set_result(None)
        with contextlib.suppress(OSError):
            if transport.can_write_eof():
                transport.write_eof()

    os.set_blocking(stdin_fd, False)
    try:
        loop.add_reader(stdin_fd, on_stdin)
    except (PermissionError, ValueError):  # a regular file: not pollable
        os.set_blocking(stdin_fd, True)
        transport.write(sys.stdin.buffer.read())
        with contextlib.suppress(OSError):
            transport.write_eof()
    os.set_blocking(stdout_fd, True)
    try:
        message = await proto.done
    finally:
        with contextlib.suppress(Exception):
            loop.remove_reader(stdin_fd)
        transport.close()
    if message:
        print(f"crunchgate connect-ssh: {message}", file=sys.stderr)
        return 1
    return 0


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", help="[user@]UUID of a container or container request")
    parser.add_argument("--detach-keys", default="", help="docker-style detach key sequence")
    parser.add_argument("--probe-only", action="store_true",
                        help="check that a shell can be opened, print the container UUID, exit")
    parser.add_argument("--ca-file", default=None, help="CA certificate to trust for the API")


def run(args: argparse.Namespace) -> int:
    try:
        api = ApiTarget.from_env(ca_file=args.ca_file)
    except ShellRefused as exc:
        print(f"crunchgate connect-ssh: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(bridge(api, args.target, args.detach_keys, args.probe_only))


def main(argv: list[str] | None = None) -> Any:
    parser = argparse.ArgumentParser(prog="crunchgate connect-ssh")
    configure_parser(parser)
    return run(parser.parse_args(argv))
