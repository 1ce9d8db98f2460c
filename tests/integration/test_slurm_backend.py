"""SlurmBackend against the real Slurm 22.05 dev cluster (no controller: container records are
plain dicts, crunch-run is a small shell stand-in that records what it was given)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import stat
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from dispatcher.config import ClusterConfig, parse_config
from dispatcher.core.backend import CancelFailed, QueryFailed, SubmitFailed
from dispatcher.slurm.backend import SlurmBackend
from dispatcher.slurm.commands import Backoff, SlurmCLI
from tests.helpers.slurm import SlurmCluster, slurm_wait_for

pytestmark = pytest.mark.slurm

TOKEN = "v2/zzzzz-gj3su-000000000000000/slurmbackendtesttoken0123456789"

FAKE_CRUNCH_RUN = """#!/bin/sh
# stand-in for crunch-run: record argv and environment, then wait to be told to stop
out={outdir}/$(echo "$@" | awk '{{print $NF}}')
env > "$out.env"
printf '%s\\n' "$@" > "$out.argv"
trap 'echo TERM > "$out.term"; exit 0' TERM
echo started > "$out.started"
i=0
while [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
"""


def run(coro: Coroutine[Any, Any, Any], timeout_s: float = 60) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


def make_cfg(tmp: Path, **containers: Any) -> ClusterConfig:
    outdir = tmp / "out"
    outdir.mkdir(exist_ok=True)
    fake = tmp / "fake-crunch-run"
    fake.write_text(FAKE_CRUNCH_RUN.format(outdir=outdir))
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    data = {
        "Clusters": {
            "zzzzz": {
                "SystemRootToken": TOKEN,
                "Services": {"Controller": {"ExternalURL": "https://127.0.0.1:1"}},
                "TLS": {"Insecure": True},
                "Containers": {
                    "CrunchRunCommand": str(fake),
                    "RuntimeEngine": "local",
                    "ReserveExtraRAM": "10MiB",
                    "LocalKeepBlobBuffersPerVCPU": 0,
                    "CloudVMs": {"PollInterval": "0.5s"},
                    "SLURM": {
                        "SbatchArgumentsList": [
                            "--job-name=%U", "--mem=%M", "--cpus-per-task=%C", "--tmp=%T",
                            "--partition=%P", f"--output={tmp}/slurm-%%j.out",
                        ],
                        "SbatchEnvironmentVariables": {"CRUNCHGATE_TEST_VAR": "it's $(here)"},
                    },
                    **containers,
                },
            }
        }
    }
    return parse_config(data)


def ctr(uuid: str, *, partitions: list[str] | None = None, ram: int = 64 << 20,
        vcpus: int = 1, gpus: int = 0) -> dict[str, Any]:
    rc: dict[str, Any] = {"ram": ram, "vcpus": vcpus}
    if gpus:
        rc["gpu"] = {"stack": "cuda", "device_count": gpus, "driver_version": "12.0",
                     "hardware_target": ["8.0"]}
    return {
        "uuid": uuid, "state": "Locked", "priority": 1, "runtime_constraints": rc,
        "scheduling_parameters": {"partitions": partitions or []}, "mounts": {},
    }


def uuid(n: int) -> str:
    return f"zzzzz-dz642-slurmbe{n:08d}"


def test_submit_lists_pending_with_reason_and_env(slurm: SlurmCluster, tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    backend = SlurmBackend(cfg)

    async def go() -> None:
        await backend.submit(ctr(uuid(1), partitions=["parked"]))
        jobs = await backend.list_jobs()
        job = jobs[uuid(1)]
        assert job.pending and job.state == "PENDING"
        assert job.nice == 10000  # --nice=10000 came first
        # Nothing to publish until the job has been pending for two more listings (a job that
        # starts or settles within seconds costs no container update).
        assert backend.scheduling_status(job) == ""
        await backend.list_jobs()
        await backend.list_jobs()
        # From then on the status follows Slurm's reason, which its scheduler sets on its next
        # pass (the reason is "None" until then): wait for it, with a deadline.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while (job := (await backend.list_jobs())[uuid(1)]).reason == "None":
            assert loop.time() < deadline, "Slurm never gave the pending job a reason"
            await asyncio.sleep(0.5)
        assert backend.scheduling_status(job) == "waiting: partition parked is down"

    run(go())
    # exactly one job by that name, and nothing was run
    assert len(slurm.live_jobs()[uuid(1)]) == 1


def test_job_gets_env_not_script_and_runs_literally(slurm: SlurmCluster, tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    backend = SlurmBackend(cfg)
    u = uuid(2)
    run(backend.submit(ctr(u)))
    started = tmp_path / "out" / f"{u}.started"
    slurm_wait_for(started.exists, 30, what="the fake crunch-run to start")
    argv = (tmp_path / "out" / f"{u}.argv").read_text().splitlines()
    assert argv == ["--runtime-engine=local", u]
    env = dict(
        line.split("=", 1) for line in (tmp_path / "out" / f"{u}.env").read_text().splitlines()
        if "=" in line
    )
    assert env["ARVADOS_API_HOST"] == "127.0.0.1:1"
    assert env["ARVADOS_API_TOKEN"] == TOKEN
    assert env["ARVADOS_API_HOST_INSECURE"] == "1"
    assert env["CRUNCHGATE_TEST_VAR"] == "it's $(here)"  # literal, not expanded
    assert env["GatewayAuthSecret"] == hmac.new(TOKEN.encode(), u.encode(),
                                                hashlib.sha256).hexdigest()
    # The token travels in sbatch's environment, never in the job script Slurm stores.
    job_id = slurm.live_jobs()[u][0][0]
    script_dir = Path(slurm.dir) / "spool" / "ctld"
    stored = b"".join(p.read_bytes() for p in script_dir.rglob("script") if job_id in str(p))
    assert stored, "expected slurmctld to store the job script"
    assert TOKEN.encode() not in stored

    # cancel a running job: TERM to the batch shell only, crunch-run gets to clean up
    run(backend.cancel(u, None))
    slurm_wait_for((tmp_path / "out" / f"{u}.term").exists, 30, what="TERM to reach crunch-run")
    slurm_wait_for(lambda: u not in slurm.live_jobs(), 30, what="the job to end")


def test_cancel_pending(slurm: SlurmCluster, tmp_path: Path) -> None:
    backend = SlurmBackend(make_cfg(tmp_path))
    run(backend.submit(ctr(uuid(3), partitions=["parked"])))
    assert uuid(3) in slurm.live_jobs()
    run(backend.cancel(uuid(3), None))
    assert uuid(3) not in slurm.live_jobs()
    assert uuid(3) not in run(backend.list_jobs())


@pytest.mark.parametrize(
    ("kw", "slurm_says"),
    [
        ({"partitions": ["nosuchpartition"]}, "Invalid partition name specified"),
        ({"ram": 1 << 50}, "Memory specification can not be satisfied"),
        ({"gpus": 5}, "Requested node configuration is not available"),
    ],
)
def test_rejected_submission_is_permanent_and_quotes_slurm(
    slurm: SlurmCluster, tmp_path: Path, kw: dict[str, Any], slurm_says: str
) -> None:
    backend = SlurmBackend(make_cfg(tmp_path))
    with pytest.raises(SubmitFailed) as ei:
        run(backend.submit(ctr(uuid(4), **kw)))
    assert ei.value.permanent
    assert slurm_says in ei.value.message
    assert uuid(4) not in slurm.live_jobs()


def test_hostile_partition_never_reaches_sbatch(slurm: SlurmCluster, tmp_path: Path) -> None:
    backend = SlurmBackend(make_cfg(tmp_path))
    sentinel = tmp_path / "pwned"
    for bad in [f"x --wrap=touch {sentinel}", f"$(touch {sentinel})", "a\nb", "big,compute"]:
        with pytest.raises(SubmitFailed) as ei:
            run(backend.submit(ctr(uuid(5), partitions=[bad])))
        assert ei.value.permanent and "invalid Slurm partition name" in ei.value.message
    assert backend.cli.metrics.commands.labels("sbatch")._value.get() == 0
    assert not sentinel.exists()


def test_renice_only_changes_and_is_idempotent(slurm: SlurmCluster, tmp_path: Path) -> None:
    backend = SlurmBackend(make_cfg(tmp_path))
    names = [uuid(10 + i) for i in range(4)]
    scontrol = backend.cli.metrics.commands.labels("scontrol")

    async def go() -> None:
        await asyncio.gather(*(backend.submit(ctr(n, partitions=["parked"])) for n in names))
        jobs = await backend.list_jobs()
        wanted = {n: 1000 - i for i, n in enumerate(names)}  # names[0] most wanted
        await backend.set_priorities(wanted, jobs)
        assert scontrol._value.get() == 4
        jobs = await backend.list_jobs()
        assert [jobs[n].nice for n in names] == [0, 10, 20, 30]
        prios = [jobs[n].priority for n in names]
        assert prios == sorted(prios, reverse=True)
        # steady state: no scontrol at all
        await backend.set_priorities(wanted, jobs)
        assert scontrol._value.get() == 4
        # new priority values, same order: nothing to do
        wanted = {n: 5000 - 7 * i for i, n in enumerate(names)}
        await backend.set_priorities(wanted, await backend.list_jobs())
        assert scontrol._value.get() == 4
        # the least wanted becomes the most wanted: everything shifts by one place
        wanted[names[3]] = 9000
        await backend.set_priorities(wanted, await backend.list_jobs())
        jobs = await backend.list_jobs()
        assert jobs[names[3]].nice == 0
        order = sorted(names, key=lambda n: -(jobs[n].priority or 0))
        assert order == [names[3], names[0], names[1], names[2]]
        assert scontrol._value.get() == 8

    run(go())


def test_renice_by_job_id_over_several_passes(slurm: SlurmCluster, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The multi-pass renice of a big queue (the per-poll cap) at a size real Slurm does in
    seconds, with an ended job of the same name still listed: renicing by job id neither fails
    on it nor leaves the order half done."""
    from dispatcher.slurm import backend as backend_mod

    monkeypatch.setattr(backend_mod, "MAX_RENICE_PER_POLL", 15)
    backend = SlurmBackend(make_cfg(tmp_path))
    names = [uuid(300 + i) for i in range(40)]
    scontrol = backend.cli.metrics.commands.labels("scontrol")
    scontrol_errors = backend.cli.metrics.errors.labels("scontrol", "other")

    async def go() -> int:
        # An ended twin: cancelled while pending, still listed by squeue --states=all.
        await backend.submit(ctr(names[0], partitions=["parked"]))
        slurm.run("scancel", f"--name={names[0]}")
        await asyncio.gather(*(backend.submit(ctr(n, partitions=["parked"])) for n in names))
        wanted = {n: 1000 - i for i, n in enumerate(names)}  # names[0] most wanted
        passes = 0
        while True:
            jobs = await backend.list_jobs()
            before = scontrol._value.get()
            await backend.set_priorities(wanted, jobs)
            if scontrol._value.get() == before:
                break
            passes += 1
            assert passes <= 5
        order = sorted(names, key=lambda n: -(jobs[n].priority or 0))
        assert order == names
        assert [jobs[n].nice for n in names[:3]] == [0, 10, 20]
        return passes

    assert run(go()) == 3  # 40 changes, 15 per pass
    assert scontrol._value.get() == 40
    assert scontrol_errors._value.get() == 0


def test_controller_down_is_unknown_not_gone(slurm: SlurmCluster, tmp_path: Path) -> None:
    backend = SlurmBackend(make_cfg(tmp_path))
    run(backend.submit(ctr(uuid(20), partitions=["parked"])))
    with slurm.ctld_stopped():
        with pytest.raises(QueryFailed):
            run(backend.list_jobs())
        # back-off in force: the next query fails at once, without another RPC
        before = backend.cli.metrics.commands.labels("squeue")._value.get()
        with pytest.raises(QueryFailed, match="backing off"):
            run(backend.list_jobs())
        assert backend.cli.metrics.commands.labels("squeue")._value.get() == before
        with pytest.raises(CancelFailed):
            run(backend.cancel(uuid(20), None))
    # nothing was lost or cancelled
    slurm_wait_for(lambda: uuid(20) in slurm.live_jobs(), 30, what="job still queued after restart")


def test_hung_controller_times_out_and_lost_sbatch_reply_is_not_resubmitted(
    slurm: SlurmCluster, tmp_path: Path
) -> None:
    cfg = make_cfg(tmp_path)
    cli = SlurmCLI(timeout_s=2, backoff=Backoff(base_s=0.2, max_s=1))
    backend = SlurmBackend(cfg, cli=cli)
    u = uuid(30)
    with slurm.ctld_paused():
        with pytest.raises(QueryFailed, match="no answer within"):
            run(backend.list_jobs())
        # sbatch hangs; its request may be processed once slurmctld wakes up
        with pytest.raises(SubmitFailed) as ei:
            run(backend.submit(ctr(u, partitions=["parked"])))
        assert not ei.value.permanent
    # slurmctld is back and may have created the job from the lost request: the retry must look
    # first and never create a second one.
    run(backend.submit(ctr(u, partitions=["parked"])))
    assert u in run(backend.list_jobs())
    run(backend.submit(ctr(u, partitions=["parked"])))
    assert len(slurm.live_jobs()[u]) == 1
    assert backend.cli.metrics.commands.labels("sbatch")._value.get() == 1


def test_job_end_is_reported(slurm: SlurmCluster, tmp_path: Path) -> None:
    reports: list[tuple[str, str]] = []

    async def hook(name: str, text: str, row: Any) -> None:
        reports.append((name, text))

    backend = SlurmBackend(make_cfg(tmp_path), on_job_ended=hook)
    u = uuid(40)

    async def go() -> None:
        await backend.submit(ctr(u))
        await backend.list_jobs()
        for _ in range(150):
            jobs = await backend.list_jobs()
            if u in jobs and jobs[u].state == "RUNNING":
                break
            await asyncio.sleep(0.2)
        # an administrator kills it outright (not our TERM-only cancel)
        killer = await asyncio.create_subprocess_exec("scancel", f"--name={u}")
        assert await killer.wait() == 0
        for _ in range(150):
            jobs = await backend.list_jobs()
            if u not in jobs:
                break
            await asyncio.sleep(0.2)
        assert u not in jobs

    run(go())
    assert len(reports) == 1 and reports[0][0] == u
    assert "ended: it was cancelled (CANCELLED" in reports[0][1]
    json.dumps(reports)


FAKE_SACCT = """#!/bin/sh
# stand-in for sacct on a cluster that keeps accounting: record argv, print two jobs by name
printf '%s\\n' "$@" > {argv}
printf '30|COMPLETED|0:0|None\\n31|OUT_OF_MEMORY|0:125|None\\n'
"""


def test_vanished_job_is_described_by_sacct_where_accounting_exists(
    slurm: SlurmCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "sacct"
    fake.write_text(FAKE_SACCT.format(argv=tmp_path / "sacct.argv"))
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    backend = SlurmBackend(make_cfg(tmp_path))
    text = run(backend.describe_vanished(uuid(50)))
    assert text == "Slurm job 31 ended: it ran out of memory (OUT_OF_MEMORY)"
    argv = (tmp_path / "sacct.argv").read_text().split("\n")
    assert f"--name={uuid(50)}" in argv and "--parsable2" in argv
    # a malformed UUID never reaches the command line
    assert run(backend.describe_vanished("--format=%x")) == ""


def test_vanished_job_without_accounting_is_unknown_and_sacct_not_asked_again(
    slurm: SlurmCluster, tmp_path: Path
) -> None:
    """The dev cluster keeps no accounting (as many sites): the real sacct says so."""
    backend = SlurmBackend(make_cfg(tmp_path))

    async def go() -> tuple[str, str]:
        return (await backend.describe_vanished(uuid(51)),
                await backend.describe_vanished(uuid(52)))

    assert run(go()) == ("", "")
    counted = backend.cli.metrics.commands.labels("sacct")._value.get()
    assert counted == 1
