"""Config loader: value syntaxes, error messages naming the key path, defaults, InstanceTypes,
legacy keys, and which InternalURL a service picks."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from dispatcher.config import (
    ClusterConfig,
    ConfigError,
    GiB,
    MiB,
    controller_url,
    defaults_yaml,
    format_bytesize,
    format_duration,
    listen_url,
    load_config,
    parse_bytesize,
    parse_config,
    parse_duration,
    service_internal_url,
    to_arvados_dict,
)


def cluster(body: dict[str, Any], cid: str = "zzzzz") -> ClusterConfig:
    return parse_config({"Clusters": {cid: body}})


def error_of(body: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        cluster(body)
    return str(info.value)


# --- durations ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "seconds"), [
    ("10s", 10.0), ("1m30s", 90.0), ("2h", 7200.0), ("250ms", 0.25), ("1.5h", 5400.0),
    ("0", 0.0), (0, 0.0), ("0s", 0.0), ("5m", 300.0), ("720h", 2592000.0),
    ("1h2m3s", 3723.0), ("100us", 0.0001), ("100µs", 0.0001), ("1500ns", 1.5e-6),
    (".5s", 0.5), ("1.s", 1.0), ("+3s", 3.0), (" 10s ", 10.0), ("2h45m", 9900.0),
])
def test_parse_duration(text: Any, seconds: float) -> None:
    assert parse_duration(text, "X") == pytest.approx(seconds)


@pytest.mark.parametrize("bad", [
    "10", 10, 1.5, "", "s", "10 s", "10sec", "1d", "10S", "abc", "1m30", True, None, [], "--1s",
])
def test_parse_duration_rejects(bad: Any) -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration(bad, "Clusters.zzzzz.Containers.CloudVMs.PollInterval")
    assert str(info.value).startswith("Clusters.zzzzz.Containers.CloudVMs.PollInterval: ")


def test_unitless_number_error_says_missing_unit() -> None:
    with pytest.raises(ConfigError, match="missing unit"):
        parse_duration(30, "P")
    with pytest.raises(ConfigError, match="missing unit"):
        parse_duration("30", "P")


@given(st.integers(min_value=0, max_value=10**9), st.sampled_from([1, 60, 3600]))
def test_duration_round_trip_whole_units(n: int, scale: int) -> None:
    seconds = float(n * scale)
    assert parse_duration(format_duration(seconds), "X") == seconds


@given(st.integers(min_value=1, max_value=999))
def test_duration_round_trip_milliseconds(ms: int) -> None:
    assert parse_duration(format_duration(ms / 1000), "X") == pytest.approx(ms / 1000)


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (10, "10s"), (90, "1m30s"), (300, "5m"), (7200, "2h"), (5400, "1h30m"),
    (0.25, "250ms"), (2592000, "720h"),
])
def test_format_duration_is_go_style(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


# --- byte sizes --------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "expected"), [
    (0, 0), (123, 123), ("123", 123), ("7B", 7), ("550MiB", 550 * MiB), ("16GB", 16 * 10**9),
    ("1.5GiB", 3 * GiB // 2), ("1K", 1000), ("1KB", 1000), ("1Ki", 1024), ("1KiB", 1024),
    ("2M", 2 * 10**6), ("3Mi", 3 * MiB), ("4G", 4 * 10**9), ("5Gi", 5 * GiB),
    ("1T", 10**12), ("1Ti", 1 << 40), ("1P", 10**15), ("1Pi", 1 << 50), ("1E", 10**18),
    ("1Ei", 1 << 60), ("16 GiB", 16 * GiB), ("0.5KiB", 512), (4096.0, 4096),
])
def test_parse_bytesize(value: Any, expected: int) -> None:
    assert parse_bytesize(value, "X") == expected


@pytest.mark.parametrize("bad", [
    "", "GiB", "12 parsecs", "1kb", "1mb", "1X", "1GiBB", "-1GiB", "1.2.3G", True, None, 1.5,
    [], "1 000",
])
def test_parse_bytesize_rejects(bad: Any) -> None:
    with pytest.raises(ConfigError) as info:
        parse_bytesize(bad, "Clusters.zzzzz.InstanceTypes.a.RAM")
    assert str(info.value).startswith("Clusters.zzzzz.InstanceTypes.a.RAM: ")


@given(st.integers(min_value=0, max_value=2**62))
def test_bytesize_round_trip(n: int) -> None:
    assert parse_bytesize(format_bytesize(n), "X") == n
    assert parse_bytesize(str(n), "X") == n


@given(st.integers(min_value=0, max_value=10**6),
       st.sampled_from(["K", "Ki", "M", "Mi", "G", "Gi", "T", "Ti"]),
       st.booleans())
def test_bytesize_units(n: int, prefix: str, with_b: bool) -> None:
    base = 1024 if prefix.endswith("i") else 1000
    power = "KMGT".index(prefix[0]) + 1
    text = f"{n}{prefix}{'B' if with_b else ''}"
    assert parse_bytesize(text, "X") == n * base**power


# --- error messages name the path ---------------------------------------------------------------

def test_unknown_key_names_full_path_and_suggests() -> None:
    msg = error_of({"Containers": {"SLURM": {"SbatchArgumentList": []}}})
    assert msg == ("Clusters.zzzzz.Containers.SLURM.SbatchArgumentList: unknown key "
                   "(did you mean SbatchArgumentsList?)")


def test_unknown_key_without_suggestion() -> None:
    msg = error_of({"Containers": {"Zebra": 1}})
    assert msg == "Clusters.zzzzz.Containers.Zebra: unknown key"


def test_unknown_top_level_and_cluster_keys() -> None:
    with pytest.raises(ConfigError, match=r"^Cluster: unknown top-level key"):
        parse_config({"Cluster": {}})
    assert error_of({"ManagmentToken": "x"}).startswith(
        "Clusters.zzzzz.ManagmentToken: unknown key (did you mean ManagementToken?)")


@pytest.mark.parametrize(("body", "fragments"), [
    ({"Containers": {"MaxDispatchAttempts": "ten"}},
     ["Clusters.zzzzz.Containers.MaxDispatchAttempts", '"ten"', "whole number"]),
    ({"Containers": {"MaxDispatchAttempts": 2.5}},
     ["Clusters.zzzzz.Containers.MaxDispatchAttempts", "2.5", "whole number"]),
    ({"TLS": {"Insecure": "yes please"}}, ["Clusters.zzzzz.TLS.Insecure", "true or false"]),
    ({"Containers": {"CloudVMs": {"SSHPort": 22}}},
     ["Clusters.zzzzz.Containers.CloudVMs.SSHPort", "expected a string", '"22"']),
    ({"Containers": {"SLURM": {"SbatchArgumentsList": "--exclusive"}}},
     ["Clusters.zzzzz.Containers.SLURM.SbatchArgumentsList", "expected a list"]),
    ({"Containers": {"SLURM": {"SbatchArgumentsList": ["--a", 3]}}},
     ["Clusters.zzzzz.Containers.SLURM.SbatchArgumentsList[1]", "expected a string"]),
    ({"Containers": {"SLURM": {"SbatchEnvironmentVariables": {"A": 1}}}},
     ["Clusters.zzzzz.Containers.SLURM.SbatchEnvironmentVariables.A", "expected a string"]),
    ({"Containers": "lots"}, ["Clusters.zzzzz.Containers", "expected a mapping"]),
    ({"Containers": {"MaximumPriceFactor": "cheap"}},
     ["Clusters.zzzzz.Containers.MaximumPriceFactor", "expected a number"]),
])
def test_wrong_type_names_path_value_and_type(body: dict[str, Any], fragments: list[str]) -> None:
    msg = error_of(body)
    assert msg.startswith(fragments[0] + ":")
    for f in fragments[1:]:
        assert f in msg


@pytest.mark.parametrize(("body", "path", "value"), [
    ({"Containers": {"CloudVMs": {"PollInterval": "10 parsecs"}}},
     "Clusters.zzzzz.Containers.CloudVMs.PollInterval", '"10 parsecs"'),
    ({"Containers": {"ReserveExtraRAM": "550 MegaBytes"}},
     "Clusters.zzzzz.Containers.ReserveExtraRAM", '"550 MegaBytes"'),
    ({"InstanceTypes": {"big": {"RAM": "4 gigs"}}}, "Clusters.zzzzz.InstanceTypes.big.RAM",
     '"4 gigs"'),
    ({"Crunchgate": {"CommandTimeout": 60}}, "Clusters.zzzzz.Crunchgate.CommandTimeout", "60"),
])
def test_bad_unit_names_path_and_value(body: dict[str, Any], path: str, value: str) -> None:
    msg = error_of(body)
    assert msg.startswith(path + ":")
    assert value in msg


@pytest.mark.parametrize(("body", "path"), [
    ({"Containers": {"MaxDispatchAttempts": -1}}, "Clusters.zzzzz.Containers.MaxDispatchAttempts"),
    ({"Containers": {"MinRetryPeriod": "-5s"}}, "Clusters.zzzzz.Containers.MinRetryPeriod"),
    ({"InstanceTypes": {"a": {"Price": -0.1}}}, "Clusters.zzzzz.InstanceTypes.a.Price"),
])
def test_negative_numbers_rejected(body: dict[str, Any], path: str) -> None:
    assert error_of(body).startswith(path + ":")


@pytest.mark.parametrize(("body", "fragment"), [
    ({"Containers": {"RuntimeEngine": "podman"}}, "Containers.RuntimeEngine"),
    ({"SystemLogs": {"Format": "xml"}}, "SystemLogs.Format"),
    ({"SystemLogs": {"LogLevel": "loud"}}, "SystemLogs.LogLevel"),
    ({"Services": {"Controller": {"ExternalURL": "ctrl.example"}}}, "Controller.ExternalURL"),
    ({"Services": {"Controller": {"ExternalURL": "https://h:notaport"}}}, "Controller.ExternalURL"),
    ({"Services": {"DispatchSLURM": {"InternalURLs": {"ftp://h:1": {}}}}}, "InternalURLs.ftp://h:1"),
    ({"Services": {"DispatchSLURM": {"InternalURLs": {"http://h:1": {"ListenURL": "x"}}}}},
     "ListenURL"),
    ({"Containers": {"CloudVMs": {"SupervisorFraction": 1.5}}}, "SupervisorFraction"),
    ({"InstanceTypes": {"g": {"GPU": {"Stack": "opencl"}}}}, "InstanceTypes.g.GPU.Stack"),
])
def test_validation(body: dict[str, Any], fragment: str) -> None:
    assert fragment in error_of(body)


@pytest.mark.parametrize("engine", ["docker", "singularity", "local"])
def test_runtime_engines_accepted(engine: str) -> None:
    assert cluster({"Containers": {"RuntimeEngine": engine}}).containers.runtime_engine == engine


# --- clusters ----------------------------------------------------------------------------------

def test_cluster_selection() -> None:
    data = {"Clusters": {"aaaaa": {"ManagementToken": "a"}, "bbbbb": {"ManagementToken": "b"}}}
    with pytest.raises(ConfigError, match=r"several clusters \(aaaaa, bbbbb\).*--cluster"):
        parse_config(data)
    assert parse_config(data, "bbbbb").management_token == "b"
    with pytest.raises(ConfigError, match="Clusters.ccccc: not in the file"):
        parse_config(data, "ccccc")
    assert parse_config({"Clusters": {"aaaaa": {}}}).cluster_id == "aaaaa"


@pytest.mark.parametrize("cid", ["zzzz", "zzzzzz", "ZZZZZ", "zz-zz", "zzzz_"])
def test_cluster_id_shape(cid: str) -> None:
    with pytest.raises(ConfigError, match="5 lowercase letters or digits"):
        parse_config({"Clusters": {cid: {}}})


@pytest.mark.parametrize("data", [None, {}, {"Clusters": {}}, {"Clusters": None}, []])
def test_no_cluster(data: Any) -> None:
    with pytest.raises(ConfigError):
        parse_config(data)


def test_empty_values_keep_defaults() -> None:
    cfg = cluster({"Containers": {"CloudVMs": None, "ReserveExtraRAM": None}, "API": None})
    assert cfg.containers.reserve_extra_ram == 550 * MiB
    assert cfg.containers.cloud_vms.poll_interval_s == 10.0


def test_site_config_with_arvados_only_keys_loads() -> None:
    # Keys that Arvados knows but crunchgate does not use must not break an existing site file.
    cfg = cluster({
        "PostgreSQL": {"Connection": {"host": "db"}, "ConnectionPool": 32},
        "API": {"DisabledAPIs": {}, "MaxTokenLifetime": "0s"},
        "Containers": {
            "JobsAPI": {"Enable": "auto"},
            "Logging": {"LogThrottleBytes": 65536},
            "SLURM": {"Managed": {"DNSServerConfDir": ""}},
            "CloudVMs": {"DriverParameters": {"Region": "us-east-1", "SecurityGroupIDs": {"sg": {}}}},
        },
        "Services": {"SSO": {"ExternalURL": ""}, "Keepstore": {"InternalURLs": {
            "http://keep0:25107": {"Rendezvous": ""}}}},
        "Volumes": {"zzzzz-nyw5e-000000000000000": {"Driver": "S3"}},
    })
    assert cfg.containers.cloud_vms.driver_parameters["Region"] == "us-east-1"
    assert cfg.postgresql["ConnectionPool"] == 32


# --- defaults ----------------------------------------------------------------------------------

def test_defaults_match_reference() -> None:
    c = ClusterConfig()
    ct = c.containers
    # reference dispatch.md 6.7
    assert (c.system_root_token, c.management_token) == ("", "")
    assert c.tls.insecure is False
    assert c.api.max_items_per_response == 1000
    assert c.api.max_concurrent_requests == 64
    assert c.api.request_timeout_s == 300.0
    assert ct.supported_docker_image_formats == {"v2": {}}
    assert ct.log_reuse_decisions is False
    assert ct.default_keep_cache_ram == 0
    assert ct.max_dispatch_attempts == 10
    assert ct.max_retry_attempts == 3
    assert ct.always_use_preemptible_instances is False
    assert ct.preemptible_price_factor == 0
    assert ct.maximum_price_factor == 1.5
    assert ct.dispatch_private_key == ""
    assert ct.stale_lock_timeout_s == 60.0
    assert ct.crunch_run_command == "crunch-run"
    assert ct.crunch_run_arguments_list == []
    assert ct.reserve_extra_ram == 550 * MiB
    assert ct.min_retry_period_s == 0.0
    assert ct.runtime_engine == "docker"
    assert ct.local_keep_blob_buffers_per_vcpu == 1
    assert ct.local_keep_logs_to_container_log == "none"
    assert (ct.logging.log_update_period_s, ct.logging.log_update_size) == (1800.0, 32 * MiB)
    assert (ct.shell_access.admin, ct.shell_access.user) == (True, False)
    assert ct.slurm.priority_spread == 0
    assert ct.slurm.sbatch_arguments_list == [
        "--job-name=%U", "--mem=%M", "--cpus-per-task=%C", "--tmp=%T", "--partition=%P"]
    assert ct.slurm.sbatch_gpu_arguments_list == ["--gpus=%G"]
    assert ct.slurm.sbatch_environment_variables == {}
    assert ct.lsf.bsub_gpu_arguments == ["-gpu", "num=%G"]
    assert ct.lsf.bsub_sudo_user == "crunch"
    assert ct.lsf.max_run_time_overhead_s == 300.0
    assert ct.lsf.max_run_time_default_s == 0.0
    # reference dispatch.md 5.14
    vm = ct.cloud_vms
    assert vm.enable is False
    assert vm.ssh_port == "22"
    assert vm.poll_interval_s == 10.0
    assert vm.boot_probe_command == "systemctl is-system-running"
    assert vm.probe_interval_s == 10.0
    assert vm.max_probes_per_second == 10
    assert vm.timeout_signal_s == 5.0
    assert vm.timeout_stale_run_lock_s == 5.0
    assert vm.timeout_term_s == 120.0
    assert vm.max_cloud_ops_per_second == 10
    assert vm.max_concurrent_instance_create_ops == 1
    assert vm.max_instances == 64
    assert vm.max_running_containers_per_instance == 0
    assert vm.initial_quota_estimate == 0
    assert vm.supervisor_fraction == 0.5
    assert vm.sync_interval_s == 60.0
    assert vm.timeout_idle_s == 60.0
    assert vm.timeout_booting_s == 600.0
    assert vm.timeout_probe_s == 600.0
    assert vm.timeout_shutdown_s == 10.0
    assert vm.image_id == ""
    assert vm.instance_init_command == ""
    assert vm.deploy_runner_binary == "/proc/self/exe"
    assert vm.deploy_runner_directory == "/tmp/arvados-crunch-run"
    assert vm.deploy_public_key is True
    assert vm.resource_tags == {}
    assert vm.tag_key_prefix == "Arvados"
    assert vm.driver == "ec2"
    assert c.instance_types == {}


def test_defaults_yaml_reparses_to_defaults() -> None:
    text = defaults_yaml()
    data = yaml.safe_load(text)
    assert list(data["Clusters"]) == ["xxxxx"]
    assert parse_config(data) == ClusterConfig(cluster_id="xxxxx")


def test_defaults_yaml_uses_arvados_names_and_syntax() -> None:
    c = yaml.safe_load(defaults_yaml())["Clusters"]["xxxxx"]
    assert c["Containers"]["ReserveExtraRAM"] == "550MiB"
    assert c["Containers"]["CloudVMs"]["TimeoutTERM"] == "2m"
    assert c["Containers"]["LSF"]["MaxRunTimeOverhead"] == "5m"
    assert c["Containers"]["SLURM"]["SbatchGPUArgumentsList"] == ["--gpus=%G"]
    assert "DispatchLocal" in c["Services"]
    assert c["Crunchgate"]["CommandTimeout"] == "1m"


def test_non_default_config_round_trips() -> None:
    body = {
        "SystemRootToken": "root-token-xxxxxxxx",
        "Services": {"Controller": {"ExternalURL": "https://127.0.0.1:8000",
                                    "InternalURLs": {"https://127.0.0.1:8000": {}}}},
        "Containers": {"ReserveExtraRAM": "1GiB", "MinRetryPeriod": "1m30s",
                       "CloudVMs": {"PollInterval": "250ms"}},
        "InstanceTypes": {"m": {"VCPUs": 4, "RAM": "16GiB", "IncludedScratch": "100GB",
                                "Price": 0.2, "GPU": {"Stack": "rocm", "DeviceCount": 1,
                                                      "VRAM": "8GiB"}}},
    }
    cfg = cluster(body)
    dumped = to_arvados_dict(cfg, redact_secrets=False)
    assert cluster(dumped) == cfg
    assert "SystemRootToken" not in to_arvados_dict(cfg)


# --- InstanceTypes -----------------------------------------------------------------------------

def test_instance_types_map() -> None:
    cfg = cluster({"InstanceTypes": {
        "small": {"VCPUs": 2, "RAM": "4GiB", "IncludedScratch": "20GB", "AddedScratch": "10GB",
                  "Price": 0.1},
        "gpu1": {"ProviderType": "g4dn.xlarge", "VCPUs": 4, "RAM": "16GiB", "Price": 0.5,
                 "GPU": {"Stack": "cuda", "DriverVersion": "12.0", "HardwareTarget": "7.5",
                         "DeviceCount": 1, "VRAM": "16GiB"}},
    }})
    small, gpu1 = cfg.instance_types["small"], cfg.instance_types["gpu1"]
    assert (small.name, small.provider_type, small.ram) == ("small", "small", 4 * GiB)
    assert small.scratch == 30 * 10**9
    assert gpu1.provider_type == "g4dn.xlarge"
    assert (gpu1.gpu.stack, gpu1.gpu.device_count, gpu1.gpu.vram) == ("cuda", 1, 16 * GiB)


def test_instance_types_array_form_rejected() -> None:
    msg = error_of({"InstanceTypes": [{"Name": "small", "VCPUs": 1}]})
    assert msg.startswith("Clusters.zzzzz.InstanceTypes: must be a map")


def test_instance_type_name_key() -> None:
    assert cluster({"InstanceTypes": {"a": {"Name": "a"}}}).instance_types["a"].name == "a"
    assert "differs from the map key" in error_of({"InstanceTypes": {"a": {"Name": "b"}}})


def test_instance_type_unknown_key() -> None:
    assert error_of({"InstanceTypes": {"a": {"VCPU": 2}}}).startswith(
        "Clusters.zzzzz.InstanceTypes.a.VCPU: unknown key (did you mean VCPUs?)")


def test_deprecated_cuda_block_becomes_gpu() -> None:
    cfg = cluster({"InstanceTypes": {"g": {"VCPUs": 8, "CUDA": {
        "DriverVersion": "11.0", "HardwareCapability": "8.0", "DeviceCount": 2}}}})
    gpu = cfg.instance_types["g"].gpu
    assert (gpu.stack, gpu.driver_version, gpu.hardware_target, gpu.device_count) == (
        "cuda", "11.0", "8.0", 2)
    assert any("CUDA is deprecated" in w for w in cfg.warnings)
    assert "both CUDA" in error_of({"InstanceTypes": {"g": {
        "CUDA": {"DeviceCount": 1}, "GPU": {"Stack": "cuda", "DeviceCount": 1}}}})
    assert "CUDA.Devices" in error_of({"InstanceTypes": {"g": {"CUDA": {"Devices": 1}}}})


def test_preemptible_variants() -> None:
    cfg = cluster({
        "Containers": {"PreemptiblePriceFactor": 0.4},
        "InstanceTypes": {
            "a": {"VCPUs": 2, "Price": 1.0},
            "b": {"VCPUs": 4, "Price": 2.0, "Preemptible": True},
        },
    })
    assert sorted(cfg.instance_types) == ["a", "a.preemptible", "b"]
    v = cfg.instance_types["a.preemptible"]
    assert (v.name, v.preemptible, v.price, v.vcpus, v.provider_type) == (
        "a.preemptible", True, pytest.approx(0.4), 2, "a")
    assert cfg.instance_types["a"].preemptible is False


def test_preemptible_variant_name_taken_is_skipped_with_warning() -> None:
    cfg = cluster({
        "Containers": {"PreemptiblePriceFactor": 0.5},
        "InstanceTypes": {"a": {"Price": 1.0}, "a.preemptible": {"Price": 9.0, "VCPUs": 1}},
    })
    assert cfg.instance_types["a.preemptible"].price == 9.0
    assert any("already exists" in w for w in cfg.warnings)


def test_no_preemptible_variants_without_factor() -> None:
    cfg = cluster({"InstanceTypes": {"a": {"Price": 1.0}}})
    assert list(cfg.instance_types) == ["a"]


# --- legacy key names --------------------------------------------------------------------------

def test_bsub_cuda_arguments_old_name(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="crunchgate.config"):
        cfg = cluster({"Containers": {"LSF": {"BsubCUDAArguments": ["-gpu", "num=%G:mode=x"]}}})
    assert cfg.containers.lsf.bsub_gpu_arguments == ["-gpu", "num=%G:mode=x"]
    assert any("BsubCUDAArguments is deprecated" in r.getMessage() for r in caplog.records)
    assert "keep only BsubGPUArguments" in error_of(
        {"Containers": {"LSF": {"BsubCUDAArguments": [], "BsubGPUArguments": []}}})


# --- load_config -------------------------------------------------------------------------------

def test_load_config_file(tmp_path: Path) -> None:
    p = tmp_path / "config.yml"
    p.write_text("Clusters:\n  zzzzz:\n    ManagementToken: abc\n")
    assert load_config(p).management_token == "abc"


def test_load_config_yaml_error_has_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "config.yml"
    p.write_text("Clusters:\n  zzzzz:\n    ManagementToken: [unclosed\n    X: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert str(info.value).startswith(f"{p}:")
    assert "YAML syntax error" in str(info.value)
    line = int(str(info.value).split(":")[1])
    assert 3 <= line <= 5


def test_load_config_semantic_error_has_file(tmp_path: Path) -> None:
    p = tmp_path / "config.yml"
    p.write_text("Clusters:\n  zzzzz:\n    Containers: {Bogus: 1}\n")
    with pytest.raises(ConfigError, match=rf"^{p}: Clusters.zzzzz.Containers.Bogus: unknown key"):
        load_config(p)


def test_load_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yml")


def test_example_config_loads() -> None:
    example = Path(__file__).resolve().parents[2] / "contrib" / "config.example.yml"
    if not example.exists():
        pytest.skip("contrib/config.example.yml not written yet")
    cfg = load_config(example)
    assert controller_url(cfg) == "https://127.0.0.1:8000"
    assert cfg.warnings == []


# --- InternalURLs ------------------------------------------------------------------------------

def services(urls: dict[str, dict[str, str]], service: str = "DispatchSLURM") -> ClusterConfig:
    return cluster({"Services": {service: {"InternalURLs": urls}}})


@pytest.fixture
def no_service_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv("ARVADOS_SERVICE_INTERNAL_URL", raising=False)
    return monkeypatch


def test_internal_url_picks_the_local_entry(no_service_env: pytest.MonkeyPatch) -> None:
    # 192.0.2.0/24 is TEST-NET-1: never an address of this host.
    cfg = services({"http://192.0.2.10:9006": {}, "http://127.0.0.1:9006": {},
                    "http://192.0.2.11:9006": {}})
    assert service_internal_url(cfg, "DispatchSLURM") == "http://127.0.0.1:9006"
    assert service_internal_url(cfg, "dispatch_slurm") == "http://127.0.0.1:9006"


@pytest.mark.parametrize("url", ["http://localhost:9006", "http://[::1]:9006",
                                 "http://127.0.0.2:9006"])
def test_internal_url_loopback_forms(no_service_env: pytest.MonkeyPatch, url: str) -> None:
    cfg = services({url: {}, "http://192.0.2.1:9006": {}})
    assert service_internal_url(cfg, "DispatchSLURM") == url


def test_internal_url_hostname_of_this_host(no_service_env: pytest.MonkeyPatch) -> None:
    url = f"http://{socket.gethostname()}:9006"
    cfg = services({url: {}, "http://192.0.2.1:9006": {}})
    assert service_internal_url(cfg, "DispatchSLURM") == url


def test_internal_url_none_local(no_service_env: pytest.MonkeyPatch) -> None:
    cfg = services({"http://192.0.2.10:9006": {}})
    with pytest.raises(ConfigError, match="none of .* is an address of this host"):
        service_internal_url(cfg, "DispatchSLURM")


def test_internal_url_empty(no_service_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"Services\.DispatchLSF\.InternalURLs: empty"):
        service_internal_url(ClusterConfig(cluster_id="zzzzz"), "DispatchLSF")


def test_internal_url_ambiguous(no_service_env: pytest.MonkeyPatch) -> None:
    cfg = services({"http://127.0.0.1:8000": {}, "http://127.0.0.1:8001": {}}, "Controller")
    with pytest.raises(ConfigError, match="several entries are local.*ARVADOS_SERVICE_INTERNAL_URL"):
        service_internal_url(cfg, "Controller")


def test_internal_url_env_selects(no_service_env: pytest.MonkeyPatch) -> None:
    # Two controllers on one host, one config: the environment says which one this is.
    cfg = services({"http://127.0.0.1:8000": {}, "http://127.0.0.1:8001": {}}, "Controller")
    no_service_env.setenv("ARVADOS_SERVICE_INTERNAL_URL", "http://127.0.0.1:8001")
    assert service_internal_url(cfg, "Controller") == "http://127.0.0.1:8001"
    no_service_env.setenv("ARVADOS_SERVICE_INTERNAL_URL", "http://127.0.0.1:8000/")
    assert service_internal_url(cfg, "Controller") == "http://127.0.0.1:8000"
    # Even a non-local entry, when named explicitly (e.g. behind NAT).
    cfg = services({"http://192.0.2.5:8000": {}}, "Controller")
    no_service_env.setenv("ARVADOS_SERVICE_INTERNAL_URL", "http://192.0.2.5:8000")
    assert service_internal_url(cfg, "Controller") == "http://192.0.2.5:8000"


def test_internal_url_env_must_be_an_entry(no_service_env: pytest.MonkeyPatch) -> None:
    cfg = services({"http://127.0.0.1:8000": {}}, "Controller")
    no_service_env.setenv("ARVADOS_SERVICE_INTERNAL_URL", "http://127.0.0.1:9999")
    with pytest.raises(ConfigError, match="ARVADOS_SERVICE_INTERNAL_URL=http://127.0.0.1:9999 is not one of"):
        service_internal_url(cfg, "Controller")


def test_unknown_service_name(no_service_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="unknown service 'DispatchPBS'"):
        service_internal_url(ClusterConfig(), "DispatchPBS")


def test_listen_url(no_service_env: pytest.MonkeyPatch) -> None:
    cfg = services({"https://127.0.0.1:9006": {"ListenURL": "http://127.0.0.1:19006"},
                    "https://192.0.2.1:9006": {}})
    assert listen_url(cfg, "DispatchSLURM") == "http://127.0.0.1:19006"
    cfg = services({"http://127.0.0.1:9006": {}})
    assert listen_url(cfg, "DispatchSLURM") == "http://127.0.0.1:9006"


def test_controller_url() -> None:
    cfg = cluster({"Services": {"Controller": {"ExternalURL": "https://ctrl.example",
                                               "InternalURLs": {"http://127.0.0.1:8003": {}}}}})
    assert controller_url(cfg) == "https://ctrl.example"
    cfg = cluster({"Services": {"Controller": {"InternalURLs": {"http://127.0.0.1:8003": {}}}}})
    assert controller_url(cfg) == "http://127.0.0.1:8003"
    with pytest.raises(ConfigError, match="Services.Controller: no ExternalURL"):
        controller_url(ClusterConfig())


# --- the walker as a whole: any valid value of every leaf key round-trips -----------------------

def _leaf_strategies() -> dict[tuple[str, ...], st.SearchStrategy[Any]]:
    """Every scalar/list/map key of ClusterConfig (Arvados path) -> a strategy of valid values."""
    import dataclasses
    import typing

    from dispatcher import config as C

    names = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=8)
    text = st.text(max_size=12)
    out: dict[tuple[str, ...], st.SearchStrategy[Any]] = {}
    constrained: dict[str, st.SearchStrategy[Any]] = {
        "RuntimeEngine": st.sampled_from(C.RUNTIME_ENGINES),
        "Format": st.sampled_from(C.LOG_FORMATS),
        "LogLevel": st.sampled_from(C.LOG_LEVELS),
        "SupervisorFraction": st.floats(0, 1),
        "ExternalURL": st.sampled_from(["", "https://ctrl.example:8000", "http://127.0.0.1"]),
    }

    def walk(cls: type, prefix: tuple[str, ...]) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if "arv" not in f.metadata or f.name == "instance_types":
                continue
            path, tp, kind = (*prefix, f.metadata["arv"]), hints[f.name], f.metadata["kind"]
            if f.metadata["arv"] in ("InternalURLs", "ExternalPortMin", "ExternalPortMax"):
                continue
            if f.metadata["arv"] in constrained:
                out[path] = constrained[f.metadata["arv"]]
            elif kind == "duration":
                out[path] = st.integers(0, 10**6).map(lambda n: C.format_duration(n))
            elif kind == "bytesize":
                out[path] = st.integers(0, 2**50).map(C.format_bytesize)
            elif kind == "opaque":
                out[path] = st.dictionaries(names, text, max_size=3)
            elif isinstance(tp, type) and dataclasses.is_dataclass(tp):
                walk(tp, path)
            elif tp is bool:
                out[path] = st.booleans()
            elif tp is int:
                out[path] = st.integers(0, 2**31)
            elif tp is float:
                out[path] = st.floats(0, 1e6, allow_nan=False)
            elif tp is str:
                out[path] = text
            elif typing.get_origin(tp) is list:
                out[path] = st.lists(text, max_size=4)
            elif typing.get_origin(tp) is dict:
                out[path] = st.dictionaries(names.filter(lambda k: k != "SAMPLE"), text,
                                            max_size=3)
            else:
                raise AssertionError(f"no strategy for {path} {tp}")

    walk(ClusterConfig, ())
    return out


_LEAVES = _leaf_strategies()


@given(st.data())
def test_any_valid_config_round_trips(data: st.DataObject) -> None:
    chosen = data.draw(st.sets(st.sampled_from(sorted(_LEAVES)), max_size=25))
    body: dict[str, Any] = {}
    for path in chosen:
        node = body
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = data.draw(_LEAVES[path])
    cfg = cluster(body)
    again = cluster(to_arvados_dict(cfg, redact_secrets=False))
    assert again == cfg


def test_leaf_strategies_cover_the_config() -> None:
    # Guard for the property test above: it must see (nearly) every key.
    assert len(_LEAVES) > 100
    assert ("Containers", "CloudVMs", "TimeoutTERM") in _LEAVES
    assert ("Crunchgate", "SubmitConcurrency") in _LEAVES


@pytest.mark.parametrize("key", ["SystemRootToken", "ManagementToken"])
def test_wrong_type_of_secret_does_not_echo_it(key: str) -> None:
    msg = error_of({key: 98765432109876543210})
    assert msg.startswith(f"Clusters.zzzzz.{key}: expected a string")
    assert "98765432109876543210" not in msg


def test_loaded_tokens_are_registered_for_redaction() -> None:
    from dispatcher.logs import redact

    token = "v2/zzzzz-gj3su-000000000000000/registeredsecretvalue123"
    cluster({"SystemRootToken": token, "ManagementToken": "mgmt-registered-abcdef"})
    assert "registeredsecretvalue123" not in redact(f"token is {token}")
    assert "mgmt-registered-abcdef" not in redact("mgmt-registered-abcdef")


def test_load_config_duplicate_key_is_error_with_line(tmp_path: Path) -> None:
    p = tmp_path / "config.yml"
    p.write_text("Clusters:\n  zzzzz:\n    Containers:\n      MaxDispatchAttempts: 3\n"
                 "      ReserveExtraRAM: 1GiB\n      MaxDispatchAttempts: 5\n")
    with pytest.raises(ConfigError) as info:
        load_config(p)
    msg = str(info.value)
    assert msg.startswith(f"{p}:6:")
    assert "duplicate key 'MaxDispatchAttempts' (first defined on line 4)" in msg


def test_load_config_yaml_anchors_and_merges(tmp_path: Path) -> None:
    p = tmp_path / "config.yml"
    p.write_text(
        "Clusters:\n  zzzzz:\n    InstanceTypes:\n"
        "      base: &base {VCPUs: 2, RAM: 4GiB, Price: 0.1}\n"
        "      big:\n        <<: *base\n        VCPUs: 8\n"
    )
    types = load_config(p).instance_types
    assert (types["big"].vcpus, types["big"].ram) == (8, 4 * GiB)


def test_container_web_services_port_range() -> None:
    ws = cluster({}).services.container_web_services
    assert (ws.external_url, ws.external_port_min, ws.external_port_max) == ("", 0, 0)
    got = cluster({"Services": {"ContainerWebServices": {
        "ExternalURL": "https://ws.example", "ExternalPortMin": 2000,
        "ExternalPortMax": 2099}}}).services.container_web_services
    assert (got.external_port_min, got.external_port_max) == (2000, 2099)
    assert "ExternalPortMax: 70000 is not a port number" in error_of(
        {"Services": {"ContainerWebServices": {"ExternalPortMax": 70000}}})
    assert "ExternalPortMin 3000 is above ExternalPortMax 2000" in error_of(
        {"Services": {"ContainerWebServices": {"ExternalPortMin": 3000,
                                               "ExternalPortMax": 2000}}})
