"""The shipped cloud example configs load, their drivers accept them, and the dispatcher
registers every metric of reference 5.13 (names as the reference)."""

from __future__ import annotations

import asyncio

import asyncssh
import pytest

from dispatcher.cloud.dispatcher import CloudDispatcher, crunch_run_api_host, runner_binary
from dispatcher.cloud.drivers.ec2 import EC2InstanceSet
from dispatcher.cloud.drivers.stub import StubInstanceSet
from dispatcher.cloud.errors import ConfigurationError
from dispatcher.config import load_config
from dispatcher.metrics import new_registry, render
from tests.helpers.cloud import MemoryApi, itype, stub_config
from tests.helpers.paths import REPO_ROOT

EXAMPLES = REPO_ROOT / "contrib" / "cloud"


def test_ec2_example_config():
    cfg = load_config(EXAMPLES / "config.ec2.example.yml")
    assert cfg.containers.cloud_vms.driver == "ec2"
    iset = EC2InstanceSet(cfg, "x")
    assert len(iset.subnets) == 2 and iset.security_groups == ["sg-0123456789abcdef0"]
    assert cfg.instance_types["m5xlarge.spot"].preemptible


def test_azure_example_config():
    pytest.importorskip("azure.mgmt.compute")
    from dispatcher.cloud.drivers.azure import AzureInstanceSet

    cfg = load_config(EXAMPLES / "config.azure.example.yml")
    iset = AzureInstanceSet(cfg, "x")
    assert iset.location == "westeurope" and iset.network_rg == "arvados-network"


def key_pem() -> str:
    return asyncssh.generate_private_key("ssh-ed25519").export_private_key().decode()


# Reference 5.13: every family name exactly as arvados-dispatch-cloud exports it (Go's client:
# no "_total" added to counters, quantiles on summaries), with its label names.
REFERENCE_FAMILIES = {
    "driver_operations": ("counter", {"operation", "error"}),
    "queue_entries": ("gauge", {"state", "instance_type"}),
    "containers_allocated_not_started": ("gauge", set()),
    "containers_not_allocated_over_quota": ("gauge", set()),
    "containers_longest_wait_time_seconds": ("gauge", set()),
    "last_503_time": ("gauge", set()),
    "max_concurrent_containers": ("gauge", set()),
    "at_quota": ("gauge", set()),
    "containers_running": ("gauge", set()),
    "probe_age_seconds_max": ("gauge", set()),
    "probe_age_seconds_median": ("gauge", set()),
    "instances_total": ("gauge", {"category", "instance_type"}),
    "instances_price": ("gauge", {"category"}),
    "vcpus_total": ("gauge", {"category"}),
    "memory_bytes_total": ("gauge", {"category"}),
    "boot_outcomes": ("counter", {"outcome"}),
    "instances_disappeared": ("counter", {"state"}),
    "instances_time_to_ssh_seconds": ("summary", set()),
    "instances_time_to_ready_for_container_seconds": ("summary", set()),
    "instances_time_from_shutdown_request_to_disappearance_seconds": ("summary", set()),
    "containers_time_from_queue_to_crunch_run_seconds": ("summary", set()),
    "instances_run_probe_duration_seconds": ("summary", {"outcome"}),
    "ec2_instances": ("gauge", {"subnet_id"}),
    "ec2_instance_starts_total": ("counter", {"subnet_id", "success"}),
}


def exposition_samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)] from Prometheus text, parsed by hand (no renaming)."""
    import re

    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
        assert m, line
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        out.setdefault(m.group(1), []).append((labels, float(m.group(3))))
    return out


def test_dispatcher_exports_reference_metric_names_exactly():
    cfg = stub_config([itype(1)])
    cfg.containers.dispatch_private_key = key_pem()
    cfg.services.controller.external_url = "https://127.0.0.1:8000"
    registry = new_registry()

    async def go() -> bytes:
        disp = CloudDispatcher(cfg, registry=registry, instance_set=StubInstanceSet(),
                               client=MemoryApi())
        disp.metrics.ec2_metrics()[1].labels(subnet_id="subnet-1", success="1").inc()
        disp.metrics.ec2_metrics()[0].labels(subnet_id="subnet-1").set(1)
        disp.metrics.boot_outcomes.labels(outcome="success").inc()
        for v in range(1, 101):
            disp.metrics.instances_time_to_ssh_seconds.observe(float(v))
        disp.metrics.instances_run_probe_duration_seconds.labels(outcome="success").observe(0.25)
        disp.scheduler.update_metrics()
        disp.pool.update_metrics()
        body, _ = render(registry)
        await disp.close()
        return body

    samples = exposition_samples(asyncio.run(go()).decode())
    for short, (kind, labelnames) in REFERENCE_FAMILIES.items():
        name = "arvados_dispatchcloud_" + short
        if kind == "summary":
            assert {name, name + "_sum", name + "_count"} <= set(samples), name
            for labels, _ in samples[name]:
                assert set(labels) == labelnames | {"quantile"}, (name, labels)
            assert {lb["quantile"] for lb, _ in samples[name]} == {"0.5", "0.9", "0.95", "0.99"}
        else:
            assert name in samples or kind == "gauge" and labelnames, name
            for labels, _ in samples.get(name, []):
                assert set(labels) == labelnames, (name, labels)
    # The names Python's client would have made up instead must not appear.
    for wrong in ("driver_operations_total", "boot_outcomes_total",
                  "instances_disappeared_total"):
        assert "arvados_dispatchcloud_" + wrong not in samples, wrong
    assert ({"outcome": "success"}, 1.0) in samples["arvados_dispatchcloud_boot_outcomes"]
    assert len(samples["arvados_dispatchcloud_driver_operations"]) == 8   # pre-created, as Go
    ssh = {lb["quantile"]: v for lb, v in samples["arvados_dispatchcloud_instances_time_to_ssh_seconds"]}
    assert ssh == {"0.5": 50.0, "0.9": 90.0, "0.95": 95.0, "0.99": 99.0}
    assert samples["arvados_dispatchcloud_instances_time_to_ssh_seconds_count"] == [({}, 100.0)]
    assert ({"category": "idle", "instance_type": "type1"}, 0.0) in \
        samples["arvados_dispatchcloud_instances_total"]


def test_private_key_errors_name_the_key():
    cfg = stub_config([itype(1)])
    cfg.services.controller.external_url = "https://127.0.0.1:8000"
    with pytest.raises(ConfigurationError, match="DispatchPrivateKey"):
        CloudDispatcher(cfg, instance_set=StubInstanceSet(), client=MemoryApi())
    cfg.containers.dispatch_private_key = "file:///nonexistent/key"
    with pytest.raises(ConfigurationError, match="cannot read /nonexistent/key"):
        CloudDispatcher(cfg, instance_set=StubInstanceSet(), client=MemoryApi())


def test_api_host_and_runner_binary(tmp_path):
    cfg = stub_config([itype(1)])
    cfg.services.controller.external_url = "https://ctl.example:8443/"
    assert crunch_run_api_host(cfg) == "ctl.example:8443"
    cfg.services.controller.external_url = "http://127.0.0.1:9"
    assert crunch_run_api_host(cfg) == "http://127.0.0.1:9"
    assert runner_binary(cfg) is None  # /proc/self/exe (the default) means "do not deploy"
    f = tmp_path / "crunch-run.pyz"
    f.write_bytes(b"PK")
    cfg.containers.cloud_vms.deploy_runner_binary = str(f)
    assert runner_binary(cfg) == b"PK"


def test_summary_quantiles_cover_the_last_ten_minutes(monkeypatch):
    import math

    from dispatcher.cloud import metrics as cm

    now = [1000.0]
    monkeypatch.setattr(cm.time, "monotonic", lambda: now[0])
    s = cm.RefSummary("x_seconds", "test")
    for v in (1.0, 2.0, 3.0, 4.0):
        s.observe(v)
    assert s.labels().quantiles() == [(0.5, 2.0), (0.9, 4.0), (0.95, 4.0), (0.99, 4.0)]
    now[0] += cm.SUMMARY_MAX_AGE_S + 1
    s.observe(10.0)
    assert [v for _, v in s.labels().quantiles()] == [10.0] * 4
    now[0] += cm.SUMMARY_MAX_AGE_S + 1
    assert all(math.isnan(v) for _, v in s.labels().quantiles())
    fam = s.family()
    by_name = {smp.name: smp.value for smp in fam.samples if "quantile" not in smp.labels}
    assert by_name == {"x_seconds_sum": 20.0, "x_seconds_count": 5.0}   # cumulative
    with pytest.raises(ValueError):
        cm.RefCounter("c", "test", ["a"]).labels(a="x").inc(-1)


def test_unsupported_driver_health_and_deploy_public_key(tmp_path):
    from dispatcher.cloud.drivers import new_instance_set

    cfg = stub_config([itype(1)], driver="gce")
    with pytest.raises(ConfigurationError, match="unsupported cloud driver 'gce' in "
                                                 "Containers.CloudVMs.Driver"):
        new_instance_set(cfg, "x")
    cfg = stub_config([itype(1)])
    cfg.containers.dispatch_private_key = key_pem()
    cfg.services.controller.external_url = "https://127.0.0.1:8000"
    runner = tmp_path / "crunch-run.pyz"
    runner.write_bytes(b"PK")
    cfg.containers.cloud_vms.deploy_runner_binary = str(runner)

    async def go() -> tuple[str | None, str | None, str | None]:
        disp = CloudDispatcher(cfg, instance_set=StubInstanceSet(), client=MemoryApi())
        healthy = disp.health()
        key = disp.pool.public_key
        runner.unlink()   # the runner binary went away: /_health/ping reports it
        sick = disp.health()
        await disp.close()
        return healthy, key, sick

    healthy, key, sick = asyncio.run(go())
    assert healthy is None and key is not None and key.startswith("ssh-ed25519 ")
    assert sick is not None and "DeployRunnerBinary" in sick
    runner.write_bytes(b"PK")
    cfg.containers.cloud_vms.deploy_public_key = False

    async def no_key() -> str | None:
        disp = CloudDispatcher(cfg, instance_set=StubInstanceSet(), client=MemoryApi())
        await disp.close()
        return disp.pool.public_key

    assert asyncio.run(no_key()) is None
