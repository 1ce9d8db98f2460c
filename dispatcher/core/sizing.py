"""Container sizing shared by every dispatcher (reference ``dispatch.md`` section 1.8).

Pure functions of the cluster config and a container record (the JSON dict the API returns):

* :func:`estimate_docker_image_size` — disk the container image will take, from the manifest
  length in its portable data hash;
* :func:`estimate_scratch_space` — tmp mounts + image + ``keep_cache_disk``;
* :func:`instance_resources_needed` — what an instance must offer (RAM inflated by 5 %, local
  keepstore buffers, ``ReserveExtraRAM``);
* :func:`choose_instance_type` — the configured instance types that fit, cheapest first, within
  ``MaximumPriceFactor`` of the cheapest.

Slurm/LSF use :func:`requested_ram_mib` (``%M``) and :func:`scratch_mib` (``%T``); the cloud
dispatcher uses :class:`InstanceResources` for packing several containers on one instance.

One deliberate difference from the reference: GPU driver versions and CUDA capabilities are
compared as version tuples (``11.10`` > ``11.9``; ``12.0.12`` is valid), not as floating point
numbers (reference 8.3).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from dispatcher.config import ClusterConfig, InstanceType
from dispatcher.core.errors import CoreError

MiB = 1 << 20

_PDH_RE = re.compile(r"^[0-9a-f]{32}\+(\d+)$")
VALID_GPU_STACKS = ("", "cuda", "rocm")


class SizingError(CoreError):
    """A container cannot be matched to the configured instance types."""


class InstanceTypesNotConfigured(SizingError):
    """``InstanceTypes`` is empty: HPC dispatchers treat this as "no constraint checking"."""

    def __init__(self) -> None:
        super().__init__("site configuration does not list any instance types")


class ConstraintsNotSatisfiable(SizingError):
    """No configured instance type can run the container.

    ``available_types`` lists every configured type, cheapest first (empty when the request
    itself is invalid, e.g. an unknown GPU stack).
    """

    def __init__(self, message: str, available_types: Iterable[InstanceType] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.available_types = list(available_types)

    def report(self, container_uuid: str) -> str:
        """The user-facing text of reference 3.2 (log record / ``runtime_status.error``)."""
        lines = [f"cannot run container {container_uuid}: {self.message}"]
        if not self.available_types:
            lines.append("No instance types are configured.")
        else:
            lines.append("Available instance types:")
            for it in self.available_types:
                lines.append(
                    f'Type "{it.name}": {it.vcpus} VCPUs, {format_bytes(it.ram)} RAM, '
                    f"{format_bytes(it.scratch)} Scratch, {it.price:f} Price"
                )
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class InstanceResources:
    """Resources one container needs on an instance, or an instance has left.

    ``shared_vcpu_used`` records that a 0-VCPU container already shares a core of this
    instance, so that an N-core container never shares an N-core instance (reference 1.8).
    """

    vcpus: int = 0
    ram: int = 0
    scratch: int = 0
    gpus: int = 0
    gpu_vram: int = 0
    shared_vcpu_used: bool = False

    @classmethod
    def of_type(cls, it: InstanceType) -> InstanceResources:
        """The full capacity of an instance of type ``it``."""
        return cls(it.vcpus, it.ram, it.scratch, it.gpu.device_count, it.gpu.vram)

    def accommodates(self, need: InstanceResources) -> bool:
        """True if ``need`` fits in what is left."""
        if self.vcpus <= 0:
            return False
        if self.shared_vcpu_used and self.vcpus <= need.vcpus:
            return False
        return (
            self.vcpus >= need.vcpus
            and self.ram >= need.ram
            and self.scratch >= need.scratch
            and self.gpus >= need.gpus
            and self.gpu_vram >= need.gpu_vram
        )

    def sub(self, need: InstanceResources) -> InstanceResources:
        """What is left after placing ``need``."""
        return InstanceResources(
            self.vcpus - need.vcpus,
            self.ram - need.ram,
            self.scratch - need.scratch,
            self.gpus - need.gpus,
            self.gpu_vram - need.gpu_vram,
            self.shared_vcpu_used or need.vcpus == 0,
        )


def format_bytes(n: int) -> str:
    """Human-readable binary size, as in the reference's type listing (``4GiB``)."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1 << 10)):
        if n >= size:
            value = n / size
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.1f}{unit}"
    return f"{n}B"


# --- estimates --------------------------------------------------------------------------------


def estimate_docker_image_size(container_image: str | None) -> int:
    """Bytes the image will need on disk, estimated from its manifest length.

    ``container_image`` is a portable data hash ``<md5>+<manifest length>``; each ~42 bytes of
    manifest beyond the first 80 stands for one 64 MiB block. Unparseable or tiny manifests
    (under 122 bytes) estimate 0.
    """
    m = _PDH_RE.match(container_image or "")
    if not m:
        return 0
    n = int(m.group(1))
    if n < 122:
        return 0
    return ((n - 80) // 42) * 64 * MiB


def _constraints(ctr: Mapping[str, Any]) -> Mapping[str, Any]:
    return ctr.get("runtime_constraints") or {}


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def estimate_scratch_space(ctr: Mapping[str, Any]) -> int:
    """Scratch bytes: tmp mounts (at least the image size) + image + ``keep_cache_disk``."""
    image = estimate_docker_image_size(ctr.get("container_image"))
    total = 0
    for mount in (ctr.get("mounts") or {}).values():
        if isinstance(mount, Mapping) and mount.get("kind") == "tmp":
            total += _int(mount.get("capacity"))
    total = max(total, image)
    total += image
    total += _int(_constraints(ctr).get("keep_cache_disk"))
    return total


def gpu_request(ctr: Mapping[str, Any]) -> dict[str, Any]:
    """The container's GPU request, converting the deprecated ``cuda`` form (reference 1.6)."""
    rc = _constraints(ctr)
    gpu = rc.get("gpu")
    if isinstance(gpu, Mapping) and (gpu.get("device_count") or gpu.get("stack")):
        return {
            "stack": gpu.get("stack") or "",
            "device_count": _int(gpu.get("device_count")),
            "driver_version": str(gpu.get("driver_version") or ""),
            "hardware_target": [str(t) for t in gpu.get("hardware_target") or []],
            "vram": _int(gpu.get("vram")),
        }
    cuda = rc.get("cuda")
    if isinstance(cuda, Mapping) and _int(cuda.get("device_count")) > 0:
        cap = cuda.get("hardware_capability")
        return {
            "stack": "cuda",
            "device_count": _int(cuda.get("device_count")),
            "driver_version": str(cuda.get("driver_version") or ""),
            "hardware_target": [str(cap)] if cap else [],
            "vram": 0,
        }
    return {"stack": "", "device_count": 0, "driver_version": "", "hardware_target": [], "vram": 0}


def instance_resources_needed(cfg: ClusterConfig, ctr: Mapping[str, Any]) -> InstanceResources:
    """What an instance must offer to run ``ctr`` (reference 1.8 ``InstanceResourcesNeeded``)."""
    rc = _constraints(ctr)
    vcpus = _int(rc.get("vcpus"))
    ram = _int(rc.get("ram")) + _int(rc.get("keep_cache_ram")) + cfg.containers.reserve_extra_ram
    buffers = cfg.containers.local_keep_blob_buffers_per_vcpu
    if buffers > 0:
        # The local keepstore: a fixed 220 MiB plus its block buffers (+10 % overhead).
        ram += 220 * MiB
        ram += buffers * vcpus * 64 * MiB * 11 // 10
    # Leave the kernel and daemons 5 % of the instance.
    ram = ram * 100 // 95
    gpu = gpu_request(ctr)
    return InstanceResources(
        vcpus=vcpus,
        ram=ram,
        scratch=estimate_scratch_space(ctr),
        gpus=gpu["device_count"],
        gpu_vram=gpu["vram"],
    )


def requested_ram_mib(cfg: ClusterConfig, ctr: Mapping[str, Any]) -> int:
    """``%M`` of sbatch/bsub templates: ceil((ram + keep_cache_ram + ReserveExtraRAM) / MiB)."""
    rc = _constraints(ctr)
    ram = _int(rc.get("ram")) + _int(rc.get("keep_cache_ram")) + cfg.containers.reserve_extra_ram
    return math.ceil(ram / MiB)


def scratch_mib(ctr: Mapping[str, Any]) -> int:
    """``%T`` of sbatch/bsub templates: ceil(scratch estimate / MiB)."""
    return math.ceil(estimate_scratch_space(ctr) / MiB)


# --- choosing an instance type ------------------------------------------------------------------


def _version(text: str) -> tuple[int, ...] | None:
    """``"11.4"`` -> (11, 4); None if not a dotted list of integers."""
    parts = text.strip().split(".")
    if not text.strip() or not all(p.isdigit() for p in parts):
        return None
    nums = [int(p) for p in parts]
    while len(nums) > 1 and nums[-1] == 0:  # "8.0" == "8"
        nums.pop()
    return tuple(nums)


def _hardware_target_ok(stack: str, type_target: str, wanted: list[str]) -> bool:
    if stack == "cuda":
        if len(wanted) > 1:
            # Several acceptable capabilities: the type must be exactly one of them.
            tv = _version(type_target)
            return tv is not None and any(_version(w) == tv for w in wanted)
        if len(wanted) == 1:
            tv, wv = _version(type_target), _version(wanted[0])
            return tv is not None and wv is not None and tv >= wv
        return False
    if stack == "rocm":
        return type_target in wanted
    return False


def _fits(it: InstanceType, need: InstanceResources, gpu: dict[str, Any], preemptible: bool) -> bool:
    if it.scratch < need.scratch or it.ram < need.ram or it.vcpus < need.vcpus:
        return False
    if it.preemptible != preemptible:
        return False
    if it.gpu.stack != gpu["stack"]:
        return False
    if it.gpu.device_count < gpu["device_count"] or it.gpu.vram < gpu["vram"]:
        return False
    if gpu["device_count"] > 0:
        have, want = _version(it.gpu.driver_version), _version(gpu["driver_version"] or "0")
        if have is None or want is None or have < want:
            return False
        if not _hardware_target_ok(gpu["stack"], it.gpu.hardware_target, gpu["hardware_target"]):
            return False
    return True


def _sort_key(it: InstanceType) -> tuple[float, int, int, int, str]:
    return (it.price, -it.ram, -it.vcpus, -it.scratch, it.name)


def choose_instance_type(cfg: ClusterConfig, ctr: Mapping[str, Any]) -> list[InstanceType]:
    """The instance types that can run ``ctr``: cheapest first, then alternatives priced within
    ``Containers.MaximumPriceFactor`` of the cheapest.

    Raises :class:`InstanceTypesNotConfigured` when ``InstanceTypes`` is empty and
    :class:`ConstraintsNotSatisfiable` when nothing fits.
    """
    types = list(cfg.instance_types.values())
    if not types:
        raise InstanceTypesNotConfigured()
    gpu = gpu_request(ctr)
    if gpu["stack"] not in VALID_GPU_STACKS:
        raise ConstraintsNotSatisfiable(
            f'Invalid GPU stack "{gpu["stack"]}", expected to be blank or one of '
            "'cuda' or 'rocm'"
        )
    need = instance_resources_needed(cfg, ctr)
    preemptible = bool((ctr.get("scheduling_parameters") or {}).get("preemptible"))
    fitting = sorted((it for it in types if _fits(it, need, gpu, preemptible)), key=_sort_key)
    if not fitting:
        raise ConstraintsNotSatisfiable(
            "constraints not satisfiable by any configured instance type",
            sorted(types, key=_sort_key),
        )
    factor = max(cfg.containers.maximum_price_factor, 1.0)
    max_price = fitting[0].price * factor
    return [it for i, it in enumerate(fitting) if i == 0 or it.price <= max_price]
