"""``crunch-run`` (also ``crunchgate crunch-run``): the command a job script or SSH session runs.

Usage::

    crunch-run [--runtime-engine=local|docker|singularity] [--detach] [--stdin-config]
               [--config FILE] UUID
    crunch-run --list
    crunch-run --kill N UUID

Go-style single-dash flags (``-runtime-engine=docker``, ``-detach``, ``-list``, ``-kill 15``)
are accepted too, so crunchgate is a drop-in for Arvados' crunch-run in job scripts and
``CrunchRunArgumentsList``. Unknown flags are logged and ignored for the same reason.

Credentials come from ``ARVADOS_API_HOST``/``ARVADOS_API_TOKEN``/``ARVADOS_API_HOST_INSECURE``
(or, with ``--stdin-config``, from the ``Env`` object of a JSON document on stdin, as
arvados-dispatch-cloud sends it; or from ``--config`` when the environment has none).
``GatewayAuthSecret`` is read and removed from the environment at once, so nothing crunch-run
starts can see it.

``--detach`` takes the container's lock (see :mod:`dispatcher.crunchrun.locks`), starts a copy
of itself in a new session with stdin/stdout closed and stderr appended to
``<scratch base>/crunch-run-<uuid>.log``, hands it the lock and the credentials (through a pipe,
not the command line), prints ``{"UUID": ..., "PID": ...}`` (what it also writes into the lock
file, as Arvados' crunch-run does) and exits 0. A second ``--detach`` for the same UUID fails
while the first holds the lock.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from dispatcher import fastloop
from dispatcher.arvados.errors import ArvadosError
from dispatcher.arvados.ids import UUID_RE
from dispatcher.crunchrun import locks
from dispatcher.crunchrun.runtimes import RUNTIMES

if TYPE_CHECKING:
    from dispatcher.arvados.client import ArvadosClient
from dispatcher.logs import register_secret, setup_logging

log = logging.getLogger("crunchgate.crunchrun")

SECRET_ENV = "GatewayAuthSecret"
LOCK_DIR_ENV = "CRUNCH_RUN_LOCK_DIR"
GO_FLAG_RE = re.compile(r"^-[a-z][a-z0-9-]+(=.*)?$", re.DOTALL)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Options of ``crunch-run`` / ``crunchgate crunch-run``."""
    parser.add_argument("uuid", nargs="?", metavar="UUID", help="container UUID")
    # The single-dash spellings are Go crunch-run's (drop-in job scripts, CrunchRunArgumentsList).
    parser.add_argument("--runtime-engine", "-runtime-engine", default="docker",
                        choices=sorted(RUNTIMES),
                        help="how to run the container (default: docker)")
    parser.add_argument("--list", "-list", action="store_true",
                        help="print the UUID of each crunch-run running on this host")
    parser.add_argument("--kill", "-kill", type=int, metavar="N",
                        help="send signal N to the crunch-run of UUID and wait up to 1s")
    parser.add_argument("--detach", "-detach", action="store_true",
                        help="run in the background, holding the per-container lock")
    parser.add_argument("--stdin-config", "-stdin-config", action="store_true",
                        help='read {"Env": {...}} JSON from stdin (arvados-dispatch-cloud)')
    parser.add_argument("--stdin-prices", "-stdin-prices", action="store_true",
                        help="read an instance price history from stdin (accepted, ignored)")
    parser.add_argument("--config", "-config", metavar="FILE",
                        help="cluster config (API host/token when the environment has none)")
    parser.add_argument("--lock-dir", default=None,
                        help=f"where lock files live (default ${LOCK_DIR_ENV} or /var/lock)")
    parser.add_argument("--scratch-base", default=None,
                        help="parent of per-container scratch directories (default $TMPDIR)")
    parser.add_argument("--poll-interval", type=float, default=5.0, metavar="SECONDS",
                        help="how often to check the container record while it runs")
    parser.add_argument("--kill-grace", type=float, default=10.0, metavar="SECONDS",
                        help="SIGTERM-to-SIGKILL grace when stopping the container")
    parser.add_argument("--log-flush-interval", type=float, default=1.0, metavar="SECONDS",
                        help="upload container output at least this often")
    parser.add_argument("--detach-log", default=None, metavar="FILE",
                        help="stderr of a --detach'ed crunch-run")
    parser.add_argument("--log-level", default="info")
    # Internal: the fd of the lock a --detach parent handed over.
    parser.add_argument("--lock-fd", type=int, default=None, help=argparse.SUPPRESS)


def normalize_argv(argv: Sequence[str]) -> list[str]:
    """Turn Go-style ``-flag[=v]`` into ``--flag[=v]`` (before ``--``; UUIDs never start with -)."""
    out: list[str] = []
    rest = False
    for arg in argv:
        if arg == "--":
            rest = True
        out.append("-" + arg if not rest and GO_FLAG_RE.match(arg) else arg)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """The ``crunch-run`` console script."""
    parser = argparse.ArgumentParser(
        prog="crunch-run",
        description="The compute-node supervisor: runs one Arvados container (or lists/kills "
        "the crunch-run processes on this host).")
    configure_parser(parser)
    raw = normalize_argv(sys.argv[1:] if argv is None else argv)
    args, unknown = parser.parse_known_args(raw)
    args.unknown = unknown
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130


def run(args: argparse.Namespace) -> int:
    """Run ``crunch-run`` with parsed ``args``; returns the exit status."""
    setup_logging(args.log_level, "json")
    # First thing: nothing we start may inherit the gateway secret.
    secret = os.environ.pop(SECRET_ENV, "")
    register_secret(secret)
    for flag in getattr(args, "unknown", []) or []:
        log.warning("ignoring unsupported argument %r", flag)
    if args.stdin_config:
        try:
            secret = _apply_stdin_config(sys.stdin.read()) or secret
        except ValueError as exc:
            print(f"crunch-run: bad --stdin-config JSON on stdin: {exc}", file=sys.stderr)
            return 2
    elif args.stdin_prices:
        sys.stdin.read()
    lock_dir = args.lock_dir or os.environ.get(LOCK_DIR_ENV) or locks.DEFAULT_LOCK_DIR

    if args.list:
        return locks.list_runs(lock_dir, sys.stdout)
    if not args.uuid:
        print("crunch-run: missing container UUID (see --help)", file=sys.stderr)
        return 2
    if not UUID_RE.match(args.uuid):
        print(f"crunch-run: {args.uuid!r} is not a container UUID", file=sys.stderr)
        return 2
    if args.kill is not None:
        return locks.kill_run(lock_dir, args.uuid, args.kill,
                              err=lambda m: print(f"crunch-run: {m}", file=sys.stderr))
    if args.detach:
        return detach(args, lock_dir, secret)
    return run_foreground(args, lock_dir, secret)


def _apply_stdin_config(text: str) -> str:
    """Put the ``Env`` entries into our environment; return the gateway secret (not set)."""
    cfg: Any = json.loads(text or "{}")
    if not isinstance(cfg, dict):
        raise ValueError("not a JSON object")
    env = cfg.get("Env") or {}
    if not isinstance(env, dict):
        raise ValueError("Env is not an object")
    secret = str(env.pop(SECRET_ENV, "") or "")
    register_secret(secret)
    for k, v in env.items():
        os.environ[str(k)] = v if isinstance(v, str) else json.dumps(v)
    register_secret(os.environ.get("ARVADOS_API_TOKEN"))
    return secret


def detach(args: argparse.Namespace, lock_dir: str, secret: str) -> int:
    """Start a background crunch-run that holds the lock; see module doc."""
    try:
        os.makedirs(lock_dir, exist_ok=True)
        held = locks.acquire(lock_dir, args.uuid)
    except locks.AlreadyRunning as exc:
        print(f"crunch-run: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"crunch-run: cannot create lock file in {lock_dir}: {exc}", file=sys.stderr)
        return 1
    child_argv = [sys.executable, "-m", "dispatcher.crunchrun.main",
                  *_child_args(args, lock_dir), f"--lock-fd={held.fd}", "--stdin-config",
                  args.uuid]
    env_keys = ("ARVADOS_API_HOST", "ARVADOS_API_TOKEN", "ARVADOS_API_HOST_INSECURE",
                "GatewayAddress", "InstanceType")
    config = {"Env": {k: os.environ[k] for k in env_keys if k in os.environ}}
    if secret:
        config["Env"][SECRET_ENV] = secret
    log_path = args.detach_log or os.path.join(
        args.scratch_base or tempfile.gettempdir(), f"crunch-run-{args.uuid}.log")
    # ``crunch-run --list`` probes liveness with SIGUSR2 as soon as the lock file names the
    # child, which may be before the child's Python has installed its handler: start it with
    # SIGUSR2 ignored (an ignored disposition survives exec) so such a probe cannot kill it.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    try:
        with open(log_path, "ab") as logf:
            child = subprocess.Popen(
                child_argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=logf,
                pass_fds=(held.fd,), start_new_session=True, close_fds=True,
            )
        assert child.stdin is not None
        child.stdin.write(json.dumps(config).encode())
        child.stdin.close()
        held.write_owner(args.uuid, child.pid)
    except OSError as exc:
        held.release()
        print(f"crunch-run: cannot start detached crunch-run: {exc}", file=sys.stderr)
        return 1
    # The child holds the lock through its inherited fd; ours can go (without unlinking).
    os.close(held.fd)
    print(json.dumps({"UUID": args.uuid, "PID": child.pid}), flush=True)
    return 0


def _child_args(args: argparse.Namespace, lock_dir: str) -> list[str]:
    out = [f"--runtime-engine={args.runtime_engine}", f"--lock-dir={lock_dir}",
           f"--poll-interval={args.poll_interval}", f"--kill-grace={args.kill_grace}",
           f"--log-flush-interval={args.log_flush_interval}", f"--log-level={args.log_level}"]
    if args.scratch_base:
        out.append(f"--scratch-base={args.scratch_base}")
    if args.config:
        out.append(f"--config={args.config}")
    return out


def run_foreground(args: argparse.Namespace, lock_dir: str, secret: str) -> int:
    """Hold the lock (handed over, or taken now when possible) and run the container."""
    # crunch-run --list probes liveness with SIGUSR2 (reference 5.8) at any time, also while we
    # clean up. A Python-level no-op handler (unlike SIG_IGN, which --detach starts us with)
    # is reset by exec, so the container's processes get the default disposition back.
    signal.signal(signal.SIGUSR2, _ignore_signal)
    held: locks.HeldLock | None = None
    if args.lock_fd is not None:
        os.set_inheritable(args.lock_fd, False)  # the container must not keep it alive
        held = locks.HeldLock(locks.lock_path(lock_dir, args.uuid), args.lock_fd)
    else:
        try:
            held = locks.acquire(lock_dir, args.uuid)
            held.write_owner(args.uuid, os.getpid())
        except locks.AlreadyRunning as exc:
            print(f"crunch-run: {exc}", file=sys.stderr)
            return 1
        except OSError as exc:
            # No writable lock dir (unprivileged HPC user): run anyway, just not listable.
            log.debug("running without a lock file in %s: %s", lock_dir, exc)
    try:
        client = _make_client(args)
    except ArvadosError as exc:
        print(f"crunch-run: {exc}", file=sys.stderr)
        if held is not None:
            held.release()
        return 1
    # Imported here, not at the top: the HTTP stack costs ~0.4 s of CPU, and the cloud
    # dispatcher runs ``crunch-run --list`` on every worker probe.
    from dispatcher.crunchrun.runner import Runner, RunnerOptions

    opts = RunnerOptions(
        runtime_engine=args.runtime_engine,
        scratch_base=args.scratch_base or "",
        poll_interval_s=args.poll_interval,
        kill_grace_s=args.kill_grace,
        log_flush_interval_s=args.log_flush_interval,
    )

    async def go() -> int:
        async with client:
            return await Runner(client, args.uuid, opts, gateway_secret=secret).run()

    try:
        return fastloop.run(go())
    finally:
        if held is not None:
            held.release()


def _ignore_signal(signum: int, frame: object) -> None:
    return None


def _make_client(args: argparse.Namespace) -> ArvadosClient:
    from dispatcher.arvados.client import ArvadosClient

    if os.environ.get("ARVADOS_API_HOST") or not args.config:
        return ArvadosClient.from_env()
    from dispatcher.config import load_config

    return ArvadosClient.from_config(load_config(args.config))


if __name__ == "__main__":
    sys.exit(main())
