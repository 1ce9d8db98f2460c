"""The asyncio shell around :class:`tunnel.protocol.TunnelProtocol`, shared by broker and agent.

:class:`TunnelConnection` is the protocol object of the tunnel's transport (a
``BufferedProtocol``: one preallocated receive buffer instead of a bytes object per TLS record).
Each stream is a :class:`TunnelStream`, which is either read and written with coroutines or
*spliced* to a local transport (:class:`LocalPipe`) so bytes move callback to callback.

Backpressure, end to end:

* tunnel -> local: received data is written to the local transport and its flow-control window
  is returned at once, unless that transport has paused us, in which case the window is held
  back until it resumes. A slow local reader therefore stops its own stream, nobody else's.
* local -> tunnel: data goes into the stream's queue inside the protocol; when more than one
  window is queued the local transport stops reading until :meth:`TunnelConnection.flush` has
  moved it out.
* tunnel transport: queued data is pumped only while the tunnel transport's write buffer is
  below its high-water mark, so the bytes ahead of a keystroke stay few (see protocol.py).

Every per-stream callback into a local transport is isolated (``_guard``): an error there resets
that stream, never the tunnel (tunnel-performance.md trap 2).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

from tunnel.errors import TunnelError
from tunnel.protocol import (
    ConnectionTerminated,
    DataReceived,
    DrainRequested,
    Event,
    PingAcked,
    StreamAccepted,
    StreamClosed,
    StreamEnded,
    StreamRefused,
    StreamRequested,
    StreamReset,
    TunnelProtocol,
    TunnelProtocolError,
    TunnelSettings,
)

log = logging.getLogger("crunchgate.tunnel.connection")

RECV_BUFFER_BYTES = 256 * 1024
TRANSPORT_HIGH_WATER = 256 * 1024
TRANSPORT_LOW_WATER = 64 * 1024
WRITE_SLICE_BYTES = 64 * 1024
BACKLOG_BYTES = 1 << 20  # queued per stream (at most a window) before its reader pauses
READ_CHUNK_BYTES = 64 * 1024
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
NOTSENT_LOWAT_BYTES = 128 * 1024


class StreamError(TunnelError):
    """A stream was refused or reset, or its tunnel went away. The message is for the user."""

    status = 502


def tune_socket(transport: asyncio.BaseTransport, lowat: bool = True) -> None:
    """TCP_NODELAY (OpenSSH's 43 ms stream-open trap) and a small unsent-bytes queue."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if lowat:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, NOTSENT_LOWAT_BYTES)


class TunnelStream:
    """One CONNECT stream: a bidirectional byte pipe through the tunnel."""

    def __init__(self, conn: TunnelConnection, stream_id: int, target: str,
                 headers: dict[str, str] | None = None) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.target = target
        self.headers = headers or {}
        loop = asyncio.get_running_loop()
        self.accepted: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        self._buf = bytearray()
        self._buf_unacked = 0
        self._eof = False
        self._error: StreamError | None = None
        self._read_waiter: asyncio.Future[None] | None = None
        self._pipe: LocalPipe | None = None
        self._held_acks = 0
        self._write_waiters: list[asyncio.Future[None]] = []
        self.local_ended = False
        self.bytes_in = 0
        self.bytes_out = 0

    # --- called by the connection ----------------------------------------------------------

    def _on_data(self, data: bytes, flow_len: int) -> None:
        self.bytes_in += len(data)
        pipe = self._pipe
        if pipe is not None:
            if pipe.deliver(data):
                self.conn.proto.acknowledge(self.stream_id, flow_len)
            else:
                self._held_acks += flow_len
            return
        self._buf += data
        self._buf_unacked += flow_len
        self._wake()

    def _on_end(self) -> None:
        self._eof = True
        if self._pipe is not None:
            self._pipe.deliver_eof()
        self._wake()

    def _on_reset(self, message: str, status: int = 502) -> None:
        if self._error is None:
            self._error = StreamError(message, status)
        self._eof = True
        if not self.accepted.done():
            self.accepted.set_exception(self._error)
            self.accepted.exception()  # retrieved: callers may never await it
        if self._pipe is not None:
            self._pipe.abort()
        self._wake()
        self._finish()

    def _on_closed(self) -> None:
        self._finish()

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)
        self.conn._streams.pop(self.stream_id, None)
        self._release_writers()

    def _on_writable(self) -> None:
        if self._pipe is not None:
            self._pipe.resume_local_reading()
        self._release_writers()

    def _release_writers(self) -> None:
        for w in self._write_waiters:
            if not w.done():
                w.set_result(None)
        self._write_waiters.clear()

    def _wake(self) -> None:
        w = self._read_waiter
        if w is not None and not w.done():
            w.set_result(None)

    # --- called by a LocalPipe -------------------------------------------------------------

    def release_held_acks(self) -> None:
        """The local transport drained: give the peer its window back."""
        if self._held_acks:
            n, self._held_acks = self._held_acks, 0
            self.conn.proto.acknowledge(self.stream_id, n)
            self.conn.flush()

    def attach(self, pipe: LocalPipe) -> None:
        """Splice this stream to a local transport (data already read is delivered first)."""
        self._pipe = pipe
        if self._buf:
            data, n = bytes(self._buf), self._buf_unacked
            self._buf.clear()
            self._buf_unacked = 0
            if pipe.deliver(data):
                self.conn.proto.acknowledge(self.stream_id, n)
            else:
                self._held_acks += n
            self.conn.flush()
        if self._error is not None:
            pipe.abort()
        elif self._eof:
            pipe.deliver_eof()

    # --- user API --------------------------------------------------------------------------

    @property
    def error(self) -> StreamError | None:
        return self._error

    @property
    def backlogged(self) -> bool:
        """More than a window is queued for the tunnel: stop reading the local side."""
        limit = min(BACKLOG_BYTES, self.conn.settings.stream_window_bytes)
        return self.conn.proto.buffered(self.stream_id) > limit

    def write(self, data: bytes) -> None:
        """Queue bytes for the peer (never blocks; see :meth:`drain`)."""
        self._write(data)

    def _write(self, data: bytes) -> bool:
        """:meth:`write`; returns :attr:`backlogged`."""
        if self._error is not None or self.local_ended:
            return False
        self.bytes_out += len(data)
        conn = self.conn
        proto = conn.proto
        proto.send_data(self.stream_id, data)
        conn.flush()
        if proto.buffered(self.stream_id) > min(BACKLOG_BYTES, conn.settings.stream_window_bytes):
            conn._backlogged.add(self)
            return True
        return False

    async def drain(self) -> None:
        """Wait until the queue for this stream is below one window."""
        while self.backlogged and self._error is None and not self.conn.closed.done():
            w = asyncio.get_running_loop().create_future()
            self._write_waiters.append(w)
            self.conn._backlogged.add(self)
            await w
        if self._error is not None:
            raise self._error

    def write_eof(self) -> None:
        """Half-close: the peer reads EOF after the queued data."""
        if self.local_ended or self._error is not None:
            return
        self.local_ended = True
        self.conn.proto.end_stream(self.stream_id)
        self.conn.flush()

    def abort(self) -> None:
        """Reset the stream."""
        if self.conn.proto.is_open(self.stream_id):
            self.conn.proto.reset_stream(self.stream_id)
            self.conn.flush()
        self._on_reset("stream aborted", 499)

    async def read(self, n: int = 65536) -> bytes:
        """Up to ``n`` bytes; ``b""`` at EOF. Raises StreamError if the stream was reset."""
        while not self._buf and not self._eof:
            self._read_waiter = asyncio.get_running_loop().create_future()
            await self._read_waiter
            self._read_waiter = None
        if self._buf:
            data = bytes(self._buf[:n])
            del self._buf[:n]
            # Window returned in proportion to what the reader took.
            share = self._buf_unacked if not self._buf else (self._buf_unacked * len(data)
                                                             // (len(data) + len(self._buf)))
            self._buf_unacked -= share
            self.conn.proto.acknowledge(self.stream_id, share)
            self.conn.flush()
            return data
        if self._error is not None:
            raise self._error
        return b""


class TunnelConnection(asyncio.BufferedProtocol):
    """The transport protocol of one tunnel, for the broker or the agent role.

    ``on_stream(stream)`` (agent) is called for each stream the broker opens; it must call
    :meth:`accept` or :meth:`refuse`. ``on_drain()`` (agent) when the broker asks to reconnect.
    ``on_lost`` is an optional protocol whose ``connection_lost`` is chained (used by the broker,
    which takes the transport over from aiohttp).
    """

    def __init__(self, role: str, settings: TunnelSettings | None = None, *,
                 on_stream: Callable[[TunnelStream], Any] | None = None,
                 on_drain: Callable[[], Any] | None = None,
                 name: str = "", logger: Any = None) -> None:
        self.settings = settings or TunnelSettings()
        self.proto = TunnelProtocol(role, self.settings)
        self.role = role
        self.name = name
        self.log = logger or log
        self._on_stream = on_stream
        self._on_drain = on_drain
        self._transport: asyncio.Transport | None = None
        self._recv = bytearray(RECV_BUFFER_BYTES)
        self._recv_view = memoryview(self._recv)
        self._write_paused = False
        self._flush_scheduled = False
        self._streams: dict[int, TunnelStream] = {}
        self._backlogged: set[TunnelStream] = set()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.rtt_s: float | None = None
        self.close_reason = ""
        self._ping_task: asyncio.Task[None] | None = None
        self.chained: asyncio.BaseProtocol | None = None
        self.bytes_in = 0
        self.bytes_out = 0

    # --- transport callbacks ---------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:  # uvloop's SSL transport is no Transport
        self._transport = transport
        tune_socket(transport)
        transport.set_write_buffer_limits(high=TRANSPORT_HIGH_WATER, low=TRANSPORT_LOW_WATER)
        self.proto.initiate()
        self.flush()
        self._ping_task = asyncio.get_running_loop().create_task(self._ping_loop())

    def start(self, transport: asyncio.Transport, initial: bytes = b"") -> None:
        """Take over an already-connected transport (after the HTTP/1.1 upgrade)."""
        transport.set_protocol(self)
        self.connection_made(transport)
        if initial:
            self._feed(initial)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._recv_view

    def buffer_updated(self, nbytes: int) -> None:
        self._feed(self._recv_view[:nbytes])

    # The receive and send paths below are flattened on purpose: each message crosses them
    # once per process, and every Python call there cost about a microsecond (cold caches
    # after a wake-up), a measurable part of a small round trip.

    def data_received(self, data: bytes) -> None:  # if a transport ignores BufferedProtocol
        self._feed(data)

    def _feed(self, data: bytes | memoryview) -> None:
        self.bytes_in += len(data)
        try:
            events = self.proto.receive_data(data)  # copies only what it keeps
        except TunnelProtocolError as exc:
            self._fail(str(exc))
            return
        streams = self._streams
        proto = self.proto
        for ev in events:
            if type(ev) is DataReceived:  # the common case, without _dispatch's chain
                st = streams.get(ev.stream_id)
                if st is None:
                    proto.acknowledge(ev.stream_id, ev.flow_controlled_length)
                    continue
                pipe = st._pipe
                if pipe is None:
                    self._guard(st, st._on_data, ev.data, ev.flow_controlled_length)
                    continue
                # TunnelStream._on_data + LocalPipe.deliver, inlined (and guarded alike).
                st.bytes_in += len(ev.data)
                t = pipe.transport
                delivered = True  # a closing local side drops the bytes: window back at once
                if t is not None and not t.is_closing():
                    try:
                        t.write(ev.data)
                    except Exception as exc:  # a broken local socket must not end the tunnel
                        self._stream_failed(st, exc)
                        continue
                    delivered = not pipe._paused
                if delivered:
                    proto.acknowledge(ev.stream_id, ev.flow_controlled_length)
                else:
                    st._held_acks += ev.flow_controlled_length
            else:
                self._dispatch(ev)
        if proto._ready or proto._out or proto._local_events or proto._h2._data_to_send:
            self.flush()

    def eof_received(self) -> bool:
        self.close_reason = self.close_reason or "peer closed the tunnel"
        return False

    def _fail(self, reason: str) -> None:
        self.close_reason = reason
        self.log.warning("tunnel %s: %s; closing it", self.name, reason)
        self.abort()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.close_reason:
            self.close_reason = f"tunnel connection lost: {exc}" if exc else "tunnel closed"
        self.proto.closed = True
        self._transport = None
        for stream in list(self._streams.values()):
            stream._on_reset(f"tunnel to the container went away ({self.close_reason})", 503)
        self._streams.clear()
        if self._ping_task is not None:
            self._ping_task.cancel()
        if not self.closed.done():
            self.closed.set_result(None)
        chained, self.chained = self.chained, None
        if chained is not None:
            with contextlib.suppress(Exception):
                chained.connection_lost(exc)

    # --- events ----------------------------------------------------------------------------

    def _dispatch(self, ev: Event) -> None:
        if isinstance(ev, DataReceived):
            st = self._streams.get(ev.stream_id)
            if st is None:
                self.proto.acknowledge(ev.stream_id, ev.flow_controlled_length)
            else:
                self._guard(st, st._on_data, ev.data, ev.flow_controlled_length)
        elif isinstance(ev, StreamRequested):
            st = TunnelStream(self, ev.stream_id, ev.target, ev.headers)
            self._streams[ev.stream_id] = st
            if self._on_stream is None:
                self.proto.refuse_stream(ev.stream_id, 501, "no stream handler")
                self._streams.pop(ev.stream_id, None)
            else:
                self._guard(st, self._on_stream, st)
        elif isinstance(ev, StreamAccepted):
            st = self._streams.get(ev.stream_id)
            if st is not None and not st.accepted.done():
                st.accepted.set_result(None)
        elif isinstance(ev, StreamRefused):
            st = self._streams.get(ev.stream_id)
            if st is not None:
                st._on_reset(ev.reason or f"refused with status {ev.status}", ev.status)
        elif isinstance(ev, StreamEnded):
            st = self._streams.get(ev.stream_id)
            if st is not None:
                self._guard(st, st._on_end)
        elif isinstance(ev, StreamReset):
            st = self._streams.get(ev.stream_id)
            if st is not None:
                st._on_reset(f"stream reset by peer (code {ev.error_code})")
        elif isinstance(ev, StreamClosed):
            st = self._streams.get(ev.stream_id)
            if st is not None:
                st._on_closed()
        elif isinstance(ev, PingAcked):
            self.rtt_s = asyncio.get_running_loop().time() - ev.sent_at
        elif isinstance(ev, DrainRequested):
            if self._on_drain is not None:
                self._on_drain()
        elif isinstance(ev, ConnectionTerminated):
            self.close_reason = f"peer ended the tunnel ({ev.reason or ev.error_code})"
            self.close()

    def _guard(self, st: TunnelStream, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:  # a broken local socket must not take the tunnel down
            self._stream_failed(st, exc)

    def _stream_failed(self, st: TunnelStream, exc: Exception) -> None:
        self.log.debug("stream %d failed: %s", st.stream_id, exc)
        self.proto.reset_stream(st.stream_id)
        st._on_reset(f"stream failed: {exc}")

    # --- output ----------------------------------------------------------------------------

    def flush(self) -> None:
        """Pump queued stream data (within the transport's budget) and write it out."""
        t = self._transport
        if t is None:
            return
        proto = self.proto
        if proto._ready and not self._write_paused:  # has_pending
            # One byte past the high-water mark at most, so that a full transport pauses us
            # (and resume_writing() brings us back).
            budget = TRANSPORT_HIGH_WATER + 1 - t.get_write_buffer_size()
            moved = 0
            while budget > 0 and not self._write_paused:
                # Written in slices, so that every buffer on the way (the joined frames, the
                # TLS records) stays under glibc's mmap threshold (128 KiB).
                moved = self.proto.pump(min(budget, WRITE_SLICE_BYTES))
                if not moved:
                    break
                budget -= moved
                self._write_out(t)
            if moved and self.proto.has_pending:
                # The transport took everything (it may write straight to the socket and never
                # pause us): come back on the next loop pass. If the windows are what stops us,
                # pump() sends nothing and the peer's WINDOW_UPDATE wakes us instead.
                self._schedule_flush()
        data = proto.data_to_send()
        if data:
            self.bytes_out += len(data)
            t.write(data)
        if proto._local_events:
            for ev in proto.take_events():
                self._dispatch(ev)
        if self._backlogged:
            for st in list(self._backlogged):
                if not st.backlogged or st.error is not None:
                    self._backlogged.discard(st)
                    st._on_writable()

    def _write_out(self, t: asyncio.Transport) -> None:
        data = self.proto.data_to_send()
        if data:
            self.bytes_out += len(data)
            t.write(data)

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._deferred_flush)

    def _deferred_flush(self) -> None:
        self._flush_scheduled = False
        self.flush()

    # --- streams ---------------------------------------------------------------------------

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    async def open_stream(self, target: str, headers: dict[str, str] | None = None,
                          timeout_s: float = 20.0) -> TunnelStream:
        """(broker) Open a stream to ``target`` and wait until the agent accepted it."""
        if self.closed.done() or self.proto.draining:
            raise StreamError("tunnel is closing", 503)
        try:
            sid = self.proto.open_stream(target, headers)
        except TunnelProtocolError as exc:
            raise StreamError(str(exc), 503) from exc
        st = TunnelStream(self, sid, target)
        self._streams[sid] = st
        self.flush()
        try:
            async with asyncio.timeout(timeout_s):  # not wait_for(): it can lose a cancel
                await asyncio.shield(st.accepted)
        except TimeoutError:
            st.abort()
            raise StreamError("the container gateway did not answer in time", 504) from None
        return st

    def accept(self, st: TunnelStream) -> None:
        """(agent) The stream's target is connected."""
        self.proto.accept_stream(st.stream_id)
        if not st.accepted.done():
            st.accepted.set_result(None)
        self.flush()

    def refuse(self, st: TunnelStream, status: int, reason: str) -> None:
        """(agent) The stream's target cannot be reached."""
        self.proto.refuse_stream(st.stream_id, status, reason)
        self._streams.pop(st.stream_id, None)
        st._on_reset(reason, status)
        self.flush()

    # --- liveness and shutdown -------------------------------------------------------------

    async def _ping_loop(self) -> None:
        loop = asyncio.get_running_loop()
        s = self.settings
        while True:
            await asyncio.sleep(s.ping_interval_s)
            now = loop.time()
            late = [t for t in self.proto.outstanding_pings if now - t > s.ping_timeout_s]
            if late:
                self.close_reason = f"no answer to ping for {s.ping_timeout_s:.0f}s"
                self.log.warning("tunnel %s: %s, closing it", self.name, self.close_reason)
                self.abort()
                return
            self.proto.send_ping(now)
            self.flush()

    def drain(self) -> None:
        """(broker) Ask the agent to reconnect; streams in flight keep working."""
        self.proto.drain()
        self.flush()

    def close(self) -> None:
        """Close the tunnel politely (GOAWAY, then close the transport)."""
        if self._transport is None:
            return
        self.proto.close()
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        """Drop the tunnel at once."""
        if self._transport is not None:
            self._transport.abort()


class _ReadBuffer(threading.local):
    """One receive buffer per thread (per event loop), shared by every :class:`LocalPipe`.

    Sharing is safe because a transport fills the buffer and calls ``buffer_updated()``
    synchronously, and :meth:`LocalPipe.buffer_updated` copies the bytes out at once.
    """

    def __init__(self) -> None:
        self.view = memoryview(bytearray(READ_CHUNK_BYTES))


_read_buffer = _ReadBuffer()


class LocalPipe(asyncio.BufferedProtocol):
    """Splices a local transport (TCP socket, socketpair, hijacked HTTP connection) to a stream.

    A ``BufferedProtocol``: otherwise uvloop hands over a new bytes object of up to 256 KiB per
    read, over glibc's mmap threshold. ``data_received`` stays for transports that ignore
    buffered protocols.
    """

    def __init__(self, stream: TunnelStream, on_lost: Callable[[Exception | None], Any] | None
                 = None, *, defer: bool = False) -> None:
        self.stream = stream
        self._defer = defer
        # uvloop starts reading right after connection_made() even if it paused reading, so a
        # deferred pipe keeps what arrives early and replays it on activate().
        self._early: list[bytes] = []
        self._early_eof = False
        self.transport: asyncio.Transport | None = None
        self._paused = False  # the local transport paused our writes into it
        self._reading_paused = False
        self._on_lost = on_lost
        self._eof_sent = False

    def connection_made(self, transport: Any) -> None:  # uvloop's SSL transport is no Transport
        self.transport = transport
        tune_socket(transport, lowat=False)
        if self._defer:
            # The stream is not accepted yet: nothing may be sent on it before its headers.
            transport.pause_reading()
        else:
            self.stream.attach(self)

    def activate(self) -> None:
        """(deferred pipes) The stream was accepted: start moving bytes."""
        if self._defer and self.transport is not None:
            self._defer = False
            self.stream.attach(self)
            early, self._early = self._early, []
            for chunk in early:
                self.data_received(chunk)
            if self._early_eof:
                self.eof_received()
            self.transport.resume_reading()

    def take_over(self, transport: asyncio.Transport, initial: bytes = b"") -> None:
        """Become the protocol of an already-connected transport."""
        transport.set_protocol(self)
        self.connection_made(transport)
        if initial:
            self.data_received(initial)

    # tunnel -> local
    def deliver(self, data: bytes) -> bool:
        t = self.transport
        if t is None or t.is_closing():
            return True
        t.write(data)
        return not self._paused

    def deliver_eof(self) -> None:
        t = self.transport
        if t is None or t.is_closing() or self._eof_sent:
            return
        self._eof_sent = True
        try:
            if t.can_write_eof():
                t.write_eof()
            else:
                t.close()
        except OSError:  # peer already gone (ENOTCONN): close instead
            t.close()
        self._maybe_close()

    def abort(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            # Let what is buffered go out first, then close: the user sees a clean EOF.
            t.close()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self.stream.release_held_acks()

    # local -> tunnel
    def get_buffer(self, sizehint: int) -> memoryview:
        return _read_buffer.view

    def buffer_updated(self, nbytes: int) -> None:
        data = bytes(_read_buffer.view[:nbytes])
        if self._defer:
            self._early.append(data)
            return
        t = self.transport
        if (self.stream._write(data) and t is not None
                and (not self._reading_paused or t.is_reading())):
            self._reading_paused = True
            t.pause_reading()

    def data_received(self, data: bytes) -> None:
        if self._defer:
            self._early.append(data)
            return
        # Asks the transport, not our flag: whoever handed us the transport may resume its
        # reading after we paused it (uvloop even starts reading after connection_made()).
        t = self.transport
        if (self.stream._write(data) and t is not None
                and (not self._reading_paused or t.is_reading())):
            self._reading_paused = True
            t.pause_reading()

    def resume_local_reading(self) -> None:
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            with contextlib.suppress(Exception):
                self.transport.resume_reading()

    def eof_received(self) -> bool:
        if self._defer:
            self._early_eof = True
            return True
        self.stream.write_eof()
        self._maybe_close()
        return True

    def _maybe_close(self) -> None:
        # Both directions ended: nothing more to do with the local socket.
        if self._eof_sent and self.stream.local_ended and self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        st = self.stream
        if exc is not None:
            st.abort()
        elif not st.local_ended:
            st.write_eof()
        self.transport = None
        if self._on_lost is not None:
            with contextlib.suppress(Exception):
                self._on_lost(exc)
