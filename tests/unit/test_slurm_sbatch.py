"""sbatch argument list and environment (reference 3.1, 3.4, 7.1 argument cases)."""

from __future__ import annotations

import pytest

from dispatcher.config import ClusterConfig, InstanceType, MiB
from dispatcher.core.sizing import ConstraintsNotSatisfiable
from dispatcher.slurm.sbatch import (
    SbatchArgumentsError,
    sbatch_args,
    sbatch_environment,
    substitute,
)

DEFAULT_LIST = ["--job-name=%U", "--mem=%M", "--cpus-per-task=%C", "--tmp=%T", "--partition=%P"]


def cfg(**slurm: object) -> ClusterConfig:
    c = ClusterConfig()
    c.cluster_id = "zzzzz"
    for k, v in slurm.items():
        setattr(c.containers.slurm, k, v)
    return c


def queued_container() -> dict:
    """The reference fixture zzzzz-dz642-queuedcontainer."""
    return {
        "uuid": "zzzzz-dz642-queuedcontainer",
        "priority": 1,
        "runtime_constraints": {"ram": 12000000000, "vcpus": 4},
        "mounts": {
            "/tmp": {"kind": "tmp", "capacity": 24000000000},
            "/var/spool/cwl": {"kind": "tmp", "capacity": 24000000000},
        },
        "container_image": "",
        "scheduling_parameters": {},
    }


def small_container(**extra: object) -> dict:
    ctr = {
        "uuid": "123",
        "runtime_constraints": {"ram": 250000000, "vcpus": 2},
        "scheduling_parameters": {},
        "mounts": {},
    }
    ctr.update(extra)
    return ctr


def test_missing_from_squeue_args() -> None:
    # 7.1 TestMissingFromSqueue (ReserveExtraRAM default 550 MiB); no partitions -> dropped
    assert sbatch_args(cfg(), queued_container()) == [
        "--nice=10000", "--no-requeue", "--job-name=zzzzz-dz642-queuedcontainer",
        "--mem=11995", "--cpus-per-task=4", "--tmp=45777",
    ]


@pytest.mark.parametrize("lst", [[], ["--arg1=v1", "--arg2"]])
def test_sbatch_args_list_verbatim(lst: list[str]) -> None:
    assert sbatch_args(cfg(sbatch_arguments_list=lst), small_container()) == [
        "--nice=10000", "--no-requeue", *lst
    ]


def test_sbatch_args_gpu() -> None:
    c = cfg(
        sbatch_arguments_list=["--account=accountname", *DEFAULT_LIST],
        sbatch_gpu_arguments_list=["--gpus=%G", "--partition=gpupartition"],
    )
    ctr = small_container()
    ctr["runtime_constraints"]["gpu"] = {
        "stack": "cuda", "device_count": 3, "driver_version": "11.0", "hardware_target": ["8.0"],
    }
    gpu_list = list(c.containers.slurm.sbatch_gpu_arguments_list)
    assert sbatch_args(c, ctr) == [
        "--nice=10000", "--no-requeue", "--account=accountname", "--job-name=123", "--mem=789",
        "--cpus-per-task=2", "--tmp=0", "--gpus=3", "--partition=gpupartition",
    ]
    # the config's lists are not modified
    assert c.containers.slurm.sbatch_gpu_arguments_list == gpu_list
    assert len(c.containers.slurm.sbatch_arguments_list) == 6


def test_no_gpu_arguments_without_gpus() -> None:
    c = cfg(sbatch_gpu_arguments_list=["--gpus=%G", "--partition=gpupartition"])
    assert not any("gpu" in a for a in sbatch_args(c, small_container()))


def _types(c: ClusterConfig, *specs: tuple[str, float, int, int]) -> None:
    for name, price, ram, vcpus in specs:
        c.instance_types[name] = InstanceType(name=name, price=price, ram=ram, vcpus=vcpus)


def test_instance_type_constraint() -> None:
    c = cfg(sbatch_arguments_list=["--constraint=instancetype=%I"])
    c.containers.reserve_extra_ram = 0
    c.containers.local_keep_blob_buffers_per_vcpu = 0
    _types(
        c,
        ("a1.tiny", 0.02, 128000000, 1),
        ("a1.small", 0.04, 256000000, 2),
        ("a1.medium", 0.08, 512000000, 4),
        ("a1.large", 0.16, 1024000000, 8),
    )
    assert sbatch_args(c, small_container()) == [
        "--nice=10000", "--no-requeue", "--constraint=instancetype=a1.medium"
    ]


def test_instance_type_none_configured_gives_empty() -> None:
    c = cfg(sbatch_arguments_list=["--constraint=instancetype=%I"])
    assert sbatch_args(c, small_container()) == [
        "--nice=10000", "--no-requeue", "--constraint=instancetype="
    ]


def test_instance_type_too_small_is_unsatisfiable_even_without_percent_i() -> None:
    c = cfg()
    c.containers.reserve_extra_ram = 0
    c.containers.local_keep_blob_buffers_per_vcpu = 0
    _types(c, ("a1.tiny", 0.02, 128000000, 1))
    with pytest.raises(ConstraintsNotSatisfiable) as ei:
        sbatch_args(c, small_container())
    assert [t.name for t in ei.value.available_types] == ["a1.tiny"]
    assert "a1.tiny" in ei.value.report("123")


def test_partitions() -> None:
    ctr = small_container(scheduling_parameters={"partitions": ["blurb", "b2"]})
    assert sbatch_args(cfg(), ctr)[-2:] == ["--tmp=0", "--partition=blurb,b2"]


def test_unknown_substitution() -> None:
    with pytest.raises(SbatchArgumentsError, match=r"Unknown substitution parameter %  in .*"):
        sbatch_args(cfg(sbatch_arguments_list=["--bad% template"]), small_container())
    with pytest.raises(SbatchArgumentsError, match=r"%Z"):
        substitute("--x=%Z", {})


def test_substitution_details() -> None:
    values = {"W": "0", "P": "", "U": "u"}
    assert substitute("100%%", values) == "100%"
    assert substitute("trailing%", values) == "trailing%"
    assert substitute("a%\nb", values) == "a%\nb"
    assert substitute("--time=%W", values) is None
    assert substitute("--partition=%P", values) is None
    assert substitute("--output=/tmp/slurm-%%j-%U.out", values) == "--output=/tmp/slurm-%j-u.out"


def test_max_run_time_minutes_rounded_up() -> None:
    c = cfg(sbatch_arguments_list=["--time=%W"])
    ctr = small_container(scheduling_parameters={"max_run_time": 3601})
    assert sbatch_args(c, ctr) == ["--nice=10000", "--no-requeue", "--time=61"]
    ctr = small_container(scheduling_parameters={"max_run_time": 0})
    assert sbatch_args(c, ctr) == ["--nice=10000", "--no-requeue"]


def test_keep_cache_and_reserve_in_memory() -> None:
    c = cfg(sbatch_arguments_list=["--mem=%M"])
    c.containers.reserve_extra_ram = 256 * MiB
    ctr = small_container()
    ctr["runtime_constraints"]["keep_cache_ram"] = 100 * MiB
    # ceil((250000000 + 100 MiB + 256 MiB) / MiB) = ceil(238.42 + 356) = 595
    assert sbatch_args(c, ctr)[-1] == "--mem=595"


@pytest.mark.parametrize(
    "bad",
    ["a,b", "x --wrap=id", "--wrap=touch /tmp/pwned", "p'q", "p\nq", "$(id)", "`id`", "", "a b"],
)
def test_hostile_partition_names_are_refused(bad: str) -> None:
    ctr = small_container(scheduling_parameters={"partitions": [bad]})
    with pytest.raises(SbatchArgumentsError, match="invalid Slurm partition name"):
        sbatch_args(cfg(), ctr)


def test_partitions_must_be_a_list() -> None:
    with pytest.raises(SbatchArgumentsError):
        sbatch_args(cfg(), small_container(scheduling_parameters={"partitions": "big"}))


def test_environment() -> None:
    c = cfg(sbatch_environment_variables={"ARVADOS_KEEP_SERVICES": "http://k:25107"})
    c.services.controller.external_url = "https://ctrl.example:8443"
    c.system_root_token = "v2/zzzzz-gj3su-000000000000000/secretsecretsecret"
    c.tls.insecure = True
    assert sbatch_environment(c) == {
        "ARVADOS_API_HOST": "ctrl.example:8443",
        "ARVADOS_API_TOKEN": "v2/zzzzz-gj3su-000000000000000/secretsecretsecret",
        "ARVADOS_API_HOST_INSECURE": "1",
        "ARVADOS_KEEP_SERVICES": "http://k:25107",
    }
    c.tls.insecure = False
    assert sbatch_environment(c)["ARVADOS_API_HOST_INSECURE"] == ""
