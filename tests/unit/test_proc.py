"""The command runners: argv only, timeouts, concurrency, errors that carry everything.

Every behaviour is checked for each runner: the plain asyncio one, the worker-thread one and
the posix_spawn one that the scheduler CLIs use.
"""

import asyncio
import os
import sys
import time
from pathlib import Path

import pytest

from dispatcher.proc import (
    CommandFailed,
    CommandNotFound,
    CommandRunner,
    CommandTimeout,
    SpawnCommandRunner,
    ThreadedCommandRunner,
    spawn_supported,
)

RUNNERS = {
    "asyncio": CommandRunner,
    "threaded": ThreadedCommandRunner,
    "spawn": SpawnCommandRunner,
}


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(params=list(RUNNERS))
def make(request):
    """make(**kw) -> a runner of the parametrized kind; thread pools are shut down after."""
    made = []

    def factory(**kw):
        r = RUNNERS[request.param](**kw)
        made.append(r)
        return r

    yield factory
    for r in made:
        if isinstance(r, ThreadedCommandRunner):
            r.close()


def test_the_spawn_runner_really_spawns_here():
    # The Linux CI box has posix_spawn and pidfd_open: the spawn tests below must not be
    # testing the fallback.
    assert spawn_supported()


def test_runs_argv_with_stdin_and_returns_output(make):
    r = run(make().run([sys.executable, "-c", "import sys; print(sys.stdin.read()[::-1])"], stdin="abc"))
    assert r.returncode == 0
    assert r.stdout.strip() == "cba"


def test_large_stdin_and_output_pass_through_whole(make):
    # More than a pipe buffer (64 KiB) in and out: the writer must wait for the reader.
    data = "".join(f"line {i:07d}\n" for i in range(200_000))  # 2.6 MB
    r = run(make().run(["cat"], stdin=data))
    assert r.stdout == data


def test_refuses_shell_string(make):
    with pytest.raises(TypeError):
        run(make().run("echo hi"))  # type: ignore[arg-type]


def test_failure_carries_argv_code_and_stderr(make):
    with pytest.raises(CommandFailed) as ei:
        run(make().run([sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"]))
    assert ei.value.returncode == 3
    assert ei.value.stderr == "boom"
    assert ei.value.argv[0] == sys.executable
    assert "boom" in str(ei.value)


def test_check_false_returns_nonzero_result(make):
    r = run(make().run([sys.executable, "-c", "raise SystemExit(4)"], check=False))
    assert r.returncode == 4


def test_killed_by_a_signal_is_a_negative_status(make):
    r = run(make().run([sys.executable, "-c", "import os; os.kill(os.getpid(), 9)"], check=False))
    assert r.returncode == -9


def test_missing_executable(make):
    with pytest.raises(CommandNotFound):
        run(make().run(["/nonexistent/crunchgate-test-binary"]))
    with pytest.raises(CommandNotFound):
        run(make().run(["crunchgate-test-binary-not-on-path"]))


def test_the_commands_path_is_the_one_in_its_environment(make, tmp_path):
    # Like Popen(argv, env=env): the executable is looked up on env's PATH, not ours.
    (tmp_path / "bin").mkdir()
    tool = tmp_path / "bin" / "crunchgate-fake-tool"
    tool.write_text("#!/bin/sh\necho fake \"$@\"\n")
    tool.chmod(0o755)
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin"}
    r = run(make(env=env).run(["crunchgate-fake-tool", "a b"]))
    assert r.stdout == "fake a b\n"
    with pytest.raises(CommandNotFound):
        run(make().run(["crunchgate-fake-tool"]))
    # Removed after the first use: not found, not a stale path.
    runner = make(env=env)

    async def twice():
        await runner.run(["crunchgate-fake-tool"])
        tool.unlink()
        await runner.run(["crunchgate-fake-tool"])

    with pytest.raises(CommandNotFound):
        run(twice())


def _gone(pid: int, deadline_s: float = 10) -> bool:
    """Whether ``pid`` has ended (absent, or a zombie nobody reaped yet)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def test_timeout_kills_the_process_group(make, tmp_path):
    pidfile = tmp_path / "grandchild"
    code = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pidfile)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(60)"
    )
    t0 = time.monotonic()
    with pytest.raises(CommandTimeout) as ei:
        run(make().run([sys.executable, "-c", code], timeout_s=2))
    assert time.monotonic() - t0 < 10
    assert ei.value.returncode is None
    assert "started" in ei.value.stdout  # what it wrote before the timeout is kept
    assert _gone(int(pidfile.read_text()))


def test_cancelling_the_caller_kills_the_command(make, tmp_path):
    pidfile = tmp_path / "child"
    code = f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    runner = make()

    async def main():
        task = asyncio.ensure_future(runner.run([sys.executable, "-c", code]))
        deadline = time.monotonic() + 20
        while not pidfile.exists() or not pidfile.read_text():
            assert time.monotonic() < deadline, "the command did not start"
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())
    assert _gone(int(pidfile.read_text()))


def test_no_descriptor_is_left_open(make):
    runner = make()

    async def many():
        for _ in range(20):
            await runner.run(["true"])
            await runner.run(["cat"], stdin="x" * 100_000)
            await runner.run(["false"], check=False)
            with pytest.raises(CommandNotFound):
                await runner.run(["/nonexistent/crunchgate-test-binary"])
        with pytest.raises(CommandTimeout):
            await runner.run(["sleep", "30"], timeout_s=0.2)

    async def main():
        await runner.run(["true"])  # warm up: thread pools, the loop's own descriptors
        before = len(os.listdir("/proc/self/fd"))
        await many()
        return before, len(os.listdir("/proc/self/fd"))

    before, after = run(main())
    assert after <= before


def test_the_child_gets_only_stdin_stdout_stderr(make):
    # Nothing of ours (sockets, the database, pipes of other commands) leaks into a job.
    r = run(make().run(["ls", "/proc/self/fd"]))
    assert sorted(int(fd) for fd in r.stdout.split()) == [0, 1, 2, 3]  # 3: ls's own listing


def test_concurrency_limit_is_respected(make, tmp_path):
    # Each command records the number of siblings alive when it starts.
    counter = tmp_path / "n"
    counter.write_text("")
    code = (
        "import os, sys, time, fcntl\n"
        "p = sys.argv[1]\n"
        "def bump(d):\n"
        "    with open(p, 'a+') as f:\n"
        "        fcntl.flock(f, fcntl.LOCK_EX); f.seek(0); lines = f.read().split()\n"
        "        cur = (int(lines[-1].split(':')[0]) if lines else 0) + d\n"
        "        f.write(f'{cur}:{d}\\n')\n"
        "bump(1); time.sleep(0.2); bump(-1)\n"
    )
    runner = make(max_concurrency=2)

    async def main():
        await asyncio.gather(*(runner.run([sys.executable, "-c", code, str(counter)]) for _ in range(6)))

    run(main())
    peaks = [int(line.split(":")[0]) for line in counter.read_text().split()]
    assert max(peaks) <= 2
    assert len(peaks) == 12


def test_redactor_applies_to_errors(make):
    runner = make(redact=lambda s: s.replace("sekrit-token", "[REDACTED]"))
    with pytest.raises(CommandFailed) as ei:
        run(runner.run([sys.executable, "-c", "import sys; sys.stderr.write('token=sekrit-token'); sys.exit(1)"]))
    assert "sekrit-token" not in str(ei.value)
    assert "[REDACTED]" in ei.value.stderr


def test_an_executable_without_interpreter_line_is_a_clear_error(tmp_path):
    # A site's wrapper script that lost its "#!" line: the exec fails (ENOEXEC).
    broken = tmp_path / "sbatch"
    broken.write_bytes(b"\x00\x01not a program\n")
    broken.chmod(0o755)
    runner = SpawnCommandRunner()
    try:
        with pytest.raises(CommandNotFound, match="cannot run: Exec format error"):
            run(runner.run([str(broken)]))
    finally:
        runner.close()
