"""The cloud dispatcher's cache of relevant containers (reference 5.3, API calls of 2.4).

One :meth:`ContainerQueue.update` is one poll: containers locked by me (keyset paging on uuid),
the top of the Queued list, and every cached container neither list returned (in batches of 20,
to learn that it finished or was deleted). New entries get their mounts fetched once, their
resources computed and their eligible instance types chosen with
:func:`dispatcher.core.sizing.choose_instance_type`; containers nothing can run are cancelled
with ``runtime_status.error`` set (lock first, as only the lock holder may set it).

Local lock/unlock/cancel answers update the cache at once; an entry touched locally while a poll
was in flight is not overwritten by that (older) poll.

Differences from the reference (reference 8.3): the Queued list is ordered
``priority desc, uuid asc`` (a stable order, so offset paging neither skips nor repeats), and
its visible length is ``queued_target`` (default 1000 non-supervisor containers, not ~100).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from dispatcher.arvados.errors import ApiError, ApiUnavailable
from dispatcher.cloud.clock import Clock
from dispatcher.cloud.pool import Notifier, instance_type_json
from dispatcher.config import ClusterConfig, InstanceType
from dispatcher.core.sizing import (
    ConstraintsNotSatisfiable,
    InstanceResources,
    SizingError,
    choose_instance_type,
    instance_resources_needed,
)

log = logging.getLogger("crunchgate.cloud.queue")

SELECT = ["uuid", "state", "priority", "runtime_constraints", "container_image",
          "scheduling_parameters", "created_at"]
FINAL_STATES = ("Complete", "Cancelled")


def _parse_time(value: Any) -> float:
    if not isinstance(value, str) or not value:
        return 0.0
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


@dataclass
class QueueEnt:
    """One cached container with what the scheduler needs to place it."""

    container: dict[str, Any]
    instance_types: list[InstanceType]
    resources: InstanceResources
    first_seen_at: float
    created_at: float = 0.0
    type_names: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def make(cls, container: dict[str, Any], types: list[InstanceType],
             resources: InstanceResources, first_seen_at: float) -> QueueEnt:
        return cls(container, types, resources, first_seen_at,
                   _parse_time(container.get("created_at")),
                   frozenset(t.name for t in types))

    def to_json(self, scheduling_status: str = "") -> dict[str, Any]:
        """The management API's QueueEnt JSON (reference 5.12)."""
        from datetime import UTC

        r = self.resources
        return {
            "container": dict(self.container),
            "instance_resources": {"VCPUs": r.vcpus, "RAM": r.ram, "Scratch": r.scratch,
                                   "GPUs": r.gpus, "GPUVRAM": r.gpu_vram},
            "instance_types": [instance_type_json(t) for t in self.instance_types],
            "first_seen_at": datetime.fromtimestamp(self.first_seen_at, UTC).isoformat()
            .replace("+00:00", "Z"),
            "scheduling_status": scheduling_status,
        }


class ContainerQueue:
    """See the module docstring. ``client`` is a :class:`dispatcher.arvados.client.ArvadosClient`."""

    def __init__(self, cfg: ClusterConfig, client: Any, *, clock: Clock | None = None,
                 queued_target: int = 1000, page_size: int = 1000,
                 choose: Callable[[ClusterConfig, dict[str, Any]], list[InstanceType]] = choose_instance_type) -> None:
        self.cfg = cfg
        self.client = client
        self.clock = clock or Clock()
        self.queued_target = queued_target
        self.page_size = page_size
        self.choose = choose
        self._entries: dict[str, QueueEnt] = {}
        self.threshold = 0.0
        self._touched: set[str] = set()
        self._polling = False
        self._notifier = Notifier()
        self._token_uuid = ""
        self.last_503 = 0.0
        self._cancelling: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.stopped = False

    # --- reading -----------------------------------------------------------------------------

    def entries(self) -> tuple[dict[str, QueueEnt], float]:
        """A copy of the cache and the time the last successful poll *started*."""
        return dict(self._entries), self.threshold

    def subscribe(self) -> asyncio.Event:
        return self._notifier.subscribe()

    def unsubscribe(self, ev: asyncio.Event) -> None:
        self._notifier.unsubscribe(ev)

    def forget(self, uuid: str) -> None:
        """Drop an entry that is final or Queued with priority 0."""
        ent = self._entries.get(uuid)
        if ent is None:
            return
        c = ent.container
        if c.get("state") in FINAL_STATES or (c.get("state") == "Queued"
                                              and int(c.get("priority") or 0) == 0):
            del self._entries[uuid]

    # --- API calls ---------------------------------------------------------------------------

    def _note(self, exc: BaseException) -> None:
        if isinstance(exc, ApiError) and exc.status == 503:
            self.last_503 = self.clock.now()

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except (ApiError, ApiUnavailable) as exc:
            self._note(exc)
            raise

    async def _list_keyset(self, filters: list[Any]) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        last = ""
        while True:
            f = list(filters) + ([["uuid", ">", last]] if last else [])
            page = await self._call(self.client.list(
                "containers", filters=f, order="uuid", select=SELECT, limit=self.page_size,
                count="none"))
            got = page.get("items") or []
            if not got:
                return items
            items.extend(got)
            last = got[-1]["uuid"]

    async def _list_queued(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        offset = 0
        non_supervisors = 0
        seen: set[str] = set()
        while True:
            page = await self._call(self.client.list(
                "containers", filters=[["state", "=", "Queued"], ["priority", ">", "0"]],
                order=["priority desc", "uuid asc"], select=SELECT, limit=self.page_size,
                offset=offset or None, count="none"))
            got = page.get("items") or []
            if not got:
                return items
            for c in got:
                if c["uuid"] in seen:
                    continue
                seen.add(c["uuid"])
                items.append(c)
                if not (c.get("scheduling_parameters") or {}).get("supervisor"):
                    non_supervisors += 1
            offset += len(got)
            if non_supervisors >= self.queued_target:
                return items

    async def update(self) -> None:
        """One poll (reference 2.4). Raises on any failed call: a partial poll is never applied."""
        start = self.clock.now()
        self._polling = True
        self._touched = set()
        try:
            if not self._token_uuid:
                self._token_uuid = await self._call(self.client.token_uuid())
            nxt: dict[str, dict[str, Any]] = {}
            for c in await self._list_keyset([["locked_by_uuid", "=", self._token_uuid]]):
                nxt[c["uuid"]] = c
            for c in await self._list_queued():
                nxt.setdefault(c["uuid"], c)
            missing = [u for u, e in self._entries.items()
                       if u not in nxt and e.container.get("state") not in FINAL_STATES]
            for i in range(0, len(missing), 20):
                batch = missing[i:i + 20]
                got = await self._list_keyset([["uuid", "in", batch]])
                if not got:
                    for u in batch:
                        log.warning("container not found by controller (deleted?)",
                                    extra={"container_uuid": u})
                        self._entries.pop(u, None)
                    continue
                for c in got:
                    if c["uuid"] not in batch:
                        raise RuntimeError("BUG? server response did not match requested "
                                           "filters, erroring out rather than risk deadlock")
                    nxt[c["uuid"]] = c
            await self._apply(nxt)
            self.threshold = start
        finally:
            self._polling = False
        self._notifier.notify()

    async def _apply(self, nxt: dict[str, dict[str, Any]]) -> None:
        for uuid in list(self._entries):
            if uuid not in nxt and uuid not in self._touched:
                log.info("dropping container from queue", extra={"container_uuid": uuid})
                del self._entries[uuid]
        for uuid, c in nxt.items():
            if uuid in self._touched:
                continue
            ent = self._entries.get(uuid)
            if ent is not None:
                ent.container.update({k: c[k] for k in SELECT if k in c})
                continue
            await self._add(c)

    async def _add(self, c: dict[str, Any]) -> None:
        uuid = c["uuid"]
        state = c.get("state")
        if state in FINAL_STATES:
            return
        try:
            full = await self._call(self.client.get("containers", uuid, select=["mounts"]))
        except ApiError as exc:
            log.warning("error getting mounts: %s", exc, extra={"container_uuid": uuid})
            return
        mounts = full.get("mounts")
        if mounts is not None and not isinstance(mounts, dict):
            if state in ("Queued", "Locked"):
                self._cancel_unsatisfiable(
                    uuid, f"error getting mounts from container record: mounts is "
                          f"{type(mounts).__name__}, not an object")
            return
        sized = dict(c)
        sized["mounts"] = {k: v for k, v in (mounts or {}).items()
                           if isinstance(v, dict) and v.get("kind") == "tmp"}
        try:
            types = self.choose(self.cfg, sized)
        except SizingError as exc:
            if state in ("Queued", "Locked"):
                msg = exc.message if isinstance(exc, ConstraintsNotSatisfiable) else str(exc)
                self._cancel_unsatisfiable(uuid, msg)
                return
            types = []
        resources = instance_resources_needed(self.cfg, sized)
        container = {k: c.get(k) for k in SELECT}
        self._entries[uuid] = QueueEnt.make(container, types, resources, self.clock.now())
        log.info("adding container to queue (state %s, priority %s, instance types %s)",
                 state, c.get("priority"), ",".join(t.name for t in types),
                 extra={"container_uuid": uuid})

    # --- actions -----------------------------------------------------------------------------

    def _apply_response(self, uuid: str, resp: dict[str, Any]) -> None:
        if self._polling:
            self._touched.add(uuid)
        ent = self._entries.get(uuid)
        if ent is None:
            return
        for k in ("state", "priority", "locked_by_uuid"):
            if k in resp:
                ent.container[k] = resp[k]
        self._notifier.notify()

    async def lock(self, uuid: str) -> None:
        self._apply_response(uuid, await self._call(self.client.lock(uuid)))

    async def unlock(self, uuid: str) -> None:
        self._apply_response(uuid, await self._call(self.client.unlock(uuid)))

    async def cancel(self, uuid: str) -> None:
        resp = await self._call(self.client.update("containers", uuid, {"state": "Cancelled"}))
        self._apply_response(uuid, resp)

    def _cancel_unsatisfiable(self, uuid: str, message: str) -> None:
        if uuid in self._cancelling:
            return
        self._cancelling.add(uuid)

        async def run() -> None:
            try:
                cur = await self._call(self.client.get("containers", uuid, select=["state"]))
                if cur.get("state") == "Queued":
                    await self._call(self.client.lock(uuid))
                await self._call(self.client.update("containers", uuid,
                                                    {"runtime_status": {"error": message}}))
                await self._call(self.client.update("containers", uuid, {"state": "Cancelled"}))
                log.info("cancelled unsatisfiable container: %s", message,
                         extra={"container_uuid": uuid})
            except Exception as exc:
                try:
                    cur = await self.client.get("containers", uuid, select=["state"])
                    if cur.get("state") == "Cancelled":
                        return
                except Exception:
                    pass
                log.warning("error cancelling unsatisfiable container: %s", exc,
                            extra={"container_uuid": uuid})
            finally:
                self._cancelling.discard(uuid)

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- loop --------------------------------------------------------------------------------

    async def run(self, poll_interval_s: float) -> None:
        """Poll forever: sleep max(PollInterval, duration of the previous poll) between polls."""
        while not self.stopped:
            start = self.clock.now()
            try:
                await self.update()
            except Exception as exc:
                log.warning("error updating queue: %s", exc)
            took = self.clock.now() - start
            await self.clock.sleep(max(poll_interval_s, took))

    async def first_update(self, poll_interval_s: float) -> None:
        """Retry the first poll every max(PollInterval/10, 1 s) until it succeeds."""
        while True:
            try:
                await self.update()
                return
            except Exception as exc:
                log.warning("error updating queue: %s", exc)
                await self.clock.sleep(max(poll_interval_s / 10, 1.0))

    async def stop(self) -> None:
        self.stopped = True
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)
