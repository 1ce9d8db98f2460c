"""tunnel/connection.py with stand-in transports: backpressure between a local socket and a
stream, without sockets or TLS."""

from __future__ import annotations

import asyncio
from typing import Any

from tunnel.connection import LocalPipe, TunnelConnection, TunnelStream
from tunnel.protocol import TunnelSettings


class FakeTransport:
    """Records writes; reading can be paused and resumed like a real transport."""

    def __init__(self, deliver: Any = None) -> None:
        self.deliver = deliver
        self.reading = True
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))
        if self.deliver is not None:
            self.deliver(bytes(data))

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    closing = False

    def is_closing(self) -> bool:
        return self.closing

    def is_reading(self) -> bool:
        return self.reading

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def set_protocol(self, protocol: Any) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        pass


async def tunnel_pair(settings: TunnelSettings) -> tuple[TunnelStream, TunnelStream, list[Any]]:
    """A broker and an agent connection wired back to back (bytes delivered on demand)."""
    wire: list[tuple[TunnelConnection, bytes]] = []
    accepted: list[TunnelStream] = []

    def on_stream(st: TunnelStream) -> None:
        agent.accept(st)
        accepted.append(st)

    broker = TunnelConnection("broker", settings)
    agent = TunnelConnection("agent", settings, on_stream=on_stream)
    broker.connection_made(FakeTransport(lambda d: wire.append((agent, d))))
    agent.connection_made(FakeTransport(lambda d: wire.append((broker, d))))

    def run_wire() -> None:
        while wire:
            conn, data = wire.pop(0)
            conn.data_received(data)

    opening = asyncio.ensure_future(broker.open_stream("container:1"))
    for _ in range(5):
        await asyncio.sleep(0)
        run_wire()
    bst = await opening
    return bst, accepted[0], [run_wire]


def test_local_reading_pauses_again_after_someone_else_resumed_it() -> None:
    # uvloop starts reading after connection_made() and the broker's hijack resumes reading
    # after take_over(): neither may turn off the stream's backpressure.
    async def go() -> None:
        settings = TunnelSettings(stream_window_bytes=64 * 1024)
        bst, _, _ = await tunnel_pair(settings)
        local = FakeTransport()
        pipe = LocalPipe(bst)
        pipe.connection_made(local)
        chunk = b"z" * (32 * 1024)
        for _ in range(6):  # the agent never gives window back: the queue fills up
            pipe.data_received(chunk)
        assert not local.reading
        local.resume_reading()  # someone else
        pipe.data_received(chunk)
        assert not local.reading

    asyncio.run(go())


def test_local_reading_resumes_when_the_stream_queue_drains() -> None:
    async def go() -> None:
        settings = TunnelSettings(stream_window_bytes=64 * 1024)
        bst, ast, (run_wire,) = await tunnel_pair(settings)
        sink = FakeTransport()
        apipe = LocalPipe(ast)
        apipe.connection_made(sink)
        local = FakeTransport()
        pipe = LocalPipe(bst)
        pipe.connection_made(local)
        for _ in range(6):
            pipe.data_received(b"q" * (32 * 1024))
        assert not local.reading
        for _ in range(20):  # the agent delivers to its sink and gives the window back
            run_wire()
            bst.conn.flush()
        assert local.reading
        assert sum(len(w) for w in sink.written) == 6 * 32 * 1024

    asyncio.run(go())


def test_data_for_a_closing_local_side_still_gives_the_window_back() -> None:
    # A local socket on its way out, which had also paused our writes: its bytes are dropped,
    # and the window must come back anyway, or every such stream would shrink the tunnel's
    # connection window for good.
    async def go() -> None:
        settings = TunnelSettings(stream_window_bytes=64 * 1024)
        bst, ast, (run_wire,) = await tunnel_pair(settings)
        dying = FakeTransport()
        apipe = LocalPipe(ast)
        apipe.connection_made(dying)
        apipe.pause_writing()
        dying.closing = True
        for _ in range(8):
            bst.write(b"d" * (32 * 1024))
            for _ in range(5):
                run_wire()
                bst.conn.flush()
        assert dying.written == []
        assert ast._held_acks == 0
        # All 256 KiB were consumed as far as flow control goes (the connection window goes
        # back in 4 MiB steps, so it is counted here rather than seen at the sender).
        assert ast.conn.proto._in_unacked == 8 * 32 * 1024

    asyncio.run(go())
