"""The read-only WebDAV pieces behind container logs: pure helpers, the two file systems, and
crunch-run's local log copies."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatcher.crunchrun.logsink import LogSink
from dispatcher.logs import register_secret
from tunnel.containerlogs import saved_log_files
from tunnel.webdav import (
    BadPath,
    DirFS,
    Entry,
    MemFS,
    content_type,
    multistatus,
    parse_range,
    propfind_depth,
    split_path,
    walk,
)


@pytest.mark.parametrize(("header", "size", "want"), [
    ("", 12, None),
    ("bytes=-6", 12, (6, 11)),
    ("bytes=-100", 12, (0, 11)),
    ("bytes=-0", 12, (12, 11)),  # what Go's ServeContent answers: an empty 206 with the size
    ("bytes=0-", 12, (0, 11)),
    ("bytes=2-4", 12, (2, 4)),
    ("bytes=2-400", 12, (2, 11)),
    ("bytes=12-", 12, "unsatisfiable"),
    ("bytes=20-30", 12, "unsatisfiable"),
    ("bytes=4-2", 12, None),
    ("bytes=0-1,4-5", 12, None),  # several ranges: the whole file
    ("items=0-1", 12, None),
    ("bytes=-", 12, None),
    ("bytes=-5", 0, (0, -1)),
])
def test_parse_range(header: str, size: int, want: Any) -> None:
    assert parse_range(header, size) == want


@given(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 10**6))
def test_parse_range_stays_inside_the_file(size: int, a: int, b: int) -> None:
    for header in (f"bytes={a}-{b}", f"bytes={a}-", f"bytes=-{b}"):
        got = parse_range(header, size)
        if isinstance(got, tuple):
            start, end = got
            assert 0 <= start <= size and end <= size - 1 and end >= start - 1


def test_split_path_refuses_traversal() -> None:
    assert split_path("") == []
    assert split_path("/a//b/") == ["a", "b"]
    assert split_path("/with%20space.txt") == ["with space.txt"]
    for bad in ("/..", "/a/../b", "/%2e%2e/x", "/.", "/a%2fb", "/a%5cb", "/a%00", "/%ff"):
        with pytest.raises((BadPath, UnicodeDecodeError)):
            split_path(bad)


def test_content_type_and_depth() -> None:
    assert content_type("stderr.txt") == "text/plain; charset=utf-8"
    assert content_type("d.html") == "text/html; charset=utf-8"
    assert content_type("x.unknownext") == "application/octet-stream"
    assert propfind_depth("0") == 0 and propfind_depth("1") == 1
    assert propfind_depth(None) is None and propfind_depth("infinity") is None


def test_multistatus_escapes_names_and_quotes_hrefs() -> None:
    body = multistatus("/p/log", [
        ([], Entry("", True)), (["a<b>&c.txt"], Entry("a<b>&c.txt", False, 3))]).decode()
    assert "<D:href>/p/log/</D:href>" in body
    assert "<D:href>/p/log/a%3Cb%3E%26c.txt</D:href>" in body
    assert "<D:displayname>a&lt;b&gt;&amp;c.txt</D:displayname>" in body
    assert "<D:getcontentlength>3</D:getcontentlength>" in body
    assert "<D:collection/>" in body


def test_memfs() -> None:
    fs = MemFS({"stderr.txt": b"hello", "d": {"x.txt": b"x"}})
    assert fs.stat([]) == Entry("", True)
    assert fs.stat(["stderr.txt"]) == Entry("stderr.txt", False, 5)
    assert fs.stat(["stderr.txt", "x"]) is None and fs.stat(["nope"]) is None
    assert fs.read(["stderr.txt"], 1, 3) == b"ell"
    names = ["/".join(p) for p, _ in walk(fs, [], fs.stat([]) or Entry("", True), None)]
    assert names == ["", "d", "d/x.txt", "stderr.txt"]
    assert [p for p, _ in walk(fs, [], Entry("", True), 0)] == [[]]


def test_dirfs_never_follows_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "logs"
    (root / "sub").mkdir(parents=True)
    (root / "stderr.txt").write_bytes(b"hello")
    (tmp_path / "secret").write_bytes(b"secret")
    (root / "link").symlink_to(tmp_path / "secret")
    (root / "dirlink").symlink_to(tmp_path)
    os.mkfifo(root / "fifo")
    fs = DirFS(str(root))
    assert fs.stat(["stderr.txt"]) is not None and fs.read(["stderr.txt"], 0, 100) == b"hello"
    assert fs.stat(["link"]) is None and fs.stat(["dirlink", "secret"]) is None
    assert fs.stat(["fifo"]) is None
    with pytest.raises(OSError):
        fs.read(["link"], 0, 10)
    with pytest.raises(OSError):
        fs.read(["dirlink", "secret"], 0, 10)
    assert sorted(e.name for e in fs.children([])) == ["stderr.txt", "sub"]


def test_saved_log_files_by_event_type() -> None:
    records = [{"event_type": "stderr", "properties": {"text": "a"}},
               {"event_type": "stdout", "properties": {"text": "o"}},
               {"event_type": "stderr", "properties": {"text": "b"}},
               {"event_type": "stderr", "properties": {}}]
    assert saved_log_files(records) == {"stderr.txt": b"ab", "stdout.txt": b"o"}


def test_logsink_keeps_redacted_local_copies(tmp_path: Path) -> None:
    register_secret("localcopysecret987")
    uploads: list[tuple[str, str]] = []

    async def upload(et: str, text: str) -> None:
        uploads.append((et, text))

    async def go() -> None:
        sink = LogSink(upload, flush_interval_s=3600, local_dir=str(tmp_path))
        sink.write("stderr", "hello\n")
        # Written at once, before any upload: that is what the live log shows.
        assert (tmp_path / "stderr.txt").read_text() == "hello\n"
        # A secret cut in two by the pipe reads is caught in the copy too.
        sink.write("stderr", "world localcopy")
        sink.write("stderr", "secret987\n")
        sink.write("stdout", "out\n")
        sink.crunch_run("started")
        sink.write("../evil", "x")  # not a file name: no local copy
        await sink.close()

    asyncio.run(go())
    assert (tmp_path / "stderr.txt").read_text() == "hello\nworld [REDACTED]\n"
    assert "localcopysecret987" not in (tmp_path / "stderr.txt").read_text()
    assert (tmp_path / "stdout.txt").read_text() == "out\n"
    assert (tmp_path / "crunch-run.txt").read_text().endswith(" started\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crunch-run.txt", "stderr.txt",
                                                          "stdout.txt"]
    assert {et for et, _ in uploads} == {"stderr", "stdout", "crunch-run", "../evil"}
