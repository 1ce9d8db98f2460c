"""The event loop every crunchgate service runs on.

uvloop (the ``fast`` extra, installed by ``dev/setup``) when it is there, else stock asyncio.
It cuts the per-message cost of the tunnel ends (round trips 1.9x -> 1.6x OpenSSH's,
docs/tunnel.md) and the dispatchers' cost per API call (TLS and HTTP to the controller,
docs/slurm.md); everything works on either.
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
