"""The dispatch loop's decisions, against a fake controller and a fake scheduler."""

from __future__ import annotations

import asyncio
import itertools
import logging

import pytest

from dispatcher.core.backend import Job, SubmitFailed
from dispatcher.core.loop import (
    ANY_JOB,
    ANY_PRIO,
    MISSING,
    RULES,
    Action,
    Dispatcher,
    Owner,
    decide,
    desired_priority,
)
from dispatcher.core.sizing import ConstraintsNotSatisfiable
from tests.helpers.core import (
    OTHER_TOKEN_UUID,
    FakeApiError,
    FakeArvados,
    FakeBackend,
    core_config,
    core_run,
)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def setup(**containers):
    api, be, clock = FakeArvados(), FakeBackend(), Clock()
    d = Dispatcher(core_config(**containers), api, be, clock=clock)
    return api, be, d, clock


async def poll(d: Dispatcher):
    report = await d.poll_once()
    await d.wait_idle()
    return report


def job(uuid: str, **kw) -> Job:
    return Job(name=uuid, job_id="1", state=kw.pop("state", "RUNNING"), **kw)


# --- the table itself ---------------------------------------------------------------------------

POSSIBLE = [
    (state, owner, prio, view)
    for state in ("Queued", "Locked", "Running", "Complete", "Cancelled", MISSING)
    for owner in Owner
    for prio in ANY_PRIO
    for view in ANY_JOB
    # what the controller can produce: Locked/Running always have a holder; Queued never does
    # (final states keep whatever holder the server leaves, so both are covered).
    if not (state in ("Locked", "Running") and owner is Owner.NONE)
    and not (state == "Queued" and owner is Owner.ME)
    and not (state == MISSING and owner is not Owner.NONE)
]


def test_every_possible_combination_has_exactly_one_rule():
    for combo in POSSIBLE:
        matching = [r for r in RULES if r.matches(*combo)]
        assert len(matching) == 1, (combo, matching)


def test_impossible_combination_has_no_rule():
    from dispatcher.core.loop import JobView
    assert decide("Locked", Owner.NONE, True, JobView.ABSENT) is None


# --- lock and submit ----------------------------------------------------------------------------

def test_queued_is_locked_then_submitted_once():
    api, be, d, _ = setup()
    uuid = api.add_container("Queued", 1)

    async def go():
        r1 = await poll(d)
        assert r1.decisions[uuid] is Action.LOCK_AND_SUBMIT
        r2 = await poll(d)
        assert r2.decisions[uuid] is Action.NOTHING
        await poll(d)
    core_run(go())
    assert api.ops("lock") == [uuid]
    assert be.submitted == [uuid]
    rec = api.containers[uuid]
    assert rec["state"] == "Locked" and rec["locked_by_uuid"] == api.token_uuid
    # the pending job's reason is published once, not rewritten every poll
    assert rec["runtime_status"]["scheduling_status"] == "waiting for Resources"
    assert api.ops("update") == [uuid]


def test_locked_with_job_already_in_queue_is_not_resubmitted():
    api, be, d, _ = setup()
    uuid = api.add_container("Locked", 5)
    be.jobs[uuid] = job(uuid, state="PENDING")
    core_run(poll(d))
    assert be.submitted == [] and api.ops("lock") == []


def test_locked_without_job_after_restart_is_submitted_without_locking():
    api, be, d, _ = setup()
    uuid = api.add_container("Locked", 5)
    core_run(poll(d))
    assert be.submitted == [uuid] and api.ops("lock") == []


def test_queued_with_stale_job_cancels_it_before_locking():
    api, be, d, _ = setup()
    uuid = api.add_container("Queued", 5)
    be.jobs[uuid] = job(uuid)

    async def go():
        await poll(d)
        assert be.cancelled == [uuid] and api.ops("lock") == []
        await poll(d)  # job gone now: lock and submit
    core_run(go())
    assert api.ops("lock") == [uuid] and be.submitted == [uuid]


def test_submit_in_flight_is_never_doubled():
    api, be, d, _ = setup()
    uuid = api.add_container("Queued", 1)
    gate = asyncio.Event()
    started = []
    original = be.submit

    async def slow_submit(ctr):
        started.append(ctr["uuid"])
        await gate.wait()
        await original(ctr)
    be.submit = slow_submit

    async def go():
        await d.poll_once()
        for _ in range(100):
            if started:
                break
            await asyncio.sleep(0.01)
        r = await d.poll_once()
        assert r.decisions[uuid] is Action.WAIT
        gate.set()
        await d.wait_idle()
        # the submit finished after this poll's snapshot: still not "vanished", not resubmitted
        await poll(d)
    core_run(go())
    assert be.submitted == [uuid]
    assert api.containers[uuid]["state"] == "Locked"


def test_job_that_never_appears_after_submit_is_unlocked():
    api, be, d, _ = setup()
    uuid = api.add_container("Queued", 1)
    be.on_submit = lambda ctr: be.jobs.pop(ctr["uuid"])  # "sbatch ok", job never listed

    async def go():
        await poll(d)
        r = await poll(d)
        assert r.decisions[uuid] is Action.CHECK_VANISHED
    core_run(go())
    assert api.ops("unlock") == [uuid]
    assert api.containers[uuid]["state"] == "Queued"


def test_burst_is_submitted_with_bounded_concurrency():
    api, be, d, _ = setup()
    d._submit_sem = asyncio.Semaphore(4)  # noqa: SLF001 (fresh loop per test)
    uuids = {api.add_container("Queued", p) for p in range(1, 301)}
    active = itertools.count()
    peak = [0, 0]
    original = be.submit

    async def counting_submit(ctr):
        peak[0] += 1
        peak[1] = max(peak[1], peak[0])
        await asyncio.sleep(0)
        await original(ctr)
        peak[0] -= 1
    be.submit = counting_submit
    del active

    core_run(poll(d))
    assert set(be.submitted) == uuids
    assert 1 < peak[1] <= 4
    # highest priority first
    assert api.containers[be.submitted[0]]["priority"] == 300


def test_paging_uses_max_items_per_response():
    api, be, d, _ = setup()
    d.batch_size = 2
    uuids = {api.add_container("Queued", p) for p in range(1, 6)}
    core_run(poll(d))
    assert set(be.submitted) == uuids


# --- missing data -------------------------------------------------------------------------------

def test_list_jobs_failure_changes_nothing():
    api, be, d, _ = setup()
    queued = api.add_container("Queued", 1)
    locked = api.add_container("Locked", 1)
    running = api.add_container("Running", 1)
    zero = api.add_container("Running", 0)
    done = api.add_container("Complete", 1)
    be.list_error = RuntimeError("squeue: timed out")
    report = core_run(poll(d))
    assert not report.jobs_ok
    assert be.submitted == [] and be.cancelled == []
    assert api.ops("lock") == [] and api.ops("unlock") == [] and api.ops("update") == []
    assert api.ops("get") == []
    for u in (queued, locked, running, zero):
        assert report.decisions[u] is Action.WAIT
    assert done not in report.decisions
    assert d.consecutive_failures == 1


def test_controller_query_failure_skips_the_poll():
    api, be, d, _ = setup()
    api.add_container("Queued", 1)
    api.fail("list")
    report = core_run(poll(d))
    assert not report.ok and report.decisions == {}
    assert be.submitted == [] and d.consecutive_failures == 1
    core_run(poll(d))
    assert len(be.submitted) == 1 and d.consecutive_failures == 0


def test_failed_by_uuid_query_is_not_read_as_missing():
    api, be, d, _ = setup()
    uuid = api.add_container("Running", 1)
    be.jobs[uuid] = job(uuid)

    async def go():
        await poll(d)
        api.containers[uuid].update(state="Complete", locked_by_uuid=None)
        # mine + dispatchable succeed, the by-uuid query fails
        api._failures["list"] = [None, None, FakeApiError(503, "down")]  # noqa: SLF001
        original = api._maybe_fail  # noqa: SLF001

        def maybe_fail(op):
            pending = api._failures.get(op)  # noqa: SLF001
            if pending:
                exc = pending.pop(0)
                if exc is not None:
                    raise exc
        api._maybe_fail = maybe_fail  # noqa: SLF001
        r = await poll(d)
        assert uuid not in r.decisions and be.cancelled == []
        api._maybe_fail = original  # noqa: SLF001
        r = await poll(d)
        assert r.decisions[uuid] is Action.CANCEL_JOB
    core_run(go())
    assert be.cancelled == [uuid]


# --- vanished jobs ------------------------------------------------------------------------------

def test_running_container_whose_job_vanished_is_cancelled():
    api, be, d, _ = setup()
    uuid = api.add_container("Running", 1)
    be.jobs[uuid] = job(uuid)

    async def go():
        await poll(d)
        del be.jobs[uuid]
        r = await poll(d)
        assert r.decisions[uuid] is Action.CHECK_VANISHED
    core_run(go())
    assert api.containers[uuid]["state"] == "Cancelled"
    assert api.ops("get") == [uuid]
    assert any("ended without crunch-run finishing it" in e["properties"]["text"]
               for e in api.logs)
    assert "ended without crunch-run" in api.containers[uuid]["runtime_status"]["error"]


def test_locked_container_whose_job_vanished_is_unlocked():
    api, be, d, _ = setup()
    uuid = api.add_container("Queued", 1)

    async def go():
        await poll(d)
        del be.jobs[uuid]
        await poll(d)
    core_run(go())
    assert api.ops("unlock") == [uuid]
    assert api.containers[uuid]["state"] == "Queued"


def test_vanished_job_with_failing_get_does_nothing_this_round():
    api, be, d, _ = setup()
    uuid = api.add_container("Running", 1)
    be.jobs[uuid] = job(uuid)

    async def go():
        await poll(d)
        del be.jobs[uuid]
        api.fail("get")
        await poll(d)
        assert api.containers[uuid]["state"] == "Running"
        assert api.ops("update") == []
        await poll(d)
    core_run(go())
    assert api.containers[uuid]["state"] == "Cancelled"


def test_vanished_job_of_a_container_that_finished_meanwhile_changes_nothing():
    api, be, d, _ = setup()
    uuid = api.add_container("Running", 1)
    be.jobs[uuid] = job(uuid)

    async def go():
        await poll(d)
        original = be.list_jobs

        async def finish_then_list():
            # crunch-run completes between the controller query and the job listing
            api.containers[uuid].update(state="Complete", locked_by_uuid=None, exit_code=0)
            be.jobs.pop(uuid, None)
            return await original()
        be.list_jobs = finish_then_list
        await poll(d)
    core_run(go())
    assert api.containers[uuid]["state"] == "Complete"
    assert api.ops("update") == [] and api.ops("unlock") == []


# --- priority 0, orphans, other dispatchers -------------------------------------------------------

def test_priority_zero_cancels_the_job():
    api, be, d, _ = setup()
    running = api.add_container("Running", 0)
    be.jobs[running] = job(running)
    locked = api.add_container("Locked", 0)
    be.jobs[locked] = job(locked, state="PENDING")
    idle = api.add_container("Locked", 0)
    core_run(poll(d))
    assert sorted(be.cancelled) == sorted([running, locked])
    assert api.ops("unlock") == [idle]
    assert be.submitted == []


def test_cancel_is_repeated_only_after_a_while():
    api, be, d, clock = setup()
    uuid = api.add_container("Running", 0)
    be.jobs[uuid] = job(uuid)
    be.cancel_keeps_job = True

    async def go():
        await poll(d)
        await poll(d)
        await poll(d)
        assert be.cancelled == [uuid]
        clock.t += 61
        await poll(d)
    core_run(go())
    assert be.cancelled == [uuid, uuid]


def test_orphan_jobs_are_cancelled_and_foreign_jobs_left_alone():
    api, be, d, _ = setup()
    complete = api.add_container("Complete", 1)
    cancelled = api.add_container("Cancelled", 0)
    queued_zero = api.add_container("Queued", 0)
    deleted = "zzzzz-dz642-deleteddeleted1"
    other_cluster = "yyyyy-dz642-000000000000001"
    for name in (complete, cancelled, queued_zero, deleted, other_cluster, "my-own-job"):
        be.jobs[name] = job(name)

    async def go():
        await poll(d)
        assert sorted(be.cancelled) == sorted([complete, cancelled, queued_zero, deleted])
        await poll(d)
    core_run(go())
    assert set(be.jobs) == {other_cluster, "my-own-job"}
    # all forgotten: nothing left to query by uuid
    assert d.tracked == {}


def test_tracked_container_that_disappears_is_dropped_after_its_job_is_cancelled():
    api, be, d, _ = setup()
    uuid = api.add_container("Running", 1)
    be.jobs[uuid] = job(uuid)

    async def go():
        await poll(d)
        del api.containers[uuid]
        await poll(d)
        assert be.cancelled == [uuid]
        await poll(d)
        assert uuid not in d.tracked
        n = len(api.ops("list"))
        await poll(d)
        assert len(api.ops("list")) == n + 2  # mine + dispatchable only, no by-uuid query
    core_run(go())


def test_containers_locked_by_another_token_are_left_alone():
    api, be, d, _ = setup()
    theirs = api.add_container("Locked", 1, locked_by=OTHER_TOKEN_UUID)
    running = api.add_container("Running", 0, locked_by=OTHER_TOKEN_UUID)
    be.jobs[theirs] = job(theirs)
    be.jobs[running] = job(running)
    report = core_run(poll(d))
    assert report.decisions[theirs] is Action.IGNORE
    assert be.cancelled == [] and be.submitted == []
    assert api.ops("unlock") == [] and api.ops("update") == []


# --- submit failures ----------------------------------------------------------------------------

def test_permanent_submit_failure_sets_error_then_cancels():
    api, be, d, _ = setup()
    uuid = api.add_container("Queued", 1)
    be.submit_errors[uuid] = SubmitFailed("sbatch: error: invalid partition specified: nope",
                                          permanent=True)
    core_run(poll(d))
    rec = api.containers[uuid]
    assert rec["state"] == "Cancelled"
    assert "invalid partition specified" in rec["runtime_status"]["error"]
    # the bare reason, as arvados-dispatch-lsf writes it; the log record has the prefix
    assert rec["runtime_status"]["error"] == "sbatch: error: invalid partition specified: nope"
    assert api.logs[0]["properties"]["text"].startswith(f"Error running container {uuid}: ")
    assert [e["event_type"] for e in api.logs] == ["dispatch"]
    assert api.logs[0]["object_uuid"] == uuid
    # error written while still Locked, then the state change
    assert api.ops("update") == [uuid, uuid]


def test_unsatisfiable_container_gets_the_reference_message():
    from dispatcher.config import InstanceType
    api, be, d, _ = setup()
    uuid = api.add_container("Queued", 1)
    be.submit_errors[uuid] = ConstraintsNotSatisfiable(
        "constraints not satisfiable by any configured instance type",
        [InstanceType(name="small", vcpus=1, ram=1 << 30, price=0.5)])
    core_run(poll(d))
    rec = api.containers[uuid]
    assert rec["state"] == "Cancelled"
    assert rec["runtime_status"]["error"] == (
        "constraints not satisfiable by any configured instance type")
    assert api.logs[0]["properties"]["text"].startswith(
        f"cannot run container {uuid}: constraints not satisfiable")
    assert 'Type "small": 1 VCPUs' in api.logs[0]["properties"]["text"]
    assert "\n" not in rec["runtime_status"]["error"]
    assert rec["runtime_status"]["errorDetail"].startswith("Available instance types:\nType")


def test_transient_submit_failure_unlocks_and_backs_off():
    api, be, d, clock = setup()
    uuid = api.add_container("Queued", 1)
    be.submit_errors[uuid] = SubmitFailed("sbatch: Socket timed out", permanent=False)

    async def go():
        await poll(d)
        rec = api.containers[uuid]
        assert rec["state"] == "Queued" and rec["lock_count"] == 1
        r = await poll(d)
        assert r.decisions[uuid] is Action.WAIT  # backing off
        assert api.ops("lock") == [uuid]
        del be.submit_errors[uuid]
        clock.t += 10_000
        await poll(d)
    core_run(go())
    assert be.submitted == [uuid]
    assert api.containers[uuid]["state"] == "Locked"
    assert api.logs and api.logs[0]["event_type"] == "dispatch"


def test_max_dispatch_attempts_cancels_via_the_controller():
    api, be, d, clock = setup()
    api.max_dispatch_attempts = 3
    uuid = api.add_container("Queued", 1)
    be.submit_errors["*"] = SubmitFailed("bsub: cannot connect to LSF", permanent=False)

    async def go():
        for _ in range(10):
            await poll(d)
            clock.t += 10_000
            if api.containers[uuid]["state"] == "Cancelled":
                break
    core_run(go())
    rec = api.containers[uuid]
    assert rec["state"] == "Cancelled"
    assert "MaxDispatchAttempts" in rec["runtime_status"]["error"]
    assert api.ops("lock") == [uuid] * 3


def test_lock_failure_is_logged_and_retried_next_poll(caplog):
    api, be, d, _ = setup()
    uuid = api.add_container("Queued", 1)
    api.fail("lock", FakeApiError(422, "cannot lock when Locked"))
    with caplog.at_level(logging.WARNING, logger="crunchgate.dispatch"):
        core_run(poll(d))
    assert f"error locking container {uuid}" in caplog.text
    assert be.submitted == []
    core_run(poll(d))
    assert be.submitted == [uuid]


def test_min_retry_period_throttles_lock_attempts():
    api, be, d, clock = setup(min_retry_period_s=60.0)
    uuid = api.add_container("Queued", 1)
    api.fail("lock", times=2)

    async def go():
        await poll(d)
        await poll(d)
        assert api.ops("lock") == [uuid]
        clock.t += 61
        await poll(d)
    core_run(go())
    assert api.ops("lock") == [uuid, uuid]


# --- priorities and odd data ---------------------------------------------------------------------

def test_set_priorities_gets_desired_priorities_of_our_jobs():
    api, be, d, _ = setup()
    big = api.add_container("Running", 5 << 50)
    legacy = api.add_container("Locked", 500, created_at="2026-11-22T08:00:00Z")
    zero = api.add_container("Running", 0)
    for u in (big, legacy, zero):
        be.jobs[u] = job(u)
    core_run(poll(d))
    wanted = be.priorities[-1]
    assert wanted[big] == 5 << 50
    assert wanted[legacy] == desired_priority(api.containers[legacy])
    assert zero not in wanted


def test_desired_priority_legacy_conversion():
    created = "2026-11-22T08:00:00.5Z"
    import datetime as dt
    ts = dt.datetime(2026, 11, 22, 8, 0, 0, 500000, tzinfo=dt.UTC)
    ns = int(ts.timestamp()) * 10**9 + 500_000_000
    assert desired_priority({"priority": 7, "created_at": created}) == (7 << 50) - (ns >> 14)
    assert desired_priority({"priority": 1001}) == 1001
    assert desired_priority({"priority": 0}) == 0
    older = desired_priority({"priority": 7, "created_at": "2026-01-01T00:00:00Z"})
    assert older > desired_priority({"priority": 7, "created_at": created})


def test_unlisted_combination_is_logged_as_error(caplog):
    api, be, d, _ = setup()
    uuid = api.add_container("Locked", 1, locked_by="")  # a state the controller never makes
    api.containers[uuid]["locked_by_uuid"] = api.token_uuid
    d.my_token_uuid = api.token_uuid

    async def go():
        # "mine" returns it; then make the record inconsistent as seen by the loop
        original = api.list

        async def odd_list(resource, **kw):
            out = await original(resource, **kw)
            for item in out["items"]:
                item["locked_by_uuid"] = None
            return out
        api.list = odd_list
        return await poll(d)
    with caplog.at_level(logging.ERROR, logger="crunchgate.dispatch"):
        report = core_run(go())
    assert "no decision rule" in caplog.text
    assert any("no rule" in e for e in report.errors)
    assert be.submitted == [] and api.ops("unlock") == []


def test_run_loop_stops_on_event_and_backs_off_on_failure():
    api, be, d, _ = setup()
    uuid = api.add_container("Queued", 1)

    async def go():
        stop = asyncio.Event()
        task = asyncio.create_task(d.run(stop))
        for _ in range(500):
            if be.submitted:
                break
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(task, 5)
    core_run(go())
    assert be.submitted == [uuid]


@pytest.mark.parametrize("failures", [1, 3])
def test_poll_delay_grows_with_failures(failures):
    api, be, d, _ = setup()
    d.consecutive_failures = failures
    assert d.poll_interval_s * 2 ** failures * 0.5 <= d._poll_delay() <= (  # noqa: SLF001
        d.poll_interval_s * 2 ** failures)


def test_polls_start_one_interval_apart_but_take_at_most_half_the_time():
    _, _, d, _ = setup()
    interval = d.poll_interval_s
    assert d._poll_delay(0.0) == interval  # noqa: SLF001
    assert d._poll_delay(interval * 0.4) == pytest.approx(interval * 0.6)  # noqa: SLF001
    # Slower polls: a pause as long as the poll, never back to back, at most an interval.
    assert d._poll_delay(interval * 0.7) == pytest.approx(interval * 0.7)  # noqa: SLF001
    assert d._poll_delay(interval * 3) == pytest.approx(interval)  # noqa: SLF001


def test_submit_finishing_during_the_job_listing_is_not_taken_as_vanished():
    api, be, d, _ = setup()
    uuid = api.add_container("Queued", 1)
    gate = asyncio.Event()
    original_submit, original_list = be.submit, be.list_jobs

    async def slow_submit(ctr):
        await gate.wait()
        await original_submit(ctr)

    async def list_then_finish_submit():
        snapshot = await original_list()  # taken before the submit lands
        gate.set()
        for _ in range(100):
            if uuid in be.jobs:
                break
            await asyncio.sleep(0.01)
        return snapshot

    async def go():
        be.submit = slow_submit
        await d.poll_once()
        be.list_jobs = list_then_finish_submit
        r = await d.poll_once()
        assert r.decisions[uuid] is Action.WAIT
        await d.wait_idle()
        be.list_jobs = original_list
        r = await poll(d)
        assert r.decisions[uuid] is Action.NOTHING
    core_run(go())
    assert api.ops("unlock") == [] and api.ops("get") == []
    assert be.submitted == [uuid]


def test_unexpected_error_in_a_poll_does_not_end_the_loop():
    api, be, d, _ = setup()
    uuid = api.add_container("Queued", 1)
    original = api.list
    broken = [True]

    async def list_once_malformed(resource, **kw):
        out = await original(resource, **kw)
        if broken[0] and out["items"]:
            broken[0] = False
            out["items"] = [{"no": "uuid"}]  # a malformed record: KeyError in the poll
        return out
    api.list = list_once_malformed

    async def go():
        stop = asyncio.Event()
        task = asyncio.create_task(d.run(stop))
        for _ in range(500):
            if be.submitted:
                break
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(task, 5)
    core_run(go())
    assert not broken[0] and be.submitted == [uuid]


def test_by_uuid_answer_that_ignores_the_filter_is_not_trusted():
    api, be, d, _ = setup()
    uuid = api.add_container("Running", 1)
    be.jobs[uuid] = job(uuid)

    async def go():
        await poll(d)
        api.containers[uuid].update(state="Complete", locked_by_uuid=None)
        stranger = api.add_container("Complete", 1)
        original = api.list

        async def unfiltered(resource, **kw):
            if kw.get("filters", [[None]])[0][0] == "uuid":
                kw = {**kw, "filters": [["uuid", "in", [uuid, stranger]]], "limit": 20}
            return await original(resource, **kw)
        api.list = unfiltered
        r = await poll(d)
        assert uuid not in r.decisions and be.cancelled == []
        assert any("did not match" in e for e in r.errors)
    core_run(go())


def test_many_tracked_containers_are_looked_up_in_batches_of_20():
    api, be, d, _ = setup()
    uuids = [api.add_container("Running", 1) for _ in range(45)]
    for u in uuids:
        be.jobs[u] = job(u)

    async def go():
        await poll(d)
        for u in uuids:
            api.containers[u].update(state="Complete", locked_by_uuid=None)
        n = len(api.ops("list"))
        await poll(d)
        by_uuid = [f for f in api.ops("list")[n:] if "'uuid', 'in'" in f]
        assert len(by_uuid) == 3
    core_run(go())
    assert sorted(be.cancelled) == sorted(uuids)
