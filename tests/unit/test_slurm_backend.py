"""SlurmBackend and the CLI layer with stand-in Slurm commands (shell scripts on PATH): error
classification, back-off, the end-of-job report, sbatch retries. The real thing is exercised in
tests/integration/test_slurm_*.py."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from dispatcher.config import ClusterConfig, load_config
from dispatcher.core.backend import QueryFailed, SubmitFailed
from dispatcher.slurm.backend import SlurmBackend
from dispatcher.slurm.commands import Backoff, SlurmCLI
from tests.helpers.paths import REPO_ROOT
from tests.helpers.procs import alive

U1 = "zzzzz-dz642-aaaaaaaaaaaaaaa"
U2 = "zzzzz-dz642-bbbbbbbbbbbbbbb"


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


class FakeSlurm:
    """Writes squeue/sbatch/scancel/scontrol scripts into a directory put first on PATH."""

    def __init__(self, tmp: Path) -> None:
        self.bin = tmp / "bin"
        self.bin.mkdir()
        self.calls = tmp / "calls"
        self.calls.touch()
        self.env = {**os.environ, "PATH": f"{self.bin}:{os.environ['PATH']}"}
        for cmd in ("squeue", "sbatch", "scancel", "scontrol"):
            self.set(cmd, "exit 0")

    def set(self, cmd: str, body: str) -> None:
        p = self.bin / cmd
        p.write_text(f'#!/bin/sh\necho "{cmd} $*" >> {self.calls}\n{body}\n')
        p.chmod(0o755)

    def count(self, cmd: str) -> int:
        return sum(1 for ln in self.calls.read_text().splitlines() if ln.split()[0] == cmd)


def cfg() -> ClusterConfig:
    c = ClusterConfig(cluster_id="zzzzz", system_root_token="unit-test-root-token-0123456789")
    c.services.controller.external_url = "https://127.0.0.1:1"
    return c


def backend(fake: FakeSlurm, **kw: Any) -> SlurmBackend:
    cli = SlurmCLI(timeout_s=kw.pop("timeout_s", 5), env=fake.env,
                   backoff=Backoff(base_s=0.05, max_s=0.2))
    return SlurmBackend(cfg(), cli=cli, **kw)


def ctr(uuid: str = U1) -> dict[str, Any]:
    return {"uuid": uuid, "runtime_constraints": {"ram": 1 << 20, "vcpus": 1},
            "scheduling_parameters": {}, "mounts": {}}


def test_backoff_doubles_with_jitter_and_resets() -> None:
    now = [100.0]
    b = Backoff(base_s=1, max_s=8, clock=lambda: now[0], rand=lambda: 1.0)
    assert b.remaining_s() == 0
    assert [b.failure() for _ in range(5)] == [1, 2, 4, 8, 8]
    assert b.remaining_s() == 8
    b.success()
    assert b.remaining_s() == 0
    low = Backoff(base_s=1, max_s=8, clock=lambda: now[0], rand=lambda: 0.0)
    assert [low.failure() for _ in range(3)] == [0.5, 1, 2]  # never less than half


def test_squeue_controller_error_backs_off_without_more_rpcs(tmp_path: Path) -> None:
    fake = FakeSlurm(tmp_path)
    fake.set("squeue", "echo 'slurm_load_jobs error: Socket timed out on send/recv operation' "
                       ">&2; exit 1")
    be = backend(fake)
    with pytest.raises(QueryFailed, match="Socket timed out"):
        run(be.list_jobs())
    with pytest.raises(QueryFailed, match="backing off"):
        run(be.list_jobs())
    assert fake.count("squeue") == 1
    assert be.cli.metrics.errors.labels("squeue", "controller")._value.get() == 1
    assert be.cli.metrics.errors.labels("squeue", "backoff")._value.get() == 1


def test_hung_squeue_is_a_timeout_not_an_empty_queue(tmp_path: Path) -> None:
    fake = FakeSlurm(tmp_path)
    fake.set("squeue", "exec sleep 30")
    be = backend(fake, timeout_s=0.5)
    with pytest.raises(QueryFailed, match="no answer within"):
        run(be.list_jobs())


def test_end_states_reported_once(tmp_path: Path) -> None:
    fake = FakeSlurm(tmp_path)
    out = tmp_path / "squeue.out"
    fake.set("squeue", f"cat {out}")
    reports: list[tuple[str, str]] = []

    async def hook(name: str, text: str, row: Any) -> None:
        reports.append((name, text))

    be = backend(fake, on_job_ended=hook)
    out.write_text(f"7 0 100 RUNNING compute {U1} None\n8 0 100 RUNNING compute {U2} None\n"
                   "9 0 100 TIMEOUT compute not-a-container TimeLimit\n")
    assert set(run(be.list_jobs())) == {U1, U2}
    out.write_text(f"7 0 100 TIMEOUT compute {U1} TimeLimit\n8 0 100 COMPLETED compute {U2} None\n"
                   "6 0 100 NODE_FAIL big zzzzz-dz642-ccccccccccccccc None\n")
    assert run(be.list_jobs()) == {}
    assert sorted(reports) == [
        (U1, "Slurm job 7 ended: it reached its time limit (TIMEOUT, reason TimeLimit)"),
        ("zzzzz-dz642-ccccccccccccccc", "Slurm job 6 ended: its node failed (NODE_FAIL)"),
    ]
    run(be.list_jobs())
    assert len(reports) == 2  # once per job


def test_failing_hook_does_not_break_the_poll(tmp_path: Path) -> None:
    fake = FakeSlurm(tmp_path)
    fake.set("squeue", f"echo '5 0 1 OUT_OF_MEMORY compute {U1} OutOfMemory'")

    async def hook(name: str, text: str, row: Any) -> None:
        raise RuntimeError("controller down")

    assert run(backend(fake, on_job_ended=hook).list_jobs()) == {}


def test_sbatch_transient_errors_retry_then_give_up_transiently(tmp_path: Path) -> None:
    fake = FakeSlurm(tmp_path)
    fake.set("sbatch", "echo 'sbatch: error: Slurm temporarily unable to accept job, sleeping "
                       "and retrying' >&2; exit 1")
    fake.set("squeue", "exit 0")  # the lookups after each failure find nothing
    be = backend(fake)
    with pytest.raises(SubmitFailed) as ei:
        run(be.submit(ctr()))
    assert not ei.value.permanent
    assert fake.count("sbatch") == 3
    # before every retry, the name was looked up: an sbatch that failed may have created it
    assert fake.count("squeue") >= 2


def test_sbatch_rejection_is_permanent_and_not_retried(tmp_path: Path) -> None:
    fake = FakeSlurm(tmp_path)
    fake.set("sbatch", "echo 'sbatch: error: Batch job submission failed: Invalid partition name "
                       "specified' >&2; exit 1")
    be = backend(fake)
    with pytest.raises(SubmitFailed) as ei:
        run(be.submit(ctr()))
    assert ei.value.permanent and "Invalid partition name specified" in ei.value.message
    assert fake.count("sbatch") == 1


def test_sbatch_reply_lost_but_job_created_is_not_resubmitted(tmp_path: Path) -> None:
    fake = FakeSlurm(tmp_path)
    fake.set("sbatch", "echo 'sbatch: error: Batch job submission failed: Socket timed out on "
                       "send/recv operation' >&2; exit 1")
    fake.set("squeue", f"echo '12 10000 1 PENDING compute {U1} Priority'")
    be = backend(fake)
    run(be.submit(ctr()))  # succeeds: the job exists
    assert fake.count("sbatch") == 1


def test_token_in_sbatch_environment_not_argv_or_stdin(tmp_path: Path) -> None:
    fake = FakeSlurm(tmp_path)
    dump = tmp_path / "dump"
    fake.set("sbatch", f'env > {dump}.env; cat > {dump}.stdin; echo "$*" > {dump}.argv; '
                       "echo 'Submitted batch job 3'")
    be = backend(fake)
    run(be.submit(ctr()))
    token = cfg().system_root_token
    assert f"ARVADOS_API_TOKEN={token}" in Path(f"{dump}.env").read_text()
    assert token not in Path(f"{dump}.stdin").read_text()
    assert token not in Path(f"{dump}.argv").read_text()
    assert Path(f"{dump}.stdin").read_text().startswith("#!/bin/sh\nGatewayAuthSecret='")


def test_cancel_order_and_stop_at_first_failure(tmp_path: Path) -> None:
    fake = FakeSlurm(tmp_path)
    be = backend(fake)
    run(be.cancel(U1, None))
    lines = fake.calls.read_text().splitlines()
    assert lines == [
        f"scancel --name={U1} --state=pending",
        f"scancel --name={U1} --batch --signal=TERM --state=running",
        f"scancel --name={U1} --batch --signal=TERM --state=suspended",
    ]


def test_example_config_loads() -> None:
    c = load_config(REPO_ROOT / "contrib" / "slurm" / "config.example.yml")
    assert c.containers.slurm.sbatch_arguments_list[0] == "--job-name=%U"
    assert c.services.dispatch_slurm.internal_urls


def test_a_secret_echoed_by_a_failing_command_is_scrubbed_from_the_error(tmp_path: Path) -> None:
    # A site wrapper around sbatch that prints its environment when Slurm refuses the job:
    # the token must not reach runtime_status.error, logs or the health report.
    fake = FakeSlurm(tmp_path)
    fake.set("sbatch", 'echo "sbatch: error: Invalid partition name specified '
                       '(ARVADOS_API_TOKEN=$ARVADOS_API_TOKEN)" >&2; exit 1')
    be = backend(fake)
    with pytest.raises(SubmitFailed) as ei:
        run(be.submit(ctr()))
    assert ei.value.permanent
    assert "unit-test-root-token-0123456789" not in ei.value.message
    assert "[REDACTED]" in ei.value.message


def test_scheduling_status_waits_until_a_job_has_been_pending_a_while() -> None:
    """A burst of submissions costs no runtime_status update while it is being submitted: a
    job's pending reason is published once it has been pending for two more polls."""
    from dispatcher.core.loop import Dispatcher
    from tests.helpers.core import FakeArvados, core_run
    from tests.helpers.slurm import SlurmModel

    api = FakeArvados()
    uuids = [api.add_container(priority=1) for _ in range(20)]
    model = SlurmModel()
    c = cfg()
    c.containers.runtime_engine = "local"
    be = SlurmBackend(c, cli=SlurmCLI(timeout_s=5))
    model.attach(be.cli)
    disp = Dispatcher(c, api, be)

    async def poll() -> int:
        await disp.poll_once()
        await disp.wait_idle()
        return len(api.ops("update"))

    async def go() -> list[int]:
        await disp.start()
        return [await poll() for _ in range(4)]

    # poll 1 submits; polls 2 and 3 see the jobs pending; poll 4 publishes their reason
    assert core_run(go()) == [0, 0, 0, 20]
    assert {api.containers[u]["runtime_status"]["scheduling_status"] for u in uuids} == {
        "waiting: partition compute is down"}


def test_a_cancelled_command_is_killed_not_left_running(tmp_path: Path, monkeypatch: Any) -> None:
    """Commands run on worker threads; when the caller gives up (here a renice pass cut by its
    deadline) the process group is killed at once, not left to its own timeout."""
    import time

    from dispatcher.core.backend import Job
    from dispatcher.slurm import backend as backend_mod

    monkeypatch.setattr(backend_mod, "RENICE_PASS_MIN_S", 0.3)
    fake = FakeSlurm(tmp_path)
    pids = tmp_path / "pids"
    fake.set("scontrol", f"echo $$ >> {pids}; exec sleep 30")
    be = backend(fake, timeout_s=0.01)  # the pass deadline: max(0.3 s, 4 x 0.01 s) ...
    be.cli.renice_runner.default_timeout_s = 60  # ... while each command may run a minute
    jobs = {u: Job(name=u, job_id=str(i), state="PENDING", nice=10000, priority=100,
                   pending=True) for i, u in enumerate((U1, U2))}
    t0 = time.monotonic()
    run(be.set_priorities({U1: 2, U2: 1}, jobs))
    assert time.monotonic() - t0 < 5
    deadline = time.monotonic() + 5
    started = [int(p) for p in pids.read_text().split()]
    assert len(started) == 2
    while any(alive(p) for p in started):
        assert time.monotonic() < deadline, "a cancelled scontrol is still running"
        time.sleep(0.05)


def test_prefetched_listing_serves_the_first_poll_only(tmp_path: Path) -> None:
    """The squeue started at start-up (while the rest is imported) is the first poll's; later
    polls run their own; one that waited too long is not used."""
    fake = FakeSlurm(tmp_path)
    out = tmp_path / "squeue.out"
    fake.set("squeue", f"cat {out}")
    out.write_text(f"7 0 100 PENDING compute {U1} None\n")
    be = backend(fake)

    async def main() -> tuple[set[str], set[str]]:
        await be.prefetch_jobs()
        # The command already runs: what it lists is what the queue held at start-up.
        deadline = asyncio.get_running_loop().time() + 10
        while fake.count("squeue") < 1:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        first = set(await be.list_jobs())
        out.write_text(f"8 0 100 PENDING compute {U2} None\n")
        second = set(await be.list_jobs())
        return first, second

    first, second = run(main())
    assert first == {U1} and second == {U2}
    assert fake.count("squeue") == 2

    stale = backend(fake)
    stale.PREFETCH_MAX_AGE_S = 0.0

    async def late() -> set[str]:
        await stale.prefetch_jobs()
        deadline = asyncio.get_running_loop().time() + 10
        while fake.count("squeue") < 3:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        out.write_text(f"9 0 100 PENDING compute {U1} None\n")
        return set(await stale.list_jobs())

    assert run(late()) == {U1}
    assert fake.count("squeue") == 4  # the stale one and a fresh one
