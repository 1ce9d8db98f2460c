"""The one way crunchgate runs an external command.

Every scheduler CLI call (sbatch, squeue, bsub, bjobs, ...) goes through :class:`CommandRunner`:
an argv list (never a shell string), a timeout, a concurrency limit, and on failure an exception
that carries argv, exit code, stdout and stderr so that callers can classify it.

A command that timed out is killed (its whole process group) and reported as
:class:`CommandTimeout`; callers must treat that as "we do not know", never as "the job is gone".
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

# A redactor turns a text that might contain secrets into one that does not. The runner applies
# it to everything it puts into exceptions, so that a token passed in an environment variable
# and echoed by a broken wrapper script cannot leak into logs.
Redactor = Callable[[str], str]


def _no_redaction(text: str) -> str:
    return text


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    duration_s: float


class CommandError(Exception):
    """A command failed: non-zero exit, timeout, or it could not be started."""

    def __init__(
        self,
        argv: Sequence[str],
        returncode: int | None,
        stdout: str,
        stderr: str,
        reason: str,
    ) -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.reason = reason
        detail = (stderr or stdout).strip()
        if len(detail) > 2000:
            detail = detail[:2000] + "..."
        msg = f"{self.argv[0]}: {reason}"
        if detail:
            msg += f" ({detail!r})"
        super().__init__(msg)


class CommandNotFound(CommandError):
    """The executable does not exist or is not executable."""


class CommandTimeout(CommandError):
    """The command did not finish within its timeout and was killed."""


class CommandFailed(CommandError):
    """The command ran and exited non-zero."""


@dataclass
class CommandStats:
    """Counters a metrics layer can export (commands run, failures by kind)."""

    started: int = 0
    failed: dict[str, int] = field(default_factory=dict)


class CommandRunner:
    """Runs external commands with a timeout and a concurrency limit.

    ``max_concurrency`` bounds how many processes this runner has alive at once; schedulers get
    one runner per class of command (e.g. submissions vs queries) so that a burst of sbatch
    calls cannot starve the squeue poll.
    """

    def __init__(
        self,
        *,
        max_concurrency: int = 4,
        default_timeout_s: float = 60.0,
        env: Mapping[str, str] | None = None,
        redact: Redactor = _no_redaction,
        on_finish: Callable[[Sequence[str], float, str | None], None] | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        self._sem = asyncio.Semaphore(max_concurrency)
        self.default_timeout_s = default_timeout_s
        self._env = dict(env) if env is not None else None
        self._redact = redact
        self._on_finish = on_finish
        self.stats = CommandStats()

    async def run(
        self,
        argv: Sequence[str],
        *,
        stdin: str | bytes | None = None,
        timeout_s: float | None = None,
        env: Mapping[str, str] | None = None,
        check: bool = True,
    ) -> CommandResult:
        """Run ``argv`` and return its result.

        ``env`` is merged over the runner's environment (itself defaulting to ``os.environ``).
        With ``check`` (the default) a non-zero exit raises :class:`CommandFailed`.
        """
        if isinstance(argv, str):
            raise TypeError("argv must be a sequence of strings, not a shell string")
        argv = tuple(str(a) for a in argv)
        if not argv:
            raise ValueError("empty argv")
        timeout = self.default_timeout_s if timeout_s is None else timeout_s
        full_env = dict(os.environ if self._env is None else self._env)
        if env:
            full_env.update(env)
        data = stdin.encode() if isinstance(stdin, str) else stdin
        async with self._sem:
            self.stats.started += 1
            t0 = time.monotonic()
            kind: str | None = None
            try:
                result = await self._run_one(argv, data, timeout, full_env)
            except CommandError as exc:
                kind = type(exc).__name__
                self.stats.failed[kind] = self.stats.failed.get(kind, 0) + 1
                raise
            finally:
                if self._on_finish is not None:
                    self._on_finish(argv, time.monotonic() - t0, kind)
        if check and result.returncode != 0:
            kind = "CommandFailed"
            self.stats.failed[kind] = self.stats.failed.get(kind, 0) + 1
            raise CommandFailed(
                argv, result.returncode, result.stdout, result.stderr,
                f"exit status {result.returncode}",
            )
        return result

    async def _run_one(
        self, argv: tuple[str, ...], data: bytes | None, limit_s: float, env: dict[str, str]
    ) -> CommandResult:
        t0 = time.monotonic()
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if data is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                # Own process group, so that a timeout kills wrapper scripts and their children.
                start_new_session=True,
            )
        except (FileNotFoundError, PermissionError) as exc:
            raise CommandNotFound(argv, None, "", "", f"cannot run: {exc.strerror}") from None
        # communicate() runs on as its own task: on a timeout the process group is killed and
        # the same call then returns everything the command wrote before it was killed.
        talk = asyncio.ensure_future(proc.communicate(data))
        try:
            done, _ = await asyncio.wait({talk}, timeout=limit_s)
            if not done:
                kill_group(proc)
                try:
                    partial_out, partial_err = await asyncio.wait_for(asyncio.shield(talk), 5)
                except TimeoutError:  # a grandchild outside the group holds the pipes open
                    talk.cancel()
                    partial_out, partial_err = b"", b""
                raise CommandTimeout(
                    argv,
                    None,
                    self._redact(partial_out.decode(errors="replace")),
                    self._redact(partial_err.decode(errors="replace")),
                    f"timed out after {limit_s:g}s",
                ) from None
            out, err = talk.result()
        except asyncio.CancelledError:
            kill_group(proc)
            talk.cancel()
            await _drain(proc)
            raise
        return CommandResult(
            argv,
            proc.returncode if proc.returncode is not None else -1,
            self._redact(out.decode(errors="replace")),
            self._redact(err.decode(errors="replace")),
            time.monotonic() - t0,
        )


class ThreadedCommandRunner(CommandRunner):
    """:class:`CommandRunner` (same argv/timeout/concurrency contract and exceptions) whose
    processes are started and waited for on a small thread pool, one thread per slot.

    Why: asyncio (stock and uvloop alike) starts a process from the event-loop thread, which
    the fork suspends until the child has exec'd -- milliseconds on a busy host -- and then
    sets up three pipe transports and a child watcher. A burst of a thousand sbatch calls kept
    the loop blocked in ``fork_exec`` for seconds (nothing else, lock calls included, made
    progress meanwhile). From a worker thread the GIL is released while the child starts;
    measured with 400 sbatch runs on the dev VM: 30 % less wall time and half the event-loop
    lag. The scheduler CLIs (Slurm, LSF) use it; call :meth:`close` when done.
    """

    def __init__(self, *, max_concurrency: int = 4, name: str = "command", **kw: Any) -> None:
        super().__init__(max_concurrency=max_concurrency, **kw)
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix=name)

    async def _run_one(
        self, argv: tuple[str, ...], data: bytes | None, limit_s: float, env: dict[str, str]
    ) -> CommandResult:
        started: dict[str, subprocess.Popen[bytes]] = {}
        cancelled = False

        def work() -> tuple[int, bytes, bytes, float, bool]:
            t0 = time.monotonic()
            proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE if data is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                # Own process group, so that a timeout kills wrapper scripts and their children.
                start_new_session=True,
            )
            started["proc"] = proc
            if cancelled:  # the caller gave up while we were starting it
                kill_group(proc)
            try:
                out, err = proc.communicate(data, timeout=limit_s)
                return proc.returncode, out, err, time.monotonic() - t0, False
            except subprocess.TimeoutExpired:
                kill_group(proc)
                try:
                    out, err = proc.communicate(timeout=5)
                except subprocess.TimeoutExpired:  # stuck in the kernel: give up on its output
                    out, err = b"", b""
                return -1, out, err, time.monotonic() - t0, True

        future = asyncio.get_running_loop().run_in_executor(self._pool, work)
        try:
            rc, out, err, duration, timed_out = await future
        except (FileNotFoundError, PermissionError) as exc:
            raise CommandNotFound(argv, None, "", "", f"cannot run: {exc.strerror}") from None
        except asyncio.CancelledError:
            # The thread cannot be cancelled: stop its process, so that it returns at once.
            cancelled = True
            proc = started.get("proc")
            if proc is not None:
                kill_group(proc)
            raise
        stdout = self._redact(out.decode(errors="replace"))
        stderr = self._redact(err.decode(errors="replace"))
        if timed_out:
            raise CommandTimeout(argv, None, stdout, stderr, f"timed out after {limit_s:g}s")
        return CommandResult(argv, rc, stdout, stderr, duration)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class SpawnCommandRunner(ThreadedCommandRunner):
    """:class:`CommandRunner` (same contract and exceptions) that starts each process with
    ``posix_spawn`` and waits for it on the event loop: its pipes and a pidfd are watched by
    the loop, no thread, no child watcher.

    Why: a burst of a thousand sbatch calls on a 2-core host is CPU-bound (sbatch, slurmctld
    and munged fill both cores), so every millisecond of the dispatcher's own CPU per command
    is wall time. ``subprocess.Popen`` on a worker thread costs 250-280 us of the parent's CPU
    per command (its Python-level set-up, the thread hand-offs, the GIL); ``posix_spawn``
    (vfork + exec in glibc: no page tables copied) with three pipes costs ~150 us. Measured in
    one A/B, 4 rounds of 1,000 held jobs: dispatcher CPU 0.88-0.97 -> 0.59-0.64 s, wall time
    lower in every round (docs/slurm.md). The loop is held only for the vfork itself, until the
    child has exec'd.

    Falls back to :class:`ThreadedCommandRunner` where the platform lacks ``posix_spawn``
    with ``setsid`` or ``pidfd_open`` (Linux < 5.3).
    """

    _READ_SIZE = 1 << 20

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._paths: dict[tuple[str, str], str] = {}
        if spawn_supported():
            _no_inheritable_descriptors()

    async def _run_one(
        self, argv: tuple[str, ...], data: bytes | None, limit_s: float, env: dict[str, str]
    ) -> CommandResult:
        if not spawn_supported():
            return await super()._run_one(argv, data, limit_s, env)
        t0 = time.monotonic()
        proc = _SpawnedProcess.start(self._resolve(argv, env), argv, data, env)
        try:
            try:
                rc = await asyncio.wait_for(proc.finished(), limit_s)
            except TimeoutError:
                kill_group(proc)
                try:
                    await asyncio.wait_for(proc.finished(), 5)
                except TimeoutError:  # stuck in the kernel: give up on the rest of its output
                    pass
                out, err = proc.output()
                raise CommandTimeout(
                    argv, None, self._redact(out), self._redact(err),
                    f"timed out after {limit_s:g}s",
                ) from None
            except asyncio.CancelledError:
                kill_group(proc)
                raise
            out, err = proc.output()
        finally:
            proc.close()
        return CommandResult(argv, rc, self._redact(out), self._redact(err),
                             time.monotonic() - t0)

    def _resolve(self, argv: tuple[str, ...], env: Mapping[str, str]) -> str:
        """``name`` looked up on ``env``'s PATH, like ``Popen(argv, env=env)`` does (and not on
        ours, as ``posix_spawnp`` would); remembered per (name, PATH), checked again on use."""
        name = argv[0]
        if "/" in name:
            return name
        key = (name, env.get("PATH", os.defpath))
        path = self._paths.get(key)
        if path is not None and os.access(path, os.X_OK):
            return path
        for directory in os.get_exec_path(env):
            candidate = os.path.join(directory, name)
            if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                self._paths[key] = candidate
                return candidate
        raise CommandNotFound(argv, None, "", "",
                              "cannot run: No such file or directory (not on PATH)")


def _no_inheritable_descriptors() -> None:
    """Make every descriptor above stderr close-on-exec.

    posix_spawn has no ``close_fds``: a child inherits whatever is not close-on-exec. Python
    opens everything close-on-exec (PEP 446), and crunchgate never makes a descriptor
    inheritable in a service process; what is left is what the service itself inherited from
    whoever started it (a shell's, a supervisor's). Cleared once, here, instead of listing
    /proc/self/fd for every command.
    """
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return
    for name in names:
        fd = int(name)
        if fd > 2:
            with contextlib.suppress(OSError):  # e.g. listdir's own, already closed
                if os.get_inheritable(fd):
                    os.set_inheritable(fd, False)


_SPAWN_SUPPORTED: bool | None = None


def spawn_supported() -> bool:
    """Whether :class:`SpawnCommandRunner` can use posix_spawn + pidfd here."""
    global _SPAWN_SUPPORTED
    if _SPAWN_SUPPORTED is None:
        ok = hasattr(os, "posix_spawn") and hasattr(os, "pidfd_open")
        if ok:
            try:
                os.close(os.pidfd_open(os.getpid()))
            except OSError:  # ENOSYS: a kernel older than 5.3
                ok = False
        _SPAWN_SUPPORTED = ok
    return _SPAWN_SUPPORTED


class _SpawnedProcess:
    """One child started by posix_spawn in its own session, with stdin/stdout/stderr pipes
    that the running event loop watches, and a pidfd that becomes readable when it exits."""

    def __init__(self, pid: int, pidfd: int, stdin: int | None, stdout: int, stderr: int,
                 data: bytes | None) -> None:
        self.pid = pid
        self._loop = asyncio.get_running_loop()
        self._pidfd = pidfd
        self._stdin = stdin
        self._data = memoryview(data) if data else memoryview(b"")
        self._bufs: dict[int, list[bytes]] = {stdout: [], stderr: []}
        self._stdout, self._stderr = stdout, stderr
        self._open = {stdout, stderr, pidfd}
        self._returncode: int | None = None
        self._done = self._loop.create_future()
        for fd in (stdout, stderr, pidfd):
            os.set_blocking(fd, False)
            self._loop.add_reader(fd, self._readable, fd)
        if stdin is not None:
            os.set_blocking(stdin, False)
            self._write_stdin()

    @classmethod
    def start(cls, path: str, argv: Sequence[str], data: bytes | None,
              env: Mapping[str, str]) -> _SpawnedProcess:
        fds: list[int] = []
        try:
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            fds += (out_r, out_w)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            fds += (err_r, err_w)
            actions: list[tuple[Any, ...]] = [
                (os.POSIX_SPAWN_DUP2, out_w, 1), (os.POSIX_SPAWN_DUP2, err_w, 2),
            ]
            in_w: int | None = None
            if data is not None:
                in_r, in_w = os.pipe2(os.O_CLOEXEC)
                fds += (in_r, in_w)
                actions.append((os.POSIX_SPAWN_DUP2, in_r, 0))
            else:
                actions.append((os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0))
            # Every other descriptor of ours is close-on-exec (PEP 446), so the child gets only
            # these three. Own session, so that a timeout kills wrapper scripts' children too.
            try:
                pid = os.posix_spawn(path, list(argv), env, file_actions=actions, setsid=True)
            except OSError as exc:  # missing, not executable, no "#!" line (ENOEXEC), ...
                raise CommandNotFound(tuple(argv), None, "", "",
                                      f"cannot run: {exc.strerror or exc}") from None
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        for fd in (out_w, err_w) + ((in_r,) if data is not None else ()):
            os.close(fd)
        return cls(pid, pidfd, in_w, out_r, err_r, data)

    def _write_stdin(self) -> None:
        assert self._stdin is not None
        try:
            while self._data:
                n = os.write(self._stdin, self._data)
                self._data = self._data[n:]
        except BlockingIOError:  # the pipe is full: go on when the child has read some
            self._loop.add_writer(self._stdin, self._stdin_writable)
            return
        except (BrokenPipeError, ConnectionResetError):  # it exited without reading it all
            pass
        self._close_stdin()

    def _stdin_writable(self) -> None:
        assert self._stdin is not None
        self._loop.remove_writer(self._stdin)
        self._write_stdin()

    def _close_stdin(self) -> None:
        if self._stdin is not None:
            self._loop.remove_writer(self._stdin)
            os.close(self._stdin)
            self._stdin = None

    def _readable(self, fd: int) -> None:
        if fd == self._pidfd:
            self._reap()
        else:
            try:
                chunk = os.read(fd, SpawnCommandRunner._READ_SIZE)
            except BlockingIOError:
                return
            if chunk:
                self._bufs[fd].append(chunk)
                return
        self._loop.remove_reader(fd)
        self._open.discard(fd)
        if not self._open and not self._done.done():
            self._done.set_result(None)

    def _reap(self) -> None:
        try:
            _, status = os.waitpid(self.pid, 0)
            self._returncode = os.waitstatus_to_exitcode(status)
        except ChildProcessError:  # reaped by someone else: the exit status is lost
            self._returncode = -1
        # A child that exits without reading its stdin makes further writes pointless.
        self._close_stdin()

    async def finished(self) -> int:
        """Wait until the child has exited and both output pipes are at EOF (a grandchild
        still holding them open keeps this waiting, as ``communicate`` would)."""
        await asyncio.shield(self._done)
        return -1 if self._returncode is None else self._returncode

    def kill(self) -> None:
        if self._returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def output(self) -> tuple[str, str]:
        return (b"".join(self._bufs[self._stdout]).decode(errors="replace"),
                b"".join(self._bufs[self._stderr]).decode(errors="replace"))

    def close(self) -> None:
        """Stop watching and close our ends. A child still running (the caller gave up on
        it) is killed and reaped -- on a thread if it does not go at once, so that one stuck
        in the kernel cannot hold the loop."""
        self._close_stdin()
        for fd in self._open:
            self._loop.remove_reader(fd)
        self._open.clear()
        for fd in (self._stdout, self._stderr):
            os.close(fd)
        if self._returncode is None:
            self.kill()
            try:
                reaped, _ = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                reaped = self.pid
            if not reaped:
                threading.Thread(target=_reap_quietly, args=(self.pid,), daemon=True).start()
        os.close(self._pidfd)


def _reap_quietly(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


class _Killable(Protocol):
    pid: int

    def kill(self) -> None: ...


def kill_group(proc: _Killable) -> None:
    """SIGKILL the process group a command was started in (``start_new_session``), or at
    least the process itself; an already-gone process is fine."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            proc.kill()
        except ProcessLookupError:
            pass


async def _drain(proc: asyncio.subprocess.Process) -> tuple[str, str]:
    """Collect what a killed process had written, without waiting forever."""
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 5)
    except (TimeoutError, ValueError):
        return "", ""
    return out.decode(errors="replace"), err.decode(errors="replace")
