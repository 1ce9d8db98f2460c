"""``crunchgate dispatch-slurm --config FILE``: drop-in replacement for crunch-dispatch-slurm.

Runs the shared dispatch loop (:mod:`dispatcher.core.loop`) with :class:`SlurmBackend`, and --
when ``Services.DispatchSLURM.InternalURLs`` is configured -- serves ``/_health/ping`` and
``/metrics`` there (Bearer ManagementToken).

Jobs get ``ARVADOS_API_HOST`` / ``ARVADOS_API_TOKEN`` / ``ARVADOS_API_HOST_INSECURE`` and
``Containers.SLURM.SbatchEnvironmentVariables`` through sbatch's process environment (Slurm
exports it to the job); the token is never written into the job script.

How a job ended badly (NODE_FAIL, TIMEOUT, OUT_OF_MEMORY, PREEMPTED ... as ``squeue -t all``
still shows it for ``MinJobAge``) is recorded on the container: a ``dispatch`` log record, and
``runtime_status.errorDetail`` when the container was still Running under our lock -- before
the loop cancels it for having lost its job (with its own one-line ``runtime_status.error``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from typing import Any

from dispatcher import fastloop
from dispatcher.config import ClusterConfig, ConfigError, load_config
from dispatcher.logs import register_secret, setup_logging
from dispatcher.slurm.legacy import DEFAULT_LEGACY_PATH, is_cluster_config, load_legacy_config

log = logging.getLogger("crunchgate.slurm")

SERVICE = "DispatchSLURM"
DEFAULT_CONFIG = "/etc/arvados/config.yml"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Options of ``crunchgate dispatch-slurm``.

    The original's Go-style single-dash spellings (``-config``,
    ``-legacy-crunch-dispatch-slurm-config``, ``-skip-legacy``) are accepted too, so a systemd
    unit written for crunch-dispatch-slurm works unchanged.
    """
    parser.add_argument("--config", "-config", default=None,
                        help="cluster config file (default: $ARVADOS_CONFIG or "
                        f"{DEFAULT_CONFIG}); a file without 'Clusters:' is read as the legacy "
                        "crunch-dispatch-slurm.yml, as the original does")
    parser.add_argument("--cluster", default=None, help="cluster ID, if the file has several")
    parser.add_argument(
        "--legacy-crunch-dispatch-slurm-config", "-legacy-crunch-dispatch-slurm-config",
        dest="legacy_config", default=None, metavar="FILE",
        help="legacy standalone crunch-dispatch-slurm.yml whose keys are laid over the "
        f"cluster config (default: {DEFAULT_LEGACY_PATH}, if it exists; '' for none)")
    parser.add_argument("--skip-legacy", "-skip-legacy", action="store_true",
                        help="do not load any legacy config file")


def load_dispatch_config(args: argparse.Namespace) -> tuple[ClusterConfig, list[str]]:
    """The cluster config with the legacy crunch-dispatch-slurm.yml (if any) laid over it,
    and the warnings to log once logging is set up."""
    notes: list[str] = []
    default_config = os.environ.get("ARVADOS_CONFIG") or DEFAULT_CONFIG
    config_path = args.config or default_config
    legacy_path: str | None = args.legacy_config
    explicit = legacy_path is not None
    if args.config and legacy_path is None and not is_cluster_config(args.config):
        # The original's MungeLegacyConfigArgs: -config pointing at a legacy file.
        notes.append(f"{args.config} is not a cluster config file -- interpreting --config as "
                     "--legacy-crunch-dispatch-slurm-config (please migrate your config!)")
        legacy_path, explicit, config_path = args.config, True, default_config
    cfg = load_config(config_path, args.cluster)
    if args.skip_legacy or legacy_path == "":
        return cfg, notes
    path = legacy_path or DEFAULT_LEGACY_PATH
    warnings = load_legacy_config(cfg, path, explicit=explicit)
    if warnings is not None:
        notes.append(f"loaded legacy crunch-dispatch-slurm config {path}: move its keys into "
                     f"{config_path} and remove it (docs/slurm.md lists the mapping)")
        notes += warnings
    return cfg, notes


class JobEndRecorder:
    """Writes how a container's Slurm job ended onto the container (the backend's
    ``on_job_ended`` hook)."""

    def __init__(self, client: Any, my_token_uuid: Any) -> None:
        self.client = client
        self._my_token_uuid = my_token_uuid  # callable: the loop learns it at start

    async def __call__(self, uuid: str, text: str, row: Any) -> None:
        ctr = await self.client.get("containers", uuid)
        mine = ctr.get("locked_by_uuid") and ctr.get("locked_by_uuid") == self._my_token_uuid()
        state = ctr.get("state")
        if not mine or state not in ("Locked", "Running"):
            return  # finished normally, or not ours: nothing to explain
        log.warning("%s", text, extra={"container_uuid": uuid, "job_id": row.job_id})
        if state == "Running":
            # errorDetail survives the loop's own one-line "error" when it then cancels the
            # container for having lost its job.
            status = dict(ctr.get("runtime_status") or {})
            status["error"] = text
            status["errorDetail"] = text
            await self.client.update("containers", uuid, {"runtime_status": status})
        await self.client.create_log(uuid, "dispatch", text=text)


async def serve(cfg: ClusterConfig) -> int:
    """Run the dispatch loop and the health/metrics endpoint until SIGTERM/SIGINT."""
    from dispatcher.metrics import new_registry
    from dispatcher.slurm.backend import SlurmBackend

    registry = new_registry()
    holder: dict[str, Dispatcher] = {}
    recorder = JobEndRecorder(None, lambda: holder["d"].my_token_uuid if holder else "")
    backend = SlurmBackend(cfg, registry=registry, on_job_ended=recorder)
    await backend.start()
    # The first squeue runs while the API client (aiohttp: ~0.1 s) is imported: a restart with
    # a backlog submits its first jobs that much sooner.
    await backend.prefetch_jobs()
    from dispatcher.arvados.client import ArvadosClient
    from dispatcher.core.loop import Dispatcher

    client = ArvadosClient.from_config(cfg, retries=2)
    recorder.client = client
    dispatcher = Dispatcher(cfg, client, backend, registry=registry)
    holder["d"] = dispatcher

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    tasks = [asyncio.create_task(dispatcher.run(stop), name="dispatch-loop")]
    if cfg.services.dispatch_slurm.internal_urls:
        # The loop sends its first requests before the web service is even imported: a burst
        # of queued containers starts ~0.1 s sooner.
        await asyncio.sleep(0)
        from dispatcher.service import create_service_app, run_service, set_health_check

        app = create_service_app(cfg, SERVICE, registry)

        def health() -> str | None:
            # Unhealthy after several failed polls in a row (controller or squeue down).
            if dispatcher.consecutive_failures >= 3 and dispatcher.last_poll is not None:
                return "; ".join(dispatcher.last_poll.errors[-3:]) or "polls are failing"
            return None

        set_health_check(app, health)
        tasks.append(asyncio.create_task(run_service(app, cfg, SERVICE, stop=stop),
                                         name="http"))
    log.info("crunchgate dispatch-slurm started", extra={"fields": {
        "poll_interval_s": cfg.containers.cloud_vms.poll_interval_s,
        "submit_concurrency": cfg.crunchgate.submit_concurrency,
        "command_timeout_s": cfg.crunchgate.command_timeout_s,
    }})
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
    """Entry point of ``crunchgate dispatch-slurm``."""
    try:
        cfg, notes = load_dispatch_config(args)
    except (ConfigError, OSError) as exc:
        print(f"crunchgate dispatch-slurm: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg.system_logs.log_level, cfg.system_logs.format, cfg.cluster_id)
    for note in notes:
        log.warning("%s", note)
    register_secret(cfg.system_root_token)
    register_secret(cfg.management_token)
    if not cfg.system_root_token:
        print("crunchgate dispatch-slurm: SystemRootToken is not set in the config; the "
              "dispatcher and its jobs need it", file=sys.stderr)
        return 2
    try:
        return fastloop.run(serve(cfg))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        log.error("dispatch-slurm stopped: %s", exc)
        print(f"crunchgate dispatch-slurm: {exc}", file=sys.stderr)
        return 1
