"""The crunch-run supervisor: one container, from Locked to Complete or Cancelled.

Life of a container (reference dispatch.md 1.2–1.4):

1. Fetch it; refuse unless it is ``Locked`` ("dispatch error detected: ...", exit 1).
2. Prepare: scratch directory, runtime (local/docker/singularity), environment, cwd. A container
   that this runtime can never run (bad image, NUL bytes...) is finished as ``Cancelled`` with
   ``runtime_status.error`` (allowed for the lock holder while Locked); any other failure before
   ``Running`` (API error, runtime missing on this node, a stop signal) puts it back to
   ``Queued``, which the server counts toward MaxDispatchAttempts.
3. ``Locked -> Running``; start the process; start the container gateway if a secret was given;
   stream stdout/stderr to ``logs`` records through :class:`~.logsink.LogSink`.
4. While it runs: poll the record every ``poll_interval_s`` (priority 0 or Cancelled -> stop),
   enforce ``scheduling_parameters.max_run_time``, and stop on SIGTERM/SIGINT. Stopping is TERM to
   the process group (and the runtime's own stop command), then KILL after ``kill_grace_s``.
5. Finish: ``Complete`` with ``exit_code`` in one update, or ``Cancelled`` (with
   ``runtime_status.error`` when crunch-run itself decided: max_run_time, a signal).
   The scratch directory is removed; the log tail is flushed before the final update.

The container process is started with asyncio's subprocess API rather than
:class:`dispatcher.proc.CommandRunner` because its output is streamed for its whole life and it is
signalled, not timed out; the short helper commands (``docker kill``, ``docker inspect``) do go
through a ``CommandRunner``.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dispatcher.arvados.client import ArvadosClient
from dispatcher.arvados.errors import ApiError, ArvadosError
from dispatcher.crunchrun.gateway import GatewayContext, gateway
from dispatcher.crunchrun.logsink import LogSink
from dispatcher.crunchrun.runtimes import ContainerSpec, Runtime, RuntimeSpecError, make_runtime
from dispatcher.logs import redact, register_secret
from dispatcher.proc import CommandError, CommandRunner

log = logging.getLogger("crunchgate.crunchrun")

FINAL_STATES = ("Complete", "Cancelled")


@dataclass
class RunnerOptions:
    """Knobs of one crunch-run (CLI flags; defaults suit production)."""

    runtime_engine: str = "docker"
    scratch_base: str = ""  # default: $TMPDIR or /tmp
    poll_interval_s: float = 5.0
    kill_grace_s: float = 10.0
    log_flush_interval_s: float = 1.0
    log_batch_bytes: int = 64 * 1024
    drain_timeout_s: float = 5.0


class PrepareError(Exception):
    """Something on this node prevents starting the container (retryable elsewhere/later)."""


@dataclass
class _Stop:
    reason: str
    error: bool  # put the reason into runtime_status.error
    already_cancelled: bool = False


class Runner:
    """Runs one container; :meth:`run` returns crunch-run's exit status."""

    def __init__(
        self,
        client: ArvadosClient,
        uuid: str,
        opts: RunnerOptions | None = None,
        *,
        gateway_secret: str = "",
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.client = client
        self.uuid = uuid
        self.opts = opts or RunnerOptions()
        self.gateway_secret = gateway_secret
        register_secret(gateway_secret)
        self.environ = dict(os.environ if environ is None else environ)
        self.log = logging.LoggerAdapter(log, {"container_uuid": uuid})
        self.sink = LogSink(self._upload_log, flush_interval_s=self.opts.log_flush_interval_s,
                            batch_bytes=self.opts.log_batch_bytes)
        self.commands = CommandRunner(max_concurrency=2, default_timeout_s=30, redact=redact)
        self.scratch: str | None = None
        self.log_dir: str | None = None
        self.runtime: Runtime | None = None
        self._stop: _Stop | None = None
        self._stop_event = asyncio.Event()

    # --- entry point ---------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._install_signal_handlers(loop)
        try:
            try:
                ctr = await self.client.get("containers", self.uuid)
            except ArvadosError as exc:
                self.log.error("cannot fetch container %s: %s", self.uuid, exc)
                return 1
            state = ctr.get("state")
            if state != "Locked":
                msg = f"dispatch error detected: container {self.uuid} has state {state}"
                print(msg, file=sys.stderr)
                self.log.error(msg)
                return 1
            self._make_log_dir()
            self.sink.start()
            try:
                return await self._run_locked(ctr)
            finally:
                await self.sink.close()
                self._cleanup_scratch()
                self._cleanup_log_dir()
        finally:
            self._remove_signal_handlers(loop)

    async def _upload_log(self, event_type: str, text: str) -> Any:
        return await self.client.create_log(self.uuid, event_type, text)

    # --- before Running ------------------------------------------------------------------------

    async def _run_locked(self, ctr: dict[str, Any]) -> int:
        self.sink.crunch_run(f"crunch-run {_version()} started on {socket.gethostname()}, "
                             f"runtime engine {self.opts.runtime_engine}")
        try:
            self.runtime = await self._prepare(ctr)
            if self._stop is not None:
                raise PrepareError(f"stopped before the container started: {self._stop.reason}")
            await self.client.update("containers", self.uuid, {"state": "Running"})
        except RuntimeSpecError as exc:
            self.sink.crunch_run(f"cannot run this container: {exc}")
            self.log.error("cannot run container: %s", exc)
            await self._finish_unstarted(permanent_error=str(exc))
            return 1
        except Exception as exc:  # API, node or unexpected: someone else may succeed
            self.sink.crunch_run(f"failed before the container started: {exc}")
            self.log.error("failed before the container started: %s", exc,
                           exc_info=not isinstance(exc, (ArvadosError, PrepareError, OSError)))
            await self._finish_unstarted(permanent_error=None)
            return 1
        self.log.info("container is Running")
        try:
            return await self._run_running(ctr, self.runtime)
        except Exception as exc:
            # A bug must not leave the container Running forever: once Running, only
            # Cancelled is possible.
            self.log.exception("crunch-run failed while the container was running")
            self.sink.crunch_run(f"crunch-run internal error: {exc}")
            await self._finish({"state": "Cancelled", "runtime_status": {
                "error": f"crunch-run internal error: {exc}"}})
            return 1

    async def _prepare(self, ctr: dict[str, Any]) -> Runtime:
        command = ctr.get("command") or []
        if not isinstance(command, list):
            raise RuntimeSpecError("container command is not a list")
        env = ctr.get("environment") or {}
        if not isinstance(env, dict):
            raise RuntimeSpecError("container environment is not an object")
        engine = self.opts.runtime_engine
        cwd = self._make_scratch(str(ctr.get("cwd") or ctr.get("output_path") or ""), engine)
        secret_env: dict[str, str] = {}
        constraints = ctr.get("runtime_constraints") or {}
        if constraints.get("API"):
            auth = await self.client.container_auth(self.uuid)
            secret_env = {
                "ARVADOS_API_HOST": self.client.base_url.split("://", 1)[1],
                "ARVADOS_API_TOKEN": str(auth.get("api_token") or ""),
            }
            if self.client.insecure:
                secret_env["ARVADOS_API_HOST_INSECURE"] = "1"
        spec = ContainerSpec(
            uuid=self.uuid,
            command=tuple(command),
            env={str(k): v for k, v in env.items()},
            cwd=cwd,
            image=str(ctr.get("container_image") or ""),
            vcpus=int(constraints.get("vcpus") or 0),
            ram=int(constraints.get("ram") or 0),
            scratch_dir=self.scratch or "",
            secret_env=secret_env,
        )
        runtime = make_runtime(engine, spec, self.environ)
        if runtime.executable and shutil.which(runtime.executable,
                                               path=self.environ.get("PATH")) is None:
            raise PrepareError(f"{runtime.executable} is not installed on this node "
                               f"(needed by --runtime-engine={engine})")
        return runtime

    def _make_log_dir(self) -> None:
        """Where the log sink keeps the local copies the live-log WebDAV server reads.

        Not inside the scratch directory: that one is mounted into the container, which must
        not be able to rewrite its own logs or plant symlinks there.
        """
        base = self.opts.scratch_base or tempfile.gettempdir()
        try:
            self.log_dir = tempfile.mkdtemp(prefix=f"crunch-run-{self.uuid}-logs-", dir=base)
        except OSError as exc:
            self.log.warning("no live logs: cannot create a log directory in %s: %s", base, exc)
            return
        self.sink.local_dir = self.log_dir

    def _make_scratch(self, cwd: str, engine: str) -> str:
        """Create the scratch directory; return the cwd to use (quick local fs calls only)."""
        base = self.opts.scratch_base or tempfile.gettempdir()
        self.scratch = tempfile.mkdtemp(prefix=f"crunch-run-{self.uuid}-", dir=base)
        os.makedirs(os.path.join(self.scratch, "tmp"), exist_ok=True)
        if engine == "local" and not (os.path.isabs(cwd) and os.path.isdir(cwd)):
            # A local process has no image providing e.g. /var/spool/cwl: use scratch instead.
            work = os.path.join(self.scratch, "work")
            os.makedirs(work, exist_ok=True)
            if cwd:
                self.sink.crunch_run(f"cwd {cwd} does not exist on this host; using {work}")
            cwd = work
        return cwd

    async def _finish_unstarted(self, permanent_error: str | None) -> None:
        """Locked -> Cancelled (permanent) or Queued; if it turns out Running, -> Cancelled."""
        if permanent_error is not None:
            attrs: dict[str, Any] = {"state": "Cancelled",
                                     "runtime_status": {"error": permanent_error}}
        else:
            attrs = {"state": "Queued"}
        await self.sink.flush()
        try:
            await self.client.update("containers", self.uuid, attrs)
            return
        except ArvadosError as exc:
            self.log.warning("could not set container state %s: %s", attrs["state"], exc)
        # Maybe the Running update did happen after all: then only Cancelled is possible.
        with contextlib.suppress(ArvadosError):
            ctr = await self.client.get("containers", self.uuid, select=["state"])
            if ctr.get("state") == "Running":
                await self.client.update("containers", self.uuid, {
                    "state": "Cancelled",
                    "runtime_status": {"error": "crunch-run failed while starting the container"},
                })

    # --- Running -------------------------------------------------------------------------------

    async def _run_running(self, ctr: dict[str, Any], runtime: Runtime) -> int:
        argv = runtime.argv()
        self.sink.crunch_run(f"running {argv!r}")
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=runtime.process_env(),
                cwd=runtime.process_cwd(),
                # Own process group: stopping it reaches every process the command started.
                start_new_session=True,
            )
        except OSError as exc:
            # Like a shell: 127 "not found", 126 "found but cannot execute".
            code = 127 if isinstance(exc, FileNotFoundError) else 126
            self.sink.write("stderr", f"crunch-run: cannot start {argv[0]}: {exc.strerror}\n")
            self.sink.crunch_run(f"container exited with exit code {code}")
            return await self._finish({"state": "Complete", "exit_code": code})
        runtime.started(proc.pid)
        self.log.info("container process started", extra={"job_id": str(proc.pid)})
        assert proc.stdout is not None and proc.stderr is not None
        pumps = [asyncio.create_task(self._pump(proc.stdout, "stdout")),
                 asyncio.create_task(self._pump(proc.stderr, "stderr"))]
        poller = asyncio.create_task(self._poll())
        loop = asyncio.get_running_loop()
        timer = None
        max_run_time = _max_run_time(ctr)
        if max_run_time > 0:
            timer = loop.call_later(max_run_time, self.request_stop,
                                    "max_run_time exceeded", True)
        try:
            async with gateway(await self._gateway_context(runtime)):
                waiter = asyncio.create_task(proc.wait())
                stopper = asyncio.create_task(self._stop_event.wait())
                await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                stopper.cancel()
                if not waiter.done():
                    await self._terminate(proc, runtime)
                rc = await waiter
        finally:
            if timer is not None:
                timer.cancel()
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
            # Like a container ending with its PID 1: nothing the command left behind (background
            # children) outlives it. (Also covers being torn down by an exception.)
            _killpg(proc.pid, signal.SIGKILL)
            _done, pending = await asyncio.wait(pumps, timeout=self.opts.drain_timeout_s)
            for task in pending:  # a grandchild still holds the pipes open
                task.cancel()
        stop = self._stop
        if stop is not None:
            self.sink.crunch_run(f"container stopped: {stop.reason}")
            if stop.already_cancelled:
                await self.sink.flush()
                return 0
            attrs: dict[str, Any] = {"state": "Cancelled"}
            if stop.error:
                attrs["runtime_status"] = {"error": stop.reason}
            return await self._finish(attrs)
        exit_code = rc if rc >= 0 else 128 - rc
        if rc < 0:
            self.sink.crunch_run(f"container was killed by signal {-rc}")
        self.sink.crunch_run(f"container exited with exit code {exit_code}")
        return await self._finish({"state": "Complete", "exit_code": exit_code})

    async def _gateway_context(self, runtime: Runtime) -> GatewayContext | None:
        if not self.gateway_secret:
            self.log.info("not starting a gateway server (GatewayAuthSecret was not provided "
                          "by dispatcher)")
            return None
        return GatewayContext(
            container_uuid=self.uuid,
            auth_secret=self.gateway_secret,
            client=self.client,
            exec_argv=runtime.exec_argv,
            container_env=runtime.container_env,
            container_cwd=runtime.container_cwd,
            target_ip=await runtime.target_ip(self.commands),
            log_dir=self.log_dir or "",
        )

    async def _pump(self, stream: asyncio.StreamReader, event_type: str) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while chunk := await stream.read(65536):
            self.sink.write(event_type, decoder.decode(chunk))
        self.sink.write(event_type, decoder.decode(b"", final=True))

    async def _poll(self) -> None:
        """Watch the record: a cancel or priority 0 from outside stops the container."""
        while True:
            await asyncio.sleep(self.opts.poll_interval_s)
            try:
                ctr = await self.client.get("containers", self.uuid,
                                            select=["uuid", "state", "priority"])
            except ArvadosError as exc:
                # Not being able to ask is not a reason to stop the work.
                self.log.warning("cannot check container state: %s", exc)
                continue
            if ctr.get("state") == "Cancelled":
                self.request_stop("container was cancelled", False, already_cancelled=True)
            elif ctr.get("state") in FINAL_STATES:
                self.request_stop(f"container state is {ctr.get('state')}", False,
                                  already_cancelled=True)
            elif ctr.get("priority") == 0:
                self.request_stop("container priority is 0 (cancel requested)", False)

    def request_stop(self, reason: str, error: bool, *, already_cancelled: bool = False) -> None:
        """Stop the container (first reason wins)."""
        if self._stop is None:
            self._stop = _Stop(reason, error, already_cancelled)
            self.log.info("stopping container: %s", reason)
        self._stop_event.set()

    async def _terminate(self, proc: asyncio.subprocess.Process, runtime: Runtime) -> None:
        await self._signal(proc, runtime, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self.opts.kill_grace_s)
            return
        except TimeoutError:
            self.sink.crunch_run(f"container did not stop within {self.opts.kill_grace_s:g}s "
                                 "of SIGTERM; sending SIGKILL")
        await self._signal(proc, runtime, signal.SIGKILL)
        await proc.wait()

    async def _signal(self, proc: asyncio.subprocess.Process, runtime: Runtime,
                      sig: signal.Signals) -> None:
        extra = runtime.stop_argv(sig)
        if extra:
            try:
                await self.commands.run(extra, check=False)
            except CommandError as exc:
                self.log.warning("%s", exc)
        _killpg(proc.pid, sig)

    async def _finish(self, attrs: dict[str, Any]) -> int:
        await self.sink.flush()
        try:
            await self.client.update("containers", self.uuid, attrs)
            self.log.info("container finished: %s", attrs.get("state"))
            return 0
        except ApiError as exc:
            self.log.error("could not record the container's end (%s): %s", attrs, exc)
        # Someone may have finished it meanwhile (e.g. an admin cancelled it): that is fine.
        with contextlib.suppress(ArvadosError):
            ctr = await self.client.get("containers", self.uuid, select=["state"])
            if ctr.get("state") in FINAL_STATES:
                return 0
        return 1

    # --- housekeeping --------------------------------------------------------------------------

    def _install_signal_handlers(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop,
                                    f"crunch-run received {sig.name}", True)
        # (SIGUSR2, the --list liveness probe, is handled for the whole process by main.)

    def _remove_signal_handlers(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)

    def _cleanup_log_dir(self) -> None:
        if self.log_dir:
            shutil.rmtree(self.log_dir, ignore_errors=True)
            self.log_dir = None

    def _cleanup_scratch(self) -> None:
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None


def _max_run_time(ctr: dict[str, Any]) -> float:
    try:
        return float((ctr.get("scheduling_parameters") or {}).get("max_run_time") or 0)
    except (TypeError, ValueError):
        return 0.0


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("crunchgate")
    except Exception:
        return "0+unknown"
