"""The cloud queue (reference 5.3, 2.4, 7.13) over an in-memory controller, and instance type
choice as the cloud dispatcher sees it (reference 1.8 / 7.14 through core sizing): cheapest
fitting type, MaximumPriceFactor alternatives, preemptible and GPU matching, scratch, the 5 %
RAM inflation."""

from __future__ import annotations

import asyncio

from dispatcher.cloud.clock import FakeClock
from dispatcher.cloud.queue import ContainerQueue
from dispatcher.config import GPUSpec, InstanceType
from tests.helpers.cloud import MemoryApi, container_uuid, stub_config

GiB = 1 << 30
MiB = 1 << 20
U = container_uuid


def t(name, vcpus, ram_gib, price, scratch_gib=100, preemptible=False, gpu=None):
    return InstanceType(name=name, provider_type=name, vcpus=vcpus, ram=ram_gib * GiB,
                        included_scratch=scratch_gib * GiB, price=price,
                        preemptible=preemptible, gpu=gpu or GPUSpec())


MENU = [t("small", 2, 4, 0.1), t("medium", 4, 8, 0.14), t("large", 8, 16, 0.2),
        t("xlarge", 16, 32, 0.4), t("small.spot", 2, 4, 0.03, preemptible=True),
        t("tiny-disk", 2, 4, 0.09, scratch_gib=1),
        t("gpu", 8, 32, 1.0, gpu=GPUSpec(stack="cuda", driver_version="12.0",
                                          hardware_target="8.0", device_count=1, vram=16 * GiB))]


def queue(api: MemoryApi, **kw) -> ContainerQueue:
    cfg = stub_config(MENU)
    cfg.containers.maximum_price_factor = 1.5
    return ContainerQueue(cfg, api, clock=FakeClock(), **kw)


def run(coro):
    return asyncio.run(coro)


def update(q: ContainerQueue) -> None:
    async def go():
        await q.update()
        for task in list(q._tasks):
            await task

    run(go())


def types_of(q: ContainerQueue, i: int) -> list[str]:
    return [it.name for it in q.entries()[0][U(i)].instance_types]


def test_instance_type_choice():
    api = MemoryApi()
    api.add(U(1), runtime_constraints={"vcpus": 1, "ram": 1 * GiB})
    # 3.9 GiB needs more than 4 GiB after the 5 % inflation: not "small".
    api.add(U(2), runtime_constraints={"vcpus": 1, "ram": int(3.9 * GiB)})
    api.add(U(3), runtime_constraints={"vcpus": 1, "ram": 1 * GiB},
            scheduling_parameters={"preemptible": True})
    api.add(U(4), runtime_constraints={"vcpus": 1, "ram": 1 * GiB,
                                       "gpu": {"stack": "cuda", "device_count": 1,
                                               "driver_version": "11.8",
                                               "hardware_target": ["7.5"], "vram": 8 * GiB}})
    api.add(U(5), runtime_constraints={"vcpus": 1, "ram": 1 * GiB},
            mounts={"/tmp": {"kind": "tmp", "capacity": 2 * GiB}})
    q = queue(api)
    update(q)
    # Cheapest first; alternatives within 1.5 x; never the spot or GPU types.
    assert types_of(q, 1) == ["tiny-disk", "small"]   # medium: 0.14 > 1.5 x 0.09
    assert types_of(q, 2) == ["medium", "large"]
    assert types_of(q, 3) == ["small.spot"]
    assert types_of(q, 4) == ["gpu"]
    assert types_of(q, 5) == ["small", "medium"]     # 2 GiB scratch: not tiny-disk
    need = q.entries()[0][U(2)].resources
    assert need.ram == int(3.9 * GiB) * 100 // 95


def test_unsatisfiable_container_is_cancelled_with_error():
    api = MemoryApi()
    api.add(U(1), runtime_constraints={"vcpus": 64, "ram": 1 * GiB})
    q = queue(api)
    update(q)
    assert U(1) not in q.entries()[0]
    c = api.containers[U(1)]
    assert c["state"] == "Cancelled"
    assert c["runtime_status"]["error"] == \
        "constraints not satisfiable by any configured instance type"
    # It was locked first (only the lock holder may set runtime_status.error).
    assert [tr[2] for tr in api.transitions] == ["Locked", "Cancelled"]


def test_corrupt_mounts_cancel_the_container():
    api = MemoryApi()
    api.add(U(1), mounts=["not", "an", "object"])
    q = queue(api)
    update(q)
    c = api.containers[U(1)]
    assert c["state"] == "Cancelled"
    assert c["runtime_status"]["error"].startswith("error getting mounts from container record")


def test_lock_unlock_cancel_update_the_cache_at_once():
    api = MemoryApi()
    api.add(U(1))
    q = queue(api)
    update(q)
    run(q.lock(U(1)))
    assert q.entries()[0][U(1)].container["state"] == "Locked"
    run(q.unlock(U(1)))
    assert q.entries()[0][U(1)].container["state"] == "Queued"
    run(q.cancel(U(1)))
    assert q.entries()[0][U(1)].container["state"] == "Cancelled"
    q.forget(U(1))
    assert U(1) not in q.entries()[0]


def test_finished_and_deleted_containers_leave_the_queue():
    api = MemoryApi()
    api.add(U(1))
    api.add(U(2))
    q = queue(api)
    update(q)
    api.containers[U(1)]["state"] = "Complete"
    del api.containers[U(2)]
    update(q)
    ents = q.entries()[0]
    assert ents[U(1)].container["state"] == "Complete"   # learned from the uuid-in query
    assert U(2) not in ents                               # deleted: dropped
    update(q)
    assert U(1) not in q.entries()[0]


def test_locked_by_me_paged_by_uuid_and_queued_target():
    api = MemoryApi()
    for i in range(1, 26):
        api.add(U(i), state="Locked", locked_by_uuid=MemoryApi.TOKEN_UUID)
    for i in range(100, 160):
        api.add(U(i), priority=i)
    q = queue(api, page_size=10, queued_target=30)
    update(q)
    ents = q.entries()[0]
    assert all(U(i) in ents for i in range(1, 26))
    queued = [u for u, e in ents.items() if e.container["state"] == "Queued"]
    # Pages of 10 until 30 non-supervisor containers: the 30 highest priorities.
    assert sorted(queued) == sorted(U(i) for i in range(130, 160))


def test_failed_poll_changes_nothing():
    api = MemoryApi()
    api.add(U(1))
    q = queue(api)
    update(q)
    before = q.threshold
    api.fail_next = [503]
    try:
        update(q)
    except Exception:
        pass
    assert U(1) in q.entries()[0] and q.threshold == before
    assert q.last_503 > 0


def test_local_change_during_a_poll_is_not_overwritten_by_it():
    """A lock answered while a poll is in flight wins over the poll's older data."""
    api = MemoryApi()
    api.add(U(1))
    q = queue(api)
    update(q)

    real_list = api.list
    raced = []

    async def list_then_lock(*args, **kwargs):
        page = await real_list(*args, **kwargs)
        if not raced and ["state", "=", "Queued"] in (kwargs.get("filters") or []):
            raced.append(1)
            # The poll has read "Queued"; now the scheduler locks it before the poll applies.
            await q.lock(U(1))
            page = {"items": [dict(i, state="Queued", locked_by_uuid=None)
                              for i in page["items"]]}
        return page

    api.list = list_then_lock  # type: ignore[method-assign]
    update(q)
    assert q.entries()[0][U(1)].container["state"] == "Locked"
    # The next poll (no race) reads the real state again.
    update(q)
    assert q.entries()[0][U(1)].container["state"] == "Locked"
