"""Azure driver: request building with the SDK's own models and error classification (there is
no Azure emulator, see docs/cloud.md)."""

from __future__ import annotations

import base64

import pytest

pytest.importorskip("azure.mgmt.compute")

from azure.core.exceptions import HttpResponseError  # noqa: E402

from dispatcher.cloud.drivers.azure import (  # noqa: E402
    AzureInstanceSet,
    _translate,
    classify_error,
    nic_parameters,
    vm_parameters,
)
from dispatcher.cloud.errors import (  # noqa: E402
    CapacityError,
    ConfigurationError,
    DriverError,
    QuotaError,
    RateLimitError,
)
from dispatcher.config import ClusterConfig, InstanceType  # noqa: E402


def body(rest: dict, model_name: str) -> dict:
    """Check that the SDK's own model class takes the REST body unchanged, and return it."""
    import azure.mgmt.compute.models as cm
    import azure.mgmt.network.models as nm

    cls = getattr(cm, model_name, None) or getattr(nm, model_name)
    if hasattr(cls, "deserialize"):          # msrest-style SDK versions
        assert cls.deserialize(rest).serialize(keep_readonly=False) == rest
    else:                                    # current SDKs: models are mappings
        assert cls(rest).as_dict() == rest
    return rest


PARAMS = {"SubscriptionID": "sub", "ResourceGroup": "rg", "Network": "net", "Subnet": "sn",
          "Location": "westeurope", "AdminUsername": "crunch"}


def test_vm_parameters_spot_and_ssh_key():
    it = InstanceType(name="d2", provider_type="Standard_D2s_v3", vcpus=2, ram=8 << 30,
                      price=0.04, preemptible=True)
    vm = vm_parameters(name="compute-x-1", location="westeurope", it=it, image_id="/img/1",
                       nic_id="/nic/1", admin_username="crunch", public_key="ssh-ed25519 AAA k",
                       init_command="echo hi", tags={"ArvadosInstanceSetID": "x"})
    body_ = body(vm, "VirtualMachine")
    assert body_["properties"]["hardwareProfile"]["vmSize"] == "Standard_D2s_v3"
    assert body_["properties"]["priority"] == "Spot"
    assert body_["properties"]["evictionPolicy"] == "Delete"
    assert body_["properties"]["billingProfile"]["maxPrice"] == 0.04
    os_profile = body_["properties"]["osProfile"]
    assert base64.b64decode(os_profile["customData"]) == b"#!/bin/sh\necho hi\n"
    keys = os_profile["linuxConfiguration"]["ssh"]["publicKeys"]
    assert keys == [{"path": "/home/crunch/.ssh/authorized_keys", "keyData": "ssh-ed25519 AAA k"}]
    assert body_["tags"] == {"ArvadosInstanceSetID": "x"}
    assert body_["properties"]["storageProfile"]["imageReference"]["id"] == "/img/1"


def test_vm_parameters_on_demand_has_no_spot():
    it = InstanceType(name="d2", provider_type="Standard_D2s_v3", vcpus=2, ram=8 << 30, price=0.1)
    body_ = body(vm_parameters(name="n", location="l", it=it, image_id="i", nic_id="n",
                               admin_username="crunch", public_key=None, init_command="",
                               tags={}), "VirtualMachine")
    assert "priority" not in body_["properties"]
    assert "ssh" not in body_["properties"]["osProfile"]["linuxConfiguration"]


def test_nic_parameters_private_ip_only():
    body_ = body(nic_parameters("westeurope", "/subnets/sn", {"a": "b"}), "NetworkInterface")
    ipc = body_["properties"]["ipConfigurations"][0]
    assert ipc["properties"]["subnet"]["id"] == "/subnets/sn"
    assert "publicIPAddress" not in ipc["properties"]


@pytest.mark.parametrize("status,code,msg,cls", [
    (429, "TooManyRequests", "slow down", RateLimitError),
    (409, "QuotaExceeded", "Operation could not be completed as it results in exceeding "
     "approved standardDSv3Family Cores quota", QuotaError),
    (409, "OperationNotAllowed", "exceeding approved Total Regional Cores quota", QuotaError),
    (409, "SkuNotAvailable", "The requested size is not available", CapacityError),
    (409, "AllocationFailed", "Allocation failed", CapacityError),
    (409, "ZonalAllocationFailed", "", CapacityError),
    (400, "InvalidParameter", "bad", DriverError),
])
def test_classify_error(status, code, msg, cls):
    err = classify_error(status, code, msg, now=100.0)
    assert type(err) is cls
    if cls is CapacityError:
        assert err.instance_type_specific


def test_translate_sdk_exception_uses_retry_after():
    exc = HttpResponseError(message="throttled")
    exc.status_code = 429

    class Resp:
        headers = {"Retry-After": "7"}

    exc.response = Resp()
    err = _translate(exc)
    assert isinstance(err, RateLimitError)
    assert err.earliest_retry > 0


def test_instance_set_validates_parameters():
    with pytest.raises(ConfigurationError, match="Subnet"):
        AzureInstanceSet(ClusterConfig(), "x", {k: v for k, v in PARAMS.items() if k != "Subnet"})
    with pytest.raises(ConfigurationError, match="Bogus"):
        AzureInstanceSet(ClusterConfig(), "x", {**PARAMS, "Bogus": 1})
    iset = AzureInstanceSet(ClusterConfig(), "abc", PARAMS)
    assert iset.prefix == "compute-abc-"
    assert iset.subnet_id.endswith("/virtualNetworks/net/subnets/sn")
    spot = InstanceType(name="a", provider_type="Standard_D2s_v3", preemptible=True)
    assert iset.instance_quota_group(spot) == "Standard_D2s_v3-spot"
