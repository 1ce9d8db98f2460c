"""tunnel.webservices.BodyReader: where a container's response body ends (keep-alive)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel.webservices import BodyReader, WebError, parse_response_head


def feed_all(reader: BodyReader, pieces: list[bytes]) -> bytes:
    out = b""
    for p in pieces:
        out += reader.feed(p)
    return out


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for c in [*points, len(data)]:
        out.append(data[prev:c])
        prev = c
    return out


def chunked(parts: list[bytes], trailer: bytes = b"") -> bytes:
    body = b"".join(f"{len(p):x};ext=1\r\n".encode() + p + b"\r\n" for p in parts if p)
    return body + b"0\r\n" + trailer + b"\r\n"


@given(st.lists(st.binary(max_size=300), max_size=8), st.lists(st.integers(0, 5000), max_size=20),
       st.booleans())
def test_chunked_body_is_decoded_wherever_the_reads_cut_it(parts: list[bytes], cuts: list[int],
                                                           with_trailer: bool) -> None:
    wire = chunked(parts, b"X-Sum: 1\r\n" if with_trailer else b"")
    reader = BodyReader(200, [("Transfer-Encoding", "chunked")], "GET")
    got = feed_all(reader, split(wire + b"GARBAGE AFTER", cuts))
    assert reader.done
    assert got == b"".join(parts)


@given(st.binary(max_size=2000), st.lists(st.integers(0, 3000), max_size=10))
def test_content_length_body_stops_at_the_length(body: bytes, cuts: list[int]) -> None:
    reader = BodyReader(200, [("Content-Length", str(len(body)))], "GET")
    assert reader.length == len(body)
    got = feed_all(reader, split(body + b"extra", cuts))
    assert reader.done and got == body


def test_bodies_that_cannot_exist() -> None:
    for status, method in ((204, "GET"), (304, "GET"), (200, "HEAD"), (101, "GET")):
        reader = BodyReader(status, [("Content-Length", "10")], method)
        assert reader.done and reader.feed(b"0123456789") == b""


def test_without_length_the_body_runs_to_the_end_of_the_stream() -> None:
    reader = BodyReader(200, [], "GET")
    assert reader.feed(b"abc") == b"abc" and not reader.done
    reader.feed_eof()
    assert reader.done


def test_a_truncated_body_is_an_error() -> None:
    reader = BodyReader(200, [("Content-Length", "10")], "GET")
    reader.feed(b"12345")
    with pytest.raises(WebError, match="middle of a response"):
        reader.feed_eof()
    reader = BodyReader(200, [("Transfer-Encoding", "chunked")], "GET")
    reader.feed(b"5\r\nab")
    with pytest.raises(WebError):
        reader.feed_eof()


def test_bad_framing_is_refused() -> None:
    with pytest.raises(WebError):
        BodyReader(200, [("Content-Length", "-1")], "GET")
    with pytest.raises(WebError):
        BodyReader(200, [("Transfer-Encoding", "chunked")], "GET").feed(b"zz\r\n")
    with pytest.raises(WebError):
        BodyReader(200, [("Transfer-Encoding", "chunked")], "GET").feed(b"1\r\naXY\r\n")
    with pytest.raises(WebError):
        BodyReader(200, [("Transfer-Encoding", "chunked")], "GET").feed(b"1" * 5000)


def test_response_head_parts() -> None:
    status, reason, headers = parse_response_head(
        b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nSet-Cookie: a=1\r\n"
        b"Set-Cookie: b=2")
    assert (status, reason) == (404, "Not Found")
    assert headers.count(("Set-Cookie", "a=1")) == 1 and ("Set-Cookie", "b=2") in headers
    with pytest.raises(WebError):
        parse_response_head(b"SSH-2.0-OpenSSH\r\n")
