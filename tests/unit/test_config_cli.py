"""``crunchgate config check`` / ``crunchgate config defaults`` through the real CLI."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dispatcher.config import ClusterConfig, parse_config

REPO = Path(__file__).resolve().parents[2]


def crunchgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dispatcher.cli", *args],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )


def test_check_ok(tmp_path: Path) -> None:
    p = tmp_path / "config.yml"
    p.write_text("Clusters:\n  zzzzz:\n    ManagementToken: abc\n")
    r = crunchgate("config", "check", str(p))
    assert (r.returncode, r.stdout, r.stderr) == (0, "ok: zzzzz\n", "")


def test_check_example_config() -> None:
    r = crunchgate("config", "check", str(REPO / "contrib" / "config.example.yml"))
    assert (r.returncode, r.stdout.strip()) == (0, "ok: zzzzz"), r.stderr


def test_check_unknown_key_fails_naming_path(tmp_path: Path) -> None:
    p = tmp_path / "config.yml"
    p.write_text("Clusters:\n  zzzzz:\n    Containers:\n      SLURM:\n"
                 "        SbatchArgumentList: []\n")
    r = crunchgate("config", "check", str(p))
    assert r.returncode == 1
    assert r.stdout == ""
    assert "Clusters.zzzzz.Containers.SLURM.SbatchArgumentList: unknown key" in r.stderr
    assert "did you mean SbatchArgumentsList?" in r.stderr
    assert "Traceback" not in r.stderr


def test_check_reports_every_bad_key_at_once(tmp_path: Path) -> None:
    # An unknown key, a wrong type and a bad unit, in different sections: one run, three lines,
    # each naming the file, the key path and the bad value.
    p = tmp_path / "config.yml"
    p.write_text(
        "Clusters:\n  zzzzz:\n"
        "    SystemRootToken: 12345\n"
        "    Containers:\n"
        "      MaxDispatchAttempts: ten\n"
        "      ReserveExtraRAM: 550XiB\n"
        "      LSF:\n        BsubSudoUsr: crunch\n"
        "    InstanceTypes:\n      small: {VCPUs: 2, RAM: 4 gigs}\n")
    r = crunchgate("config", "check", str(p))
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.splitlines()
    assert all(line.startswith(f"error: {p}: Clusters.zzzzz.") for line in lines), lines
    text = r.stderr
    assert "Containers.MaxDispatchAttempts: expected a whole number, got \"ten\"" in text
    assert "Containers.ReserveExtraRAM: invalid byte size \"550XiB\"" in text
    assert "Containers.LSF.BsubSudoUsr: unknown key (did you mean BsubSudoUser?)" in text
    assert "InstanceTypes.small.RAM: invalid byte size \"4 gigs\"" in text
    assert "SystemRootToken: expected a string (value not shown" in text
    assert "12345" not in text
    assert len(lines) == 5


def test_check_yaml_error_has_line(tmp_path: Path) -> None:
    p = tmp_path / "config.yml"
    p.write_text("Clusters:\n  zzzzz:\n    SystemRootToken: [oops\n")
    r = crunchgate("config", "check", str(p))
    assert r.returncode == 1
    assert f"{p}:" in r.stderr and "YAML syntax error" in r.stderr


def test_check_several_clusters_needs_cluster_flag(tmp_path: Path) -> None:
    p = tmp_path / "config.yml"
    p.write_text("Clusters:\n  aaaaa: {}\n  bbbbb:\n    Containers: {RuntimeEngine: rkt}\n")
    r = crunchgate("config", "check", str(p))
    assert r.returncode == 1 and "--cluster" in r.stderr
    r = crunchgate("config", "check", str(p), "--cluster", "aaaaa")
    assert (r.returncode, r.stdout) == (0, "ok: aaaaa\n")
    r = crunchgate("config", "check", str(p), "--cluster", "bbbbb")
    assert r.returncode == 1 and "Clusters.bbbbb.Containers.RuntimeEngine" in r.stderr


def test_check_warns_on_legacy_keys(tmp_path: Path) -> None:
    p = tmp_path / "config.yml"
    p.write_text("Clusters:\n  zzzzz:\n    Containers:\n      LSF:\n"
                 "        BsubCUDAArguments: [-gpu, num=%G]\n")
    r = crunchgate("config", "check", str(p))
    assert r.returncode == 0 and r.stdout == "ok: zzzzz\n"
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1  # printed once, not also as a log line
    assert "BsubCUDAArguments is deprecated: rename it to BsubGPUArguments" in warnings[0]


def test_check_missing_file(tmp_path: Path) -> None:
    r = crunchgate("config", "check", str(tmp_path / "absent.yml"))
    assert r.returncode == 1 and "cannot read config file" in r.stderr


def test_check_does_not_print_secrets(tmp_path: Path) -> None:
    secret = "s3cr3t-root-token-value-0123456789"
    p = tmp_path / "config.yml"
    p.write_text(f"Clusters:\n  zzzzz:\n    SystemRootToken: {secret}\n    Bogus: 1\n")
    r = crunchgate("config", "check", str(p))
    assert r.returncode == 1
    assert secret not in r.stdout + r.stderr


def test_defaults_prints_reparseable_yaml(tmp_path: Path) -> None:
    r = crunchgate("config", "defaults")
    assert r.returncode == 0
    data = yaml.safe_load(r.stdout)
    assert parse_config(data) == ClusterConfig(cluster_id="xxxxx")
    p = tmp_path / "defaults.yml"
    p.write_text(r.stdout)
    check = crunchgate("config", "check", str(p))
    assert (check.returncode, check.stdout) == (0, "ok: xxxxx\n")


def test_config_without_subcommand_is_usage_error() -> None:
    r = crunchgate("config")
    assert r.returncode == 2 and "check" in r.stderr


@pytest.mark.skipif(shutil.which("crunchgate") is None, reason="console script not installed")
def test_console_script() -> None:
    r = subprocess.run(["crunchgate", "config", "defaults"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stdout.count("ReserveExtraRAM: 550MiB") == 1
