"""Fixture: an LSF simulator instance (tests/lsfsim) in a temp dir.

``lsf_sim`` gives a :class:`LsfSim` whose ``bin_dir`` holds ``bsub``/``bjobs``/``bkill``; its
``env()`` puts that directory first on PATH (and sets ``LSFSIM_STATE``), so a dispatcher started
with that environment finds the fake commands exactly as it would find real LSF's. The finaliser
kills every job process the simulator started, by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.paths import REPO_ROOT
from tests.lsfsim import sim

_SHIM = """#!{python} -S
import sys
sys.path.insert(0, {root!r})
from tests.lsfsim.sim import main
sys.exit(main({command!r}, state_dir={state!r}))
"""


class LsfSim:
    """A simulator state directory plus a ``bin/`` of fast shims pointing at it."""

    def __init__(self, root: Path, config: dict[str, Any] | None = None) -> None:
        self.state_dir = sim.init_state_dir(root, config)
        self.bin_dir = root / "bin"
        self.bin_dir.mkdir(exist_ok=True)
        for command in ("bsub", "bjobs", "bkill"):
            p = self.bin_dir / command
            # The interpreter itself (not a pyenv shim) with -S: ~15 ms per command, like LSF's
            # own client startup, instead of ~100 ms.
            p.write_text(_SHIM.format(python=sys.executable, root=str(REPO_ROOT),
                                      command=command, state=str(self.state_dir)))
            p.chmod(0o755)

    # --- environment -------------------------------------------------------------------------

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default os.environ) with the simulator's bin first on PATH."""
        e = dict(os.environ if base is None else base)
        e["PATH"] = f"{self.bin_dir}{os.pathsep}{e.get('PATH', '')}"
        e["LSFSIM_STATE"] = str(self.state_dir)
        return e

    @contextlib.contextmanager
    def on_path(self) -> Iterator[None]:
        """Temporarily make this process's PATH find the simulator (for in-process runners)."""
        old = os.environ.get("PATH", "")
        os.environ["PATH"] = f"{self.bin_dir}{os.pathsep}{old}"
        try:
            yield
        finally:
            os.environ["PATH"] = old

    # --- configuration and faults -------------------------------------------------------------

    def configure(self, **changes: Any) -> None:
        """Change the simulator config (hosts, kill_grace_s, ...) between commands."""
        path = self.state_dir / sim.CONFIG_FILE
        cfg = json.loads(path.read_text())
        cfg.update(changes)
        path.write_text(json.dumps(cfg, indent=2))

    def inject(self, command: str, mode: str = "fail", **fields: Any) -> None:
        """Make ``command`` misbehave: mode fail|hang|banner|fail_after_submit|hang_after_submit."""
        (self.state_dir / "faults" / f"{command}.json").write_text(
            json.dumps(dict(fields, mode=mode)))

    def clear(self, command: str) -> None:
        (self.state_dir / "faults" / f"{command}.json").unlink(missing_ok=True)

    # --- inspection ---------------------------------------------------------------------------

    def jobs(self) -> list[dict[str, Any]]:
        """Every job the simulator knows (all states), oldest first."""
        state = json.loads((self.state_dir / sim.STATE_FILE).read_text())
        return sorted(state["jobs"].values(), key=lambda j: int(j["id"]))

    def jobs_named(self, name: str) -> list[dict[str, Any]]:
        return [j for j in self.jobs() if j["name"] == name]

    def calls(self, command: str | None = None) -> list[dict[str, Any]]:
        """Every simulator command run so far (``{"t", "command", "argv"}``), oldest first."""
        try:
            lines = (self.state_dir / "calls.jsonl").read_text().splitlines()
        except FileNotFoundError:
            return []
        calls = [json.loads(ln) for ln in lines if ln]
        return [c for c in calls if command is None or c["command"] == command]

    def script(self, job_id: str) -> str:
        return (self.state_dir / "jobs" / f"{job_id}.sh").read_text()

    def wait_for(self, pred: Callable[[], Any], timeout_s: float = 30, what: str = "") -> Any:
        """Poll ``pred`` until truthy; fail the test after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            v = pred()
            if v:
                return v
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what or pred}")
            time.sleep(0.05)

    # --- teardown -----------------------------------------------------------------------------

    def kill_all(self) -> None:
        """Kill every process the simulator started (wrappers and job process groups)."""
        try:
            jobs = self.jobs()
        except (OSError, ValueError):
            return
        for j in jobs:
            for key, group in (("job_pid", True), ("wrapper_pid", False)):
                pid = j.get(key)
                if not pid:
                    continue
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    if group:
                        os.killpg(pid, signal.SIGKILL)
                    else:
                        os.kill(pid, signal.SIGKILL)


@pytest.fixture
def lsf_sim(tmp_path: Path) -> Iterator[LsfSim]:
    """A fresh simulator with the default two hosts (4 slots / 16 GiB each; 2 GPUs on one)."""
    s = LsfSim(tmp_path / "lsfsim")
    try:
        yield s
    finally:
        s.kill_all()


@pytest.fixture
def lsf_sim_factory(tmp_path: Path) -> Iterator[Callable[..., LsfSim]]:
    """Build simulators with a custom config: ``lsf_sim_factory(hosts=[...], kill_grace_s=1)``."""
    made: list[LsfSim] = []

    def make(**config: Any) -> LsfSim:
        s = LsfSim(tmp_path / f"lsfsim{len(made)}", config)
        made.append(s)
        return s

    try:
        yield make
    finally:
        for s in made:
            s.kill_all()
