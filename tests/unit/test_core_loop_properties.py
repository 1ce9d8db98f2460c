"""Property test of the dispatch loop: random interleavings of polls, scheduler and controller
failures, vanishing jobs, priority changes and crunch-run progress. Safety invariants are
checked on every step; liveness once the failures stop."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatcher.core.loop import Dispatcher
from tests.helpers.core import FakeArvados, FakeBackend, core_config, core_run

OPS = st.sampled_from([
    "poll", "poll", "poll",
    "add",              # a new Queued container
    "crunch_run",       # each job's crunch-run makes progress (Locked->Running->Complete)
    "requeue",          # a crunch-run fails before Running: container back to Queued, job ends
    "vanish",           # the scheduler loses a job
    "list_fails",       # the next job listing fails
    "api_fails",        # the next controller list call fails
    "get_fails",        # the next GET fails
    "prio0",            # somebody cancels a request: priority 0
])


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Checked(FakeBackend):
    """A fake scheduler that asserts the loop's safety rules as it is called."""

    def __init__(self, api: FakeArvados) -> None:
        super().__init__()
        self.api = api
        self.listing_failed_this_poll = False
        self.calls_after_failed_listing: list[str] = []

    async def submit(self, ctr):
        uuid = ctr["uuid"]
        rec = self.api.containers[uuid]
        assert uuid not in self.jobs, f"double submit of {uuid}"
        assert rec["state"] == "Locked" and rec["locked_by_uuid"] == self.api.token_uuid, rec
        await super().submit(ctr)


def crunch_run_step(api: FakeArvados, be: FakeBackend) -> None:
    for uuid in list(be.jobs):
        rec = api.containers.get(uuid)
        if rec is None or rec["state"] in ("Complete", "Cancelled", "Queued"):
            be.jobs.pop(uuid)  # crunch-run refuses / exits
        elif rec["state"] == "Locked":
            rec["state"] = "Running"
        elif rec["state"] == "Running":
            rec.update(state="Complete", locked_by_uuid=None, exit_code=0)
            be.jobs.pop(uuid)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(OPS, min_size=1, max_size=40), seed=st.integers(0, 1000))
def test_loop_is_safe_and_live(ops, seed):
    api = FakeArvados(max_dispatch_attempts=1000)
    be = Checked(api)
    clock = Clock()
    d = Dispatcher(core_config(), api, be, clock=clock)
    wanted: set[str] = set()

    async def poll(expect_listing_ok: bool | None = None):
        before = (len(be.submitted), len(be.cancelled), len(api.ops("lock")),
                  len(api.ops("unlock")))
        failing = bool(be.list_error)
        report = await d.poll_once()
        await d.wait_idle()
        clock.t += 10_000  # no backoff or throttle in the way between steps
        if not report.ok:
            # The controller query failed first: the listing was not even tried; nothing done.
            assert (len(be.submitted), len(be.cancelled), len(api.ops("lock")),
                    len(api.ops("unlock"))) == before
            return report
        be.list_error = None
        if failing:
            after = (len(be.submitted), len(be.cancelled), len(api.ops("lock")),
                     len(api.ops("unlock")))
            assert not report.jobs_ok
            assert after == before, "acted although the job listing failed"
        return report

    async def go():
        for i, op in enumerate(ops):
            pick = sorted(api.containers)[(seed + i) % len(api.containers)] \
                if api.containers else None
            if op == "poll":
                await poll()
            elif op == "add":
                wanted.add(api.add_container("Queued", 1 + (seed + i) % 7))
            elif op == "crunch_run":
                crunch_run_step(api, be)
            elif op == "requeue" and pick and api.containers[pick]["state"] == "Locked":
                api.containers[pick].update(state="Queued", locked_by_uuid=None)
                be.jobs.pop(pick, None)
            elif op == "vanish" and pick:
                if be.jobs.pop(pick, None) and api.containers[pick]["state"] == "Running":
                    wanted.discard(pick)  # lost while running: Cancelled is the right end
            elif op == "list_fails":
                be.list_error = RuntimeError("squeue timed out")
            elif op == "api_fails":
                api.fail("list")
            elif op == "get_fails":
                api.fail("get")
            elif op == "prio0" and pick and api.containers[pick]["state"] != "Complete":
                api.containers[pick]["priority"] = 0
                wanted.discard(pick)
        # Failures stop; crunch-run keeps working: everything settles.
        api._failures.clear()  # noqa: SLF001
        for _ in range(12):
            await poll()
            crunch_run_step(api, be)
        await poll()

    core_run(go(), timeout_s=60)
    for uuid, rec in api.containers.items():
        if uuid in wanted and rec["priority"] > 0:
            assert rec["state"] == "Complete", rec
        else:
            assert rec["state"] in ("Queued", "Complete", "Cancelled"), rec
    assert not be.jobs, "jobs left behind"
    assert not d.tracked, "tracking never forgets"
