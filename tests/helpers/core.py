"""Fakes for testing the dispatch loop and backends without a controller or a scheduler.

* :class:`FakeArvados` — an in-memory controller with the container rules the loop relies on
  (lock/unlock preconditions, ``locked_by_uuid``, ``lock_count`` and the MaxDispatchAttempts
  cancel on unlock, the update state machine, list filters/paging) and failure injection.
* :class:`FakeBackend` — a scheduler queue in a dict, with failure injection.
* :func:`core_run` — run a coroutine to completion (no pytest-asyncio in this project).

Other backends' tests can reuse them: ``from tests.helpers.core import FakeArvados``.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
from collections.abc import Coroutine, Mapping
from typing import Any

import pytest

from dispatcher.config import ClusterConfig
from dispatcher.core.backend import Backend, CancelFailed, Job, QueryFailed

MY_TOKEN_UUID = "zzzzz-gj3su-000000000000000"
OTHER_TOKEN_UUID = "zzzzz-gj3su-otherdispatch00"

TRANSITIONS = {
    "Queued": {"Locked", "Cancelled"},
    "Locked": {"Queued", "Running", "Cancelled"},
    "Running": {"Complete", "Cancelled"},
    "Complete": {"Cancelled"},
    "Cancelled": set(),
}


def core_run(coro: Coroutine[Any, Any, Any], timeout_s: float = 30.0) -> Any:
    """``asyncio.run`` with a deadline, so a hung test fails instead of hanging."""
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


class FakeApiError(Exception):
    """Same shape as the client's ApiError: ``status`` and a message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


def _match(rec: Mapping[str, Any], flt: list[Any]) -> bool:
    attr, op, operand = flt
    value = rec.get(attr)
    if attr == "priority" and isinstance(operand, str):
        operand = int(operand)
    if op == "=":
        return value == operand
    if op == "!=":
        return value != operand
    if op == ">":
        return value is not None and value > operand
    if op == "<":
        return value is not None and value < operand
    if op == "in":
        return value in operand
    raise ValueError(f"FakeArvados: unsupported filter operator {op!r}")


class FakeArvados:
    """An in-memory Arvados controller for the dispatch loop's API calls."""

    def __init__(self, token_uuid: str = MY_TOKEN_UUID, max_dispatch_attempts: int = 10,
                 cluster_id: str = "zzzzz") -> None:
        self.token_uuid = token_uuid
        self.max_dispatch_attempts = max_dispatch_attempts
        self.cluster_id = cluster_id
        self.containers: dict[str, dict[str, Any]] = {}
        self.logs: list[dict[str, Any]] = []
        self.calls: list[tuple[str, str]] = []  # (operation, uuid or resource)
        self._failures: dict[str, list[BaseException]] = {}
        self._seq = itertools.count(1)

    # --- test setup ---------------------------------------------------------------------------

    def add_container(self, state: str = "Queued", priority: int = 1, *, uuid: str | None = None,
                      locked_by: str | None = None, **fields: Any) -> str:
        uuid = uuid or f"{self.cluster_id}-dz642-{next(self._seq):015d}"
        rec = {
            "uuid": uuid, "state": state, "priority": priority,
            "locked_by_uuid": locked_by if locked_by is not None
            else (self.token_uuid if state in ("Locked", "Running") else None),
            "lock_count": 1 if state in ("Locked", "Running") else 0,
            "created_at": "2026-11-22T08:00:00.000000000Z",
            "runtime_constraints": {"vcpus": 1, "ram": 1 << 28},
            "scheduling_parameters": {}, "mounts": {}, "container_image": "",
            "runtime_status": {}, "exit_code": None,
        }
        rec.update(fields)
        self.containers[uuid] = rec
        return uuid

    def fail(self, op: str, exc: BaseException | None = None, times: int = 1) -> None:
        """Make the next ``times`` calls of ``op`` (list, get, update, lock, unlock,
        create_log, current_token) raise ``exc`` (default: a 503)."""
        exc = exc or FakeApiError(503, f"injected {op} failure")
        self._failures.setdefault(op, []).extend([exc] * times)

    def _maybe_fail(self, op: str) -> None:
        pending = self._failures.get(op)
        if pending:
            raise pending.pop(0)

    def ops(self, op: str) -> list[str]:
        return [u for o, u in self.calls if o == op]

    # --- the API surface used by the loop -----------------------------------------------------

    async def current_token(self) -> dict[str, Any]:
        self._maybe_fail("current_token")
        return {"uuid": self.token_uuid}

    async def list(self, resource: str, *, filters: Any = None, order: Any = None,
                   select: Any = None, limit: int | None = None, offset: int | None = None,
                   count: str | None = None) -> dict[str, Any]:
        assert resource == "containers"
        self.calls.append(("list", repr(filters)))
        self._maybe_fail("list")
        rows = [r for r in self.containers.values()
                if all(_match(r, f) for f in (filters or []))]
        if order == ["priority desc"]:
            rows.sort(key=lambda r: -int(r["priority"]))
        off = offset or 0
        lim = 1000 if limit is None else limit
        items = [copy.deepcopy(r) for r in rows[off:off + lim]]
        out: dict[str, Any] = {"kind": "arvados#containerList", "items": items,
                               "offset": off, "limit": lim}
        if count != "none":
            out["items_available"] = len(rows)
        return out

    async def get(self, resource: str, uuid: str, **_: Any) -> dict[str, Any]:
        self.calls.append(("get", uuid))
        self._maybe_fail("get")
        if uuid not in self.containers:
            raise FakeApiError(404, "Not Found")
        return copy.deepcopy(self.containers[uuid])

    async def update(self, resource: str, uuid: str, attrs: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("update", uuid))
        self._maybe_fail("update")
        rec = self.containers.get(uuid)
        if rec is None:
            raise FakeApiError(404, "Not Found")
        if rec["locked_by_uuid"] not in (None, self.token_uuid) and "state" not in attrs:
            raise FakeApiError(403, "locked by a different token")
        new_state = attrs.get("state", rec["state"])
        if new_state != rec["state"]:
            if new_state not in TRANSITIONS[rec["state"]]:
                raise FakeApiError(422, f"cannot change from {rec['state']} to {new_state}")
            self._enter(rec, new_state)
        for k, v in attrs.items():
            if k != "state":
                rec[k] = copy.deepcopy(v)
        return copy.deepcopy(rec)

    def _enter(self, rec: dict[str, Any], state: str) -> None:
        if state == "Queued":
            if rec["lock_count"] >= self.max_dispatch_attempts:
                state = "Cancelled"
                rec["runtime_status"] = {
                    "error": "Failed to start container.  Cancelled after exceeding "
                    f"'Containers.MaxDispatchAttempts' (lock_count={rec['lock_count']})"}
            else:
                rec["runtime_status"] = {}
            rec["locked_by_uuid"] = None
        if state in ("Complete", "Cancelled"):
            rec["locked_by_uuid"] = None
        rec["state"] = state

    async def lock(self, uuid: str) -> dict[str, Any]:
        self.calls.append(("lock", uuid))
        self._maybe_fail("lock")
        rec = self.containers[uuid]
        if rec["state"] != "Queued":
            raise FakeApiError(422, f"cannot lock when {rec['state']}")
        if rec["priority"] <= 0:
            raise FakeApiError(422, "cannot lock when priority<=0")
        rec.update(state="Locked", locked_by_uuid=self.token_uuid,
                   lock_count=rec["lock_count"] + 1)
        return {k: rec[k] for k in ("uuid", "state", "priority", "locked_by_uuid")}

    async def unlock(self, uuid: str) -> dict[str, Any]:
        self.calls.append(("unlock", uuid))
        self._maybe_fail("unlock")
        rec = self.containers[uuid]
        if rec["state"] != "Locked":
            raise FakeApiError(422, f"cannot unlock when {rec['state']}")
        if rec["locked_by_uuid"] != self.token_uuid:
            raise FakeApiError(403, "locked by a different token")
        self._enter(rec, "Queued")
        return {k: rec[k] for k in ("uuid", "state", "priority", "locked_by_uuid")}

    async def create_log(self, object_uuid: str, event_type: str, text: str | None = None,
                         properties: dict[str, Any] | None = None) -> dict[str, Any]:
        self.calls.append(("create_log", object_uuid))
        self._maybe_fail("create_log")
        props = dict(properties or {})
        if text is not None:
            props["text"] = text
        entry = {"object_uuid": object_uuid, "event_type": event_type, "properties": props}
        self.logs.append(entry)
        return entry


class FakeBackend(Backend):
    """A scheduler queue in a dict. ``submit`` adds a pending job; ``cancel`` removes it unless
    ``cancel_keeps_job`` (a job that takes a while to stop)."""

    name = "fake"

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}
        self.submitted: list[str] = []
        self.cancelled: list[str] = []
        self.priorities: list[dict[str, int]] = []
        self.list_error: BaseException | None = None
        self.submit_errors: dict[str, BaseException] = {}
        self.cancel_error: BaseException | None = None
        self.cancel_keeps_job = False
        self.on_submit: Any = None  # callable(ctr) run after a successful submit
        # describe_vanished(): the text, or an exception to raise
        self.vanished: dict[str, str | BaseException] = {}

    async def describe_vanished(self, ctr_uuid: str) -> str:
        found = self.vanished.get(ctr_uuid, "")
        if isinstance(found, BaseException):
            raise found
        return found

    async def list_jobs(self) -> dict[str, Job]:
        if self.list_error is not None:
            raise QueryFailed(str(self.list_error))
        return dict(self.jobs)

    async def submit(self, ctr: Mapping[str, Any]) -> None:
        uuid = ctr["uuid"]
        err = self.submit_errors.get(uuid) or self.submit_errors.get("*")
        if err is not None:
            raise err
        self.submitted.append(uuid)
        self.jobs[uuid] = Job(name=uuid, job_id=str(len(self.submitted)), state="PENDING",
                              reason="Resources", pending=True)
        if self.on_submit is not None:
            self.on_submit(ctr)

    async def cancel(self, ctr_uuid: str, job: Job | None) -> None:
        if self.cancel_error is not None:
            raise CancelFailed(str(self.cancel_error))
        self.cancelled.append(ctr_uuid)
        if not self.cancel_keeps_job:
            self.jobs.pop(ctr_uuid, None)

    async def set_priorities(self, wanted: Mapping[str, int], jobs: Mapping[str, Job]) -> None:
        self.priorities.append(dict(wanted))

    def scheduling_status(self, job: Job) -> str:
        return f"waiting for {job.reason}" if job.reason else ""


def core_config(**containers: Any) -> ClusterConfig:
    """A config for loop tests: cluster zzzzz, fast polls, no retry throttle."""
    cfg = ClusterConfig(cluster_id="zzzzz", system_root_token="systemroottoken1234567890")
    cfg.containers.cloud_vms.poll_interval_s = 0.1
    for k, v in containers.items():
        setattr(cfg.containers, k, v)
    return cfg


@pytest.fixture
def core_fakes() -> tuple[FakeArvados, FakeBackend]:
    """A fresh fake controller and fake backend."""
    return FakeArvados(), FakeBackend()


