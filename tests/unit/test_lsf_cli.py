"""dispatch-lsf CLI and config: the example config, the old BsubCUDAArguments key, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispatcher.cli import main
from dispatcher.config import ClusterConfig, load_config, parse_config
from tests.helpers.paths import REPO_ROOT


def defaults() -> ClusterConfig:
    return parse_config({"Clusters": {"zzzzz": {}}})


def test_example_config_loads_with_lsf_defaults() -> None:
    cfg = load_config(REPO_ROOT / "contrib" / "lsf" / "config.example.yml")
    lsf = cfg.containers.lsf
    assert lsf.bsub_sudo_user == "crunch"
    assert lsf.bsub_arguments_list[:2] == ["-o", "/tmp/crunch-run.%%J.out"]
    assert lsf.bsub_arguments_list == defaults().containers.lsf.bsub_arguments_list
    assert lsf.bsub_gpu_arguments == ["-gpu", "num=%G"]
    assert lsf.max_run_time_overhead_s == 300
    assert cfg.instance_types["gpunode"].gpu.device_count == 4


def test_old_bsub_cuda_arguments_key_is_read() -> None:
    cfg = parse_config({"Clusters": {"zzzzz": {"Containers": {"LSF": {
        "BsubCUDAArguments": ["-gpu", "num=%G:mode=exclusive_process"]}}}}})
    assert cfg.containers.lsf.bsub_gpu_arguments == ["-gpu", "num=%G:mode=exclusive_process"]


def test_missing_config_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dispatch-lsf", "--config", str(tmp_path / "nope.yml")]) == 2
    assert "crunchgate dispatch-lsf:" in capsys.readouterr().err


def test_go_style_config_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # arvados-dispatch-lsf's "-config FILE" works unchanged.
    assert main(["dispatch-lsf", "-config", str(tmp_path / "nope.yml")]) == 2
    assert f"{tmp_path / 'nope.yml'}: cannot read config file" in capsys.readouterr().err


def test_bad_lsf_key_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "config.yml"
    bad.write_text("Clusters:\n  zzzzz:\n    Containers:\n      LSF:\n        BsubSudoUsr: x\n")
    assert main(["dispatch-lsf", "--config", str(bad)]) == 2
    assert "BsubSudoUsr" in capsys.readouterr().err


def test_systemd_unit_runs_dispatch_lsf() -> None:
    unit = (REPO_ROOT / "contrib" / "systemd" / "crunchgate-dispatch-lsf.service").read_text()
    exec_start = [ln for ln in unit.splitlines() if ln.startswith("ExecStart=")]
    assert exec_start == [
        "ExecStart=/usr/local/bin/crunchgate dispatch-lsf --config /etc/arvados/config.yml"]
    assert "RestartPreventExitStatus=2" in unit
