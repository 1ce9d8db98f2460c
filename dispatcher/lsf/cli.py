"""``crunchgate dispatch-lsf --config FILE``: drop-in replacement for arvados-dispatch-lsf.

Reads the cluster config (``Containers.LSF.*`` and the shared dispatch keys), then runs the
shared dispatch loop with :class:`dispatcher.lsf.backend.LsfBackend`. When
``Services.DispatchLSF.InternalURLs`` is configured, ``/_health/ping`` and ``/metrics`` (Bearer
``ManagementToken``) are served there.

The LSF client commands (``bsub``, ``bjobs``, ``bkill``) must be on the service's PATH with
LSF's environment (``LSF_ENVDIR`` ...) -- typically by sourcing ``profile.lsf`` in the unit's
environment; see ``contrib/systemd/crunchgate-dispatch-lsf.service`` and ``docs/lsf.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys

from dispatcher import fastloop
from dispatcher.config import ClusterConfig, ConfigError, load_config
from dispatcher.logs import register_secret, setup_logging

log = logging.getLogger("crunchgate.lsf")

SERVICE = "DispatchLSF"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Options of ``crunchgate dispatch-lsf``.

    ``-config`` (arvados-dispatch-lsf's Go-style spelling) is accepted too, so an existing
    systemd unit's command line only needs its program name changed.
    """
    parser.add_argument("--config", "-config",
                        default=os.environ.get("ARVADOS_CONFIG", "/etc/arvados/config.yml"),
                        help="cluster config file (default: %(default)s)")
    parser.add_argument("--cluster", default=None, help="cluster ID, if the file has several")


async def serve(cfg: ClusterConfig) -> int:
    """Run the dispatch loop (and the health/metrics endpoint) until SIGTERM/SIGINT."""
    from dispatcher.arvados.client import ArvadosClient
    from dispatcher.core.loop import Dispatcher
    from dispatcher.lsf.backend import LsfBackend
    from dispatcher.metrics import new_registry

    registry = new_registry()
    backend = LsfBackend(cfg, registry=registry)
    await backend.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    client = ArvadosClient.from_config(cfg)
    dispatcher = Dispatcher(cfg, client, backend, registry=registry)
    tasks = [asyncio.create_task(dispatcher.run(stop), name="dispatch-loop")]
    if cfg.services.dispatch_lsf.internal_urls:
        from dispatcher.service import create_service_app, run_service, set_health_check

        app = create_service_app(cfg, SERVICE, registry)

        def health() -> str | None:
            # Unhealthy after several failed polls in a row (controller or bjobs down).
            if dispatcher.consecutive_failures >= 3 and dispatcher.last_poll is not None:
                return "; ".join(dispatcher.last_poll.errors[-3:]) or "polls are failing"
            return None

        set_health_check(app, health)
        tasks.append(asyncio.create_task(run_service(app, cfg, SERVICE, stop=stop),
                                         name="http"))
    log.info("crunchgate dispatch-lsf started", extra={"fields": {
        "sudo_user": cfg.containers.lsf.bsub_sudo_user,
        "poll_interval_s": cfg.containers.cloud_vms.poll_interval_s}})
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            exc = t.exception()
            if exc is not None:
                stop.set()
                raise exc
        await asyncio.gather(*tasks)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await backend.close()
        await client.close()
    return 0


def run(args: argparse.Namespace) -> int:
    """Entry point of ``crunchgate dispatch-lsf``."""
    try:
        cfg = load_config(args.config, args.cluster)
    except (ConfigError, OSError) as exc:
        print(f"crunchgate dispatch-lsf: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg.system_logs.log_level, cfg.system_logs.format, cfg.cluster_id)
    register_secret(cfg.system_root_token)
    register_secret(cfg.management_token)
    try:
        return fastloop.run(serve(cfg))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        log.error("dispatch-lsf stopped: %s", exc)
        print(f"crunchgate dispatch-lsf: {exc}", file=sys.stderr)
        return 1
