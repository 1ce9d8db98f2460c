"""Cluster configuration: the Arvados ``config.yml`` layout as typed, validated objects.

The YAML edge uses Arvados key names (``Containers.CloudVMs.PollInterval``); Python code uses
snake_case attributes with units in the name (``containers.cloud_vms.poll_interval_s``). Each
dataclass field carries its Arvados key and value kind in ``metadata`` (see :func:`key`), and one
generic walker turns a YAML mapping into these objects, so adding a key is one line.

Value kinds:
  * ``duration`` — Go-style strings ``"10s"``, ``"1m30s"``, ``"2h"``, ``"250ms"``; bare ``0``
    allowed, other unit-less numbers rejected. Stored as float seconds (attribute ends ``_s``).
  * ``bytesize`` — integers or strings with optional decimal/binary suffix
    (``K Ki M Mi G Gi T Ti P Pi E Ei`` with an optional trailing ``B``; ``550MiB``, ``16GB``,
    ``1.5GiB``). Stored as int bytes.
  * plain ``str``, ``int``, ``float``, ``bool``, ``list[str]``, ``dict[str, str]`` and nested
    dataclasses / ``dict[str, <dataclass>]``.

Errors (:class:`ConfigError`) name the full key path and the bad value, e.g.
``Clusters.zzzzz.Containers.CloudVMs.PollInterval: invalid duration "10 parsecs"``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import ipaddress
import json
import logging
import os
import re
import socket
import typing
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any
from urllib.parse import urlsplit

import yaml

from dispatcher.logs import register_secret

MiB = 1 << 20
GiB = 1 << 30


class ConfigError(ValueError):
    """The config file is malformed: message names the key path and the bad value.

    ``problems`` lists every problem found (one line each; the message joins them), so that
    ``crunchgate config check`` reports all bad keys of a file at once, not one per run.
    """

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = list(problems) if problems else [message]


def key(arv: str, default: Any = None, *, kind: str | None = None, factory: Any = None) -> Any:
    """Declare a config field: its Arvados key name, default and value kind."""
    md = {"arv": arv, "kind": kind}
    if factory is not None:
        return field(default_factory=factory, metadata=md)
    return field(default=default, metadata=md)


# --- Services ---------------------------------------------------------------------------------


@dataclass
class InternalURL:
    """One entry of a service's ``InternalURLs`` map (the URL itself is the map key)."""

    listen_url: str = key("ListenURL", "")
    # Arvados uses this for keepstore rendezvous ordering; accepted so site configs load.
    rendezvous: str = key("Rendezvous", "")


@dataclass
class Service:
    internal_urls: dict[str, InternalURL] = key("InternalURLs", factory=dict)
    external_url: str = key("ExternalURL", "")


@dataclass
class ContainerWebService(Service):
    external_port_min: int = key("ExternalPortMin", 0)
    external_port_max: int = key("ExternalPortMax", 0)


@dataclass
class Services:
    controller: Service = key("Controller", factory=Service)
    rails_api: Service = key("RailsAPI", factory=Service)
    websocket: Service = key("Websocket", factory=Service)
    dispatch_slurm: Service = key("DispatchSLURM", factory=Service)
    dispatch_lsf: Service = key("DispatchLSF", factory=Service)
    dispatch_cloud: Service = key("DispatchCloud", factory=Service)
    # crunchgate addition: the local-process dispatcher (like crunch-dispatch-local).
    dispatch_local: Service = key("DispatchLocal", factory=Service)
    container_web_services: ContainerWebService = key(
        "ContainerWebServices", factory=ContainerWebService
    )
    keepstore: Service = key("Keepstore", factory=Service)
    keepproxy: Service = key("Keepproxy", factory=Service)
    keepbalance: Service = key("Keepbalance", factory=Service)
    web_dav: Service = key("WebDAV", factory=Service)
    web_dav_download: Service = key("WebDAVDownload", factory=Service)
    workbench1: Service = key("Workbench1", factory=Service)
    workbench2: Service = key("Workbench2", factory=Service)
    health: Service = key("Health", factory=Service)
    git_http: Service = key("GitHTTP", factory=Service)
    git_ssh: Service = key("GitSSH", factory=Service)
    composer: Service = key("Composer", factory=Service)
    web_shell: Service = key("WebShell", factory=Service)


# --- Top-level sections -------------------------------------------------------------------------


@dataclass
class TLSConfig:
    certificate: str = key("Certificate", "")
    insecure: bool = key("Insecure", False)
    # Arvados has ACME settings here; accepted and unused.
    acme: dict[str, Any] = key("ACME", factory=dict, kind="opaque")
    # Last on purpose: this attribute shadows the key() helper for the rest of the class body.
    key: str = key("Key", "")


@dataclass
class APIConfig:
    max_items_per_response: int = key("MaxItemsPerResponse", 1000)
    max_concurrent_requests: int = key("MaxConcurrentRequests", 64)
    max_concurrent_rail_requests: int = key("MaxConcurrentRailsRequests", 8)
    max_queued_requests: int = key("MaxQueuedRequests", 128)
    max_queue_time_for_lock_requests_s: float = key(
        "MaxQueueTimeForLockRequests", 2.0, kind="duration"
    )
    max_gateway_tunnels: int = key("MaxGatewayTunnels", 1000)
    request_timeout_s: float = key("RequestTimeout", 300.0, kind="duration")
    max_request_size: int = key("MaxRequestSize", 134217728)
    max_index_database_read: int = key("MaxIndexDatabaseRead", 134217728)
    keep_alive_timeout_s: float = key("KeepAliveTimeout", 20.0, kind="duration")


@dataclass
class SystemLogs:
    format: str = key("Format", "json")
    log_level: str = key("LogLevel", "info")
    max_request_log_params_size: int = key("MaxRequestLogParamsSize", 2000)
    request_queue_dump_directory: str = key("RequestQueueDumpDirectory", "")


@dataclass
class GPUSpec:
    stack: str = key("Stack", "")
    driver_version: str = key("DriverVersion", "")
    hardware_target: str = key("HardwareTarget", "")
    device_count: int = key("DeviceCount", 0)
    vram: int = key("VRAM", 0, kind="bytesize")


@dataclass
class InstanceType:
    name: str = ""  # filled from the map key
    provider_type: str = key("ProviderType", "")  # default: the name
    vcpus: int = key("VCPUs", 0)
    ram: int = key("RAM", 0, kind="bytesize")
    included_scratch: int = key("IncludedScratch", 0, kind="bytesize")
    added_scratch: int = key("AddedScratch", 0, kind="bytesize")
    price: float = key("Price", 0.0)
    preemptible: bool = key("Preemptible", False)
    gpu: GPUSpec = key("GPU", factory=GPUSpec)
    # Deprecated Arvados key, converted into ``gpu`` at load time.
    cuda: dict[str, Any] = key("CUDA", factory=dict, kind="opaque")

    @property
    def scratch(self) -> int:
        return self.included_scratch + self.added_scratch


@dataclass
class ShellAccess:
    admin: bool = key("Admin", True)
    user: bool = key("User", False)


@dataclass
class ContainersLogging:
    log_update_period_s: float = key("LogUpdatePeriod", 1800.0, kind="duration")
    log_update_size: int = key("LogUpdateSize", 32 * MiB, kind="bytesize")
    max_age_s: float = key("MaxAge", 720 * 3600.0, kind="duration")
    sweep_interval_s: float = key("SweepInterval", 12 * 3600.0, kind="duration")


@dataclass
class SlurmConfig:
    priority_spread: int = key("PrioritySpread", 0)
    sbatch_arguments_list: list[str] = key(
        "SbatchArgumentsList",
        factory=lambda: [
            "--job-name=%U", "--mem=%M", "--cpus-per-task=%C", "--tmp=%T", "--partition=%P",
        ],
    )
    sbatch_gpu_arguments_list: list[str] = key(
        "SbatchGPUArgumentsList", factory=lambda: ["--gpus=%G"]
    )
    sbatch_environment_variables: dict[str, str] = key(
        "SbatchEnvironmentVariables", factory=dict
    )


@dataclass
class LSFConfig:
    bsub_sudo_user: str = key("BsubSudoUser", "crunch")
    bsub_arguments_list: list[str] = key(
        "BsubArgumentsList",
        factory=lambda: [
            "-o", "/tmp/crunch-run.%%J.out", "-e", "/tmp/crunch-run.%%J.err",
            "-J", "%U", "-n", "%C", "-D", "%MMB",
            "-R", "rusage[mem=%MMB:tmp=%TMB] span[hosts=1]",
            "-R", "select[mem>=%MMB]", "-R", "select[tmp>=%TMB]", "-R", "select[ncpus>=%C]",
            "-We", "%W",
        ],
    )
    # Old key name BsubCUDAArguments is accepted with a deprecation warning.
    bsub_gpu_arguments: list[str] = key("BsubGPUArguments", factory=lambda: ["-gpu", "num=%G"])
    max_run_time_overhead_s: float = key("MaxRunTimeOverhead", 300.0, kind="duration")
    max_run_time_default_s: float = key("MaxRunTimeDefault", 0.0, kind="duration")


@dataclass
class CloudVMsConfig:
    enable: bool = key("Enable", False)
    ssh_port: str = key("SSHPort", "22")
    poll_interval_s: float = key("PollInterval", 10.0, kind="duration")
    boot_probe_command: str = key("BootProbeCommand", "systemctl is-system-running")
    probe_interval_s: float = key("ProbeInterval", 10.0, kind="duration")
    max_probes_per_second: int = key("MaxProbesPerSecond", 10)
    timeout_signal_s: float = key("TimeoutSignal", 5.0, kind="duration")
    timeout_stale_run_lock_s: float = key("TimeoutStaleRunLock", 5.0, kind="duration")
    timeout_term_s: float = key("TimeoutTERM", 120.0, kind="duration")
    max_cloud_ops_per_second: int = key("MaxCloudOpsPerSecond", 10)
    max_concurrent_instance_create_ops: int = key("MaxConcurrentInstanceCreateOps", 1)
    max_instances: int = key("MaxInstances", 64)
    max_running_containers_per_instance: int = key("MaxRunningContainersPerInstance", 0)
    initial_quota_estimate: int = key("InitialQuotaEstimate", 0)
    supervisor_fraction: float = key("SupervisorFraction", 0.5)
    sync_interval_s: float = key("SyncInterval", 60.0, kind="duration")
    timeout_idle_s: float = key("TimeoutIdle", 60.0, kind="duration")
    timeout_booting_s: float = key("TimeoutBooting", 600.0, kind="duration")
    timeout_probe_s: float = key("TimeoutProbe", 600.0, kind="duration")
    timeout_shutdown_s: float = key("TimeoutShutdown", 10.0, kind="duration")
    image_id: str = key("ImageID", "")
    instance_init_command: str = key("InstanceInitCommand", "")
    deploy_runner_binary: str = key("DeployRunnerBinary", "/proc/self/exe")
    deploy_runner_directory: str = key("DeployRunnerDirectory", "/tmp/arvados-crunch-run")
    deploy_public_key: bool = key("DeployPublicKey", True)
    resource_tags: dict[str, str] = key("ResourceTags", factory=dict)
    tag_key_prefix: str = key("TagKeyPrefix", "Arvados")
    driver: str = key("Driver", "ec2")
    driver_parameters: dict[str, Any] = key("DriverParameters", factory=dict, kind="opaque")


@dataclass
class ContainersConfig:
    supported_docker_image_formats: dict[str, Any] = key(
        "SupportedDockerImageFormats", factory=lambda: {"v2": {}}, kind="opaque"
    )
    log_reuse_decisions: bool = key("LogReuseDecisions", False)
    default_keep_cache_ram: int = key("DefaultKeepCacheRAM", 0, kind="bytesize")
    max_dispatch_attempts: int = key("MaxDispatchAttempts", 10)
    max_retry_attempts: int = key("MaxRetryAttempts", 3)
    uses_preemptible_instances: bool = key("UsePreemptibleInstances", False)
    always_use_preemptible_instances: bool = key("AlwaysUsePreemptibleInstances", False)
    preemptible_price_factor: float = key("PreemptiblePriceFactor", 0.0)
    maximum_price_factor: float = key("MaximumPriceFactor", 1.5)
    dispatch_private_key: str = key("DispatchPrivateKey", "")
    stale_lock_timeout_s: float = key("StaleLockTimeout", 60.0, kind="duration")
    crunch_run_command: str = key("CrunchRunCommand", "crunch-run")
    crunch_run_arguments_list: list[str] = key("CrunchRunArgumentsList", factory=list)
    reserve_extra_ram: int = key("ReserveExtraRAM", 550 * MiB, kind="bytesize")
    min_retry_period_s: float = key("MinRetryPeriod", 0.0, kind="duration")
    runtime_engine: str = key("RuntimeEngine", "docker")
    local_keep_blob_buffers_per_vcpu: int = key("LocalKeepBlobBuffersPerVCPU", 1)
    local_keep_logs_to_container_log: str = key("LocalKeepLogsToContainerLog", "none")
    default_priority: int = key("DefaultPriority", 500)
    shell_access: ShellAccess = key("ShellAccess", factory=ShellAccess)
    logging: ContainersLogging = key("Logging", factory=ContainersLogging)
    slurm: SlurmConfig = key("SLURM", factory=SlurmConfig)
    lsf: LSFConfig = key("LSF", factory=LSFConfig)
    cloud_vms: CloudVMsConfig = key("CloudVMs", factory=CloudVMsConfig)
    # Arvados sections accepted and not used by crunchgate.
    jobs_api: dict[str, Any] = key("JobsAPI", factory=dict, kind="opaque")
    singularity_image_cache: str = key("SingularityImageCache", "")
    git_internal_dir: str = key("GitInternalDir", "")


@dataclass
class ClusterConfig:
    """One entry of ``Clusters:``. Build with :func:`load_config` / :func:`parse_config`."""

    cluster_id: str = ""  # the map key under Clusters
    system_root_token: str = key("SystemRootToken", "")
    management_token: str = key("ManagementToken", "")
    services: Services = key("Services", factory=Services)
    tls: TLSConfig = key("TLS", factory=TLSConfig)
    api: APIConfig = key("API", factory=APIConfig)
    system_logs: SystemLogs = key("SystemLogs", factory=SystemLogs)
    containers: ContainersConfig = key("Containers", factory=ContainersConfig)
    instance_types: dict[str, InstanceType] = key("InstanceTypes", factory=dict)
    # Sections of a real Arvados config that crunchgate accepts and ignores, so that a site's
    # existing /etc/arvados/config.yml loads unchanged.
    postgresql: dict[str, Any] = key("PostgreSQL", factory=dict, kind="opaque")
    collections: dict[str, Any] = key("Collections", factory=dict, kind="opaque")
    users: dict[str, Any] = key("Users", factory=dict, kind="opaque")
    login: dict[str, Any] = key("Login", factory=dict, kind="opaque")
    volumes: dict[str, Any] = key("Volumes", factory=dict, kind="opaque")
    workbench: dict[str, Any] = key("Workbench", factory=dict, kind="opaque")
    remote_clusters: dict[str, Any] = key("RemoteClusters", factory=dict, kind="opaque")
    mail: dict[str, Any] = key("Mail", factory=dict, kind="opaque")
    audit_logs: dict[str, Any] = key("AuditLogs", factory=dict, kind="opaque")
    git: dict[str, Any] = key("Git", factory=dict, kind="opaque")
    blob_signing_key: str = key("BlobSigningKey", "")
    # crunchgate additions (documented in docs/config.md):
    # where the embedded controller keeps its SQLite database and generated TLS material.
    crunchgate: CrunchgateConfig = key("Crunchgate", factory=lambda: CrunchgateConfig())
    # Not a config key: deprecation notes collected while loading (legacy key names, converted
    # CUDA blocks, skipped preemptible variants), for ``crunchgate config check`` to print.
    warnings: list[str] = field(default_factory=list, compare=False, repr=False)


@dataclass
class CrunchgateConfig:
    """Keys that exist only in crunchgate (under ``Clusters.<id>.Crunchgate``)."""

    data_directory: str = key("DataDirectory", "")
    # Per-command timeouts and concurrency for scheduler CLIs (sbatch, squeue, bsub, ...).
    command_timeout_s: float = key("CommandTimeout", 60.0, kind="duration")
    submit_concurrency: int = key("SubmitConcurrency", 4)


# --- Keys Arvados defines that crunchgate accepts and ignores -----------------------------------
#
# A site's existing /etc/arvados/config.yml must load unchanged, so keys that Arvados itself
# knows (but crunchgate has no use for) are not "unknown". Anything else is a typo and an error.

_ACCEPTED_UNUSED: dict[type, frozenset[str]] = {
    ClusterConfig: frozenset({"StorageClasses"}),
    Services: frozenset({"SSO", "Nodemanager", "SAMPLE"}),
    APIConfig: frozenset({
        "MaxTokenLifetime", "MaxKeepBlobBuffers", "DisabledAPIs",
        "AsyncPermissionsUpdateInterval", "MaxRequestAmplification", "SendTimeout",
        "WebsocketClientEventQueue", "WebsocketServerEventQueue", "KeepServiceRequestTimeout",
        "VocabularyPath", "FreezeProjectRequiresDescription", "FreezeProjectRequiresProperties",
        "UnfreezeProjectRequiresAdmin", "LockBeforeUpdate", "RailsSessionSecretToken",
        "LogCreateRequestFraction",
    }),
    ContainersConfig: frozenset({
        "MaxComputeVMs", "DefaultKeepCacheDisk", "Singularity", "CloudVMsDriver",
    }),
    ContainersLogging: frozenset({
        "LogBytesPerEvent", "LogSecondsBetweenEvents", "LogThrottlePeriod", "LogThrottleBytes",
        "LogThrottleLines", "LimitLogBytesPerJob", "LogPartialLineThrottlePeriod",
    }),
    SlurmConfig: frozenset({"Managed"}),
    CloudVMsConfig: frozenset({"AllowPrivilegedContainers"}),
    TLSConfig: frozenset({"ASSERT"}),
}

# Renamed keys: old Arvados name -> current name. The old name still works, with a warning.
_RENAMED: dict[type, dict[str, str]] = {
    LSFConfig: {"BsubCUDAArguments": "BsubGPUArguments"},
}

# Keys whose values are secrets: never quoted in error messages, registered for log redaction.
SECRET_KEYS = frozenset({"SystemRootToken", "ManagementToken", "BlobSigningKey",
                         "DispatchPrivateKey"})

CLUSTER_ID_RE = re.compile(r"^[a-z0-9]{5}$")
RUNTIME_ENGINES = ("docker", "singularity", "local")
LOG_FORMATS = ("json", "text")
LOG_LEVELS = ("panic", "fatal", "error", "warn", "warning", "info", "debug", "trace")
GPU_STACKS = ("", "cuda", "rocm")

log = logging.getLogger("crunchgate.config")


# --- Value syntaxes ---------------------------------------------------------------------------

_DURATION_UNITS: dict[str, Decimal] = {
    "ns": Decimal("1e-9"),
    "us": Decimal("1e-6"),
    "µs": Decimal("1e-6"),  # U+00B5 micro sign
    "μs": Decimal("1e-6"),  # U+03BC greek mu
    "ms": Decimal("1e-3"),
    "s": Decimal(1),
    "m": Decimal(60),
    "h": Decimal(3600),
}
_DURATION_PART_RE = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")

_SIZE_PREFIXES: dict[str, int] = {
    "": 1,
    "K": 1000, "Ki": 1 << 10,
    "M": 1000**2, "Mi": 1 << 20,
    "G": 1000**3, "Gi": 1 << 30,
    "T": 1000**4, "Ti": 1 << 40,
    "P": 1000**5, "Pi": 1 << 50,
    "E": 1000**6, "Ei": 1 << 60,
}
_SIZE_RE = re.compile(r"^\s*(\d+\.?\d*|\.\d+)\s*([A-Za-z]*)\s*$")


def _show(value: Any) -> str:
    """A value as it would be written in YAML, for error messages."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict | list):
        text = json.dumps(value, default=str)
        return text if len(text) <= 60 else text[:57] + "..."
    return str(value)


def parse_duration(value: Any, path: str = "duration") -> float:
    """Parse a Go-style duration (``"10s"``, ``"1m30s"``, ``"1.5h"``, ``"250ms"``) to seconds.

    Bare ``0`` (number or string) means zero, as in Arvados; any other unit-less number is
    rejected because it is ambiguous (seconds? nanoseconds?).
    """
    if isinstance(value, bool):
        raise ConfigError(f"{path}: invalid duration {_show(value)}: expected e.g. \"10s\"")
    if isinstance(value, int | float):
        if value == 0:
            return 0.0
        raise ConfigError(
            f"{path}: invalid duration {_show(value)}: missing unit "
            f"(write e.g. \"{value}s\" or \"{value}m\")"
        )
    if not isinstance(value, str):
        raise ConfigError(f"{path}: invalid duration {_show(value)}: expected a string like \"10s\"")
    text = value.strip()
    if text == "0":
        return 0.0
    sign = Decimal(1)
    body = text
    if body[:1] in "+-" and body:
        sign = Decimal(-1) if body[0] == "-" else Decimal(1)
        body = body[1:]
    if not body:
        raise ConfigError(f"{path}: invalid duration {_show(value)}: expected e.g. \"10s\"")
    total = Decimal(0)
    pos = 0
    while pos < len(body):
        m = _DURATION_PART_RE.match(body, pos)
        if m is None:
            rest = body[pos:]
            if re.fullmatch(r"[\d.]+", rest):
                hint = "missing unit"
            else:
                hint = "units are ns, us, ms, s, m, h"
            raise ConfigError(
                f"{path}: invalid duration {_show(value)}: {hint} (write e.g. \"1m30s\")"
            )
        total += Decimal(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    return float(sign * total) + 0.0  # "+ 0.0" turns "-0s" into 0.0


def parse_bytesize(value: Any, path: str = "size") -> int:
    """Parse a byte size: an integer, or a string with an optional unit (``"550MiB"``,
    ``"16GB"``, ``"1.5GiB"``, ``"64K"``).

    Prefixes follow Arvados' ``ByteSize``: ``K M G T P E`` are powers of 1000, ``Ki Mi Gi Ti Pi
    Ei`` powers of 1024, an optional trailing ``B`` changes nothing; prefixes are
    case-sensitive (``k`` and ``mb`` are errors). Fractions are rounded to whole bytes.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{path}: invalid byte size {_show(value)}: expected e.g. \"16GiB\"")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise ConfigError(
            f"{path}: invalid byte size {_show(value)}: a plain number must be whole bytes "
            "(or add a unit, e.g. \"1.5GiB\")"
        )
    if not isinstance(value, str):
        raise ConfigError(f"{path}: invalid byte size {_show(value)}: expected e.g. \"16GiB\"")
    m = _SIZE_RE.match(value)
    if m is None:
        raise ConfigError(f"{path}: invalid byte size {_show(value)}: expected e.g. \"16GiB\"")
    number, unit = m.group(1), m.group(2)
    prefix = unit[:-1] if unit.endswith("B") else unit
    if prefix not in _SIZE_PREFIXES:
        raise ConfigError(
            f"{path}: invalid byte size {_show(value)}: unknown unit {unit!r} "
            "(use K, M, G, T, P, E for powers of 1000 or Ki, Mi, Gi, Ti, Pi, Ei for powers "
            "of 1024, optionally followed by B)"
        )
    amount = Decimal(number) * _SIZE_PREFIXES[prefix]
    return int(amount.to_integral_value(rounding=ROUND_HALF_EVEN))


def format_duration(seconds: float) -> str:
    """Seconds as a Go-style duration string, shortest form (``"5m"``, ``"1m30s"``, ``"250ms"``)."""
    if seconds == 0:
        return "0s"
    d = Decimal(repr(float(seconds)))
    sign = "-" if d < 0 else ""
    d = abs(d)
    if d < 1:
        for unit, scale in (("ms", Decimal("1e-3")), ("us", Decimal("1e-6"))):
            q = d / scale
            if q >= 1 or unit == "us":
                return f"{sign}{_fmt_decimal(q)}{unit}"
    hours, rest = divmod(d, 3600)
    minutes, secs = divmod(rest, 60)
    out = ""
    if hours:
        out += f"{int(hours)}h"
    if minutes:
        out += f"{int(minutes)}m"
    if secs:
        out += f"{_fmt_decimal(secs)}s"
    return sign + out


def format_bytesize(n: int) -> int | str:
    """Bytes as written in a config file: ``"550MiB"`` when a binary unit divides it exactly."""
    if n == 0:
        return 0
    for unit, scale in (("EiB", 1 << 60), ("PiB", 1 << 50), ("TiB", 1 << 40),
                        ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n % scale == 0:
            return f"{n // scale}{unit}"
    return n


def _fmt_decimal(d: Decimal) -> str:
    return format(d.normalize(), "f")


# --- The walker -------------------------------------------------------------------------------


def _arv_fields(cls: type) -> dict[str, dataclasses.Field[Any]]:
    return {f.metadata["arv"]: f for f in dataclasses.fields(cls) if "arv" in f.metadata}


_HINTS_CACHE: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS_CACHE:
        _HINTS_CACHE[cls] = typing.get_type_hints(cls)
    return _HINTS_CACHE[cls]


def _unknown_key(path: str, name: str, known: typing.Iterable[str]) -> ConfigError:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return ConfigError(f"{path}.{name}: unknown key{hint}")


def _expect_mapping(value: Any, path: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a mapping (key: value), got {_show(value)}")
    for k in value:
        if not isinstance(k, str):
            raise ConfigError(f"{path}: key {_show(k)} must be a string (quote it)")
    return value


class _Loader:
    """Walks one cluster's mapping into a :class:`ClusterConfig`, collecting warnings."""

    def __init__(self) -> None:
        self.warnings: list[str] = []
        # Problems found so far: a bad key is recorded and the walk goes on with its default,
        # so that one run reports every bad key.
        self.errors: list[str] = []

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        log.warning(message)

    def build(self, cls: type, data: Any, path: str) -> Any:
        mapping = dict(_expect_mapping(data, path))
        fields = _arv_fields(cls)
        for old, new in _RENAMED.get(cls, {}).items():
            if old in mapping:
                if new in mapping:
                    raise ConfigError(
                        f"{path}.{old}: old name of {new}, and both are set: keep only {new}"
                    )
                self.warn(f"{path}.{old} is deprecated: rename it to {new}")
                mapping[new] = mapping.pop(old)
        hints = _hints(cls)
        kwargs: dict[str, Any] = {}
        for name, value in mapping.items():
            f = fields.get(name)
            if f is None:
                if name in _ACCEPTED_UNUSED.get(cls, ()):
                    continue
                self.errors.append(str(_unknown_key(path, name, fields)))
                continue
            if value is None:
                continue  # "Key:" with nothing after it keeps the default, as in Arvados
            try:
                kwargs[f.name] = self.value(hints[f.name], f.metadata.get("kind"), value,
                                            f"{path}.{name}")
            except ConfigError as exc:
                if name in SECRET_KEYS:
                    # The usual message quotes the value: never for a secret.
                    self.errors.append(
                        f"{path}.{name}: expected a string (value not shown: it is a secret)")
                else:
                    self.errors.extend(exc.problems)
        return cls(**kwargs)

    def value(self, tp: Any, kind: str | None, value: Any, path: str) -> Any:
        if kind == "duration":
            return _nonneg(parse_duration(value, path), value, path)
        if kind == "bytesize":
            return _nonneg(parse_bytesize(value, path), value, path)
        if kind == "opaque":
            return copy.deepcopy(_expect_mapping(value, path))
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            return self.build(tp, value, path)
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin is list:
            if not isinstance(value, list):
                raise ConfigError(f"{path}: expected a list, got {_show(value)}")
            return [self.value(args[0], None, v, f"{path}[{i}]") for i, v in enumerate(value)]
        if origin is dict:
            mapping = _expect_mapping(value, path)
            return {
                k: self.value(args[1], None, v, f"{path}.{k}")
                for k, v in mapping.items()
                if k != "SAMPLE"  # Arvados' documentation placeholder, dropped as Arvados does
            }
        if tp is Any:
            return value
        if tp is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"{path}: expected true or false, got {_show(value)}")
            return value
        if tp is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{path}: expected a whole number, got {_show(value)}")
            return _nonneg(value, value, path)
        if tp is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{path}: expected a number, got {_show(value)}")
            return _nonneg(float(value), value, path)
        if tp is str:
            if not isinstance(value, str):
                raise ConfigError(
                    f"{path}: expected a string, got {_show(value)} (quote it: \"{value}\")"
                    if isinstance(value, int | float) and not isinstance(value, bool)
                    else f"{path}: expected a string, got {_show(value)}"
                )
            return value
        raise TypeError(f"config field type {tp!r} at {path} is not supported by the walker")

    def instance_types(self, data: Any, path: str, factor: float) -> dict[str, InstanceType]:
        if isinstance(data, list):
            raise ConfigError(
                f"{path}: must be a map of type name to settings, not a list; write "
                "'InstanceTypes: {m5large: {VCPUs: 2, RAM: 8GiB, ...}}'"
            )
        types: dict[str, InstanceType] = {}
        for name, spec in _expect_mapping(data, path).items():
            if name == "SAMPLE":
                continue
            tpath = f"{path}.{name}"
            spec = dict(_expect_mapping(spec, tpath))
            given_name = spec.pop("Name", None)
            if given_name is not None and given_name != name:
                raise ConfigError(
                    f"{tpath}.Name: {_show(given_name)} differs from the map key {name!r}: "
                    "remove Name (the key is the name)"
                )
            it: InstanceType = self.build(InstanceType, spec, tpath)
            it.name = name
            if not it.provider_type:
                it.provider_type = name
            if it.cuda:
                self._convert_cuda(it, tpath)
            if it.gpu.stack not in GPU_STACKS:
                raise ConfigError(
                    f"{tpath}.GPU.Stack: {_show(it.gpu.stack)} is not one of \"cuda\", \"rocm\" "
                    "(or empty for no GPU)"
                )
            types[name] = it
        if factor > 0:
            for name, it in list(types.items()):
                if it.preemptible:
                    continue
                variant = f"{name}.preemptible"
                if variant in types:
                    self.warn(
                        f"{path}.{variant} already exists: not adding the automatic preemptible "
                        f"variant of {name} (PreemptiblePriceFactor)"
                    )
                    continue
                types[variant] = dataclasses.replace(
                    it, name=variant, preemptible=True, price=it.price * factor,
                    gpu=dataclasses.replace(it.gpu), cuda=dict(it.cuda),
                )
        return types

    def _convert_cuda(self, it: InstanceType, path: str) -> None:
        cuda = it.cuda
        allowed = {"DriverVersion", "HardwareCapability", "DeviceCount"}
        for k in cuda:
            if k not in allowed:
                raise _unknown_key(f"{path}.CUDA", k, allowed)
        count = self.value(int, None, cuda.get("DeviceCount", 0), f"{path}.CUDA.DeviceCount")
        if count == 0:
            return
        if it.gpu.stack or it.gpu.device_count:
            raise ConfigError(
                f"{path}: both CUDA (deprecated) and GPU are set: keep only GPU"
            )
        self.warn(f"{path}.CUDA is deprecated: converted to GPU (Stack: cuda); write GPU instead")
        it.gpu = GPUSpec(
            stack="cuda",
            driver_version=self.value(str, None, cuda.get("DriverVersion", ""),
                                      f"{path}.CUDA.DriverVersion"),
            hardware_target=self.value(str, None, cuda.get("HardwareCapability", ""),
                                       f"{path}.CUDA.HardwareCapability"),
            device_count=count,
        )


def _nonneg(parsed: Any, raw: Any, path: str) -> Any:
    if parsed < 0:
        raise ConfigError(f"{path}: {_show(raw)} is negative: use 0 or a positive value")
    return parsed


def parse_config(data: Any, cluster_id: str | None = None) -> ClusterConfig:
    """Turn a parsed ``config.yml`` document into the :class:`ClusterConfig` of one cluster.

    ``data`` is the whole document (``{"Clusters": {id: {...}}}``). With several clusters,
    ``cluster_id`` says which one; with one, it may be omitted.
    """
    top = _expect_mapping(data, "(top level)")
    for k in top:
        if k != "Clusters":
            raise ConfigError(f"{k}: unknown top-level key (the file must start with 'Clusters:')")
    clusters = _expect_mapping(top.get("Clusters"), "Clusters")
    if not clusters:
        raise ConfigError("Clusters: no cluster configured; add 'Clusters: {zzzzz: {...}}'")
    if cluster_id is None:
        if len(clusters) > 1:
            raise ConfigError(
                f"Clusters: the file configures several clusters ({', '.join(sorted(clusters))}): "
                "say which one with --cluster ID"
            )
        cluster_id = next(iter(clusters))
    elif cluster_id not in clusters:
        raise ConfigError(
            f"Clusters.{cluster_id}: not in the file (it has {', '.join(sorted(clusters))})"
        )
    if not CLUSTER_ID_RE.match(cluster_id):
        raise ConfigError(
            f"Clusters.{cluster_id}: a cluster ID is exactly 5 lowercase letters or digits"
        )
    path = f"Clusters.{cluster_id}"
    loader = _Loader()
    raw = dict(_expect_mapping(clusters[cluster_id], path))
    instance_types_raw = raw.pop("InstanceTypes", None)
    cfg: ClusterConfig = loader.build(ClusterConfig, raw, path)
    cfg.cluster_id = cluster_id
    try:
        cfg.instance_types = loader.instance_types(
            instance_types_raw, f"{path}.InstanceTypes", cfg.containers.preemptible_price_factor
        )
    except ConfigError as exc:
        loader.errors.extend(exc.problems)
    if loader.errors:
        raise ConfigError("\n".join(loader.errors), loader.errors)
    for secret in (cfg.system_root_token, cfg.management_token, cfg.blob_signing_key,
                   cfg.containers.dispatch_private_key):
        register_secret(secret)
    _validate(cfg, path)
    cfg.warnings = loader.warnings
    return cfg


def _validate(cfg: ClusterConfig, path: str) -> None:
    c = cfg.containers
    if c.runtime_engine not in RUNTIME_ENGINES:
        raise ConfigError(
            f"{path}.Containers.RuntimeEngine: {_show(c.runtime_engine)} is not one of "
            f"{', '.join(RUNTIME_ENGINES)}"
        )
    if cfg.system_logs.format not in LOG_FORMATS:
        raise ConfigError(
            f"{path}.SystemLogs.Format: {_show(cfg.system_logs.format)} is not json or text"
        )
    if cfg.system_logs.log_level.lower() not in LOG_LEVELS:
        raise ConfigError(
            f"{path}.SystemLogs.LogLevel: {_show(cfg.system_logs.log_level)} is not one of "
            f"{', '.join(LOG_LEVELS)}"
        )
    if not 0 <= c.cloud_vms.supervisor_fraction <= 1:
        raise ConfigError(
            f"{path}.Containers.CloudVMs.SupervisorFraction: "
            f"{c.cloud_vms.supervisor_fraction} must be between 0 and 1"
        )
    ws = cfg.services.container_web_services
    for name, value in (("ExternalPortMin", ws.external_port_min),
                        ("ExternalPortMax", ws.external_port_max)):
        if not 0 <= value <= 65535:
            raise ConfigError(
                f"{path}.Services.ContainerWebServices.{name}: {value} is not a port number "
                "(0 to 65535; 0 turns the port-range form off)"
            )
    if ws.external_port_max and ws.external_port_min > ws.external_port_max:
        raise ConfigError(
            f"{path}.Services.ContainerWebServices: ExternalPortMin {ws.external_port_min} is "
            f"above ExternalPortMax {ws.external_port_max}"
        )
    for f in dataclasses.fields(Services):
        svc: Service = getattr(cfg.services, f.name)
        spath = f"{path}.Services.{f.metadata['arv']}"
        if svc.external_url not in ("", "-"):
            _check_url(svc.external_url, f"{spath}.ExternalURL", schemes=None)
        for url, entry in svc.internal_urls.items():
            _check_url(url, f"{spath}.InternalURLs.{url}", schemes=("http", "https"))
            if entry.listen_url:
                _check_url(entry.listen_url, f"{spath}.InternalURLs.{url}.ListenURL",
                           schemes=("http", "https"))


def _check_url(url: str, path: str, schemes: tuple[str, ...] | None) -> None:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError as exc:
        raise ConfigError(f"{path}: {_show(url)} is not a valid URL ({exc})") from None
    if not parts.scheme or not parts.hostname:
        raise ConfigError(
            f"{path}: {_show(url)} is not a valid URL: write it with scheme and host, "
            "e.g. \"https://ctrl.example:8000\""
        )
    if schemes is not None and parts.scheme not in schemes:
        raise ConfigError(
            f"{path}: {_show(url)}: scheme must be {' or '.join(schemes)}"
        )


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys: with plain YAML the last one silently wins, which
    hides exactly the kind of mistake ``config check`` exists to catch."""


def _construct_mapping_no_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> Any:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        try:
            k = loader.construct_object(key_node, deep=True)
            first = seen.get(k)
        except TypeError:  # unhashable key: construct_mapping reports it properly
            continue
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None, None,
                f"duplicate key {k!r} (first defined on line {first}): keep only one",
                key_node.start_mark,
            )
        seen[k] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping_no_duplicates
)


def load_config(path: str | os.PathLike[str], cluster_id: str | None = None) -> ClusterConfig:
    """Read and parse a ``config.yml``; errors name the file (and line, for YAML syntax)."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 -- a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}{where}: YAML syntax error: {problem}") from None
    try:
        return parse_config(data, cluster_id)
    except ConfigError as exc:
        problems = [f"{path}: {p}" for p in exc.problems]
        raise ConfigError("\n".join(problems), problems) from None


# --- Back to YAML -----------------------------------------------------------------------------

_SECRET_PATHS = (
    ("SystemRootToken",), ("ManagementToken",), ("BlobSigningKey",),
    ("Containers", "DispatchPrivateKey"), ("Containers", "CloudVMs", "DriverParameters"),
    ("PostgreSQL",), ("TLS", "Key"),
)


def to_arvados_dict(cfg: ClusterConfig, *, redact_secrets: bool = True) -> dict[str, Any]:
    """One cluster's config as a mapping with Arvados key names and config-file value syntax.

    With ``redact_secrets`` (the default) tokens, keys and driver credentials are left out, so the
    result can be served (``/arvados/v1/config``) or printed.
    """
    out = _dump(cfg)
    types: dict[str, Any] = {}
    for name, it in cfg.instance_types.items():
        entry = _dump(it)
        entry.pop("CUDA", None)  # already converted into GPU
        types[name] = entry
    out["InstanceTypes"] = types
    if redact_secrets:
        for p in _SECRET_PATHS:
            node = out
            for part in p[:-1]:
                node = node.get(part, {})
            node.pop(p[-1], None)
    return out


def _dump(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        if "arv" not in f.metadata or f.name == "instance_types":
            continue
        out[f.metadata["arv"]] = _dump_value(hints[f.name], f.metadata.get("kind"),
                                             getattr(obj, f.name))
    return out


def _dump_value(tp: Any, kind: str | None, value: Any) -> Any:
    if kind == "duration":
        return format_duration(value)
    if kind == "bytesize":
        return format_bytesize(value)
    if kind == "opaque":
        return copy.deepcopy(value)
    if dataclasses.is_dataclass(value):
        return _dump(value)
    if isinstance(value, dict):
        sub = typing.get_args(tp)[1] if typing.get_args(tp) else Any
        return {k: _dump_value(sub, None, v) for k, v in value.items()}
    if isinstance(value, list):
        return list(value)
    return value


def defaults_yaml() -> str:
    """The complete default configuration as a YAML document (cluster ID ``xxxxx``)."""
    data = {"Clusters": {"xxxxx": to_arvados_dict(ClusterConfig(), redact_secrets=False)}}
    header = (
        "# crunchgate default configuration (Arvados key names).\n"
        "# Copy what you need into /etc/arvados/config.yml and replace xxxxx by your cluster ID.\n"
    )
    return header + yaml.safe_dump(data, sort_keys=False, default_flow_style=False,
                                   allow_unicode=True, width=100)


# --- Which URL is mine ------------------------------------------------------------------------


def _service(cfg: ClusterConfig, service: str) -> tuple[str, Service]:
    """Look a service up by attribute name (``dispatch_slurm``) or Arvados name (``DispatchSLURM``)."""
    for f in dataclasses.fields(Services):
        if service in (f.name, f.metadata["arv"]):
            return f.metadata["arv"], getattr(cfg.services, f.name)
    names = [f.metadata["arv"] for f in dataclasses.fields(Services)]
    raise ConfigError(f"unknown service {service!r} (known: {', '.join(names)})")


def _normalize_url(url: str) -> str:
    return url.rstrip("/")


def _is_local_host(host: str) -> bool:
    """True if ``host`` names this machine: loopback, one of its addresses or its names."""
    host = host.strip("[]").lower()
    if host in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None:
        return ip.is_loopback or ip.is_unspecified or _can_bind(str(ip))
    names = {socket.gethostname().lower()}
    try:
        names.add(socket.getfqdn().lower())
    except OSError:
        pass
    if host in names:
        return True
    # Like Arvados, a name is local if it resolves to an address this host can listen on.
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    return any(_can_bind(str(info[4][0])) for info in infos)


def _can_bind(addr: str) -> bool:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((addr, 0))
        return True
    except OSError:
        return False


def service_internal_url(cfg: ClusterConfig, service: str) -> str:
    """The entry of ``Services.<service>.InternalURLs`` this process serves, as Arvados picks it.

    ``$ARVADOS_SERVICE_INTERNAL_URL`` wins when set (it must be one of the entries; this is how
    two instances of a service share a host and a config file). Otherwise exactly one entry must
    name a local address (loopback, one of this host's addresses or names).
    """
    arv_name, svc = _service(cfg, service)
    path = f"Clusters.{cfg.cluster_id or 'xxxxx'}.Services.{arv_name}.InternalURLs"
    urls = list(svc.internal_urls)
    if not urls:
        raise ConfigError(f"{path}: empty; add this host's URL, e.g. \"http://127.0.0.1:9006\"")
    wanted = os.environ.get("ARVADOS_SERVICE_INTERNAL_URL", "").strip()
    if wanted:
        for url in urls:
            if _normalize_url(url) == _normalize_url(wanted):
                return url
        raise ConfigError(
            f"ARVADOS_SERVICE_INTERNAL_URL={wanted} is not one of {path} "
            f"({', '.join(urls)}): fix the variable or add the URL to the config"
        )
    local = []
    for url in urls:
        host = urlsplit(url).hostname or ""
        if _is_local_host(host):
            local.append(url)
    if len(local) == 1:
        return local[0]
    if not local:
        raise ConfigError(
            f"{path}: none of {', '.join(urls)} is an address of this host: add one, or set "
            "ARVADOS_SERVICE_INTERNAL_URL"
        )
    raise ConfigError(
        f"{path}: several entries are local ({', '.join(local)}): set "
        "ARVADOS_SERVICE_INTERNAL_URL to the one this process should serve"
    )


def listen_url(cfg: ClusterConfig, service: str) -> str:
    """Where this process listens for ``service``: its entry's ``ListenURL`` or the URL itself."""
    url = service_internal_url(cfg, service)
    _, svc = _service(cfg, service)
    return svc.internal_urls[url].listen_url or url


def controller_url(cfg: ClusterConfig) -> str:
    """The controller's base URL: ``Services.Controller.ExternalURL``, else its first InternalURL."""
    ctl = cfg.services.controller
    if ctl.external_url and ctl.external_url != "-":
        return ctl.external_url
    for url in ctl.internal_urls:
        return url
    raise ConfigError(
        f"Clusters.{cfg.cluster_id or 'xxxxx'}.Services.Controller: no ExternalURL and no "
        "InternalURLs: set ExternalURL to the controller's address, e.g. \"https://127.0.0.1:8000\""
    )
