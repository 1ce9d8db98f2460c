"""The dispatch loop against the real embedded controller (scheduler faked): the controller's
lock/unlock/update rules, MaxDispatchAttempts, runtime_status and dispatch log records."""

from __future__ import annotations

import pytest

from dispatcher.arvados.client import ArvadosClient
from dispatcher.config import load_config
from dispatcher.core.backend import SubmitFailed
from dispatcher.core.loop import Dispatcher
from tests.helpers.controller import start_controller
from tests.helpers.core import FakeBackend, core_run


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def local_ctl(tmp_path):
    ctl = start_controller(tmp_path / "ctl",
                           extra_config={"Containers": {"MaxDispatchAttempts": 3}})
    try:
        yield ctl
    finally:
        ctl.stop()


def scenario(ctl, body):
    """Run ``body(client, dispatcher, backend, clock)`` with a fresh loop and client."""
    cfg = load_config(ctl.config_path)
    backend, clock = FakeBackend(), Clock()

    async def go():
        async with ArvadosClient(ctl.host, ctl.root_token, insecure=True, retries=1) as client:
            d = Dispatcher(cfg, client, backend, clock=clock)
            return await body(client, d, backend, clock)
    return core_run(go(), timeout_s=120)


async def new_container(client) -> tuple[str, str]:
    cr = await client.create("container_requests", {
        "state": "Committed", "priority": 1, "command": ["true"], "container_image": "local",
        "cwd": "/tmp", "output_path": "/tmp",
        "runtime_constraints": {"vcpus": 1, "ram": 1 << 26}})
    return cr["uuid"], cr["container_uuid"]


async def poll(d):
    report = await d.poll_once()
    await d.wait_idle()
    return report


def test_lock_submit_and_scheduling_status(local_ctl):
    async def body(client, d, be, clock):
        _, uuid = await new_container(client)
        await poll(d)
        assert be.submitted == [uuid]
        await poll(d)
        return await client.get("containers", uuid)
    rec = scenario(local_ctl, body)
    assert rec["state"] == "Locked"
    assert rec["locked_by_uuid"] == "zzzzz-gj3su-000000000000000"
    assert rec["runtime_status"]["scheduling_status"] == "waiting for Resources"


def test_vanished_job_of_locked_container_is_unlocked(local_ctl):
    async def body(client, d, be, clock):
        _, uuid = await new_container(client)
        await poll(d)
        be.jobs.clear()
        await poll(d)
        return await client.get("containers", uuid)
    rec = scenario(local_ctl, body)
    assert rec["state"] == "Queued" and not rec["locked_by_uuid"]


def test_transient_failures_end_in_max_dispatch_attempts(local_ctl):
    async def body(client, d, be, clock):
        _, uuid = await new_container(client)
        be.submit_errors[uuid] = SubmitFailed("sbatch: Socket timed out", permanent=False)
        for _ in range(8):
            await poll(d)
            clock.t += 10_000  # skip the backoff
            rec = await client.get("containers", uuid)
            if rec["state"] == "Cancelled":
                break
        logs = await client.list("logs", filters=[["object_uuid", "=", uuid],
                                                  ["event_type", "=", "dispatch"]])
        return rec, logs["items"]
    rec, logs = scenario(local_ctl, body)
    assert rec["state"] == "Cancelled"
    assert "MaxDispatchAttempts" in rec["runtime_status"]["error"]
    assert rec["lock_count"] == 3
    assert len(logs) == 3 and "Socket timed out" in logs[0]["properties"]["text"]


def test_permanent_failure_sets_error_and_cancels(local_ctl):
    async def body(client, d, be, clock):
        cr_uuid, uuid = await new_container(client)
        be.submit_errors[uuid] = SubmitFailed(
            "sbatch: error: Batch job submission failed: Invalid partition name specified",
            permanent=True)
        await poll(d)
        logs = await client.list("logs", filters=[["object_uuid", "=", uuid],
                                                  ["event_type", "=", "dispatch"]])
        return await client.get("containers", uuid), logs["items"]
    rec, logs = scenario(local_ctl, body)
    assert rec["state"] == "Cancelled"
    assert "Invalid partition name" in rec["runtime_status"]["error"]
    assert rec["lock_count"] == 1
    assert [entry["event_type"] for entry in logs] == ["dispatch"]


def test_running_container_whose_job_vanished_is_cancelled_with_reason(local_ctl):
    async def body(client, d, be, clock):
        _, uuid = await new_container(client)
        await poll(d)
        await client.update("containers", uuid, {"state": "Running"})  # as crunch-run would
        await poll(d)
        be.jobs.clear()  # the node died
        await poll(d)
        return await client.get("containers", uuid)
    rec = scenario(local_ctl, body)
    assert rec["state"] == "Cancelled"
    assert "ended without crunch-run finishing it" in rec["runtime_status"]["error"]


@pytest.mark.parametrize("known", [True, False])
def test_vanished_job_gets_the_schedulers_account_of_its_end(local_ctl, known):
    """What the scheduler's accounting says (sacct) lands in errorDetail; a failure to ask
    it does not hold up the cancel."""
    text = "Slurm job 7 ended: its node failed (NODE_FAIL)"

    async def body(client, d, be, clock):
        _, uuid = await new_container(client)
        await poll(d)
        await client.update("containers", uuid, {"state": "Running"})
        await poll(d)
        be.jobs.clear()
        be.vanished[uuid] = text if known else OSError("sacct exploded")
        await poll(d)
        logs = await client.list("logs", filters=[["object_uuid", "=", uuid]])
        return await client.get("containers", uuid), logs["items"]
    rec, logs = scenario(local_ctl, body)
    assert rec["state"] == "Cancelled"
    assert "ended without crunch-run finishing it" in rec["runtime_status"]["error"]
    if known:
        assert rec["runtime_status"]["errorDetail"] == text
        assert any(text in (e["properties"] or {}).get("text", "") for e in logs)
    else:
        assert "errorDetail" not in rec["runtime_status"]
