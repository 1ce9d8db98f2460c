"""Metrics of the cloud dispatcher, with the reference's names (reference 5.13).

All series live on the registry the service hands in (never the global default registry), so
two dispatchers in one test process do not collide. Components receive one
:class:`CloudMetrics` and update its attributes; nothing here does I/O.

Names on the wire are exactly the reference's. prometheus-client always appends ``_total`` to a
counter and exports no quantiles for a summary, where Arvados' Go client exports
``arvados_dispatchcloud_boot_outcomes{outcome="success"}`` and
``..._time_to_ssh_seconds{quantile="0.95"}``; dashboards written for arvados-dispatch-cloud
query those. So the three counters (:class:`RefCounter`, exported ``untyped`` because the text
format cannot call a counter without ``_total`` a counter) and the summaries
(:class:`RefSummary`: quantiles 0.5/0.9/0.95/0.99 over the last 10 minutes, as the Go default
``MaxAge``, plus cumulative ``_sum``/``_count``) are served by one collector of ours.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.metrics_core import Metric

P = "arvados_dispatchcloud_"
QUANTILES = (0.5, 0.9, 0.95, 0.99)
SUMMARY_MAX_AGE_S = 600.0
SUMMARY_MAX_SAMPLES = 10_000   # per series and window: bounds memory at any observation rate

ChildT = TypeVar("ChildT")


class _CounterChild:
    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        self.value += amount


class _Family(Generic[ChildT]):
    """Named series with one child per label combination, created on first use."""

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str],
                 child: Callable[[], ChildT]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._new_child = child
        self._children: dict[tuple[str, ...], ChildT] = {}
        self._lock = threading.Lock()

    def labels(self, **labels: str) -> ChildT:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name}: labels must be {self.labelnames}")
        key = tuple(str(labels[n]) for n in self.labelnames)
        with self._lock:
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = self._new_child()
        return child


class RefCounter(_Family[_CounterChild]):
    """A counter exported under exactly its reference name (no ``_total``); API as
    prometheus-client's: ``c.labels(a="x").inc()``."""

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str]) -> None:
        super().__init__(name, documentation, labelnames, _CounterChild)

    def family(self) -> Metric:
        m = Metric(self.name, self.documentation, "unknown")
        with self._lock:
            items = list(self._children.items())
        for key, child in items:
            m.add_sample(self.name, dict(zip(self.labelnames, key, strict=True)), child.value)
        return m


class _SummaryChild:
    def __init__(self) -> None:
        self.count = 0
        self.sum = 0.0
        self.window: deque[tuple[float, float]] = deque(maxlen=SUMMARY_MAX_SAMPLES)
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        now = time.monotonic()
        with self._lock:
            self.count += 1
            self.sum += value
            self.window.append((now, value))

    def quantiles(self) -> list[tuple[float, float]]:
        """(q, value) for each of :data:`QUANTILES`; NaN when nothing was observed lately."""
        cutoff = time.monotonic() - SUMMARY_MAX_AGE_S
        with self._lock:
            while self.window and self.window[0][0] < cutoff:
                self.window.popleft()
            values = sorted(v for _, v in self.window)
        if not values:
            return [(q, math.nan) for q in QUANTILES]
        # The nearest-rank quantile (what an exact-objective Go summary converges to).
        return [(q, values[max(0, math.ceil(q * len(values)) - 1)]) for q in QUANTILES]


class RefSummary(_Family[_SummaryChild]):
    """A summary with the reference's quantiles; ``s.observe(v)`` or
    ``s.labels(outcome="success").observe(v)``."""

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str] = ()) -> None:
        super().__init__(name, documentation, labelnames, _SummaryChild)

    def observe(self, value: float) -> None:
        if self.labelnames:
            raise ValueError(f"{self.name} has labels {self.labelnames}: use .labels()")
        self.labels().observe(value)

    def family(self) -> Metric:
        m = Metric(self.name, self.documentation, "summary")
        with self._lock:
            items = list(self._children.items())
        if not items and not self.labelnames:
            items = [((), _SummaryChild())]   # an unlabelled summary is always there, as in Go
        for key, child in items:
            labels = dict(zip(self.labelnames, key, strict=True))
            for q, v in child.quantiles():
                m.add_sample(self.name, {**labels, "quantile": repr(q)}, v)
            m.add_sample(self.name + "_sum", labels, child.sum)
            m.add_sample(self.name + "_count", labels, float(child.count))
        return m


class _RefCollector:
    """Serves the :class:`RefCounter`/:class:`RefSummary` metrics of one :class:`CloudMetrics`."""

    def __init__(self, metrics: list[RefCounter | RefSummary]) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return [Metric(m.name, m.documentation, "summary" if isinstance(m, RefSummary)
                       else "unknown") for m in self.metrics]

    def collect(self) -> Iterator[Metric]:
        for m in self.metrics:
            yield m.family()


class CloudMetrics:
    """Every metric the cloud dispatcher exports (driver, pool, scheduler, queue)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry()
        self.registry = r
        self.driver_operations = RefCounter(
            P + "driver_operations", "Number of instance-set API calls.",
            ["operation", "error"],
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
        self.boot_outcomes = RefCounter(
            P + "boot_outcomes", "Boot outcomes by type.", ["outcome"],
        )
        for outcome in ("success", "failure", "aborted", "disappeared"):
            self.boot_outcomes.labels(outcome=outcome)
        self.instances_disappeared = RefCounter(
            P + "instances_disappeared", "Number of occurrences of an instance disappearing from "
            "the cloud provider's list of instances.", ["state"],
        )
        for state in ("unknown", "booting", "idle", "running", "shutdown"):
            self.instances_disappeared.labels(state=state)
        self.instances_time_to_ssh_seconds = RefSummary(
            P + "instances_time_to_ssh_seconds",
            "Number of seconds between instance creation and the first successful SSH connection.",
        )
        self.instances_time_to_ready_for_container_seconds = RefSummary(
            P + "instances_time_to_ready_for_container_seconds",
            "Number of seconds between the first successful SSH connection and ready to run "
            "containers.",
        )
        self.instances_time_from_shutdown_request_to_disappearance_seconds = RefSummary(
            P + "instances_time_from_shutdown_request_to_disappearance_seconds",
            "Number of seconds between the first shutdown attempt and the disappearance of the "
            "worker.",
        )
        self.containers_time_from_queue_to_crunch_run_seconds = RefSummary(
            P + "containers_time_from_queue_to_crunch_run_seconds",
            "Number of seconds between the queuing of a container and the start of crunch-run.",
        )
        self.instances_run_probe_duration_seconds = RefSummary(
            P + "instances_run_probe_duration_seconds",
            "Number of seconds per runProbe.", ["outcome"],
        )
        r.register(_RefCollector([
            self.driver_operations, self.boot_outcomes, self.instances_disappeared,
            self.instances_time_to_ssh_seconds,
            self.instances_time_to_ready_for_container_seconds,
            self.instances_time_from_shutdown_request_to_disappearance_seconds,
            self.containers_time_from_queue_to_crunch_run_seconds,
            self.instances_run_probe_duration_seconds,
        ]))
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
