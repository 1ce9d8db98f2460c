"""Arvados identifiers, importable without the HTTP stack (crunch-run --list must start fast)."""

from __future__ import annotations

import re

#: ``<cluster>-<type infix>-<15 chars>``, e.g. ``zzzzz-dz642-0123456789abcde`` for a container.
UUID_RE = re.compile(r"^[a-z0-9]{5}-[a-z0-9]{5}-[a-z0-9]{15}$")
