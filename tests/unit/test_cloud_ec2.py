"""EC2 driver, pure parts (reference 7.16 ec2 tests): error classification, throttle back-off,
quota groups, subnet-specific errors, key fingerprints vs ssh-keygen, the RunInstances request."""

from __future__ import annotations

import subprocess

import pytest

from dispatcher.cloud.drivers.base import PricePoint, normalize_price_history
from dispatcher.cloud.drivers.ec2 import (
    EC2InstanceSet,
    ThrottleBackoff,
    classify_error,
    is_subnet_specific,
    key_fingerprints,
    quota_group,
)
from dispatcher.cloud.errors import CapacityError, DriverError, QuotaError, RateLimitError
from dispatcher.config import ClusterConfig, InstanceType


@pytest.mark.parametrize("ptype,spot,want", [
    ("g1.large", False, "g"), ("inf1.2xlarge", False, "inf"), ("m1.xlarge", False, "standard"),
    ("m1.xlarge", True, "standard-spot"), ("p4.xlarge", True, "p-spot"),
    ("p5.xlarge", True, "p5-spot"), ("trn1.2xlarge", False, "trn"), ("", False, ""),
    ("vt1.3xlarge", False, "g"), ("c5.large", False, "standard"),
])
def test_quota_groups(ptype, spot, want):
    assert quota_group(ptype, spot) == want


def test_quota_group_overrides():
    assert quota_group("g5.xlarge", False, {"g5": "gpu5"}) == "gpu5"


def test_error_classification():
    b = ThrottleBackoff()
    e = classify_error("Throttling", "Rate exceeded", b, now=100.0)
    assert isinstance(e, RateLimitError) and e.earliest_retry == 101.0
    e = classify_error("RequestLimitExceeded", "", b, now=100.0)
    assert isinstance(e, RateLimitError) and e.earliest_retry == 100.0 + 2.5
    assert isinstance(classify_error("InstanceLimitExceeded", "", b), QuotaError)
    # A non-throttle result resets the back-off.
    assert isinstance(classify_error("Throttling", "", b, now=0), RateLimitError)
    assert b.delay == 1.0
    for code in ("InsufficientAddressCapacity", "InsufficientFreeAddressesInSubnet",
                 "InsufficientVolumeCapacity", "MaxSpotInstanceCountExceeded"):
        assert isinstance(classify_error(code, "", b), QuotaError), code
    e = classify_error("VcpuLimitExceeded", "", b)
    assert isinstance(e, CapacityError) and e.quota_group_specific and not e.instance_type_specific
    e = classify_error("InsufficientInstanceCapacity", "", b)
    assert isinstance(e, CapacityError) and e.instance_type_specific
    e = classify_error("Unsupported", "The requested instance type is not supported here", b)
    assert isinstance(e, CapacityError) and e.instance_type_specific
    e = classify_error("Unsupported", "something else", b)
    assert type(e) is DriverError


def test_throttle_backoff_caps_at_60s():
    b = ThrottleBackoff()
    delays = [b.next() for _ in range(20)]
    assert delays[:3] == [1.0, 2.5, 4.75]
    assert max(delays) == 60.0


@pytest.mark.parametrize("code,msg,want", [
    ("InsufficientInstanceCapacity", "", True),
    ("InsufficientVolumeCapacity", "", True),
    ("InsufficientFreeAddressesInSubnet", "", True),
    ("InvalidSubnetID.NotFound", "", True),
    ("InvalidParameterValue", "Not enough free addresses in subnet subnet-1 .", True),
    ("Client.InvalidParameterValue", "no sufficient free Ipv4 addresses", True),
    ("ClientInvalidParameterValue", "insufficient: not sufficient free Ipv6 addresses", True),
    ("InvalidParameterValue", "Invalid value for InstanceType", False),
    ("InstanceLimitExceeded", "", False),
    ("AuthFailure", "", False),
])
def test_subnet_specific_errors(code, msg, want):
    assert is_subnet_specific(code, msg) is want


def _keygen(tmp_path, kind: str) -> str:
    path = tmp_path / f"k_{kind}"
    args = ["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(path)]
    if kind == "rsa":
        args += ["-b", "2048"]
    subprocess.run(args, check=True)
    return str(path)


def test_fingerprints_match_openssl_and_ssh_keygen(tmp_path):
    # ed25519: base64 SHA256 as ssh-keygen -l prints it (without padding), and with "=".
    path = _keygen(tmp_path, "ed25519")
    pub = open(path + ".pub").read().strip()
    out = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", path + ".pub"],
                         capture_output=True, text=True, check=True).stdout
    fp = out.split()[1].removeprefix("SHA256:")
    assert key_fingerprints(pub) == [fp + "=", fp]
    # RSA: MD5 of the DER public key, as AWS shows it for imported keys.
    path = _keygen(tmp_path, "rsa")
    pub = open(path + ".pub").read().strip()
    der = subprocess.run(["ssh-keygen", "-e", "-m", "PKCS8", "-f", path + ".pub"],
                         capture_output=True, check=True).stdout
    der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "DER"], input=der,
                         capture_output=True, check=True).stdout
    md5 = subprocess.run(["openssl", "md5", "-c"], input=der, capture_output=True,
                         check=True).stdout.decode().split()[-1]
    assert key_fingerprints(pub)[0] == md5


def test_run_instances_request():
    cfg = ClusterConfig()
    iset = EC2InstanceSet(cfg, "setid", params={
        "Region": "us-east-1", "SecurityGroupIDs": {"sg-1": {}, "sg-2": {}},
        "SubnetID": ["subnet-a", "subnet-b"], "IAMInstanceProfile": "prof",
        "EBSVolumeType": "gp3"})
    it = InstanceType(name="big", provider_type="m5.large", vcpus=2, ram=8 << 30,
                      added_scratch=(100 << 30) + 1, price=0.25, preemptible=True)
    req = iset.run_instances_params(it, "ami-1", {"ArvadosInstanceSetID": "setid"}, "echo hi",
                                    "kp", "subnet-b")
    assert req["InstanceType"] == "m5.large" and req["ImageId"] == "ami-1"
    assert req["MinCount"] == req["MaxCount"] == 1
    nic = req["NetworkInterfaces"][0]
    assert nic == {"AssociatePublicIpAddress": False, "DeleteOnTermination": True,
                   "DeviceIndex": 0, "Groups": ["sg-1", "sg-2"], "SubnetId": "subnet-b"}
    assert req["InstanceInitiatedShutdownBehavior"] == "terminate"
    assert req["MetadataOptions"]["HttpTokens"] == "required"
    assert req["UserData"] == "#!/bin/sh\necho hi\n"
    assert req["TagSpecifications"] == [{"ResourceType": "instance", "Tags": [
        {"Key": "ArvadosInstanceSetID", "Value": "setid"}]}]
    assert req["BlockDeviceMappings"][0]["DeviceName"] == "/dev/xvdt"
    assert req["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"] == 101
    assert req["BlockDeviceMappings"][0]["Ebs"]["VolumeType"] == "gp3"
    assert req["InstanceMarketOptions"]["MarketType"] == "spot"
    assert req["InstanceMarketOptions"]["SpotOptions"]["MaxPrice"] == "0.250000"
    assert req["IamInstanceProfile"] == {"Name": "prof"}
    assert req["KeyName"] == "kp"


def test_unknown_driver_parameter_is_an_error():
    from dispatcher.cloud.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="SubnetIDs"):
        EC2InstanceSet(ClusterConfig(), "x", params={"SubnetIDs": "s"})


def test_normalize_price_history():
    pts = [PricePoint(1, 0.5), PricePoint(3, 0.5), PricePoint(2, 0.7), PricePoint(4, 0.5),
           PricePoint(4, 0.6)]
    got = normalize_price_history(pts)
    assert [p.start_time for p in got] == sorted((p.start_time for p in got), reverse=True)
    assert [(p.start_time, p.price) for p in got] == [(4, 0.6), (3, 0.5), (2, 0.7), (1, 0.5)]
