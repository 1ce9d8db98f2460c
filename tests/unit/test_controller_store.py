"""Store behaviour: requests → containers, reuse, priority, retries, tokens, visibility."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dispatcher.arvados.controller.errors import Forbidden, NotFound, Unauthorized, Unprocessable
from dispatcher.arvados.controller.filters import parse_list_params
from dispatcher.arvados.controller.models import CONTAINER, CONTAINER_REQUEST, LOG
from dispatcher.arvados.controller.states import PRIORITY_STEP, Caller
from dispatcher.arvados.controller.store import Policy, Store

ROOT_TOKEN = "root-token-for-store-tests-0123456789"


class Clock:
    def __init__(self) -> None:
        self.t = 1_790_000_000.0

    def __call__(self) -> float:
        self.t += 0.001
        return self.t


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "db.sqlite3",
              Policy(system_root_token=ROOT_TOKEN, max_dispatch_attempts=3, max_retry_attempts=2),
              clock=Clock())
    yield s
    s.close()


def user(store: Store, name: str, admin: bool = False) -> Caller:
    _, token = store.create_user(name, is_admin=admin)
    return store.authenticate(token)


def cr_attrs(**kw: Any) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "command": ["echo", "hi"], "container_image": "img", "output_path": "/out", "cwd": "/",
        "runtime_constraints": {"vcpus": 1, "ram": 1 << 20}, "state": "Committed", "priority": 1,
    }
    attrs.update(kw)
    return attrs


def test_committed_request_creates_queued_container(store: Store) -> None:
    alice = user(store, "alice")
    cr = store.create_request(alice, cr_attrs())
    assert cr["container_count"] == 1 and cr["container_count_max"] == 2
    ctr = store.get(CONTAINER, alice, cr["container_uuid"])
    assert ctr["state"] == "Queued"
    created_ms = _ms(cr["created_at"])
    assert ctr["priority"] == PRIORITY_STEP - created_ms
    assert ctr["runtime_user_uuid"] == alice.user_uuid
    assert ctr["runtime_constraints"]["keep_cache_disk"] == 2 << 30


def _ms(ts: str) -> int:
    from datetime import UTC, datetime, timedelta

    dt = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    return (dt - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)


def test_uncommitted_and_zero_priority_requests_have_no_container(store: Store) -> None:
    alice = user(store, "alice")
    assert store.create_request(alice, cr_attrs(state="Uncommitted"))["container_uuid"] is None
    zero = store.create_request(alice, cr_attrs(priority=0))
    assert zero["container_uuid"] is None
    later = store.update_request(alice, zero["uuid"], {"priority": 3})
    assert later["container_uuid"] and later["container_count"] == 1


def test_commit_validation(store: Store) -> None:
    alice = user(store, "alice")
    with pytest.raises(Unprocessable, match="container_image"):
        store.create_request(alice, cr_attrs(container_image=""))
    with pytest.raises(Unprocessable, match="vcpus"):
        store.create_request(alice, cr_attrs(runtime_constraints={"ram": 1}))
    with pytest.raises(Unprocessable, match="unknown keys"):
        store.create_request(alice, cr_attrs(scheduling_parameters={"colour": "red"}))
    with pytest.raises(Unprocessable, match="cannot set"):
        store.create_request(alice, cr_attrs(container_uuid="zzzzz-dz642-000000000000000"))
    committed = store.create_request(alice, cr_attrs())
    with pytest.raises(Unprocessable, match="command cannot be modified in state 'Committed'"):
        store.update_request(alice, committed["uuid"], {"command": ["other"]})


def test_reuse_and_priority_is_max(store: Store) -> None:
    alice, bob = user(store, "alice"), user(store, "bob")
    a = store.create_request(alice, cr_attrs(priority=1))
    b = store.create_request(bob, cr_attrs(priority=2))
    assert a["container_uuid"] == b["container_uuid"]
    ctr = store.get(CONTAINER, store.system_caller, a["container_uuid"])
    assert ctr["priority"] == 2 * PRIORITY_STEP - _ms(b["created_at"])
    store.update_request(bob, b["uuid"], {"priority": 0})
    ctr = store.get(CONTAINER, store.system_caller, a["container_uuid"])
    assert ctr["priority"] == PRIORITY_STEP - _ms(a["created_at"])
    no_reuse = store.create_request(alice, cr_attrs(use_existing=False))
    assert no_reuse["container_uuid"] != a["container_uuid"]
    different = store.create_request(alice, cr_attrs(command=["echo", "other"]))
    assert different["container_uuid"] != a["container_uuid"]


def test_lock_unlock_tokens_and_max_dispatch_attempts(store: Store) -> None:
    alice = user(store, "alice")
    root = store.authenticate(ROOT_TOKEN)
    cr = store.create_request(alice, cr_attrs())
    uuid = cr["container_uuid"]
    for attempt in (1, 2, 3):
        locked = store.lock_container(root, uuid)
        assert locked["state"] == "Locked" and locked["locked_by_uuid"] == root.token_uuid
        auth = store.container_auth(root, uuid)
        runtime_token = f"v2/{auth['uuid']}/{auth['api_token']}"
        assert store.authenticate(runtime_token).container_uuid == uuid
        ctr = store.get(CONTAINER, root, uuid)
        assert ctr["lock_count"] == attempt
        unlocked = store.unlock_container(root, uuid)
        with pytest.raises(Unauthorized):
            store.authenticate(runtime_token)  # expired by the unlock
        if attempt < 3:
            assert unlocked["state"] == "Queued"
    assert unlocked["state"] == "Cancelled"
    ctr = store.get(CONTAINER, root, uuid)
    assert ctr["runtime_status"]["error"] == (
        "Failed to start container.  Cancelled after exceeding "
        "'Containers.MaxDispatchAttempts' (lock_count=3)"
    )
    # The request was retryable (count 1 < max 2): it now points at a fresh Queued container.
    cr = store.get(CONTAINER_REQUEST, alice, cr["uuid"])
    assert cr["state"] == "Committed" and cr["container_count"] == 2
    assert cr["container_uuid"] != uuid
    retry = store.get(CONTAINER, root, cr["container_uuid"])
    assert retry["state"] == "Queued" and retry["priority"] > 0 and retry["lock_count"] == 0


def test_retries_stop_at_container_count_max(store: Store) -> None:
    alice = user(store, "alice")
    root = store.system_caller
    cr = store.create_request(alice, cr_attrs(container_count_max=2,
                                              scheduling_parameters={"partitions": ["p1"]}))
    first = cr["container_uuid"]
    store.update_container(root, first, {"state": "Cancelled"})
    cr = store.get(CONTAINER_REQUEST, alice, cr["uuid"])
    second = cr["container_uuid"]
    assert second != first and cr["state"] == "Committed"
    assert store.get(CONTAINER, root, second)["scheduling_parameters"] == {"partitions": ["p1"]}
    store.update_container(root, second, {"state": "Cancelled"})
    cr = store.get(CONTAINER_REQUEST, alice, cr["uuid"])
    assert cr["state"] == "Final" and cr["container_uuid"] == second


def test_complete_finalizes_requests(store: Store) -> None:
    alice = user(store, "alice")
    root = store.system_caller
    cr = store.create_request(alice, cr_attrs())
    uuid = cr["container_uuid"]
    store.lock_container(root, uuid)
    store.update_container(root, uuid, {"state": "Running"})
    done = store.update_container(root, uuid, {"state": "Complete", "exit_code": 3})
    assert done["finished_at"] and done["auth_uuid"] is None and done["locked_by_uuid"] is None
    cr = store.get(CONTAINER_REQUEST, alice, cr["uuid"])
    assert cr["state"] == "Final"
    assert store.get(CONTAINER, alice, cr["container_uuid"])["exit_code"] == 3


def test_request_priority_zero_cancels_queued_container(store: Store) -> None:
    alice = user(store, "alice")
    cr = store.create_request(alice, cr_attrs())
    store.update_request(alice, cr["uuid"], {"priority": 0})
    assert store.get(CONTAINER, alice, cr["container_uuid"])["state"] == "Cancelled"
    assert store.get(CONTAINER_REQUEST, alice, cr["uuid"])["state"] == "Final"


def test_request_priority_zero_on_running_container_signals_cancel(store: Store) -> None:
    alice = user(store, "alice")
    root = store.system_caller
    cr = store.create_request(alice, cr_attrs())
    uuid = cr["container_uuid"]
    store.lock_container(root, uuid)
    store.update_container(root, uuid, {"state": "Running"})
    store.update_request(alice, cr["uuid"], {"priority": 0})
    ctr = store.get(CONTAINER, root, uuid)
    assert ctr["state"] == "Running" and ctr["priority"] == 0  # the dispatcher's cue
    store.update_container(root, uuid, {"state": "Cancelled"})
    assert store.get(CONTAINER_REQUEST, alice, cr["uuid"])["state"] == "Final"


def test_child_requests_inherit_and_lose_priority(store: Store) -> None:
    alice = user(store, "alice")
    root = store.system_caller
    parent_cr = store.create_request(alice, cr_attrs(command=["parent"]))
    parent = parent_cr["container_uuid"]
    store.lock_container(root, parent)
    store.update_container(root, parent, {"state": "Running"})
    auth = store.container_auth(root, parent)
    parent_token = store.authenticate(f"v2/{auth['uuid']}/{auth['api_token']}")
    child_cr = store.create_request(parent_token, cr_attrs(command=["child"], priority=1))
    assert child_cr["requesting_container_uuid"] == parent
    child = store.get(CONTAINER, root, child_cr["container_uuid"])
    assert child["priority"] == store.get(CONTAINER, root, parent)["priority"]
    store.update_container(root, parent, {"state": "Cancelled"})
    assert store.get(CONTAINER_REQUEST, root, child_cr["uuid"])["priority"] == 0
    assert store.get(CONTAINER, root, child["uuid"])["state"] == "Cancelled"


def test_visibility(store: Store) -> None:
    alice, bob = user(store, "alice"), user(store, "bob")
    cr = store.create_request(alice, cr_attrs(command=["mine"]))
    with pytest.raises(NotFound):
        store.get(CONTAINER_REQUEST, bob, cr["uuid"])
    with pytest.raises(NotFound):
        store.get(CONTAINER, bob, cr["container_uuid"])
    q = parse_list_params({}, CONTAINER, max_items=100, default_order="uuid")
    assert store.list_page(CONTAINER, bob, q).items_available == 0
    assert store.list_page(CONTAINER, alice, q).items_available == 1
    store.create_log(store.system_caller, {"object_uuid": cr["container_uuid"],
                                           "event_type": "stdout", "properties": {"text": "x"}})
    lq = parse_list_params({}, LOG, max_items=100, default_order="id")
    assert store.list_page(LOG, alice, lq).items_available == 1
    assert store.list_page(LOG, bob, lq).items_available == 0
    with pytest.raises(Forbidden):
        store.create_container(alice, {"command": ["x"]})
    with pytest.raises(Forbidden):
        store.update_container(alice, cr["container_uuid"], {"priority": 1})
    with pytest.raises(Forbidden):
        store.container_auth(alice, cr["container_uuid"])


def test_container_auth_only_for_root_or_lock_holder(store: Store) -> None:
    other_admin = user(store, "ops", admin=True)
    root = store.system_caller
    ctr = store.create_container(root, {"command": ["x"], "priority": 1})
    store.lock_container(other_admin, ctr["uuid"])
    assert store.container_auth(other_admin, ctr["uuid"])["api_token"]
    assert store.container_auth(root, ctr["uuid"])["api_token"]
    third = user(store, "ops2", admin=True)
    with pytest.raises(Forbidden):
        store.container_auth(third, ctr["uuid"])


def test_tokens(store: Store) -> None:
    _, token = store.create_user("carol")
    caller = store.authenticate(token)
    secret = token.rsplit("/", 1)[1]
    assert store.authenticate(secret) == caller  # bare secret works too
    with pytest.raises(Unauthorized):
        store.authenticate(token[:-1] + ("x" if token[-1] != "x" else "y"))
    with pytest.raises(Unauthorized):
        store.authenticate("v2/zzzzz-gj3su-000000000000000/nope")
    assert store.authenticate(ROOT_TOKEN).is_admin
    assert store.authenticate(f"v2/zzzzz-gj3su-000000000000000/{ROOT_TOKEN}").is_admin
    with pytest.raises(Unprocessable):
        store.create_user("carol")


def test_listener_sees_gateway_address(store: Store) -> None:
    seen: list[tuple[Any, Any]] = []
    store.add_container_listener(lambda old, new: seen.append((old, new)))
    root = store.system_caller
    ctr = store.create_container(root, {"command": ["x"], "priority": 1})
    store.lock_container(root, ctr["uuid"])
    store.update_container(root, ctr["uuid"], {"state": "Running",
                                               "gateway_address": "tunnel https://c1"})
    assert seen[0][0] is None
    assert seen[-1][1]["gateway_address"] == "tunnel https://c1"
    assert seen[-1][0]["state"] == "Locked"
    # A rejected update notifies nobody.
    n = len(seen)
    with pytest.raises(Unprocessable):
        store.update_container(root, ctr["uuid"], {"state": "Queued"})
    assert len(seen) == n


def test_data_survives_reopen(tmp_path: Path) -> None:
    policy = Policy(system_root_token=ROOT_TOKEN)
    s = Store(tmp_path / "db", policy)
    assert ((tmp_path / "db").stat().st_mode & 0o777) == 0o600  # it holds tokens
    ctr = s.create_container(s.system_caller, {"command": ["x"], "priority": 1})
    _, token = s.create_user("dave")
    s.close()
    s = Store(tmp_path / "db", policy)
    try:
        assert s.get(CONTAINER, s.system_caller, ctr["uuid"])["command"] == ["x"]
        assert s.authenticate(token).user_uuid.startswith("zzzzz-tpzed-")
    finally:
        s.close()


def test_sweep_logs(tmp_path: Path) -> None:
    clock = Clock()
    s = Store(tmp_path / "db", Policy(system_root_token=ROOT_TOKEN), clock=clock)
    try:
        root = s.system_caller
        old = s.create_log(root, {"object_uuid": "zzzzz-dz642-000000000000001",
                                  "event_type": "stdout", "properties": {"text": "old"}})
        kept = s.create_log(root, {"object_uuid": "zzzzz-dz642-000000000000001",
                                   "event_type": "audit", "properties": {}})
        clock.t += 3600
        new = s.create_log(root, {"object_uuid": "zzzzz-dz642-000000000000001",
                                  "event_type": "stderr", "properties": {"text": "new"}})
        assert s.sweep_logs(1800) == 1
        for doc, present in ((old, False), (kept, True), (new, True)):
            if present:
                assert s.get(LOG, root, doc["uuid"])["uuid"] == doc["uuid"]
            else:
                with pytest.raises(NotFound):
                    s.get(LOG, root, doc["uuid"])
    finally:
        s.close()


def test_small_operations_run_inline_and_wait_on_the_thread_when_locked(store: Store,
                                                                       tmp_path: Path) -> None:
    """run_small() runs a quick operation on the event loop while the database thread is idle;
    if another process holds the write lock it neither fails nor holds the loop: it waits
    on the database thread (busy_timeout) and lands once the lock is released."""
    import asyncio
    import sqlite3
    import threading

    alice = user(store, "alice")
    root = store.authenticate(ROOT_TOKEN)
    first = store.create_request(alice, cr_attrs())["container_uuid"]
    second = store.create_request(alice, cr_attrs(command=["echo", "2"]))["container_uuid"]
    threads: list[str] = []
    real_lock = store.lock_container

    def spying_lock(caller: Caller, uuid: str) -> dict[str, Any]:
        threads.append(threading.current_thread().name)
        return real_lock(caller, uuid)

    async def main() -> tuple[list[str], dict[str, Any], int]:
        loop_thread = threading.current_thread().name
        locked = await store.run_small(spying_lock, root, first)
        assert locked["state"] == "Locked"
        assert threads == [loop_thread]  # inline: no hop
        other = sqlite3.connect(tmp_path / "db.sqlite3", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process's write lock
        task = asyncio.ensure_future(store.run_small(spying_lock, root, second))
        ticks = 0
        for _ in range(20):  # the loop keeps turning while the lock is held
            await asyncio.sleep(0.01)
            ticks += 1
        assert not task.done()
        other.execute("ROLLBACK")
        other.close()
        doc = await asyncio.wait_for(task, 10)
        return threads, doc, ticks

    threads_seen, doc, ticks = asyncio.run(main())
    assert doc["state"] == "Locked" and ticks == 20
    # Tried inline (refused at once), then done on the database thread.
    assert threads_seen[1] == threads_seen[0]
    assert threads_seen[2].startswith("controller-db")
    assert store.get(CONTAINER, root, second)["lock_count"] == 1  # once, not twice


def test_small_operations_queue_behind_the_database_thread(store: Store) -> None:
    """While an operation runs on the database thread, a small one does not run inline beside
    it (one operation at a time): it queues on the thread."""
    import asyncio
    import threading

    root = store.authenticate(ROOT_TOKEN)
    gate = threading.Event()
    order: list[str] = []

    def slow() -> None:
        gate.wait(10)
        order.append("slow")

    def quick() -> str:
        order.append("quick")
        return threading.current_thread().name

    async def main() -> str:
        slow_task = asyncio.ensure_future(store.run(slow))
        await asyncio.sleep(0.05)
        quick_task = asyncio.ensure_future(store.run_small(quick))
        await asyncio.sleep(0.05)
        assert order == []  # quick did not run beside slow
        gate.set()
        await slow_task
        return await quick_task

    assert asyncio.run(main()).startswith("controller-db")
    assert order == ["slow", "quick"]
    assert store.authenticate(ROOT_TOKEN) == root


def test_inline_writes_are_checkpointed_on_the_thread(store: Store, tmp_path: Path) -> None:
    import asyncio

    root = store.authenticate(ROOT_TOKEN)
    alice = user(store, "alice")
    store.CHECKPOINT_EVERY = 8
    uuids = [store.create_request(alice, cr_attrs(command=["echo", str(i)]))["container_uuid"]
             for i in range(8)]
    wal = tmp_path / "db.sqlite3-wal"

    async def main() -> None:
        await store.run(store._checkpoint)
        for u in uuids:
            await store.run_small(store.lock_container, root, u)
        for _ in range(100):  # the checkpoint task runs on the thread, in the background
            await asyncio.sleep(0.01)
            if not store._background:
                break

    asyncio.run(main())
    # A PASSIVE checkpoint copied the WAL's frames into the database: reopening it without
    # the WAL shows the locks.
    import shutil
    import sqlite3
    copy = tmp_path / "copy.sqlite3"
    shutil.copy(tmp_path / "db.sqlite3", copy)
    assert wal.exists()
    n = sqlite3.connect(copy).execute(
        "SELECT count(*) FROM containers WHERE state = 'Locked'").fetchone()[0]
    assert n == 8
