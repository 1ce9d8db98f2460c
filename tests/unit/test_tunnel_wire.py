"""The DATA/flow-control fast path of tunnel/protocol.py against a plain h2 peer (no sockets).

TunnelProtocol frames DATA and WINDOW_UPDATE itself and keeps its own windows; these tests pin
that down against an unmodified ``h2`` connection on the other side, which raises on any
framing or flow-control mistake (a window overrun, an overflowing WINDOW_UPDATE, a frame on a
closed stream).
"""

from __future__ import annotations

import random

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

from tunnel.protocol import (
    DataReceived,
    StreamAccepted,
    StreamEnded,
    StreamReset,
    TunnelProtocol,
    TunnelProtocolError,
    TunnelSettings,
)

SMALL = TunnelSettings(stream_window_bytes=64 * 1024, connection_window_bytes=256 * 1024,
                       max_frame_bytes=16 * 1024)


class PlainAgent:
    """A bare h2 server playing the agent: accepts CONNECT, echoes events back to the test."""

    def __init__(self, window: int = 65535) -> None:
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding="utf-8"))
        self.h2.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.h2.initiate_connection()
        self.data: dict[int, bytearray] = {}
        self.ended: set[int] = set()

    def feed(self, data: bytes, ack: bool = True) -> None:
        for ev in self.h2.receive_data(data):
            if isinstance(ev, h2.events.RequestReceived):
                assert ev.stream_id is not None
                self.h2.send_headers(ev.stream_id, [(":status", "200")])
                self.data[ev.stream_id] = bytearray()
            elif isinstance(ev, h2.events.DataReceived):
                assert ev.stream_id is not None
                self.data[ev.stream_id] += ev.data
                if ack:
                    self.h2.acknowledge_received_data(ev.flow_controlled_length,
                                                      ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                assert ev.stream_id is not None
                self.ended.add(ev.stream_id)


def shuttle(broker: TunnelProtocol, agent: PlainAgent, events: list[object],
            ack: bool = True) -> None:
    for _ in range(50):
        a = broker.data_to_send()
        if a:
            agent.feed(a, ack)
        b = agent.h2.data_to_send()
        if b:
            for ev in broker.receive_data(b):
                events.append(ev)
                if isinstance(ev, DataReceived) and ack:
                    broker.acknowledge(ev.stream_id, ev.flow_controlled_length)
        if not a and not b:
            return


def connected(settings: TunnelSettings = SMALL, window: int = 65535
              ) -> tuple[TunnelProtocol, PlainAgent, int, list[object]]:
    broker = TunnelProtocol("broker", settings)
    broker.initiate()
    agent = PlainAgent(window)
    events: list[object] = []
    shuttle(broker, agent, events)
    sid = broker.open_stream("container:80")
    shuttle(broker, agent, events)
    assert StreamAccepted(sid) in events
    return broker, agent, sid, events


def test_bulk_to_a_plain_h2_peer_respects_its_windows() -> None:
    broker, agent, sid, events = connected()
    data = random.Random(5).randbytes(1 << 20)  # 16 stream windows of the peer
    broker.send_data(sid, data)
    broker.end_stream(sid)
    for _ in range(400):
        broker.pump(32 * 1024)
        shuttle(broker, agent, events)  # h2 raises if we overran a window
        if sid in agent.ended:
            break
    assert bytes(agent.data[sid]) == data


def test_sender_stops_at_a_plain_h2_peers_window_until_it_gives_some_back() -> None:
    broker, agent, sid, events = connected(window=20000)
    broker.send_data(sid, b"x" * 100000)
    for _ in range(5):
        broker.pump(1 << 20)
        shuttle(broker, agent, events, ack=False)
    assert len(agent.data[sid]) == 20000


def test_data_from_a_plain_h2_peer_is_acknowledged_without_overflowing_its_windows() -> None:
    broker, agent, sid, events = connected()
    sent = bytearray()
    rng = random.Random(7)
    # Several windows' worth, in frames of every size, some padded, the last ending the stream.
    while len(sent) < 600 * 1024:
        window = min(agent.h2.local_flow_control_window(sid), 16 * 1024 - 256)
        if window <= 0:
            shuttle(broker, agent, events)
            continue
        chunk = rng.randbytes(rng.randint(1, window))
        pad = rng.choice([None, 0, 7, 200]) if len(chunk) + 201 <= window else None
        agent.h2.send_data(sid, chunk, pad_length=pad)
        sent += chunk
        shuttle(broker, agent, events)
    agent.h2.send_data(sid, b"end", end_stream=True)
    sent += b"end"
    shuttle(broker, agent, events)
    got = b"".join(e.data for e in events if isinstance(e, DataReceived))
    assert got == bytes(sent)
    assert StreamEnded(sid) in events


def test_frames_cut_at_any_byte_give_the_same_events() -> None:
    broker, agent, sid, events = connected()
    payload = random.Random(3).randbytes(40000)
    agent.h2.send_data(sid, payload[:15000])
    agent.h2.send_data(sid, payload[15000:30000], pad_length=10)
    agent.h2.send_data(sid, payload[30000:], end_stream=True)
    wire = agent.h2.data_to_send()
    rng = random.Random(11)
    pos = 0
    got: list[object] = []
    while pos < len(wire):
        n = rng.choice([1, 2, 9, 10, 100, 5000])
        got += broker.receive_data(wire[pos:pos + n])
        pos += n
    assert b"".join(e.data for e in got if isinstance(e, DataReceived)) == payload
    assert StreamEnded(sid) in got


def test_a_peer_that_overruns_the_stream_window_gets_the_stream_reset() -> None:
    broker, agent, sid, events = connected()
    # A hand-made DATA frame sequence beyond our 64 KiB stream window (a plain h2 peer would
    # not send it): the stream is reset, the tunnel lives on.
    frame = (16 * 1024).to_bytes(3, "big") + b"\x00\x00" + sid.to_bytes(4, "big")
    out: list[object] = []
    for _ in range(5):
        out += broker.receive_data(frame + b"\x00" * (16 * 1024))
    assert any(isinstance(e, StreamReset) and e.stream_id == sid for e in out)
    assert not broker.closed


def test_a_window_update_that_overflows_the_connection_window_is_an_error() -> None:
    broker, _, _, _ = connected()
    bad = (4).to_bytes(3, "big") + b"\x08\x00" + (0).to_bytes(4, "big") + (2**31 - 1).to_bytes(
        4, "big")
    with pytest.raises(TunnelProtocolError, match="WINDOW_UPDATE"):
        broker.receive_data(bad)


def test_a_smaller_initial_window_from_the_peer_shrinks_open_streams() -> None:
    broker, agent, sid, events = connected(window=65535)
    agent.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1000})
    shuttle(broker, agent, events)
    broker.send_data(sid, b"y" * 5000)
    for _ in range(3):
        broker.pump(1 << 20)
        shuttle(broker, agent, events, ack=False)
    assert len(agent.data[sid]) == 1000  # h2 would have raised had we sent more


def our_pair(settings: TunnelSettings) -> tuple[TunnelProtocol, TunnelProtocol]:
    broker, agent = TunnelProtocol("broker", settings), TunnelProtocol("agent", settings)
    broker.initiate()
    agent.initiate()
    for _ in range(4):
        agent.receive_data(broker.data_to_send())
        broker.receive_data(agent.data_to_send())
    return broker, agent


def open_on(broker: TunnelProtocol, agent: TunnelProtocol) -> int:
    sid = broker.open_stream("container:80")
    for ev in agent.receive_data(broker.data_to_send()):
        if type(ev).__name__ == "StreamRequested":
            agent.accept_stream(sid)
    broker.receive_data(agent.data_to_send())
    return sid


def sent_without_acks(broker: TunnelProtocol, agent: TunnelProtocol, sid: int) -> int:
    """Pump until the sender stops (the agent reads but never gives window back)."""
    total = 0
    for _ in range(100):
        moved = broker.pump(1 << 30)
        for ev in agent.receive_data(broker.data_to_send()):
            if isinstance(ev, DataReceived) and ev.stream_id == sid:
                total += len(ev.data)
        if not moved:
            break
    return total


CAPPED = TunnelSettings(stream_window_bytes=1 << 20, contended_in_flight_bytes=128 * 1024,
                        contention_horizon_bytes=8 << 20)


def test_a_lone_stream_may_fill_the_whole_window() -> None:
    broker, agent = our_pair(CAPPED)
    bulk = open_on(broker, agent)
    broker.send_data(bulk, b"b" * (4 << 20))
    assert sent_without_acks(broker, agent, bulk) == 1 << 20


def test_while_another_stream_talks_a_bulk_stream_keeps_little_in_flight() -> None:
    broker, agent = our_pair(CAPPED)
    bulk = open_on(broker, agent)
    key = open_on(broker, agent)
    broker.send_data(key, b"k")  # an interactive stream spoke
    agent.receive_data(broker.data_to_send())
    broker.send_data(bulk, b"b" * (4 << 20))
    assert sent_without_acks(broker, agent, bulk) == 128 * 1024
    broker.send_data(key, b"k")  # the keystroke still goes out at once
    got = [e for e in agent.receive_data(broker.data_to_send()) if isinstance(e, DataReceived)]
    assert [(e.stream_id, e.data) for e in got] == [(key, b"k")]


def test_a_peer_with_lazy_window_updates_is_not_held_to_the_cap() -> None:
    # A plain h2 peer (or an agent from before the cap) gives window back only after half of
    # it was consumed; holding it to 128 KiB in flight would wait for an update forever.
    broker, agent, bulk, events = connected(CAPPED, window=1 << 20)
    key = broker.open_stream("container:81")
    shuttle(broker, agent, events)
    broker.send_data(key, b"k")  # two streams talk: contended
    data = random.Random(9).randbytes(3 << 20)
    broker.send_data(bulk, data)
    for _ in range(200):
        broker.pump(1 << 20)
        shuttle(broker, agent, events)
        if len(agent.data[bulk]) == len(data):
            break
    assert bytes(agent.data[bulk]) == data


def test_both_ends_announce_their_window_update_step() -> None:
    broker, agent = our_pair(CAPPED)
    assert broker._peer_ack_step == agent._stream_ack_threshold == 64 * 1024
    assert agent._peer_ack_step == broker._stream_ack_threshold
