"""Metrics of the cloud dispatcher, with the reference's names (reference 5.13).

All series live on the registry the service hands in (never the global default registry), so
two dispatchers in one test process do not collide. Components receive one
:class:`CloudMetrics` and update its attributes; nothing here does I/O.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Summary

P = "arvados_dispatchcloud_"
OBJECTIVES_NOTE = "quantiles .5 .9 .95 .99 are computed by Prometheus from _sum/_count here"


class CloudMetrics:
    """Every metric the cloud dispatcher exports (driver, pool, scheduler, queue)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry()
        self.registry = r
        self.driver_operations = Counter(
            P + "driver_operations", "Number of instance-set API calls.",
            ["operation", "error"], registry=r,
        )
        for op in ("Create", "List", "Destroy", "SetTags"):
            for err in ("0", "1"):
                self.driver_operations.labels(operation=op, error=err)
        self.queue_entries = Gauge(
            P + "queue_entries", "Number of active container entries in the controller queue.",
            ["state", "instance_type"], registry=r,
        )
        self.containers_allocated_not_started = Gauge(
            P + "containers_allocated_not_started",
            "Number of containers allocated to a worker but not started yet (worker is booting).",
            registry=r,
        )
        self.containers_not_allocated_over_quota = Gauge(
            P + "containers_not_allocated_over_quota",
            "Number of containers not allocated to a worker because the system has hit a quota.",
            registry=r,
        )
        self.containers_longest_wait_time_seconds = Gauge(
            P + "containers_longest_wait_time_seconds",
            "Current longest wait time of any container since queuing, and before the start of "
            "crunch-run.", registry=r,
        )
        self.last_503_time = Gauge(
            P + "last_503_time", "Time of most recent 503 error received from API.", registry=r,
        )
        self.max_concurrent_containers = Gauge(
            P + "max_concurrent_containers", "Dynamically assigned limit on number of containers "
            "scheduled concurrency, set after receiving 503 errors from API.", registry=r,
        )
        self.at_quota = Gauge(P + "at_quota", "Flag indicating the cloud driver is reporting an "
                              "at-quota condition.", registry=r)
        self.containers_running = Gauge(
            P + "containers_running", "Number of containers reported running by cloud VMs.",
            registry=r,
        )
        self.probe_age_seconds_max = Gauge(
            P + "probe_age_seconds_max",
            "Maximum number of seconds since an instance's most recent successful probe.",
            registry=r,
        )
        self.probe_age_seconds_median = Gauge(
            P + "probe_age_seconds_median",
            "Median number of seconds since an instance's most recent successful probe.",
            registry=r,
        )
        self.instances_total = Gauge(
            P + "instances_total", "Number of cloud VMs.", ["category", "instance_type"],
            registry=r,
        )
        self.instances_price = Gauge(
            P + "instances_price", "Price of cloud VMs.", ["category"], registry=r,
        )
        self.vcpus_total = Gauge(P + "vcpus_total", "Total VCPUs on all cloud VMs.",
                                 ["category"], registry=r)
        self.memory_bytes_total = Gauge(P + "memory_bytes_total", "Total memory on all cloud VMs.",
                                        ["category"], registry=r)
        self.boot_outcomes = Counter(
            P + "boot_outcomes", "Boot outcomes by type.", ["outcome"], registry=r,
        )
        for outcome in ("success", "failure", "aborted", "disappeared"):
            self.boot_outcomes.labels(outcome=outcome)
        self.instances_disappeared = Counter(
            P + "instances_disappeared", "Number of occurrences of an instance disappearing from "
            "the cloud provider's list of instances.", ["state"], registry=r,
        )
        for state in ("unknown", "booting", "idle", "running", "shutdown"):
            self.instances_disappeared.labels(state=state)
        self.instances_time_to_ssh_seconds = Summary(
            P + "instances_time_to_ssh_seconds",
            "Number of seconds between instance creation and the first successful SSH connection.",
            registry=r,
        )
        self.instances_time_to_ready_for_container_seconds = Summary(
            P + "instances_time_to_ready_for_container_seconds",
            "Number of seconds between the first successful SSH connection and ready to run "
            "containers.", registry=r,
        )
        self.instances_time_from_shutdown_request_to_disappearance_seconds = Summary(
            P + "instances_time_from_shutdown_request_to_disappearance_seconds",
            "Number of seconds between the first shutdown attempt and the disappearance of the "
            "worker.", registry=r,
        )
        self.containers_time_from_queue_to_crunch_run_seconds = Summary(
            P + "containers_time_from_queue_to_crunch_run_seconds",
            "Number of seconds between the queuing of a container and the start of crunch-run.",
            registry=r,
        )
        self.instances_run_probe_duration_seconds = Summary(
            P + "instances_run_probe_duration_seconds",
            "Number of seconds per runProbe.", ["outcome"], registry=r,
        )
        # EC2 driver only (registered lazily by the driver through ec2_metrics()).
        self._ec2: tuple[Gauge, Counter] | None = None

    def ec2_metrics(self) -> tuple[Gauge, Counter]:
        """``ec2_instances{subnet_id}`` and ``ec2_instance_starts_total{subnet_id,success}``."""
        if self._ec2 is None:
            self._ec2 = (
                Gauge(P + "ec2_instances", "Number of instances running", ["subnet_id"],
                      registry=self.registry),
                Counter(P + "ec2_instance_starts_total",
                        "Number of attempts to start a new instance",
                        ["subnet_id", "success"], registry=self.registry),
            )
        return self._ec2
