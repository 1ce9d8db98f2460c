"""Test-suite wiring: every module in tests/helpers/ is a pytest plugin (fixtures live there).

Helpers are named by area (controller.py, slurm.py, sshd.py, ...) and imported by name from the
tests that need their non-fixture functions.
"""

from pathlib import Path

pytest_plugins = sorted(
    f"tests.helpers.{p.stem}"
    for p in (Path(__file__).parent / "helpers").glob("*.py")
    # paths.py holds constants only and is imported by other helpers first: loading it as a
    # plugin too would only make pytest warn that it cannot rewrite its asserts.
    if not p.stem.startswith("_") and p.stem != "paths"
)
