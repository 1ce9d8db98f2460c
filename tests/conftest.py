"""Test-suite wiring: every module in tests/helpers/ is a pytest plugin (fixtures live there).

Helpers are named by area (controller.py, slurm.py, sshd.py, ...) and imported by name from the
tests that need their non-fixture functions.
"""

from pathlib import Path

pytest_plugins = sorted(
    f"tests.helpers.{p.stem}"
    for p in (Path(__file__).parent / "helpers").glob("*.py")
    if not p.stem.startswith("_")
)
