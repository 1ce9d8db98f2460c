"""The event loop every crunchgate service runs on.

uvloop (the ``fast`` extra, installed by ``dev/setup``) when it is there, else stock asyncio.
It halves the per-message cost of the tunnel ends (docs/tunnel.md) and cuts the dispatchers'
cost per API call (TLS and HTTP to the controller; docs/slurm.md); everything works on either.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on uvloop's loop when installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)  # a loop of its own, no process-wide policy change
