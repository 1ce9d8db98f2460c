"""Property tests (Hypothesis) for the worker state machine and ``--list`` parsing: random
sequences of probe outcomes, container starts and ends, kills, idle-behavior changes and clock
jumps never make an unlisted transition, and the invariants of reference 5.7 hold throughout."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.cloud.clock import FakeClock
from dispatcher.cloud.drivers.stub import StubInstance, StubInstanceSet, StubProc, StubVM
from dispatcher.cloud.pool import Pool
from dispatcher.cloud.worker import (
    TRANSITIONS,
    IdleBehavior,
    State,
    Worker,
    parse_list_output,
)
from tests.helpers.cloud import container_uuid, itype, stub_config

OPS = st.lists(st.one_of(
    st.tuples(st.just("probe"), st.booleans(), st.booleans()),     # boot ok, run ok
    st.tuples(st.just("start"), st.integers(1, 3)),
    st.tuples(st.just("finish"), st.integers(1, 3)),
    st.tuples(st.just("kill"), st.integers(1, 3)),
    st.tuples(st.just("behavior"), st.sampled_from(list(IdleBehavior))),
    st.tuples(st.just("advance"), st.sampled_from([0.5, 5, 61, 700])),
    st.tuples(st.just("idle_check")),
    st.tuples(st.just("broken")),
), max_size=30)


@settings(max_examples=150, deadline=None)
@given(initial=st.sampled_from([State.UNKNOWN, State.BOOTING]), ops=OPS)
def test_random_operation_sequences_keep_invariants(initial, ops):
    async def go() -> None:
        clock = FakeClock()
        iset = StubInstanceSet(clock)
        pool = Pool(stub_config([itype(1)], timeout_idle_s=60, timeout_booting_s=600,
                                timeout_probe_s=600), iset, iset.executor, set_id="s",
                    clock=clock)
        vm = StubVM(id="i1", instance_type=itype(1), tags={}, created=clock.now())
        iset.vms[vm.id] = vm
        inst = StubInstance(iset, vm)
        wkr = Worker(pool, inst, itype(1), iset.executor(inst), state=initial,
                     idle_behavior=IdleBehavior.RUN, now=clock.now())
        pool.workers[vm.id] = wkr
        seen = [wkr.state]
        for op in ops:
            held_before = wkr.idle_behavior is IdleBehavior.HOLD
            was_shutdown = wkr.state is State.SHUTDOWN
            if op[0] == "probe":
                vm.boot_probe_fails, vm.list_fails = not op[1], not op[2]
                await wkr.probe_and_update()
            elif op[0] == "start":
                pool.start_container(vm.id, {"uuid": container_uuid(op[1])})
            elif op[0] == "finish":
                vm.finish(container_uuid(op[1]))
            elif op[0] == "kill":
                pool.kill_container(container_uuid(op[1]), "test")
            elif op[0] == "behavior":
                pool.set_idle_behavior(vm.id, op[1])
            elif op[0] == "advance":
                clock.advance(op[1])
            elif op[0] == "idle_check":
                wkr.shutdown_if_idle()
            elif op[0] == "broken":
                vm.broken = True
            await pool.settle()
            # Invariants.
            if seen[-1] is not wkr.state:
                # One operation may chain two listed transitions (unknown -> idle -> running).
                reach = set(TRANSITIONS[seen[-1]])
                for mid in TRANSITIONS[seen[-1]]:
                    reach |= TRANSITIONS[mid]
                assert wkr.state in reach, (seen[-1], wkr.state)
                seen.append(wkr.state)
            if wkr.state in (State.IDLE, State.RUNNING):
                busy = bool(wkr.running or wkr.starting)
                assert (wkr.state is State.RUNNING) == busy, (wkr.state, busy)
            if wkr.state is State.SHUTDOWN:
                assert wkr.destroyed > 0
            if wkr.state is State.SHUTDOWN and not was_shutdown and held_before:
                # Hold: never shut down automatically (only after the behavior is changed).
                assert op[0] == "behavior" and op[1] is not IdleBehavior.HOLD, op
        # Once shut down, always shut down.
        if State.SHUTDOWN in seen:
            assert seen[-1] is State.SHUTDOWN

    asyncio.run(go())


@given(st.lists(st.one_of(
    st.just("broken"), st.just(""),
    st.integers(0, 999).map(lambda i: container_uuid(i)),
    st.integers(0, 999).map(lambda i: container_uuid(i) + " stale"),
    st.integers(0, 999).map(lambda i: f"yyyyy-dz642-{i:015d}"),
    st.text(max_size=20).filter(lambda s: "\n" not in s and "\r" not in s),
), max_size=20))
def test_list_parsing_properties(lines):
    out = parse_list_output("\n".join(lines) + "\n", "zzzzz")
    assert out.broken == ("broken" in [ln.strip() for ln in lines])
    for u in out.running + out.stale:
        assert u.startswith("zzzzz")
    for ln in lines:
        if ln.startswith("zzzzz-dz642-") and " " not in ln.strip():
            assert ln.strip() in out.running


def test_stub_proc_type_is_used():
    # Keeps StubProc imported for the strategies' readers: a listed process is "running".
    vm = StubVM(id="x", instance_type=itype(1), tags={}, created=0.0)
    vm.procs[container_uuid(1)] = StubProc(container_uuid(1), {})
    assert container_uuid(1) in vm.procs
