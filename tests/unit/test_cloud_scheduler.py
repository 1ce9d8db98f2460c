"""Scheduler scenarios of reference 7.8/7.9 (run_queue_test.go, sync_test.go) with stub
queue and pool: ordering, packing, concurrency limits, supervisors, quota and capacity."""

from __future__ import annotations

import asyncio

from dispatcher.cloud.clock import FakeClock
from dispatcher.cloud.scheduler import (
    STATUS_AT_CAPACITY,
    STATUS_PREPARING,
    STATUS_SUPERVISOR_QUEUE,
    STATUS_TYPES_AT_CAPACITY,
    STATUS_WAITING_BOOT,
    Scheduler,
)
from dispatcher.cloud.worker import IdleBehavior, State
from tests.helpers.cloud import (
    GiB,
    StubPool,
    StubQueue,
    container_uuid,
    itype,
    make_ent,
    stub_config,
    view,
)

MENU = [itype(i) for i in range(1, 17)]
U = container_uuid


def run_pass(sch: Scheduler, *, passes: int = 1, sync: bool = True) -> None:
    async def go() -> None:
        for _ in range(passes):
            if sync:
                sch.sync()
            sch.run_queue()
            await sch.settle()
            if sync:
                sch.sync()
                await sch.settle()

    asyncio.run(go())


def new_sched(queue: StubQueue, pool: StubPool, menu=MENU, **vms) -> Scheduler:
    vms.setdefault("max_instances", 0)
    return Scheduler(stub_config(menu, **vms), queue, pool, clock=FakeClock())


def locked4(menu=MENU, factor=1.5, **kw) -> StubQueue:
    q = StubQueue()
    for i in range(1, 5):
        q.add(make_ent(i, "Locked", menu=menu, factor=factor, **kw))
    return q


def test_use_idle_workers():
    q = locked4(factor=1.0)
    t1, t2 = MENU[0], MENU[1]
    pool = StubPool(views=[view("i1", t1), view("i2", t2), view("i3", t2)])
    run_pass(new_sched(q, pool))
    assert pool.starts == [U(4)]
    assert pool.creates == ["type1", "type1", "type1"]


def test_pack_containers_new_instance():
    menu = MENU[1:]  # no type1
    q = locked4(menu=menu)
    pool = StubPool()
    run_pass(new_sched(q, pool, menu))
    assert pool.creates == ["type2", "type2"]
    assert pool.starts == []


def test_pack_containers_idle_instance():
    q = locked4(menu=MENU[1:])
    pool = StubPool(views=[view("i3", itype(3))])
    run_pass(new_sched(q, pool, MENU[1:]))
    assert pool.starts == [U(4), U(3), U(2)]
    assert pool.creates == ["type2"]


def test_pack_containers_idle_instance_too_big():
    q = locked4(menu=MENU[1:])
    pool = StubPool(views=[view("i4", itype(4))])
    run_pass(new_sched(q, pool, MENU[1:]))
    assert pool.starts == []
    assert pool.creates == ["type2", "type2"]


def test_pack_containers_spare_resources():
    q = locked4(menu=MENU[1:])
    q.add(make_ent(9, "Running", menu=MENU[1:]))
    pool = StubPool(views=[view("i3", itype(3), State.RUNNING, running=[U(9)])],
                    run={U(9): 0.0})
    run_pass(new_sched(q, pool, MENU[1:]))
    assert pool.starts == [U(4), U(3)]
    assert pool.creates == ["type2"]


def test_pack_containers_idle_behavior_hold():
    q = locked4(menu=MENU[1:])
    q.add(make_ent(9, "Running", menu=MENU[1:]))
    pool = StubPool(views=[view("i3", itype(3), State.RUNNING, IdleBehavior.HOLD,
                                running=[U(9)])], run={U(9): 0.0})
    run_pass(new_sched(q, pool, MENU[1:]))
    assert pool.starts == []
    assert pool.creates == ["type2", "type2"]


def test_pack_containers_disabled_in_config():
    q = locked4(menu=MENU[1:])
    pool = StubPool(views=[view("i2", itype(2))])
    run_pass(new_sched(q, pool, MENU[1:], max_running_containers_per_instance=1))
    assert pool.starts == [U(4)]
    assert pool.creates == ["type2", "type2", "type2"]


def test_pack_containers_limited_in_config():
    menu = MENU[7:]  # smallest is type8
    q = locked4(menu=menu)
    pool = StubPool()
    run_pass(new_sched(q, pool, menu, max_running_containers_per_instance=2))
    assert pool.creates == ["type8", "type8"]


def test_pack_containers_instance_state_unknown():
    menu = MENU[1:]
    q = locked4(menu=menu)
    pool = StubPool(views=[view("i2", itype(2), State.UNKNOWN)])
    sch = new_sched(q, pool, menu)
    run_pass(sch)
    assert pool.creates == ["type2"]
    assert pool.starts == []
    # The new instance becomes idle: the highest-priority containers go to the ready one.
    pool.views[1].instance = "new"
    pool.views[1].worker_state = State.IDLE
    run_pass(sch)
    assert pool.starts == [U(4), U(3)]


def test_pack_containers_0vcpus():
    menu = MENU[1:]
    q = StubQueue()
    q.add(make_ent(1, "Locked", menu=menu, vcpus=2, priority=10))
    q.add(make_ent(2, "Locked", menu=menu, vcpus=1, priority=9))
    for i in range(3, 7):
        q.add(make_ent(i, "Locked", menu=menu, vcpus=0, ram=128 << 20, priority=10 - i))
    pool = StubPool()
    run_pass(new_sched(q, pool, menu))
    # The 2-VCPU container gets a type2 alone; the 1-VCPU and four 0-VCPU ones share one.
    assert pool.creates == ["type2", "type2"]


def test_shutdown_at_quota():
    for quota in (1, 2, 3):
        q = StubQueue()
        q.add(make_ent(2, "Locked", menu=MENU, vcpus=2, ram=2 * GiB, factor=1.0))
        q.add(make_ent(3, "Locked", menu=MENU, vcpus=3, ram=3 * GiB, factor=1.0))
        pool = StubPool(views=[view("a", itype(2)), view("b", itype(2))], quota=quota)
        run_pass(new_sched(q, pool))
        if quota < 3:
            assert pool.starts == []
            assert sorted(pool.shutdowns) == ["a", "b"]
            assert pool.creates == []
            # Only the 2nd-in-line container loses its lock.
            assert q.changes == [(U(2), "Locked", "Queued")]
        else:
            assert pool.starts == [U(2)]
            assert pool.shutdowns == []
            assert pool.creates == ["type3"]
            assert q.changes == []


def test_instance_capacity():
    q = StubQueue()
    q.add(make_ent(4, "Locked", menu=MENU, vcpus=4, ram=4 * GiB, factor=1.0))
    q.add(make_ent(3, "Locked", menu=MENU, vcpus=4, ram=4 * GiB, factor=1.0))
    q.add(make_ent(2, "Queued", menu=MENU, vcpus=4, ram=4 * GiB, factor=1.0))
    q.add(make_ent(1, "Locked", menu=MENU, vcpus=1, ram=1 * GiB, factor=1.0))
    pool = StubPool(views=[view("i4", itype(4))], capacity={"type4"})
    sch = new_sched(q, pool)
    run_pass(sch)
    assert pool.starts == [U(4)]
    assert pool.creates == ["type1"]
    assert q.changes == []
    statuses = {s.ent.container["uuid"]: s.scheduling_status for s in sch.last_sorted}
    assert statuses[U(3)] == STATUS_TYPES_AT_CAPACITY.format(n=1, types="type4")
    assert statuses[U(1)] == STATUS_WAITING_BOOT.format(type="type1")


def test_unlock_excess_supervisors():
    q = StubQueue()
    for i in range(1, 7):
        q.add(make_ent(i, "Locked", menu=MENU, priority=1000 - i, vcpus=2, ram=2 * GiB,
                       supervisor=True))
    pool = StubPool(views=[view("i1", itype(2))],
                    run={U(i): 0.0 for i in range(1, 5)}, can_create=0)
    run_pass(new_sched(q, pool, initial_quota_estimate=10, supervisor_fraction=0.2))
    assert pool.starts == []
    assert pool.shutdowns == []
    assert pool.creates == []
    assert q.changes == [(U(5), "Locked", "Queued"), (U(6), "Locked", "Queued")]


def test_excess_supervisors_are_not_locked():
    q = StubQueue()
    for i in range(1, 9):
        q.add(make_ent(i, "Locked" if i in (3, 4) else "Queued", menu=MENU, priority=1000 + i,
                       vcpus=2, ram=2 * GiB, supervisor=True))
    pool = StubPool(views=[view("a", itype(2)), view("b", itype(2))], can_create=0)
    sch = new_sched(q, pool, initial_quota_estimate=4, supervisor_fraction=0.5)
    run_pass(sch)
    assert sorted(pool.starts) == [U(3), U(4)]
    assert pool.shutdowns == []
    assert q.changes == []
    statuses = {s.ent.container["uuid"]: s.scheduling_status for s in sch.last_sorted}
    assert statuses[U(8)] == STATUS_SUPERVISOR_QUEUE.format(n=1)


def test_skip_supervisors():
    q = StubQueue()
    for i in range(1, 5):
        q.add(make_ent(i, "Locked", menu=MENU, supervisor=i > 1))
    pool = StubPool(views=[view(f"i{i}", itype(1)) for i in range(4)])
    run_pass(new_sched(q, pool, initial_quota_estimate=10, supervisor_fraction=0.2))
    assert pool.starts == [U(4), U(3), U(1)]


def test_equal_priority_containers_do_not_flap():
    q = StubQueue()
    for i in range(1, 9):
        q.add(make_ent(i, "Queued", menu=MENU, priority=100, first_seen=float(i)))
    pool = StubPool(views=[view("a", itype(1)), view("b", itype(1))], quota=2)
    sch = new_sched(q, pool)
    run_pass(sch, passes=30)
    assert len(pool.starts) == 2
    assert pool.shutdowns == []
    unlocked = [u for u, frm, to in q.changes if to == "Queued"]
    assert len(unlocked) == len(set(unlocked))


def test_concurrency_limit_after_503():
    clock = FakeClock()
    q = StubQueue()
    for i in range(1, 7):
        q.add(make_ent(i, "Locked", menu=MENU, factor=1.0))
    q.add(make_ent(20, "Running", menu=MENU))
    q.add(make_ent(21, "Running", menu=MENU))
    pool = StubPool(views=[view(f"i{i}", itype(1)) for i in range(6)]
                    + [view("r1", itype(1), State.RUNNING, running=[U(20)]),
                       view("r2", itype(1), State.RUNNING, running=[U(21)])],
                    run={U(20): 0.0, U(21): 0.0})
    last_503 = clock.now() - 1
    sch = Scheduler(stub_config(MENU, max_instances=0, initial_quota_estimate=8), q, pool,
                    clock=clock, last_503=lambda: last_503)
    run_pass(sch)
    # 503 seen with 2 running: limit max(1, 2-1) = 1, so nothing more starts.
    assert sch.max_concurrency == 1
    assert pool.starts == []
    assert q.changes == []
    # Quiet for a minute: the limit grows again (running*1.1+1) and one more starts per pass.
    clock.advance(61)
    run_pass(sch)
    assert len(pool.starts) == 1


def test_max_instances_does_not_clamp_packing():
    """Reference 8.3 fix: at MaxInstances, packed instances keep receiving containers."""
    menu = MENU[3:4]  # only type4
    q = StubQueue()
    for i in range(1, 9):
        q.add(make_ent(i, "Locked", menu=menu))
    pool = StubPool(views=[view("a", itype(4)), view("b", itype(4))], quota=2)
    run_pass(new_sched(q, pool, menu, max_instances=2))
    assert len(pool.starts) == 8


def test_statuses_and_positions():
    q = StubQueue()
    for i in range(1, 5):
        q.add(make_ent(i, "Queued", menu=MENU, factor=1.0))
    pool = StubPool(can_create=0, capacity=set())
    sch = new_sched(q, pool)
    run_pass(sch)
    statuses = [s.scheduling_status for s in sch.last_sorted]
    # Queued containers are locked (a type is available) but nothing else happens yet.
    assert q.state(4) == "Locked"
    run_pass(sch)
    statuses = {s.ent.container["uuid"]: s.scheduling_status for s in sch.last_sorted}
    assert statuses[U(4)] == STATUS_AT_CAPACITY.format(n=1)
    assert statuses[U(1)] == STATUS_AT_CAPACITY.format(n=4)


def test_running_entries_first_and_preparing_status():
    q = StubQueue()
    q.add(make_ent(1, "Locked", menu=MENU, priority=1))
    q.add(make_ent(2, "Locked", menu=MENU, priority=50))
    pool = StubPool(views=[view("a", itype(1), State.RUNNING, running=[U(1)])], run={U(1): 0.0},
                    can_create=0)
    sch = new_sched(q, pool)
    run_pass(sch, sync=False)
    assert sch.last_sorted[0].ent.container["uuid"] == U(1)
    assert sch.last_sorted[0].scheduling_status == STATUS_PREPARING


# --- sync (reference 7.9) ---------------------------------------------------------------------


def test_forget_irrelevant_containers():
    q = StubQueue()
    q.add(make_ent(1, "Queued", menu=MENU, priority=0))
    q.add(make_ent(2, "Complete", menu=MENU))
    q.add(make_ent(3, "Queued", menu=MENU, priority=5))
    sch = new_sched(q, StubPool())
    sch.sync()
    assert set(q.ents) == {U(3)}


def test_cancel_orphaned_containers_waits_for_unknown_workers():
    q = StubQueue()
    q.add(make_ent(1, "Running", menu=MENU))
    pool = StubPool(views=[view("u", itype(1), State.UNKNOWN)])
    sch = new_sched(q, pool)
    run_pass(sch, passes=1)
    assert q.state(1) == "Running"
    pool.views.clear()
    run_pass(sch, passes=1)
    assert q.changes == [(U(1), "Running", "Cancelled")]
    sch.sync()
    assert U(1) not in q.ents


def test_kill_nonexistent_container():
    q = StubQueue()
    pool = StubPool(views=[view("a", itype(1), State.RUNNING, running=[U(7)])], run={U(7): 0.0})
    sch = new_sched(q, pool)
    sch.sync()
    assert pool.kills == [(U(7), "not in queue")]


def test_requeue_locked_after_crunch_run_exit_only_after_fresh_poll():
    q = StubQueue()
    q.add(make_ent(1, "Locked", menu=MENU))
    pool = StubPool(run={U(1): 100.0}, can_create=0)
    q.threshold = 50.0   # the last poll started before the exit: wait
    sch = new_sched(q, pool)
    run_pass(sch, passes=1)
    assert q.changes == []
    q.threshold = 150.0
    run_pass(sch, passes=1)
    assert q.changes[0] == (U(1), "Locked", "Queued")


def test_locked_with_priority_zero_is_requeued():
    q = StubQueue()
    q.add(make_ent(1, "Locked", menu=MENU, priority=0))
    sch = new_sched(q, StubPool())
    run_pass(sch)
    assert q.changes == [(U(1), "Locked", "Queued")]


# --- fixStaleLocks (reference 5.5.5) ----------------------------------------------------------


def _stale_setup(unknown: bool):
    q = StubQueue()
    q.add(make_ent(1, "Locked", menu=MENU))
    q.add(make_ent(2, "Locked", menu=MENU))
    views = [view("u", itype(1), State.UNKNOWN if unknown else State.IDLE,
                  running=[U(2)])]
    pool = StubPool(views=views, run={U(2): 0.0})
    return q, pool, Scheduler(stub_config(MENU), q, pool, clock=FakeClock())


async def _loaded() -> None:
    return None


def test_fix_stale_locks_unlocks_after_timeout_when_unknown_workers_exist():
    q, pool, sch = _stale_setup(unknown=True)
    n = asyncio.run(sch.fix_stale_locks(_loaded, 5.0))
    # Container 1 runs nowhere: unlocked. Container 2 is reported running: kept.
    assert n == 1
    assert q.changes == [(U(1), "Locked", "Queued")]


def test_fix_stale_locks_does_nothing_without_unknown_workers():
    q, pool, sch = _stale_setup(unknown=False)
    assert asyncio.run(sch.fix_stale_locks(_loaded, 5.0)) == 0
    assert q.changes == []


def test_queued_locked_only_as_far_as_max_instances_allows():
    """Improvement over the reference: no lock-then-unlock churn at MaxInstances."""
    for menu, want in ((MENU[:1], 2), (MENU[1:2], 4)):  # type1: 1 per VM; type2: 2 per VM
        q = StubQueue()
        for i in range(1, 7):
            q.add(make_ent(i, "Queued", menu=menu))
        pool = StubPool(quota=2)
        sch = new_sched(q, pool, menu, max_instances=2)
        run_pass(sch)
        assert len(q.changes) == want
        assert {to for _, _, to in q.changes} == {"Locked"}
        run_pass(sch, passes=3)
        # Nothing locked was unlocked again.
        assert [c for c in q.changes if c[2] == "Queued"] == []


def test_containers_metrics():
    from datetime import UTC, datetime

    clock = FakeClock()
    created = datetime.fromtimestamp(clock.now() - 10, UTC).isoformat().replace("+00:00", "Z")

    def setup(views, quota):
        q = StubQueue()
        q.add(make_ent(1, "Locked", menu=MENU, factor=1.0, created_at=created))
        pool = StubPool(views=views, quota=quota)
        sch = Scheduler(stub_config(MENU, max_instances=0), q, pool, clock=clock)
        run_pass(sch)
        sch.update_metrics()
        reg = sch.metrics.registry
        return [reg.get_sample_value("arvados_dispatchcloud_" + n) for n in (
            "containers_allocated_not_started", "containers_not_allocated_over_quota",
            "containers_longest_wait_time_seconds")], pool

    got, _ = setup([view("b", itype(1), State.BOOTING)], None)
    assert got == [1, 0, 10]
    got, _ = setup([], 0)
    assert got == [0, 1, 10]
    got, pool = setup([view("i", itype(1))], None)
    assert pool.starts == [U(1)] and got == [0, 0, 0]


def test_start_while_creating():
    """Reference TestStartWhileCreating: start what fits on idle instances while other
    containers get new instances (and a booting one already allocated is not doubled)."""
    q = StubQueue()
    for i, (vcpus, state) in enumerate([(1, "Locked"), (1, "Locked"), (2, "Locked"),
                                         (1, "Locked"), (2, "Locked"), (1, "Locked")], start=1):
        q.add(make_ent(i, state, menu=MENU, vcpus=vcpus, ram=vcpus * GiB, factor=1.0))
    pool = StubPool(views=[view("idle1", itype(1)), view("idle2", itype(2)),
                           view("boot1", itype(1), State.BOOTING)])
    run_pass(new_sched(q, pool))
    # 6 (1 VCPU) -> idle1; 5 (2 VCPUs) -> idle2; 4 (1) -> the booting type1; the rest need new
    # instances: 3 -> type2, 2 and 1 -> type1.
    assert pool.starts == [U(6), U(5)]
    assert sorted(pool.creates) == ["type1", "type1", "type2"]


def test_nothing_happens_before_the_first_cloud_listing():
    q = StubQueue()
    q.add(make_ent(1, "Running", menu=MENU))
    q.add(make_ent(2, "Locked", menu=MENU))
    pool = StubPool(loaded=False)
    sch = new_sched(q, pool)
    run_pass(sch)
    # Not "Running on no worker -> cancel", and no instance created for the Locked one.
    assert q.changes == [] and pool.creates == []
    pool.loaded = True
    run_pass(sch)
    assert (U(1), "Running", "Cancelled") in q.changes and pool.creates == ["type1"]


def test_queued_not_locked_on_unprobed_adopted_instance():
    """After a restart the adopted (unknown) instance may be full: no lock until its probe has
    told, so no lock-then-unlock burns a dispatch attempt; and nothing is created meanwhile."""
    it = itype(4)
    q = StubQueue()
    for i in (5, 6):
        q.add(make_ent(i, "Queued", menu=[it], factor=1.0))
    pool = StubPool(views=[view("i4", it, State.UNKNOWN)], quota=1)
    sch = new_sched(q, pool, [it], max_instances=1)
    run_pass(sch)
    assert q.changes == [] and pool.creates == []
    # The probe reports four 1-VCPU containers the previous process started: full.
    running = [U(i) for i in range(1, 5)]
    for i in range(1, 5):
        q.add(make_ent(i, "Running", menu=[it], factor=1.0))
        pool.run[U(i)] = 0.0
    pool.views[0].worker_state = State.RUNNING
    pool.views[0].running_container_uuids = list(running)
    run_pass(sch, passes=3)
    assert q.changes == [] and pool.creates == [] and pool.starts == []
    # Two of them finish: the two Queued ones are locked (once) and started there.
    for u in running[:2]:
        del pool.run[u]
        q.ents[u].container["state"] = "Complete"
        pool.views[0].running_container_uuids.remove(u)
    run_pass(sch, passes=2)
    assert q.changes == [(U(6), "Queued", "Locked"), (U(5), "Queued", "Locked")]
    assert sorted(pool.starts) == [U(5), U(6)]


def test_pack_containers_resources():
    """Reference 7.8 TestPackContainers_Resources: containers that need the RAM, the VCPUs or
    the scratch of a type8 share one type8; one needing 9 VCPUs gets a type16 (too expensive
    for the others, so it is not shared); four 0-VCPU containers share one type1."""
    from dispatcher.cloud.queue import QueueEnt
    from dispatcher.core.sizing import InstanceResources
    from tests.helpers.cloud import choose

    menu = [itype(n, scratch=n * GiB) for n in (1, 2, 4, 8, 16)]
    MiB = 1 << 20
    needs = {
        1: InstanceResources(vcpus=1, ram=5 * GiB),                       # RAM of a type8
        2: InstanceResources(vcpus=5, ram=128 * MiB),                     # VCPUs of a type8
        3: InstanceResources(vcpus=1, ram=128 * MiB, scratch=6 * GiB),    # scratch of a type8
        4: InstanceResources(vcpus=9, ram=128 * MiB),                     # needs a type16
        **{i: InstanceResources(vcpus=0, ram=128 * MiB) for i in (5, 6, 7, 8)},
    }
    q = StubQueue()
    for i, need in needs.items():
        ctr = {"uuid": U(i), "state": "Locked", "priority": i, "runtime_constraints": {},
               "scheduling_parameters": {}, "container_image": "", "created_at": ""}
        q.add(QueueEnt.make(ctr, choose(menu, need), need, float(i)))
    assert [t.name for t in q.ents[U(4)].instance_types] == ["type16"]
    assert [t.name for t in q.ents[U(5)].instance_types] == ["type1"]
    pool = StubPool()
    sch = new_sched(q, pool, menu)
    run_pass(sch)
    assert pool.creates == ["type1", "type16", "type8"] and pool.starts == []
    for n, v in enumerate(pool.views):       # they all boot
        v.instance, v.worker_state = f"i{n}", State.IDLE
    run_pass(sch)
    on = {v.arvados_instance_type: v.running_container_uuids for v in pool.views}
    assert on == {"type1": [U(8), U(7), U(6), U(5)], "type16": [U(4)],
                  "type8": [U(3), U(2), U(1)]}
    assert pool.creates == ["type1", "type16", "type8"]
