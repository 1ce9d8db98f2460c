"""Hypothesis drives the store through random request/dispatch sequences; invariants must hold.

Rejected operations (422/403) are fine — they must leave no trace, which the invariants check.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from dispatcher.arvados.controller import states
from dispatcher.arvados.controller.errors import ApiError
from dispatcher.arvados.controller.store import Policy, Store, _time_ms

ROOT = "statemachine-root-token-0123456789"
MAX_ATTEMPTS = 3


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.store = Store(Path(self.dir.name) / "db",
                           Policy(system_root_token=ROOT, max_dispatch_attempts=MAX_ATTEMPTS,
                                  max_retry_attempts=2))
        self.root = self.store.system_caller
        _, token = self.store.create_user("u")
        self.user = self.store.authenticate(token)
        self.requests: list[str] = []

    def teardown(self) -> None:
        self.store.close()
        self.dir.cleanup()

    # --- helpers ---------------------------------------------------------------------------

    def _rows(self, table: str) -> list[dict[str, Any]]:
        return [json.loads(d) for (d,) in self.store._conn.execute(f"SELECT doc FROM {table}")]

    def _containers(self) -> list[dict[str, Any]]:
        return self._rows("containers")

    def _pick(self, data: st.DataObject, state: str | None = None) -> dict[str, Any] | None:
        ctrs = [c for c in self._containers() if state is None or c["state"] == state]
        return data.draw(st.sampled_from(ctrs)) if ctrs else None

    def _try(self, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except ApiError as exc:
            assert exc.status in (403, 404, 422), exc

    # --- rules -----------------------------------------------------------------------------

    @rule(cmd=st.sampled_from(["a", "b"]), priority=st.integers(0, 2),
          count_max=st.integers(1, 3))
    def create_request(self, cmd: str, priority: int, count_max: int) -> None:
        cr = self.store.create_request(self.user, {
            "command": [cmd], "container_image": "img", "output_path": "/o", "cwd": "/",
            "runtime_constraints": {"vcpus": 1, "ram": 1}, "state": "Committed",
            "priority": priority, "container_count_max": count_max,
        })
        self.requests.append(cr["uuid"])

    @rule(data=st.data(), priority=st.integers(0, 3))
    def set_request_priority(self, data: st.DataObject, priority: int) -> None:
        if self.requests:
            uuid = data.draw(st.sampled_from(self.requests))
            self._try(self.store.update_request, self.user, uuid, {"priority": priority})

    @rule(data=st.data())
    def finalize_request(self, data: st.DataObject) -> None:
        if self.requests:
            uuid = data.draw(st.sampled_from(self.requests))
            self._try(self.store.update_request, self.user, uuid, {"state": "Final"})

    @rule(data=st.data())
    def lock(self, data: st.DataObject) -> None:
        c = self._pick(data)
        if c:
            self._try(self.store.lock_container, self.root, c["uuid"])

    @rule(data=st.data())
    def unlock(self, data: st.DataObject) -> None:
        c = self._pick(data)
        if c:
            self._try(self.store.unlock_container, self.root, c["uuid"])

    @rule(data=st.data(), new_state=st.sampled_from(states.CONTAINER_STATES))
    def update_state(self, data: st.DataObject, new_state: str) -> None:
        c = self._pick(data)
        if c:
            self._try(self.store.update_container, self.root, c["uuid"], {"state": new_state})

    # --- invariants ------------------------------------------------------------------------

    @invariant()
    def container_fields_follow_state(self) -> None:
        for c in self._containers():
            active = c["state"] in (states.LOCKED, states.RUNNING)
            assert (c["locked_by_uuid"] is not None) == active, c
            assert (c["auth_uuid"] is not None) == active, c
            assert c["lock_count"] <= MAX_ATTEMPTS, c
            assert (c["finished_at"] is not None) == (c["state"] in states.FINAL_STATES), c
            if c["state"] in (states.RUNNING, states.COMPLETE):
                assert c["started_at"] is not None, c

    @invariant()
    def runtime_tokens_valid_only_while_active(self) -> None:
        now = self.store._now()
        for uuid, cuuid, expires in self.store._conn.execute(
                "SELECT uuid, container_uuid, expires_at FROM api_client_authorizations "
                "WHERE container_uuid IS NOT NULL"):
            ctr = json.loads(self.store._conn.execute(
                "SELECT doc FROM containers WHERE uuid = ?", (cuuid,)).fetchone()[0])
            valid = expires is None or expires > now
            assert valid == (ctr["auth_uuid"] == uuid), (uuid, ctr)

    @invariant()
    def requests_agree_with_containers(self) -> None:
        ctrs = {c["uuid"]: c for c in self._containers()}
        for cr in self._rows("container_requests"):
            assert cr["container_count"] <= cr["container_count_max"], cr
            if cr["state"] == "Committed" and cr["container_uuid"]:
                assert ctrs[cr["container_uuid"]]["state"] not in states.FINAL_STATES, cr
        for c in ctrs.values():
            if c["state"] in states.FINAL_STATES:
                continue
            reqs = [r for r in self._rows("container_requests")
                    if r["container_uuid"] == c["uuid"]]
            if not reqs:
                continue
            want = states.container_priority(
                states.request_priority(r["priority"], _time_ms(r["created_at"]))
                for r in reqs if r["state"] == "Committed" and r["priority"] > 0
            )
            assert c["priority"] == want, (c, reqs)


StoreMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=25,
                                          deadline=None)
test_store_state_machine = StoreMachine.TestCase

