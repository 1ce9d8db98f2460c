"""``crunchgate dispatch-local --config FILE [--state-dir DIR]``: run containers as local
processes, with the same dispatch loop as the Slurm and LSF dispatchers.

Jobs get ``ARVADOS_API_HOST`` / ``ARVADOS_API_TOKEN`` / ``ARVADOS_API_HOST_INSECURE`` in their
process environment (reference 3.1: the token is never written into the job script). When
``Services.DispatchLocal.InternalURLs`` is configured, ``/_health/ping`` and ``/metrics`` are
served there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from urllib.parse import urlsplit

from dispatcher import fastloop
from dispatcher.config import ClusterConfig, ConfigError, controller_url, load_config
from dispatcher.logs import register_secret, setup_logging

log = logging.getLogger("crunchgate.local")

SERVICE = "DispatchLocal"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Options of ``crunchgate dispatch-local``."""
    parser.add_argument("--config", metavar="FILE",
                        default=os.environ.get("ARVADOS_CONFIG", "/etc/arvados/config.yml"),
                        help="cluster config file (default: %(default)s)")
    parser.add_argument("--cluster", default=None, help="cluster ID, if the file has several")
    parser.add_argument("--state-dir", default=None, metavar="DIR",
                        help="where job records and output live "
                        "(default: <Crunchgate.DataDirectory>/dispatch-local)")
    parser.add_argument("--max-jobs", type=int, default=None, metavar="N",
                        help="how many jobs may run at once (default: 2 x CPU cores)")


def job_environment(cfg: ClusterConfig, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every job process: ours plus the API credentials crunch-run uses."""
    env = dict(os.environ if base is None else base)
    url = controller_url(cfg)
    parts = urlsplit(url if "://" in url else f"https://{url}")
    env["ARVADOS_API_HOST"] = parts.netloc
    env["ARVADOS_API_TOKEN"] = cfg.system_root_token
    env["ARVADOS_API_HOST_INSECURE"] = "1" if cfg.tls.insecure else ""
    return env


def state_directory(cfg: ClusterConfig, explicit: str | None) -> Path:
    """``--state-dir``, else ``<Crunchgate.DataDirectory>/dispatch-local``."""
    if explicit:
        return Path(explicit)
    if cfg.crunchgate.data_directory:
        return Path(cfg.crunchgate.data_directory) / "dispatch-local"
    raise ConfigError(
        f"Clusters.{cfg.cluster_id}.Crunchgate.DataDirectory is not set: set it, or pass "
        "--state-dir DIR (where dispatch-local keeps its job records)"
    )


async def serve(cfg: ClusterConfig, state_dir: Path, max_jobs: int | None) -> int:
    """Run the dispatch loop (and the health/metrics endpoint) until SIGTERM/SIGINT."""
    from dispatcher.arvados.client import ArvadosClient
    from dispatcher.core.loop import Dispatcher
    from dispatcher.local.backend import LocalBackend
    from dispatcher.metrics import new_registry

    registry = new_registry()
    env = job_environment(cfg)
    # crunch-run's per-container lock files: beside our job records unless the site chose.
    env.setdefault("CRUNCH_RUN_LOCK_DIR", str(state_dir / "locks"))
    backend = LocalBackend(cfg, state_dir, job_env=env, max_jobs=max_jobs)
    await backend.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    client = ArvadosClient.from_config(cfg, retries=2)
    dispatcher = Dispatcher(cfg, client, backend, registry=registry)
    tasks = [asyncio.create_task(dispatcher.run(stop), name="dispatch-loop")]
    if cfg.services.dispatch_local.internal_urls:
        from dispatcher.service import create_service_app, run_service, set_health_check

        app = create_service_app(cfg, SERVICE, registry)

        def health() -> str | None:
            # Unhealthy after several failed polls in a row (controller or job listing down).
            if dispatcher.consecutive_failures >= 3 and dispatcher.last_poll is not None:
                return "; ".join(dispatcher.last_poll.errors[-3:]) or "polls are failing"
            return None

        set_health_check(app, health)
        tasks.append(asyncio.create_task(run_service(app, cfg, SERVICE, stop=stop),
                                         name="http"))
    log.info("crunchgate dispatch-local started", extra={"fields": {
        "state_dir": str(state_dir), "max_jobs": backend.max_jobs}})
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            if t.exception() is not None:
                stop.set()
                raise t.exception()  # type: ignore[misc]
        await asyncio.gather(*tasks)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await backend.close()
        await client.close()
    return 0


def run(args: argparse.Namespace) -> int:
    """Entry point of ``crunchgate dispatch-local``."""
    try:
        cfg = load_config(args.config, args.cluster)
        state_dir = state_directory(cfg, args.state_dir)
    except (ConfigError, OSError) as exc:
        print(f"crunchgate dispatch-local: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg.system_logs.log_level, cfg.system_logs.format, cfg.cluster_id)
    register_secret(cfg.system_root_token)
    register_secret(cfg.management_token)
    try:
        return fastloop.run(serve(cfg, state_dir, args.max_jobs))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        log.error("dispatch-local stopped: %s", exc)
        print(f"crunchgate dispatch-local: {exc}", file=sys.stderr)
        return 1
