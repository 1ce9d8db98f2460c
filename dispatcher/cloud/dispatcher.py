"""The cloud dispatcher service: queue + scheduler + pool + driver + management API, wired as
reference 5.2 describes.

    disp = CloudDispatcher(cfg)
    await disp.run(stop_event)        # until stop is set

Startup order: API client and InstanceSetID (from SystemRootToken), dispatch key, driver (with
the metrics / rate-limit / default-tag wrappers), pool (cloud listing at once, probes), queue
(first poll retried until it works), stale-lock fixing, then the scheduler loop. The HTTP
server (health, metrics, management API) serves ``Services.DispatchCloud.InternalURLs``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import urlsplit

from dispatcher.cloud.clock import Clock
from dispatcher.cloud.drivers import InstanceSet, new_instance_set
from dispatcher.cloud.drivers.base import Executor, Instance
from dispatcher.cloud.drivers.wrap import wrap_instance_set
from dispatcher.cloud.errors import ConfigurationError
from dispatcher.cloud.metrics import CloudMetrics
from dispatcher.cloud.pool import Pool, instance_set_id
from dispatcher.cloud.queue import ContainerQueue
from dispatcher.cloud.scheduler import Scheduler
from dispatcher.cloud.sshexec import SSHExecutor, load_private_key, public_key_openssh
from dispatcher.config import ClusterConfig, controller_url
from dispatcher.logs import register_secret

log = logging.getLogger("crunchgate.cloud")

SERVICE = "DispatchCloud"


def crunch_run_api_host(cfg: ClusterConfig) -> str:
    """``ARVADOS_API_HOST`` for crunch-run: ``host:port`` (a full URL only for plain http)."""
    url = controller_url(cfg)
    parts = urlsplit(url if "://" in url else f"https://{url}")
    if parts.scheme == "http":
        return f"http://{parts.netloc}"
    return parts.netloc


def runner_binary(cfg: ClusterConfig) -> bytes | None:
    """The runner to deploy, or None to use ``Containers.CrunchRunCommand`` as installed.

    The reference deploys its own executable (``/proc/self/exe``). For crunchgate that would be
    the Python interpreter, which cannot run crunch-run by itself, so the default value means
    "do not deploy" here; set ``DeployRunnerBinary`` to a self-contained crunch-run (e.g. a
    zipapp) to have it copied to every worker.
    """
    path = cfg.containers.cloud_vms.deploy_runner_binary
    if not path or path == "/proc/self/exe":
        return None
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise ConfigurationError(
            f"Containers.CloudVMs.DeployRunnerBinary: cannot read {path}: {exc.strerror}; set it "
            "to \"\" to use Containers.CrunchRunCommand on the workers") from None


class CloudDispatcher:
    """See the module docstring. ``instance_set``/``client`` may be injected (tests)."""

    def __init__(
        self,
        cfg: ClusterConfig,
        *,
        registry: Any = None,
        clock: Clock | None = None,
        instance_set: InstanceSet | None = None,
        client: Any = None,
    ) -> None:
        self.cfg = cfg
        self.clock = clock or Clock()
        self.metrics = CloudMetrics(registry)
        register_secret(cfg.system_root_token)
        self.set_id = instance_set_id(cfg.system_root_token)
        self.key = load_private_key(cfg.containers.dispatch_private_key)
        vms = cfg.containers.cloud_vms
        public_key = public_key_openssh(self.key) if vms.deploy_public_key else None
        inner = instance_set or new_instance_set(cfg, self.set_id, logger=log,
                                                 registry=self.metrics)
        self.instance_set = wrap_instance_set(inner, cfg, self.metrics, self.clock)
        if client is None:
            from dispatcher.arvados.client import ArvadosClient

            # The dispatcher's own loops retry; a quick failure beats a 25-minute call.
            client = ArvadosClient.from_config(cfg, retries=1, timeout_s=60)
        self.client = client
        self.pool = Pool(cfg, self.instance_set, self._executor, set_id=self.set_id,
                         clock=self.clock, metrics=self.metrics, public_key=public_key,
                         runner_data=runner_binary(cfg), api_host=crunch_run_api_host(cfg))
        self.queue = ContainerQueue(cfg, client, clock=self.clock)
        self.scheduler = Scheduler(cfg, self.queue, self.pool, clock=self.clock,
                                   metrics=self.metrics, last_503=lambda: self.queue.last_503)
        self.ready = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []

    def _executor(self, inst: Instance, pool: Pool) -> Executor:
        prefix = self.cfg.containers.cloud_vms.tag_key_prefix
        ex = SSHExecutor(inst, self.key, default_port=self.cfg.containers.cloud_vms.ssh_port)
        ex.secret = lambda: ex.instance.tags.get(prefix + "InstanceSecret", "")
        return ex

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set."""
        poll = self.cfg.containers.cloud_vms.poll_interval_s or 10.0
        self.pool.start()
        try:
            first = asyncio.create_task(self.queue.first_update(poll))
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait([first, stopper], return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set():
                first.cancel()
                return
            self._tasks.append(asyncio.create_task(self.queue.run(poll), name="queue"))
            unlocked = await self._fix_stale_locks(stop)
            if unlocked:
                log.info("unlocked %d stale locked containers", unlocked)
            self._tasks.append(asyncio.create_task(self.scheduler.run(), name="scheduler"))
            self.ready.set()
            log.info("cloud dispatcher started (instance set %s, driver %s)", self.set_id,
                     self.cfg.containers.cloud_vms.driver)
            await stop.wait()
            stopper.cancel()
        finally:
            await self.close()

    async def _fix_stale_locks(self, stop: asyncio.Event) -> int:
        timeout = self.cfg.containers.stale_lock_timeout_s or 60.0
        fix = asyncio.create_task(self.scheduler.fix_stale_locks(self.pool.wait_loaded, timeout))
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait([fix, stopper], return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if not fix.done():
            fix.cancel()
            return 0
        try:
            return fix.result()
        except Exception as exc:
            log.warning("fixing stale locks failed: %s", exc)
            return 0

    def health(self) -> str | None:
        """Health check for /_health/ping: the runner must be loadable."""
        try:
            runner_binary(self.cfg)
        except ConfigurationError as exc:
            return str(exc)
        return None

    async def close(self) -> None:
        """Stop loops and close connections; instances keep running (re-adopted on restart)."""
        self.scheduler.stopped = True
        self.queue.stopped = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.scheduler.stop()
        await self.queue.stop()
        await self.pool.stop()
        await self.instance_set.stop()
        close = getattr(self.client, "close", None)
        if close is not None:
            await close()

