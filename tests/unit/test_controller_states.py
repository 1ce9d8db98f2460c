"""The container state machine, update whitelist, lock/unlock and priority rules (pure)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatcher.arvados.controller import states
from dispatcher.arvados.controller.errors import Forbidden, Unprocessable
from dispatcher.arvados.controller.states import (
    CANCELLED,
    COMPLETE,
    CONTAINER_STATES,
    LOCKED,
    QUEUED,
    RUNNING,
    Caller,
    plan_container_update,
    plan_lock,
    plan_unlock,
)

NOW = "2026-11-22T08:00:00.000000Z"
ROOT = Caller("zzzzz-gj3su-000000000000000", "zzzzz-tpzed-000000000000000", True)
OTHER_ADMIN = Caller("zzzzz-gj3su-otheradmin00000", "zzzzz-tpzed-otheradmin00000", True)
USER = Caller("zzzzz-gj3su-user00000000000", "zzzzz-tpzed-user00000000000", False)

ALLOWED = {
    (QUEUED, LOCKED), (QUEUED, CANCELLED),
    (LOCKED, QUEUED), (LOCKED, RUNNING), (LOCKED, CANCELLED),
    (RUNNING, COMPLETE), (RUNNING, CANCELLED),
    (COMPLETE, CANCELLED),
}


def ctr(state: str, **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "uuid": "zzzzz-dz642-000000000000001", "state": state, "priority": 5,
        "lock_count": 1 if state != QUEUED else 0,
        "locked_by_uuid": ROOT.token_uuid if state in (LOCKED, RUNNING) else None,
        "auth_uuid": "zzzzz-gj3su-runtime00000000" if state in (LOCKED, RUNNING) else None,
        "started_at": NOW if state in (RUNNING, COMPLETE, CANCELLED) else None,
        "interactive_session_started": False,
    }
    base.update(kw)
    return base


def plan(c: dict[str, Any], changes: dict[str, Any], caller: Caller = ROOT, max_attempts: int = 10) -> states.ContainerChange:
    return plan_container_update(c, changes, caller, max_dispatch_attempts=max_attempts, now=NOW)


@pytest.mark.parametrize(("old", "new"), list(itertools.product(CONTAINER_STATES, repeat=2)))
def test_transition_table(old: str, new: str) -> None:
    """Every pair of states: allowed exactly when listed in reference 1.2."""
    if old == new:
        assert plan(ctr(old), {"state": new}).new_state == new
    elif (old, new) in ALLOWED:
        result = plan(ctr(old), {"state": new})
        assert result.new_state == new
        assert result.values["state"] == new
    else:
        with pytest.raises(Unprocessable) as err:
            plan(ctr(old), {"state": new})
        assert err.value.message == f"state: cannot change from {old} to {new}"


def test_unknown_state_is_422() -> None:
    with pytest.raises(Unprocessable):
        plan(ctr(QUEUED), {"state": "Sleeping"})


def test_lock_side_effects() -> None:
    result = plan_lock(ctr(QUEUED, lock_count=3), ROOT, now=NOW)
    assert result.values["lock_count"] == 4
    assert result.values["locked_by_uuid"] == ROOT.token_uuid
    assert result.create_runtime_token and not result.expire_runtime_token


@pytest.mark.parametrize("state", [LOCKED, RUNNING, COMPLETE, CANCELLED])
def test_lock_needs_queued(state: str) -> None:
    with pytest.raises(Unprocessable) as err:
        plan_lock(ctr(state), ROOT, now=NOW)
    assert err.value.message == f"cannot lock when {state}"


def test_lock_needs_priority() -> None:
    with pytest.raises(Unprocessable) as err:
        plan_lock(ctr(QUEUED, priority=0), ROOT, now=NOW)
    assert err.value.message == "cannot lock when priority<=0"
    # The same rule through a plain update.
    with pytest.raises(Unprocessable):
        plan(ctr(QUEUED, priority=0), {"state": LOCKED})


def test_lock_and_unlock_need_admin() -> None:
    with pytest.raises(Forbidden):
        plan_lock(ctr(QUEUED), USER, now=NOW)
    with pytest.raises(Forbidden):
        plan_unlock(ctr(LOCKED), USER, max_dispatch_attempts=10, now=NOW)


def test_unlock_rules() -> None:
    result = plan_unlock(ctr(LOCKED, runtime_status={"error": "x"}), ROOT,
                         max_dispatch_attempts=10, now=NOW)
    assert result.new_state == QUEUED
    assert result.values["runtime_status"] == {}
    assert result.values["locked_by_uuid"] is None and result.values["auth_uuid"] is None
    assert result.expire_runtime_token
    for state in (QUEUED, RUNNING, COMPLETE, CANCELLED):
        with pytest.raises(Unprocessable) as err:
            plan_unlock(ctr(state), ROOT, max_dispatch_attempts=10, now=NOW)
        assert err.value.message == f"cannot unlock when {state}"
    with pytest.raises(Forbidden) as ferr:
        plan_unlock(ctr(LOCKED), OTHER_ADMIN, max_dispatch_attempts=10, now=NOW)
    assert "locked by a different token" in ferr.value.message
    # An update to Queued is an unlock too.
    with pytest.raises(Forbidden):
        plan(ctr(LOCKED), {"state": QUEUED}, OTHER_ADMIN)


@given(lock_count=st.integers(1, 30), max_attempts=st.integers(1, 30))
def test_max_dispatch_attempts(lock_count: int, max_attempts: int) -> None:
    result = plan_unlock(ctr(LOCKED, lock_count=lock_count), ROOT,
                         max_dispatch_attempts=max_attempts, now=NOW)
    if lock_count >= max_attempts:
        assert result.new_state == CANCELLED and result.dispatch_attempts_exceeded
        assert result.values["runtime_status"] == {
            "error": "Failed to start container.  Cancelled after exceeding "
                     f"'Containers.MaxDispatchAttempts' (lock_count={lock_count})"
        }
        assert result.values["finished_at"] == NOW
        assert result.expire_runtime_token and result.became_final
    else:
        assert result.new_state == QUEUED and not result.dispatch_attempts_exceeded


WHITELIST_CASES = [
    # (old, new, field, value, allowed)
    (QUEUED, QUEUED, "priority", 9, True),
    (QUEUED, QUEUED, "runtime_status", {"error": "x"}, False),
    (QUEUED, QUEUED, "gateway_address", "1.2.3.4:5", False),
    (QUEUED, LOCKED, "runtime_status", {"warning": "x"}, True),
    (LOCKED, LOCKED, "runtime_status", {"error": "no"}, True),
    (LOCKED, LOCKED, "log", "abc+1", True),
    (LOCKED, LOCKED, "exit_code", 0, False),
    (LOCKED, LOCKED, "gateway_address", "1.2.3.4:5", False),
    (LOCKED, QUEUED, "runtime_status", {"error": "x"}, False),
    (LOCKED, RUNNING, "gateway_address", "tunnel https://x", True),
    (LOCKED, RUNNING, "started_at", NOW, True),
    (RUNNING, RUNNING, "started_at", "2026-01-01T00:00:00.000000Z", False),
    (RUNNING, RUNNING, "progress", 0.5, True),
    (RUNNING, RUNNING, "interactive_session_started", True, True),
    (RUNNING, RUNNING, "finished_at", NOW, False),
    (RUNNING, RUNNING, "command", ["x"], False),
    (RUNNING, RUNNING, "lock_count", 3, False),
    (RUNNING, COMPLETE, "exit_code", 0, True),
    (RUNNING, COMPLETE, "output", "abc+1", True),
    (RUNNING, COMPLETE, "priority", 0, False),
    (RUNNING, CANCELLED, "finished_at", NOW, True),
    (QUEUED, CANCELLED, "runtime_status", {"error": "unsatisfiable"}, True),
    (QUEUED, CANCELLED, "exit_code", 1, False),
    (LOCKED, CANCELLED, "cost", 1.5, True),
    (LOCKED, CANCELLED, "output", "abc+1", False),
    (COMPLETE, CANCELLED, "exit_code", 3, False),
    (COMPLETE, COMPLETE, "priority", 3, False),
]


@pytest.mark.parametrize(("old", "new", "field", "value", "allowed"), WHITELIST_CASES)
def test_update_whitelist(old: str, new: str, field: str, value: Any, allowed: bool) -> None:
    changes = {"state": new, field: value}
    if allowed:
        assert plan(ctr(old), changes).values[field] == value
    else:
        with pytest.raises(Unprocessable) as err:
            plan(ctr(old), changes)
        assert err.value.message.startswith(f"{field} cannot be modified in state '{old}'")


def test_unchanged_values_are_ignored() -> None:
    # Clients send back what they read: an unchanged command is not a modification.
    c = ctr(RUNNING, command=["echo"])
    assert "command" not in plan(c, {"command": ["echo"], "progress": 0.1}).values


def test_progress_belongs_to_lock_holder() -> None:
    with pytest.raises(Forbidden) as err:
        plan(ctr(RUNNING), {"progress": 0.5}, OTHER_ADMIN)
    assert "locked by a different token" in err.value.message
    # ... but another admin may still cancel and change priority.
    assert plan(ctr(RUNNING), {"state": CANCELLED}, OTHER_ADMIN).new_state == CANCELLED
    assert plan(ctr(LOCKED), {"priority": 0}, OTHER_ADMIN).values["priority"] == 0


def test_container_token_rules() -> None:
    own = Caller("zzzzz-gj3su-runtime00000000", "zzzzz-tpzed-user00000000000", False,
                 container_uuid="zzzzz-dz642-000000000000001")
    assert plan(ctr(RUNNING), {"progress": 0.3}, own).values["progress"] == 0.3
    assert plan(ctr(RUNNING), {"state": COMPLETE, "finished_at": NOW, "exit_code": 0},
                own).new_state == COMPLETE
    with pytest.raises(Forbidden):
        plan(ctr(RUNNING), {"log": "abc+1"}, own)
    with pytest.raises(Forbidden):
        plan(ctr(LOCKED), {"state": RUNNING}, own)
    with pytest.raises(Forbidden):
        plan(ctr(RUNNING), {"progress": 0.3}, USER)


def test_state_side_effects() -> None:
    running = plan(ctr(LOCKED, started_at=None), {"state": RUNNING})
    assert running.values["started_at"] == NOW
    done = plan(ctr(RUNNING), {"state": COMPLETE, "exit_code": 0})
    assert done.values["finished_at"] == NOW and done.became_final
    assert done.values["locked_by_uuid"] is None and done.values["auth_uuid"] is None
    assert done.expire_runtime_token


def test_interactive_session_started_only_false_to_true() -> None:
    with pytest.raises(Unprocessable):
        plan(ctr(RUNNING, interactive_session_started=True),
             {"interactive_session_started": False})
    with pytest.raises(Unprocessable):
        plan(ctr(RUNNING), {"interactive_session_started": "yes"})


def test_runtime_status_well_known_keys_are_strings() -> None:
    with pytest.raises(Unprocessable):
        plan(ctr(LOCKED), {"runtime_status": {"error": 3}})
    assert plan(ctr(LOCKED), {"runtime_status": {"error": "x", "custom": 3}})


def test_priority_formula() -> None:
    created_ms = 1_700_000_000_000
    assert states.request_priority(1, created_ms) == 2**50 - created_ms
    assert states.request_priority(500, created_ms) == 500 * 2**50 - created_ms
    assert states.request_priority(0, created_ms) == 0
    # Higher request priority wins; at equal priority the older request wins.
    assert states.request_priority(2, created_ms) > states.request_priority(1, created_ms - 10**9)
    assert states.request_priority(1, created_ms) > states.request_priority(1, created_ms + 1)
    assert states.container_priority([]) == 0
    assert states.container_priority([0, 5, 3]) == 5


def test_runtime_constraints_defaults() -> None:
    gib = 1 << 30
    rc = states.default_runtime_constraints({"vcpus": 1, "ram": 1 << 20}, 0)
    assert rc["keep_cache_disk"] == 2 * gib  # clamped up
    assert states.default_runtime_constraints({"ram": 100 * gib}, 0)["keep_cache_disk"] == 32 * gib
    assert states.default_runtime_constraints({"ram": 8 * gib}, 0)["keep_cache_disk"] == 8 * gib
    rc = states.default_runtime_constraints({"ram": 8 * gib}, 256 << 20)
    assert rc["keep_cache_ram"] == 256 << 20 and rc["keep_cache_disk"] == 0
    rc = states.default_runtime_constraints(
        {"ram": 1, "cuda": {"device_count": 2, "driver_version": "11.0",
                            "hardware_capability": "7.5"}}, 0)
    assert rc["gpu"] == {"device_count": 2, "driver_version": "11.0", "hardware_target": ["7.5"],
                         "stack": "cuda", "vram": 0}
    assert "cuda" not in rc
    # Applying the defaults twice changes nothing (container reuse compares the result).
    assert states.default_runtime_constraints(rc, 0) == rc


def test_merge_scheduling_parameters() -> None:
    merged = states.merge_scheduling_parameters([
        {"partitions": ["a"], "preemptible": True, "max_run_time": 10},
        {"partitions": ["b", "a"], "preemptible": False, "supervisor": True, "max_run_time": 20},
    ])
    assert merged == {"partitions": ["a", "b"], "preemptible": False, "supervisor": True,
                      "max_run_time": 20}
    assert "partitions" not in states.merge_scheduling_parameters([{"partitions": ["a"]}, {}])
    assert states.merge_scheduling_parameters(
        [{"max_run_time": 10}, {"max_run_time": 0}])["max_run_time"] == 0


def test_request_transitions() -> None:
    states.check_request_transition("Uncommitted", "Committed")
    states.check_request_transition("Committed", "Final")
    for old, new in (("Committed", "Uncommitted"), ("Final", "Committed"), ("Final", "Uncommitted")):
        with pytest.raises(Unprocessable):
            states.check_request_transition(old, new)
