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
import sys
import threading
import time
from typing import Any

REDACTED = "[REDACTED]"
CONTEXT_FIELDS = ("container_uuid", "job_id", "tunnel_id", "instance", "request_id", "user_uuid")

_secrets: set[str] = set()
_secrets_lock = threading.Lock()
# Longest first (a secret that contains another is replaced whole), rebuilt only on a change:
# a dispatcher registers one gateway secret per container it submits.
_secrets_ordered: list[str] = []


def register_secret(value: str | None) -> None:
    """Make sure ``value`` never appears in a log line. Short values are ignored."""
    if value and len(value) >= 8:
        global _secrets_ordered
        new = [value]
        # Arvados v2 tokens are "v2/<uuid>/<secret>": scrub the secret part on its own too.
        if value.startswith("v2/") and value.count("/") == 2:
            part = value.rsplit("/", 1)[1]
            if len(part) >= 8:
                new.append(part)
        with _secrets_lock:
            new = [v for v in new if v not in _secrets]
            if not new:
                return
            ordered = list(_secrets_ordered)
            for v in new:
                _secrets.add(v)
                bisect.insort(ordered, v, key=lambda x: -len(x))
            _secrets_ordered = ordered


def redact(text: str) -> str:
    """Return ``text`` with every registered secret replaced."""
    for s in _secrets_ordered:   # the list is replaced, never mutated: no lock needed
        if s in text:
            text = text.replace(s, REDACTED)
    return text


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
