"""Arvados identifiers, importable without the HTTP stack (crunch-run --list must start fast)."""

from __future__ import annotations

import re
import secrets

#: ``<cluster>-<type infix>-<15 chars>``, e.g. ``zzzzz-dz642-0123456789abcde`` for a container.
UUID_RE = re.compile(r"^[a-z0-9]{5}-[a-z0-9]{5}-[a-z0-9]{15}$")

_ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"


def random_alnum(length: int) -> str:
    """``length`` uniformly random lowercase alphanumerics, from the system CSPRNG.

    One draw from the whole space written in base 36: a tenth of the CPU of ``length``
    ``secrets.choice`` calls (the controller draws one UUID, and for a lock a token, per call).
    """
    n = secrets.randbelow(36**length)
    digits = []
    for _ in range(length):
        n, r = divmod(n, 36)
        digits.append(_ALNUM[r])
    return "".join(digits)
