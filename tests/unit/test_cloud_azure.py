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


class FakePoller:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class FakeOps:
    """Stands in for the SDK's operation groups; records calls, answers with REST dicts."""

    def __init__(self, calls: list, kind: str, store: dict, fail=None) -> None:
        self.calls, self.kind, self.store, self.fail = calls, kind, store, fail

    def begin_create_or_update(self, rg, name, body):
        self.calls.append((self.kind, "create", rg, name))
        if self.fail is not None:
            raise self.fail
        rec = {**body, "name": name, "id": f"/{self.kind}/{name}"}
        if self.kind == "nic":
            ipc = rec["properties"]["ipConfigurations"][0]
            ipc["properties"]["privateIPAddress"] = "10.1.2.3"
        self.store[name] = rec
        return FakePoller(rec)

    def begin_update(self, rg, name, body):
        self.calls.append((self.kind, "update", rg, name))
        self.store[name]["tags"] = body["tags"]
        return FakePoller(self.store[name])

    def begin_delete(self, rg, name):
        self.calls.append((self.kind, "delete", rg, name))
        self.store.pop(name, None)
        return FakePoller(None)

    def list(self, rg):
        return list(self.store.values())


def fake_sdk(iset: AzureInstanceSet, fail=None) -> list:
    calls: list = []
    vms: dict = {}
    nics: dict = {}

    class Compute:
        virtual_machines = FakeOps(calls, "vm", vms, fail)

    class Network:
        network_interfaces = FakeOps(calls, "nic", nics)

    iset._compute, iset._network = Compute(), Network()
    return calls


def test_create_list_tag_destroy_through_the_sdk_surface():
    """The driver's few SDK calls, offline: NIC then VM named compute-<set>-<random>, both
    tagged (plus created-at); listing keeps our prefix and tags and maps the NIC's private IP;
    set_tags and destroy go to the VM."""
    import asyncio

    iset = AzureInstanceSet(ClusterConfig(), "abc", PARAMS)
    calls = fake_sdk(iset)
    it = InstanceType(name="d2", provider_type="Standard_D2s_v3", vcpus=2, ram=8 << 30,
                      price=0.1)
    tags = {"ArvadosInstanceSetID": "abc", "ArvadosInstanceType": "d2"}

    async def go():
        inst = await iset.create(it, "/img/1", tags, "echo hi", "ssh-ed25519 AAA k")
        # Someone else's VM in the same resource group, and one of ours with other tags.
        iset._compute.virtual_machines.store["other-vm"] = {"name": "other-vm", "tags": tags}
        listed = await iset.instances(tags)
        assert [i.id for i in listed] == [inst.id]
        assert await iset.instances({"ArvadosInstanceSetID": "zzz"}) == []
        await listed[0].set_tags({**tags, "ArvadosIdleBehavior": "hold"})
        await listed[0].destroy()
        return inst, listed[0]

    inst, again = asyncio.run(go())
    assert inst.id.startswith("compute-abc-") and inst.address == "10.1.2.3"
    assert again.address == "10.1.2.3" and again.provider_type == "Standard_D2s_v3"
    assert again.remote_user == "crunch"
    assert [c[:2] for c in calls] == [("nic", "create"), ("vm", "create"), ("vm", "update"),
                                      ("vm", "delete")]
    assert calls[0][3] == inst.id + "-nic" and calls[1][3] == inst.id
    assert all(c[2] == "rg" for c in calls)
    assert "created-at" in inst.tags and inst.tags["ArvadosInstanceSetID"] == "abc"
    assert again.tags["ArvadosIdleBehavior"] == "hold"


def test_sdk_errors_come_out_classified():
    import asyncio

    iset = AzureInstanceSet(ClusterConfig(), "abc", PARAMS)
    exc = HttpResponseError(message="Operation could not be completed as it results in "
                                    "exceeding approved standardDSv3Family Cores quota")
    exc.status_code = 409

    class Err:
        code = "QuotaExceeded"
        message = str(exc.message)

    exc.error = Err()
    fake_sdk(iset, fail=exc)
    it = InstanceType(name="d2", provider_type="Standard_D2s_v3", vcpus=2, ram=8 << 30)
    with pytest.raises(QuotaError, match="QuotaExceeded"):
        asyncio.run(iset.create(it, "/img/1", {}, "", None))
