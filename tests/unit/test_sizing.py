"""Sizing (reference dispatch.md 1.8, the worked examples of 3.4/4.3, and 7.14)."""

from __future__ import annotations

import pytest

from dispatcher.config import ClusterConfig, GPUSpec, InstanceType
from dispatcher.core.sizing import (
    ConstraintsNotSatisfiable,
    InstanceResources,
    InstanceTypesNotConfigured,
    choose_instance_type,
    estimate_docker_image_size,
    estimate_scratch_space,
    instance_resources_needed,
    requested_ram_mib,
    scratch_mib,
)

MiB = 1 << 20
GiB = 1 << 30
MD5 = "fa3c1a9cb6783f85f2ecda037e07b8c3"


def cfg_with(types: list[InstanceType] = (), *, reserve: int = 256 * MiB, buffers: int = 1,
             factor: float = 1.5) -> ClusterConfig:
    cfg = ClusterConfig(cluster_id="zzzzz")
    cfg.containers.reserve_extra_ram = reserve
    cfg.containers.local_keep_blob_buffers_per_vcpu = buffers
    cfg.containers.maximum_price_factor = factor
    cfg.instance_types = {t.name: t for t in types}
    return cfg


def itype(name: str, vcpus: int, ram: int, price: float, scratch: int = 100 * GiB,
          preemptible: bool = False, gpu: GPUSpec | None = None) -> InstanceType:
    return InstanceType(name=name, vcpus=vcpus, ram=ram, included_scratch=scratch, price=price,
                        preemptible=preemptible, gpu=gpu or GPUSpec())


def ctr(vcpus: int = 1, ram: int = 1 * GiB, *, image: str = "", mounts: dict | None = None,
        keep_cache_ram: int = 0, keep_cache_disk: int = 0, gpu: dict | None = None,
        preemptible: bool = False) -> dict:
    rc = {"vcpus": vcpus, "ram": ram, "keep_cache_ram": keep_cache_ram,
          "keep_cache_disk": keep_cache_disk}
    if gpu is not None:
        rc["gpu"] = gpu
    return {"uuid": "zzzzz-dz642-queuedcontainer", "container_image": image,
            "mounts": mounts or {}, "runtime_constraints": rc,
            "scheduling_parameters": {"preemptible": preemptible}}


@pytest.mark.parametrize(
    ("image", "expected"),
    [(f"{MD5}+342", 384 * MiB), (f"{MD5}+174", 128 * MiB), (f"{MD5}+34", 0),
     (f"{MD5}+121", 0), (f"{MD5}+-342", 0), ("", 0), (None, 0), ("not a pdh", 0)],
)
def test_docker_image_estimate(image, expected):
    assert estimate_docker_image_size(image) == expected


def test_scratch_for_docker_image():
    assert estimate_scratch_space(ctr(image=f"{MD5}+342")) == 805306368
    assert estimate_scratch_space(ctr(image=f"{MD5}+-342")) == 0
    assert estimate_scratch_space(ctr(image=f"{MD5}+34")) == 0


def test_scratch_lsf_example():
    # tmp 1000 B -> max(1000, 128 MiB) + 128 MiB + 8 GiB = 8448 MiB
    c = ctr(image=f"{MD5}+174", mounts={"/tmp": {"kind": "tmp", "capacity": 1000}},
            keep_cache_disk=8 * GiB)
    assert scratch_mib(c) == 8448


def test_sbatch_worked_example_mem_and_tmp():
    cfg = cfg_with(reserve=550 * MiB)
    c = ctr(vcpus=4, ram=12000000000, mounts={
        "/tmp": {"kind": "tmp", "capacity": 24000000000},
        "/var/spool/cwl": {"kind": "tmp", "capacity": 24000000000},
        "/keep": {"kind": "collection", "capacity": 10**12},
    })
    assert requested_ram_mib(cfg, c) == 11995
    assert scratch_mib(c) == 45777
    assert requested_ram_mib(cfg_with(reserve=256 * MiB), c) == 11701


def test_instance_resources_needed_arithmetic():
    cfg = cfg_with(reserve=256 * MiB, buffers=2)
    c = ctr(vcpus=3, ram=1000 * MiB, keep_cache_ram=100 * MiB)
    need = instance_resources_needed(cfg, c)
    base = 1000 * MiB + 100 * MiB + 256 * MiB + 220 * MiB + 2 * 3 * 64 * MiB * 11 // 10
    assert need.ram == base * 100 // 95
    assert need.vcpus == 3
    no_buffers = instance_resources_needed(cfg_with(reserve=0, buffers=0), ctr(ram=950))
    assert no_buffers.ram == 1000


def test_not_configured():
    with pytest.raises(InstanceTypesNotConfigured, match="does not list any instance types"):
        choose_instance_type(cfg_with([]), ctr())


SBATCH_TYPES = [
    itype("a1.tiny", 1, 128000000, 0.1),
    itype("a1.small", 2, 256000000, 0.2),
    itype("a1.medium", 2, 512000000, 0.4),
    itype("a1.large", 4, 1024000000, 0.8),
]


def test_sbatch_instance_type_constraint():
    cfg = cfg_with(SBATCH_TYPES, reserve=0, buffers=0, factor=1.0)
    chosen = choose_instance_type(cfg, ctr(vcpus=2, ram=250000000))
    assert [t.name for t in chosen] == ["a1.medium"]


def test_unsatisfiable_lists_all_types_by_price():
    cfg = cfg_with([SBATCH_TYPES[3], SBATCH_TYPES[0]], reserve=0, buffers=0)
    with pytest.raises(ConstraintsNotSatisfiable) as info:
        choose_instance_type(cfg, ctr(vcpus=8, ram=250000000))
    exc = info.value
    assert str(exc) == "constraints not satisfiable by any configured instance type"
    assert [t.name for t in exc.available_types] == ["a1.tiny", "a1.large"]
    report = exc.report("zzzzz-dz642-queuedcontainer")
    assert report.startswith("cannot run container zzzzz-dz642-queuedcontainer: constraints not")
    assert "\nAvailable instance types:\n" in report
    assert 'Type "a1.tiny": 1 VCPUs, ' in report and "0.100000 Price\n" in report


@pytest.mark.parametrize(
    "c",
    [
        ctr(ram=9 * GiB),                                   # too much RAM
        ctr(vcpus=9),                                       # too many VCPUs
        ctr(keep_cache_ram=9 * GiB),                        # huge keep_cache_ram
        ctr(mounts={"/tmp": {"kind": "tmp", "capacity": 2 * GiB}}),  # scratch
    ],
)
def test_unsatisfiable(c):
    cfg = cfg_with([itype("t", 8, 8 * GiB, 1.0, scratch=1 * GiB)])
    with pytest.raises(ConstraintsNotSatisfiable):
        choose_instance_type(cfg, c)


@pytest.mark.parametrize(
    "menu",
    [
        # (name, vcpus, ram, price, scratch); "best" must win each time.
        [("costly", 4, 8 * GiB, 2.0, 100 * GiB), ("best", 2, 4 * GiB, 1.0, 100 * GiB),
         ("small", 1, 1 * GiB, 0.5, 100 * GiB)],
        [("best", 2, 4 * GiB, 1.0, 100 * GiB), ("small", 2, 2 * GiB, 0.5, 100 * GiB)],
        [("noscratch", 2, 4 * GiB, 0.5, 1 * GiB), ("best", 2, 4 * GiB, 1.0, 100 * GiB)],
        # same price: more RAM wins
        [("best", 2, 8 * GiB, 1.0, 100 * GiB), ("other", 2, 4 * GiB, 1.0, 100 * GiB)],
        # same price and RAM: more VCPUs wins
        [("other", 2, 4 * GiB, 1.0, 100 * GiB), ("best", 4, 4 * GiB, 1.0, 100 * GiB)],
    ],
)
def test_choose_best(menu):
    cfg = cfg_with([itype(n, v, r, p, s) for n, v, r, p, s in menu], factor=0)
    chosen = choose_instance_type(cfg, ctr(vcpus=2, ram=2 * GiB,
                                           mounts={"/t": {"kind": "tmp", "capacity": 2 * GiB}}))
    assert chosen[0].name == "best"
    assert {t.price for t in chosen} == {chosen[0].price}


def test_maximum_price_factor():
    menu = [
        itype("small1", 1, 1 * GiB, 0.5), itype("small2", 8, 2 * GiB, 0.6, scratch=1 * GiB),
        itype("best+7", 8, 16 * GiB, 3.4), itype("best+5", 8, 16 * GiB, 3.0),
        itype("best+3", 8, 16 * GiB, 2.6), itype("best+2", 8, 16 * GiB, 2.4),
        itype("best+1", 8, 16 * GiB, 2.2), itype("best", 8, 16 * GiB, 2.0),
    ]
    cfg = cfg_with(menu, factor=1.5)
    chosen = choose_instance_type(cfg, ctr(vcpus=2, ram=4 * GiB,
                                           mounts={"/t": {"kind": "tmp", "capacity": 2 * GiB}}))
    assert [t.name for t in chosen] == ["best", "best+1", "best+2", "best+3", "best+5"]


def test_blob_buffers_overhead_pushes_choice():
    menu = [itype("4g", 2, 4000000000, 1.0), itype("8g", 2, 8000000000, 2.0)]
    c = ctr(vcpus=2, ram=1 * GiB)
    assert choose_instance_type(cfg_with(menu, buffers=1), c)[0].name == "4g"
    assert choose_instance_type(cfg_with(menu, buffers=16), c)[0].name == "8g"


def test_preemptible():
    menu = [itype("ondemand", 2, 4 * GiB, 1.0), itype("spot", 2, 4 * GiB, 2.0, preemptible=True),
            itype("spot-cheap", 2, 4 * GiB, 1.5, preemptible=True),
            itype("spot-small", 1, 1 * GiB, 0.1, preemptible=True)]
    cfg = cfg_with(menu, factor=1.0)
    assert [t.name for t in choose_instance_type(cfg, ctr(vcpus=2, preemptible=True))] == [
        "spot-cheap"]
    assert [t.name for t in choose_instance_type(cfg, ctr(vcpus=2))] == ["ondemand"]


def gpu_type(name, stack, count, driver, target, vram=0, price=1.0):
    return itype(name, 4, 16 * GiB, price,
                 gpu=GPUSpec(stack=stack, device_count=count, driver_version=driver,
                             hardware_target=target, vram=vram))


GPU_MENU = [
    itype("cpu", 4, 16 * GiB, 0.5),
    gpu_type("cuda-8.0", "cuda", 2, "11.0", "8.0", vram=8 * GiB, price=1.0),
    gpu_type("cuda-9.0", "cuda", 2, "12.0", "9.0", vram=16 * GiB, price=2.0),
    gpu_type("cuda-1x", "cuda", 1, "12.0", "9.0", vram=16 * GiB, price=0.9),
    gpu_type("rocm", "rocm", 2, "6.0", "gfx1100", vram=16 * GiB, price=1.0),
    gpu_type("cuda-novram", "cuda", 4, "12.0", "9.0", vram=0, price=0.8),
]


def gpu(stack="cuda", count=1, driver="11.0", targets=("8.0",), vram=0):
    return {"stack": stack, "device_count": count, "driver_version": driver,
            "hardware_target": list(targets), "vram": vram}


@pytest.mark.parametrize(
    ("request_gpu", "expected"),
    [
        (None, "cpu"),
        (gpu(count=2), "cuda-novram"),                     # cheapest with 2 devices, cap >= 8.0
        (gpu(count=2, vram=8 * GiB), "cuda-8.0"),          # VRAM 0 no longer matches a VRAM request
        (gpu(count=2, vram=8 * GiB, targets=("9.0",)), "cuda-9.0"),   # capability minimum
        (gpu(count=2, vram=8 * GiB, driver="11.5"), "cuda-9.0"),      # driver minimum
        (gpu(count=2, vram=8 * GiB, targets=("8.0", "8.6")), "cuda-8.0"),  # exact, several
        (gpu(count=2, vram=8 * GiB, targets=("8.6", "9.0")), "cuda-9.0"),
        (gpu(count=1), "cuda-novram"),
        (gpu(count=1, vram=1), "cuda-1x"),
        (gpu(stack="rocm", count=1, driver="6.0", targets=("gfx1100",)), "rocm"),
    ],
)
def test_choose_gpu(request_gpu, expected):
    cfg = cfg_with(GPU_MENU, factor=1.0)
    assert choose_instance_type(cfg, ctr(vcpus=2, gpu=request_gpu))[0].name == expected


@pytest.mark.parametrize(
    "request_gpu",
    [
        gpu(targets=()),                                    # CUDA without target: no type
        gpu(stack="rocm", count=1, driver="6.0", targets=("gfx900",)),  # not in ROCm list
        gpu(count=8),                                       # too many devices
        gpu(count=2, vram=32 * GiB),                        # too much VRAM
        gpu(count=2, targets=("8.6", "8.9")),               # exact match required, none equal
        gpu(driver="13.0"),
    ],
)
def test_choose_gpu_unsatisfiable(request_gpu):
    with pytest.raises(ConstraintsNotSatisfiable):
        choose_instance_type(cfg_with(GPU_MENU), ctr(vcpus=2, gpu=request_gpu))


def test_invalid_gpu_stack():
    with pytest.raises(ConstraintsNotSatisfiable, match="Invalid GPU stack \"opencl\"") as info:
        choose_instance_type(cfg_with(GPU_MENU), ctr(gpu=gpu(stack="opencl")))
    assert info.value.available_types == []


def test_gpu_versions_compare_as_versions_not_floats():
    # Reference 8.3: "11.10" < "11.9" as floats; crunchgate compares versions properly.
    cfg = cfg_with([gpu_type("new", "cuda", 1, "11.10", "8.0")])
    assert choose_instance_type(cfg, ctr(gpu=gpu(driver="11.9")))[0].name == "new"
    cfg = cfg_with([gpu_type("odd", "cuda", 1, "12.0.12", "8.0")])
    assert choose_instance_type(cfg, ctr(gpu=gpu(driver="12.0")))[0].name == "odd"


def test_deprecated_cuda_constraint_is_converted():
    c = ctr(vcpus=2)
    c["runtime_constraints"]["cuda"] = {"device_count": 2, "driver_version": "11.0",
                                        "hardware_capability": "8.0"}
    cfg = cfg_with(GPU_MENU, factor=1.0)
    assert choose_instance_type(cfg, c)[0].name == "cuda-novram"


def test_instance_resources_sharing_rules():
    four = InstanceResources(vcpus=4, ram=8, scratch=8)
    zero = InstanceResources(vcpus=0, ram=1, scratch=1)
    full = InstanceResources(vcpus=4, ram=1, scratch=1)
    assert four.accommodates(full)
    after_zero = four.sub(zero)
    assert after_zero.shared_vcpu_used
    # a 0-VCPU container shares one core: a 4-core container no longer fits
    assert not after_zero.accommodates(full)
    assert after_zero.accommodates(InstanceResources(vcpus=3, ram=1, scratch=1))
    assert after_zero.accommodates(zero)
    assert not four.sub(full).accommodates(zero)  # no core left at all
    assert not four.accommodates(InstanceResources(vcpus=1, ram=9))
