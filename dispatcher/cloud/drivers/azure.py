"""The ``azure`` driver: azure-mgmt-compute / azure-mgmt-network (SDK calls in worker threads).

Like the reference (5.11, Azure paragraph): each instance is a NIC plus a VM, both named
``compute-<InstanceSetID>-<random>`` (NIC with ``-nic``), both tagged with the dispatcher's tags
plus ``created-at``; the VM gets the dispatch public key for ``AdminUsername``, the init command
as cloud-init ``custom_data``, and Spot priority (eviction: delete, max price: the type's Price)
for preemptible types. Instances are listed from the resource group and filtered by tag; the
address is the NIC's private IP.

**There is no Azure emulator**: the request building (:func:`vm_parameters`,
:func:`nic_parameters`) and error classification (:func:`classify_error`) are unit-tested with the
SDK's own model classes; the calls themselves are thin and untested against a live Azure.

Error classes: HTTP 429 -> ``RateLimitError`` (honouring ``Retry-After``); ``QuotaExceeded``
(and ``OperationNotAllowed`` mentioning a quota) -> ``QuotaError``; ``SkuNotAvailable``,
``AllocationFailed``, ``ZonalAllocationFailed``, ``OverconstrainedAllocationRequest`` ->
type-specific ``CapacityError``.
"""

from __future__ import annotations

import asyncio
import base64
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


def nic_parameters(location: str, subnet_id: str, tags: Mapping[str, str]) -> Any:
    """The NetworkInterface model for a new instance (private IP only)."""
    from azure.mgmt.network.models import (
        NetworkInterface,
        NetworkInterfaceIPConfiguration,
        Subnet,
    )

    return NetworkInterface(
        location=location, tags=dict(tags),
        ip_configurations=[NetworkInterfaceIPConfiguration(
            name="ip1", subnet=Subnet(id=subnet_id), private_ip_allocation_method="Dynamic")],
    )


def vm_parameters(*, name: str, location: str, it: InstanceType, image_id: str, nic_id: str,
                  admin_username: str, public_key: str | None, init_command: str,
                  tags: Mapping[str, str]) -> Any:
    """The VirtualMachine model for a new instance."""
    from azure.mgmt.compute import models as m

    linux = m.LinuxConfiguration(disable_password_authentication=True)
    if public_key:
        linux.ssh = m.SshConfiguration(public_keys=[m.SshPublicKey(
            path=f"/home/{admin_username}/.ssh/authorized_keys", key_data=public_key)])
    vm = m.VirtualMachine(
        location=location,
        tags=dict(tags),
        hardware_profile=m.HardwareProfile(vm_size=it.provider_type or it.name),
        storage_profile=m.StorageProfile(
            image_reference=m.ImageReference(id=image_id),
            os_disk=m.OSDisk(create_option="FromImage", delete_option="Delete",
                             managed_disk=m.ManagedDiskParameters(
                                 storage_account_type="Standard_LRS"))),
        os_profile=m.OSProfile(
            computer_name=name, admin_username=admin_username,
            custom_data=base64.b64encode(f"#!/bin/sh\n{init_command}\n".encode()).decode(),
            linux_configuration=linux),
        network_profile=m.NetworkProfile(network_interfaces=[
            m.NetworkInterfaceReference(id=nic_id, primary=True, delete_option="Delete")]),
    )
    if it.preemptible:
        vm.priority = "Spot"
        vm.eviction_policy = "Delete"
        vm.billing_profile = m.BillingProfile(max_price=it.price)
    return vm


class AzureInstance(Instance):
    def __init__(self, iset: AzureInstanceSet, vm: Any, address: str) -> None:
        self._set = iset
        self.vm = vm
        self._address = address
        self._tags = dict(vm.tags or {})

    @property
    def id(self) -> str:
        return str(self.vm.name)

    @property
    def provider_type(self) -> str:
        return str(self.vm.hardware_profile.vm_size)

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
        from azure.mgmt.compute.models import VirtualMachineUpdate

        await self._set.call(self._set.compute.virtual_machines.begin_update,
                             self._set.resource_group, self.id,
                             VirtualMachineUpdate(tags=dict(tags)), poll=True)
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
        vm = await self.call(self.compute.virtual_machines.begin_create_or_update,
                             self.resource_group, name,
                             vm_parameters(name=name, location=self.location, it=it,
                                           image_id=image_id, nic_id=nic.id,
                                           admin_username=self.admin_username,
                                           public_key=public_key, init_command=init_command,
                                           tags=all_tags), poll=True)
        ip = nic.ip_configurations[0].private_ip_address if nic.ip_configurations else ""
        return AzureInstance(self, vm, ip or "")

    async def instances(self, tags: Mapping[str, str]) -> list[Instance]:
        vms = await self.call(lambda: list(self.compute.virtual_machines.list(
            self.resource_group)))
        nics = await self.call(lambda: list(self.network.network_interfaces.list(
            self.resource_group)))
        ip_of = {n.name: (n.ip_configurations[0].private_ip_address
                          if n.ip_configurations else "") for n in nics}
        out: list[Instance] = []
        for vm in vms:
            if not str(vm.name).startswith(self.prefix):
                continue
            vtags = vm.tags or {}
            if all(vtags.get(k) == v for k, v in tags.items()):
                out.append(AzureInstance(self, vm, ip_of.get(f"{vm.name}-nic") or ""))
        return out

    def instance_quota_group(self, it: InstanceType) -> str:
        return (it.provider_type or it.name) + ("-spot" if it.preemptible else "")


def new_instance_set(cfg: ClusterConfig, instance_set_id: str, **_: Any) -> AzureInstanceSet:
    return AzureInstanceSet(cfg, instance_set_id)
