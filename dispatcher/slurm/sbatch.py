"""The sbatch argument list and environment for one container (reference ``dispatch.md`` 3.1,
3.4). Pure functions of the cluster config and the container record.

Argument list, in order: ``--nice=10000``, ``--no-requeue``, each element of
``Containers.SLURM.SbatchArgumentsList`` after ``%`` substitution, then -- only when the
container asks for GPUs -- each element of ``SbatchGPUArgumentsList``.

Substitutions: ``%%`` ``%U`` (UUID) ``%C`` (vcpus) ``%G`` (GPUs) ``%I`` (cheapest fitting
instance type, or empty) ``%M`` (RAM MiB incl. keep cache and ReserveExtraRAM) ``%P``
(partitions, comma-joined) ``%T`` (scratch MiB) ``%W`` (max run time, minutes). Any other
``%x`` is an error; a lone trailing ``%`` stays. An element containing ``%W`` that is 0 or
``%P`` that is empty is dropped whole.

Everything is an argv element, never shell text, so a value cannot inject an option or a
command. Partition names are additionally checked against Slurm's own character set so that a
hostile ``scheduling_parameters.partitions`` entry (``a,b``, ``x --wrap=...``, a newline) is
refused with a clear message instead of silently becoming something else.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from dispatcher.config import ClusterConfig
from dispatcher.core import sizing
from dispatcher.core.errors import CoreError

FIXED_ARGS = ("--nice=10000", "--no-requeue")

# Slurm partition names: letters, digits and a few punctuation marks; no commas (the list
# separator), blanks, quotes or shell metacharacters.
_PARTITION_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,63}$")


class SbatchArgumentsError(CoreError):
    """The sbatch argument list cannot be built; retrying will not help."""


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def partitions(ctr: Mapping[str, Any]) -> list[str]:
    """``scheduling_parameters.partitions``, validated."""
    sp = ctr.get("scheduling_parameters") or {}
    parts = sp.get("partitions") or []
    if isinstance(parts, str) or not isinstance(parts, Sequence):
        raise SbatchArgumentsError(
            "scheduling_parameters.partitions must be a list of partition names"
        )
    out = []
    for p in parts:
        if not isinstance(p, str) or not _PARTITION_RE.match(p):
            raise SbatchArgumentsError(
                f"invalid Slurm partition name {p!r} in scheduling_parameters.partitions: "
                "use letters, digits, '_', '.', '+' or '-'"
            )
        out.append(p)
    return out


def substitute(template: str, values: Mapping[str, str]) -> str | None:
    """Apply ``%`` substitutions to one template element; ``None`` means "drop the element"."""
    out: list[str] = []
    drop = False
    i = 0
    n = len(template)
    while i < n:
        c = template[i]
        if c != "%" or i + 1 >= n or template[i + 1] == "\n":
            out.append(c)
            i += 1
            continue
        k = template[i + 1]
        if k == "%":
            out.append("%")
        elif k in values:
            v = values[k]
            if (k == "W" and v == "0") or (k == "P" and v == ""):
                drop = True
            out.append(v)
        else:
            raise SbatchArgumentsError(
                f"Unknown substitution parameter %{k} in SbatchArgumentsList or "
                "SbatchGPUArgumentsList"
            )
        i += 2
    return None if drop else "".join(out)


def template_values(cfg: ClusterConfig, ctr: Mapping[str, Any]) -> dict[str, str]:
    """The value of every ``%`` token for ``ctr``.

    Chooses the instance type first: with ``InstanceTypes`` configured and none fitting this
    raises :class:`dispatcher.core.sizing.ConstraintsNotSatisfiable`, whether or not the
    template uses ``%I``.
    """
    try:
        types = sizing.choose_instance_type(cfg, ctr)
        itype = types[0].name if types else ""
    except sizing.InstanceTypesNotConfigured:
        itype = ""
    rc = ctr.get("runtime_constraints") or {}
    sp = ctr.get("scheduling_parameters") or {}
    return {
        "U": str(ctr["uuid"]),
        "C": str(_int(rc.get("vcpus"))),
        "G": str(sizing.gpu_request(ctr)["device_count"]),
        "I": itype,
        "M": str(sizing.requested_ram_mib(cfg, ctr)),
        "P": ",".join(partitions(ctr)),
        "T": str(sizing.scratch_mib(ctr)),
        "W": str(math.ceil(_int(sp.get("max_run_time")) / 60)),
    }


def sbatch_args(cfg: ClusterConfig, ctr: Mapping[str, Any]) -> list[str]:
    """The complete sbatch argument list (without the ``sbatch`` itself)."""
    slurm = cfg.containers.slurm
    values = template_values(cfg, ctr)
    args = list(FIXED_ARGS)
    templates = list(slurm.sbatch_arguments_list)
    if int(values["G"]) > 0:
        # A copy: never append into the config's own list (reference 8.3).
        templates = templates + list(slurm.sbatch_gpu_arguments_list)
    for t in templates:
        v = substitute(t, values)
        if v is not None:
            args.append(v)
    return args


def _controller_host(cfg: ClusterConfig) -> str:
    url = cfg.services.controller.external_url
    if not url:
        from dispatcher.config import ConfigError, controller_url

        try:
            url = controller_url(cfg)
        except ConfigError:
            url = ""
    if not url:
        return ""
    parts = urlsplit(url)
    return parts.netloc or parts.path


def sbatch_environment(cfg: ClusterConfig) -> dict[str, str]:
    """Variables added to sbatch's *process* environment (reference 3.1); Slurm exports them
    to the job, where crunch-run reads them. They are never written into the job script."""
    env: dict[str, str] = {}
    host = _controller_host(cfg)
    if host:
        env["ARVADOS_API_HOST"] = host
    if cfg.system_root_token:
        env["ARVADOS_API_TOKEN"] = cfg.system_root_token
    if host or cfg.system_root_token:
        env["ARVADOS_API_HOST_INSECURE"] = "1" if cfg.tls.insecure else ""
    env.update(cfg.containers.slurm.sbatch_environment_variables)
    return env
