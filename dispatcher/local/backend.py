"""``LocalBackend``: containers run as local processes (like Arvados' crunch-dispatch-local).

The "scheduler" is a directory, ``<state dir>/local-jobs/``, so that jobs survive a ``kill -9``
of the dispatcher and a restarted dispatcher adopts them:

* ``<uuid>.job``  — JSON: ``pid`` (0 while pending), ``start_ticks`` (field 22 of
  ``/proc/<pid>/stat``, so a recycled pid is not mistaken for our job), ``submitted_at``,
  ``launching`` (set just before the process is spawned);
* ``<uuid>.sh``   — the rendered ``local.sh`` job script (mode 0600: it holds the gateway
  secret; the script never echoes anything);
* ``<uuid>.log``  — the job's stdout+stderr (crunch-run's own log lines; appended per attempt).
  crunch-run sends the container's output to the controller, so this is only for debugging a
  job that failed to start: once a job has ended its log is kept among the ``keep_logs`` most
  recent ones (an empty log is deleted at once), so the directory does not grow without bound.

Submitting queues a job; it starts as soon as fewer than ``max_jobs`` jobs run (highest desired
priority first), in a new session so that it outlives the dispatcher. ``list_jobs`` reports the
jobs whose process is alive (read from ``/proc``) plus the pending ones, and forgets dead ones.
``cancel`` sends SIGTERM to crunch-run (it then finishes the container as Cancelled), or just
drops a pending job; a job that is still alive ``kill_after_s`` after the first SIGTERM gets
SIGKILL (its whole session) on the next cancel.

Jobs are started with :class:`subprocess.Popen` rather than :class:`dispatcher.proc.CommandRunner`:
they are the long-lived workload itself, not a command whose result we wait for.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dispatcher.config import ClusterConfig
from dispatcher.core.backend import Backend, CancelFailed, Job, QueryFailed, SubmitFailed
from dispatcher.core.jobscript import container_job_script
from dispatcher.core.sizing import InstanceTypesNotConfigured, choose_instance_type

log = logging.getLogger("crunchgate.local")

# Environment variable naming the container in every job process: lets a restarted dispatcher
# find a job whose pid it never got to record (killed between spawn and write).
MARKER_ENV = "CRUNCHGATE_LOCAL_JOB"
# A "launching" record younger than this may belong to a spawn in progress in another process.
LAUNCH_GRACE_S = 10.0
# How many logs of ended jobs stay in the job directory (the most recent ones).
KEEP_FINISHED_LOGS = 100


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of ``pid``, or None if there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # "pid (comm) S ppid ...": comm may contain spaces and parentheses; split after the last ')'.
    fields = raw[raw.rfind(")") + 2:].split()
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def _find_marked_process(uuid: str) -> int | None:
    """The session leader whose environment says it is the job of ``uuid`` (or None)."""
    needle = f"{MARKER_ENV}={uuid}".encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            env = Path(entry.path, "environ").read_bytes()
            pid = int(entry.name)
            if needle in env.split(b"\0") and os.getsid(pid) == pid:
                return pid
        except (OSError, ProcessLookupError):
            continue
    return None


class LocalBackend(Backend):
    """Runs each container's job script as a detached local process."""

    name = "local"

    def __init__(
        self,
        cfg: ClusterConfig,
        state_dir: str | os.PathLike[str],
        *,
        job_env: Mapping[str, str] | None = None,
        max_jobs: int | None = None,
        template: str = "local",
        kill_after_s: float = 300.0,
        start_jobs: bool = True,
        keep_logs: int = KEEP_FINISHED_LOGS,
    ) -> None:
        self.cfg = cfg
        self.dir = Path(state_dir) / "local-jobs"
        self.job_env = dict(os.environ if job_env is None else job_env)
        self.max_jobs = max_jobs or max(2, 2 * (os.cpu_count() or 1))
        self.template = template
        # A cancelled job still alive this long after its first SIGTERM gets SIGKILL.
        self.kill_after_s = kill_after_s
        # False for a backend that only inspects or stops jobs (cleanup tools): never launches.
        self.start_jobs = start_jobs
        self.keep_logs = max(0, keep_logs)
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._wanted: dict[str, int] = {}

    async def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)  # job scripts hold gateway secrets

    async def close(self) -> None:
        # Jobs run on after we exit; just stop holding their Popen objects (init reaps them).
        self._children.clear()

    # --- state files ----------------------------------------------------------------------------

    def _path(self, uuid: str, suffix: str) -> Path:
        return self.dir / f"{uuid}{suffix}"

    def _write_record(self, uuid: str, rec: Mapping[str, Any]) -> None:
        tmp = self._path(uuid, ".job.tmp")
        tmp.write_text(json.dumps(rec))
        os.replace(tmp, self._path(uuid, ".job"))

    def _read_records(self) -> dict[str, dict[str, Any]]:
        records: dict[str, dict[str, Any]] = {}
        try:
            paths = list(self.dir.glob("*.job"))
        except OSError as exc:
            raise QueryFailed(f"cannot read {self.dir}: {exc.strerror}") from None
        for path in paths:
            try:
                records[path.stem] = json.loads(path.read_text())
            except FileNotFoundError:
                continue  # removed meanwhile (cancelled)
            except (OSError, ValueError) as exc:
                raise QueryFailed(f"cannot read {path}: {exc}") from None
        return records

    def _remove(self, uuid: str) -> None:
        for suffix in (".job", ".sh"):
            with contextlib.suppress(FileNotFoundError):
                self._path(uuid, suffix).unlink()
        self._prune_logs(uuid)

    def _prune_logs(self, ended: str) -> None:
        """``ended``'s job is gone: drop its log if empty, then keep only the ``keep_logs`` most
        recent logs of ended jobs (logs of queued or running jobs are never touched)."""
        log_path = self._path(ended, ".log")
        try:
            if log_path.stat().st_size == 0:
                log_path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.debug("cannot check %s: %s", log_path, exc)
        try:
            finished: list[tuple[float, Path]] = []
            for path in self.dir.glob("*.log"):
                if self._path(path.stem, ".job").exists():
                    continue
                with contextlib.suppress(FileNotFoundError):
                    finished.append((path.stat().st_mtime, path))
        except OSError as exc:
            log.debug("cannot list job logs in %s: %s", self.dir, exc)
            return
        if len(finished) <= self.keep_logs:
            return
        finished.sort()
        for _, path in finished[:len(finished) - self.keep_logs]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _alive(self, rec: Mapping[str, Any]) -> bool:
        pid = int(rec.get("pid") or 0)
        if pid <= 0:
            return False
        child = self._children.get(pid)
        if child is not None and child.poll() is not None:
            del self._children[pid]  # reaped: our own child has exited
            return False
        stat = _proc_stat(pid)
        return stat is not None and stat[0] not in ("Z", "X") and stat[1] == rec.get("start_ticks")

    # --- the Backend interface ------------------------------------------------------------------

    async def list_jobs(self) -> dict[str, Job]:
        records = self._read_records()
        self._start_pending(records)
        jobs: dict[str, Job] = {}
        for uuid, rec in records.items():
            pid = int(rec.get("pid") or 0)
            if pid:
                jobs[uuid] = Job(name=uuid, job_id=str(pid), state="RUNNING")
            else:
                jobs[uuid] = Job(
                    name=uuid, state="PENDING", pending=True,
                    # Stable text: it is written to runtime_status whenever it changes.
                    reason=f"waiting for a free local job slot (at most {self.max_jobs} run at once)")
        return jobs

    def _start_pending(self, records: dict[str, dict[str, Any]]) -> None:
        """Forget dead jobs, recover interrupted launches, start pending jobs up to max_jobs."""
        now = time.time()
        for uuid, rec in list(records.items()):
            if rec.get("launching") and not rec.get("pid"):
                if now - float(rec.get("launching_at") or 0) < LAUNCH_GRACE_S:
                    continue
                pid = _find_marked_process(uuid)
                if pid is None:
                    # The launch never happened, or the job is long gone. Only after a second
                    # miss a while later: pending again (a wrong guess would run it twice).
                    missed = rec.get("launch_missed_at")
                    if missed is None:
                        rec["launch_missed_at"] = now
                        self._write_record(uuid, rec)
                        continue
                    if now - float(missed) < LAUNCH_GRACE_S:
                        continue
                    rec.pop("launching", None)
                    rec.pop("launch_missed_at", None)
                else:
                    stat = _proc_stat(pid)
                    rec.update(pid=pid, start_ticks=stat[1] if stat else None)
                    rec.pop("launching", None)
                self._write_record(uuid, rec)
            if rec.get("pid") and not self._alive(rec):
                log.info("local job of container %s (pid %s) has ended", uuid, rec["pid"],
                         extra={"container_uuid": uuid})
                self._remove(uuid)
                del records[uuid]
        if not self.start_jobs:
            return
        running = sum(1 for r in records.values() if r.get("pid") or r.get("launching"))
        pending = sorted(
            (u for u, r in records.items() if not r.get("pid") and not r.get("launching")),
            key=lambda u: (-self._wanted.get(u, 0), records[u].get("submitted_at", 0)),
        )
        for uuid in pending:
            if running >= self.max_jobs:
                break
            try:
                records[uuid] = self._launch(uuid, records[uuid])
                running += 1
            except OSError as exc:
                # Leave it pending; the next poll tries again.
                log.warning("cannot start local job of container %s: %s", uuid, exc,
                            extra={"container_uuid": uuid})

    def _launch(self, uuid: str, rec: dict[str, Any]) -> dict[str, Any]:
        rec = {**rec, "launching": True, "launching_at": time.time()}
        self._write_record(uuid, rec)
        env = {**self.job_env, MARKER_ENV: uuid}
        with open(self._path(uuid, ".log"), "ab") as out:
            proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell string
                ["/bin/sh", str(self._path(uuid, ".sh"))],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=env, cwd=self.dir, start_new_session=True, close_fds=True,
            )
        self._children[proc.pid] = proc
        stat = _proc_stat(proc.pid)
        rec.update(pid=proc.pid, start_ticks=stat[1] if stat else None, started_at=time.time())
        rec.pop("launching", None)
        rec.pop("launching_at", None)
        self._write_record(uuid, rec)
        log.info("started local job of container %s (pid %d)", uuid, proc.pid,
                 extra={"container_uuid": uuid, "job_id": str(proc.pid)})
        return rec

    async def submit(self, ctr: Mapping[str, Any]) -> None:
        uuid = str(ctr["uuid"])
        if self.cfg.instance_types:
            # Refuse what no configured machine could run (raises ConstraintsNotSatisfiable).
            with contextlib.suppress(InstanceTypesNotConfigured):
                choose_instance_type(self.cfg, ctr)
        script = container_job_script(self.cfg, uuid, template=self.template)
        try:
            if self._path(uuid, ".job").exists():
                return  # already queued (idempotent by job name)
            fd = os.open(self._path(uuid, ".sh"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(script)
            self._write_record(uuid, {"pid": 0, "submitted_at": time.time()})
            records = self._read_records()
            self._start_pending(records)
        except OSError as exc:
            raise SubmitFailed(f"cannot queue local job in {self.dir}: {exc}") from None
        except QueryFailed as exc:
            raise SubmitFailed(str(exc)) from None

    async def cancel(self, ctr_uuid: str, job: Job | None) -> None:
        try:
            rec = json.loads(self._path(ctr_uuid, ".job").read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            raise CancelFailed(f"cannot read local job record of {ctr_uuid}: {exc}") from None
        if not rec.get("pid"):
            if rec.get("launching"):
                raise CancelFailed(f"local job of {ctr_uuid} is being started; try again")
            self._remove(ctr_uuid)
            return
        if not self._alive(rec):
            return
        pid = int(rec["pid"])
        term_at = rec.get("term_at")
        try:
            if term_at is not None and time.time() - float(term_at) > self.kill_after_s:
                # crunch-run ignored SIGTERM for too long: it is wedged. Kill its whole session;
                # the loop then finds the container without a job and cancels it.
                log.warning("local job of container %s ignored SIGTERM for %.0fs: SIGKILL",
                            ctr_uuid, time.time() - float(term_at),
                            extra={"container_uuid": ctr_uuid, "job_id": str(pid)})
                os.killpg(pid, signal.SIGKILL)
                return
            # crunch-run only: it stops the container and its children itself.
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        except OSError as exc:
            raise CancelFailed(f"kill {pid}: {exc.strerror}") from None
        if term_at is None:
            self._write_record(ctr_uuid, {**rec, "term_at": time.time()})

    async def set_priorities(self, wanted: Mapping[str, int], jobs: Mapping[str, Job]) -> None:
        # Used to order pending jobs: the most wanted container gets the next free slot.
        self._wanted = dict(wanted)
