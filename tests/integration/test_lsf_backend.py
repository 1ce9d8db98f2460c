"""LsfBackend + LsfCLI against the LSF simulator: commands, failure handling, no secrets in logs."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytest

from dispatcher.config import ClusterConfig, InstanceType
from dispatcher.core.backend import CancelFailed, Job, QueryFailed, SubmitFailed
from dispatcher.core.jobscript import gateway_auth_secret
from dispatcher.core.sizing import ConstraintsNotSatisfiable
from dispatcher.lsf.backend import LsfBackend
from dispatcher.lsf.commands import LsfCLI
from tests.helpers.core import core_run
from tests.helpers.lsf import LsfSim

MiB = 1 << 20
GiB = 1 << 30
TOKEN = "v2/zzzzz-gj3su-000000000000000/secret-root-token-for-lsf-tests"
UUID = "zzzzz-dz642-lsfbackend00001"


def make_cfg(tmp_path: Path, crunch_run: str = "") -> ClusterConfig:
    cfg = ClusterConfig(cluster_id="zzzzz", system_root_token=TOKEN)
    cfg.services.controller.external_url = "https://127.0.0.1:1"
    cfg.containers.reserve_extra_ram = 256 * MiB
    cfg.containers.lsf.bsub_sudo_user = ""
    cfg.containers.lsf.bsub_arguments_list = [
        a.replace("/tmp/", f"{tmp_path}/") for a in cfg.containers.lsf.bsub_arguments_list]
    cfg.crunchgate.command_timeout_s = 5
    if not crunch_run:
        crunch_run = str(tmp_path / "fake-crunch-run")
        Path(crunch_run).write_text("#!/bin/sh\necho \"args: $*\"\nexec sleep 60\n")
        Path(crunch_run).chmod(0o755)
    cfg.containers.crunch_run_command = crunch_run
    return cfg


def make_backend(cfg: ClusterConfig, sim: LsfSim, timeout_s: float = 5) -> LsfBackend:
    cli = LsfCLI(sudo_user="", timeout_s=timeout_s, env=sim.env())
    return LsfBackend(cfg, cli=cli)


def ctr(uuid: str = UUID, **rc: Any) -> dict[str, Any]:
    rc.setdefault("vcpus", 1)
    rc.setdefault("ram", 100 * MiB)
    return {"uuid": uuid, "runtime_constraints": rc, "mounts": {}, "container_image": "",
            "scheduling_parameters": {}, "priority": 1, "state": "Locked"}


def test_submit_list_cancel(lsf_sim: LsfSim, tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    be = make_backend(cfg, lsf_sim)

    async def go() -> None:
        assert await be.list_jobs() == {}
        await be.submit(ctr())
        jobs = await be.list_jobs()
        assert jobs[UUID].state == "RUN" and jobs[UUID].job_id == "101"
        lsf_sim.wait_for(lambda: (tmp_path / "crunch-run.101.out").exists())
        await be.cancel(UUID, jobs[UUID])
        lsf_sim.wait_for(lambda: lsf_sim.jobs()[0]["stat"] == "EXIT", what="bkill")
        # Killing again: "Job has already finished" is success, as is an id LSF forgot.
        await be.cancel(UUID, jobs[UUID])
        await be.cancel(UUID, Job(name=UUID, job_id="999"))
        await be.cancel(UUID, None)  # nothing listed: nothing to do

    core_run(go())
    call = lsf_sim.calls("bsub")[0]["argv"]
    assert call[:4] == ["-o", f"{tmp_path}/crunch-run.%J.out", "-e", f"{tmp_path}/crunch-run.%J.err"]
    assert lsf_sim.calls("bjobs")[0]["argv"] == [
        "-u", "all", "-o", "jobid stat job_name pend_reason", "-json"]
    assert [c["argv"] for c in lsf_sim.calls("bkill")] == [["101"], ["101"], ["999"]]
    out = lsf_sim.wait_for(lambda: "args:" in (tmp_path / "crunch-run.101.out").read_text()
                           and (tmp_path / "crunch-run.101.out").read_text())
    assert f"args: --runtime-engine=docker {UUID}\n" in out


def test_job_environment_has_api_host_and_token(lsf_sim: LsfSim, tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    probe.write_text("#!/bin/sh\necho \"host=$ARVADOS_API_HOST tok=$ARVADOS_API_TOKEN "
                     "gw=${GatewayAuthSecret}\"\n")
    probe.chmod(0o755)
    cfg = make_cfg(tmp_path, crunch_run=str(probe))
    core_run(make_backend(cfg, lsf_sim).submit(ctr()))
    out = tmp_path / "crunch-run.101.out"
    lsf_sim.wait_for(lambda: out.exists() and "Successfully completed" in out.read_text())
    assert (f"host=127.0.0.1:1 tok={TOKEN} gw={gateway_auth_secret(TOKEN, UUID)}\n"
            in out.read_text())


def test_pending_reason_becomes_scheduling_status(lsf_sim: LsfSim, tmp_path: Path) -> None:
    be = make_backend(make_cfg(tmp_path), lsf_sim)
    big = ctr(vcpus=64)
    core_run(be.submit(big))
    job = core_run(be.list_jobs())[UUID]
    assert job.pending and job.state == "PEND"
    assert be.scheduling_status(job) == \
        "waiting for LSF (job 101): There are no suitable hosts for the job"
    assert be.scheduling_status(Job(name=UUID, job_id="1", state="RUN")) == ""


def test_unsatisfiable_container_is_never_submitted(lsf_sim: LsfSim, tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    cfg.instance_types = {"biggest_available_node": InstanceType(
        name="biggest_available_node", vcpus=4, ram=100 * GiB, included_scratch=100 * GiB)}
    be = make_backend(cfg, lsf_sim)
    with pytest.raises(ConstraintsNotSatisfiable) as ei:
        core_run(be.submit(ctr(ram=1_000_000_000_000)))
    assert ei.value.message == "constraints not satisfiable by any configured instance type"
    assert [t.name for t in ei.value.available_types] == ["biggest_available_node"]
    assert lsf_sim.calls("bsub") == []
    core_run(be.submit(ctr(ram=1_000_000_000)))  # fits: submitted
    assert len(lsf_sim.calls("bsub")) == 1


@pytest.mark.parametrize("message,permanent", [
    ("Bad resource requirement syntax. Job not submitted.", True),
    ("normal: No such queue. Job not submitted.", True),
    ("LSF is down. Please wait ...\nBatch system not responding. Job not submitted.", False),
])
def test_bsub_failure_classification(lsf_sim: LsfSim, tmp_path: Path, message: str,
                                     permanent: bool) -> None:
    lsf_sim.inject("bsub", "fail", message=message)
    with pytest.raises(SubmitFailed) as ei:
        core_run(make_backend(make_cfg(tmp_path), lsf_sim).submit(ctr()))
    assert ei.value.permanent is permanent
    assert message.splitlines()[-1] in ei.value.message


def test_bad_template_is_permanent(lsf_sim: LsfSim, tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    cfg.containers.lsf.bsub_arguments_list = ["--zebra", "%Z"]
    with pytest.raises(SubmitFailed, match="Unknown substitution parameter %Z") as ei:
        core_run(make_backend(cfg, lsf_sim).submit(ctr()))
    assert ei.value.permanent


def test_lost_bsub_reply_adopts_the_job(lsf_sim: LsfSim, tmp_path: Path) -> None:
    # bsub created the job but its answer was lost (error, or hung until our timeout):
    # the backend finds the job by name instead of failing (which would submit it again).
    be = make_backend(make_cfg(tmp_path), lsf_sim, timeout_s=1.5)
    lsf_sim.inject("bsub", "fail_after_submit", count=1)
    core_run(be.submit(ctr()))
    lsf_sim.inject("bsub", "hang_after_submit", seconds=30, count=1)
    core_run(be.submit(ctr("zzzzz-dz642-lsfbackend00002")))
    assert [j["name"] for j in lsf_sim.jobs()] == [UUID, "zzzzz-dz642-lsfbackend00002"]
    # Without a job, the same failure is a (transient) failure.
    lsf_sim.inject("bsub", "fail", message="Batch system not responding. Job not submitted.")
    with pytest.raises(SubmitFailed) as ei:
        core_run(be.submit(ctr("zzzzz-dz642-lsfbackend00003")))
    assert not ei.value.permanent


def test_failing_hanging_or_garbled_bjobs_is_query_failed(lsf_sim: LsfSim, tmp_path: Path) -> None:
    be = make_backend(make_cfg(tmp_path), lsf_sim, timeout_s=1.0)
    core_run(be.submit(ctr()))
    for mode, fields in [("fail", {"message": "LSF is down. Please wait ..."}),
                         ("hang", {"seconds": 30}),
                         ("banner", {"message": '{"COMMAND":"bjobs","JOBS":'})]:
        lsf_sim.inject("bjobs", mode, **fields)
        with pytest.raises(QueryFailed):
            core_run(be.list_jobs())
    lsf_sim.inject("bjobs", "banner", message="LSF is processing your request. Please wait ...")
    assert list(core_run(be.list_jobs())) == [UUID]


def test_failed_bjobs_saying_no_unfinished_job_is_an_empty_queue(lsf_sim: LsfSim,
                                                                 tmp_path: Path) -> None:
    # Some LSF versions report an empty queue as "No unfinished job found" with exit 255 instead
    # of an empty JSON listing: that must not look like an outage (nothing would ever be
    # submitted on an idle cluster), while any other failure still is one.
    be = make_backend(make_cfg(tmp_path), lsf_sim)
    lsf_sim.inject("bjobs", "fail", message="No unfinished job found", exit=255)
    assert core_run(be.list_jobs()) == {}
    lsf_sim.inject("bjobs", "fail", message="No unfinished job found\nmbatchd: not responding",
                   exit=255)
    with pytest.raises(QueryFailed, match="not responding"):
        core_run(be.list_jobs())


def test_bkill_failure_is_cancel_failed(lsf_sim: LsfSim, tmp_path: Path) -> None:
    be = make_backend(make_cfg(tmp_path), lsf_sim)
    core_run(be.submit(ctr()))
    lsf_sim.inject("bkill", "fail", message="LSF is down. Please wait ...")
    with pytest.raises(CancelFailed, match="bkill\\(101\\)"):
        core_run(be.cancel(UUID, Job(name=UUID, job_id="101")))


def test_no_script_or_secret_in_logs(lsf_sim: LsfSim, tmp_path: Path,
                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    be = make_backend(make_cfg(tmp_path), lsf_sim)
    lsf_sim.inject("bsub", "fail", message="LSF is down. Please wait ...", count=1)
    with pytest.raises(SubmitFailed) as ei:
        core_run(be.submit(ctr()))
    core_run(be.submit(ctr()))
    secret = gateway_auth_secret(TOKEN, UUID)
    text = "\n".join(r.getMessage() for r in caplog.records) + str(ei.value)
    assert "bsub command" in text and UUID in text  # we did log the submission...
    for needle in (secret, TOKEN, TOKEN.rsplit("/", 1)[1], "GatewayAuthSecret", "exec "):
        assert needle not in text  # ...but neither the script nor the token


def test_bkill_hang_times_out(lsf_sim: LsfSim, tmp_path: Path) -> None:
    be = make_backend(make_cfg(tmp_path), lsf_sim, timeout_s=1.0)
    core_run(be.submit(ctr()))
    lsf_sim.inject("bkill", "hang", seconds=30)
    t0 = time.monotonic()
    with pytest.raises(CancelFailed, match="no answer within"):
        core_run(be.cancel(UUID, Job(name=UUID, job_id="101")))
    assert time.monotonic() - t0 < 20  # killed at the timeout, not after the hang


def test_sudo_prefix_is_run_with_the_environment(lsf_sim: LsfSim, tmp_path: Path) -> None:
    # A stand-in for sudo that checks the reference's "-E -u <user>" and runs the rest.
    bindir = tmp_path / "sudo-bin"
    bindir.mkdir()
    log = tmp_path / "sudo.log"
    sudo = bindir / "sudo"
    sudo.write_text(
        "#!/bin/sh\n"
        '[ "$1" = -E ] && [ "$2" = -u ] && [ "$3" = crunch ] || { echo "bad sudo $*" >&2; exit 1; }\n'
        f'shift 3; echo "$* token=${{ARVADOS_API_TOKEN:+set}}" >> {log}; exec "$@"\n')
    sudo.chmod(0o755)
    env = lsf_sim.env()
    env["PATH"] = f"{bindir}:{env['PATH']}"
    cfg = make_cfg(tmp_path)
    cfg.containers.lsf.bsub_sudo_user = "crunch"
    be = LsfBackend(cfg, cli=LsfCLI(sudo_user="crunch", timeout_s=5, env=env))
    core_run(be.submit(ctr()))
    core_run(be.cancel(UUID, core_run(be.list_jobs())[UUID]))
    lines = log.read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bsub -o ") and lines[0].endswith("token=set")
    assert lsf_sim.calls("bkill")  # bkill ran without sudo, as in the reference


def test_start_reports_missing_lsf_loudly(tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    env = {"PATH": str(tmp_path / "empty")}
    be = LsfBackend(make_cfg(tmp_path), cli=LsfCLI(timeout_s=5, env=env))
    core_run(be.start())  # not fatal
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("install the LSF client commands" in m for m in errors), errors
    with pytest.raises(QueryFailed, match="bjobs"):
        core_run(be.list_jobs())


@pytest.mark.parametrize("bad", ["", "zzzzz-dz642-short", "-J evil", "zzzzz-dz642-lsfbackend0000\n"])
def test_malformed_uuid_is_refused(lsf_sim: LsfSim, tmp_path: Path, bad: str) -> None:
    with pytest.raises(SubmitFailed, match="malformed container UUID") as ei:
        core_run(make_backend(make_cfg(tmp_path), lsf_sim).submit(ctr(bad)))
    assert ei.value.permanent and lsf_sim.calls("bsub") == []
