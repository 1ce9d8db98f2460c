"""Cloud drivers: ``loopback`` (this host over SSH), ``ec2`` (boto3), ``azure`` (request building
and error classification), and ``stub`` (in-memory, for tests and benchmarks).

:func:`new_instance_set` picks one by ``CloudVMs.Driver``; each driver module is imported only
when chosen, so a missing optional SDK only breaks its own driver.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from dispatcher.cloud.errors import ConfigurationError
from dispatcher.config import ClusterConfig

from .base import Executor, Instance, InstanceSet, PricePoint, Tags, normalize_price_history

__all__ = [
    "Executor",
    "Instance",
    "InstanceSet",
    "PricePoint",
    "Tags",
    "new_instance_set",
    "normalize_price_history",
]

DRIVERS = {
    "loopback": "dispatcher.cloud.drivers.loopback",
    "ec2": "dispatcher.cloud.drivers.ec2",
    "azure": "dispatcher.cloud.drivers.azure",
}


def new_instance_set(
    cfg: ClusterConfig, instance_set_id: str, *, logger: logging.Logger | None = None,
    registry: Any = None, **kwargs: Any,
) -> InstanceSet:
    """The driver named by ``CloudVMs.Driver``, configured from ``DriverParameters``."""
    name = cfg.containers.cloud_vms.driver
    module_name = DRIVERS.get(name)
    if module_name is None:
        raise ConfigurationError(
            f"unsupported cloud driver {name!r} in Containers.CloudVMs.Driver "
            f"(use one of {', '.join(sorted(DRIVERS))})"
        )
    module = importlib.import_module(module_name)
    return module.new_instance_set(cfg, instance_set_id, logger=logger, registry=registry,
                                   **kwargs)
