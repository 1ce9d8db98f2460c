"""Pure tests of tunnel/protocol.py: two protocol objects wired back to back, no sockets."""

from __future__ import annotations

import random

import pytest

from tunnel.agent import backoff_delays
from tunnel.protocol import (
    DataReceived,
    DrainRequested,
    PingAcked,
    ResponseHeadParser,
    StreamAccepted,
    StreamClosed,
    StreamEnded,
    StreamRefused,
    StreamRequested,
    StreamReset,
    TunnelProtocol,
    TunnelProtocolError,
    TunnelSettings,
    build_tunnel_request,
    check_auth_secret,
    gateway_auth_secret,
    parse_form,
)

ROOT = "roottoken0123456789abcdefghijklmnopqrstuvwxyz"
UUID = "zzzzz-dz642-000000000000001"
OTHER = "zzzzz-dz642-000000000000002"


def pair(settings: TunnelSettings | None = None) -> tuple[TunnelProtocol, TunnelProtocol]:
    broker, agent = TunnelProtocol("broker", settings), TunnelProtocol("agent", settings)
    broker.initiate()
    agent.initiate()
    exchange(broker, agent)
    return broker, agent


def exchange(broker: TunnelProtocol, agent: TunnelProtocol, rounds: int = 4
             ) -> tuple[list[object], list[object]]:
    """Move bytes both ways until quiet; returns (events at broker, events at agent)."""
    at_b: list[object] = []
    at_a: list[object] = []
    for _ in range(rounds):
        a = broker.data_to_send()
        if a:
            at_a += agent.receive_data(a)
        b = agent.data_to_send()
        if b:
            at_b += broker.receive_data(b)
        if not a and not b:
            break
    return at_b, at_a


def open_accepted(broker: TunnelProtocol, agent: TunnelProtocol, target: str = "container:80"
                  ) -> int:
    sid = broker.open_stream(target, {"x-login-username": "root"})
    _, at_a = exchange(broker, agent)
    req = [e for e in at_a if isinstance(e, StreamRequested)]
    assert req and req[0].target == target and req[0].headers["x-login-username"] == "root"
    agent.accept_stream(sid)
    at_b, _ = exchange(broker, agent)
    assert StreamAccepted(sid) in at_b
    return sid


def payload(events: list[object], sid: int) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, DataReceived) and e.stream_id == sid)


# --- handshake ---------------------------------------------------------------------------------


def test_auth_secret_is_hmac_of_uuid_and_checked_per_container() -> None:
    secret = gateway_auth_secret(ROOT, UUID)
    assert len(secret) == 64 and int(secret, 16) >= 0
    assert check_auth_secret(ROOT, UUID, secret)
    assert check_auth_secret(ROOT, UUID, secret.upper())  # hex is case-insensitive
    assert not check_auth_secret(ROOT, OTHER, secret)  # a secret for another container
    assert not check_auth_secret(ROOT, UUID, "0" * 64)
    assert not check_auth_secret(ROOT, UUID, "")
    assert not check_auth_secret("", UUID, gateway_auth_secret("", UUID))


def test_tunnel_request_carries_upgrade_and_form_secret() -> None:
    raw = build_tunnel_request("ctl:443", UUID, "ab" * 32, token="tok")
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == f"POST /arvados/v1/connect/{UUID}/gateway_tunnel HTTP/1.1"
    assert "Upgrade: tunnel-h2" in lines and "Connection: Upgrade" in lines
    assert f"Content-Length: {len(body)}" in lines
    assert parse_form(body) == {"auth_secret": "ab" * 32}


def test_response_head_parser_keeps_bytes_after_the_head() -> None:
    p = ResponseHeadParser()
    assert p.feed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: tun") is None
    head = p.feed(b"nel-h2\r\nX-Arvados-Internal-Url: https://c2/\r\n\r\nPRI * HTTP/2.0")
    assert head is not None and head.status == 101
    assert head.header("upgrade") == "tunnel-h2"
    assert head.header("X-Arvados-Internal-Url") == "https://c2/"
    assert p.rest == b"PRI * HTTP/2.0"


def test_response_head_parser_rejects_garbage() -> None:
    with pytest.raises(TunnelProtocolError):
        ResponseHeadParser().feed(b"\x16\x03\x01garbage\r\n\r\n")


# --- streams -----------------------------------------------------------------------------------


def test_stream_carries_bytes_both_ways_and_closes_after_both_ends() -> None:
    broker, agent = pair()
    sid = open_accepted(broker, agent)
    broker.send_data(sid, b"hello agent")
    agent.send_data(sid, b"hello broker")
    at_b, at_a = exchange(broker, agent)
    assert payload(at_a, sid) == b"hello agent"
    assert payload(at_b, sid) == b"hello broker"
    broker.end_stream(sid)
    _, at_a = exchange(broker, agent)
    assert StreamEnded(sid) in at_a
    agent.send_data(sid, b"after half-close")  # the other direction still works
    agent.end_stream(sid)
    at_b, at_a = exchange(broker, agent)
    assert payload(at_b, sid) == b"after half-close"
    assert StreamClosed(sid) in at_b
    assert StreamClosed(sid) in agent.take_events()  # closed by the agent's own end_stream
    assert broker.open_streams == 0 and agent.open_streams == 0


def test_refused_stream_reports_status_and_reason() -> None:
    broker, agent = pair()
    sid = broker.open_stream("container:9")
    exchange(broker, agent)
    agent.refuse_stream(sid, 502, "cannot connect to port 9 in the container")
    at_b, _ = exchange(broker, agent)
    assert StreamRefused(sid, 502, "cannot connect to port 9 in the container") in at_b
    assert broker.open_streams == 0


def test_reset_reaches_the_other_end() -> None:
    broker, agent = pair()
    sid = open_accepted(broker, agent)
    agent.reset_stream(sid)
    at_b, _ = exchange(broker, agent)
    assert any(isinstance(e, StreamReset) and e.stream_id == sid for e in at_b)


def test_only_the_broker_opens_streams() -> None:
    _, agent = pair()
    with pytest.raises(TunnelProtocolError):
        agent.open_stream("container:80")


def test_agent_limits_concurrent_streams() -> None:
    broker, agent = pair(TunnelSettings(max_concurrent_streams=3))
    for _ in range(3):
        open_accepted(broker, agent)
    with pytest.raises(TunnelProtocolError, match="too many streams"):
        broker.open_stream("container:80")


def test_garbage_after_upgrade_is_a_protocol_error() -> None:
    broker = TunnelProtocol("broker")
    broker.initiate()
    with pytest.raises(TunnelProtocolError):
        broker.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 10)
    assert broker.closed
    assert broker.receive_data(b"more") == []


# --- flow control and scheduling ---------------------------------------------------------------


def test_bulk_data_is_pumped_within_window_and_budget() -> None:
    s = TunnelSettings(stream_window_bytes=256 * 1024, max_frame_bytes=16 * 1024)
    broker, agent = pair(s)
    sid = open_accepted(broker, agent)
    data = random.Random(1).randbytes(1024 * 1024)
    broker.send_data(sid, data)
    assert broker.buffered(sid) == len(data)
    got = bytearray()
    for _ in range(200):
        sent = broker.pump(64 * 1024)
        assert sent <= 64 * 1024
        _, at_a = exchange(broker, agent, rounds=1)
        for e in at_a:
            if isinstance(e, DataReceived):
                got += e.data
                agent.acknowledge(e.stream_id, e.flow_controlled_length)
        exchange(broker, agent, rounds=1)
        if len(got) == len(data):
            break
    assert bytes(got) == data
    assert broker.buffered(sid) == 0


def test_without_acknowledgement_the_sender_stops_at_the_window() -> None:
    s = TunnelSettings(stream_window_bytes=128 * 1024, max_frame_bytes=16 * 1024)
    broker, agent = pair(s)
    sid = open_accepted(broker, agent)
    broker.send_data(sid, b"x" * (512 * 1024))
    total = 0
    for _ in range(50):
        total += broker.pump(1 << 30)
        exchange(broker, agent)
    assert total == 128 * 1024  # the receiver never gave window back
    assert broker.buffered(sid) == 512 * 1024 - 128 * 1024


def test_small_write_on_idle_stream_overtakes_queued_bulk_data() -> None:
    broker, agent = pair()
    bulk = open_accepted(broker, agent)
    key = open_accepted(broker, agent)
    broker.send_data(bulk, b"B" * (4 * 1024 * 1024))  # queued, waits for pump()
    broker.send_data(key, b"k")  # a keystroke: goes out at once
    wire = broker.data_to_send()
    events = agent.receive_data(wire)
    assert payload(events, key) == b"k"
    assert payload(events, bulk) == b""


def test_pump_is_round_robin_across_streams() -> None:
    s = TunnelSettings(max_frame_bytes=16 * 1024)
    broker, agent = pair(s)
    a = open_accepted(broker, agent)
    b = open_accepted(broker, agent)
    broker.send_data(a, b"a" * (256 * 1024))
    broker.send_data(b, b"b" * (256 * 1024))
    broker.pump(64 * 1024)
    events = agent.receive_data(broker.data_to_send())
    assert len(payload(events, a)) == len(payload(events, b)) == 32 * 1024


def test_end_stream_waits_for_queued_data() -> None:
    broker, agent = pair()
    sid = open_accepted(broker, agent)
    broker.send_data(sid, b"z" * (200 * 1024))
    broker.end_stream(sid)
    got = bytearray()
    ended = False
    for _ in range(20):
        broker.pump(1 << 20)
        _, at_a = exchange(broker, agent)
        got += payload(at_a, sid)
        ended = ended or StreamEnded(sid) in at_a
    assert ended and len(got) == 200 * 1024


# --- liveness ----------------------------------------------------------------------------------


def test_ping_ack_carries_the_send_time() -> None:
    broker, agent = pair()
    broker.send_ping(123.5)
    assert broker.outstanding_pings == [123.5]
    at_b, _ = exchange(broker, agent)
    assert PingAcked(123.5) in at_b
    assert broker.outstanding_pings == []


def test_unanswered_pings_stay_outstanding_for_the_deadline_check() -> None:
    broker, _ = pair()
    broker.send_ping(1.0)
    broker.send_ping(2.0)
    broker.data_to_send()  # lost on the way
    assert broker.outstanding_pings == [1.0, 2.0]


def test_drain_notice_keeps_open_streams_working() -> None:
    broker, agent = pair()
    sid = open_accepted(broker, agent)
    broker.drain()
    _, at_a = exchange(broker, agent)
    assert DrainRequested("reconnect") in at_a
    assert not agent.closed
    agent.send_data(sid, b"still here")
    broker.send_data(sid, b"me too")
    at_b, at_a = exchange(broker, agent)
    assert payload(at_b, sid) == b"still here" and payload(at_a, sid) == b"me too"


def test_close_sends_goaway_and_ends_the_tunnel() -> None:
    broker, agent = pair()
    broker.close(0, "shutting down")
    _, at_a = exchange(broker, agent)
    assert agent.closed
    assert any(type(e).__name__ == "ConnectionTerminated" for e in at_a)


# --- reconnect backoff -------------------------------------------------------------------------


def test_backoff_grows_to_the_cap_with_jitter() -> None:
    gen = backoff_delays(1.0, 8.0, random.Random(3))
    delays = [next(gen) for _ in range(8)]
    steps = [1, 2, 4, 8, 8, 8, 8, 8]
    for d, step in zip(delays, steps, strict=True):
        assert step * 0.5 <= d <= step
    # Two agents do not pick the same delays (no lockstep reconnects after a broker restart).
    other = backoff_delays(1.0, 8.0, random.Random(4))
    assert [next(other) for _ in range(8)] != delays


def test_overlong_frame_is_refused_before_buffering_it() -> None:
    broker, agent = pair()
    # A DATA frame header announcing 4 MiB (limit is 64 KiB), followed by some of the bytes.
    header = (4 << 20).to_bytes(3, "big") + b"\x00\x00" + (1).to_bytes(4, "big")
    with pytest.raises(TunnelProtocolError, match="overlong"):
        broker.receive_data(header + b"\x00" * (200 * 1024))
