"""One running instance of a service per cluster on this host: an flock on a lock file.

The Arvados dispatchers hold PostgreSQL advisory lock 10005 while they run (reference 6.4,
appendix A item 9), so a second dispatcher of the cluster waits instead of fighting the first
over the same containers and VMs. crunchgate has no database connection, so that lock is not
available. This guard catches the common accident on one host — the systemd unit is running and
someone starts the same service again by hand, or two units name the same cluster — by taking
an exclusive ``flock`` on ``<lock dir>/crunchgate-<ClusterID>-<service>.lock``. It cannot see a
dispatcher on another host: one dispatcher per cluster is still the operator's job there.

    with HostLock(cfg.cluster_id, "dispatch-cloud"):
        run_the_service()

The second process gets :class:`AlreadyRunning`, whose message names the holder's PID and the
lock file. The lock dies with its process (even on ``kill -9``): no stale lock to clean up. The
file itself is never removed (unlinking a lock file lets two processes hold "the" lock on two
different inodes).

Lock directory: ``$CRUNCHGATE_LOCK_DIR`` if set, else ``/run/lock`` (``/var/lock``: a tmpfs
every local user may write, outside systemd's PrivateTmp) when it is writable, else the
temporary directory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import tempfile
from types import TracebackType

ENV_LOCK_DIR = "CRUNCHGATE_LOCK_DIR"
SYSTEM_LOCK_DIR = "/run/lock"


class AlreadyRunning(RuntimeError):
    """Another process holds the lock; ``holder_pid`` is its PID when known."""

    def __init__(self, message: str, *, holder_pid: int | None, path: str) -> None:
        super().__init__(message)
        self.holder_pid = holder_pid
        self.path = path


def lock_dir() -> str:
    """Where lock files go (see the module docstring)."""
    configured = os.environ.get(ENV_LOCK_DIR)
    if configured:
        return configured
    if os.path.isdir(SYSTEM_LOCK_DIR) and os.access(SYSTEM_LOCK_DIR, os.W_OK | os.X_OK):
        return SYSTEM_LOCK_DIR
    return tempfile.gettempdir()


def lock_path(cluster_id: str, service: str, directory: str | None = None) -> str:
    """``<dir>/crunchgate-<cluster>-<service>.lock`` (names reduced to safe characters)."""
    def safe(s: str) -> str:
        return re.sub(r"[^A-Za-z0-9._-]", "_", s) or "_"

    return os.path.join(directory or lock_dir(),
                        f"crunchgate-{safe(cluster_id)}-{safe(service)}.lock")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True   # exists, owned by someone else
    return True


class HostLock:
    """An exclusive, non-blocking, host-wide lock for ``service`` of ``cluster_id``."""

    def __init__(self, cluster_id: str, service: str, *, directory: str | None = None) -> None:
        self.cluster_id = cluster_id
        self.service = service
        self.path = lock_path(cluster_id, service, directory)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`AlreadyRunning` (or ``OSError`` if the lock file
        cannot be opened at all, e.g. a missing ``$CRUNCHGATE_LOCK_DIR``)."""
        if self._fd is not None:
            return
        writable = True
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except PermissionError:
            # Created by another user (say root, before the service user): a read-only
            # descriptor can be locked just the same; we only cannot record our PID.
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            writable = False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            pid = self._read_pid(fd)
            os.close(fd)
            who = f"PID {pid}" if pid is not None else "PID unknown"
            raise AlreadyRunning(
                f"another crunchgate {self.service} for cluster {self.cluster_id} is already "
                f"running on this host ({who}; lock file {self.path}); stop it first: only one "
                "may run per cluster", holder_pid=pid, path=self.path) from None
        if writable:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    @staticmethod
    def _read_pid(fd: int) -> int | None:
        try:
            text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            pid = int(text.split()[0]) if text else None
        except (OSError, ValueError, IndexError):
            return None
        # A PID left by an earlier holder that could write when the current one cannot.
        return pid if pid is not None and _alive(pid) else None

    def release(self) -> None:
        """Drop the lock (also dropped when the process exits, however it exits)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> HostLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


__all__ = ["AlreadyRunning", "HostLock", "lock_dir", "lock_path"]
