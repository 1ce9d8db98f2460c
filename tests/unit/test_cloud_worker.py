"""Worker state machine: the reference's TestProbeAndUpdate trials (7.11), the transition
table, shutdown eligibility, ``--list`` parsing and the kill sequence — with a stub executor
and a fake clock (no sleeping)."""

from __future__ import annotations

import asyncio

import pytest

from dispatcher.cloud.clock import FakeClock
from dispatcher.cloud.drivers.stub import StubInstance, StubInstanceSet, StubProc, StubVM
from dispatcher.cloud.pool import Pool
from dispatcher.cloud.worker import (
    TRANSITIONS,
    IdleBehavior,
    InvalidTransition,
    RemoteRunner,
    State,
    Worker,
    parse_list_output,
    shutdown_eligible,
)
from tests.helpers.cloud import container_uuid, itype, stub_config

BOOT_TIMEOUT = 60.0
PROBE_TIMEOUT = 1.0
U1 = container_uuid(1)


def make(state: State, *, age: float = 0.0, boot_ok: bool = True, run_ok: bool = True,
         listed: tuple[str, ...] = (), known_running: tuple[str, ...] = (),
         starting: tuple[str, ...] = (), runner_data: bytes | None = None,
         default_runner_fails: bool = False, deploy_fails: bool = False,
         behavior: IdleBehavior = IdleBehavior.RUN):
    clock = FakeClock()
    iset = StubInstanceSet(clock)
    cfg = stub_config([itype(1)], timeout_booting_s=BOOT_TIMEOUT, timeout_probe_s=PROBE_TIMEOUT)
    pool = Pool(cfg, iset, iset.executor, set_id="setid", clock=clock, runner_data=runner_data)
    vm = StubVM(id="inst1", instance_type=itype(1), tags={}, created=clock.now())
    vm.boot_probe_fails = not boot_ok
    vm.list_fails = not run_ok
    vm.default_runner_fails = default_runner_fails
    vm.deploy_fails = deploy_fails
    for u in listed:
        vm.procs[u] = StubProc(u, {})
    iset.vms[vm.id] = vm
    inst = StubInstance(iset, vm)
    wkr = Worker(pool, inst, itype(1), iset.executor(inst), state=state,
                 idle_behavior=behavior, now=clock.now() - age)
    for u in known_running:
        wkr.running[u] = RemoteRunner(wkr, u)
    for u in starting:
        wkr.starting[u] = RemoteRunner(wkr, u)
    pool.workers[vm.id] = wkr
    return pool, wkr, vm


def probe(wkr: Worker) -> None:
    async def go() -> None:
        await wkr.probe_and_update()
        await wkr.pool.settle()

    asyncio.run(go())


B2 = 2 * BOOT_TIMEOUT
P2 = 2 * PROBE_TIMEOUT

# (name, make() kwargs, expected state, expected running count)
TRIALS = [
    ("1 unknown both fail", dict(state=State.UNKNOWN, boot_ok=False, run_ok=False),
     State.UNKNOWN, 0),
    ("2 unknown boot fails, lists one", dict(state=State.UNKNOWN, boot_ok=False, listed=(U1,)),
     State.UNKNOWN, 1),
    ("3 unknown known one, list empty",
     dict(state=State.UNKNOWN, boot_ok=False, known_running=(U1,)), State.UNKNOWN, 0),
    ("4 unknown timeout both fail",
     dict(state=State.UNKNOWN, age=B2, boot_ok=False, run_ok=False), State.SHUTDOWN, 0),
    ("5 unknown timeout run fails", dict(state=State.UNKNOWN, age=B2, run_ok=False),
     State.SHUTDOWN, 0),
    ("6 unknown timeout boot fails list empty", dict(state=State.UNKNOWN, age=B2, boot_ok=False),
     State.SHUTDOWN, 0),
    ("7 unknown timeout boot fails lists one",
     dict(state=State.UNKNOWN, age=B2, boot_ok=False, listed=(U1,)), State.UNKNOWN, 1),
    ("8 unknown deployed runner lists one",
     dict(state=State.UNKNOWN, boot_ok=False, listed=(U1,), runner_data=b"ELF",
          default_runner_fails=True), State.UNKNOWN, 1),
    ("9 as 8 past timeout",
     dict(state=State.UNKNOWN, age=B2, boot_ok=False, listed=(U1,), runner_data=b"ELF",
          default_runner_fails=True), State.UNKNOWN, 1),
    ("10 as 9 without container",
     dict(state=State.UNKNOWN, age=B2, boot_ok=False, runner_data=b"ELF",
          default_runner_fails=True), State.SHUTDOWN, 0),
    ("11 booting both fail", dict(state=State.BOOTING, boot_ok=False, run_ok=False),
     State.BOOTING, 0),
    ("12 booting boot fails", dict(state=State.BOOTING, boot_ok=False), State.BOOTING, 0),
    ("13 booting run fails", dict(state=State.BOOTING, run_ok=False), State.BOOTING, 0),
    ("14 booting both ok", dict(state=State.BOOTING), State.IDLE, 0),
    ("15 booting ok with container", dict(state=State.BOOTING, listed=(U1,)), State.RUNNING, 1),
    ("16 booting timeout run fails", dict(state=State.BOOTING, age=B2, run_ok=False),
     State.SHUTDOWN, 0),
    ("17 idle lists container", dict(state=State.IDLE, age=P2, listed=(U1,)), State.RUNNING, 1),
    ("18 idle known one, run fails past timeout",
     dict(state=State.IDLE, age=P2, known_running=(U1,), run_ok=False), State.SHUTDOWN, 1),
    ("19 idle run fails past timeout", dict(state=State.IDLE, age=P2, run_ok=False),
     State.SHUTDOWN, 0),
    ("20 running still listed", dict(state=State.RUNNING, known_running=(U1,), listed=(U1,)),
     State.RUNNING, 1),
    ("21 running no longer listed", dict(state=State.RUNNING, known_running=(U1,)),
     State.IDLE, 0),
    ("22 running, one starting", dict(state=State.RUNNING, age=P2, starting=(U1,)),
     State.RUNNING, 0),
    ("23 booting deploy then list",
     dict(state=State.BOOTING, listed=(U1,), runner_data=b"ELF", default_runner_fails=True),
     State.RUNNING, 1),
    ("24 booting deploy fails", dict(state=State.BOOTING, runner_data=b"ELF", deploy_fails=True),
     State.BOOTING, 0),
    ("25 booting deploy disabled", dict(state=State.BOOTING), State.IDLE, 0),
]


@pytest.mark.parametrize("name,kwargs,want_state,want_running", TRIALS,
                         ids=[t[0] for t in TRIALS])
def test_probe_and_update(name, kwargs, want_state, want_running):
    state = kwargs.pop("state")
    pool, wkr, vm = make(state, **kwargs)
    probe(wkr)
    assert wkr.state is want_state
    assert len(wkr.running) == want_running
    if kwargs.get("runner_data") and not kwargs.get("deploy_fails"):
        # The runner was uploaded with the reference's install command and is used after.
        assert vm.deployed[pool.runner_path] == b"ELF"
        assert any(c.startswith(pool.runner_path + " --list") for c in vm.commands)


def test_boot_outcome_and_metrics_once():
    pool, wkr, vm = make(State.BOOTING)
    probe(wkr)
    probe(wkr)
    m = pool.metrics.registry
    assert m.get_sample_value("arvados_dispatchcloud_boot_outcomes",
                              {"outcome": "success"}) == 1


def test_hold_never_shuts_down_on_probe_failure():
    pool, wkr, vm = make(State.IDLE, age=10 * PROBE_TIMEOUT, run_ok=False,
                         behavior=IdleBehavior.HOLD)
    probe(wkr)
    assert wkr.state is State.IDLE


def test_broken_instance_is_drained():
    pool, wkr, vm = make(State.IDLE)
    vm.broken = True
    probe(wkr)
    assert wkr.idle_behavior is IdleBehavior.DRAIN
    assert vm.tags[pool.tag_prefix + "IdleBehavior"] == "drain"


def test_stale_run_lock_too_long_reports_broken():
    pool, wkr, vm = make(State.RUNNING, listed=(U1,), known_running=(U1,))
    vm.leave_stale(U1)
    probe(wkr)
    assert wkr.idle_behavior is IdleBehavior.RUN
    pool.clock.advance(pool.timeout_stale_run_lock_s + 1)
    probe(wkr)
    assert wkr.idle_behavior is IdleBehavior.DRAIN


def test_transition_table_rejects_unlisted():
    pool, wkr, vm = make(State.SHUTDOWN)
    with pytest.raises(InvalidTransition):
        wkr.set_state(State.IDLE)
    assert State.RUNNING not in TRANSITIONS[State.BOOTING]
    pool, wkr, vm = make(State.BOOTING)
    with pytest.raises(InvalidTransition):
        wkr.set_state(State.RUNNING)


@pytest.mark.parametrize("state,behavior,busy_ago,appeared_ago,given_up,want", [
    (State.IDLE, IdleBehavior.RUN, 59, 0, True, False),
    (State.IDLE, IdleBehavior.RUN, 60, 0, True, True),
    (State.IDLE, IdleBehavior.HOLD, 600, 0, True, False),
    (State.IDLE, IdleBehavior.DRAIN, 0, 0, True, True),
    (State.BOOTING, IdleBehavior.RUN, 600, 600, True, False),
    (State.BOOTING, IdleBehavior.DRAIN, 0, 0, True, True),
    (State.RUNNING, IdleBehavior.DRAIN, 0, 0, False, False),
    (State.RUNNING, IdleBehavior.DRAIN, 0, 0, True, True),
    (State.RUNNING, IdleBehavior.RUN, 600, 0, True, False),
    (State.UNKNOWN, IdleBehavior.RUN, 0, 599, True, False),
    (State.UNKNOWN, IdleBehavior.RUN, 0, 600, True, True),
    (State.SHUTDOWN, IdleBehavior.DRAIN, 0, 0, True, False),
])
def test_shutdown_eligibility(state, behavior, busy_ago, appeared_ago, given_up, want):
    now = 1000.0
    assert shutdown_eligible(state, behavior, now=now, appeared=now - appeared_ago,
                             busy=now - busy_ago, timeout_idle_s=60, timeout_booting_s=600,
                             all_runners_given_up=given_up) is want
    # An adopted worker that runs containers outlives TimeoutBooting (reference 8.3).
    if state is State.UNKNOWN:
        assert not shutdown_eligible(state, behavior, now=now, appeared=now - appeared_ago,
                                     busy=now, timeout_idle_s=60, timeout_booting_s=600,
                                     all_runners_given_up=False, has_runners=True)


def test_adopted_worker_with_failing_boot_probe_keeps_its_containers():
    """After a restart, a VM whose boot probe fails (say systemd reports "degraded") but whose
    crunch-run --list shows containers is left alone past TimeoutBooting; once they have
    finished it is shut down by the probe timeout."""
    pool, wkr, vm = make(State.UNKNOWN, boot_ok=False, listed=(U1,))

    async def rounds(n: int) -> None:
        for _ in range(n):
            await pool.probe_all(wait=True)
            await pool.settle()

    asyncio.run(rounds(1))
    assert wkr.state is State.UNKNOWN and list(wkr.running) == [U1]
    pool.clock.advance(2 * BOOT_TIMEOUT)
    asyncio.run(rounds(3))
    assert wkr.state is State.UNKNOWN and list(wkr.running) == [U1] and not vm.destroyed
    vm.finish(U1)
    asyncio.run(rounds(2))
    assert wkr.state is State.SHUTDOWN and vm.destroyed


def test_parse_list_output():
    out = ("zzzzz-dz642-000000000000001\nbroken\nzzzzz-dz642-000000000000002 stale\n"
           "yyyyy-dz642-000000000000003\n\n")
    r = parse_list_output(out, "zzzzz")
    assert r.running == ["zzzzz-dz642-000000000000001"]
    assert r.stale == ["zzzzz-dz642-000000000000002"]
    assert r.broken


def test_start_command_format_and_stdin_config():
    pool, wkr, vm = make(State.IDLE)
    pool.cfg.containers.runtime_engine = "stub"
    pool.cfg.containers.crunch_run_arguments_list = ["--foo", "--extra='args'"]
    pool.api_host = "127.0.0.1:8000"
    cmd, stdin = pool.start_command(wkr, U1)
    assert cmd == ("crunch-run --detach --stdin-config '--runtime-engine=stub' '--foo' "
                   "'--extra='\\''args'\\''' '" + U1 + "'")
    import json

    cfg = json.loads(stdin)
    assert cfg["Env"]["ARVADOS_API_HOST"] == "127.0.0.1:8000"
    assert cfg["Env"]["ARVADOS_API_TOKEN"] == pool.cfg.system_root_token
    assert cfg["Env"]["GatewayAddress"] == "10.0.0.1:0"
    assert json.loads(cfg["Env"]["InstanceType"])["ProviderType"] == "providertype1"
    assert len(cfg["Env"]["GatewayAuthSecret"]) == 64
    assert cfg["Cluster"] is None
    vm.remote_user = "crunch"
    cmd, _ = pool.start_command(wkr, U1)
    assert cmd.startswith("sudo crunch-run --detach")


def test_kill_sequence_retries_then_gives_up_and_drains():
    pool, wkr, vm = make(State.RUNNING, listed=(U1,), known_running=(U1,))
    vm.unkillable = True

    async def go() -> None:
        wkr.running[U1].kill("test")
        wkr.running[U1].kill("again (no-op)")
        await pool.settle()

    asyncio.run(go())
    kills = [c for c in vm.commands if "--kill 15" in c]
    # First attempt at once, then every TimeoutSignal until TimeoutTERM.
    assert len(kills) == int(pool.timeout_term_s / pool.timeout_signal_s) + 1
    assert wkr.running[U1].given_up
    assert wkr.idle_behavior is IdleBehavior.DRAIN
    # Draining + every runner given up: now eligible for shutdown.
    async def shut() -> bool:
        done = wkr.shutdown_if_idle()
        await pool.settle()
        return done

    assert asyncio.run(shut())
    assert wkr.state is State.SHUTDOWN
    assert vm.destroyed


def test_kill_success_leaves_exit_placeholder():
    pool, wkr, vm = make(State.RUNNING, listed=(U1,), known_running=(U1,))

    async def go() -> None:
        assert pool.kill_container(U1, "test")
        await pool.settle()

    asyncio.run(go())
    assert U1 not in wkr.running
    assert pool.running()[U1] == pool.clock.now()
    assert wkr.state is State.IDLE
    pool.forget_container(U1)
    assert U1 not in pool.running()


def test_boot_probe_command_is_the_configured_one():
    pool, wkr, vm = make(State.BOOTING)
    assert pool.boot_probe_command == "systemctl is-system-running"   # the reference default
    probe(wkr)
    assert vm.commands[:2] == ["systemctl is-system-running", "crunch-run --list"]
    pool2, wkr2, vm2 = make(State.BOOTING)
    pool2.boot_probe_command = "test -e /var/run/ready"
    probe(wkr2)
    assert vm2.commands[0] == "test -e /var/run/ready" and wkr2.state is State.IDLE


def test_log_records_carry_instance_and_container(caplog):
    pool, wkr, vm = make(State.IDLE, listed=(U1,))
    with caplog.at_level("INFO", logger="crunchgate.cloud.worker"):
        probe(wkr)
    (rec,) = [r for r in caplog.records if r.getMessage() == "crunch-run process detected"]
    assert rec.instance == "inst1" and rec.container_uuid == U1
