"""``crunchgate dispatch-cloud``: the cloud dispatcher service and its instance commands.

    crunchgate dispatch-cloud --config FILE                     # run the service
    crunchgate dispatch-cloud instances [--tsv [--header]]      # list instances (a table)
    crunchgate dispatch-cloud hold|drain|run ID...              # set idle behavior
    crunchgate dispatch-cloud kill [--reason TEXT] ID...        # destroy now

The instance commands talk to every ``Services.DispatchCloud.InternalURLs`` entry with the
``ManagementToken`` (as ``arvados-server instance ...`` does). ``--tsv`` prints the reference's
tab-separated columns (``-`` for empty values) instead of a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from dispatcher import fastloop
from dispatcher.config import ClusterConfig, ConfigError, load_config
from dispatcher.logs import register_secret, setup_logging

log = logging.getLogger("crunchgate.cloud")

# Another dispatch-cloud of this cluster runs on this host (EX_TEMPFAIL: systemd's
# Restart=always retries, so the unit takes over once the other one stops).
EXIT_ALREADY_RUNNING = 75

COLUMNS = ["instance", "address", "state", "idle-behavior", "config-type", "provider-type",
           "price", "running-containers"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Options of ``crunchgate dispatch-cloud``."""
    default_config = os.environ.get("ARVADOS_CONFIG", "/etc/arvados/config.yml")
    parser.add_argument("--config", default=default_config,
                        help="cluster config file (default: %(default)s)")
    parser.add_argument("--cluster", default=None, help="cluster ID, if the file has several")
    sub = parser.add_subparsers(dest="action", metavar="{instances,hold,drain,run,kill}")
    lst = sub.add_parser("instances", help="list the dispatcher's instances")
    lst.add_argument("--tsv", action="store_true", help="tab-separated output (scripts)")
    lst.add_argument("--header", "-header", action="store_true",
                     help="with --tsv: print a header line")
    for name in ("hold", "drain", "run", "kill"):
        p = sub.add_parser(name, help=f"{name} the given instances")
        p.add_argument("ids", nargs="*", metavar="ID")
        if name == "kill":
            p.add_argument("--reason", "-reason", default="", help="logged by the dispatcher")
    for p in (lst, *[sub.choices[n] for n in ("hold", "drain", "run", "kill")]):
        p.add_argument("--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        p.add_argument("--cluster", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _urls(cfg: ClusterConfig) -> list[str]:
    return [u.rstrip("/") for u in cfg.services.dispatch_cloud.internal_urls]


def _request(cfg: ClusterConfig, base: str, method: str, path: str,
             params: dict[str, str] | None = None) -> tuple[int, bytes]:
    url = base + path
    if params:
        url += "?" + urllib.parse.urlencode(params)
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None,
                                 headers={"Authorization": f"Bearer {cfg.management_token}"})
    ctx = None
    if url.startswith("https"):
        ctx = ssl.create_default_context()
        if cfg.tls.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(req, timeout=30, context=ctx) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _fmt_row(item: dict[str, Any]) -> list[str]:
    return [
        item.get("instance") or "-",
        item.get("address") or "-",
        item.get("worker_state") or "-",
        item.get("idle_behavior") or "-",
        item.get("arvados_instance_type") or "-",
        item.get("provider_instance_type") or "-",
        f"{float(item.get('price') or 0):f}",
        ",".join(item.get("running_container_uuids") or []) or "-",
    ]


def list_instances(cfg: ClusterConfig, tsv: bool, header: bool) -> int:
    rows: list[list[str]] = []
    ok = False
    for base in _urls(cfg):
        try:
            status, body = _request(cfg, base, "GET", "/arvados/v1/dispatch/instances")
        except OSError as exc:
            print(f"{base}: {exc}", file=sys.stderr)
            continue
        if status != 200:
            print(f"{base}: HTTP {status}: {body.decode(errors='replace').strip()}",
                  file=sys.stderr)
            continue
        ok = True
        rows.extend(_fmt_row(i) for i in json.loads(body).get("items") or [])
    if not ok:
        return 1
    if tsv:
        if header:
            print("\t".join(COLUMNS))
        for r in rows:
            print("\t".join(r))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="crunchgate dispatch-cloud instances")
    for c in COLUMNS:
        table.add_column(c, justify="right" if c == "price" else "left")
    for r in rows:
        table.add_row(*r)
    Console().print(table)
    return 0


def instance_action(cfg: ClusterConfig, action: str, ids: list[str], reason: str) -> int:
    if not ids:
        print(f"crunchgate dispatch-cloud {action}: no instance IDs given", file=sys.stderr)
        return 2
    failed = False
    for iid in ids:
        good = False
        for base in _urls(cfg):
            params = {"instance_id": iid}
            if action == "kill":
                params["reason"] = reason
            try:
                status, _ = _request(cfg, base, "POST", f"/arvados/v1/dispatch/instances/{action}",
                                     params)
            except OSError as exc:
                print(f"{iid}: {exc} ({base})", file=sys.stderr)
                continue
            phrase = {200: "OK", 404: "Not Found", 401: "Unauthorized",
                      403: "Forbidden"}.get(status, "")
            print(f"{iid}: {status} {phrase} ({urllib.parse.urlsplit(base).netloc})".rstrip(),
                  file=sys.stderr)
            good = good or status == 200
        failed = failed or not good
    return 1 if failed else 0


async def serve(cfg: ClusterConfig, config_path: str) -> int:
    """Run the dispatcher and its HTTP endpoint until SIGTERM/SIGINT."""
    import contextlib
    import signal

    from dispatcher.cloud.dispatcher import SERVICE, CloudDispatcher
    from dispatcher.cloud.mgmt import add_management_routes
    from dispatcher.metrics import new_registry
    from dispatcher.service import create_service_app, run_service, set_health_check

    registry = new_registry()
    disp = CloudDispatcher(cfg, registry=registry)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.create_task(disp.run(stop), name="dispatch-cloud")]
    if cfg.services.dispatch_cloud.internal_urls:
        app = create_service_app(cfg, SERVICE, registry, config_path=config_path)
        set_health_check(app, disp.health)
        add_management_routes(app, disp, cfg.management_token)
        tasks.append(asyncio.create_task(run_service(app, cfg, SERVICE, stop=stop), name="http"))
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            if t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
        await asyncio.gather(*tasks)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    return 0


def run(args: argparse.Namespace) -> int:
    """Entry point of ``crunchgate dispatch-cloud``."""
    from dispatcher.cloud.errors import CloudError

    try:
        cfg = load_config(args.config, args.cluster)
    except (ConfigError, OSError) as exc:
        print(f"crunchgate dispatch-cloud: {exc}", file=sys.stderr)
        return 2
    register_secret(cfg.system_root_token)
    register_secret(cfg.management_token)
    if args.action == "instances":
        return list_instances(cfg, args.tsv, args.header)
    if args.action in ("hold", "drain", "run", "kill"):
        return instance_action(cfg, args.action, args.ids, getattr(args, "reason", ""))
    if cfg.containers.cloud_vms.driver == "loopback" and not cfg.instance_types:
        from dispatcher.cloud.drivers.loopback import localhost_type

        it = localhost_type()
        cfg.instance_types = {it.name: it}
    setup_logging(cfg.system_logs.log_level, cfg.system_logs.format, cfg.cluster_id)
    # Instead of the reference's PostgreSQL advisory lock: one dispatch-cloud per cluster on
    # this host (two would lock, start and unlock the same containers and adopt each other's
    # VMs).
    from dispatcher.hostlock import AlreadyRunning, HostLock

    guard = HostLock(cfg.cluster_id, "dispatch-cloud")
    try:
        guard.acquire()
    except AlreadyRunning as exc:
        log.error("%s", exc)
        print(f"crunchgate dispatch-cloud: {exc}", file=sys.stderr)
        return EXIT_ALREADY_RUNNING
    except OSError as exc:
        print(f"crunchgate dispatch-cloud: cannot take the lock file {guard.path}: {exc} "
              "(set CRUNCHGATE_LOCK_DIR to a writable directory)", file=sys.stderr)
        return 2
    try:
        return fastloop.run(serve(cfg, args.config))
    except KeyboardInterrupt:
        return 130
    except CloudError as exc:
        print(f"crunchgate dispatch-cloud: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        log.error("dispatch-cloud stopped: %s", exc)
        print(f"crunchgate dispatch-cloud: {exc}", file=sys.stderr)
        return 1
    finally:
        guard.release()
