"""Batched upload of a container's output as ``logs`` records.

Output is buffered per event type (``stdout``, ``stderr``, ``crunch-run``) and sent as one
record per event type every ``flush_interval_s``, or sooner when a buffer reaches
``batch_bytes`` — never one HTTP call per line. :meth:`LogSink.close` uploads whatever is left,
so the tail of the output survives the process exit.

If the API server stays unreachable (the client already retried), text is kept for the next
flush up to ``max_buffer_bytes``; beyond that the oldest text is dropped and a note saying how
much was lost is added, so memory stays bounded while the controller is down.

Every event type's text goes through a :class:`dispatcher.logs.StreamRedactor` as it is
written: a registered secret that a program prints (e.g. the runtime token it was given) is not
stored in the controller's log table nor in the local copies, also when the pipe read that
brought it cut it in two. The few characters at the end of a piece that may start a secret are
held until the next piece, or until a flush finds that no more text came for that event type
since the flush before (a prompt without a newline still shows up, one flush interval late).

With ``local_dir``, each event type's text is also appended, as it is written, to
``<local_dir>/<event type>.txt`` (``stderr.txt``, ``stdout.txt``, ``crunch-run.txt``): the
live-log WebDAV server of the gateway serves those files while the container runs (reference
section 6). They are redacted the same way. A failing local write (disk full) stops the local
copies with one warning; the upload goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from dispatcher.arvados.errors import ArvadosError
from dispatcher.logs import StreamRedactor, redact

log = logging.getLogger("crunchgate.crunchrun.logsink")

Uploader = Callable[[str, str], Awaitable[Any]]
EVENT_TYPE_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def timestamp() -> str:
    """UTC timestamp with milliseconds, the prefix of ``crunch-run`` log lines."""
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


class LogSink:
    """Collects text per event type and uploads it in batches with ``upload(event_type, text)``.

    ``upload`` is normally ``lambda et, text: client.create_log(uuid, et, text)``.
    """

    def __init__(
        self,
        upload: Uploader,
        *,
        flush_interval_s: float = 1.0,
        batch_bytes: int = 64 * 1024,
        max_buffer_bytes: int = 8 * 1024 * 1024,
        local_dir: str | None = None,
    ) -> None:
        self._upload = upload
        self.local_dir = local_dir
        self._local_files: dict[str, Any] = {}
        self.flush_interval_s = flush_interval_s
        self.batch_bytes = batch_bytes
        self.max_buffer_bytes = max_buffer_bytes
        self._pending: dict[str, list[str]] = {}
        self._redactors: dict[str, StreamRedactor] = {}
        self._fed: set[str] = set()  # event types written to since the last periodic flush
        self._size = 0
        self._wake = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.dropped_chars = 0
        self.uploads = 0

    def start(self) -> None:
        """Start the periodic flusher (needs a running event loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="logsink")

    def write(self, event_type: str, text: str) -> None:
        """Queue ``text`` for ``event_type``. Never blocks, never raises."""
        if not text:
            return
        redactor = self._redactors.get(event_type)
        if redactor is None:
            redactor = self._redactors[event_type] = StreamRedactor()
        self._fed.add(event_type)
        self._queue(event_type, redactor.feed(text))

    def _queue(self, event_type: str, text: str) -> None:
        """Keep already redacted text: the local copy at once, the upload for the next flush."""
        if not text:
            return
        if self.local_dir is not None:
            self._write_local(event_type, text)
        self._pending.setdefault(event_type, []).append(text)
        self._size += len(text)
        if self._size > self.max_buffer_bytes:
            self._drop_oldest()
        if self._size >= self.batch_bytes:
            self._wake.set()

    def _write_local(self, event_type: str, text: str) -> None:
        if not EVENT_TYPE_RE.match(event_type):
            return
        f = self._local_files.get(event_type)
        try:
            if f is None:
                assert self.local_dir is not None
                path = os.path.join(self.local_dir, f"{event_type}.txt")
                # Unbuffered, append only: what a live-log reader sees is what was written.
                f = self._local_files[event_type] = open(path, "ab", buffering=0)  # noqa: SIM115
            f.write(text.encode("utf-8", "replace"))
        except OSError as exc:
            log.warning("cannot keep local log copies in %s any more: %s", self.local_dir, exc)
            self.local_dir = None
            self._close_local()

    def _close_local(self) -> None:
        files, self._local_files = list(self._local_files.values()), {}
        for f in files:
            with contextlib.suppress(OSError):
                f.close()

    def crunch_run(self, message: str) -> None:
        """A timestamped line of crunch-run's own story (event type ``crunch-run``)."""
        self.write("crunch-run", f"{timestamp()} {message.rstrip()}\n")

    async def flush(self) -> None:
        """Upload everything buffered now."""
        async with self._flush_lock:
            pending, self._pending, self._size = self._pending, {}, 0
            for event_type, parts in pending.items():
                text = "".join(parts)
                for start in range(0, len(text), self.batch_bytes):
                    chunk = text[start:start + self.batch_bytes]
                    try:
                        # Redacted when written; again here for a secret registered since.
                        await self._upload(event_type, redact(chunk))
                        self.uploads += 1
                    except (ArvadosError, OSError) as exc:
                        if self._closed:
                            self.dropped_chars += len(text) - start
                            log.error("could not upload %d chars of %s log: %s",
                                      len(text) - start, event_type, exc)
                            break
                        # Keep it for the next round, ahead of anything newer.
                        rest = text[start:]
                        self._pending.setdefault(event_type, []).insert(0, rest)
                        self._size += len(rest)
                        if self._size > self.max_buffer_bytes:
                            self._drop_oldest()
                        log.warning("log upload failed, will retry: %s", exc)
                        break

    async def close(self) -> None:
        """Stop the flusher and upload the rest (one last attempt per chunk)."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.dropped_chars:
            self.crunch_run(f"{self.dropped_chars} characters of output were dropped because "
                            "the API server could not be reached")
        self._release_held(everything=True)
        await self.flush()
        self._close_local()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.flush_interval_s)
            self._wake.clear()
            self._release_held(everything=False)
            await self.flush()

    def _release_held(self, *, everything: bool) -> None:
        """Queue the tails the redactors hold back: all of them (no more output is coming), or
        those of event types that got no text since the last periodic flush."""
        for event_type, redactor in self._redactors.items():
            if redactor.holding and (everything or event_type not in self._fed):
                self._queue(event_type, redactor.release())
        self._fed.clear()

    def _drop_oldest(self) -> None:
        # Drop whole queued pieces, oldest first across event types, until under the limit.
        while self._size > self.max_buffer_bytes:
            for parts in self._pending.values():
                if parts:
                    piece = parts.pop(0)
                    self._size -= len(piece)
                    self.dropped_chars += len(piece)
                    break
            else:
                self._size = 0
                return
