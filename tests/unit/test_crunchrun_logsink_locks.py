"""crunch-run's batched log sink, lock files (--list/--kill), argv normalisation, gateway hook."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import io
import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from dispatcher.arvados.errors import ApiUnavailable
from dispatcher.crunchrun import locks
from dispatcher.crunchrun.gateway import GatewayContext, start_gateway
from dispatcher.crunchrun.logsink import LogSink
from dispatcher.crunchrun.main import normalize_argv
from dispatcher.logs import register_secret

UUID = "zzzzz-dz642-000000000000001"


class Recorder:
    def __init__(self, fail: int = 0) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail = fail

    async def __call__(self, event_type: str, text: str) -> None:
        if self.fail:
            self.fail -= 1
            raise ApiUnavailable(503, ["busy"], "POST", "/arvados/v1/logs")
        self.calls.append((event_type, text))


def test_logsink_batches_many_lines_into_few_uploads() -> None:
    rec = Recorder()

    async def go() -> None:
        sink = LogSink(rec, flush_interval_s=3600, batch_bytes=1000)
        sink.start()
        for i in range(500):
            sink.write("stdout", f"line {i}\n")
        sink.write("stderr", "err\n")
        await sink.close()

    asyncio.run(go())
    out = "".join(t for et, t in rec.calls if et == "stdout")
    assert out == "".join(f"line {i}\n" for i in range(500))
    assert 3 <= len(rec.calls) <= 12  # ~4.4 KB in 1000-char batches, not 500 calls
    assert ("stderr", "err\n") in rec.calls
    assert all(len(t) <= 1000 for _, t in rec.calls)


def test_logsink_close_flushes_tail_without_interval() -> None:
    rec = Recorder()

    async def go() -> None:
        sink = LogSink(rec, flush_interval_s=3600)
        sink.start()
        sink.write("stdout", "tail without newline")
        await sink.close()

    asyncio.run(go())
    assert rec.calls == [("stdout", "tail without newline")]


def test_logsink_keeps_text_when_upload_fails_then_sends_it() -> None:
    rec = Recorder(fail=1)

    async def go() -> None:
        sink = LogSink(rec, flush_interval_s=3600)
        sink.write("stdout", "a\n")
        await sink.flush()  # fails: kept
        sink.write("stdout", "b\n")
        await sink.close()

    asyncio.run(go())
    assert rec.calls == [("stdout", "a\nb\n")]


def test_logsink_bounded_buffer_drops_oldest_and_says_so() -> None:
    rec = Recorder(fail=10**6)

    async def go() -> LogSink:
        sink = LogSink(rec, flush_interval_s=3600, max_buffer_bytes=100)
        for _ in range(50):
            sink.write("stdout", "012345678\n")
        return sink

    sink = asyncio.run(go())
    assert sink._size <= 100
    assert sink.dropped_chars == 400


def test_logsink_redacts_registered_secrets() -> None:
    register_secret("sinksecretvalue123")
    rec = Recorder()

    async def go() -> None:
        sink = LogSink(rec)
        sink.write("stdout", "token=sinksecretvalue123\n")
        await sink.close()

    asyncio.run(go())
    assert "sinksecretvalue123" not in rec.calls[0][1]


def test_logsink_catches_a_secret_cut_by_a_read_and_shows_an_idle_tail() -> None:
    register_secret("cutsecretvalue4567")
    rec = Recorder()

    async def go() -> None:
        sink = LogSink(rec, flush_interval_s=0.05)
        sink.start()
        sink.write("stdout", "token=cutsec")
        await sink.flush()  # an upload between the two reads
        sink.write("stdout", "retvalue4567\n")
        sink.write("stdout", "Password: abc")  # a prompt: no newline, nothing follows
        deadline = asyncio.get_running_loop().time() + 10
        while "abc" not in "".join(t for _, t in rec.calls):
            assert asyncio.get_running_loop().time() < deadline, rec.calls
            await asyncio.sleep(0.02)
        await sink.close()

    asyncio.run(go())
    out = "".join(t for _, t in rec.calls)
    assert out == "token=[REDACTED]\nPassword: abc"


def test_normalize_go_style_flags() -> None:
    assert normalize_argv(["-runtime-engine=docker", "-detach", "-kill", "15", "-list",
                           "--config=x", UUID, "--", "-x"]) == [
        "--runtime-engine=docker", "--detach", "--kill", "15", "--list", "--config=x", UUID,
        "--", "-x"]


def _hold(path: Path, owner: dict[str, Any] | None) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    if owner is not None:
        os.write(fd, json.dumps(owner).encode())
    return fd


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_list_live_stale_free_and_broken(tmp_path: Path) -> None:
    live = "zzzzz-dz642-aaaaaaaaaaaaaaa"
    stale = "zzzzz-dz642-bbbbbbbbbbbbbbb"
    free = "zzzzz-dz642-ccccccccccccccc"
    fds = [_hold(tmp_path / f"crunch-run-{live}.lock", {"UUID": live, "PID": os.getpid()}),
           _hold(tmp_path / f"crunch-run-{stale}.lock", {"UUID": stale, "PID": _dead_pid()})]
    (tmp_path / f"crunch-run-{free}.lock").write_text(json.dumps({"UUID": free, "PID": 1}))
    (tmp_path / "crunch-run-broken").write_text("")
    (tmp_path / "unrelated.lock").write_text("x")
    import signal

    old = signal.signal(signal.SIGUSR2, lambda *a: None)  # we stand in for a live crunch-run
    try:
        out = io.StringIO()
        assert locks.list_runs(str(tmp_path), out) == 0
    finally:
        signal.signal(signal.SIGUSR2, old)
        for fd in fds:
            os.close(fd)
    assert sorted(out.getvalue().splitlines()) == sorted(["broken", live, f"{stale} stale"])
    assert not (tmp_path / f"crunch-run-{free}.lock").exists()  # stale file removed


def test_acquire_is_exclusive_and_release_removes_file(tmp_path: Path) -> None:
    held = locks.acquire(str(tmp_path), UUID)
    held.write_owner(UUID, 1234)
    assert locks.read_owner(locks.lock_path(str(tmp_path), UUID)) == (UUID, 1234)
    with pytest.raises(locks.AlreadyRunning):
        locks.acquire(str(tmp_path), UUID)
    held.release()
    assert not Path(locks.lock_path(str(tmp_path), UUID)).exists()
    locks.acquire(str(tmp_path), UUID).release()


def test_kill_without_lock_file_is_success(tmp_path: Path) -> None:
    assert locks.kill_run(str(tmp_path), UUID, 15) == 0


def test_kill_reports_a_survivor(tmp_path: Path) -> None:
    # A holder that ignores the signal: --kill must say so (exit 1), not pretend.
    fd = _hold(tmp_path / f"crunch-run-{UUID}.lock", {"UUID": UUID, "PID": _dead_pid()})
    msgs: list[str] = []
    try:
        assert locks.kill_run(str(tmp_path), UUID, 15, wait_s=0.1, err=msgs.append) == 1
    finally:
        os.close(fd)
    assert "still running" in msgs[0]
    assert locks.kill_run(str(tmp_path), UUID, 15, wait_s=0.1) == 0


def _ctx() -> GatewayContext:
    return GatewayContext(container_uuid=UUID, auth_secret="gwsecret-0123456789",
                          client=None,  # type: ignore[arg-type]
                          exec_argv=lambda c, t: c, container_env={}, container_cwd="/",
                          target_ip="127.0.0.1")


def test_gateway_hook_missing_module_is_fine() -> None:
    assert asyncio.run(start_gateway(_ctx(), "no_such_module_for_crunchgate")) is None
    assert "gwsecret" not in repr(_ctx())


@pytest.mark.parametrize("style", ["acm", "aclose", "awaitable"])
def test_gateway_hook_styles(style: str, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []

    class Gw:
        async def __aenter__(self) -> Gw:
            events.append("enter")
            return self

        async def __aexit__(self, *a: object) -> None:
            events.append("exit")

    class Closer:
        async def aclose(self) -> None:
            events.append("aclose")

    def start(ctx: GatewayContext) -> Any:
        events.append(f"start {ctx.container_uuid}")
        if style == "acm":
            return Gw()
        if style == "aclose":
            return Closer()

        async def later() -> Closer:
            return Closer()

        return later()

    mod = types.ModuleType("fake_tunnel_agent")
    mod.start_gateway = start  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_tunnel_agent", mod)

    async def go() -> None:
        handle = await start_gateway(_ctx(), "fake_tunnel_agent")
        assert handle is not None
        await handle.aclose()
        await handle.aclose()  # idempotent

    asyncio.run(go())
    want = {"acm": ["enter", "exit"], "aclose": ["aclose"], "awaitable": ["aclose"]}[style]
    assert events == [f"start {UUID}", *want]


def test_gateway_close_is_bounded_and_recancels(monkeypatch: pytest.MonkeyPatch) -> None:
    """A gateway whose first cancellation is lost is cancelled again; close never hangs."""
    events: list[str] = []

    class Sticky:
        def __init__(self) -> None:
            self.task = asyncio.get_running_loop().create_task(self.loop())

        async def loop(self) -> None:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                events.append("first cancel swallowed")
            await asyncio.sleep(3600)  # the second cancel ends it

        async def aclose(self) -> None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            events.append("closed")

    mod = types.ModuleType("sticky_agent")
    mod.start_gateway = lambda ctx: Sticky()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sticky_agent", mod)

    async def go() -> bool:
        handle = await start_gateway(_ctx(), "sticky_agent")
        assert handle is not None
        handle.close_timeout_s = 0.5
        await handle.aclose()
        return all(t.done() for t in asyncio.all_tasks() if t is not asyncio.current_task())

    assert asyncio.run(go())
    assert events[0] == "first cancel swallowed"
