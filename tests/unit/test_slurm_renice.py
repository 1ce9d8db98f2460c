"""Renicing at scale: the real dispatch loop, SlurmBackend and SlurmCLI over an in-memory Slurm
(tests/helpers/slurm.py ``SlurmModel``), so thousands of jobs take seconds.

The bug these tests pin down (docs/slurm.md, "renice stopped part-way" at 3,000+ jobs): every
``scontrol update JobName=`` made scontrol load the whole job table (O(jobs) per call), so a
pass of 2,000 calls took minutes and was cut by the pass deadline, and the command counter was
bumped when a call was *queued* rather than run, so a pass in progress looked finished (the
benchmark then declared the queue settled with thousands of jobs still at nice 10000).
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from dispatcher.config import ClusterConfig
from dispatcher.core.backend import Job
from dispatcher.core.loop import Dispatcher
from dispatcher.slurm import backend as backend_mod
from dispatcher.slurm.backend import SlurmBackend
from dispatcher.slurm.commands import Backoff, SlurmCLI
from tests.helpers.core import FakeArvados, core_run
from tests.helpers.slurm import SlurmModel


def cfg() -> ClusterConfig:
    c = ClusterConfig(cluster_id="zzzzz", system_root_token="unit-test-root-token-0123456789")
    c.services.controller.external_url = "https://127.0.0.1:1"
    c.containers.cloud_vms.poll_interval_s = 2
    c.containers.runtime_engine = "local"
    c.containers.slurm.sbatch_arguments_list += ["--partition=parked"]
    return c


def slurm_backend(model: SlurmModel, **kw: Any) -> SlurmBackend:
    cli = SlurmCLI(timeout_s=5, submit_concurrency=4, backoff=Backoff(base_s=0.05, max_s=0.2))
    model.attach(cli)
    return SlurmBackend(cfg(), cli=cli, **kw)


def metric(be: SlurmBackend, name: str, *labels: str) -> float:
    value = be.cli.metrics.registry.get_sample_value(name, dict(zip(("command",), labels,
                                                                    strict=False)))
    return value or 0.0


def test_a_big_queue_is_ordered_over_a_few_polls_then_costs_nothing() -> None:
    n = 4200  # more than two passes' worth of MAX_RENICE_PER_POLL (2,000)
    api = FakeArvados()
    uuids = [api.add_container(priority=1_000_000 + n - i) for i in range(n)]
    model = SlurmModel()
    be = slurm_backend(model)
    disp = Dispatcher(cfg(), api, be)

    def out_of_place(wanted_order: list[str]) -> int:
        return sum(1 for a, b in zip(model.order(), wanted_order, strict=True) if a != b)

    async def poll_until_ordered(wanted_order: list[str]) -> int:
        polls = 0
        while True:
            polls += 1
            await disp.poll_once()
            await disp.wait_idle()
            if len(model.live()) == n and not out_of_place(wanted_order) and metric(
                    be, "crunchgate_slurm_renice_pending_jobs") == 0:
                return polls
            # The cap spreads the work over polls, but every poll makes progress.
            assert polls <= math.ceil(n / backend_mod.MAX_RENICE_PER_POLL) + 3, (
                f"not ordered after {polls} polls: {out_of_place(wanted_order)} jobs out of "
                "place")

    async def go() -> None:
        await disp.start()
        await poll_until_ordered(uuids)
        # Every container's priority turned around: the newest are now the most wanted, so
        # nearly every job must move -- more than two passes' worth of scontrol calls.
        for i, u in enumerate(uuids):
            api.containers[u]["priority"] = 1_000_000 + i
        await poll_until_ordered(uuids[::-1])

    core_run(go(), 120)
    assert model.count("sbatch") == n
    renices = [c for c in model.calls if c[0] == "scontrol"]
    # Every call targets one job by id (no job-table load per call), and the counter counts
    # what ran.
    assert len(renices) > 2 * backend_mod.MAX_RENICE_PER_POLL
    assert all(c[2].startswith("JobId=") for c in renices)
    assert model.job_table_loads == 0
    assert metric(be, "crunchgate_slurm_commands_total", "scontrol") == len(renices)
    # Steady state: a poll costs one squeue and no scontrol.
    before = len(model.calls)

    async def steady() -> None:
        await disp.poll_once()
        await disp.wait_idle()

    core_run(steady(), 60)
    assert [c[0] for c in model.calls[before:]] == ["squeue"]


def test_commands_are_counted_when_they_run_not_when_queued() -> None:
    model = SlurmModel()
    be = slurm_backend(model)
    jobs = {f"zzzzz-dz642-{i:015d}": model.submit(f"zzzzz-dz642-{i:015d}") for i in range(50)}
    wanted = {name: 1000 - i for i, name in enumerate(jobs)}

    async def go() -> None:
        listed = await be.list_jobs()
        model.scontrol_gate.clear()
        task = asyncio.create_task(be.set_priorities(wanted, listed))
        await asyncio.wait_for(model.wait_in_flight(2), 10)
        # Two processes running on the renice runner, none finished: nothing counted yet (the
        # old code showed all 50 here, and a benchmark read that as "renicing is over").
        assert model.in_flight == 2
        assert metric(be, "crunchgate_slurm_commands_total", "scontrol") == 0
        assert metric(be, "crunchgate_slurm_renice_pending_jobs") == 50
        model.scontrol_gate.set()
        await task
        assert metric(be, "crunchgate_slurm_commands_total", "scontrol") == 50
        await be.set_priorities(wanted, await be.list_jobs())
        assert metric(be, "crunchgate_slurm_renice_pending_jobs") == 0

    core_run(go())
    assert model.count("scontrol") == 50  # all at nice 10000: every one moves, the first to 0
    assert [j.name for j in sorted(model.live().values(), key=lambda j: j.nice)] == list(jobs)


def test_an_ended_job_with_the_same_name_does_not_fail_the_renice() -> None:
    model = SlurmModel()
    be = slurm_backend(model)
    names = [f"zzzzz-dz642-{i:015d}" for i in range(3)]
    old = model.submit(names[1])
    old.state = "CANCELLED"  # still listed (MinJobAge); scontrol JobName= would fail on it
    for n in names:
        model.submit(n)

    async def go() -> dict[str, Job]:
        await be.set_priorities({n: 10 - i for i, n in enumerate(names)}, await be.list_jobs())
        return await be.list_jobs()

    jobs = core_run(go())
    assert [jobs[n].nice for n in names] == [0, 10, 20]
    errors = be.cli.metrics.registry.get_sample_value(
        "crunchgate_slurm_command_errors_total", {"command": "scontrol", "kind": "other"})
    assert not errors
    assert old.nice == 10000


def test_a_pass_cut_by_its_deadline_is_finished_by_the_next(monkeypatch: Any) -> None:
    monkeypatch.setattr(backend_mod, "RENICE_PASS_MIN_S", 0.2)
    model = SlurmModel()
    cli = SlurmCLI(timeout_s=0.01, backoff=Backoff(base_s=0.05, max_s=0.2))
    model.attach(cli)
    be = SlurmBackend(cfg(), cli=cli)
    names = [f"zzzzz-dz642-{i:015d}" for i in range(20)]
    for n in names:
        model.submit(n)
    wanted = {n: 100 - i for i, n in enumerate(names)}

    async def go() -> None:
        model.scontrol_gate.clear()  # scontrol hangs: the pass must end anyway
        await be.set_priorities(wanted, await be.list_jobs())
        assert model.in_flight == 0  # the hung calls were stopped, nothing left behind
        model.scontrol_gate.set()
        await be.set_priorities(wanted, await be.list_jobs())

    core_run(go())
    assert model.order() == names
    assert metric(be, "crunchgate_slurm_renice_pending_jobs") == 20  # planned by the 2nd pass
    # The two calls the deadline stopped ran (counted), the rest of the first pass never did.
    assert metric(be, "crunchgate_slurm_commands_total", "scontrol") == 2 + 20
