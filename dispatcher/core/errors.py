"""The exception hierarchy of ``dispatcher.core`` (sizing, job scripts, backends, the loop)."""

from __future__ import annotations


class CoreError(Exception):
    """Base class of every error raised by ``dispatcher.core``."""
