"""``crunchgate demo``: the whole path on one machine, with a live view.

Writes a cluster config into a fresh directory, starts ``crunchgate controller`` (which hosts the
tunnel broker) and ``crunchgate dispatch-local`` as child processes, submits a mix of container
requests through the API (commands that succeed, fail on purpose, print output, sleep a little;
``local`` runtime), plus one container that waits until the demo has opened a shell in it through
the reverse tunnel and run a command (then it is cancelled), shows a progress bar with counts by
state, and ends with a table of every container (UUID, final state, exit code, run time), the
shell session's output, one container's stdout, and a summary line.

Exit status 0 when every container reached the state and exit code its command implies.
Everything it started is stopped at the end (also on Ctrl-C), unless ``--keep``: then the
controller and the dispatcher stay up and the demo prints how to use and stop them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

CLUSTER_ID = "zdemo"
FINAL = ("Complete", "Cancelled")
START_TIMEOUT_S = 30.0
SHELL_TIMEOUT_S = 60.0


class DemoError(Exception):
    """The demo cannot go on; the message says what to do next."""


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Options of ``crunchgate demo``."""
    parser.add_argument("--containers", type=int, default=20, metavar="N",
                        help="how many containers to run (default: %(default)s)")
    parser.add_argument("--keep", action="store_true",
                        help="leave the controller and dispatcher running afterwards")
    parser.add_argument("--data", default=None, metavar="DIR",
                        help="directory for config, database, logs (default: a new temp dir)")
    parser.add_argument("--timeout", type=float, default=180.0, metavar="SECONDS",
                        help="give up if the containers are not done by then "
                        "(default: %(default)s)")
    parser.add_argument("--no-shell", action="store_true",
                        help="skip the shell session into a running container")
    parser.add_argument("--max-jobs", type=int, default=None, metavar="N",
                        help="local jobs running at once (default: dispatch-local's)")


# --- the workload -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """One container request of the demo and the outcome it should have."""

    kind: str
    command: list[str]
    exit_code: int | None
    expect_state: str = "Complete"


# A container that waits to be visited: the demo opens a shell in it through the tunnel broker,
# runs one command, then cancels it (priority 0).
SHELL_WORKLOAD = Workload("shell", ["sh", "-c", "echo 'waiting for a visitor'; exec sleep 300"],
                          None, "Cancelled")
SHELL_COMMAND = ["sh", "-c", 'echo "hello from inside container $CRUNCHGATE_DEMO, cwd $(pwd)"']


def workload(n: int) -> list[Workload]:
    """``n`` container commands cycling through four kinds; each is unique (no container reuse)."""
    kinds = [
        lambda i: Workload("succeed", ["sh", "-c", f"echo 'container {i}: hello'; exit 0"], 0),
        lambda i: Workload("print", ["sh", "-c", f"for k in 1 2 3; do echo \"line $k from {i}\";"
                                     " done; ls / > /dev/null"], 0),
        lambda i: Workload("sleep", ["sh", "-c", f"sleep 0.{3 + i % 5}; echo 'slept {i}'"], 0),
        lambda i: Workload("fail", ["sh", "-c", f"echo 'container {i}: failing on purpose' >&2;"
                                    " exit 3"], 3),
    ]
    return [kinds[i % len(kinds)](i) for i in range(n)]


# --- setting up ---------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def crunch_run_command() -> tuple[str, list[str]]:
    """How jobs start crunch-run: this Python, so the demo works from any venv."""
    return sys.executable, ["-m", "dispatcher.crunchrun.main"]


def write_config(data: Path, controller_port: int, dispatch_port: int) -> tuple[Path, str, str]:
    """The demo cluster's config.yml; returns (path, SystemRootToken, ManagementToken)."""
    root_token = secrets.token_hex(24)
    mgmt_token = secrets.token_hex(24)
    command, args = crunch_run_command()
    controller = f"https://127.0.0.1:{controller_port}"
    cfg = {"Clusters": {CLUSTER_ID: {
        "SystemRootToken": root_token,
        "ManagementToken": mgmt_token,
        "Services": {
            "Controller": {"ExternalURL": controller, "InternalURLs": {controller: {}}},
            "DispatchLocal": {"InternalURLs": {f"http://127.0.0.1:{dispatch_port}": {}}},
        },
        "TLS": {"Insecure": True},
        "SystemLogs": {"LogLevel": "info", "Format": "json"},
        "Containers": {
            "RuntimeEngine": "local",
            "CrunchRunCommand": command,
            "CrunchRunArgumentsList": [*args, "--poll-interval=1"],
            "CloudVMs": {"PollInterval": "1s"},
            "MinRetryPeriod": "0s",
        },
        "Crunchgate": {"DataDirectory": str(data / "controller")},
    }}}
    path = data / "config.yml"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds tokens
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path, root_token, mgmt_token


@dataclass
class Child:
    """A crunchgate service the demo started."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])


def start_child(name: str, argv: list[str], log_path: Path, env: dict[str, str]) -> Child:
    """Start ``crunchgate <argv>`` with its output in ``log_path``, in its own session (so the
    terminal's Ctrl-C reaches only the demo, which then stops it in order)."""
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dispatcher.cli", *argv],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )
    return Child(name, proc, log_path)


def stop_child(child: Child, timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout_s``; by pid, our own child only."""
    if child.proc.poll() is not None:
        return
    child.proc.send_signal(signal.SIGTERM)
    try:
        child.proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        child.proc.kill()
        child.proc.wait(5)


@dataclass
class Demo:
    """State of one demo run."""

    args: argparse.Namespace
    console: Console
    data: Path = Path()
    children: list[Child] = field(default_factory=list)
    config_path: Path = Path()
    root_token: str = ""
    controller_url: str = ""
    state_dir: Path = Path()


async def wait_for_controller(demo: Demo, child: Child) -> None:
    """Until the controller answers ``api_client_authorizations/current`` (or gives up)."""
    from dispatcher.arvados.client import ArvadosClient

    deadline = time.monotonic() + START_TIMEOUT_S
    last = ""
    async with ArvadosClient(demo.controller_url, demo.root_token, insecure=True,
                             retries=0, timeout_s=5) as client:
        while time.monotonic() < deadline:
            if child.proc.poll() is not None:
                raise DemoError(
                    f"the controller exited with status {child.proc.returncode}; its log "
                    f"({child.log_path}) ends with:\n{child.tail()}")
            try:
                await client.current_token()
                return
            except Exception as exc:
                last = str(exc)
            await asyncio.sleep(0.2)
    raise DemoError(f"the controller did not answer within {START_TIMEOUT_S:.0f}s ({last}); "
                    f"see its log: {child.log_path}")


async def submit(client: Any, items: Sequence[Workload]) -> list[tuple[str, str]]:
    """Create one committed container request per item; returns (request, container) UUIDs."""
    out = []
    for i, w in enumerate(items):
        cr = await client.create("container_requests", {
            "name": f"demo {i} ({w.kind})",
            "state": "Committed",
            "priority": 500,
            "command": w.command,
            "container_image": "local",
            "cwd": "/tmp",
            "output_path": "/tmp",
            "environment": {"CRUNCHGATE_DEMO": str(i)},
            "runtime_constraints": {"vcpus": 1, "ram": 64 << 20},
        })
        if not cr.get("container_uuid"):
            raise DemoError(f"the controller created request {cr.get('uuid')} without a "
                            "container; check the controller log")
        out.append((cr["uuid"], cr["container_uuid"]))
    return out


@dataclass
class ShellVisit:
    """Open a shell in the "shell" container once it runs, run one command, cancel it."""

    demo: Demo
    client: Any
    request_uuid: str
    container_uuid: str
    task: asyncio.Task[None] | None = None
    exit_code: int | None = None
    output: str = ""
    error: str = ""

    def tick(self, records: dict[str, dict[str, Any]]) -> None:
        state = records.get(self.container_uuid, {}).get("state")
        if self.task is None and state == "Running":
            self.task = asyncio.get_running_loop().create_task(self._visit())

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.error

    async def _visit(self) -> None:
        from tunnel.client.common import ApiTarget
        from tunnel.client.shell import run_command_async

        host = self.demo.controller_url.split("://", 1)[1]
        api = ApiTarget(host, self.demo.root_token, insecure=True)
        deadline = time.monotonic() + SHELL_TIMEOUT_S
        try:
            while True:
                try:
                    # crunch-run dials the broker right after it starts the container; retry
                    # until its tunnel is up.
                    self.exit_code, self.output = await run_command_async(
                        api, self.container_uuid, SHELL_COMMAND, timeout_s=20)
                    self.error = ""
                    break
                except Exception as exc:
                    self.error = str(exc) or type(exc).__name__
                    if time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.5)
        finally:
            # Done visiting: nobody wants it any more, the dispatcher and crunch-run stop it.
            try:
                await self.client.update("container_requests", self.request_uuid,
                                         {"priority": 0})
            except Exception as exc:
                self.error = self.error or f"could not cancel the shell container: {exc}"


async def fetch(client: Any, uuids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Current records of ``uuids`` (batches of 20, as the dispatchers query)."""
    out: dict[str, dict[str, Any]] = {}
    for i in range(0, len(uuids), 20):
        batch = list(uuids[i:i + 20])
        page = await client.list(
            "containers", filters=[["uuid", "in", batch]], limit=len(batch),
            select=["uuid", "state", "exit_code", "started_at", "finished_at",
                    "runtime_status"])
        for item in page.get("items") or []:
            out[item["uuid"]] = item
    return out


def _seconds(rec: dict[str, Any]) -> float | None:
    start, end = rec.get("started_at"), rec.get("finished_at")
    if not start or not end:
        return None
    try:
        t0 = datetime.fromisoformat(str(start).replace("Z", "+00:00"))
        t1 = datetime.fromisoformat(str(end).replace("Z", "+00:00"))
    except ValueError:
        return None
    return (t1 - t0).total_seconds()


async def watch(demo: Demo, client: Any, uuids: list[str], dispatcher: Child,
                visit: ShellVisit | None = None) -> dict[str, dict[str, Any]]:
    """Show progress until every container is final; returns the final records."""
    deadline = time.monotonic() + demo.args.timeout
    records: dict[str, dict[str, Any]] = {}
    progress = Progress(
        TextColumn("[bold]containers"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.description}"), TimeElapsedColumn(), console=demo.console,
        transient=False,
    )
    with progress:
        task = progress.add_task("", total=len(uuids))
        while True:
            if dispatcher.proc.poll() is not None:
                raise DemoError(
                    f"dispatch-local exited with status {dispatcher.proc.returncode}; its log "
                    f"({dispatcher.log_path}) ends with:\n{dispatcher.tail()}")
            try:
                records = await fetch(client, uuids)
            except Exception as exc:  # the controller is busy: keep the last view
                demo.console.log(f"[yellow]could not read container states: {exc}")
            counts: dict[str, int] = {}
            for u in uuids:
                state = records.get(u, {}).get("state", "?")
                counts[state] = counts.get(state, 0) + 1
            done = sum(counts.get(s, 0) for s in FINAL)
            desc = "  ".join(f"{s} {counts[s]}" for s in
                             ("Queued", "Locked", "Running", "Complete", "Cancelled", "?")
                             if counts.get(s))
            progress.update(task, completed=done, description=desc)
            if visit is not None:
                visit.tick(records)
            if done == len(uuids):
                if visit is not None and visit.task is not None:
                    await visit.task
                return records
            if time.monotonic() > deadline:
                raise DemoError(
                    f"only {done} of {len(uuids)} containers finished within "
                    f"{demo.args.timeout:.0f}s; look at {dispatcher.log_path} and "
                    f"{demo.state_dir}/local-jobs/*.log, or rerun with a larger --timeout")
            await asyncio.sleep(0.5)


def result_table(uuids: list[str], items: list[Workload], records: dict[str, dict[str, Any]],
                 visit: ShellVisit | None = None) -> tuple[Table, int]:
    """The final table and the number of containers that ended as expected."""
    table = Table(title="crunchgate demo: containers", box=box.SIMPLE_HEAD, padding=(0, 1))
    table.add_column("#", justify="right")
    table.add_column("container UUID", no_wrap=True, min_width=27)
    table.add_column("kind", no_wrap=True)
    table.add_column("state", no_wrap=True, min_width=9)
    table.add_column("exit", justify="right")
    table.add_column("run time", justify="right")
    table.add_column("ok")
    good = 0
    for i, (u, w) in enumerate(zip(uuids, items, strict=True)):
        rec = records.get(u, {})
        state, code = rec.get("state", "?"), rec.get("exit_code")
        ok = state == w.expect_state and (w.exit_code is None or code == w.exit_code)
        if w.kind == "shell" and visit is not None:
            ok = ok and visit.ok
        good += ok
        secs = _seconds(rec)
        want = f"want {w.expect_state}" + ("" if w.exit_code is None else f", exit {w.exit_code}")
        table.add_row(
            str(i), u, w.kind, f"[green]{state}" if ok else f"[red]{state}",
            "" if code is None else str(code), "" if secs is None else f"{secs:.1f}s",
            "[green]yes" if ok else f"[red]no: {want}",
        )
    return table, good


async def run_demo(demo: Demo) -> int:
    """Set up, submit, watch, report. Raises DemoError with what to do next."""
    from dispatcher.arvados.client import ArvadosClient

    console = demo.console
    n = demo.args.containers
    if n < 1:
        raise DemoError("--containers must be at least 1")
    controller_port, dispatch_port = free_port(), free_port()
    demo.config_path, demo.root_token, _ = write_config(demo.data, controller_port,
                                                        dispatch_port)
    demo.controller_url = f"https://127.0.0.1:{controller_port}"
    demo.state_dir = demo.data / "dispatch-local"
    env = {**os.environ, "CRUNCHGATE_LOG_LEVEL": "info"}
    for k in ("ARVADOS_API_HOST", "ARVADOS_API_TOKEN", "ARVADOS_API_HOST_INSECURE"):
        env.pop(k, None)  # the services take everything from the demo's config
    console.print(f"[bold]crunchgate demo[/] — data in {demo.data}")

    controller = start_child(
        "controller", ["controller", "--config", str(demo.config_path)],
        demo.data / "controller.log", env)
    demo.children.append(controller)
    await wait_for_controller(demo, controller)
    console.print(f"controller up at {demo.controller_url} (pid {controller.proc.pid})")

    argv = ["dispatch-local", "--config", str(demo.config_path), "--state-dir",
            str(demo.state_dir)]
    if demo.args.max_jobs:
        argv += ["--max-jobs", str(demo.args.max_jobs)]
    dispatcher = start_child("dispatch-local", argv, demo.data / "dispatch-local.log", env)
    demo.children.append(dispatcher)
    console.print(f"dispatch-local started (pid {dispatcher.proc.pid})")

    shell = not demo.args.no_shell and tunnel_available()
    items = ([SHELL_WORKLOAD] if shell else []) + workload(n)
    t0 = time.monotonic()
    async with ArvadosClient(demo.controller_url, demo.root_token, insecure=True,
                             retries=3) as client:
        pairs = await submit(client, items)
        uuids = [c for _, c in pairs]
        console.print(f"submitted {len(items)} container requests"
                      + (" (one waits for a shell session)" if shell else ""))
        visit = ShellVisit(demo, client, *pairs[0]) if shell else None
        records = await watch(demo, client, uuids, dispatcher, visit)
        elapsed = time.monotonic() - t0
        table, good = result_table(uuids, items, records, visit)
        console.print(table)
        if visit is not None:
            show_visit(console, visit)
        await show_output(console, client, uuids, items)
    n = len(items)
    failed_on_purpose = sum(1 for w in items if w.exit_code not in (0, None))
    succeeded = sum(1 for w in items if w.exit_code == 0)
    style = "green" if good == n else "red"
    console.print(
        f"[bold {style}]{good} of {n} containers finished as expected[/] "
        f"({succeeded} exit 0, {failed_on_purpose} exit 3 on purpose"
        + (", 1 cancelled after a shell session" if shell else "")
        + f") in {elapsed:.1f}s")
    return 0 if good == n else 1


def tunnel_available() -> bool:
    """The shell step needs the tunnel package (the controller hosts the broker)."""
    try:
        import tunnel.client.shell  # noqa: F401
    except ImportError:
        return False
    return True


def show_visit(console: Console, visit: ShellVisit) -> None:
    """What the shell session through the tunnel did."""
    cmd = " ".join(SHELL_COMMAND[:2]) + f" '{SHELL_COMMAND[2]}'"
    if visit.ok:
        console.print(f"shell into {visit.container_uuid} through the tunnel broker: "
                      f"[dim]{cmd}[/] -> exit 0", highlight=False)
        for line in visit.output.strip().splitlines()[:5]:
            console.print(f"  [dim]{line}[/]", highlight=False)
    else:
        console.print(f"[red]shell into {visit.container_uuid} failed[/]: "
                      f"{visit.error or f'exit {visit.exit_code}'}; see {visit.demo.data}/"
                      "controller.log (run with --no-shell to skip this step)", highlight=False)


async def show_output(console: Console, client: Any, uuids: list[str],
                      items: list[Workload]) -> None:
    """What the first "print" container wrote on stdout (from its log records)."""
    for u, w in zip(uuids, items, strict=True):
        if w.kind != "print":
            continue
        try:
            page = await client.list("logs", filters=[["object_uuid", "=", u],
                                                      ["event_type", "=", "stdout"]], limit=50)
        except Exception:
            return  # only a nicety: the table already says how it ended
        text = "".join(str((e.get("properties") or {}).get("text", ""))
                       for e in page.get("items") or [])
        if text.strip():
            console.print(f"stdout of container {u} ({w.kind}):")
            for line in text.strip().splitlines()[:10]:
                console.print(f"  [dim]{line}[/]", highlight=False)
        return


def stop_jobs(demo: Demo) -> None:
    """SIGTERM every local job still running (crunch-run then cancels its container)."""
    from dispatcher.config import load_config
    from dispatcher.local.backend import LocalBackend

    if not demo.state_dir.is_dir() or not demo.config_path.is_file():
        return

    async def go() -> None:
        backend = LocalBackend(load_config(demo.config_path), demo.state_dir, job_env={},
                               start_jobs=False)
        jobs = await backend.list_jobs()
        for name, job in jobs.items():
            await backend.cancel(name, job)
        deadline = time.monotonic() + 15
        while jobs and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            jobs = {k: v for k, v in (await backend.list_jobs()).items() if not v.pending}

    try:
        asyncio.run(go())
    except Exception as exc:
        demo.console.print(f"[yellow]could not stop the remaining jobs: {exc}")


def cleanup(demo: Demo) -> None:
    """Stop the dispatcher, then leftover jobs (they report to the controller), then the rest."""
    by_name = {c.name: c for c in demo.children}
    if "dispatch-local" in by_name:
        stop_child(by_name["dispatch-local"])
    stop_jobs(demo)
    for child in reversed(demo.children):
        stop_child(child)


def print_keep_instructions(demo: Demo) -> None:
    pids = " ".join(str(c.proc.pid) for c in demo.children)
    host = demo.controller_url.split("://", 1)[1]
    demo.console.print(
        "\n[bold]Left running:[/]\n"
        f"  controller      {demo.controller_url}\n"
        f"  config          {demo.config_path}\n"
        f"  logs            {demo.data}/controller.log, {demo.data}/dispatch-local.log\n\n"
        "Use it with the Arvados SDK or the API:\n"
        f"  export ARVADOS_API_HOST={host}\n"
        f"  export ARVADOS_API_TOKEN={demo.root_token}\n"
        "  export ARVADOS_API_HOST_INSECURE=1\n"
        "  crunchgate shell <container UUID>    # a shell in a running container\n\n"
        f"Stop it with:\n  kill {pids}\n"
    )


def run(args: argparse.Namespace) -> int:
    """Entry point of ``crunchgate demo``."""
    console = Console()
    demo = Demo(args, console)
    if args.data:
        demo.data = Path(args.data).resolve()
        demo.data.mkdir(parents=True, exist_ok=True)
    else:
        demo.data = Path(tempfile.mkdtemp(prefix="crunchgate-demo-"))
    keep = False
    status = 1
    try:
        status = asyncio.run(run_demo(demo))
        keep = args.keep
        return status
    except DemoError as exc:
        console.print(f"[bold red]demo failed:[/] {exc}")
        return 1
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: stopping everything the demo started")
        status = 130
        return 130
    finally:
        if keep:
            print_keep_instructions(demo)
        else:
            cleanup(demo)
            if status == 0 and not args.data:
                shutil.rmtree(demo.data, ignore_errors=True)
            else:
                console.print(f"config and logs kept in {demo.data}")
