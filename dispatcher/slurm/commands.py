"""The Slurm command-line layer: sbatch, squeue, scancel, scontrol, sinfo.

Every call goes through :class:`dispatcher.proc.CommandRunner` (argv list, timeout, bounded
concurrency). Two runners, so that a burst of submissions cannot starve the poll:

* *submissions* (sbatch, scancel): at most ``submit_concurrency`` processes;
* *renice* (scontrol update): at most 2 -- reordering is housekeeping and must not take the
  slots a burst of submissions needs;
* *queries* (squeue, sinfo, sacct): at most 2.

sacct only runs for a container whose job vanished from squeue before we saw how it ended
(:meth:`dispatcher.slurm.backend.SlurmBackend.describe_vanished`).

Failures become :class:`SlurmCommandError` with a ``kind``:

``controller``  slurmctld is overloaded or unreachable ("Socket timed out", "Slurm temporarily
                unable", "Unable to contact slurm controller"). This arms :class:`Backoff`:
                further commands are held back (queries fail at once, without an RPC) for a
                jittered, doubling delay, so a struggling slurmctld sees less traffic from us,
                not more.
``timeout``     the command hung and was killed: treated like ``controller``.
``rejected``    Slurm refused the request for good (invalid partition, impossible memory ...).
``quota``       a submit limit (QOS/association/MaxJobCount) -- clears up by itself.
``not_found``   the executable is missing.
``backoff``     not run at all: the controller back-off is in force.
``other``       anything else.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram

from dispatcher.logs import get_logger, redact
from dispatcher.proc import (
    CommandFailed,
    CommandNotFound,
    CommandResult,
    CommandRunner,
    CommandTimeout,
    SpawnCommandRunner,
    ThreadedCommandRunner,
)
from dispatcher.slurm import parse

log = get_logger("slurm.commands")

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class SlurmError(Exception):
    """Base class of the errors of ``dispatcher.slurm``."""


class SlurmCommandError(SlurmError):
    """A Slurm command failed; ``kind`` says how (see the module docstring)."""

    def __init__(
        self, command: str, kind: str, message: str, *, returncode: int | None = None
    ) -> None:
        self.command = command
        self.kind = kind
        self.message = message
        self.returncode = returncode
        super().__init__(f"{command}: {message}")

    @property
    def transient(self) -> bool:
        """Worth retrying later (the controller, a limit, a hiccup)."""
        return self.kind not in ("rejected", "not_found")


class Backoff:
    """Jittered exponential back-off armed by controller errors, cleared by a success.

    Pure apart from the injected clock and random source.
    """

    def __init__(
        self,
        *,
        base_s: float = 1.0,
        max_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.base_s = base_s
        self.max_s = max_s
        self._clock = clock
        self._rand = rand
        self.failures = 0
        self._until = 0.0

    def remaining_s(self) -> float:
        """Seconds until commands may be sent again (0 when not backing off)."""
        return max(0.0, self._until - self._clock())

    def failure(self) -> float:
        """Record a controller error; returns the new delay."""
        self.failures += 1
        ceiling = min(self.max_s, self.base_s * (2 ** (self.failures - 1)))
        # "Equal jitter": at least half the delay, so the back-off really slows us down, and a
        # random rest so that several dispatchers do not come back in the same second.
        delay = ceiling / 2 + self._rand() * ceiling / 2
        self._until = max(self._until, self._clock() + delay)
        return delay

    def success(self) -> None:
        self.failures = 0
        self._until = 0.0


class SlurmMetrics:
    """Prometheus metrics of the Slurm CLI layer."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        reg = registry if registry is not None else CollectorRegistry()
        self.registry = reg
        self.latency = Histogram(
            "crunchgate_slurm_command_duration_seconds",
            "Wall time of Slurm commands, by command.",
            ["command"], buckets=LATENCY_BUCKETS, registry=reg,
        )
        self.commands = Counter(
            "crunchgate_slurm_commands",
            "Slurm commands run, by command.",
            ["command"], registry=reg,
        )
        self.errors = Counter(
            "crunchgate_slurm_command_errors",
            "Failed Slurm commands, by command and kind (controller, timeout, rejected, "
            "quota, not_found, backoff, other).",
            ["command", "kind"], registry=reg,
        )


class SlurmCLI:
    """Async wrappers for the Slurm commands the dispatcher uses."""

    def __init__(
        self,
        *,
        timeout_s: float = 60.0,
        submit_concurrency: int = 4,
        query_concurrency: int = 2,
        env: Mapping[str, str] | None = None,
        backoff: Backoff | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.timeout_s = timeout_s
        # The commands' environment is read once, here: copying os.environ (which decodes
        # every entry) for each of a thousand sbatch calls was a tenth of the dispatcher's CPU
        # per submitted job. The dispatcher never changes its own environment after start.
        env = dict(os.environ if env is None else env)
        self.metrics = SlurmMetrics(registry)
        # Commands are counted and timed when they have really run (the runner's hook), not
        # when they are queued for a runner slot: a renice pass queues up to 2,000 scontrol
        # calls at once, and counting them up front made a pass in progress look finished.
        #
        # Output is not scrubbed by the runners: it is parsed, never stored, and the secret set
        # holds one gateway secret per container dispatched, so scrubbing the squeue of 10,000
        # jobs cost 0.8 s of CPU per poll. What leaves this layer -- the message of a
        # SlurmCommandError, quoted in logs, runtime_status.error and the health report -- is
        # scrubbed in _run(); log lines are scrubbed again by the log handler.
        self.submit_runner: CommandRunner = SpawnCommandRunner(
            max_concurrency=max(1, submit_concurrency), default_timeout_s=timeout_s,
            env=env, on_finish=self._ran, name="slurm-submit",
        )
        self.renice_runner: CommandRunner = SpawnCommandRunner(
            max_concurrency=2, default_timeout_s=timeout_s, env=env, on_finish=self._ran,
            name="slurm-renice",
        )
        self.query_runner: CommandRunner = SpawnCommandRunner(
            max_concurrency=max(1, query_concurrency), default_timeout_s=timeout_s,
            env=env, on_finish=self._ran, name="slurm-query",
        )
        self.backoff = backoff or Backoff()
        # When slurmctld last came back: the first success after a controller error or timeout.
        # Requests sent while it was unresponsive may still be processed around that moment.
        self.recovered_at = 0.0
        self._failing = False

    def _ran(self, argv: Sequence[str], duration_s: float, _kind: str | None) -> None:
        self.metrics.commands.labels(argv[0]).inc()
        self.metrics.latency.labels(argv[0]).observe(duration_s)

    async def _run(
        self,
        runner: CommandRunner,
        argv: Sequence[str],
        *,
        stdin: str | None = None,
        env: Mapping[str, str] | None = None,
        wait_backoff: bool = False,
        timeout_s: float | None = None,
    ) -> CommandResult:
        command = argv[0]
        delay = self.backoff.remaining_s()
        if delay > 0:
            if not wait_backoff:
                self.metrics.errors.labels(command, "backoff").inc()
                raise SlurmCommandError(
                    command, "backoff",
                    f"not run: slurmctld reported trouble, backing off for {delay:.1f}s more",
                )
            await asyncio.sleep(delay)
        try:
            return await runner.run(argv, stdin=stdin, env=env, timeout_s=timeout_s)
        except CommandTimeout as exc:
            self.backoff.failure()
            self._failing = True
            self.metrics.errors.labels(command, "timeout").inc()
            raise SlurmCommandError(
                command, "timeout",
                f"no answer within {exc.reason.removeprefix('timed out after ')}"
                " (slurmctld overloaded or hung?)",
            ) from None
        except CommandNotFound as exc:
            self.metrics.errors.labels(command, "not_found").inc()
            raise SlurmCommandError(
                command, "not_found",
                f"{exc.reason}; install the Slurm client commands (Debian: slurm-client) "
                "or fix PATH",
            ) from None
        except CommandFailed as exc:
            kind = parse.error_kind(exc.stderr + "\n" + exc.stdout)
            if kind == "controller":
                self.backoff.failure()
                self._failing = True
            self.metrics.errors.labels(command, kind).inc()
            msg = redact(parse.slurm_message(exc.stderr) or parse.slurm_message(exc.stdout))
            raise SlurmCommandError(
                command, kind, msg or f"exit status {exc.returncode}", returncode=exc.returncode
            ) from None

    def _ok(self) -> None:
        self.backoff.success()
        if self._failing:
            self._failing = False
            self.recovered_at = time.monotonic()

    def close(self) -> None:
        """Stop the runners' worker threads once their current command is done."""
        for runner in (self.submit_runner, self.renice_runner, self.query_runner):
            if isinstance(runner, ThreadedCommandRunner):
                runner.close()

    async def squeue(self) -> str:
        """One squeue for every job (including recently ended ones), in our format."""
        res = await self._run(
            self.query_runner,
            ["squeue", "--all", "--noheader", "--states=all", f"--format={parse.SQUEUE_FORMAT}"],
        )
        self._ok()
        return res.stdout

    async def squeue_name(self, name: str) -> str:
        """squeue restricted to one job name (checking an sbatch whose reply was lost)."""
        res = await self._run(
            self.query_runner,
            ["squeue", "--all", "--noheader", "--states=all", f"--name={name}",
             f"--format={parse.SQUEUE_FORMAT}"],
            wait_backoff=True,
        )
        self._ok()
        return res.stdout

    async def sbatch(self, args: Sequence[str], script: str, env: Mapping[str, str]) -> str:
        """Submit ``script`` (on stdin) with ``args``; returns the job id."""
        res = await self._run(
            self.submit_runner, ["sbatch", *args], stdin=script, env=env, wait_backoff=True
        )
        self._ok()
        job_id = parse.parse_sbatch_job_id(res.stdout)
        if job_id is None:
            # Accepted (exit 0) but unparseable: still submitted. The next squeue knows the id.
            log.warning("sbatch succeeded but printed no job id: %r", res.stdout[:200])
            return ""
        return job_id

    async def scancel(self, args: Sequence[str]) -> None:
        """scancel exits 0 when nothing matches, so any failure is a real one."""
        await self._run(self.submit_runner, ["scancel", *args])
        self._ok()

    async def set_nice(self, name: str, nice: int, *, job_id: str = "") -> None:
        """Renice one job, by id when known.

        ``JobName=`` (what the reference runs) makes scontrol load the whole job table to find
        the ids -- O(jobs) per call, ~0.1 s at 3,000 jobs, and minutes for a pass of 2,000 calls
        at 10,000 -- and it also targets ended jobs of the same name still listed for
        MinJobAge ("Job has already finished", exit 1). ``JobId=`` from the squeue the plan was
        computed on is one cheap RPC for exactly that job.
        """
        target = f"JobId={job_id}" if job_id else f"JobName={name}"
        await self._run(self.renice_runner, ["scontrol", "update", target, f"Nice={nice}"])
        self._ok()

    async def sacct(self, name: str) -> str:
        """The accounting records of the jobs named ``name`` (last 30 days, allocations only).
        Fails (kind ``other``) where the site has no accounting storage."""
        res = await self._run(
            self.query_runner,
            ["sacct", "--noheader", "--parsable2", "--allocations", f"--name={name}",
             "--starttime=now-30days", f"--format={parse.SACCT_FORMAT}"],
        )
        self._ok()
        return res.stdout

    async def sinfo(self, args: Sequence[str]) -> str:
        res = await self._run(self.query_runner, ["sinfo", *args])
        self._ok()
        return res.stdout
