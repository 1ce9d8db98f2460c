"""Looking at processes a test started."""

from __future__ import annotations

from pathlib import Path


def alive(pid: int) -> bool:
    """True if ``pid`` is running. A process that is gone -- also between two looks -- or a
    zombie waiting to be reaped (an init that does not reap leaves them) is not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
