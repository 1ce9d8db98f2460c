"""Worker pool scenarios (reference 7.10, 7.12): resume after restart, drain/hold, create
throttle, pending creates and init command, quota/capacity/rate-limit back-off, disappearance,
list lag — with the stub driver and a fake clock."""

from __future__ import annotations

import asyncio
import re

from dispatcher.cloud.clock import FakeClock
from dispatcher.cloud.drivers.stub import StubInstanceSet
from dispatcher.cloud.drivers.wrap import wrap_instance_set
from dispatcher.cloud.errors import CapacityError, QuotaError, RateLimitError
from dispatcher.cloud.metrics import CloudMetrics
from dispatcher.cloud.pool import Pool, instance_set_id
from dispatcher.cloud.throttle import Holdoff, RateLimiter
from dispatcher.cloud.worker import IdleBehavior, State
from dispatcher.config import InstanceType
from tests.helpers.cloud import itype, stub_config

MENU = [itype(1), itype(2), itype(3)]


def new_pool(iset: StubInstanceSet, clock: FakeClock, menu=MENU, **vms) -> Pool:
    vms.setdefault("max_concurrent_instance_create_ops", 0)
    cfg = stub_config(menu, **vms)
    metrics = CloudMetrics()
    return Pool(cfg, wrap_instance_set(iset, cfg, metrics, clock), iset.executor,
                set_id="set1", clock=clock, metrics=metrics)


def run(coro):
    return asyncio.run(coro)


def test_instance_set_id():
    assert instance_set_id("v2/zzzzz-gj3su-abcdefghijklmno/secret") == "zzzzz-gj3su-abcdefghijklmno"
    assert instance_set_id("plain") == "f4f8d6f3f6c1a1f1b1d7b4a1f6d8f2b1"[:0] + \
        __import__("hashlib").md5(b"plain").hexdigest()


def test_create_tags_init_command_and_pending_view():
    clock = FakeClock()
    iset = StubInstanceSet(clock)

    async def go():
        pool = new_pool(iset, clock, instance_init_command="echo hello", resource_tags={"testtag": "x"})
        v = pool.create(itype(1))
        assert v is not None and v.instance == "" and v.worker_state is State.BOOTING
        # The pending create shows up in instances() before the driver returns.
        assert [x.instance for x in pool.instances()] == [""]
        await pool.settle()
        vm = next(iter(iset.vms.values()))
        assert vm.tags["ArvadosInstanceSetID"] == "set1"
        assert vm.tags["ArvadosInstanceType"] == "type1"
        assert vm.tags["ArvadosIdleBehavior"] == "run"
        assert vm.tags["testtag"] == "x"
        secret = vm.tags["ArvadosInstanceSecret"]
        assert re.fullmatch(r"[0-9a-f]{40}", secret)
        assert vm.init_command == (f'umask 0177 && echo -n "{secret}" '
                                   ">/var/run/arvados-instance-secret\necho hello")
        assert pool.workers[vm.id].state is State.BOOTING
        return pool

    pool = run(go())
    assert pool.metrics.registry.get_sample_value(
        "arvados_dispatchcloud_driver_operations",
        {"operation": "Create", "error": "0"}) == 1


def test_create_throttle():
    for limit, want in ((1, 1), (2, 2), (0, 3)):
        clock = FakeClock()
        iset = StubInstanceSet(clock)

        async def go(limit=limit, iset=iset, clock=clock):
            pool = new_pool(iset, clock, max_concurrent_instance_create_ops=limit)
            return [pool.create(itype(1)) is not None for _ in range(3)], pool

        ok, pool = run(go())
        assert sum(ok) == want


def test_resume_after_restart():
    clock = FakeClock()
    iset = StubInstanceSet(clock)

    async def first():
        pool = new_pool(iset, clock, menu=MENU)
        for it in (itype(1), itype(2), itype(3), itype(3)):
            pool.create(it)
        await pool.settle()
        await pool.probe_all(wait=True)
        ids = sorted(pool.workers)
        held = next(w for w in ids if pool.workers[w].instance_type.name == "type1")
        pool.set_idle_behavior(held, IdleBehavior.HOLD)
        await pool.settle()
        await pool.stop()
        return ids, held

    ids, held = run(first())

    async def second():
        # type3 was removed from the config.
        pool = new_pool(iset, clock, menu=MENU[:2])
        await pool.sync()
        await pool.probe_all(wait=True)
        return pool

    pool = run(second())
    assert sorted(pool.workers) == ids
    behaviors = {w.instance_type.name: w.idle_behavior for w in pool.workers.values()}
    assert pool.workers[held].idle_behavior is IdleBehavior.HOLD
    assert [w.idle_behavior for w in pool.workers.values()
            if w.instance_type.name == "type3"] == [IdleBehavior.DRAIN, IdleBehavior.DRAIN]
    assert behaviors["type2"] is IdleBehavior.RUN
    # Adopted workers start as unknown and come into service with probes.
    assert all(w.state in (State.IDLE, State.SHUTDOWN) for w in pool.workers.values())


def test_start_container_only_on_idle_run_workers():
    clock = FakeClock()
    iset = StubInstanceSet(clock)

    async def go():
        pool = new_pool(iset, clock)
        for _ in range(3):
            pool.create(itype(1))
        await pool.settle()
        await pool.probe_all(wait=True)
        a, b, c = sorted(pool.workers)
        pool.set_idle_behavior(b, IdleBehavior.HOLD)
        pool.workers[c].idle_behavior = IdleBehavior.DRAIN  # not yet shut down
        got = [pool.start_container(x, {"uuid": f"zzzzz-dz642-00000000000000{i}"})
               for i, x in enumerate((a, b, c))]
        await pool.settle()
        return got

    assert run(go()) == [True, False, False]


def test_shutdown_rules_and_disappearance():
    clock = FakeClock()
    iset = StubInstanceSet(clock)

    async def go():
        pool = new_pool(iset, clock, timeout_idle_s=60)
        ev = pool.subscribe()
        for _ in range(3):
            pool.create(itype(1))
        await pool.settle()
        a, b, c = sorted(pool.workers)
        pool.set_idle_behavior(a, IdleBehavior.HOLD)
        assert not pool.shutdown(a)          # on hold
        assert pool.shutdown(b)              # booting, not on hold
        await pool.settle()
        ev.clear()
        await pool.sync()
        assert b not in pool.workers and ev.is_set()
        # drain -> immediate shutdown once probed idle.
        await pool.probe_all(wait=True)
        pool.set_idle_behavior(c, IdleBehavior.DRAIN)
        await pool.settle()
        assert pool.workers[c].state is State.SHUTDOWN
        # idle past TimeoutIdle -> shut down by the probe loop; hold stays.
        await pool.sync()
        clock.advance(61)
        await pool.probe_all(wait=True)
        await pool.settle()
        await pool.sync()
        return pool, a

    pool, a = run(go())
    assert list(pool.workers) == [a]
    reg = pool.metrics.registry
    assert reg.get_sample_value("arvados_dispatchcloud_instances_disappeared",
                                {"state": "shutdown"}) == 2
    assert reg.get_sample_value("arvados_dispatchcloud_boot_outcomes",
                                {"outcome": "aborted"}) >= 1


def test_quota_error_backoff():
    clock = FakeClock()
    iset = StubInstanceSet(clock, quota=2)

    async def go():
        pool = new_pool(iset, clock)
        assert pool.create(itype(1)) and pool.create(itype(1))
        await pool.settle()
        assert pool.create(itype(1)) is not None      # the cloud will refuse this one
        await pool.settle()
        assert pool.at_quota() and pool.quota_error_active()
        assert pool.at_quota_until_fewer == 2
        assert pool.create(itype(2)) is None          # no cloud call while at quota
        calls = len([o for o in iset.ops if o[0].startswith("Create")])
        # One instance goes away: a sync that shows fewer than 2 clears the mark.
        victim = sorted(pool.workers)[0]
        pool.shutdown(victim)
        await pool.settle()
        await pool.sync()
        assert not pool.at_quota()
        return calls

    assert run(go()) == 3


def test_quota_error_with_nothing_running_waits_ttl():
    clock = FakeClock()
    iset = StubInstanceSet(clock, create_error=lambda it: QuotaError("no quota at all"))

    async def go():
        pool = new_pool(iset, clock)
        pool.create(itype(1))
        await pool.settle()
        assert pool.at_quota()
        clock.advance(59)
        assert pool.at_quota()
        clock.advance(2)
        assert not pool.at_quota()

    run(go())


def test_capacity_errors_by_type_and_quota_group():
    clock = FakeClock()
    a1, a2 = InstanceType(name="a1", provider_type="a1", vcpus=1, ram=1 << 30, price=1), \
        InstanceType(name="a2", provider_type="a2", vcpus=2, ram=2 << 30, price=2)
    a1p = InstanceType(name="a1p", provider_type="a1", vcpus=1, ram=1 << 30, price=1,
                       preemptible=True)
    b4 = InstanceType(name="b4", provider_type="b4", vcpus=4, ram=4 << 30, price=4)
    b4p = InstanceType(name="b4p", provider_type="b4", vcpus=4, ram=4 << 30, price=4,
                       preemptible=True)
    errors = {
        "a1": CapacityError("vcpu limit", quota_group_specific=True),
        "b4p": CapacityError("no spot b4", instance_type_specific=True),
    }
    iset = StubInstanceSet(clock, create_error=lambda it: errors.get(it.name),
                           quota_groups={"a1": "a", "a2": "a", "a1p": "a", "b4": "b", "b4p": "b"})

    async def go():
        pool = new_pool(iset, clock, menu=[a1, a2, a1p, b4, b4p])
        pool.create(a1)
        pool.create(b4p)
        await pool.settle()
        return {it.name: pool.at_capacity(it) for it in (a1, a2, a1p, b4, b4p)}, pool

    got, pool = run(go())
    assert got == {"a1": True, "a2": True, "a1p": False, "b4": False, "b4p": True}

    async def after():
        assert pool.create(a2) is None
        assert pool.create(b4) is not None
        clock.advance(61)
        assert not pool.at_capacity(a2)

    run(after())


def test_rate_limit_error_suspends_creates_until_earliest_retry():
    clock = FakeClock()
    first = [True]

    def err(it):
        if first[0]:
            first[0] = False
            return RateLimitError("slow down", clock.now() + 30)
        return None

    iset = StubInstanceSet(clock, create_error=err)

    async def go():
        pool = new_pool(iset, clock)
        ev = pool.subscribe()
        pool.create(itype(1))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert pool.create(itype(1)) is None
        ev.clear()
        clock.advance(31)
        assert pool.create(itype(1)) is not None
        await pool.settle()

    run(go())


def test_holdoff_notify_and_clear():
    clock = FakeClock()
    fired = []

    async def go():
        h = Holdoff(clock, notify=lambda: fired.append(clock.now()))
        h.error_until(RuntimeError("x"), clock.now() + 10)
        assert h.check() is not None
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert fired  # fake clock slept through the deadline and notified
        assert h.check() is None
        h.error_until(RuntimeError("y"), clock.now() - 1)
        assert h.check() is None

    run(go())


def test_rate_limiter_spaces_calls():
    clock = FakeClock()

    async def go():
        lim = RateLimiter(10, clock)
        start = clock.now()
        for _ in range(5):
            await lim.wait()
        return clock.now() - start

    assert abs(run(go()) - 0.4) < 1e-6


def test_freshly_created_worker_not_dropped_by_lagging_list():
    clock = FakeClock()
    iset = StubInstanceSet(clock)

    async def go():
        pool = new_pool(iset, clock)
        pool.create(itype(1))
        await pool.settle()
        (wid,) = pool.workers
        iset.hidden.add(wid)   # the provider's list does not show it yet
        await pool.sync()
        assert wid in pool.workers
        clock.advance(pool.create_list_grace_s + 1)
        await pool.sync()
        assert wid not in pool.workers

    run(go())


def test_list_failure_is_not_disappearance():
    clock = FakeClock()
    iset = StubInstanceSet(clock)

    async def go():
        pool = new_pool(iset, clock)
        pool.create(itype(1))
        await pool.settle()

        async def boom(tags):
            raise RuntimeError("API down")

        iset.instances = boom  # type: ignore[method-assign]
        assert not await pool.sync()
        assert len(pool.workers) == 1

    run(go())


def test_max_cloud_ops_per_second_paces_driver_calls():
    clock = FakeClock()
    iset = StubInstanceSet(clock)

    async def go():
        pool = new_pool(iset, clock, max_cloud_ops_per_second=10)
        start = clock.now()
        for _ in range(5):
            await pool.sync()
        return clock.now() - start

    # Five list calls at 10 per second: the last waits 0.4 s after the first.
    assert abs(run(go()) - 0.4) < 1e-6
    assert iset.list_calls == 5


def test_destroy_retried_after_timeout_shutdown_while_still_listed():
    clock = FakeClock()
    failures = [1]

    def destroy_error(vm):
        if failures[0]:
            failures[0] -= 1
            return RuntimeError("provider hiccup")
        return None

    iset = StubInstanceSet(clock, destroy_error=destroy_error)

    async def go():
        pool = new_pool(iset, clock, timeout_shutdown_s=10)
        pool.create(itype(1))
        await pool.settle()
        (wid,) = pool.workers
        assert pool.shutdown(wid)
        await pool.settle()
        destroys = lambda: [o for o in iset.ops if o[0] == "Destroy"]  # noqa: E731
        assert len(destroys()) == 1 and wid in iset.vms       # the first destroy failed
        clock.advance(5)
        await pool.sync()                                      # still listed, < TimeoutShutdown
        await pool.settle()
        assert len(destroys()) == 1
        clock.advance(6)
        await pool.sync()                                      # > TimeoutShutdown: retry
        await pool.settle()
        assert len(destroys()) == 2 and wid not in iset.vms
        await pool.sync()
        assert wid not in pool.workers
        return pool

    pool = run(go())
    assert pool.metrics.registry.get_sample_value(
        "arvados_dispatchcloud_driver_operations", {"operation": "Destroy", "error": "1"}) == 1


def test_max_concurrent_creates_frees_the_slot_without_extra_holdoff():
    """MaxConcurrentInstanceCreateOps: refused while the limit is in flight, allowed again as
    soon as a create returns (the reference adds a fixed 5 s hold-off here)."""
    clock = FakeClock()
    iset = StubInstanceSet(clock)

    async def go():
        pool = new_pool(iset, clock, max_concurrent_instance_create_ops=1)
        t0 = clock.now()
        assert pool.create(itype(1)) is not None
        assert pool.create(itype(1)) is None
        await pool.settle()
        assert clock.now() == t0
        assert pool.create(itype(1)) is not None
        await pool.settle()
        return len(pool.workers)

    assert run(go()) == 2


def test_zero_durations_fall_back_to_reference_defaults():
    clock = FakeClock()
    pool = new_pool(StubInstanceSet(clock), clock, sync_interval_s=0, probe_interval_s=0,
                    timeout_idle_s=0, timeout_booting_s=0, timeout_probe_s=0,
                    timeout_shutdown_s=0, timeout_term_s=0, timeout_signal_s=0,
                    timeout_stale_run_lock_s=0, max_probes_per_second=0)
    assert (pool.sync_interval_s, pool.probe_interval_s, pool.timeout_idle_s,
            pool.timeout_booting_s, pool.timeout_probe_s, pool.timeout_shutdown_s,
            pool.timeout_term_s, pool.timeout_signal_s, pool.timeout_stale_run_lock_s,
            pool.max_probes_per_second) == (60, 10, 60, 600, 600, 10, 120, 5, 5, 10)


def test_max_probes_per_second_paces_probe_starts():
    clock = FakeClock()
    iset = StubInstanceSet(clock)

    async def go():
        pool = new_pool(iset, clock, max_probes_per_second=4)
        for _ in range(6):
            pool.create(itype(1))
        await pool.settle()
        start = clock.now()
        await pool.probe_all()
        return clock.now() - start

    assert abs(run(go()) - 6 / 4) < 1e-6


def test_every_remote_command_has_a_timeout_and_a_hung_probe_cannot_block():
    """Reference 8.3: no timeout on SSH commands meant a hung probe blocked that worker's
    probes (and so its probe-failure timeout) forever. Here each command times out; the worker
    keeps being probed and is shut down TimeoutProbe after its last good probe."""
    clock = FakeClock()
    iset = StubInstanceSet(clock)

    async def go():
        pool = new_pool(iset, clock, timeout_probe_s=60, probe_interval_s=10)
        pool.create(itype(1))
        await pool.settle()
        await pool.probe_all(wait=True)
        (wid,) = pool.workers
        wkr = pool.workers[wid]
        assert wkr.state is State.IDLE
        pool.start_container(wid, {"uuid": "zzzzz-dz642-000000000000001"})
        await pool.settle()
        vm = iset.vms[wid]
        vm.hangs = True
        rounds = 0
        while wkr.state is not State.SHUTDOWN:
            rounds += 1
            assert rounds < 20, "a hung worker was never shut down"
            await pool.probe_all(wait=True)
            assert not wkr.probing           # the hung probe ended (timed out)
        elapsed = clock.now() - wkr.probed
        assert 60 <= elapsed < 60 + 2 * pool.probe_timeout_s
        return vm

    vm = run(go())
    assert vm.timeouts and all(t is not None and 0 < t <= 300 for t in vm.timeouts), vm.timeouts


def test_listing_during_create_is_booting_and_tags_are_kept_in_line():
    """Reference 5.6.2: an instance listed while its create call is still in flight (its
    secret tag matches the pending create) is booting, not unknown; a known instance whose
    InstanceType/IdleBehavior tags differ from the worker's gets them re-saved."""
    clock = FakeClock()
    release = asyncio.Event()

    class SlowCreate(StubInstanceSet):
        async def create(self, it, image_id, tags, init_command, public_key):
            inst = await super().create(it, image_id, tags, init_command, public_key)
            await release.wait()     # the VM exists (and is listed) before the call returns
            return inst

    iset = SlowCreate(clock)

    async def go():
        pool = new_pool(iset, clock)
        pool.create(itype(1))
        for _ in range(5):
            await asyncio.sleep(0)
        assert len(iset.vms) == 1 and pool.creating
        await pool.sync()
        (wkr,) = pool.workers.values()
        assert wkr.state is State.BOOTING
        release.set()
        await pool.settle()
        assert not pool.creating and len(pool.workers) == 1
        vm = iset.vms[wkr.instance.id]
        pool.set_idle_behavior(wkr.instance.id, IdleBehavior.HOLD)
        await pool.settle()
        assert vm.tags["ArvadosIdleBehavior"] == "hold"
        vm.tags["ArvadosIdleBehavior"] = "run"            # someone edited the tag
        before = len([o for o in iset.ops if o[0] == "SetTags"])
        await pool.sync()
        await pool.settle()
        assert len([o for o in iset.ops if o[0] == "SetTags"]) == before + 1
        assert vm.tags["ArvadosIdleBehavior"] == "hold"
        await pool.sync()                                  # in line now: nothing to write
        await pool.settle()
        assert len([o for o in iset.ops if o[0] == "SetTags"]) == before + 1

    run(go())
