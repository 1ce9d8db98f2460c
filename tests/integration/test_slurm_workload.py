"""End to end on real parts: embedded controller -> ``crunchgate dispatch-slurm`` -> real Slurm
22.05 -> real crunch-run (runtime ``local``) -> Complete; plus faults (kill -9 of the dispatcher
in a burst, slurmctld down), cancellation while pending and running, and hostile fields.

The slurmctld outage lasts ``$CRUNCHGATE_TEST_CTLD_OUTAGE_S`` seconds (default 10; the issue
asks for "~30 s or less").
"""

from __future__ import annotations

import json
import os
import re
import ssl
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.controller import ControllerProcess, free_port, start_controller
from tests.helpers.slurm import SlurmCluster, SlurmDispatcherProcess, slurm_wait_for

pytest.importorskip("arvados")

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

OUTAGE_S = float(os.environ.get("CRUNCHGATE_TEST_CTLD_OUTAGE_S", "10"))


class Site:
    """Controller + dispatch-slurm sharing one config, on the real Slurm cluster."""

    def __init__(self, tmp: Path, slurm: SlurmCluster, extra: dict[str, Any] | None = None):
        self.tmp = tmp
        self.slurm = slurm
        self.port = free_port()
        config: dict[str, Any] = {
            "Services": {"DispatchSLURM": {"InternalURLs": {
                f"http://127.0.0.1:{self.port}": {}}}},
            "Containers": {
                "RuntimeEngine": "local",
                "CloudVMs": {"PollInterval": "0.5s"},
                "MinRetryPeriod": "0s",
                "SLURM": {
                    "SbatchArgumentsList": [
                        "--job-name=%U", "--mem=%M", "--cpus-per-task=%C", "--tmp=%T",
                        "--partition=%P", f"--output={tmp}/slurm-%%j.out",
                    ],
                },
            },
            "Crunchgate": {"SubmitConcurrency": 4, "CommandTimeout": "15s"},
            "SystemLogs": {"LogLevel": "info"},
        }
        for k, v in (extra or {}).items():
            config.setdefault(k, {}).update(v)
        self.ctl: ControllerProcess = start_controller(tmp / "controller", extra_config=config)
        env = {**os.environ, "SLURM_CONF": str(slurm.conf)}
        env.pop("ARVADOS_SERVICE_INTERNAL_URL", None)
        self.disp = SlurmDispatcherProcess(self.ctl.config_path, tmp / "dispatch.log", env)
        self.api = self.ctl.api()

    def close(self) -> None:
        self.disp.stop()
        self.ctl.stop()

    def request(self, command: list[str], **extra: Any) -> str:
        body = {
            "command": command, "container_image": "arvados/jobs", "output_path": "/out",
            "cwd": "/tmp", "runtime_constraints": {"vcpus": 1, "ram": 64 << 20},
            "state": "Committed", "priority": 1, "use_existing": False, **extra,
        }
        cr = self.api.container_requests().create(body={"container_request": body}).execute()
        return str(cr["container_uuid"]), str(cr["uuid"])

    def containers(self, uuids: list[str]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for i in range(0, len(uuids), 100):
            items = self.api.containers().list(
                filters=[["uuid", "in", uuids[i:i + 100]]], limit=100).execute()["items"]
            out.update({c["uuid"]: c for c in items})
        return out

    def log_text(self, uuid: str, event_type: str) -> str:
        items = self.api.logs().list(
            filters=[["object_uuid", "=", uuid], ["event_type", "=", event_type]],
            order=["id asc"], limit=1000).execute()["items"]
        return "".join((i.get("properties") or {}).get("text") or "" for i in items)

    def management(self, path: str) -> tuple[int, str]:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            headers={"Authorization": f"Bearer {self.ctl.management_token}"})
        try:
            with urllib.request.urlopen(req, timeout=5, context=ssl.create_default_context()) as r:
                return r.status, r.read().decode()
        except OSError as exc:
            return 0, str(exc)


@pytest.fixture
def site_factory(tmp_path: Path, slurm: SlurmCluster) -> Iterator[Callable[..., Site]]:
    sites: list[Site] = []

    def make(**extra: Any) -> Site:
        s = Site(tmp_path / f"site{len(sites)}", slurm, extra)
        sites.append(s)
        return s

    yield make
    for s in sites:
        s.close()


def wait(cond: Callable[[], Any], timeout_s: float, what: str) -> Any:
    return slurm_wait_for(cond, timeout_s, 0.5, what)


def test_workload_50_containers_to_complete(site_factory: Callable[..., Site],
                                            slurm: SlurmCluster, tmp_path: Path) -> None:
    site = site_factory()
    site.disp.start()
    sentinel = tmp_path / "pwned"
    n = 50
    uuids = [site.request(["sh", "-c", f"echo out-{i}; echo err-{i} >&2; exit {i % 4}"])[0]
             for i in range(n)]
    # hostile fields: run literally, nothing injected into sbatch or the script
    hostile_arg = f"it's \"q\" $(touch {sentinel}) `touch {sentinel}` --wrap=touch {sentinel}"
    h_cmd = site.request(["sh", "-c", 'printf "%s|" "$1" "$2"', "sh", hostile_arg, "a\nb"])[0]
    h_env = site.request(["sh", "-c", 'printf "%s" "$HOSTILE"'],
                         environment={"HOSTILE": f"$(touch {sentinel})\n--wrap=x 'y'"})[0]
    h_part = site.request(["true"], scheduling_parameters={
        "partitions": [f"compute --wrap=touch {sentinel}"]})[0]
    # cancellation while pending (parked partition never starts jobs) and while running
    pend, pend_cr = site.request(["true"], scheduling_parameters={"partitions": ["parked"]})
    runn, runn_cr = site.request(["sleep", "300"])
    everything = [*uuids, h_cmd, h_env, h_part, pend, runn]

    wait(lambda: site.containers([runn])[runn]["state"] == "Running", 90, "a running container")
    wait(lambda: pend in slurm.live_jobs(), 30, "the pending job")
    for cr in (pend_cr, runn_cr):
        site.api.container_requests().update(
            uuid=cr, body={"container_request": {"priority": 0}}).execute()

    def finished(c: dict[str, Any]) -> bool:
        # A Queued container nobody wants (priority 0) is as final as it gets for a dispatcher.
        return c["state"] in ("Complete", "Cancelled") or (
            c["state"] == "Queued" and c["priority"] == 0)

    def all_final() -> bool:
        cs = site.containers(everything)
        return all(finished(cs[u]) for u in everything)

    wait(all_final, 180, "every container to finish")
    cs = site.containers(everything)
    for i, u in enumerate(uuids):
        assert cs[u]["state"] == "Complete", (u, cs[u])
        assert cs[u]["exit_code"] == i % 4
        assert site.log_text(u, "stdout") == f"out-{i}\n"
        assert site.log_text(u, "stderr") == f"err-{i}\n"
    assert cs[h_cmd]["state"] == "Complete"
    assert site.log_text(h_cmd, "stdout") == f"{hostile_arg}|a\nb|"
    assert cs[h_env]["state"] == "Complete"
    assert site.log_text(h_env, "stdout") == f"$(touch {sentinel})\n--wrap=x 'y'"
    assert cs[h_part]["state"] == "Cancelled"
    assert "invalid Slurm partition name" in cs[h_part]["runtime_status"]["error"]
    assert not sentinel.exists()
    assert cs[pend]["state"] in ("Cancelled", "Queued") and cs[pend]["priority"] == 0
    assert cs[runn]["state"] == "Cancelled"
    wait(lambda: not ({pend, runn} & set(slurm.live_jobs())), 30, "cancelled jobs to leave")
    # every container ran in exactly one Slurm job
    names = [row[1] for row in slurm.jobs()]
    for u in uuids:
        assert names.count(u) == 1, u

    status, body = site.management("/_health/ping")
    assert status == 200 and json.loads(body)["health"] == "OK"
    status, metrics = site.management("/metrics")
    assert status == 200
    assert "crunchgate_slurm_command_duration_seconds_bucket" in metrics
    assert 'crunchgate_slurm_commands_total{command="sbatch"}' in metrics
    assert "crunchgate_dispatch_containers" in metrics
    assert site.ctl.root_token not in site.disp.log_text()


def test_kill9_in_burst_and_slurmctld_outage(site_factory: Callable[..., Site],
                                            slurm: SlurmCluster) -> None:
    site = site_factory()
    n = 120
    # parked: jobs stay pending, so only submission and tracking are exercised
    uuids = [site.request(["echo", f"burst-{i}"],
                          scheduling_parameters={"partitions": ["parked"]})[0]
             for i in range(n)]
    site.disp.start()
    wait(lambda: len(set(slurm.live_jobs()) & set(uuids)) >= 15, 60, "part of the burst")
    site.disp.kill9()
    site.disp.start()

    def all_submitted() -> bool:
        live = slurm.live_jobs()
        return all(u in live for u in uuids)

    wait(all_submitted, 120, "every container of the burst in squeue")
    live = slurm.live_jobs()
    assert all(len(live[u]) == 1 for u in uuids), "a container was submitted twice"
    wait(lambda: all(c["state"] == "Locked" for c in site.containers(uuids).values()), 30,
         "all Locked")

    # slurmctld goes away: nothing is cancelled, new work waits, then resumes
    with slurm.ctld_stopped():
        later = [site.request(["echo", f"later-{i}"],
                              scheduling_parameters={"partitions": ["parked"]})[0]
                 for i in range(3)]
        deadline = time.monotonic() + OUTAGE_S
        while time.monotonic() < deadline:
            cs = site.containers(uuids)
            assert all(c["state"] == "Locked" for c in cs.values()), "lost a container"
            time.sleep(1)
    wait(lambda: all(u in slurm.live_jobs() for u in later), 90, "work to resume")
    live = slurm.live_jobs()
    assert all(len(live[u]) == 1 for u in uuids + later)
    cs = site.containers(uuids + later)
    assert all(c["state"] == "Locked" for c in cs.values())
    status, body = site.management("/metrics")
    # The outage was noticed: squeue failed (Slurm's client gives up after ~9 s of connect
    # retries), or -- when it was sent late in the outage -- waited for slurmctld to come back.
    # Which one happens depends on where the polls fall in the outage.
    failed = any(f'kind="{k}"' in body for k in ("controller", "backoff", "timeout"))
    samples = {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^crunchgate_slurm_command_duration_seconds_(count|bucket)'
        r'\{command="squeue"(?:,le="5.0")?\} ([0-9.e+]+)$', body, re.MULTILINE)}
    slow = samples.get("bucket", 0) < samples.get("count", 0)
    assert failed or slow, "the slurmctld outage left no trace in /metrics"
