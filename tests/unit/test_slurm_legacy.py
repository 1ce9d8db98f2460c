"""The legacy standalone crunch-dispatch-slurm.yml (reference dispatch.md 3.15, and the
original's TestLoadLegacyConfig) and the command-line spellings that load it."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from dispatcher.config import ConfigError
from dispatcher.slurm import cli
from dispatcher.slurm.legacy import apply_legacy_config
from dispatcher.slurm.sbatch import sbatch_environment

CLUSTER = """\
Clusters:
  zzzzz:
    SystemRootToken: cluster-config-root-token-0123456789
    Services:
      Controller:
        ExternalURL: https://cluster.example:8000
    Containers:
      CrunchRunArgumentsList: [--from-cluster-config]
      SLURM:
        SbatchEnvironmentVariables:
          SITE_VAR: kept
"""

# The original's TestLoadLegacyConfig input.
LEGACY = """\
Client:
  APIHost: example.com
  AuthToken: abcdefg0123456789abcdefg0123456789
  KeepServiceURIs:
    - https://example.com/keep1
    - https://example.com/keep2
SbatchArguments: ["--foo", "bar"]
PollPeriod: 12s
PrioritySpread: 42
CrunchRunCommand: ["x-crunch-run", "--cgroup-parent-subsystem=memory"]
ReserveExtraRAM: 12345
MinRetryPeriod: 13s
BatchSize: 99
"""


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.configure_parser(parser)
    return parser.parse_args(argv)


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    cluster = tmp_path / "config.yml"
    cluster.write_text(CLUSTER)
    legacy = tmp_path / "crunch-dispatch-slurm.yml"
    legacy.write_text(LEGACY)
    # Never pick up a real /etc file while testing.
    monkeypatch.setattr(cli, "DEFAULT_LEGACY_PATH", str(tmp_path / "absent.yml"))
    monkeypatch.delenv("ARVADOS_CONFIG", raising=False)
    return cluster, legacy


def check_mapped(cfg: cli.ClusterConfig) -> None:
    c = cfg.containers
    assert cfg.services.controller.external_url == "https://example.com/"
    assert cfg.system_root_token == "abcdefg0123456789abcdefg0123456789"
    assert c.slurm.sbatch_environment_variables == {
        "SITE_VAR": "kept",
        "ARVADOS_KEEP_SERVICES": "https://example.com/keep1 https://example.com/keep2",
    }
    assert c.slurm.sbatch_arguments_list == ["--foo", "bar"]
    assert c.cloud_vms.poll_interval_s == 12
    assert c.slurm.priority_spread == 42
    assert c.crunch_run_command == "x-crunch-run"
    assert c.crunch_run_arguments_list == ["--cgroup-parent-subsystem=memory"]
    assert c.reserve_extra_ram == 12345
    assert c.min_retry_period_s == 13
    assert cfg.api.max_items_per_response == 99
    # ... and they reach sbatch's process environment (the original's configure()).
    env = sbatch_environment(cfg)
    assert env["ARVADOS_KEEP_SERVICES"] == "https://example.com/keep1 https://example.com/keep2"
    assert env["ARVADOS_API_HOST"] == "example.com"
    assert env["ARVADOS_API_TOKEN"] == "abcdefg0123456789abcdefg0123456789"


@pytest.mark.parametrize("spelling", [
    ["--legacy-crunch-dispatch-slurm-config", "{legacy}"],
    ["-legacy-crunch-dispatch-slurm-config", "{legacy}"],
    ["-legacy-crunch-dispatch-slurm-config={legacy}"],
])
def test_legacy_keys_are_mapped_as_the_original_does(
        files: tuple[Path, Path], spelling: list[str]) -> None:
    cluster, legacy = files
    argv = ["-config", str(cluster)] + [a.format(legacy=legacy) for a in spelling]
    cfg, notes = cli.load_dispatch_config(parse(argv))
    check_mapped(cfg)
    assert any("move its keys" in n for n in notes)


def test_config_pointing_at_a_legacy_file_is_read_as_one(
        files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    cluster, legacy = files
    monkeypatch.setenv("ARVADOS_CONFIG", str(cluster))
    cfg, notes = cli.load_dispatch_config(parse(["--config", str(legacy)]))
    check_mapped(cfg)
    assert "is not a cluster config file" in notes[0]


def test_default_legacy_path_is_loaded_only_if_present(
        files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    cluster, legacy = files
    cfg, notes = cli.load_dispatch_config(parse(["--config", str(cluster)]))
    assert cfg.containers.slurm.priority_spread == 0 and notes == []
    assert cfg.containers.crunch_run_arguments_list == ["--from-cluster-config"]
    monkeypatch.setattr(cli, "DEFAULT_LEGACY_PATH", str(legacy))
    cfg, _ = cli.load_dispatch_config(parse(["--config", str(cluster)]))
    check_mapped(cfg)
    cfg, _ = cli.load_dispatch_config(parse(["--config", str(cluster), "-skip-legacy"]))
    assert cfg.containers.slurm.priority_spread == 0
    cfg, _ = cli.load_dispatch_config(parse(
        ["--config", str(cluster), "--legacy-crunch-dispatch-slurm-config", ""]))
    assert cfg.containers.slurm.priority_spread == 0


def test_explicit_missing_file_and_bad_values_are_errors(files: tuple[Path, Path]) -> None:
    cluster, legacy = files
    with pytest.raises(ConfigError, match="not found"):
        cli.load_dispatch_config(parse(["--config", str(cluster),
                                        "--legacy-crunch-dispatch-slurm-config",
                                        str(legacy.parent / "nope.yml")]))
    cfg, _ = cli.load_dispatch_config(parse(["--config", str(cluster), "-skip-legacy"]))
    for doc, match in [
        ({"SbatchArguments": "--mem=1"}, "SbatchArguments: must be a list of strings"),
        ({"PollPeriod": 10}, "PollPeriod: invalid duration"),
        ({"PrioritySpread": "ten"}, "PrioritySpread: must be an integer"),
        ({"BatchSize": 0}, "BatchSize: must be at least 1"),
        ({"Client": {"APIHost": "https://x.example/"}}, "Client.APIHost"),
        ({"ReserveExtraRAM": "lots"}, "ReserveExtraRAM"),
        (["not", "a", "mapping"], "mapping"),
    ]:
        with pytest.raises(ConfigError, match=match) as ei:
            apply_legacy_config(cfg, doc, "legacy.yml")
        assert str(ei.value).startswith("legacy.yml")


def test_unknown_keys_warn_and_absent_keys_keep_the_cluster_config(
        files: tuple[Path, Path]) -> None:
    cluster, _ = files
    cfg, _ = cli.load_dispatch_config(parse(["--config", str(cluster), "-skip-legacy"]))
    warnings = apply_legacy_config(
        cfg, {"PrioritySpread": 5, "JobName": "x", "Client": {"Scheme": "http",
                                                             "Insecure": True}}, "l.yml")
    assert warnings == ["l.yml: ignoring unknown legacy key 'JobName'",
                        "l.yml: ignoring unknown legacy key 'Client.Scheme'"]
    assert cfg.containers.slurm.priority_spread == 5
    assert cfg.tls.insecure is True
    assert cfg.services.controller.external_url == "https://cluster.example:8000"
    assert cfg.containers.crunch_run_arguments_list == ["--from-cluster-config"]
    assert cfg.containers.slurm.sbatch_environment_variables == {"SITE_VAR": "kept"}
