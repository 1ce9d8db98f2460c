"""The command runner: argv only, timeouts, concurrency, errors that carry everything."""

import asyncio
import sys
import time

import pytest

from dispatcher.proc import CommandFailed, CommandNotFound, CommandRunner, CommandTimeout


def run(coro):
    return asyncio.run(coro)


def test_runs_argv_with_stdin_and_returns_output():
    r = run(CommandRunner().run([sys.executable, "-c", "import sys; print(sys.stdin.read()[::-1])"], stdin="abc"))
    assert r.returncode == 0
    assert r.stdout.strip() == "cba"


def test_refuses_shell_string():
    with pytest.raises(TypeError):
        run(CommandRunner().run("echo hi"))  # type: ignore[arg-type]


def test_failure_carries_argv_code_and_stderr():
    with pytest.raises(CommandFailed) as ei:
        run(CommandRunner().run([sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"]))
    assert ei.value.returncode == 3
    assert ei.value.stderr == "boom"
    assert ei.value.argv[0] == sys.executable
    assert "boom" in str(ei.value)


def test_check_false_returns_nonzero_result():
    r = run(CommandRunner().run([sys.executable, "-c", "raise SystemExit(4)"], check=False))
    assert r.returncode == 4


def test_missing_executable():
    with pytest.raises(CommandNotFound):
        run(CommandRunner().run(["/nonexistent/crunchgate-test-binary"]))


def test_timeout_kills_the_process_group():
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    t0 = time.monotonic()
    with pytest.raises(CommandTimeout) as ei:
        run(CommandRunner().run([sys.executable, "-c", code], timeout_s=0.5))
    assert time.monotonic() - t0 < 10
    assert ei.value.returncode is None


def test_concurrency_limit_is_respected(tmp_path):
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
    runner = CommandRunner(max_concurrency=2)

    async def main():
        await asyncio.gather(*(runner.run([sys.executable, "-c", code, str(counter)]) for _ in range(6)))

    run(main())
    peaks = [int(line.split(":")[0]) for line in counter.read_text().split()]
    assert max(peaks) <= 2
    assert len(peaks) == 12


def test_redactor_applies_to_errors():
    runner = CommandRunner(redact=lambda s: s.replace("sekrit-token", "[REDACTED]"))
    with pytest.raises(CommandFailed) as ei:
        run(runner.run([sys.executable, "-c", "import sys; sys.stderr.write('token=sekrit-token'); sys.exit(1)"]))
    assert "sekrit-token" not in str(ei.value)
    assert "[REDACTED]" in ei.value.stderr
