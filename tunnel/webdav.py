"""A small read-only WebDAV server for container logs (reference section 6).

Two places serve the same tree of log files, so they share this module:

* crunch-run's gateway (:class:`LogServer`): the container's in-progress log files in a local
  directory (:class:`DirFS`), reached only through the tunnel (one ``log.gateway:80`` stream per
  request, spliced to a ``socketpair`` whose other end runs an aiohttp server: nothing listens
  on a network port, as for the SSH server);
* the controller (:mod:`tunnel.containerlogs`): the logs saved in the ``logs`` table, rebuilt
  into files (:class:`MemFS`) when the gateway is not the source.

What a client gets (:func:`serve`): ``GET``/``HEAD`` with a single ``Range`` (``206`` +
``Content-Range``; suffix ranges ``bytes=-N``; ``416`` + ``Content-Range: bytes */SIZE`` beyond
the end), ``OPTIONS`` (``Dav: 1, 2``), ``PROPFIND`` with ``Depth`` 0, 1 or infinity (``207``
multistatus; sizes come from the file system's metadata, no content is read). Every other
method is ``405``. Path segments ``.`` and ``..``, and segments hiding a ``/`` or a NUL behind
percent-encoding, are refused with ``400``; :class:`DirFS` also never follows a symlink.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import mimetypes
import os
import re
import socket
import stat
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, Union
from urllib.parse import quote, unquote
from xml.sax.saxutils import escape

from aiohttp import web

log = logging.getLogger("crunchgate.tunnel.webdav")

ALLOW = "OPTIONS, GET, HEAD, PROPFIND"
READ_CHUNK = 256 * 1024
MAX_PROPFIND_BODY = 64 * 1024
PREFIX_HEADER = "X-Webdav-Prefix"
SOURCE_HEADER = "X-Webdav-Source"
GATEWAY_UUID_HEADER = "X-Arvados-Container-Gateway-Uuid"
LOG_SOURCE = "/log"


class BadPath(ValueError):
    """A request path that must not reach a file system (``..``, encoded ``/``, NUL)."""


@dataclass(frozen=True)
class Entry:
    """One file or directory: what PROPFIND reports and GET needs."""

    name: str
    is_dir: bool
    size: int = 0
    mtime: float = 0.0


class ReadOnlyFS(Protocol):
    """A tree of files addressed by path segments (``[]`` is the root directory)."""

    def stat(self, parts: Sequence[str]) -> Entry | None: ...
    def children(self, parts: Sequence[str]) -> list[Entry]: ...
    def read(self, parts: Sequence[str], offset: int, length: int) -> bytes: ...


# --- pure helpers ---------------------------------------------------------------------------------


def split_path(raw: str) -> list[str]:
    """A percent-encoded path (relative to the served root) as decoded segments.

    Empty segments (``//``, a trailing ``/``) are dropped; ``.``/``..`` and segments that decode
    to something containing ``/``, ``\\`` or NUL raise :class:`BadPath`.
    """
    parts = []
    for seg in raw.split("/"):
        if not seg:
            continue
        name = unquote(seg, errors="strict")
        if name in (".", "..") or any(c in name for c in "/\\\x00"):
            raise BadPath(f"bad path segment {seg[:50]!r}")
        parts.append(name)
    return parts


RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")
RangeResult = tuple[int, int] | str | None


def parse_range(header: str, size: int) -> RangeResult:
    """One ``Range`` header against a file of ``size`` bytes.

    Returns ``(start, end_inclusive)`` for a satisfiable single range, ``"unsatisfiable"`` (the
    caller answers 416), or None when the header is absent, malformed or asks for several
    ranges (RFC 9110 lets a server ignore it then and send the whole file).

    ``bytes=-0`` (which ``arvados-client logs`` sends to learn the size) gets what Go's
    ``http.ServeContent`` — and so the reference's gateway — answers: an empty ``206`` whose
    ``Content-Range`` is ``bytes SIZE-(SIZE-1)/SIZE``, i.e. ``(size, size - 1)`` here.
    """
    m = RANGE_RE.match(header.strip().replace(" ", ""))
    if m is None:
        return None
    first, last = m.groups()
    if not first and not last:
        return None
    if not first:  # suffix: the last N bytes
        n = min(int(last), size)
        return (size - n, size - 1)
    start = int(first)
    if start >= size:
        return "unsatisfiable"
    end = min(int(last), size - 1) if last else size - 1
    if end < start:
        return None
    return (start, end)


def content_type(name: str) -> str:
    """``text/plain; charset=utf-8`` for ``.txt`` (and other text types with a charset)."""
    ctype = mimetypes.guess_type(name, strict=False)[0] or "application/octet-stream"
    if ctype.startswith("text/"):
        ctype += "; charset=utf-8"
    return ctype


def http_date(ts: float) -> str:
    return email.utils.formatdate(ts, usegmt=True)


def propfind_depth(header: str | None) -> int | None:
    """``Depth``: 0, 1, or None for infinity (also when absent, RFC 4918 9.1)."""
    value = (header or "infinity").strip().lower()
    if value == "0":
        return 0
    if value == "1":
        return 1
    return None


def walk(fs: ReadOnlyFS, parts: list[str], entry: Entry, depth: int | None
         ) -> Iterator[tuple[list[str], Entry]]:
    """``entry`` at ``parts`` and its descendants down to ``depth`` (None: all)."""
    yield parts, entry
    if entry.is_dir and (depth is None or depth > 0):
        for child in sorted(fs.children(parts), key=lambda e: e.name):
            yield from walk(fs, [*parts, child.name], child,
                            None if depth is None else depth - 1)


def href(prefix: str, parts: Sequence[str], is_dir: bool) -> str:
    path = prefix.rstrip("/") + "".join("/" + quote(p, safe="") for p in parts)
    if is_dir:
        path += "/"
    return path or "/"


def multistatus(prefix: str, items: Sequence[tuple[Sequence[str], Entry]]) -> bytes:
    """The ``207`` body: one ``<D:response>`` per item, properties from metadata only."""
    out = ['<?xml version="1.0" encoding="UTF-8"?>', '<D:multistatus xmlns:D="DAV:">']
    for parts, e in items:
        props = [f"<D:displayname>{escape(e.name)}</D:displayname>",
                 f"<D:getlastmodified>{http_date(e.mtime)}</D:getlastmodified>"]
        if e.is_dir:
            props.append("<D:resourcetype><D:collection/></D:resourcetype>")
        else:
            props += ["<D:resourcetype/>",
                      f"<D:getcontentlength>{e.size}</D:getcontentlength>",
                      f"<D:getcontenttype>{escape(content_type(e.name))}</D:getcontenttype>"]
        out.append(f"<D:response><D:href>{escape(href(prefix, parts, e.is_dir))}</D:href>"
                   f"<D:propstat><D:prop>{''.join(props)}</D:prop>"
                   "<D:status>HTTP/1.1 200 OK</D:status></D:propstat></D:response>")
    out.append("</D:multistatus>")
    return ("\n".join(out) + "\n").encode()


# --- file systems ---------------------------------------------------------------------------------


class DirFS:
    """A local directory (crunch-run's live log copies). Symlinks are treated as absent, so
    nothing outside ``root`` is ever opened, whatever the directory holds."""

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)

    def _path(self, parts: Sequence[str]) -> str:
        return os.path.join(self.root, *parts)

    def _lstat(self, parts: Sequence[str]) -> os.stat_result | None:
        # Each component is checked, so a symlinked directory on the way is refused too.
        path = self.root
        st: os.stat_result | None = None
        for part in ["", *parts]:
            path = os.path.join(path, part) if part else path
            try:
                st = os.lstat(path)
            except OSError:
                return None
            if stat.S_ISLNK(st.st_mode):
                return None
        return st

    def stat(self, parts: Sequence[str]) -> Entry | None:
        st = self._lstat(parts)
        if st is None:
            return None
        name = parts[-1] if parts else ""
        if stat.S_ISDIR(st.st_mode):
            return Entry(name, True, 0, st.st_mtime)
        if stat.S_ISREG(st.st_mode):
            return Entry(name, False, st.st_size, st.st_mtime)
        return None

    def children(self, parts: Sequence[str]) -> list[Entry]:
        try:
            names = os.listdir(self._path(parts))
        except OSError:
            return []
        found = (self.stat([*parts, n]) for n in names)
        return [e for e in found if e is not None]

    def read(self, parts: Sequence[str], offset: int, length: int) -> bytes:
        if self._lstat(parts) is None:
            raise FileNotFoundError("/".join(parts))
        fd = os.open(self._path(parts), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)


Tree = Mapping[str, Union[bytes, "Tree"]]


class MemFS:
    """Files held in memory: ``{"stderr.txt": b"...", "sub": {...}}`` (saved logs)."""

    def __init__(self, tree: Tree, mtime: float = 0.0) -> None:
        self.tree = tree
        self.mtime = mtime

    def _node(self, parts: Sequence[str]) -> bytes | Tree | None:
        node: bytes | Tree = self.tree
        for p in parts:
            if isinstance(node, bytes) or p not in node:
                return None
            node = node[p]
        return node

    def _entry(self, name: str, node: bytes | Tree) -> Entry:
        if isinstance(node, bytes):
            return Entry(name, False, len(node), self.mtime)
        return Entry(name, True, 0, self.mtime)

    def stat(self, parts: Sequence[str]) -> Entry | None:
        node = self._node(parts)
        return None if node is None else self._entry(parts[-1] if parts else "", node)

    def children(self, parts: Sequence[str]) -> list[Entry]:
        node = self._node(parts)
        if node is None or isinstance(node, bytes):
            return []
        return [self._entry(k, v) for k, v in node.items()]

    def read(self, parts: Sequence[str], offset: int, length: int) -> bytes:
        node = self._node(parts)
        if not isinstance(node, bytes):
            raise FileNotFoundError("/".join(parts))
        return node[offset:offset + length]


# --- serving --------------------------------------------------------------------------------------


def _text(status: int, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=message + "\n", headers=headers)


async def serve(request: web.BaseRequest, fs: ReadOnlyFS, prefix: str,
                extra_headers: Mapping[str, str] | None = None) -> web.StreamResponse:
    """Answer one WebDAV request for ``fs`` mounted at URL path ``prefix``.

    ``request.raw_path`` must start with ``prefix`` (else 400); the rest names the file.
    """
    headers = dict(extra_headers or {})
    method = request.method
    raw = request.raw_path.split("?", 1)[0]
    if raw != prefix and not raw.startswith(prefix.rstrip("/") + "/"):
        return _text(400, "request path does not match X-Webdav-Prefix", headers)
    try:
        parts = split_path(raw[len(prefix):])
    except (BadPath, UnicodeDecodeError):
        return _text(400, "bad path", headers)
    if method == "OPTIONS":
        return web.Response(status=200, headers={
            **headers, "Dav": "1, 2", "Allow": ALLOW, "Ms-Author-Via": "DAV"})
    if method not in ("GET", "HEAD", "PROPFIND"):
        return _text(405, f"method {method} not allowed: read-only", {**headers, "Allow": ALLOW})
    entry = fs.stat(parts)
    if entry is None:
        return _text(404, "not found", headers)
    if method == "PROPFIND":
        if request.can_read_body:
            # The body names properties; the answer is always the same set (allprop), and the
            # body is read (bounded) only so that the connection stays usable.
            await request.content.read(MAX_PROPFIND_BODY)
        items = list(walk(fs, parts, entry, propfind_depth(request.headers.get("Depth"))))
        return web.Response(status=207, body=multistatus(prefix, items), headers={
            **headers, "Content-Type": "text/xml; charset=utf-8"})
    if entry.is_dir:
        return _listing(request, fs, prefix, parts, headers)
    return await _send_file(request, fs, parts, entry, headers)


def _listing(request: web.BaseRequest, fs: ReadOnlyFS, prefix: str, parts: list[str],
             headers: dict[str, str]) -> web.Response:
    """GET of a directory: a plain HTML index (a browser's view of the same tree)."""
    rows = [f'<li><a href="{escape(href(prefix, [*parts, e.name], e.is_dir))}">'
            f'{escape(e.name)}{"/" if e.is_dir else ""}</a></li>'
            for e in sorted(fs.children(parts), key=lambda e: e.name)]
    body = ("<!DOCTYPE html>\n<html><body><ul>\n" + "\n".join(rows) + "\n</ul></body></html>\n")
    return web.Response(status=200, text=body, content_type="text/html", charset="utf-8",
                        headers=headers)


async def _send_file(request: web.BaseRequest, fs: ReadOnlyFS, parts: list[str], entry: Entry,
                     headers: dict[str, str]) -> web.StreamResponse:
    size = entry.size
    rng = parse_range(request.headers.get("Range", ""), size)
    if rng == "unsatisfiable":
        return web.Response(status=416, headers={**headers, "Content-Range": f"bytes */{size}"})
    resp = web.StreamResponse(status=200, headers={
        **headers, "Content-Type": content_type(entry.name), "Accept-Ranges": "bytes",
        "Last-Modified": http_date(entry.mtime)})
    start, end = 0, size - 1
    if isinstance(rng, tuple):
        start, end = rng
        resp.set_status(206)
        resp.headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    length = max(0, end - start + 1)
    resp.content_length = length
    await resp.prepare(request)
    if request.method == "HEAD":
        return resp
    sent = 0
    while sent < length:
        try:
            chunk = fs.read(parts, start + sent, min(READ_CHUNK, length - sent))
        except OSError as exc:
            chunk = b""
            log.warning("cannot read log file %s: %s", "/".join(parts), exc)
        if not chunk:
            # The file shrank (or vanished) under us: the length is promised, so all we can do
            # is cut the connection rather than send a short body as if it were complete.
            if request.transport is not None:
                request.transport.abort()
            return resp
        await resp.write(chunk)
        sent += len(chunk)
    await resp.write_eof()
    return resp


class LogServer:
    """crunch-run's live-log WebDAV server over ``log_dir``; :meth:`serve_socket` runs it on
    one end of a ``socketpair`` per tunnel stream (see the module docstring)."""

    def __init__(self, container_uuid: str, log_dir: str) -> None:
        self.container_uuid = container_uuid
        self.fs = DirFS(log_dir)
        self._server = web.Server(self._handle, access_log=None)

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        # Reference 2.4: a request meant for another container is refused, not answered.
        target = request.headers.get(GATEWAY_UUID_HEADER, "")
        if target != self.container_uuid:
            return _text(502, f"misdirected request: meant for {target[:50]!r} but received "
                              f"by crunch-run {self.container_uuid!r}")
        if request.headers.get(SOURCE_HEADER, "") != LOG_SOURCE:
            return _text(404, "path not found")
        prefix = request.headers.get(PREFIX_HEADER, "")
        if not prefix.startswith("/"):
            return _text(400, "missing X-Webdav-Prefix")
        return await serve(request, self.fs, prefix)

    async def serve_socket(self, sock: socket.socket) -> None:
        """Serve HTTP/1.1 on ``sock`` until the peer closes it."""
        loop = asyncio.get_running_loop()
        await loop.connect_accepted_socket(self._server, sock)

    def close(self) -> None:
        """Drop every connection (crunch-run is ending)."""
        for handler in list(self._server.connections):
            with contextlib.suppress(Exception):
                handler.force_close()
