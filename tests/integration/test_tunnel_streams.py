"""Many streams on one tunnel: data integrity and independence (broker API, no OpenSSH)."""

from __future__ import annotations

import asyncio
import hashlib
import random

import pytest

from tests.helpers.tunnel import TunnelEnv, ctr_uuid

MiB = 1 << 20


async def hash_server() -> tuple[asyncio.AbstractServer, int]:
    """A 'container' service: reads to EOF, answers the sha256 of what it got, then sends
    back ``n`` bytes of a deterministic pattern if the first line asked for them."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        h = hashlib.sha256()
        while chunk := await reader.read(256 * 1024):
            h.update(chunk)
        writer.write(h.hexdigest().encode())
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


@pytest.mark.slow
def test_100_concurrent_streams_of_10_mib_arrive_intact(tunnel_env: TunnelEnv) -> None:
    uuid = ctr_uuid(31)
    tunnel_env.start_agent(uuid)
    conn = tunnel_env.wait_registered(uuid)

    async def go() -> list[tuple[str, str]]:
        srv, port = await hash_server()

        async def one(i: int) -> tuple[str, str]:
            st = await conn.open_stream(f"container:{port}")
            rng = random.Random(i)
            h = hashlib.sha256()
            for _ in range(10):
                chunk = rng.randbytes(MiB)
                h.update(chunk)
                st.write(chunk)
                await st.drain()
            st.write_eof()
            got = b""
            while chunk := await st.read():
                got += chunk
            return h.hexdigest(), got.decode()

        try:
            return await asyncio.gather(*(one(i) for i in range(100)))
        finally:
            srv.close()

    results = tunnel_env.lt.run(go(), timeout=170)
    assert len(results) == 100
    assert all(sent == received for sent, received in results)
    assert len({sent for sent, _ in results}) == 100  # really 100 different payloads
