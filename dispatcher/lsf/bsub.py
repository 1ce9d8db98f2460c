"""The bsub argument list, environment and job script for one container (reference
``dispatch.md`` 4.3). Pure functions of the cluster config and the container record.

Argument list: ``bsub``, each element of ``Containers.LSF.BsubArgumentsList`` after ``%``
substitution, then -- only when the container asks for GPUs -- each element of
``BsubGPUArguments``; with ``BsubSudoUser`` set, the whole thing is prefixed with
``sudo -E -u <user>``.

Substitutions (``%`` + one character, scanned left to right):

====  ==========================================================================================
%%    ``%`` (so ``%%J`` reaches bsub as ``%J``, which LSF expands to the job id)
%U    container UUID
%C    ``runtime_constraints.vcpus``
%M    ceil((ram + keep_cache_ram + ReserveExtraRAM) / MiB)
%T    ceil(scratch estimate / MiB)
%G    ``gpu.device_count``
%W    minutes: max_run_time (or MaxRunTimeDefault) + MaxRunTimeOverhead, rounded up; 0 if both
      max_run_time and the default are 0
====  ==========================================================================================

An unknown token, or a token whose value is empty, is an error (all of them reported, joined
with ", ", as the reference does). An element that is exactly ``%W`` right after ``-W`` or
``-We`` is dropped together with that flag when the value is 0; ``%W`` anywhere else is
substituted, even as ``0``. A lone ``%`` at the end of an element stays.

Every element is one argv element, never shell text: nothing a container record holds can
become an option or a command (the only container-derived strings are the UUID and numbers).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from dispatcher.config import ClusterConfig
from dispatcher.core import sizing
from dispatcher.core.jobscript import container_job_script
from dispatcher.lsf.parse import LsfError

TEMPLATE_NAME = "lsf"


class BsubArgumentsError(LsfError):
    """The bsub argument list cannot be built (bad template); retrying will not help."""


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def max_run_minutes(cfg: ClusterConfig, ctr: Mapping[str, Any]) -> int:
    """``%W``: the run time limit in minutes, overhead included; 0 means "no limit"."""
    lsf = cfg.containers.lsf
    seconds: float = _int((ctr.get("scheduling_parameters") or {}).get("max_run_time"))
    if seconds == 0:
        seconds = lsf.max_run_time_default_s
    if seconds > 0:
        seconds += lsf.max_run_time_overhead_s
    return math.ceil(seconds / 60)


def substitution_values(cfg: ClusterConfig, ctr: Mapping[str, Any]) -> dict[str, str]:
    """The value of every ``%`` token for ``ctr``."""
    rc = ctr.get("runtime_constraints") or {}
    return {
        "%": "%",
        "U": str(ctr.get("uuid") or ""),
        "C": str(_int(rc.get("vcpus"))),
        "M": str(sizing.requested_ram_mib(cfg, ctr)),
        "T": str(sizing.scratch_mib(ctr)),
        "G": str(sizing.gpu_request(ctr)["device_count"]),
        "W": str(max_run_minutes(cfg, ctr)),
    }


def substitute(element: str, values: Mapping[str, str], errors: list[str]) -> str:
    """Apply ``%`` substitutions to one template element, appending problems to ``errors``."""
    out: list[str] = []
    i, n = 0, len(element)
    while i < n:
        c = element[i]
        if c != "%" or i + 1 >= n:
            out.append(c)
            i += 1
            continue
        token = element[i + 1]
        value = values.get(token, "")
        if value == "":
            errors.append(f"Unknown substitution parameter %{token} in BsubArgumentsList")
        out.append(value)
        i += 2
    return "".join(out)


def bsub_arguments(cfg: ClusterConfig, ctr: Mapping[str, Any]) -> list[str]:
    """The arguments after ``bsub`` for ``ctr``. Raises :class:`BsubArgumentsError`."""
    lsf = cfg.containers.lsf
    template: list[str] = list(lsf.bsub_arguments_list)
    if sizing.gpu_request(ctr)["device_count"] > 0:
        # A new list: never append into the config's own (reference 8.3).
        template = template + list(lsf.bsub_gpu_arguments)
    values = substitution_values(cfg, ctr)
    errors: list[str] = []
    args: list[str] = []
    for idx, element in enumerate(template):
        if (
            element == "%W"
            and idx > 0
            and template[idx - 1] in ("-W", "-We")
            and values["W"] == "0"
            and args
            and args[-1] == template[idx - 1]
        ):
            args.pop()  # no run time limit: drop "-We" and "%W" both
            continue
        args.append(substitute(element, values, errors))
    if errors:
        raise BsubArgumentsError(", ".join(errors))
    return args


def bsub_argv(cfg: ClusterConfig, ctr: Mapping[str, Any]) -> list[str]:
    """The full argv: optional ``sudo -E -u <BsubSudoUser>``, ``bsub``, the arguments."""
    return with_sudo(cfg.containers.lsf.bsub_sudo_user, ["bsub", *bsub_arguments(cfg, ctr)])


def with_sudo(sudo_user: str, argv: Sequence[str]) -> list[str]:
    """Prefix ``argv`` with ``sudo -E -u <user>`` when a sudo user is configured."""
    return ["sudo", "-E", "-u", sudo_user, *argv] if sudo_user else list(argv)


def bsub_environment(cfg: ClusterConfig, controller_url: str) -> dict[str, str]:
    """Variables added to bsub's environment (LSF copies them into the job; ``sudo -E`` keeps
    them): the API host and token crunch-run needs, and the insecure flag."""
    host = urlsplit(controller_url).netloc if "//" in controller_url else controller_url
    env = {"ARVADOS_API_HOST": host, "ARVADOS_API_TOKEN": cfg.system_root_token}
    if cfg.tls.insecure:
        env["ARVADOS_API_HOST_INSECURE"] = "1"
    return env


def job_script(cfg: ClusterConfig, container_uuid: str) -> str:
    """The script bsub reads on stdin. LSF order: crunch-run, ``--runtime-engine=``, the
    configured extra arguments, the UUID (reference 4.3). Carries the gateway secret: never log
    it."""
    return container_job_script(cfg, container_uuid, template=TEMPLATE_NAME,
                                runtime_engine_first=True)
