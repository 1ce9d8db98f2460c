"""dispatcher.hostlock: one service instance per cluster and host (instead of the reference's
PostgreSQL advisory lock 10005). Real processes: the holder is a separate Python process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from dispatcher.hostlock import ENV_LOCK_DIR, AlreadyRunning, HostLock, lock_dir, lock_path

HOLDER = """
import sys
from dispatcher.hostlock import HostLock
lock = HostLock(sys.argv[1], sys.argv[2], directory=sys.argv[3])
lock.acquire()
print("held", flush=True)
sys.stdin.read()
"""


def start_holder(tmp_path, cluster="zzzzz", service="dispatch-cloud"):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, cluster, service, str(tmp_path)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()   # blocks until the holder has the lock (or died)
    assert line.strip() == "held", line
    return proc


def stop(proc):
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def test_second_process_is_refused_with_the_holders_pid(tmp_path):
    holder = start_holder(tmp_path)
    try:
        lock = HostLock("zzzzz", "dispatch-cloud", directory=str(tmp_path))
        with pytest.raises(AlreadyRunning) as ei:
            lock.acquire()
        assert ei.value.holder_pid == holder.pid
        msg = str(ei.value)
        assert f"PID {holder.pid}" in msg and "zzzzz" in msg and "dispatch-cloud" in msg
        assert ei.value.path in msg and not lock.held
        # Another service, or another cluster, is a different lock.
        with HostLock("zzzzz", "dispatch-slurm", directory=str(tmp_path)):
            pass
        with HostLock("yyyyy", "dispatch-cloud", directory=str(tmp_path)):
            pass
        # kill -9 of the holder frees the lock at once: nothing stale to clean up.
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        with HostLock("zzzzz", "dispatch-cloud", directory=str(tmp_path)) as again:
            assert again.held
            with open(again.path) as fh:
                assert fh.read().strip() == str(os.getpid())
        assert not again.held
    finally:
        stop(holder)


def test_released_lock_can_be_taken_by_the_next_process(tmp_path):
    lock = HostLock("zzzzz", "dispatch-cloud", directory=str(tmp_path))
    lock.acquire()
    lock.release()
    holder = start_holder(tmp_path)   # would fail to print "held" if we still had it
    stop(holder)


def test_lock_location(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_LOCK_DIR, str(tmp_path))
    assert lock_dir() == str(tmp_path)
    assert lock_path("zzzzz", "dispatch-cloud") == str(tmp_path / "crunchgate-zzzzz-dispatch-cloud.lock")
    assert lock_path("a/b", "x y", "/d") == "/d/crunchgate-a_b-x_y.lock"
    monkeypatch.delenv(ENV_LOCK_DIR)
    assert os.path.isdir(lock_dir())


def test_unknown_holder_pid_is_not_made_up(tmp_path):
    """A file whose recorded PID is dead (left by an earlier holder) names no PID."""
    holder = start_holder(tmp_path)
    try:
        path = lock_path("zzzzz", "dispatch-cloud", str(tmp_path))
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait(10)
        with open(path, "r+") as fh:   # the holder wrote its PID before printing "held"
            assert fh.read().strip() == str(holder.pid)
            fh.seek(0)
            fh.truncate()
            fh.write(f"{dead.pid}\n")
        with pytest.raises(AlreadyRunning, match="PID unknown") as ei:
            HostLock("zzzzz", "dispatch-cloud", directory=str(tmp_path)).acquire()
        assert ei.value.holder_pid is None
    finally:
        stop(holder)
