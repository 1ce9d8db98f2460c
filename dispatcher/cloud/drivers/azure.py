"""The ``azure`` driver: azure-mgmt-compute / azure-mgmt-network (SDK calls in worker threads).

Like the reference (5.11, Azure paragraph): each instance is a NIC plus a VM, both named
``compute-<InstanceSetID>-<random>`` (NIC with ``-nic``), both tagged with the dispatcher's tags
plus ``created-at``; the VM gets the dispatch public key for ``AdminUsername``, the init command
as cloud-init ``custom_data``, and Spot priority (eviction: delete, max price: the type's Price)
for preemptible types. Instances are listed from the resource group and filtered by tag; the
address is the NIC's private IP.

**There is no Azure emulator**: the request bodies (:func:`vm_parameters`,
:func:`nic_parameters`, REST JSON that every SDK version accepts) are unit-tested and checked
against the SDK's own model classes, and so is the error classification (:func:`classify_error`);
the calls themselves are thin and untested against a live Azure.

Error classes: HTTP 429 -> ``RateLimitError`` (honouring ``Retry-After``); ``QuotaExceeded``
(and ``OperationNotAllowed`` mentioning a quota) -> ``QuotaError``; ``SkuNotAvailable``,
``AllocationFailed``, ``ZonalAllocationFailed``, ``OverconstrainedAllocationRequest`` ->
type-specific ``CapacityError``.
"""

from __future__ import annotations

import asyncio
import base64
import re
import secrets
import time
from collections.abc import Mapping
from typing import Any

from dispatcher.cloud.drivers.base import Instance, InstanceSet
from dispatcher.cloud.errors import (
    CapacityError,
    ConfigurationError,
    DriverError,
    QuotaError,
    RateLimitError,
)
from dispatcher.config import ClusterConfig, InstanceType

KNOWN_PARAMS = {"SubscriptionID", "ClientID", "ClientSecret", "TenantID", "CloudEnvironment",
                "Location", "ResourceGroup", "NetworkResourceGroup", "Network", "Subnet",
                "ImageResourceGroup", "SharedImageGalleryName", "SharedImageGalleryImageVersion",
                "StorageAccount", "BlobContainer", "DeleteDanglingResourcesAfter",
                "AdminUsername"}
CAPACITY_CODES = {"SkuNotAvailable", "AllocationFailed", "ZonalAllocationFailed",
                  "OverconstrainedAllocationRequest", "OverconstrainedZonalAllocationRequest"}


def classify_error(status: int | None, code: str, message: str,
                   retry_after: float | None = None, now: float | None = None) -> Exception:
    """Translate an Azure error (HTTP status, error code, message) into the cloud classes."""
    now = time.time() if now is None else now
    text = f"{code or status}: {message}"
    if status == 429 or code in ("TooManyRequests", "RetryableError"):
        return RateLimitError(text, now + (retry_after if retry_after is not None else 10.0))
    if code == "QuotaExceeded" or (code == "OperationNotAllowed" and "quota" in message.lower()):
        return QuotaError(text)
    if code in CAPACITY_CODES:
        return CapacityError(text, instance_type_specific=True)
    return DriverError(text)


def _translate(exc: Exception) -> Exception:
    status = getattr(exc, "status_code", None)
    err = getattr(exc, "error", None)
    code = str(getattr(err, "code", "") or "")
    message = str(getattr(err, "message", "") or getattr(exc, "message", "") or exc)
    retry_after = None
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None) or {}
    try:
        if "Retry-After" in headers:
            retry_after = float(headers["Retry-After"])
    except (TypeError, ValueError):
        retry_after = None
    return classify_error(status, code, message, retry_after)


def nic_parameters(location: str, subnet_id: str, tags: Mapping[str, str]) -> dict[str, Any]:
    """The NetworkInterface request body (REST JSON; private IP only)."""
    return {
        "location": location,
        "tags": dict(tags),
        "properties": {"ipConfigurations": [{
            "name": "ip1",
            "properties": {"subnet": {"id": subnet_id}, "privateIPAllocationMethod": "Dynamic"},
        }]},
    }


def vm_parameters(*, name: str, location: str, it: InstanceType, image_id: str, nic_id: str,
                  admin_username: str, public_key: str | None, init_command: str,
                  tags: Mapping[str, str]) -> dict[str, Any]:
    """The VirtualMachine request body (REST JSON, accepted by every SDK version as is)."""
    linux: dict[str, Any] = {"disablePasswordAuthentication": True}
    if public_key:
        linux["ssh"] = {"publicKeys": [{"path": f"/home/{admin_username}/.ssh/authorized_keys",
                                        "keyData": public_key}]}
    props: dict[str, Any] = {
        "hardwareProfile": {"vmSize": it.provider_type or it.name},
        "storageProfile": {
            "imageReference": {"id": image_id},
            "osDisk": {"createOption": "FromImage", "deleteOption": "Delete",
                       "managedDisk": {"storageAccountType": "Standard_LRS"}},
        },
        "osProfile": {
            "computerName": name,
            "adminUsername": admin_username,
            "customData": base64.b64encode(f"#!/bin/sh\n{init_command}\n".encode()).decode(),
            "linuxConfiguration": linux,
        },
        "networkProfile": {"networkInterfaces": [
            {"id": nic_id, "properties": {"primary": True, "deleteOption": "Delete"}}]},
    }
    if it.preemptible:
        props["priority"] = "Spot"
        props["evictionPolicy"] = "Delete"
        props["billingProfile"] = {"maxPrice": it.price}
    return {"location": location, "tags": dict(tags), "properties": props}


def _get(obj: Any, *path: str) -> Any:
    """Read a field from an SDK model or a REST dict (``properties`` flattened or not)."""
    for key in path:
        if obj is None:
            return None
        if isinstance(obj, Mapping):
            nxt = obj.get(key)
            if nxt is None and isinstance(obj.get("properties"), Mapping):
                nxt = obj["properties"].get(key)
            obj = nxt
        else:
            snake = re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower().replace("_i_p", "_ip")
            obj = getattr(obj, snake, None)
    return obj


class AzureInstance(Instance):
    def __init__(self, iset: AzureInstanceSet, vm: Any, address: str) -> None:
        self._set = iset
        self.vm = vm
        self._address = address
        self._tags = dict(_get(vm, "tags") or {})

    @property
    def id(self) -> str:
        return str(_get(self.vm, "name") or "")

    @property
    def provider_type(self) -> str:
        return str(_get(self.vm, "hardwareProfile", "vmSize") or "")

    @property
    def address(self) -> str:
        return self._address

    @property
    def remote_user(self) -> str:
        return self._set.admin_username

    @property
    def tags(self) -> dict[str, str]:
        return self._tags

    async def set_tags(self, tags: Mapping[str, str]) -> None:
        await self._set.call(self._set.compute.virtual_machines.begin_update,
                             self._set.resource_group, self.id, {"tags": dict(tags)}, poll=True)
        self._tags = dict(tags)

    async def destroy(self) -> None:
        await self._set.call(self._set.compute.virtual_machines.begin_delete,
                             self._set.resource_group, self.id, poll=False)


class AzureInstanceSet(InstanceSet):
    """See the module docstring."""

    def __init__(self, cfg: ClusterConfig, instance_set_id: str,
                 params: Mapping[str, Any] | None = None) -> None:
        p = dict(params if params is not None else cfg.containers.cloud_vms.driver_parameters)
        unknown = set(p) - KNOWN_PARAMS
        if unknown:
            raise ConfigurationError(
                f"Containers.CloudVMs.DriverParameters: unknown key(s) {sorted(unknown)} for the "
                f"azure driver (known: {sorted(KNOWN_PARAMS)})")
        for required in ("SubscriptionID", "ResourceGroup", "Network", "Subnet"):
            if not p.get(required):
                raise ConfigurationError(
                    f"Containers.CloudVMs.DriverParameters.{required} is required by the azure "
                    "driver")
        self.params = p
        self.set_id = instance_set_id
        self.prefix = f"compute-{instance_set_id}-"
        self.location = str(p.get("Location") or "centralus")
        self.resource_group = str(p["ResourceGroup"])
        self.network_rg = str(p.get("NetworkResourceGroup") or self.resource_group)
        self.admin_username = str(p.get("AdminUsername") or "crunch")
        self.subnet_id = (f"/subscriptions/{p['SubscriptionID']}/resourceGroups/{self.network_rg}"
                          f"/providers/Microsoft.Network/virtualNetworks/{p['Network']}"
                          f"/subnets/{p['Subnet']}")
        self._compute: Any = None
        self._network: Any = None

    def _credential(self) -> Any:
        from azure.identity import ClientSecretCredential, DefaultAzureCredential

        if self.params.get("ClientSecret"):
            from dispatcher.logs import register_secret

            register_secret(str(self.params["ClientSecret"]))
            return ClientSecretCredential(str(self.params.get("TenantID", "")),
                                          str(self.params.get("ClientID", "")),
                                          str(self.params["ClientSecret"]))
        return DefaultAzureCredential()

    @property
    def compute(self) -> Any:
        if self._compute is None:
            from azure.mgmt.compute import ComputeManagementClient

            self._compute = ComputeManagementClient(self._credential(),
                                                    str(self.params["SubscriptionID"]))
        return self._compute

    @property
    def network(self) -> Any:
        if self._network is None:
            from azure.mgmt.network import NetworkManagementClient

            self._network = NetworkManagementClient(self._credential(),
                                                    str(self.params["SubscriptionID"]))
        return self._network

    async def call(self, fn: Any, *args: Any, poll: bool = False) -> Any:
        """One SDK call in a worker thread; long-running operations awaited when ``poll``."""
        from azure.core.exceptions import AzureError

        def run() -> Any:
            result = fn(*args)
            return result.result() if poll and hasattr(result, "result") else result

        try:
            return await asyncio.to_thread(run)
        except AzureError as exc:
            raise _translate(exc) from None

    async def create(self, it: InstanceType, image_id: str, tags: Mapping[str, str],
                     init_command: str, public_key: str | None) -> Instance:
        name = self.prefix + secrets.token_hex(6)
        all_tags = {**tags, "created-at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        nic = await self.call(self.network.network_interfaces.begin_create_or_update,
                              self.resource_group, name + "-nic",
                              nic_parameters(self.location, self.subnet_id, all_tags), poll=True)
        nic_id = str(_get(nic, "id") or "")
        vm = await self.call(self.compute.virtual_machines.begin_create_or_update,
                             self.resource_group, name,
                             vm_parameters(name=name, location=self.location, it=it,
                                           image_id=image_id, nic_id=nic_id,
                                           admin_username=self.admin_username,
                                           public_key=public_key, init_command=init_command,
                                           tags=all_tags), poll=True)
        return AzureInstance(self, vm, _private_ip(nic))

    async def instances(self, tags: Mapping[str, str]) -> list[Instance]:
        vms = await self.call(lambda: list(self.compute.virtual_machines.list(
            self.resource_group)))
        nics = await self.call(lambda: list(self.network.network_interfaces.list(
            self.resource_group)))
        ip_of = {str(_get(n, "name")): _private_ip(n) for n in nics}
        out: list[Instance] = []
        for vm in vms:
            name = str(_get(vm, "name") or "")
            if not name.startswith(self.prefix):
                continue
            vtags = _get(vm, "tags") or {}
            if all(vtags.get(k) == v for k, v in tags.items()):
                out.append(AzureInstance(self, vm, ip_of.get(f"{name}-nic") or ""))
        return out

    def instance_quota_group(self, it: InstanceType) -> str:
        return (it.provider_type or it.name) + ("-spot" if it.preemptible else "")


def _private_ip(nic: Any) -> str:
    configs = _get(nic, "ipConfigurations") or []
    return str(_get(configs[0], "privateIPAddress") or "") if configs else ""


def new_instance_set(cfg: ClusterConfig, instance_set_id: str, **_: Any) -> AzureInstanceSet:
    return AzureInstanceSet(cfg, instance_set_id)
