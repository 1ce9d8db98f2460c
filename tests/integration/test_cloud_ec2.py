"""EC2 driver against moto's EC2 server on loopback: instances are created with the right type,
tags, user data, key pair and spot options; found again by a new pool after a dispatcher
restart; destroyed when idle; quota, capacity, throttling and subnet errors injected at the SDK
boundary produce the reference's back-off."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
from collections.abc import Mapping
from typing import Any

import asyncssh
import boto3
import pytest
from botocore.exceptions import ClientError

from dispatcher.cloud.clock import Clock, FakeClock
from dispatcher.cloud.drivers.base import Executor
from dispatcher.cloud.drivers.ec2 import EC2InstanceSet
from dispatcher.cloud.drivers.wrap import wrap_instance_set
from dispatcher.cloud.errors import CapacityError, QuotaError, RateLimitError
from dispatcher.cloud.metrics import CloudMetrics
from dispatcher.cloud.pool import Pool
from dispatcher.cloud.worker import IdleBehavior, State
from dispatcher.config import InstanceType
from tests.helpers.cloud import MotoInfo, stub_config

REGION = "us-east-1"
SMALL = InstanceType(name="small", provider_type="m5.large", vcpus=2, ram=8 << 30, price=0.096,
                     added_scratch=20 << 30)
SPOT = InstanceType(name="small.preemptible", provider_type="m5.large", vcpus=2, ram=8 << 30,
                    price=0.05, preemptible=True)
BIG = InstanceType(name="big", provider_type="c5.4xlarge", vcpus=16, ram=32 << 30, price=0.68)


def ec2(moto: MotoInfo) -> Any:
    return boto3.client("ec2", region_name=REGION, endpoint_url=moto.url,
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def params(moto: MotoInfo, **extra: Any) -> dict[str, Any]:
    client = ec2(moto)
    subnets = [s["SubnetId"] for s in client.describe_subnets()["Subnets"]][:2]
    sg = client.describe_security_groups()["SecurityGroups"][0]["GroupId"]
    p = {"Region": REGION, "EndpointURL": moto.url, "AccessKeyID": "testing",
         "SecretAccessKey": "testing", "SubnetID": subnets, "SecurityGroupIDs": [sg],
         "AdminUsername": "crunch"}
    p.update(extra)
    return p


class OkExecutor(Executor):
    """Moto's instances cannot be reached over SSH: answer the probes as a healthy VM would."""

    def __init__(self) -> None:
        self.commands: list[str] = []

    async def execute(self, cmd: str, stdin: bytes | None = None, *,
                      env: Mapping[str, str] | None = None,
                      timeout_s: float | None = None) -> tuple[bytes, bytes]:
        self.commands.append(cmd)
        return b"", b""


def new_pool(moto: MotoInfo, set_id: str, *, clock: Clock | None = None, **p: Any):
    cfg = stub_config([SMALL, SPOT, BIG], max_concurrent_instance_create_ops=0,
                      timeout_idle_s=60, image_id="ami-12c6146b", driver="ec2")
    metrics = CloudMetrics()
    iset = EC2InstanceSet(cfg, set_id, params=params(moto, **p), metrics=metrics)
    clock = clock or FakeClock()
    pool = Pool(cfg, wrap_instance_set(iset, cfg, metrics, clock), lambda i, p: OkExecutor(),
                set_id=set_id, clock=clock, metrics=metrics,
                public_key=asyncssh.generate_private_key("ssh-ed25519").export_public_key(
                    "openssh").decode().strip())
    return pool, iset, metrics


def tag_dict(tags: list[dict[str, str]]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in tags}


def described(moto: MotoInfo, set_id: str) -> list[dict[str, Any]]:
    out = []
    for r in ec2(moto).describe_instances(Filters=[{"Name": "tag:ArvadosInstanceSetID",
                                                    "Values": [set_id]}])["Reservations"]:
        out.extend(r["Instances"])
    return out


def test_create_find_after_restart_and_destroy_when_idle(cloud_moto):
    set_id = "set-restart"
    clock = FakeClock()

    sent: list[dict[str, Any]] = []

    async def first() -> None:
        pool, iset, metrics = new_pool(cloud_moto, set_id, clock=clock)
        # What the real SDK sends to the (moto) endpoint, for what moto does not keep.
        iset.client.meta.events.register(
            "provide-client-params.ec2.RunInstances",
            lambda params, **_: sent.append(dict(params)))
        assert pool.create(SMALL) is not None
        assert pool.create(SPOT) is not None
        await pool.settle()
        assert len(pool.workers) == 2
        await pool.stop()
        assert metrics.registry.get_sample_value(
            "arvados_dispatchcloud_ec2_instance_starts_total",
            {"subnet_id": iset.subnets[0], "success": "1"}) == 2

    asyncio.run(first())
    insts = described(cloud_moto, set_id)
    assert len(insts) == 2
    by_type = {tag_dict(i["Tags"])["ArvadosInstanceType"]: i for i in insts}
    small, spot = by_type["small"], by_type["small.preemptible"]
    assert small["InstanceType"] == "m5.large" and spot["InstanceType"] == "m5.large"
    assert spot.get("InstanceLifecycle") == "spot" and small.get("InstanceLifecycle") != "spot"
    tags = tag_dict(small["Tags"])
    assert tags["ArvadosInstanceSetID"] == set_id and tags["ArvadosIdleBehavior"] == "run"
    assert len(tags["ArvadosInstanceSecret"]) == 40
    assert small["KeyName"].startswith("arvados-dispatch-keypair-")
    assert spot["KeyName"] == small["KeyName"]  # the key pair is imported once
    ud = ec2(cloud_moto).describe_instance_attribute(InstanceId=small["InstanceId"],
                                                     Attribute="userData")
    script = base64.b64decode(ud["UserData"]["Value"]).decode()
    assert script.startswith("#!/bin/sh\numask 0177 && echo -n \"" + tags["ArvadosInstanceSecret"])
    # IMDSv2 only, no public address, AddedScratch as a 20 GiB gp2 volume on /dev/xvdt.
    for inst in (small, spot):
        assert inst["MetadataOptions"]["HttpTokens"] == "required"
        assert not inst.get("PublicIpAddress")
    (vol,) = ec2(cloud_moto).describe_volumes(Filters=[
        {"Name": "attachment.instance-id", "Values": [small["InstanceId"]]},
        {"Name": "attachment.device", "Values": ["/dev/xvdt"]}])["Volumes"]
    assert (vol["Size"], vol["VolumeType"]) == (20, "gp2")
    # Spot options as sent: one-time, terminate on interruption, the type's Price as max price.
    by_name = {tag_dict(p["TagSpecifications"][0]["Tags"])["ArvadosInstanceType"]: p
               for p in sent}
    assert by_name["small.preemptible"]["InstanceMarketOptions"] == {
        "MarketType": "spot",
        "SpotOptions": {"InstanceInterruptionBehavior": "terminate",
                        "SpotInstanceType": "one-time", "MaxPrice": "0.050000"}}
    assert "InstanceMarketOptions" not in by_name["small"]
    assert by_name["small"]["InstanceInitiatedShutdownBehavior"] == "terminate"
    assert by_name["small"]["NetworkInterfaces"][0]["AssociatePublicIpAddress"] is False

    async def after_restart() -> None:
        # A new dispatcher process: same InstanceSetID, fresh pool and SDK client.
        pool, iset, metrics = new_pool(cloud_moto, set_id, clock=clock)
        other, _, _ = new_pool(cloud_moto, "set-someone-else", clock=clock)
        assert await other.sync() and not other.workers
        assert await pool.sync()
        assert {w.state for w in pool.workers.values()} == {State.UNKNOWN}
        assert metrics.registry.get_sample_value(
            "arvados_dispatchcloud_ec2_instances", {"subnet_id": iset.subnets[0]}) == 2
        # The listing saw a spot instance: spot prices (DescribeSpotPriceHistory) for its type
        # and zone are its price history; the on-demand one has none.
        by_name = {w.instance_type.name: w for w in pool.workers.values()}
        spot_w, small_w = by_name["small.preemptible"], by_name["small"]
        prices = spot_w.instance.price_history(spot_w.instance_type)
        assert prices and all(p.price > 0 for p in prices)
        assert [p.start_time for p in prices] == sorted((p.start_time for p in prices),
                                                        reverse=True)
        assert small_w.instance.price_history(small_w.instance_type) == []
        # AddedScratch adds the EBS volume's hourly price (EBSPrice 0.10 $/GiB-month).
        with_disk = spot_w.instance.price_history(
            dataclasses.replace(spot_w.instance_type, added_scratch=30 << 30))
        assert with_disk[0].price == pytest.approx(prices[0].price + 0.10 * 30 / 30 / 24)
        await pool.probe_all(wait=True)
        assert {w.state for w in pool.workers.values()} == {State.IDLE}
        # ... and goes to crunch-run --list on stdin (reference 5.8).
        assert any(c.endswith("--list --stdin-prices") for c in spot_w.executor.commands)
        assert not any("--stdin-prices" in c for c in small_w.executor.commands)
        clock.advance(61)
        await pool.probe_all(wait=True)   # idle past TimeoutIdle: shut down
        await pool.settle()
        assert await pool.sync()
        assert not pool.workers
        await pool.stop()

    asyncio.run(after_restart())
    states = {i["State"]["Name"] for i in described(cloud_moto, set_id)}
    assert states <= {"terminated", "shutting-down"}


def test_tags_round_trip_and_hold_survives(cloud_moto):
    set_id = "set-tags"

    async def go() -> str:
        pool, _, _ = new_pool(cloud_moto, set_id)
        pool.create(BIG)
        await pool.settle()
        (wid,) = pool.workers
        pool.set_idle_behavior(wid, IdleBehavior.HOLD)
        await pool.settle()
        await pool.stop()
        pool2, _, _ = new_pool(cloud_moto, set_id)
        await pool2.sync()
        assert pool2.workers[wid].idle_behavior is IdleBehavior.HOLD
        pool2.kill_instance(wid, "test cleanup")
        await pool2.settle()
        await pool2.stop()
        return wid

    asyncio.run(go())


class Inject:
    """Make the SDK's run_instances fail with given error codes (per subnet, or in order)."""

    def __init__(self, iset: EC2InstanceSet) -> None:
        self.real = iset.client.run_instances
        self.codes: list[str] = []
        self.by_subnet: dict[str, str] = {}
        self.by_type: dict[str, str] = {}
        self.subnets_tried: list[str] = []
        iset.client.run_instances = self  # type: ignore[method-assign]

    def __call__(self, **req: Any) -> Any:
        subnet = req["NetworkInterfaces"][0].get("SubnetId", "")
        self.subnets_tried.append(subnet)
        code = (self.codes.pop(0) if self.codes else None) or self.by_subnet.get(subnet) \
            or self.by_type.get(req["InstanceType"])
        if code:
            raise ClientError({"Error": {"Code": code, "Message": f"injected {code}"}},
                              "RunInstances")
        return self.real(**req)


def test_quota_capacity_throttle_and_subnet_failover(cloud_moto):
    set_id = "set-errors"

    async def go() -> None:
        # Wall-clock time: the driver's rate-limit deadlines are wall-clock times.
        pool, iset, metrics = new_pool(cloud_moto, set_id, clock=Clock())
        inject = Inject(iset)
        sn_a, sn_b = iset.subnets
        # Subnet failover: the first subnet is out of addresses -> the second one is used,
        # and the next create starts with the good subnet.
        inject.by_subnet[sn_a] = "InsufficientFreeAddressesInSubnet"
        pool.create(SMALL)
        await pool.settle()
        assert inject.subnets_tried == [sn_a, sn_b] and len(pool.workers) == 1
        inject.subnets_tried.clear()
        pool.create(SMALL)
        await pool.settle()
        assert inject.subnets_tried == [sn_b]
        starts = "arvados_dispatchcloud_ec2_instance_starts_total"
        assert metrics.registry.get_sample_value(starts, {"subnet_id": sn_a, "success": "0"}) == 1
        assert metrics.registry.get_sample_value(starts, {"subnet_id": sn_b, "success": "1"}) == 2
        inject.by_subnet.clear()

        # Capacity error for one provider type: only that type is held off.
        inject.by_type["c5.4xlarge"] = "InsufficientInstanceCapacity"
        pool.create(BIG)
        await pool.settle()
        assert pool.at_capacity(BIG) and not pool.at_capacity(SMALL)
        assert pool.create(BIG) is None
        inject.by_type.clear()

        # vCPU limit: the whole quota group (m5 and c5 are both "standard") is held off, the
        # spot group ("standard-spot") is not.
        inject.codes = ["VcpuLimitExceeded"]
        n = len(pool.workers)
        pool.create(SMALL)
        await pool.settle()
        assert len(pool.workers) == n
        assert pool.at_capacity(SMALL) and pool.at_capacity(BIG) and not pool.at_capacity(SPOT)
        assert pool.create(SMALL) is None
        pool.at_capacity_until.clear()     # (the 1-minute hold-off, cut short for the test)

        # Throttling: creates are suspended until the provider's earliest retry.
        inject.codes = ["RequestLimitExceeded"]
        pool.create(SMALL)
        await asyncio.sleep(0.5)
        for _ in range(50):
            if pool.create_holdoff.check():
                break
            await asyncio.sleep(0.05)
        assert isinstance(pool.create_holdoff.check(), RateLimitError)
        assert pool.create(SMALL) is None
        # The hold-off ends at the provider's earliest retry (1 s for a first throttle).
        for _ in range(100):
            if pool.create_holdoff.check() is None:
                break
            await asyncio.sleep(0.05)
        assert pool.create_holdoff.check() is None
        await pool.settle()

        # Quota: the account is full at 2 instances -> "at quota until fewer than 2".
        inject.codes = ["InstanceLimitExceeded"]
        pool.create(SMALL)
        await pool.settle()
        assert pool.at_quota() and pool.quota_error_active()
        assert pool.at_quota_until_fewer == len(pool.workers)
        assert pool.create(SPOT) is None
        victim = sorted(pool.workers)[0]
        pool.kill_instance(victim, "make room")
        await pool.settle()
        await pool.sync()
        assert not pool.at_quota()
        for wid in list(pool.workers):
            pool.kill_instance(wid, "cleanup")
        await pool.settle()
        await pool.stop()

    asyncio.run(go())


def test_driver_error_classes_from_the_sdk(cloud_moto):
    """Errors raised by the real SDK call path come out classified."""

    async def go() -> None:
        _, iset, _ = new_pool(cloud_moto, "set-classes")
        inject = Inject(iset)
        for code, cls in (("InstanceLimitExceeded", QuotaError),
                          ("InsufficientInstanceCapacity", CapacityError),
                          ("Throttling", RateLimitError)):
            inject.codes = [code]
            inject.by_subnet = {s: code for s in iset.subnets}
            with pytest.raises(cls):
                await iset.create(SMALL, "ami-12c6146b", {"ArvadosInstanceSetID": "x"}, "", None)

    asyncio.run(go())


@pytest.mark.parametrize("alg", ["ssh-ed25519", "ssh-rsa"])
def test_restarted_dispatcher_reuses_its_key_pair(cloud_moto, alg):
    """The dispatch key is imported once; a new process finds it by fingerprint, or, where the
    endpoint reports the fingerprint in another form (moto, for ed25519: hex SHA256 of the DER
    key, where AWS shows base64 SHA256), by its name after ImportKeyPair answers
    InvalidKeyPair.Duplicate, instead of failing every create with that error."""
    pub = asyncssh.generate_private_key(alg).export_public_key("openssh").decode().strip()
    calls: list[str] = []

    async def one_process() -> str:
        _, iset, _ = new_pool(cloud_moto, "set-keys")
        iset.client.meta.events.register(
            "provide-client-params.ec2.*",
            lambda params, model, **_: calls.append(model.name))
        inst = await iset.create(SMALL, "ami-12c6146b", {"ArvadosInstanceSetID": "set-keys"},
                                 "", pub)
        await inst.destroy()
        return str(inst.desc.get("KeyName"))  # type: ignore[attr-defined]

    first = asyncio.run(one_process())
    second = asyncio.run(one_process())
    assert first == second and first.startswith("arvados-dispatch-keypair-")
    assert calls.count("RunInstances") == 2
    second_process = calls[calls.index("RunInstances") + 1:]
    if alg == "ssh-rsa":   # moto reports RSA fingerprints as AWS does: found, not re-imported
        assert "ImportKeyPair" not in second_process
