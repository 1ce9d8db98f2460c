"""The hook between crunch-run and the container gateway (``tunnel.agent``).

crunch-run knows the container; the tunnel package knows SSH and HTTP/2. Once the container is
Running and the dispatcher gave a ``GatewayAuthSecret``, the runner calls :func:`start_gateway`
with a :class:`GatewayContext`; it imports ``tunnel.agent`` and calls
``tunnel.agent.start_gateway(ctx)``. That may return an async context manager, an object with an
``aclose()`` coroutine, or an awaitable resolving to either. :func:`start_gateway` returns a
:class:`GatewayHandle` whose :meth:`GatewayHandle.aclose` the runner awaits when the container
ends. A missing module or function is not an error: the container runs without a gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dispatcher.arvados.client import ArvadosClient

log = logging.getLogger("crunchgate.crunchrun.gateway")


@dataclass
class GatewayContext:
    """Everything the gateway needs from crunch-run (docs/internals.md)."""

    container_uuid: str
    auth_secret: str = field(repr=False)
    client: ArvadosClient
    # (command, tty) -> argv that runs the command inside the container
    exec_argv: Callable[[list[str], bool], list[str]]
    container_env: dict[str, str] = field(repr=False)
    container_cwd: str
    target_ip: str  # where ssh -L and container web-service connections go
    log_dir: str = ""  # local copies of the logs (stderr.txt ...), served as live-log WebDAV


class GatewayHandle:
    """A started gateway; :meth:`aclose` stops it (idempotent, never raises)."""

    def __init__(self, obj: Any, entered: bool, close_timeout_s: float = 5.0) -> None:
        self._obj = obj
        self._entered = entered
        self._closed = False
        self.close_timeout_s = close_timeout_s

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Bounded: a gateway that does not stop must not keep the container from finishing.
        # tunnel.agent ends at the first cancellation (it uses asyncio.timeout(), not 3.11's
        # wait_for(), which could swallow one); a close that still hangs is cancelled once,
        # which also cancels whatever it awaits, and then abandoned.
        task = asyncio.ensure_future(self._close())
        done, _ = await asyncio.wait({task}, timeout=self.close_timeout_s)
        if not done:
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=1.0)
        if not done:
            log.warning("the container gateway did not stop within %gs; abandoning it",
                        self.close_timeout_s)

    async def _close(self) -> None:
        try:
            if self._entered:
                await self._obj.__aexit__(None, None, None)
            elif hasattr(self._obj, "aclose"):
                res = self._obj.aclose()
                if inspect.isawaitable(res):
                    await res
        except Exception:
            log.exception("error stopping the container gateway")


def _load_start_function(module_name: str) -> Callable[[GatewayContext], Any] | None:
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        log.debug("no container gateway: cannot import %s (%s)", module_name, exc)
        return None
    fn = getattr(module, "start_gateway", None)
    if fn is None:
        log.debug("no container gateway: %s has no start_gateway", module_name)
    return fn


async def start_gateway(ctx: GatewayContext, module_name: str = "tunnel.agent"
                        ) -> GatewayHandle | None:
    """Start the gateway for ``ctx`` if the tunnel package provides one; None otherwise.

    Errors starting it are logged and swallowed: a broken gateway must not fail the container.
    """
    fn = _load_start_function(module_name)
    if fn is None:
        return None
    try:
        obj = fn(ctx)
        if hasattr(obj, "__aenter__"):
            await obj.__aenter__()
            return GatewayHandle(obj, entered=True)
        if inspect.isawaitable(obj):
            obj = await obj
            if hasattr(obj, "__aenter__") and not hasattr(obj, "aclose"):
                await obj.__aenter__()
                return GatewayHandle(obj, entered=True)
        return GatewayHandle(obj, entered=False)
    except Exception:
        log.exception("could not start the container gateway; continuing without it",
                      extra={"container_uuid": ctx.container_uuid})
        return None


@contextlib.asynccontextmanager
async def gateway(ctx: GatewayContext | None, module_name: str = "tunnel.agent") -> Any:
    """``async with gateway(ctx):`` — start (if ctx) and always stop the gateway."""
    handle = await start_gateway(ctx, module_name) if ctx is not None else None
    try:
        yield handle
    finally:
        if handle is not None:
            await handle.aclose()
