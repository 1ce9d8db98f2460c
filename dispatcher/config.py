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

from dataclasses import dataclass, field
from typing import Any

MiB = 1 << 20
GiB = 1 << 30


class ConfigError(ValueError):
    """The config file is malformed: message names the key path and the bad value."""


def key(arv: str, default: Any = None, *, kind: str | None = None, factory: Any = None) -> Any:
    """Declare a config field: its Arvados key name, default and value kind."""
    md = {"arv": arv, "kind": kind}
    if factory is not None:
        return field(default_factory=factory, metadata=md)
    return field(default=default, metadata=md)


# --- Services ---------------------------------------------------------------------------------


@dataclass
class InternalURL:
    listen_url: str = key("ListenURL", "")


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
    key: str = key("Key", "")
    insecure: bool = key("Insecure", False)
    # Arvados has ACME settings here; accepted and unused.
    acme: dict[str, Any] = key("ACME", factory=dict, kind="opaque")


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


@dataclass
class CrunchgateConfig:
    """Keys that exist only in crunchgate (under ``Clusters.<id>.Crunchgate``)."""

    data_directory: str = key("DataDirectory", "")
    # Per-command timeouts and concurrency for scheduler CLIs (sbatch, squeue, bsub, ...).
    command_timeout_s: float = key("CommandTimeout", 60.0, kind="duration")
    submit_concurrency: int = key("SubmitConcurrency", 4)


# The functions below are implemented by the config walker:
#
#   parse_duration(text, path) -> float seconds
#   parse_bytesize(value, path) -> int bytes
#   parse_config(data: dict, cluster_id: str | None = None) -> ClusterConfig
#   load_config(path: str | os.PathLike, cluster_id: str | None = None) -> ClusterConfig
#   defaults_yaml() -> str
#   service_internal_url(cfg, "Controller") -> str  (local-address / $ARVADOS_SERVICE_INTERNAL_URL)
#   controller_url(cfg) -> str  (ExternalURL, else the first InternalURL)
