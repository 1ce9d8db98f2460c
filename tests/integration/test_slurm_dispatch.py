"""The reference's crunch-dispatch-slurm scenarios (dispatch.md 7.1-7.5) ported: the real
dispatch loop + SlurmBackend + the real Slurm 22.05 dev cluster, against the in-memory fake
controller (tests/helpers/core.py). The full path through the embedded controller and real
crunch-run is in test_slurm_workload.py."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from dispatcher.config import ClusterConfig
from dispatcher.core.loop import Dispatcher
from dispatcher.slurm import parse
from dispatcher.slurm.backend import SlurmBackend
from dispatcher.slurm.cli import JobEndRecorder
from dispatcher.slurm.commands import SlurmCLI, SlurmCommandError
from tests.helpers.core import MY_TOKEN_UUID, FakeArvados, core_run
from tests.helpers.slurm import SlurmCluster

pytestmark = pytest.mark.slurm

MiB = 1 << 20
ROOT_TOKEN = "v2/zzzzz-gj3su-000000000000000/slurmdispatchtests0123456789"


class RecordingCLI(SlurmCLI):
    """The real CLI, remembering every sbatch argument list."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.sbatch_calls: list[list[str]] = []
        self.scancel_calls: list[list[str]] = []
        self.fail_scancel = 0

    async def scancel(self, args: Sequence[str]) -> None:
        self.scancel_calls.append(list(args))
        if self.fail_scancel > 0:
            self.fail_scancel -= 1
            raise SlurmCommandError("scancel", "other", "injected failure")
        await super().scancel(args)

    async def sbatch(self, args: Sequence[str], script: str, env: Any) -> str:
        self.sbatch_calls.append(list(args))
        return await super().sbatch(args, script, env)


def config(tmp_path: Path, *, parked: bool = True) -> ClusterConfig:
    cfg = ClusterConfig(cluster_id="zzzzz", system_root_token=ROOT_TOKEN)
    cfg.services.controller.external_url = "https://127.0.0.1:1"
    cfg.containers.cloud_vms.poll_interval_s = 0.3
    cfg.containers.runtime_engine = "local"
    cfg.crunchgate.command_timeout_s = 15
    fake = tmp_path / "crunch-run"
    fake.write_text("#!/bin/sh\nexec sleep 60\n")
    fake.chmod(0o755)
    cfg.containers.crunch_run_command = str(fake)
    # Reference default template; output files in tmp_path. "parked" (State=DOWN) keeps jobs
    # pending forever, so the test decides what happens to them.
    extra = ["--partition=parked"] if parked else []
    cfg.containers.slurm.sbatch_arguments_list = [
        *cfg.containers.slurm.sbatch_arguments_list, *extra, f"--output={tmp_path}/slurm-%%j.out",
    ]
    return cfg


class Scenario:
    def __init__(self, cfg: ClusterConfig, api: FakeArvados, **backend_kw: Any) -> None:
        self.cfg, self.api = cfg, api
        self.cli = RecordingCLI(timeout_s=15)
        self.backend = SlurmBackend(cfg, cli=self.cli, **backend_kw)
        self.disp = Dispatcher(cfg, api, self.backend)

    async def until(self, cond: Callable[[], bool], timeout_s: float = 40) -> None:
        deadline = time.monotonic() + timeout_s
        while not cond():
            if time.monotonic() > deadline:
                pytest.fail("scenario did not reach its final state in time")
            await self.disp.poll_once()
            await self.disp.wait_idle()
            await asyncio.sleep(self.cfg.containers.cloud_vms.poll_interval_s)

    async def polls(self, n: int) -> None:
        for _ in range(n):
            await self.disp.poll_once()
            await self.disp.wait_idle()


def queued_container_fields() -> dict[str, Any]:
    # zzzzz-dz642-queuedcontainer of the reference fixtures
    return {
        "runtime_constraints": {"ram": 12000000000, "vcpus": 4},
        "mounts": {"/tmp": {"kind": "tmp", "capacity": 24000000000},
                   "/var/spool/cwl": {"kind": "tmp", "capacity": 24000000000}},
    }


def test_normal_job_already_in_squeue_is_not_resubmitted(slurm: SlurmCluster,
                                                         tmp_path: Path) -> None:
    """7.1 TestNormal."""
    api = FakeArvados()
    uuid = api.add_container("Locked", **queued_container_fields())
    slurm.run("sbatch", f"--job-name={uuid}", "--partition=parked", "--output=/dev/null",
              "--wrap=sleep 60")
    s = Scenario(config(tmp_path), api)

    async def go() -> None:
        await s.polls(3)
        assert s.cli.sbatch_calls == []
        api.containers[uuid]["state"] = "Running"
        await s.polls(2)
        api.containers[uuid].update(state="Complete", locked_by_uuid=None)
        # finished container: its leftover job is cancelled
        await s.until(lambda: uuid not in slurm.live_jobs())

    core_run(go(), 90)
    assert api.containers[uuid]["state"] == "Complete"
    assert s.cli.sbatch_calls == []


def test_cancel_priority_zero_then_job_gone_cancels_container(slurm: SlurmCluster,
                                                              tmp_path: Path) -> None:
    """7.1 TestCancel: the first scancel fails, the second succeeds; the job leaves the queue
    and the container ends Cancelled. While squeue cannot answer nothing is decided."""
    api = FakeArvados()
    uuid = api.add_container("Running", **queued_container_fields())
    slurm.run("sbatch", f"--job-name={uuid}", "--partition=parked", "--output=/dev/null",
              "--wrap=sleep 60")
    s = Scenario(config(tmp_path), api)

    async def go() -> None:
        await s.polls(2)
        api.containers[uuid]["priority"] = 0
        with slurm.ctld_stopped():
            await s.polls(2)  # no squeue answer: nothing may be decided on missing data
            assert api.containers[uuid]["state"] == "Running"
            assert s.cli.scancel_calls == []
        s.cli.fail_scancel = 1
        await s.until(lambda: api.containers[uuid]["state"] == "Cancelled")

    core_run(go(), 120)
    assert uuid not in slurm.live_jobs()
    pending_cancels = [c for c in s.cli.scancel_calls if c == [f"--name={uuid}",
                                                               "--state=pending"]]
    assert len(pending_cancels) >= 2


def test_missing_from_squeue_submits_once_with_reference_args(slurm: SlurmCluster,
                                                              tmp_path: Path) -> None:
    """7.1 TestMissingFromSqueue: exactly one sbatch with the reference's arguments; when the
    job then leaves the queue of a Running container, the container is Cancelled."""
    api = FakeArvados()
    uuid = api.add_container(uuid="zzzzz-dz642-queuedcontainer", **queued_container_fields())
    cfg = config(tmp_path)
    s = Scenario(cfg, api)

    async def go() -> None:
        await s.until(lambda: uuid in slurm.live_jobs())
        await s.polls(3)
        assert len(s.cli.sbatch_calls) == 1
        assert s.cli.sbatch_calls[0][:6] == [
            "--nice=10000", "--no-requeue", "--job-name=zzzzz-dz642-queuedcontainer",
            "--mem=11995", "--cpus-per-task=4", "--tmp=45777",
        ]
        # the script Slurm stored is exactly the reference format (3.5), no token in it
        job_id = slurm.live_jobs()[uuid][0][0]
        script = slurm.run("scontrol", "write", "batch_script", job_id, "-")
        secret = hmac.new(ROOT_TOKEN.encode(), uuid.encode(), hashlib.sha256).hexdigest()
        assert script == (
            f"#!/bin/sh\nGatewayAuthSecret='{secret}' exec '{cfg.containers.crunch_run_command}'"
            f" '--runtime-engine=local' '{uuid}'\n"
        )
        assert ROOT_TOKEN not in script
        # the single job got the top nice value once it was listed (7.3 SetPriority)
        assert slurm.live_jobs()[uuid][0][4] == 0
        api.containers[uuid]["state"] = "Running"
        slurm.run("scancel", f"--name={uuid}")
        await s.until(lambda: api.containers[uuid]["state"] == "Cancelled")

    core_run(go(), 120)
    assert len(s.cli.sbatch_calls) == 1


def test_sbatch_rejected_cancels_with_slurm_message(slurm: SlurmCluster, tmp_path: Path) -> None:
    """7.1 TestSbatchFail, with a real rejection: the container is cancelled and
    runtime_status.error quotes Slurm."""
    api = FakeArvados()
    cfg = config(tmp_path, parked=False)
    uuid = api.add_container(runtime_constraints={"ram": 1 << 50, "vcpus": 1})
    bad_part = api.add_container(scheduling_parameters={"partitions": ["nosuchpartition"]})
    hostile = api.add_container(scheduling_parameters={"partitions": ["x --wrap=id"]})
    s = Scenario(cfg, api)

    async def go() -> None:
        await s.until(lambda: all(api.containers[u]["state"] == "Cancelled"
                                  for u in (uuid, bad_part, hostile)))

    core_run(go(), 90)
    assert "Memory specification can not be satisfied" in \
        api.containers[uuid]["runtime_status"]["error"]
    assert "Invalid partition name specified" in \
        api.containers[bad_part]["runtime_status"]["error"]
    assert "invalid Slurm partition name 'x --wrap=id'" in \
        api.containers[hostile]["runtime_status"]["error"]
    # the hostile one never reached sbatch; each of the others was tried exactly once
    assert len(s.cli.sbatch_calls) == 2
    assert {e["object_uuid"] for e in api.logs if e["event_type"] == "dispatch"} >= {
        uuid, bad_part, hostile}


def test_scheduling_status_and_renice_follow_priority(slurm: SlurmCluster,
                                                      tmp_path: Path) -> None:
    """Pending reason -> runtime_status.scheduling_status; container priority -> nice order
    (7.3/7.4 against real Slurm); a steady queue costs no scontrol."""
    api = FakeArvados()
    uuids = [api.add_container(priority=p * (1 << 50)) for p in (3, 1, 2)]
    s = Scenario(config(tmp_path), api)

    async def go() -> None:
        await s.until(lambda: all(u in slurm.live_jobs() for u in uuids)
                      and all(api.containers[u]["runtime_status"].get("scheduling_status")
                              for u in uuids))
        await s.polls(2)
        nice = {u: slurm.live_jobs()[u][0][4] for u in uuids}
        assert nice[uuids[0]] < nice[uuids[2]] < nice[uuids[1]]
        before = s.cli.metrics.commands.labels("scontrol")._value.get()
        await s.polls(3)
        assert s.cli.metrics.commands.labels("scontrol")._value.get() == before

        # The status says why Slurm keeps each job pending *now*: usually PartitionDown for
        # "parked", but right after a slurmctld restart (an earlier test) Slurm may say
        # ReqNodeNotAvail for a while -- the status must follow whatever it says.
        def follows() -> bool:
            reasons = {row[1]: row[3] for row in slurm.jobs("PD")}
            return all(api.containers[u]["runtime_status"].get("scheduling_status") ==
                       parse.scheduling_status(reasons.get(u, "?"), "parked") for u in uuids)

        await s.until(follows)

    core_run(go(), 90)
    assert api.containers[uuids[0]]["runtime_status"]["scheduling_status"].startswith("waiting")


def test_node_failure_reaches_runtime_status(slurm: SlurmCluster, tmp_path: Path) -> None:
    """The node of a Running container's job goes DOWN: Slurm ends the job with NODE_FAIL, and
    the container is cancelled with that reason in runtime_status.errorDetail."""
    api = FakeArvados()
    uuid = api.add_container("Running")
    slurm.run("sbatch", f"--job-name={uuid}", "--nodelist=n2", "--no-requeue",
              "--output=/dev/null", "--wrap=sleep 60")
    recorder = JobEndRecorder(api, lambda: MY_TOKEN_UUID)
    s = Scenario(config(tmp_path), api, on_job_ended=recorder)

    async def go() -> None:
        await s.until(lambda: slurm.live_jobs().get(uuid, [("", "", "")])[0][2] == "RUNNING")
        with slurm.node_down("n2"):
            await s.until(lambda: api.containers[uuid]["state"] == "Cancelled")

    core_run(go(), 90)
    status = api.containers[uuid]["runtime_status"]
    assert "ended: its node failed (NODE_FAIL" in status["errorDetail"]
    assert "without crunch-run finishing it" in status["error"]
    assert any("its node failed (NODE_FAIL" in (e["properties"].get("text") or "")
               for e in api.logs)


def test_job_ended_badly_is_recorded_on_the_container(slurm: SlurmCluster,
                                                       tmp_path: Path) -> None:
    """A Running container whose job Slurm ended (here: killed by an admin) gets the reason in
    runtime_status.error and a dispatch log record before it is cancelled."""
    api = FakeArvados()
    uuid = api.add_container("Running")
    slurm.run("sbatch", f"--job-name={uuid}", "--output=/dev/null", "--wrap=sleep 60")
    cfg = config(tmp_path)
    holder: dict[str, Any] = {}
    recorder = JobEndRecorder(api, lambda: MY_TOKEN_UUID)
    s = Scenario(cfg, api, on_job_ended=recorder)
    holder["s"] = s

    async def go() -> None:
        await s.until(lambda: slurm.live_jobs().get(uuid, [("", "", "")])[0][2] == "RUNNING")
        slurm.run("scancel", f"--name={uuid}")
        await s.until(lambda: api.containers[uuid]["state"] == "Cancelled")

    core_run(go(), 90)
    err = api.containers[uuid]["runtime_status"]["errorDetail"]
    assert "ended: it was cancelled (CANCELLED" in err
    assert api.containers[uuid]["runtime_status"]["error"]
    assert any(err in (e["properties"].get("text") or "") for e in api.logs)
