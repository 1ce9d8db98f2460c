"""``crunchgate shell [user@]UUID [ssh options] [-- command...]``: OpenSSH into a container.

First a probe (``connect-ssh --probe-only`` in-process), so a refusal is shown as one clear line
and the same container is used; then the system ``ssh`` replaces this process, with
``crunchgate connect-ssh`` as its ProxyCommand (host key checking is off: the gateway makes a
new host key for every run, and the connection is authenticated by the controller).

:func:`run_command` opens a shell the same way with asyncssh instead of OpenSSH and returns the
exit status and output of one command (the demo uses it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import shutil
import sys
from typing import Any

from tunnel.client.common import (
    ApiTarget,
    ShellRefused,
    open_upgraded,
    resolve_container,
    split_target,
)
from tunnel.client.connect_ssh import bridge


def proxy_command(target: str, detach_keys: str, ca_file: str | None) -> str:
    """The ProxyCommand string (OpenSSH runs it with the user's shell, so quote everything)."""
    exe = shutil.which("crunchgate")
    argv = [exe] if exe else [sys.executable, "-m", "dispatcher.cli"]
    argv += ["connect-ssh", f"--detach-keys={detach_keys}"]
    if ca_file:
        argv.append(f"--ca-file={ca_file}")
    argv.append(target)
    return " ".join(shlex.quote(a) for a in argv)  # OpenSSH adds the "exec" itself


def ssh_argv(target: str, ssh_args: list[str], detach_keys: str = "",
             ca_file: str | None = None) -> list[str]:
    """The ``ssh`` command line for ``target`` (``user@uuid``)."""
    return ["ssh", "-o", f"ProxyCommand {proxy_command(target, detach_keys, ca_file)}",
            "-o", "StrictHostKeyChecking no", "-o", "UserKnownHostsFile /dev/null",
            "-o", "LogLevel ERROR", target, *ssh_args]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", help="[user@]UUID of a container or container request")
    parser.add_argument("ssh_args", nargs=argparse.REMAINDER,
                        help="ssh options and/or the command to run (after --)")
    parser.add_argument("--detach-keys", default="", help="docker-style detach key sequence")
    parser.add_argument("--ca-file", default=None, help="CA certificate to trust for the API")


def run(args: argparse.Namespace) -> int:
    try:
        api = ApiTarget.from_env(ca_file=args.ca_file)
    except ShellRefused as exc:
        print(f"crunchgate shell: {exc}", file=sys.stderr)
        return 2
    user, _ = split_target(args.target)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        rc = asyncio.run(bridge(api, args.target, args.detach_keys, probe_only=True,
                                stdout_fd=devnull))
    finally:
        os.close(devnull)
    if rc != 0:
        return rc
    rest = list(args.ssh_args)
    if rest and rest[0] == "--":
        rest = rest[1:]
    target = f"{user or 'root'}@{split_target(args.target)[1]}"
    argv = ssh_argv(target, rest, args.detach_keys, api.ca_file)
    if shutil.which("ssh") is None:
        print("crunchgate shell: OpenSSH's ssh is not installed (apt install openssh-client)",
              file=sys.stderr)
        return 2
    # An interactive ssh session replaces this process (it owns the terminal from here on).
    os.execvp("ssh", argv)
    return 0  # not reached


async def run_command_async(api: ApiTarget, uuid: str, argv: list[str], *,
                            timeout_s: float = 60.0, login_username: str = "root"
                            ) -> tuple[int, str]:
    """Open a shell to container ``uuid`` and run ``argv``; returns (exit status, stdout)."""
    import asyncssh

    uuid = await resolve_container(api, uuid)

    class _Tunnel:
        async def create_connection(self, factory: Any, host: str, port: int) -> Any:
            return await open_upgraded(api, uuid, factory, login_username=login_username)

        def close(self) -> None:
            pass

        async def wait_closed(self) -> None:
            pass

    async with asyncssh.connect("container", tunnel=_Tunnel(), username=login_username,
                                known_hosts=None, password=None, client_keys=None,
                                agent_path=None, preferred_auth="none") as conn:
        async with asyncio.timeout(timeout_s):
            res = await conn.run(" ".join(shlex.quote(a) for a in argv), check=False,
                                 encoding="utf-8", stdin=asyncssh.DEVNULL)
    code = res.exit_status if res.exit_status is not None else 255
    out = res.stdout if isinstance(res.stdout, str) else ""
    return code, out


def run_command(api_host: str, token: str, uuid: str, argv: list[str], *,
                insecure: bool = False, ca_file: str | None = None,
                timeout_s: float = 60.0) -> tuple[int, str]:
    """Blocking form of :func:`run_command_async` (raises ShellRefused on a refusal)."""
    api = ApiTarget(api_host, token, insecure, ca_file)
    return asyncio.run(run_command_async(api, uuid, argv, timeout_s=timeout_s))
