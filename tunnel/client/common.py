"""What ``connect-ssh``, ``shell`` and the demo share: credentials, UUID checks, the upgrade.

:func:`open_upgraded` performs ``POST /arvados/v1/connect/{uuid}/ssh`` with ``Upgrade: ssh``
over TLS and hands the raw connection to a protocol of the caller's choice; a refusal becomes a
:class:`ShellRefused` whose message says what happened and what to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dispatcher.logs import register_secret
from tunnel.errors import TunnelError
from tunnel.protocol import ResponseHeadParser, build_upgrade_request

CONTAINER_RE = re.compile(r"^[a-z0-9]{5}-dz642-[a-z0-9]{15}$")
REQUEST_RE = re.compile(r"^[a-z0-9]{5}-xvhdp-[a-z0-9]{15}$")
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})

HINTS = {
    401: "check ARVADOS_API_TOKEN",
    404: "check the UUID, and that your token can read the container",
    403: "only the user who submitted the container request may open a shell",
    410: "the container is finished; there is nothing to connect to",
}


class ShellRefused(TunnelError):
    """The controller refused the shell, or could not be reached. ``str()`` is for the user."""


@dataclass
class ApiTarget:
    """Where the controller is and how to authenticate (ARVADOS_API_* variables)."""

    host: str
    token: str = field(repr=False)
    insecure: bool = False
    ca_file: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None,
                 ca_file: str | None = None) -> ApiTarget:
        env = os.environ if environ is None else environ
        host = env.get("ARVADOS_API_HOST", "").strip()
        token = env.get("ARVADOS_API_TOKEN", "").strip()
        missing = [n for n, v in (("ARVADOS_API_HOST", host), ("ARVADOS_API_TOKEN", token))
                   if not v]
        if missing:
            raise ShellRefused(f"{' and '.join(missing)} not set: export them (the controller "
                               "address host:port and your API token)", 2)
        register_secret(token)
        insecure = env.get("ARVADOS_API_HOST_INSECURE", "").strip().lower() in TRUE_WORDS
        return cls(host, token, insecure, ca_file or env.get("ARVADOS_API_CA_FILE") or None)

    @property
    def hostport(self) -> tuple[str, int, str]:
        """(host, port, Host header) from ``host:port`` or a URL."""
        text = self.host
        if "://" in text:
            text = text.split("://", 1)[1]
        text = text.split("/", 1)[0]
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or host.endswith(":"):
            return text.strip("[]"), 443, text
        return host.strip("[]"), int(port), text

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_file or None)
        if self.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx


def split_target(target: str) -> tuple[str, str]:
    """``[user@]uuid`` -> (user or "", uuid)."""
    user, sep, uuid = target.rpartition("@")
    return (user if sep else ""), uuid


async def resolve_container(api: ApiTarget, uuid: str) -> str:
    """A container UUID for a container or container request UUID (reference 4.6)."""
    if CONTAINER_RE.match(uuid):
        return uuid
    if not REQUEST_RE.match(uuid):
        raise ShellRefused("target UUID is not a container or container request UUID", 2)
    from dispatcher.arvados.client import ArvadosClient
    from dispatcher.arvados.errors import ArvadosError

    try:
        async with ArvadosClient(api.host, api.token, insecure=api.insecure,
                                 ca_file=api.ca_file, retries=1, timeout_s=30) as c:
            cr = await c.get("container_requests", uuid, select=["container_uuid", "state"])
    except ArvadosError as exc:
        raise ShellRefused(f"cannot look up container request {uuid}: {exc}", 1) from exc
    ctr = cr.get("container_uuid")
    if not ctr:
        raise ShellRefused(f"no container assigned, container request state is "
                           f"{cr.get('state')}", 1)
    return str(ctr)


class _Upgrade(asyncio.Protocol):
    def __init__(self, request: bytes) -> None:
        self.request = request
        self.parser = ResponseHeadParser()
        self.done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.more: asyncio.Event = asyncio.Event()

    def connection_made(self, transport: Any) -> None:  # uvloop's SSL transport is no Transport
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        try:
            head = self.parser.feed(data)
        except TunnelError as exc:
            if not self.done.done():
                self.done.set_exception(ShellRefused(f"bad answer from the controller: {exc}"))
            return
        self.more.set()
        if head is not None and not self.done.done():
            self.done.set_result(head)

    def connection_lost(self, exc: Exception | None) -> None:
        self.more.set()
        if not self.done.done():
            self.done.set_exception(ShellRefused(
                f"the controller closed the connection before answering ({exc})", 1))


def refusal_message(status: int, body: bytes) -> str:
    """A user-facing message for a non-101 answer."""
    text = ""
    with contextlib.suppress(ValueError):
        data = json.loads(body or b"{}")
        if isinstance(data, dict) and isinstance(data.get("errors"), list):
            text = "; ".join(str(e) for e in data["errors"])
    if not text:
        text = body[:300].decode("utf-8", "replace").strip() or f"HTTP {status}"
    hint = HINTS.get(status)
    if status == 503 and "tunnel is down" in text:
        hint = "the container's gateway is not connected right now; retry in a few seconds"
    return f"{text} ({hint})" if hint else text


async def open_upgraded(api: ApiTarget, uuid: str, protocol_factory: Callable[[], Any], *,
                        login_username: str = "", detach_keys: str = "",
                        timeout_s: float = 30.0) -> tuple[asyncio.Transport, Any]:
    """Open the shell connection to container ``uuid``; returns (transport, protocol)."""
    loop = asyncio.get_running_loop()
    host, port, host_header = api.hostport
    form = {"detach_keys": detach_keys, "login_username": login_username, "no_forward": "false"}
    req = build_upgrade_request(host_header, f"/arvados/v1/connect/{uuid}/ssh", "ssh",
                                api.token, form)
    up = _Upgrade(req)
    sslctx = api.ssl_context()
    try:
        async with asyncio.timeout(timeout_s):
            transport, _ = await loop.create_connection(
                lambda: up, host, port, ssl=sslctx, server_hostname=host)
        async with asyncio.timeout(timeout_s):
            head = await up.done
    except ssl.SSLError as exc:
        raise ShellRefused(f"TLS error talking to {host}:{port}: {exc} (set "
                           "ARVADOS_API_HOST_INSECURE=1 for a development certificate, or "
                           "give its CA with --ca-file)", 1) from exc
    except OSError as exc:
        raise ShellRefused(f"cannot reach the controller at {host}:{port}: {exc}", 1) from exc
    except TimeoutError:
        raise ShellRefused(f"the controller at {host}:{port} did not answer in time", 1) from None
    if head.status != 101:
        # Error bodies are small; give the rest of it a moment to arrive.
        want = int(head.header("content-length", "0") or 0)
        end = loop.time() + 2
        while len(up.parser.rest) < want and loop.time() < end and not transport.is_closing():
            up.more.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.2):
                    await up.more.wait()
        transport.close()
        raise ShellRefused(refusal_message(head.status, up.parser.rest), head.status)
    if head.header("upgrade").lower() != "ssh":
        transport.close()
        raise ShellRefused("bad answer from the controller: no 'Upgrade: ssh'", 502)
    proto = protocol_factory()
    transport.set_protocol(proto)
    proto.connection_made(transport)
    if up.parser.rest:
        proto.data_received(up.parser.rest)
    return transport, proto
