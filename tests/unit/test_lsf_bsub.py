"""bsub arguments, environment and job script (reference dispatch.md 4.3 and 7.6 examples)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatcher.config import ClusterConfig, GPUSpec, InstanceType
from dispatcher.lsf.bsub import (
    BsubArgumentsError,
    bsub_arguments,
    bsub_argv,
    bsub_environment,
    job_script,
    max_run_minutes,
    substitute,
)

MiB = 1 << 20
GiB = 1 << 30
UUID = "zzzzz-dz642-queuedcontainer"
IMAGE_174 = "fa3c1a9cb6783f85f2ecda037e07b8c3+174"  # manifest length 174: 128 MiB estimate


def cfg_76(**lsf: object) -> ClusterConfig:
    """The configuration of the reference's lib/lsf tests (7.6)."""
    cfg = ClusterConfig(cluster_id="zzzzz")
    cfg.system_root_token = "systemroottoken-for-tests-0123456789"
    cfg.containers.reserve_extra_ram = 256 * MiB
    cfg.containers.lsf.bsub_sudo_user = ""
    for k, v in lsf.items():
        setattr(cfg.containers.lsf, k, v)
    cfg.instance_types = {
        "biggest_available_node": InstanceType(
            name="biggest_available_node", vcpus=4, ram=100 * GiB, included_scratch=100 * GiB),
        "biggest_gpu_node": InstanceType(
            name="biggest_gpu_node", vcpus=4, ram=100 * GiB, included_scratch=100 * GiB,
            price=1.0,
            gpu=GPUSpec(stack="cuda", driver_version="11.0", hardware_target="8.0",
                        device_count=2, vram=8_000_000_000)),
    }
    return cfg


def ctr(uuid: str = UUID, **rc: object) -> dict[str, object]:
    mounts = rc.pop("mounts", {})
    image = rc.pop("image", "")
    sp = rc.pop("scheduling_parameters", {})
    return {"uuid": uuid, "container_image": image, "mounts": mounts,
            "runtime_constraints": rc, "scheduling_parameters": sp}


def head(args: list[str]) -> list[str]:
    assert args[:4] == ["-o", "/tmp/crunch-run.%J.out", "-e", "/tmp/crunch-run.%J.err"]
    return args[4:]


def test_queued_container_example() -> None:
    c = ctr(ram=12_000_000_000, vcpus=4,
            mounts={"/a": {"kind": "tmp", "capacity": 24_000_000_000},
                    "/b": {"kind": "tmp", "capacity": 24_000_000_000}})
    assert head(bsub_arguments(cfg_76(), c)) == [
        "-J", UUID, "-n", "4", "-D", "11701MB",
        "-R", "rusage[mem=11701MB:tmp=45777MB] span[hosts=1]",
        "-R", "select[mem>=11701MB]", "-R", "select[tmp>=45777MB]", "-R", "select[ncpus>=4]",
    ]  # no max_run_time and no default: "-We %W" dropped


def test_keep_cache_disk_and_image_example() -> None:
    c = ctr(ram=100_000_000, vcpus=2, keep_cache_disk=8 * GiB, image=IMAGE_174,
            mounts={"/out": {"kind": "tmp", "capacity": 1000}})
    assert head(bsub_arguments(cfg_76(), c)) == [
        "-J", UUID, "-n", "2", "-D", "352MB",
        "-R", "rusage[mem=352MB:tmp=8448MB] span[hosts=1]",
        "-R", "select[mem>=352MB]", "-R", "select[tmp>=8448MB]", "-R", "select[ncpus>=2]",
    ]


def test_locked_container_example_tmp_1mb() -> None:
    c = ctr(ram=12_000_000_000, vcpus=4, mounts={"/out": {"kind": "tmp", "capacity": 1000}})
    args = head(bsub_arguments(cfg_76(), c))
    assert args[5] == "11701MB" and args[7] == "rusage[mem=11701MB:tmp=1MB] span[hosts=1]"


def test_gpu_arguments_only_with_gpus() -> None:
    c = ctr(ram=16_000_000_000, vcpus=4, keep_cache_disk=16_000_000_000, image=IMAGE_174,
            mounts={"/out": {"kind": "tmp", "capacity": 1000}},
            gpu={"stack": "cuda", "device_count": 1, "driver_version": "11.0",
                 "hardware_target": ["8.0"], "vram": 0})
    assert head(bsub_arguments(cfg_76(), c)) == [
        "-J", UUID, "-n", "4", "-D", "15515MB",
        "-R", "rusage[mem=15515MB:tmp=15515MB] span[hosts=1]",
        "-R", "select[mem>=15515MB]", "-R", "select[tmp>=15515MB]", "-R", "select[ncpus>=4]",
        "-gpu", "num=1",
    ]
    no_gpu = ctr(ram=16_000_000_000, vcpus=4)
    assert "-gpu" not in bsub_arguments(cfg_76(), no_gpu)


def test_old_cuda_constraints_get_gpu_arguments() -> None:
    c = ctr(ram=1000, vcpus=1, cuda={"device_count": 2, "driver_version": "11.0",
                                     "hardware_capability": "8.0"})
    assert bsub_arguments(cfg_76(), c)[-2:] == ["-gpu", "num=2"]


def test_gpu_template_does_not_grow_the_config_list() -> None:
    cfg = cfg_76()
    before = list(cfg.containers.lsf.bsub_arguments_list)
    c = ctr(ram=1, vcpus=1, gpu={"stack": "cuda", "device_count": 1})
    bsub_arguments(cfg, c)
    bsub_arguments(cfg, c)
    assert cfg.containers.lsf.bsub_arguments_list == before


def test_max_run_time_example() -> None:
    c = ctr(ram=1000, vcpus=1, scheduling_parameters={"max_run_time": 124})
    assert bsub_arguments(cfg_76(), c)[-2:] == ["-We", "8"]  # 124 s + 5 min -> 8 min


@pytest.mark.parametrize("mrt,default,overhead,minutes", [
    (0, 0, 300, 0),
    (124, 0, 300, 8),
    (0, 3600, 300, 65),
    (60, 3600, 0, 1),
    (61, 0, 0, 2),
])
def test_max_run_minutes(mrt: int, default: float, overhead: float, minutes: int) -> None:
    cfg = cfg_76(max_run_time_default_s=default, max_run_time_overhead_s=overhead)
    assert max_run_minutes(cfg, ctr(scheduling_parameters={"max_run_time": mrt})) == minutes


def test_w_is_substituted_as_zero_elsewhere() -> None:
    cfg = cfg_76(bsub_arguments_list=["-We", "%W", "-W", "x%W", "-Jd", "%W"])
    assert bsub_arguments(cfg, ctr()) == ["-W", "x0", "-Jd", "0"]


def test_unknown_and_empty_substitutions() -> None:
    with pytest.raises(BsubArgumentsError,
                       match=r"^Unknown substitution parameter %Z in BsubArgumentsList$"):
        bsub_arguments(cfg_76(bsub_arguments_list=["--zebra", "%Z"]), ctr())
    # %U empty (no uuid) is an error too; all problems are reported, joined with ", ".
    with pytest.raises(BsubArgumentsError) as ei:
        bsub_arguments(cfg_76(bsub_arguments_list=["%U", "%Q"]), ctr(uuid=""))
    assert str(ei.value) == ("Unknown substitution parameter %U in BsubArgumentsList, "
                             "Unknown substitution parameter %Q in BsubArgumentsList")


def test_percent_rules() -> None:
    values = {"%": "%", "U": UUID}
    errors: list[str] = []
    assert substitute("/tmp/crunch-run.%%J.out", values, errors) == "/tmp/crunch-run.%J.out"
    assert substitute("100%", values, errors) == "100%"
    assert substitute("%%%U", values, errors) == "%" + UUID
    assert errors == []


@given(st.text(alphabet=st.characters(blacklist_characters="%", blacklist_categories=("Cs",))))
def test_elements_without_percent_pass_unchanged(s: str) -> None:
    assert bsub_arguments(cfg_76(bsub_arguments_list=[s]), ctr()) == [s]


def test_sudo_prefix_example() -> None:
    cfg = cfg_76(bsub_arguments_list=["--example", "%U"], bsub_sudo_user="crunch")
    assert bsub_argv(cfg, ctr("zzzzz-dz642-asdfasdfasdfasd")) == [
        "sudo", "-E", "-u", "crunch", "bsub", "--example", "zzzzz-dz642-asdfasdfasdfasd"]
    cfg.containers.lsf.bsub_sudo_user = ""
    assert bsub_argv(cfg, ctr("zzzzz-dz642-asdfasdfasdfasd"))[0] == "bsub"


def test_environment() -> None:
    cfg = cfg_76()
    assert bsub_environment(cfg, "https://127.0.0.1:8443") == {
        "ARVADOS_API_HOST": "127.0.0.1:8443", "ARVADOS_API_TOKEN": cfg.system_root_token}
    cfg.tls.insecure = True
    assert bsub_environment(cfg, "https://ctl.example:443/")["ARVADOS_API_HOST_INSECURE"] == "1"
    assert bsub_environment(cfg, "https://ctl.example:443/")["ARVADOS_API_HOST"] == \
        "ctl.example:443"


def test_job_script_lsf_argument_order() -> None:
    cfg = cfg_76()
    cfg.containers.crunch_run_command = "/usr/bin/crunch-run"
    cfg.containers.crunch_run_arguments_list = ["-cgroup-parent-subsystem=memory", "it's"]
    cfg.containers.runtime_engine = "singularity"
    script = job_script(cfg, UUID)
    lines = script.split("\n")
    assert lines[0] == "#!/bin/sh"
    assert lines[1].startswith("GatewayAuthSecret='")
    assert lines[1].endswith(
        " exec '/usr/bin/crunch-run' '--runtime-engine=singularity' "
        "'-cgroup-parent-subsystem=memory' 'it'\\''s' '" + UUID + "'")
    assert cfg.system_root_token not in script
