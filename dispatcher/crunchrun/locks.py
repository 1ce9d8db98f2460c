"""Per-container lock files: what makes ``--detach`` exclusive and ``--list``/``--kill`` work.

Contract (reference dispatch.md 5.8): a running crunch-run holds an exclusive ``flock`` on
``<lock dir>/crunch-run-<uuid>.lock`` (default lock dir ``/var/lock``) whose content is
``{"UUID": "<uuid>", "PID": <pid>}``. ``--list`` walks the directory: a file named
``crunch-run-broken`` prints ``broken``; for each non-empty lock file, a lock that can be taken
is stale and deleted; otherwise the PID is sent SIGUSR2 (crunch-run ignores it) and the line is
``<uuid>`` if that worked, ``<uuid> stale`` if not (the process is gone but something it started
still holds the lock). ``--kill N`` signals the PID and waits up to 1 s for the lock to be
released: exit 0 when the process is gone (or was never there), 1 when it is still running.

A holder removes its lock file before releasing it; an acquirer re-checks after ``flock`` that
the path still names the file it locked, so two processes can never both hold "the" lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

DEFAULT_LOCK_DIR = "/var/lock"
BROKEN_FILE = "crunch-run-broken"


class AlreadyRunning(Exception):
    """Another crunch-run holds this container's lock."""


def lock_path(lock_dir: str, uuid: str) -> str:
    return os.path.join(lock_dir, f"crunch-run-{uuid}.lock")


@dataclass
class HeldLock:
    """An acquired lock; keep the object (and so the fd) alive while the container runs."""

    path: str
    fd: int

    def write_owner(self, uuid: str, pid: int) -> None:
        data = json.dumps({"UUID": uuid, "PID": pid}).encode() + b"\n"
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def release(self) -> None:
        """Remove the file, then drop the lock (in that order, see module doc)."""
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            st = os.stat(self.path)
            if st.st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        os.close(self.fd)
        self.fd = -1


def acquire(lock_dir: str, uuid: str) -> HeldLock:
    """Take the container's lock without waiting. Raises :class:`AlreadyRunning` or OSError."""
    path = lock_path(lock_dir, uuid)
    for _ in range(10):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AlreadyRunning(
                f"crunch-run for {uuid} is already running (lock {path} is held)") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return HeldLock(path, fd)
        os.close(fd)  # the previous holder removed it under us: start over
    raise AlreadyRunning(f"cannot get a stable lock file at {path}")


def _try_lock(path: str) -> tuple[bool, int | None]:
    """(lock was free, fd holding it if free). Missing file counts as free with no fd."""
    try:
        # Read-only is enough for flock, and works on a lock file owned by another user.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return True, None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False, None
    return True, fd


def read_owner(path: str) -> tuple[str, int] | None:
    """``(uuid, pid)`` from a lock file, or None if it is empty/unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.loads(f.read() or "null")
        return str(data["UUID"]), int(data["PID"])
    except (OSError, ValueError, TypeError, KeyError):
        return None


def list_runs(lock_dir: str, out: TextIO) -> int:
    """``crunch-run --list`` (see module doc). Returns the exit status."""
    try:
        names = sorted(os.listdir(lock_dir))
    except FileNotFoundError:
        return 0
    for name in names:
        path = os.path.join(lock_dir, name)
        if name == BROKEN_FILE:
            out.write("broken\n")
            continue
        if not (name.startswith("crunch-run-") and name.endswith(".lock")):
            continue
        try:
            if os.path.getsize(path) == 0:
                continue  # being created right now
        except OSError:
            continue
        try:
            free, fd = _try_lock(path)
        except OSError:
            continue  # not ours to inspect
        if free:
            if fd is not None:  # nobody holds it: stale file from a crashed run
                with contextlib.suppress(OSError):
                    os.unlink(path)
                os.close(fd)
            continue
        owner = read_owner(path)
        if owner is None:
            continue
        uuid, pid = owner
        try:
            os.kill(pid, signal.SIGUSR2)
            out.write(f"{uuid}\n")
        except ProcessLookupError:
            out.write(f"{uuid} stale\n")
        except PermissionError:
            out.write(f"{uuid}\n")  # it exists; we just may not signal it
    out.flush()
    return 0


def kill_run(lock_dir: str, uuid: str, sig: int, *, wait_s: float = 1.0,
             err: Callable[[str], None] = print) -> int:
    """``crunch-run --kill N UUID`` (see module doc). Returns the exit status."""
    path = lock_path(lock_dir, uuid)
    try:
        free, fd = _try_lock(path)
    except OSError as exc:
        err(f"cannot check {path}: {exc.strerror} (run as the user that runs crunch-run)")
        return 1
    if free:
        if fd is not None:
            os.close(fd)
        return 0
    owner = read_owner(path)
    if owner is None:
        err(f"crunch-run for {uuid} holds {path} but the file has no PID yet; try again")
        return 1
    _, pid = owner
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass  # the lock is held by a leftover child; report by the lock below
    except PermissionError:
        err(f"not allowed to signal crunch-run PID {pid} for {uuid} (try sudo)")
        return 1
    deadline = time.monotonic() + wait_s
    while True:
        free, fd = _try_lock(path)
        if free:
            if fd is not None:
                os.close(fd)
            return 0
        if time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    err(f"crunch-run for {uuid} (PID {pid}) is still running {wait_s:g}s after signal {sig}")
    return 1
