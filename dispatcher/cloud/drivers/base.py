"""The cloud driver interface: one small set of async methods every driver implements.

Reference 5.10. An :class:`InstanceSet` creates, lists and destroys the VMs of one dispatcher
(identified by its InstanceSetID tag); an :class:`Instance` is one VM as last listed. Drivers
raise the classes of :mod:`dispatcher.cloud.errors` (``RateLimitError``, ``QuotaError``,
``CapacityError``, ``DriverError``) and nothing else, so the pool's back-off rules are
driver-independent.

Drivers must only touch resources tagged with their InstanceSetID (or explicitly destroyed), and
``instances()`` must include booting and shutting-down VMs (the pool dedupes by ID).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dispatcher.config import InstanceType

Tags = dict[str, str]


@dataclass(frozen=True)
class PricePoint:
    """The instance's price from ``start_time`` (epoch s) on; sent to ``crunch-run --list``."""

    start_time: float
    price: float


def normalize_price_history(points: list[PricePoint]) -> list[PricePoint]:
    """Newest first; drop a point when the next-older one has the same time or the same price.

    (Reference 5.10 ``NormalizePriceHistory``: of two equal consecutive prices the older wins.)
    """
    ordered = sorted(points, key=lambda p: p.start_time, reverse=True)
    out: list[PricePoint] = []
    for i, p in enumerate(ordered):
        if i + 1 < len(ordered):
            older = ordered[i + 1]
            if older.start_time == p.start_time or older.price == p.price:
                continue
        out.append(p)
    return out


class Instance(abc.ABC):
    """One VM as the provider last described it."""

    @property
    @abc.abstractmethod
    def id(self) -> str:
        """Stable provider ID (``i-0123...``)."""

    @property
    @abc.abstractmethod
    def provider_type(self) -> str:
        """Provider's instance type name (``m5.large``)."""

    @property
    @abc.abstractmethod
    def address(self) -> str:
        """``host`` or ``host:port`` to SSH to; empty while unknown."""

    @property
    def remote_user(self) -> str:
        """The login user for SSH (``root`` means no ``sudo`` prefix)."""
        return "root"

    @property
    @abc.abstractmethod
    def tags(self) -> Tags:
        """Current tags."""

    @abc.abstractmethod
    async def set_tags(self, tags: Mapping[str, str]) -> None:
        """Replace the instance's tags."""

    @abc.abstractmethod
    async def destroy(self) -> None:
        """Terminate the instance (idempotent)."""

    async def verify_host_key(self, key: Any) -> None:
        """Check the SSH host key; raise :class:`NotImplementedByDriver` if there is no way.

        The executor then falls back to the instance-secret check (reference 5.8).
        """
        from dispatcher.cloud.errors import NotImplementedByDriver

        raise NotImplementedByDriver("host key verification is not implemented by this driver")

    def price_history(self, it: InstanceType) -> list[PricePoint]:
        """Price history (newest first), empty if the driver has none."""
        return []

    def __str__(self) -> str:
        return self.id


class InstanceSet(abc.ABC):
    """The VMs of one dispatcher on one cloud account."""

    @abc.abstractmethod
    async def create(
        self,
        it: InstanceType,
        image_id: str,
        tags: Mapping[str, str],
        init_command: str,
        public_key: str | None,
    ) -> Instance:
        """Start one VM of type ``it`` with ``tags``; ``init_command`` runs at first boot."""

    @abc.abstractmethod
    async def instances(self, tags: Mapping[str, str]) -> list[Instance]:
        """Every VM (booting and shutting down included) carrying all of ``tags``."""

    def instance_quota_group(self, it: InstanceType) -> str:
        """The provider quota group of ``it``; must differ for preemptible and on-demand."""
        return "spot" if it.preemptible else ""

    async def stop(self) -> None:
        """Release SDK clients and background tasks."""
        return None


class Executor(abc.ABC):
    """Runs shell command strings on one instance (SSH, or a stub in tests)."""

    @abc.abstractmethod
    async def execute(
        self,
        cmd: str,
        stdin: bytes | None = None,
        *,
        env: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> tuple[bytes, bytes]:
        """Run ``cmd``; return (stdout, stderr) or raise :class:`ExecError` (non-zero exit,
        connection failure, timeout)."""

    def set_target(self, instance: Instance) -> None:
        """The instance was re-listed (its address may have changed)."""
        return None

    async def close(self) -> None:
        """Drop the connection."""
        return None
