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


def test_dispatcher_registers_reference_metrics():
    cfg = stub_config([itype(1)])
    cfg.containers.dispatch_private_key = key_pem()
    cfg.services.controller.external_url = "https://127.0.0.1:8000"
    registry = new_registry()

    async def go() -> bytes:
        disp = CloudDispatcher(cfg, registry=registry, instance_set=StubInstanceSet(),
                               client=MemoryApi())
        disp.scheduler.update_metrics()
        disp.pool.update_metrics()
        body, _ = render(registry)
        await disp.close()
        return body

    text = asyncio.run(go()).decode()
    for name in ("driver_operations", "queue_entries", "containers_allocated_not_started",
                 "containers_not_allocated_over_quota", "containers_longest_wait_time_seconds",
                 "last_503_time", "max_concurrent_containers", "at_quota", "containers_running",
                 "probe_age_seconds_max", "probe_age_seconds_median", "instances_total",
                 "instances_price", "vcpus_total", "memory_bytes_total", "boot_outcomes",
                 "instances_disappeared", "instances_time_to_ssh_seconds",
                 "instances_time_to_ready_for_container_seconds",
                 "instances_time_from_shutdown_request_to_disappearance_seconds",
                 "containers_time_from_queue_to_crunch_run_seconds",
                 "instances_run_probe_duration_seconds"):
        assert f"arvados_dispatchcloud_{name}" in text, name
    assert 'arvados_dispatchcloud_instances_total{category="idle",instance_type="type1"} 0.0' \
        in text


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
