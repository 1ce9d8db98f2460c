"""Structured logging: one JSON object per line on stderr, secrets scrubbed.

Library code only gets named loggers (``logging.getLogger("crunchgate.<component>")``) and passes
context as ``extra={"container_uuid": ..., "job_id": ..., "tunnel_id": ...}``. Entry points call
:func:`setup_logging` once.

Secrets (SystemRootToken, ManagementToken, user tokens, gateway secrets) are registered with
:func:`register_secret` as soon as they are known; the handler replaces any occurrence in the
final line with ``[REDACTED]``. This is a safety net, not a licence to log secrets: code must
still never format a token into a message.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import re
import sys
import threading
import time
from typing import Any

REDACTED = "[REDACTED]"
CONTEXT_FIELDS = ("container_uuid", "job_id", "tunnel_id", "instance", "request_id", "user_uuid")

_secrets: set[str] = set()
_secrets_lock = threading.Lock()

# A process can know tens of thousands of secrets (a dispatcher registers one gateway secret per
# container it submits, a controller every token it has seen), and every log line is scrubbed:
# looking for each secret in turn would cost O(secrets) per line (0.75 ms at 10,000). Instead a
# line is cut into its alphanumeric words and each word is looked up in hash sets, one per
# secret length: O(line) whatever the number of secrets. Secrets of other shapes are v2 tokens
# (their own regex, one set) and a few odd ones from config files (scanned in turn).
#
# Readers take no lock: sets only grow (a membership test is atomic under the GIL), a new
# length's set is in ``_plain`` before ``_plain_lengths`` names it, and the tuples and the
# list below are replaced, never mutated.
_WORD_MIN = 8
_WORD = re.compile(rf"[A-Za-z0-9]{{{_WORD_MIN},}}")
_V2_TOKEN = re.compile(r"v2/[A-Za-z0-9-]+/[A-Za-z0-9]+")
_plain: dict[int, set[str]] = {}        # alphanumeric secrets by length
_plain_lengths: tuple[int, ...] = ()    # the keys of _plain, longest first
_v2_tokens: set[str] = set()            # whole "v2/<uuid>/<secret>" tokens
_other: list[str] = []                  # any other shape, longest first
_longest = 0                            # the longest registered secret (for StreamRedactor)


def register_secret(value: str | None) -> None:
    """Make sure ``value`` never appears in a log line. Short values are ignored."""
    if not value or len(value) < _WORD_MIN:
        return
    global _plain_lengths, _other, _longest
    new = [value]
    # Arvados v2 tokens are "v2/<uuid>/<secret>": scrub the secret part on its own too.
    if value.startswith("v2/") and value.count("/") == 2:
        part = value.rsplit("/", 1)[1]
        if len(part) >= _WORD_MIN:
            new.append(part)
    with _secrets_lock:
        for v in new:
            if v in _secrets:
                continue
            _secrets.add(v)
            _longest = max(_longest, len(v))
            if v.isascii() and v.isalnum():
                bucket = _plain.get(len(v))
                if bucket is None:
                    _plain[len(v)] = {v}
                    _plain_lengths = tuple(sorted(_plain, reverse=True))
                else:
                    bucket.add(v)
            elif _V2_TOKEN.fullmatch(v) and len(v.rsplit("/", 1)[1]) >= _WORD_MIN:
                _v2_tokens.add(v)  # its secret part is a plain secret, scrubbed on its own
            else:
                other = list(_other)
                bisect.insort(other, v, key=lambda x: -len(x))
                _other = other


def _redact_word(m: re.Match[str]) -> str:
    """The word with every registered alphanumeric secret in it replaced (longest first)."""
    word = m.group()
    n = len(word)
    lengths = _plain_lengths
    if n in _plain and word in _plain[n]:
        return REDACTED
    if not lengths or n < lengths[-1]:
        return word
    parts: list[str] = []
    start = i = 0
    shortest = lengths[-1]
    while i + shortest <= n:
        for length in lengths:
            if i + length <= n and word[i:i + length] in _plain[length]:
                parts += (word[start:i], REDACTED)
                i = start = i + length
                break
        else:
            i += 1
    if not parts:
        return word
    parts.append(word[start:])
    return "".join(parts)


def _redact_v2(m: re.Match[str]) -> str:
    return REDACTED if m.group() in _v2_tokens else m.group()


def redact(text: str) -> str:
    """Return ``text`` with every registered secret replaced."""
    for s in _other:
        if s in text:
            text = text.replace(s, REDACTED)
    if _v2_tokens and "v2/" in text:
        text = _V2_TOKEN.sub(_redact_v2, text)
    if _plain_lengths:
        text = _WORD.sub(_redact_word, text)
    return text


_TOKEN_TAIL = re.compile(r"[A-Za-z0-9/-]+\Z")  # what a plain secret or a v2 token is made of


class StreamRedactor:
    """:func:`redact` for text that arrives in pieces cut anywhere (a program's output, read
    from a pipe): a secret split across two pieces is caught as well.

    :meth:`feed` returns its text redacted, except for a tail that may be the start of a
    secret whose rest is still to come: that tail is held and put in front of the next piece.
    It is at most one character shorter than the longest registered secret, and only the
    trailing run of token characters (``[A-Za-z0-9/-]``) -- or, if a secret of another shape
    is registered, the unfinished last line. :meth:`release` hands the held tail out
    (redacted) when no more text is coming.
    """

    def __init__(self) -> None:
        self._held = ""

    @property
    def holding(self) -> bool:
        return bool(self._held)

    def feed(self, text: str) -> str:
        if self._held:
            text, self._held = self._held + text, ""
        # Redact the whole text first: every secret that ends inside it is gone, whatever
        # is held back. Only a secret that starts in the last (longest - 1) characters can
        # still be unfinished.
        text = redact(text)
        keep = _longest - 1
        if keep <= 0 or not text or text[-1] == "\n":
            return text
        tail = text[-keep:]
        if _other:
            held = len(tail) - (tail.rfind("\n") + 1)
        else:
            m = _TOKEN_TAIL.search(tail)
            held = len(m.group()) if m else 0
        if held:
            self._held = text[-held:]
            text = text[:-held]
        return text

    def release(self) -> str:
        """The held tail, redacted; nothing is held afterwards."""
        held, self._held = self._held, ""
        return redact(held) if held else ""


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, msg, pid, context fields, exception."""

    def __init__(self, cluster_id: str = "") -> None:
        super().__init__()
        self.cluster_id = cluster_id

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "PID": record.process,
        }
        if self.cluster_id:
            obj["ClusterID"] = self.cluster_id
        for key in CONTEXT_FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                obj[key] = value
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            for key, value in extra.items():
                obj.setdefault(key, value)
        if record.exc_info:
            obj["error"] = self.formatException(record.exc_info)
        return redact(json.dumps(obj, default=str))


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ctx = " ".join(
            f"{k}={getattr(record, k)}" for k in CONTEXT_FIELDS if getattr(record, k, None)
        )
        return redact(f"{line} {ctx}" if ctx else line)


def setup_logging(level: str = "info", fmt: str = "json", cluster_id: str = "") -> None:
    """Configure the root logger for a crunchgate process (entry points only)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter(cluster_id) if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    lvl = os.environ.get("CRUNCHGATE_LOG_LEVEL", level).upper()
    if lvl == "DEBUG" or lvl == "TRACE":
        root.setLevel(logging.DEBUG)
    else:
        root.setLevel(getattr(logging, lvl, logging.INFO))
    # Third-party chatter stays at warning unless we are debugging.
    for noisy in ("aiohttp.access", "asyncssh", "botocore", "urllib3", "hpack", "h2"):
        logging.getLogger(noisy).setLevel(
            logging.DEBUG if root.level == logging.DEBUG else logging.WARNING
        )


class ContextAdapter(logging.LoggerAdapter[logging.Logger]):
    """A logger that adds fixed context fields (e.g. container_uuid) to every record."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        extra = dict(self.extra or {})
        extra.update(kwargs.get("extra") or {})
        kwargs["extra"] = extra
        return msg, kwargs


def get_logger(component: str, **context: Any) -> logging.Logger | ContextAdapter:
    logger = logging.getLogger(f"crunchgate.{component}")
    return ContextAdapter(logger, context) if context else logger
