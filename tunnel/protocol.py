"""The tunnel wire protocol, sans I/O: bytes in, events out, on top of ``h2``.

A tunnel is one TLS connection from crunch-run (the *agent*) to a controller (the *broker*):

1. The agent sends an HTTP/1.1 request (:func:`build_tunnel_request`)::

       POST /arvados/v1/connect/<uuid>/gateway_tunnel HTTP/1.1
       Upgrade: tunnel-h2
       Connection: Upgrade
       Content-Type: application/x-www-form-urlencoded

       auth_secret=<hex HMAC-SHA256(SystemRootToken, uuid)>

2. The broker answers ``101 Switching Protocols`` with ``X-Arvados-Internal-Url: <its URL>``.
3. From then on the roles are reversed: the broker is the HTTP/2 *client* and opens one
   ``CONNECT`` stream per shell or port connection (``:authority`` is the target, see
   :data:`SSH_TARGET`); the agent is the HTTP/2 *server* and answers ``:status 200`` (the stream
   is then an opaque bidirectional byte pipe) or a refusal status with an ``x-reason`` header.

Beyond plain h2 this module adds what the measurements in ``tunnel-performance.md`` asked for:

* Flow-control windows and frame sizes from :class:`TunnelSettings` (h2's 64 KiB defaults cost
  80% of the throughput); both ``local_settings`` *and* ``max_inbound_frame_size`` are set,
  because h2 caches the latter at construction (python-hyper/h2#1288).
* Outbound data is queued per stream inside this object and released by :meth:`pump` under a
  byte budget chosen by the I/O layer, round-robin across streams. A write to an idle stream
  (a keystroke, a small request) skips the queue, so a bulk transfer on one stream does not put
  its whole window in front of it.
* An application PING whose acknowledgement carries the caller's send time
  (:class:`PingAcked`), so the I/O layer measures the round trip and enforces a deadline.
* A graceful *drain* notice (GOAWAY, ``NO_ERROR``, last stream ``2**31-1``, debug data
  ``reconnect``): RFC 9113 section 6.8's first phase. The agent answers by dialling a new tunnel
  while streams in flight finish on the old one. h2 treats any GOAWAY as terminal, so the notice
  is written as a raw frame and intercepted on receipt (:class:`_DrainAwareH2`).

No sockets, clocks or sleeps here: callers pass the time where one is needed.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hyperframe.frame

from tunnel.errors import TunnelError

UPGRADE_TOKEN = "tunnel-h2"
INTERNAL_URL_HEADER = "X-Arvados-Internal-Url"
SSH_TARGET = "ssh.gateway:22"
"""``:authority`` of a stream that lands on the gateway's SSH server."""
PORT_TARGET_HOST = "container"
"""Streams for ``container:<port>`` go to that port inside the container."""
LOG_TARGET = "log.gateway:80"
"""``:authority`` of a stream that carries one HTTP/1.1 request to the live-log WebDAV server."""
DRAIN_DEBUG_DATA = b"reconnect"
MAX_STREAM_ID = 2**31 - 1
REASON_HEADER = "x-reason"


def _short_raw_data_repr(data: bytes | None) -> str:
    # hyperframe hexlifies a whole DATA payload to show 20 characters of it, and h2 calls repr()
    # on every received frame even when nobody logs it: 35% of the receiver's CPU at 1 MiB
    # frames (tunnel-performance.md section 3). Look at the first 10 bytes only.
    if not data:
        return "None"
    head = bytes(data[:10]).hex()
    return "<hex:" + head + ("..." if len(data) > 10 else "") + ">"


hyperframe.frame._raw_data_repr = _short_raw_data_repr


class TunnelProtocolError(TunnelError):
    """The peer broke the tunnel protocol (bad handshake, bad frames, unknown stream)."""

    status = 502


# --- handshake ------------------------------------------------------------------------------------


def gateway_auth_secret(system_root_token: str, container_uuid: str) -> str:
    """hex HMAC-SHA256(key=SystemRootToken, msg=container UUID), as every dispatcher computes it."""
    return hmac.new(system_root_token.encode(), container_uuid.encode(), hashlib.sha256).hexdigest()


def check_auth_secret(system_root_token: str, container_uuid: str, given: str) -> bool:
    """Constant-time check of a tunnel registration secret. Empty root token never matches."""
    if not system_root_token or not given:
        return False
    want = gateway_auth_secret(system_root_token, container_uuid)
    return hmac.compare_digest(want.encode(), given.strip().lower().encode())


def tunnel_path(container_uuid: str) -> str:
    """The registration path (the ``/connect/`` form, as crunch-run uses)."""
    return f"/arvados/v1/connect/{container_uuid}/gateway_tunnel"


def build_tunnel_request(host: str, container_uuid: str, auth_secret: str,
                         token: str = "") -> bytes:
    """The agent's HTTP/1.1 upgrade request; ``host`` is the ``Host`` header value."""
    body = ("auth_secret=" + quote(auth_secret, safe="")).encode()
    lines = [
        f"POST {tunnel_path(container_uuid)} HTTP/1.1",
        f"Host: {host}",
        f"Upgrade: {UPGRADE_TOKEN}",
        "Connection: Upgrade",
        "Content-Type: application/x-www-form-urlencoded",
        f"Content-Length: {len(body)}",
    ]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def build_upgrade_request(host: str, path: str, upgrade: str, token: str,
                          form: dict[str, str], extra_headers: dict[str, str] | None = None
                          ) -> bytes:
    """A generic ``POST`` + ``Upgrade`` request with a form body (shell and C1->C2 use it)."""
    body = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in form.items()).encode()
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}",
        f"Upgrade: {upgrade}",
        "Connection: Upgrade",
        "Content-Type: application/x-www-form-urlencoded",
        f"Content-Length: {len(body)}",
    ]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    for k, v in (extra_headers or {}).items():
        lines.append(f"{k}: {v}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def parse_form(body: bytes) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body as a dict (last value wins)."""
    return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))


@dataclass
class HttpResponseHead:
    """Status line and headers of an HTTP/1.1 response (header names lower-cased)."""

    status: int
    reason: str
    headers: dict[str, str]
    raw: bytes

    def header(self, name: str, default: str = "") -> str:
        return self.headers.get(name.lower(), default)


class ResponseHeadParser:
    """Incremental parser for an HTTP/1.1 response head (the 101, or an error).

    ``feed(data)`` returns ``None`` until the blank line arrives, then the head; the bytes after
    it (already part of the upgraded protocol, or the error body) are in ``rest``.
    """

    MAX_HEAD = 64 * 1024

    def __init__(self) -> None:
        self._buf = bytearray()
        self.rest = b""
        self.head: HttpResponseHead | None = None

    def feed(self, data: bytes) -> HttpResponseHead | None:
        if self.head is not None:
            self.rest += data
            return self.head
        self._buf += data
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > self.MAX_HEAD:
                raise TunnelProtocolError("response head too long")
            return None
        raw = bytes(self._buf[: end + 4])
        self.rest = bytes(self._buf[end + 4:])
        self._buf.clear()
        self.head = parse_response_head(raw)
        return self.head


def parse_response_head(raw: bytes) -> HttpResponseHead:
    """Parse ``HTTP/1.1 101 Switching Protocols\\r\\nName: value\\r\\n...``."""
    text = raw.decode("latin-1")
    lines = text.split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise TunnelProtocolError(f"not an HTTP/1.1 response: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise TunnelProtocolError(f"bad response header line: {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    return HttpResponseHead(int(parts[1]), parts[2] if len(parts) > 2 else "", headers, raw)


# --- settings -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TunnelSettings:
    """Flow control, frame size and liveness settings of one tunnel (both ends).

    The defaults were chosen by measurement on a 2-core machine (``bench/tunnel.py`` and
    ``tunnel-performance.md``): throughput stops improving at about a 1 MiB stream window and
    64 KiB frames, while the delay a small request sees behind a bulk transfer grows with the
    window; :meth:`TunnelProtocol.pump` keeps the queue ahead of it short instead.
    """

    stream_window_bytes: int = 1 << 20
    connection_window_bytes: int = 16 << 20
    max_frame_bytes: int = 64 << 10
    max_concurrent_streams: int = 256
    # A write of at most this size to a stream with nothing queued bypasses the pump budget.
    interactive_write_bytes: int = 16 << 10
    # While more than one stream sends, each keeps at most this much unacknowledged data in
    # flight (the peer's window may allow more): what sits in the peer's receive queue is what
    # a keystroke on another stream waits behind. "While" means: another stream sent within
    # the last contention_horizon_bytes of DATA on this tunnel.
    contended_in_flight_bytes: int = 256 << 10
    contention_horizon_bytes: int = 4 << 20
    ping_interval_s: float = 15.0
    ping_timeout_s: float = 20.0


# --- events ---------------------------------------------------------------------------------------


class Event:
    """Base class of everything :meth:`TunnelProtocol.receive_data` returns."""


@dataclass
class StreamRequested(Event):
    """(agent) The broker opened a stream to ``target`` (``host:port``)."""

    stream_id: int
    target: str
    headers: dict[str, str]


@dataclass
class StreamAccepted(Event):
    """(broker) The agent connected the stream to its target."""

    stream_id: int


@dataclass
class StreamRefused(Event):
    """(broker) The agent could not connect the stream; ``reason`` is for the user."""

    stream_id: int
    status: int
    reason: str


@dataclass(slots=True)
class DataReceived(Event):
    """Bytes for a stream. Call :meth:`TunnelProtocol.acknowledge` once they are consumed."""

    stream_id: int
    data: bytes
    flow_controlled_length: int


@dataclass
class StreamEnded(Event):
    """The peer will send nothing more on this stream (half-close)."""

    stream_id: int


@dataclass
class StreamReset(Event):
    """The stream is gone (peer reset, or refused); discard its state."""

    stream_id: int
    error_code: int


@dataclass
class StreamClosed(Event):
    """Both directions of the stream have ended normally."""

    stream_id: int


@dataclass
class PingAcked(Event):
    """The peer answered our PING; ``sent_at`` is the time given to :meth:`send_ping`."""

    sent_at: float


@dataclass
class DrainRequested(Event):
    """(agent) The broker is going away: dial a new tunnel, let current streams finish."""

    reason: str


@dataclass
class ConnectionTerminated(Event):
    """The peer closed the tunnel (GOAWAY). Everything on it is over."""

    error_code: int
    reason: str


def _header_dict(headers: Any) -> dict[str, str]:
    """h2 headers (str with header_encoding set) as a dict."""
    out: dict[str, str] = {}
    for k, v in headers or []:
        key = k.decode() if isinstance(k, bytes) else str(k)
        out[key] = v.decode() if isinstance(v, bytes) else str(v)
    return out


# --- the h2 subclass that understands a drain notice ---------------------------------------------


class _DrainAwareH2(h2.connection.H2Connection):
    """H2Connection that reports a drain-phase GOAWAY instead of closing the connection."""

    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config=config)
        self.drain_notices: list[str] = []
        self._frame_dispatch_table[hyperframe.frame.GoAwayFrame] = self._goaway_or_drain

    def _goaway_or_drain(self, frame: hyperframe.frame.GoAwayFrame) -> tuple[list[Any], list[Any]]:
        if (frame.error_code == 0 and frame.last_stream_id == MAX_STREAM_ID
                and frame.additional_data == DRAIN_DEBUG_DATA):
            self.drain_notices.append(frame.additional_data.decode())
            return [], []
        return self._receive_goaway_frame(frame)


# --- the protocol object --------------------------------------------------------------------------

# Frame types and flags this module reads or writes itself (RFC 9113 section 6).
_DATA = 0x0
_HEADERS = 0x1
_PUSH_PROMISE = 0x5
_WINDOW_UPDATE = 0x8
_CONTINUATION = 0x9
_END_STREAM = 0x1
_END_HEADERS = 0x4
_PADDED = 0x8
_FRAME_HEAD = struct.Struct(">IBI")  # (length << 8 | type), flags, stream id
_WINDOW_INCREMENT = struct.Struct(">I")
_MAX_WINDOW = 2**31 - 1
_CLIENT_MAGIC_LEN = 24
# A private SETTINGS parameter (peers that do not know it ignore it, RFC 9113 6.5.2): the
# window-update step this end uses. The contention cap is only safe against a peer that gives
# window back in steps at most half the cap; h2's default waits for half the window, and an
# older agent would then never answer a capped sender. (hyperframe writes setting ids as one
# byte, so the id is below 256; 0xf7 is unassigned.)
SETTING_WINDOW_UPDATE_STEP = 0xF7


def _frame_head(length: int, ftype: int, flags: int, stream_id: int) -> bytes:
    return _FRAME_HEAD.pack((length << 8) | ftype, flags, stream_id)


def _window_update(stream_id: int, increment: int) -> bytes:
    return _frame_head(4, _WINDOW_UPDATE, 0, stream_id) + _WINDOW_INCREMENT.pack(increment)


@dataclass
class _Stream:
    pending: deque[memoryview] = field(default_factory=deque)
    pending_bytes: int = 0
    end_after_pending: bool = False
    local_ended: bool = False
    remote_ended: bool = False
    accepted: bool = False
    out_window: int = 65535  # what the peer still lets us send on this stream
    in_window: int = 65535  # what we still let the peer send
    in_unacked: int = 0  # consumed by the application, not yet given back to the peer
    in_flight: int = 0  # sent and not yet given back by the peer


class TunnelProtocol:
    """One end of a tunnel after the upgrade. ``role`` is ``"broker"`` or ``"agent"``.

    Call :meth:`initiate` once, then loop: feed received bytes to :meth:`receive_data`, handle
    the events, call :meth:`pump` with a budget when the transport can take more, and write
    :meth:`data_to_send` out.

    DATA frames and flow control (WINDOW_UPDATE, both directions) are handled here rather than
    by h2: h2's per-frame bookkeeping cost about 100 microseconds per frame on the project
    machine, half of a small round trip's CPU (docs/tunnel.md, "Why these settings").
    Everything else (SETTINGS, HEADERS/HPACK and stream states, RST_STREAM, PING, GOAWAY, and
    DATA on streams this object does not know) still goes through h2, which therefore never
    sees a DATA frame's payload nor a window change; the end of a stream reaches h2 as an empty
    ``END_STREAM`` DATA frame so its stream state machine stays exact.
    """

    def __init__(self, role: str, settings: TunnelSettings | None = None) -> None:
        if role not in ("broker", "agent"):
            raise ValueError(f"role must be 'broker' or 'agent', not {role!r}")
        self.role = role
        self.settings = settings or TunnelSettings()
        config = h2.config.H2Configuration(
            client_side=(role == "broker"), header_encoding="utf-8",
            validate_inbound_headers=True,
        )
        self._h2 = _DrainAwareH2(config)
        self._streams: dict[int, _Stream] = {}
        self._ready: deque[int] = deque()  # streams with pending data, round-robin order
        self._pings: dict[bytes, float] = {}
        self._ping_seq = 0
        self._out: list[bytes | memoryview] = []
        self._local_events: list[Event] = []
        # First bytes from the peer, until its preface is checked (None afterwards).
        self._head: bytearray | None = bytearray()
        self._magic_left = _CLIENT_MAGIC_LEN if role == "agent" else 0
        self._starting = True  # preface not checked or client magic not passed on yet
        self._is_agent = role == "agent"
        self._max_frame = self.settings.max_frame_bytes
        self._partial = bytearray()  # an incomplete frame from the previous receive_data()
        self._in_header_block = False  # HEADERS without END_HEADERS: only CONTINUATION may follow
        # Connection-level flow control (RFC 9113 section 6.9), both directions.
        self._out_window = 65535
        self._in_window = 65535
        self._in_unacked = 0
        self._peer_initial_window = 65535
        self._peer_ack_step = 0  # the peer's SETTING_WINDOW_UPDATE_STEP; 0: not announced
        self._data_sent = 0  # DATA bytes sent on the tunnel so far
        self._last_sender = 0  # the stream that sent the last DATA frame
        self._contended_until = 0  # _data_sent mark until which several streams count as busy
        s = self.settings
        # Give window back once an eighth of it was consumed: often enough that a sender that
        # holds itself to contended_in_flight_bytes keeps a frame in flight while the update
        # travels, rarely enough to stay a few frames per MiB.
        self._stream_ack_threshold = max(1, min(s.stream_window_bytes // 8,
                                                s.contended_in_flight_bytes // 2))
        self._conn_ack_threshold = max(1, s.connection_window_bytes // 4)
        self.draining = False
        self.closed = False

    # --- setup -------------------------------------------------------------------------------

    def initiate(self) -> None:
        """Queue the connection preface and our settings."""
        s = self.settings
        values = {
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: s.stream_window_bytes,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: s.max_frame_bytes,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        }
        if self.role == "agent":
            values[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = s.max_concurrent_streams
        values[SETTING_WINDOW_UPDATE_STEP] = self._stream_ack_threshold  # type: ignore[index]
        self._h2.local_settings = h2.settings.Settings(
            client=(self.role == "broker"), initial_values=values)
        # h2 caches this at construction; without it the first big frame is "overlong".
        self._h2.max_inbound_frame_size = s.max_frame_bytes
        self._h2.initiate_connection()
        extra = s.connection_window_bytes - 65535
        if extra > 0:
            self._h2.increment_flow_control_window(extra)
            self._in_window += extra

    # --- input -------------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed bytes from the peer; returns what happened. Raises TunnelProtocolError.

        ``data`` may be a view of a buffer the caller reuses: nothing keeps a reference to it.
        """
        if self.closed:
            return []
        out: list[Event] = self._local_events
        if out:
            self._local_events = []
        else:
            out = []
        view = memoryview(data)
        if self._starting:
            if self._head is not None:
                self._check_preface(view)
            if self._magic_left:
                n = min(self._magic_left, len(view))
                self._to_h2(view[:n], out)
                self._magic_left -= n
                view = view[n:]
            self._starting = self._head is not None or self._magic_left > 0
        if self._partial:
            view = self._complete_partial(view, out)
        end = len(view)
        pos = 0
        slow_from = -1  # start of a run of frames for h2, fed in one call
        max_len = self._max_frame
        streams = self._streams
        agent = self._is_agent
        while end - pos >= 9:
            head, flags, sid = _FRAME_HEAD.unpack_from(view, pos)
            length, ftype = head >> 8, head & 0xFF
            if length > max_len:
                self.closed = True
                raise TunnelProtocolError("tunnel peer sent an overlong frame")
            if end - pos - 9 < length:
                break
            if ftype == _DATA and not self._in_header_block:
                # The common case, inlined: DATA on an open stream.
                sid &= 0x7FFFFFFF
                st = streams.get(sid)
                if st is not None and not st.remote_ended and (agent or st.accepted):
                    if slow_from >= 0:
                        self._to_h2(view[slow_from:pos], out)
                        slow_from = -1
                    if not flags and length <= self._in_window and length <= st.in_window:
                        self._in_window -= length
                        st.in_window -= length
                        if length:
                            out.append(DataReceived(sid, bytes(view[pos + 9:pos + 9 + length]),
                                                    length))
                    else:  # padding, END_STREAM, or a window overrun
                        self._data_frame(view, pos, length, flags, sid, st, out)
                    pos += 9 + length
                    continue
            if self._fast_frame(view, pos, length, ftype, flags, sid, slow_from, out):
                slow_from = -1
            elif slow_from < 0:
                slow_from = pos
            pos += 9 + length
        if slow_from >= 0:
            self._to_h2(view[slow_from:pos], out)
        if pos < end:
            self._partial = bytearray(view[pos:])
        return out

    def _complete_partial(self, view: memoryview, out: list[Event]) -> memoryview:
        """Finish the frame cut by the previous read; returns the rest of ``view``."""
        p = self._partial
        if len(p) < 9:
            take = min(9 - len(p), len(view))
            p += view[:take]
            view = view[take:]
            if len(p) < 9:
                return view
        head, flags, sid = _FRAME_HEAD.unpack_from(p, 0)
        length, ftype = head >> 8, head & 0xFF
        if length > self.settings.max_frame_bytes:
            self.closed = True
            raise TunnelProtocolError("tunnel peer sent an overlong frame")
        take = min(9 + length - len(p), len(view))
        p += view[:take]
        view = view[take:]
        if len(p) == 9 + length:
            frame = memoryview(bytes(p))
            self._partial = bytearray()
            if not self._fast_frame(frame, 0, length, ftype, flags, sid, -1, out):
                self._to_h2(frame, out)
        return view

    def _fast_frame(self, view: memoryview, pos: int, length: int, ftype: int, flags: int,
                    sid: int, slow_from: int, out: list[Event]) -> bool:
        """Handle a DATA or WINDOW_UPDATE frame here; False: it is h2's (or it is an error).

        ``slow_from`` >= 0 means frames before this one still wait for h2: they are fed first,
        so events keep the order of the frames.
        """
        if self._in_header_block or ftype not in (_DATA, _WINDOW_UPDATE):
            if ftype in (_HEADERS, _PUSH_PROMISE, _CONTINUATION):
                self._in_header_block = not flags & _END_HEADERS
            return False
        sid &= 0x7FFFFFFF
        if ftype == _DATA:
            st = self._streams.get(sid)
            # Unknown or closed streams, and answers the broker has not accepted yet, go to
            # h2, which knows the rules for them (RST_STREAM, connection errors).
            if (st is None or st.remote_ended or (self.role == "broker" and not st.accepted)):
                return False
            if slow_from >= 0:
                self._to_h2(view[slow_from:pos], out)
            self._data_frame(view, pos, length, flags, sid, st, out)
            return True
        if slow_from >= 0:
            self._to_h2(view[slow_from:pos], out)
        self._window_update_frame(view, pos, length, sid)
        return True

    def _data_frame(self, view: memoryview, pos: int, length: int, flags: int, sid: int,
                    st: _Stream, out: list[Event]) -> None:
        start, stop = pos + 9, pos + 9 + length
        if not flags and length <= self._in_window and length <= st.in_window:
            self._in_window -= length
            st.in_window -= length
            if length:
                out.append(DataReceived(sid, bytes(view[start:stop]), length))
            return
        if flags & _PADDED:
            pad = view[start] if length else 0
            if not length or pad >= length:
                self.closed = True
                raise TunnelProtocolError("tunnel peer sent bad DATA padding")
            start, stop = start + 1, stop - pad
        if length > self._in_window:
            self.closed = True
            raise TunnelProtocolError("tunnel peer overran the connection flow-control window")
        self._in_window -= length
        if length > st.in_window:
            self._in_unacked += length  # the connection window still comes back
            self._forget(sid)
            self._safe_reset(sid, h2.errors.ErrorCodes.FLOW_CONTROL_ERROR)
            out.append(StreamReset(sid, int(h2.errors.ErrorCodes.FLOW_CONTROL_ERROR)))
            return
        st.in_window -= length
        if stop > start:
            out.append(DataReceived(sid, bytes(view[start:stop]), stop - start))
        overhead = length - max(0, stop - start)
        if overhead:  # padding: consumed at once
            self.acknowledge(sid, overhead)
        if flags & _END_STREAM:
            # h2 keeps the stream states: tell it about the end with an empty frame.
            self._to_h2(memoryview(_frame_head(0, _DATA, _END_STREAM, sid)), out)

    def _window_update_frame(self, view: memoryview, pos: int, length: int, sid: int) -> None:
        if length != 4:
            self.closed = True
            raise TunnelProtocolError("tunnel peer sent a malformed WINDOW_UPDATE")
        inc = _WINDOW_INCREMENT.unpack_from(view, pos + 9)[0] & 0x7FFFFFFF
        if sid == 0:
            if inc == 0 or self._out_window + inc > _MAX_WINDOW:
                self.closed = True
                raise TunnelProtocolError("tunnel peer sent a bad connection WINDOW_UPDATE")
            self._out_window += inc
            return
        st = self._streams.get(sid)
        if st is None:
            return  # closed (or never opened): nothing to send there any more
        if inc == 0 or st.out_window + inc > _MAX_WINDOW:
            self._forget(sid)
            code = (h2.errors.ErrorCodes.PROTOCOL_ERROR if inc == 0
                    else h2.errors.ErrorCodes.FLOW_CONTROL_ERROR)
            self._safe_reset(sid, code)
            self._local_events.append(StreamReset(sid, int(code)))
            return
        st.out_window += inc
        st.in_flight = max(0, st.in_flight - inc)

    def _to_h2(self, frames: memoryview, out: list[Event]) -> None:
        try:
            h2_events = self._h2.receive_data(bytes(frames))
        except h2.exceptions.ProtocolError as exc:
            self.closed = True
            raise TunnelProtocolError(f"tunnel peer broke HTTP/2: {exc}") from exc
        for ev in h2_events:
            self._translate(ev, out)
        while self._h2.drain_notices:
            out.append(DrainRequested(self._h2.drain_notices.pop(0)))

    def _check_preface(self, data: memoryview) -> None:
        """The peer's first frame must be SETTINGS (after the client magic, for the agent)."""
        assert self._head is not None
        magic = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" if self.role == "agent" else b""
        self._head += data[: len(magic) + 9 - len(self._head)]
        if len(self._head) < len(magic) + 9:
            if not (magic.startswith(bytes(self._head)) or bytes(self._head).startswith(magic)):
                self.closed = True
                raise TunnelProtocolError("tunnel peer did not start with the HTTP/2 preface")
            return
        header = bytes(self._head[len(magic):])
        if magic and bytes(self._head[: len(magic)]) != magic:
            self.closed = True
            raise TunnelProtocolError("tunnel peer did not start with the HTTP/2 preface")
        self._head = None
        length = int.from_bytes(header[:3], "big")
        if header[3] != 0x4 or length > self.settings.max_frame_bytes:
            self.closed = True
            raise TunnelProtocolError("tunnel peer did not start with an HTTP/2 SETTINGS frame")

    def _translate(self, ev: h2.events.Event, out: list[Event]) -> None:
        if isinstance(ev, h2.events.DataReceived):
            # Only DATA that h2 saw: on streams we do not know (or, at the broker, before the
            # agent answered). h2 counted it in its own windows; give them back through h2.
            sid = ev.stream_id
            assert sid is not None
            flow = ev.flow_controlled_length or 0
            if flow:
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self._h2.acknowledge_received_data(flow, sid)
            if sid in self._streams and ev.data:
                out.append(DataReceived(sid, ev.data, 0))
            if ev.stream_ended is not None:
                self._remote_end(sid, out)
        elif isinstance(ev, h2.events.RequestReceived):
            sid = ev.stream_id
            assert sid is not None
            headers = _header_dict(ev.headers)
            if self.role != "agent" or headers.get(":method") != "CONNECT":
                self._h2.reset_stream(sid, h2.errors.ErrorCodes.PROTOCOL_ERROR)
                return
            self._streams[sid] = self._new_stream()
            target = headers.get(":authority", "")
            extra = {k: v for k, v in headers.items() if not k.startswith(":")}
            out.append(StreamRequested(sid, target, extra))
            if ev.stream_ended is not None:
                self._remote_end(sid, out)
        elif isinstance(ev, h2.events.ResponseReceived):
            sid = ev.stream_id
            assert sid is not None
            headers = _header_dict(ev.headers)
            status = int(headers.get(":status", "0") or 0)
            st = self._streams.get(sid)
            if st is None:
                return
            if status == 200:
                st.accepted = True
                out.append(StreamAccepted(sid))
            else:
                out.append(StreamRefused(sid, status, headers.get(REASON_HEADER, "")))
                self._forget(sid)
                if not ev.stream_ended:
                    self._safe_reset(sid, h2.errors.ErrorCodes.CANCEL)
                return
            if ev.stream_ended is not None:
                self._remote_end(sid, out)
        elif isinstance(ev, h2.events.StreamEnded):
            assert ev.stream_id is not None
            self._remote_end(ev.stream_id, out)
        elif isinstance(ev, h2.events.StreamReset):
            sid = ev.stream_id
            assert sid is not None
            if sid in self._streams:
                self._forget(sid)
                out.append(StreamReset(sid, int(ev.error_code or 0)))
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            step = ev.changed_settings.get(SETTING_WINDOW_UPDATE_STEP)
            if step is not None and step.new_value:
                self._peer_ack_step = int(step.new_value)
            changed = ev.changed_settings.get(h2.settings.SettingCodes.INITIAL_WINDOW_SIZE)
            if changed is not None:
                # RFC 9113 6.9.2: a new initial window moves every open stream's window.
                delta = changed.new_value - self._peer_initial_window
                self._peer_initial_window = changed.new_value
                for st in self._streams.values():
                    st.out_window += delta
        elif isinstance(ev, h2.events.PingAckReceived):
            sent = self._pings.pop(bytes(ev.ping_data or b""), None)
            if sent is not None:
                out.append(PingAcked(sent))
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.closed = True
            reason = (ev.additional_data or b"").decode("utf-8", "replace")
            out.append(ConnectionTerminated(int(ev.error_code or 0), reason))
        # SettingsAcknowledged, PingReceived (h2 answers it), WindowUpdated (never: window
        # updates are ours): nothing to do

    def _new_stream(self) -> _Stream:
        return _Stream(out_window=self._peer_initial_window,
                       in_window=self.settings.stream_window_bytes)

    def _remote_end(self, sid: int, out: list[Event]) -> None:
        st = self._streams.get(sid)
        if st is None or st.remote_ended:
            return
        st.remote_ended = True
        out.append(StreamEnded(sid))
        self._maybe_closed(sid, out)

    def _maybe_closed(self, sid: int, out: list[Event] | None) -> None:
        st = self._streams.get(sid)
        if st is not None and st.remote_ended and st.local_ended:
            self._forget(sid)
            if out is not None:
                out.append(StreamClosed(sid))

    def _forget(self, sid: int) -> None:
        self._streams.pop(sid, None)

    # --- streams -----------------------------------------------------------------------------

    def open_stream(self, target: str, headers: dict[str, str] | None = None) -> int:
        """(broker) Open a CONNECT stream to ``target``; returns its id."""
        if self.role != "broker":
            raise TunnelProtocolError("only the broker opens streams")
        if self.closed:
            raise TunnelProtocolError("tunnel is closed")
        sid = self._h2.get_next_available_stream_id()
        hdrs = [(":method", "CONNECT"), (":authority", target)]
        hdrs += [(k.lower(), v) for k, v in (headers or {}).items()]
        try:
            self._h2.send_headers(sid, hdrs)
        except h2.exceptions.TooManyStreamsError as exc:
            raise TunnelProtocolError("too many streams open on this tunnel") from exc
        self._streams[sid] = self._new_stream()
        return sid

    def accept_stream(self, stream_id: int) -> None:
        """(agent) Tell the broker the stream is connected."""
        st = self._streams.get(stream_id)
        if st is None or self.closed:
            return
        st.accepted = True
        try:
            self._h2.send_headers(stream_id, [(":status", "200")])
        except h2.exceptions.ProtocolError:
            self._forget(stream_id)

    def refuse_stream(self, stream_id: int, status: int, reason: str) -> None:
        """(agent) Refuse the stream with an HTTP status and a short reason."""
        if stream_id not in self._streams:
            return
        self._forget(stream_id)
        try:
            self._h2.send_headers(stream_id, [(":status", str(status)),
                                              (REASON_HEADER, reason[:200])], end_stream=True)
        except h2.exceptions.ProtocolError:
            pass

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data`` for a stream. Small writes to an idle stream go out at once."""
        st = self._streams.get(stream_id)
        if st is None or st.local_ended or st.end_after_pending or not data or self.closed:
            return
        if not isinstance(data, bytes):
            data = bytes(data)  # the caller may reuse its buffer
        n = len(data)
        if not st.pending and n <= self.settings.interactive_write_bytes:
            # _sendable(), inlined: this is the path of every keystroke.
            room = min(st.out_window, self._out_window)
            if self._data_sent < self._contended_until and self._peer_ack_step:
                room = min(room, self._contended_cap() - st.in_flight)
            if n <= room:
                self._emit_data(stream_id, st, [data], n)
                return
        if not st.pending:
            self._ready.append(stream_id)
        st.pending.append(memoryview(data))
        st.pending_bytes += n

    def _emit_data(self, sid: int, st: _Stream, parts: list[memoryview] | list[bytes],
                   n: int) -> None:
        st.out_window -= n
        self._out_window -= n
        st.in_flight += n
        if self._last_sender != sid:
            if self._last_sender:
                self._contended_until = self._data_sent + self.settings.contention_horizon_bytes
            self._last_sender = sid
        self._data_sent += n
        if self._h2._data_to_send:  # frames h2 produced earlier (HEADERS, acks) go first
            self._out.append(self._h2.data_to_send())
        self._out.append(_FRAME_HEAD.pack(n << 8, 0, sid))  # DATA, no flags
        self._out.extend(parts)

    def end_stream(self, stream_id: int) -> None:
        """Half-close our direction once the queued data is out."""
        st = self._streams.get(stream_id)
        if st is None or st.local_ended or self.closed:
            return
        if st.pending:
            st.end_after_pending = True
            return
        self._end_now(stream_id, st)

    def _end_now(self, sid: int, st: _Stream) -> None:
        st.local_ended = True
        try:
            self._h2.end_stream(sid)
        except h2.exceptions.ProtocolError:  # stream or whole connection already closed
            self._forget(sid)
            return
        self._maybe_closed(sid, self._local_events)

    def take_events(self) -> list[Event]:
        """Events caused by our own calls (a stream closed by our end_stream); call after them."""
        out, self._local_events = self._local_events, []
        return out

    def reset_stream(self, stream_id: int, error_code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        """Abort a stream in both directions."""
        if stream_id in self._streams:
            self._forget(stream_id)
            self._safe_reset(stream_id, error_code)

    def _safe_reset(self, sid: int, code: int) -> None:
        try:
            self._h2.reset_stream(sid, code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass

    def acknowledge(self, stream_id: int, n: int) -> None:
        """Return ``n`` flow-controlled bytes of window: call when the data was consumed."""
        if n <= 0 or self.closed:
            return
        self._in_unacked += n
        if self._in_unacked >= self._conn_ack_threshold:
            self._in_window += self._in_unacked
            self._emit_raw(_window_update(0, self._in_unacked))
            self._in_unacked = 0
        st = self._streams.get(stream_id)
        if st is None or st.remote_ended:
            return  # the peer sends nothing more there: only the connection window matters
        st.in_unacked += n
        if st.in_unacked >= self._stream_ack_threshold:
            st.in_window += st.in_unacked
            self._emit_raw(_window_update(stream_id, st.in_unacked))
            st.in_unacked = 0

    def _emit_raw(self, frame: bytes) -> None:
        if self._h2._data_to_send:
            self._out.append(self._h2.data_to_send())
        self._out.append(frame)

    def buffered(self, stream_id: int) -> int:
        """Bytes queued on a stream and not yet framed (for backpressure)."""
        st = self._streams.get(stream_id)
        return st.pending_bytes if st is not None else 0

    def is_open(self, stream_id: int) -> bool:
        return stream_id in self._streams

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def _sendable(self, st: _Stream) -> int:
        n = min(st.out_window, self._out_window, self._h2.max_outbound_frame_size)
        if self._data_sent < self._contended_until and self._peer_ack_step:
            n = min(n, self._contended_cap() - st.in_flight)
        return n

    def _contended_cap(self) -> int:
        # Never below two of the peer's window-update steps, or it would never answer.
        return max(self.settings.contended_in_flight_bytes, 2 * self._peer_ack_step)

    def pump(self, budget: int) -> int:
        """Move up to ``budget`` bytes of queued data into frames, round-robin; returns bytes."""
        sent = 0
        if self.closed:
            return 0
        idle_rounds = 0
        while self._ready and sent < budget and idle_rounds < len(self._ready):
            sid = self._ready.popleft()
            st = self._streams.get(sid)
            if st is None or not st.pending:
                idle_rounds = 0
                continue
            n = min(self._sendable(st), budget - sent, st.pending_bytes)
            if n <= 0:
                self._ready.append(sid)
                idle_rounds += 1
                continue
            idle_rounds = 0
            self._emit_data(sid, st, self._take(st, n), n)
            sent += n
            if st.pending:
                self._ready.append(sid)
            elif st.end_after_pending:
                self._end_now(sid, st)
        return sent

    @staticmethod
    def _take(st: _Stream, n: int) -> list[memoryview]:
        # Queued writes are memoryviews: a frame is cut off them without copying (the one
        # copy happens when data_to_send() joins the frames).
        parts: list[memoryview] = []
        left = n
        while left:
            first = st.pending[0]
            if len(first) <= left:
                parts.append(st.pending.popleft())
                left -= len(first)
            else:
                parts.append(first[:left])
                st.pending[0] = first[left:]
                left = 0
        st.pending_bytes -= n
        return parts

    @property
    def has_pending(self) -> bool:
        """True when queued data waits for :meth:`pump` (and, maybe, for window)."""
        return bool(self._ready)

    # --- connection --------------------------------------------------------------------------

    def send_ping(self, now: float) -> None:
        """Send a PING; its ack comes back as :class:`PingAcked` carrying ``now``."""
        if self.closed:
            return
        self._ping_seq += 1
        payload = struct.pack(">Q", self._ping_seq)
        self._pings[payload] = now
        if len(self._pings) > 16:  # unanswered pings: keep the newest only
            for k in list(self._pings)[:-16]:
                del self._pings[k]
        self._h2.ping(payload)

    @property
    def outstanding_pings(self) -> list[float]:
        """Send times of the pings not answered yet (the caller enforces a deadline)."""
        return list(self._pings.values())

    def drain(self) -> None:
        """(broker) Ask the agent to reconnect elsewhere; current streams keep working."""
        if self.role != "broker" or self.draining or self.closed:
            return
        self.draining = True
        frame = hyperframe.frame.GoAwayFrame(0)
        frame.last_stream_id = MAX_STREAM_ID
        frame.error_code = 0
        frame.additional_data = DRAIN_DEBUG_DATA
        # Written beside h2 rather than through it: h2 would consider itself closed.
        self._emit_raw(frame.serialize())

    def close(self, error_code: int = 0, reason: str = "") -> None:
        """Send a final GOAWAY; nothing more can happen on this tunnel."""
        if self.closed:
            return
        self.closed = True
        try:
            self._h2.close_connection(error_code, reason.encode()[:200] or None)
        except h2.exceptions.ProtocolError:
            pass

    def data_to_send(self) -> bytes:
        """Bytes to write to the transport now."""
        # h2's own buffer is looked at first: data_to_send() would copy it even when empty.
        if self._h2._data_to_send:
            if not self._out:
                return self._h2.data_to_send()
            self._out.append(self._h2.data_to_send())
        elif not self._out:
            return b""
        out = b"".join(self._out)
        self._out.clear()
        return out

