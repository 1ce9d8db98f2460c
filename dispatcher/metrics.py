"""Prometheus helpers: one registry per service, never the process-global default.

A service creates its registry with :func:`new_registry`, hands it to every component that
exports metrics (each component creates its own metric objects on it), and the service wrapper
(:mod:`dispatcher.service`) serves it on ``/metrics``. Keeping registries per service means two
services in one process (the controller hosting the broker, or a test starting several) never
collide on metric names, and tests see only their own series.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = [
    "CollectorRegistry",
    "new_registry",
    "render",
    "render_json",
    "install_standard_metrics",
    "crunchgate_version",
]


def new_registry() -> CollectorRegistry:
    """A fresh, empty registry for one service."""
    return CollectorRegistry(auto_describe=True)


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The registry in Prometheus text format: ``(body, content_type)``."""
    return generate_latest(registry), CONTENT_TYPE_LATEST


def render_json(registry: CollectorRegistry) -> bytes:
    """The registry as JSON (``/metrics.json``): a list of metric families with their samples.

    The shape is crunchgate's own (Arvados serves Go's expvar-like dump here); it is meant for
    humans and ad-hoc scripts, Prometheus scrapes ``/metrics``.
    """
    families: list[dict[str, Any]] = []
    for family in registry.collect():
        families.append({
            "name": family.name,
            "type": family.type,
            "help": family.documentation,
            "samples": [
                {"name": s.name, "labels": dict(s.labels), "value": s.value}
                for s in family.samples
            ],
        })
    return json.dumps(families, default=str).encode()


def crunchgate_version() -> str:
    """The installed crunchgate version (``0+unknown`` when running from a bare checkout)."""
    try:
        from importlib.metadata import version

        return version("crunchgate")
    except Exception:
        return "0+unknown"


def install_standard_metrics(
    registry: CollectorRegistry,
    *,
    service: str = "",
    config_path: str | os.PathLike[str] | None = None,
) -> None:
    """Register the metrics every crunchgate service exports.

    * ``process_*`` (start time, CPU, memory, open fds) from prometheus-client's process
      collector (Linux only; silently absent elsewhere).
    * ``arvados_version_running{version}`` = 1, as every Arvados service exports it.
    * ``crunchgate_build_info{version, python, service}`` = 1.
    * With ``config_path``: ``arvados_config_source_timestamp_seconds{sha256}`` (the file's
      mtime) and ``arvados_config_load_timestamp_seconds{sha256}`` (now), labelled with the
      file's SHA-256 as Arvados does, so a fleet's config drift is visible in one query.
    """
    ProcessCollector(registry=registry)
    version = crunchgate_version()
    Gauge(
        "arvados_version_running", "Indicated version is running.", ["version"],
        registry=registry,
    ).labels(version=version).set(1)
    Gauge(
        "crunchgate_build_info", "crunchgate version and Python runtime of this process.",
        ["version", "python", "service"], registry=registry,
    ).labels(version=version, python=platform.python_version(), service=service).set(1)
    if config_path is not None:
        try:
            with open(config_path, "rb") as fh:
                digest = hashlib.sha256(fh.read()).hexdigest()
            mtime = os.stat(config_path).st_mtime
        except OSError:
            return
        Gauge(
            "arvados_config_source_timestamp_seconds",
            "Timestamp of the loaded config file.", ["sha256"], registry=registry,
        ).labels(sha256=digest).set(mtime)
        Gauge(
            "arvados_config_load_timestamp_seconds",
            "Time when the config file was loaded.", ["sha256"], registry=registry,
        ).labels(sha256=digest).set(time.time())
