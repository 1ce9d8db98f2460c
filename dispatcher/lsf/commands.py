"""The LSF command-line layer: bsub, bjobs, bkill.

Every call goes through :class:`dispatcher.proc.CommandRunner` (argv list, timeout, bounded
concurrency). Two runners, so that a burst of submissions cannot starve the poll:

* *submissions* (bsub, bkill): at most ``submit_concurrency`` processes;
* *queries* (bjobs): at most 2.

Failures become :class:`LsfCommandError` with a ``kind``:

``rejected``   LSF refused the submission for good ("Bad resource requirement syntax",
               "No such queue", an illegal option ...): retrying the same bsub cannot help.
``timeout``    the command hung and was killed. For bsub this means "we do not know whether the
               job was created" -- the caller must look for it by name before submitting again.
``output``     the command succeeded but printed something we cannot parse (bjobs without
               valid JSON, a truncated listing, bsub without a job id).
``not_found``  the executable is missing (LSF client not installed, PATH, sudo).
``other``      anything else (LSF down, mbatchd busy, sudo hiccups ...): transient.

Nothing here logs the job script (it carries the container's gateway secret) or bsub's
environment (it carries the API token); the runners redact registered secrets from every
error they raise.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram

from dispatcher.logs import get_logger, redact
from dispatcher.lsf import parse
from dispatcher.lsf.bsub import with_sudo
from dispatcher.lsf.parse import BkillOutcome, LsfError, LsfJob, LsfOutputError
from dispatcher.proc import (
    CommandFailed,
    CommandNotFound,
    CommandResult,
    CommandRunner,
    CommandTimeout,
    SpawnCommandRunner,
)

log = get_logger("lsf.commands")

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BJOBS_ARGV = ("bjobs", "-u", "all", "-o", parse.BJOBS_FIELDS, "-json")


class LsfCommandError(LsfError):
    """An LSF command failed; ``kind`` says how (see the module docstring)."""

    def __init__(
        self, command: str, kind: str, message: str, *, returncode: int | None = None
    ) -> None:
        self.command = command
        self.kind = kind
        self.message = message
        self.returncode = returncode
        super().__init__(f"{command}: {message}")

    @property
    def permanent(self) -> bool:
        """Retrying the same command cannot succeed."""
        return self.kind == "rejected"


class LsfMetrics:
    """Prometheus metrics of the LSF CLI layer."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        reg = registry if registry is not None else CollectorRegistry()
        self.registry = reg
        self.latency = Histogram(
            "crunchgate_lsf_command_duration_seconds",
            "Wall time of LSF commands, by command.",
            ["command"], buckets=LATENCY_BUCKETS, registry=reg,
        )
        self.commands = Counter(
            "crunchgate_lsf_commands", "LSF commands run, by command.", ["command"], registry=reg,
        )
        self.errors = Counter(
            "crunchgate_lsf_command_errors",
            "Failed LSF commands, by command and kind (rejected, timeout, output, not_found, "
            "other).",
            ["command", "kind"], registry=reg,
        )


class LsfCLI:
    """Async wrappers for the LSF commands the dispatcher uses.

    ``sudo_user`` (``Containers.LSF.BsubSudoUser``) prefixes bsub with ``sudo -E -u <user>``
    so the jobs run as that user. bjobs and bkill run as the dispatcher's own user, as in the
    reference (``-u all`` lists everyone's jobs; the service user -- root in the shipped unit --
    may kill them), so the poll costs no sudo session.
    """

    def __init__(
        self,
        *,
        sudo_user: str = "",
        timeout_s: float = 60.0,
        submit_concurrency: int = 4,
        query_concurrency: int = 2,
        env: Mapping[str, str] | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.sudo_user = sudo_user
        self.timeout_s = timeout_s
        self.submit_runner = SpawnCommandRunner(
            max_concurrency=max(1, submit_concurrency), default_timeout_s=timeout_s,
            env=env, redact=redact, name="lsf-submit",
        )
        self.query_runner = SpawnCommandRunner(
            max_concurrency=max(1, query_concurrency), default_timeout_s=timeout_s,
            env=env, redact=redact, name="lsf-query",
        )
        self.metrics = LsfMetrics(registry)

    def close(self) -> None:
        """Stop the runners' worker threads once their current command is done."""
        self.submit_runner.close()
        self.query_runner.close()

    async def _run(
        self,
        runner: CommandRunner,
        argv: Sequence[str],
        *,
        command: str,
        stdin: str | None = None,
        env: Mapping[str, str] | None = None,
        check: bool = True,
    ) -> CommandResult:
        self.metrics.commands.labels(command).inc()
        t0 = time.monotonic()
        try:
            return await runner.run(argv, stdin=stdin, env=env, check=check)
        except CommandTimeout as exc:
            self.metrics.errors.labels(command, "timeout").inc()
            raise LsfCommandError(
                command, "timeout",
                f"no answer within {exc.reason.removeprefix('timed out after ')} "
                "(mbatchd overloaded or hung?); the command was killed",
            ) from None
        except CommandNotFound as exc:
            self.metrics.errors.labels(command, "not_found").inc()
            raise LsfCommandError(
                command, "not_found",
                f"{argv[0]}: {exc.reason}; install the LSF client commands on this host, put "
                "them on the dispatcher's PATH (e.g. source profile.lsf in the service "
                "environment), or fix Containers.LSF.BsubSudoUser",
            ) from None
        except CommandFailed as exc:
            output = f"{exc.stderr}\n{exc.stdout}"
            kind = "rejected" if (
                command == "bsub" and parse.bsub_rejection_is_permanent(output)) else "other"
            self.metrics.errors.labels(command, kind).inc()
            raise LsfCommandError(
                command, kind,
                parse.lsf_message(exc.stderr) or parse.lsf_message(exc.stdout)
                or f"exit status {exc.returncode}",
                returncode=exc.returncode,
            ) from None
        finally:
            self.metrics.latency.labels(command).observe(time.monotonic() - t0)

    async def bjobs(self) -> dict[str, LsfJob]:
        """One bjobs for every user's unfinished jobs, keyed by job name.

        Raises :class:`LsfCommandError` (failed, timed out, unparseable): never a partial map.
        """
        res = await self._run(self.query_runner, BJOBS_ARGV, command="bjobs", check=False)
        if res.returncode != 0:
            if parse.is_empty_queue_message(res.stdout, res.stderr):
                return {}
            self.metrics.errors.labels("bjobs", "other").inc()
            raise LsfCommandError(
                "bjobs", "other",
                parse.lsf_message(res.stderr) or parse.lsf_message(res.stdout)
                or f"exit status {res.returncode}",
                returncode=res.returncode,
            )
        try:
            return parse.parse_bjobs_json(res.stdout)
        except LsfOutputError as exc:
            self.metrics.errors.labels("bjobs", "output").inc()
            raise LsfCommandError("bjobs", "output", str(exc)) from None

    async def bsub(self, args: Sequence[str], script: str, env: Mapping[str, str]) -> str:
        """Submit ``script`` (on stdin) with ``args``; return the LSF job id.

        Raises :class:`LsfCommandError`; kind ``timeout`` or ``output`` means the job may exist.
        """
        argv = with_sudo(self.sudo_user, ["bsub", *args])
        log.info("bsub command %s", argv)
        res = await self._run(self.submit_runner, argv, command="bsub", stdin=script, env=env)
        job_id = parse.parse_bsub_job_id(res.stdout)
        if job_id is None:
            # Exit 0 without "Job <N> is submitted": do not guess. The job may exist; the loop
            # looks for it by name before it would submit again.
            self.metrics.errors.labels("bsub", "output").inc()
            raise LsfCommandError(
                "bsub", "output",
                f"bsub exited 0 but printed no job id: {parse.lsf_message(res.stdout)!r}; "
                f"stderr {parse.lsf_message(res.stderr)!r}",
            )
        log.info("bsub finished: job %s", job_id)
        return job_id

    async def bkill(self, job_id: str) -> BkillOutcome:
        """``bkill <job_id>``. "Already finished" / "No matching job" are outcomes, not errors.

        Raises :class:`LsfCommandError` when the job may still be there.
        """
        if not job_id.isdigit():
            raise LsfCommandError("bkill", "other",
                                  f"refusing to bkill non-numeric job id {job_id!r}")
        argv = ["bkill", job_id]
        res = await self._run(self.submit_runner, argv, command="bkill", check=False)
        outcome = parse.parse_bkill(res.returncode, f"{res.stdout}\n{res.stderr}")
        if outcome is BkillOutcome.FAILED:
            self.metrics.errors.labels("bkill", "other").inc()
            raise LsfCommandError(
                "bkill", "other",
                parse.lsf_message(res.stderr) or parse.lsf_message(res.stdout)
                or f"exit status {res.returncode}",
                returncode=res.returncode,
            )
        return outcome
