"""Wrappers the dispatcher puts around every driver (reference 5.10), innermost first:

1. :class:`InstrumentedInstanceSet` — ``arvados_dispatchcloud_driver_operations{operation,error}``
   for Create, List, Destroy, SetTags.
2. :class:`RateLimitedInstanceSet` — every list/create/destroy/set-tags call waits for a
   ``MaxCloudOpsPerSecond`` tick.
3. :class:`TaggedInstanceSet` — ``CloudVMs.ResourceTags`` merged under the dispatcher's own tags
   on create; listed instances lacking a requested tag are dropped.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from dispatcher.cloud.drivers.base import Instance, InstanceSet, PricePoint
from dispatcher.cloud.metrics import CloudMetrics
from dispatcher.cloud.throttle import RateLimiter
from dispatcher.config import InstanceType


class _WrappedInstance(Instance):
    """Delegates to ``inner``; ``before(op)`` runs before set_tags/destroy, ``after(op, err)``
    after."""

    def __init__(self, inner: Instance, before: Callable[[str], Awaitable[None]],
                 after: Callable[[str, bool], None]) -> None:
        self.inner = inner
        self._before = before
        self._after = after

    @property
    def id(self) -> str:
        return self.inner.id

    @property
    def provider_type(self) -> str:
        return self.inner.provider_type

    @property
    def address(self) -> str:
        return self.inner.address

    @property
    def remote_user(self) -> str:
        return self.inner.remote_user

    @property
    def tags(self) -> dict[str, str]:
        return self.inner.tags

    async def set_tags(self, tags: Mapping[str, str]) -> None:
        await self._before("SetTags")
        try:
            await self.inner.set_tags(tags)
        except Exception:
            self._after("SetTags", True)
            raise
        self._after("SetTags", False)

    async def destroy(self) -> None:
        await self._before("Destroy")
        try:
            await self.inner.destroy()
        except Exception:
            self._after("Destroy", True)
            raise
        self._after("Destroy", False)

    async def verify_host_key(self, key: Any) -> None:
        await self.inner.verify_host_key(key)

    def price_history(self, it: InstanceType) -> list[PricePoint]:
        return self.inner.price_history(it)

    def unwrap(self) -> Instance:
        inner = self.inner
        while isinstance(inner, _WrappedInstance):
            inner = inner.inner
        return inner


class WrappedInstanceSet(InstanceSet):
    """Instrumentation, rate limiting and default tags around one driver."""

    def __init__(self, inner: InstanceSet, *, metrics: CloudMetrics,
                 limiter: RateLimiter | None = None,
                 resource_tags: Mapping[str, str] | None = None) -> None:
        self.inner = inner
        self.metrics = metrics
        self.limiter = limiter
        self.resource_tags = dict(resource_tags or {})

    async def _before(self, op: str) -> None:
        if self.limiter is not None:
            await self.limiter.wait()

    def _after(self, op: str, error: bool) -> None:
        self.metrics.driver_operations.labels(operation=op, error="1" if error else "0").inc()

    def _wrap(self, inst: Instance) -> Instance:
        return _WrappedInstance(inst, self._before, self._after)

    async def create(self, it: InstanceType, image_id: str, tags: Mapping[str, str],
                     init_command: str, public_key: str | None) -> Instance:
        await self._before("Create")
        merged = {**self.resource_tags, **tags}  # the pool's own tags win on conflicts
        try:
            inst = await self.inner.create(it, image_id, merged, init_command, public_key)
        except Exception:
            self._after("Create", True)
            raise
        self._after("Create", False)
        return self._wrap(inst)

    async def instances(self, tags: Mapping[str, str]) -> list[Instance]:
        await self._before("List")
        try:
            found = await self.inner.instances(tags)
        except Exception:
            self._after("List", True)
            raise
        self._after("List", False)
        return [self._wrap(i) for i in found
                if all(i.tags.get(k) == v for k, v in tags.items())]

    def instance_quota_group(self, it: InstanceType) -> str:
        return self.inner.instance_quota_group(it)

    async def stop(self) -> None:
        await self.inner.stop()


def wrap_instance_set(inner: InstanceSet, cfg: Any, metrics: CloudMetrics,
                      clock: Any = None) -> WrappedInstanceSet:
    """The standard wrappers configured from ``Containers.CloudVMs``."""
    vms = cfg.containers.cloud_vms
    limiter = RateLimiter(vms.max_cloud_ops_per_second, clock) \
        if vms.max_cloud_ops_per_second > 0 else None
    return WrappedInstanceSet(inner, metrics=metrics, limiter=limiter,
                              resource_tags=vms.resource_tags)
