"""The ``ec2`` driver: boto3 (run in worker threads, its own retries off), reference 5.11.

* Create = ``RunInstances`` with the reference's parameters: one network interface without a
  public IP (security groups, subnet), IMDSv2-only metadata, shutdown behavior terminate, all
  tags on the instance, ``UserData`` = ``#!/bin/sh\\n<init command>\\n`` (base64 on the wire), a key pair
  found by fingerprint or imported, an EBS volume ``/dev/xvdt`` for ``AddedScratch``, spot
  market options for preemptible types (max price = the type's Price), an instance profile.
  Subnets (``SubnetID`` string or list) are tried in turn on subnet-specific errors, starting
  from the last one that worked.
* List = ``DescribeInstances`` filtered by ``tag:<key>`` (paginated), without
  shutting-down/terminated instances; price history from ``DescribeSpotPriceHistory`` for spot
  instances (refreshed every ``SpotPriceUpdateInterval``).
* Tags = ``CreateTags`` (+ ``DeleteTags`` for removed keys); Destroy = ``TerminateInstances``.
* Errors are classified at this boundary (:func:`classify_error`): throttling ->
  ``RateLimitError`` (back-off 1 s, x1.5 + 1 s per consecutive throttle, at most 60 s); quota
  codes -> ``QuotaError``; ``VcpuLimitExceeded`` -> quota-group ``CapacityError``;
  ``InsufficientInstanceCapacity`` (or ``Unsupported`` for the instance type) -> type-specific
  ``CapacityError``.

``DriverParameters.EndpointURL`` (a crunchgate addition) points the SDK at another endpoint,
e.g. moto's server in the tests or a private EC2 endpoint.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import math
import re
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from dispatcher.cloud.drivers.base import Instance, InstanceSet, PricePoint, normalize_price_history
from dispatcher.cloud.errors import (
    CapacityError,
    ConfigurationError,
    DriverError,
    QuotaError,
    RateLimitError,
)
from dispatcher.config import ClusterConfig, InstanceType, parse_duration

log = logging.getLogger("crunchgate.cloud.ec2")

GiB = 1 << 30

THROTTLE_CODES = {"RequestLimitExceeded", "Throttling", "ThrottlingException",
                  "TooManyRequestsException", "SlowDown", "RequestThrottled",
                  "RequestThrottledException", "EC2ThrottledException", "PriorRequestNotComplete",
                  "ProvisionedThroughputExceededException", "BandwidthLimitExceeded",
                  "LimitExceededException", "TransactionInProgressException"}
QUOTA_CODES = {"InstanceLimitExceeded", "InsufficientAddressCapacity",
               "InsufficientFreeAddressesInSubnet", "InsufficientVolumeCapacity",
               "MaxSpotInstanceCountExceeded"}
DEFAULT_QUOTA_GROUPS = {**{c: "standard" for c in "acdhimrtz"}, "vt": "g", "p5": "p5"}
KNOWN_PARAMS = {"AccessKeyID", "SecretAccessKey", "Region", "SecurityGroupIDs", "SubnetID",
                "EBSVolumeType", "IAMInstanceProfile", "SpotPriceUpdateInterval", "EBSPrice",
                "InstanceTypeQuotaGroups", "AdminUsername", "EndpointURL"}


# --- pure helpers (unit-tested) ---------------------------------------------------------------


def quota_group(provider_type: str, preemptible: bool,
                groups: Mapping[str, str] | None = None) -> str:
    """Reference 5.11: the instance type's quota group (``m5.large`` -> ``standard``)."""
    table = {**DEFAULT_QUOTA_GROUPS, **{k.lower(): v for k, v in (groups or {}).items()}}
    t = provider_type.lower()
    m = re.match(r"^[a-z]+", t)
    family = m.group(0) if m and len(m.group(0)) < len(t) else ""
    group = family
    found = table.get(family, "") if family else ""
    if found:
        group = found
    # Longer prefixes (p5 in p5.xlarge) may name their own group; the longest wins.
    for n in range(len(family) + 1, len(t)):
        if t[:n] in table:
            group = table[t[:n]]
    if not group:
        return ""
    return group + ("-spot" if preemptible else "")


def is_subnet_specific(code: str, message: str) -> bool:
    """Would another subnet possibly work? (reference 5.11 subnet failover)."""
    if "Subnet" in code:
        return True
    if code in ("InsufficientInstanceCapacity", "InsufficientVolumeCapacity", "Unsupported"):
        return True
    if re.match(r"^(Client\.?)?InvalidParameter", code):
        return " subnet " in message or "sufficient free Ipv4 addresses" in message \
            or "sufficient free Ipv6 addresses" in message
    return False


class ThrottleBackoff:
    """Consecutive throttling errors back off 1 s, then x1.5 + 1 s each time, capped at 60 s."""

    def __init__(self) -> None:
        self.delay = 0.0

    def next(self) -> float:
        self.delay = 1.0 if self.delay == 0 else min(60.0, self.delay * 1.5 + 1.0)
        return self.delay

    def reset(self) -> None:
        self.delay = 0.0


def classify_error(code: str, message: str, backoff: ThrottleBackoff,
                   now: float | None = None) -> Exception:
    """Translate an EC2 error code into the cloud error classes."""
    now = time.time() if now is None else now
    text = f"{code}: {message}"
    err: Exception
    if code in THROTTLE_CODES:
        err = RateLimitError(text, now + backoff.next())
    else:
        backoff.reset()
        if code in QUOTA_CODES:
            err = QuotaError(text)
        elif code == "VcpuLimitExceeded":
            err = CapacityError(text, quota_group_specific=True)
        elif code == "InsufficientInstanceCapacity" or (
                code == "Unsupported" and "requested instance type" in message):
            err = CapacityError(text, instance_type_specific=True)
        else:
            err = DriverError(text)
    # Kept for subnet failover decisions.
    err.aws_code = code  # type: ignore[attr-defined]
    err.aws_message = message  # type: ignore[attr-defined]
    return err


def key_fingerprints(public_key_openssh: str) -> list[str]:
    """The fingerprints AWS may report for our key (reference 5.11): RSA -> MD5 and SHA1 of
    the DER public key, colon-separated hex; ed25519 -> base64 SHA256 with and without ``=``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = serialization.load_ssh_public_key(public_key_openssh.encode())
    if isinstance(key, rsa.RSAPublicKey):
        der = key.public_bytes(serialization.Encoding.DER,
                               serialization.PublicFormat.SubjectPublicKeyInfo)
        return [":".join(f"{b:02x}" for b in hashlib.md5(der).digest()),  # noqa: S324
                ":".join(f"{b:02x}" for b in hashlib.sha1(der).digest())]  # noqa: S324
    blob = base64.b64decode(public_key_openssh.split()[1])
    fp = base64.b64encode(hashlib.sha256(blob).digest()).decode()
    return [fp, fp.rstrip("=")]


def user_data(init_command: str) -> str:
    """The first-boot script. (botocore base64-encodes ``UserData`` of RunInstances itself.)"""
    return f"#!/bin/sh\n{init_command}\n"


def _as_list(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [str(k) for k in value]
    return [str(v) for v in value]


# --- the driver ---------------------------------------------------------------------------------


class EC2Instance(Instance):
    def __init__(self, iset: EC2InstanceSet, desc: Mapping[str, Any]) -> None:
        self._set = iset
        self.desc = dict(desc)
        self._tags = {t["Key"]: t["Value"] for t in desc.get("Tags") or []}

    @property
    def id(self) -> str:
        return str(self.desc["InstanceId"])

    @property
    def provider_type(self) -> str:
        return str(self.desc.get("InstanceType", ""))

    @property
    def address(self) -> str:
        return str(self.desc.get("PrivateIpAddress") or "")

    @property
    def remote_user(self) -> str:
        return self._set.admin_username

    @property
    def tags(self) -> dict[str, str]:
        return self._tags

    @property
    def is_spot(self) -> bool:
        return self.desc.get("InstanceLifecycle") == "spot"

    async def set_tags(self, tags: Mapping[str, str]) -> None:
        removed = [k for k in self._tags if k not in tags]
        await self._set.call("create_tags", Resources=[self.id],
                             Tags=[{"Key": k, "Value": v} for k, v in tags.items()])
        if removed:
            await self._set.call("delete_tags", Resources=[self.id],
                                 Tags=[{"Key": k} for k in removed])
        self._tags = dict(tags)

    async def destroy(self) -> None:
        await self._set.call("terminate_instances", InstanceIds=[self.id])

    def price_history(self, it: InstanceType) -> list[PricePoint]:
        points: list[PricePoint] = []
        if self.is_spot:
            az = (self.desc.get("Placement") or {}).get("AvailabilityZone", "")
            points = list(self._set.spot_prices.get((self.provider_type, az), []))
        if it.added_scratch > 0 and points:
            ebs = self._set.ebs_price * math.ceil(it.added_scratch / GiB) / 30 / 24
            points = [PricePoint(p.start_time, p.price + ebs) for p in points]
        return points


class EC2InstanceSet(InstanceSet):
    """See the module docstring."""

    def __init__(self, cfg: ClusterConfig, instance_set_id: str, *,
                 params: Mapping[str, Any] | None = None, metrics: Any = None,
                 client: Any = None) -> None:
        p = dict(params if params is not None else cfg.containers.cloud_vms.driver_parameters)
        unknown = set(p) - KNOWN_PARAMS
        if unknown:
            raise ConfigurationError(
                f"Containers.CloudVMs.DriverParameters: unknown key(s) {sorted(unknown)} for the "
                f"ec2 driver (known: {sorted(KNOWN_PARAMS)})")
        self.cfg = cfg
        self.set_id = instance_set_id
        self.params = p
        self.region = str(p.get("Region") or "")
        self.security_groups = _as_list(p.get("SecurityGroupIDs"))
        self.subnets = _as_list(p.get("SubnetID"))
        self.ebs_volume_type = str(p.get("EBSVolumeType") or "gp2")
        self.iam_profile = str(p.get("IAMInstanceProfile") or "")
        self.admin_username = str(p.get("AdminUsername") or "crunch")
        self.ebs_price = float(p.get("EBSPrice", 0.10) or 0.0)
        self.quota_groups = {str(k): str(v) for k, v in
                             (p.get("InstanceTypeQuotaGroups") or {}).items()}
        spi = p.get("SpotPriceUpdateInterval", "24h")
        self.spot_price_interval = parse_duration(
            spi, "Containers.CloudVMs.DriverParameters.SpotPriceUpdateInterval")
        self.backoff = ThrottleBackoff()
        self.subnet_index = 0
        self.spot_prices: dict[tuple[str, str], list[PricePoint]] = {}
        self._spot_updated = 0.0
        self._keypair: str | None = None
        self._keypair_lock = asyncio.Lock()
        self._client = client
        self.metrics = metrics
        if metrics is not None:
            gauge, counter = metrics.ec2_metrics()
            self.m_instances, self.m_starts = gauge, counter
            for sn in self.subnets or [""]:
                for ok in ("0", "1"):
                    counter.labels(subnet_id=sn, success=ok)
        else:
            self.m_instances = self.m_starts = None

    # --- SDK plumbing ------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            kwargs: dict[str, Any] = {
                "region_name": self.region or None,
                "config": Config(retries={"total_max_attempts": 1, "mode": "standard"},
                                 connect_timeout=10, read_timeout=60),
            }
            if self.params.get("AccessKeyID"):
                kwargs["aws_access_key_id"] = str(self.params["AccessKeyID"])
                kwargs["aws_secret_access_key"] = str(self.params.get("SecretAccessKey", ""))
                from dispatcher.logs import register_secret

                register_secret(kwargs["aws_secret_access_key"])
            if self.params.get("EndpointURL"):
                kwargs["endpoint_url"] = str(self.params["EndpointURL"])
            self._client = boto3.client("ec2", **kwargs)
        return self._client

    async def call(self, method: str, **kwargs: Any) -> Any:
        """One SDK call in a worker thread, with its errors classified."""
        from botocore.exceptions import BotoCoreError, ClientError

        fn = getattr(self.client, method)
        try:
            result = await asyncio.to_thread(fn, **kwargs)
        except ClientError as exc:
            err = exc.response.get("Error", {})
            raise classify_error(str(err.get("Code", "")), str(err.get("Message", "")),
                                 self.backoff) from None
        except BotoCoreError as exc:
            raise DriverError(f"{method}: {exc}") from None
        self.backoff.reset()
        return result

    # --- InstanceSet -------------------------------------------------------------------------

    def instance_quota_group(self, it: InstanceType) -> str:
        return quota_group(it.provider_type or it.name, it.preemptible, self.quota_groups)

    async def _key_pair(self, public_key: str) -> str:
        # Concurrent creates must not both import the key (InvalidKeyPair.Duplicate).
        async with self._keypair_lock:
            return await self._find_or_import_key_pair(public_key)

    async def _find_or_import_key_pair(self, public_key: str) -> str:
        if self._keypair is not None:
            return self._keypair
        fps = key_fingerprints(public_key)
        found = await self.call("describe_key_pairs",
                                Filters=[{"Name": "fingerprint", "Values": fps}])
        pairs = found.get("KeyPairs") or []
        if pairs:
            self._keypair = str(pairs[0]["KeyName"])
        else:
            name = "arvados-dispatch-keypair-" + fps[0]
            try:
                await self.call("import_key_pair", KeyName=name,
                                PublicKeyMaterial=public_key.encode())
            except DriverError as exc:
                # The name is derived from this key's fingerprint: a key pair of that name is
                # this key, imported earlier, whose fingerprint the endpoint reports in a form
                # we did not look for. Failing here would fail every create, forever.
                if getattr(exc, "aws_code", "") != "InvalidKeyPair.Duplicate":
                    raise
                log.info("key pair %s already exists; using it", name)
            self._keypair = name
        return self._keypair

    def run_instances_params(self, it: InstanceType, image_id: str, tags: Mapping[str, str],
                             init_command: str, key_name: str | None,
                             subnet: str | None) -> dict[str, Any]:
        """The ``RunInstances`` request (pure; unit-tested)."""
        nic: dict[str, Any] = {"AssociatePublicIpAddress": False, "DeleteOnTermination": True,
                               "DeviceIndex": 0, "Groups": list(self.security_groups)}
        if subnet:
            nic["SubnetId"] = subnet
        req: dict[str, Any] = {
            "ImageId": image_id,
            "InstanceType": it.provider_type or it.name,
            "MinCount": 1,
            "MaxCount": 1,
            "NetworkInterfaces": [nic],
            "DisableApiTermination": False,
            "InstanceInitiatedShutdownBehavior": "terminate",
            "TagSpecifications": [{"ResourceType": "instance",
                                   "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}],
            "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
            "UserData": user_data(init_command),
        }
        if key_name:
            req["KeyName"] = key_name
        if it.added_scratch > 0:
            req["BlockDeviceMappings"] = [{
                "DeviceName": "/dev/xvdt",
                "Ebs": {"DeleteOnTermination": True,
                        "VolumeSize": math.ceil(it.added_scratch / GiB),
                        "VolumeType": self.ebs_volume_type},
            }]
        if it.preemptible:
            req["InstanceMarketOptions"] = {
                "MarketType": "spot",
                "SpotOptions": {"InstanceInterruptionBehavior": "terminate",
                                "SpotInstanceType": "one-time",
                                "MaxPrice": f"{it.price:f}"},
            }
        if self.iam_profile:
            req["IamInstanceProfile"] = {"Name": self.iam_profile}
        return req

    async def create(self, it: InstanceType, image_id: str, tags: Mapping[str, str],
                     init_command: str, public_key: str | None) -> Instance:
        key_name = await self._key_pair(public_key) if public_key else None
        subnets: list[str | None] = list(self.subnets) or [None]
        last_err: Exception | None = None
        capacity_err: Exception | None = None
        first = self.subnet_index % len(subnets)
        for attempt in range(len(subnets)):
            idx = (first + attempt) % len(subnets)
            subnet = subnets[idx]
            req = self.run_instances_params(it, image_id, tags, init_command, key_name, subnet)
            try:
                out = await self.call("run_instances", **req)
            except (QuotaError, CapacityError, DriverError) as exc:
                self._count_start(subnet, False)
                last_err = exc
                if isinstance(exc, CapacityError):
                    capacity_err = exc
                code = getattr(exc, "aws_code", "")
                message = getattr(exc, "aws_message", "")
                if isinstance(exc, RateLimitError) or not is_subnet_specific(code, message):
                    raise
                self.subnet_index = (idx + 1) % len(subnets)
                continue
            self._count_start(subnet, True)
            self.subnet_index = idx
            return EC2Instance(self, out["Instances"][0])
        assert last_err is not None
        raise capacity_err or last_err

    def _count_start(self, subnet: str | None, ok: bool) -> None:
        if self.m_starts is not None:
            self.m_starts.labels(subnet_id=subnet or "", success="1" if ok else "0").inc()

    async def instances(self, tags: Mapping[str, str]) -> list[Instance]:
        filters = [{"Name": f"tag:{k}", "Values": [v]} for k, v in tags.items()]
        out: list[Instance] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Filters": filters}
            if token:
                kwargs["NextToken"] = token
            page = await self.call("describe_instances", **kwargs)
            for res in page.get("Reservations") or []:
                for desc in res.get("Instances") or []:
                    if (desc.get("State") or {}).get("Name") in ("shutting-down", "terminated"):
                        continue
                    out.append(EC2Instance(self, desc))
            token = page.get("NextToken")
            if not token:
                break
        if self.m_instances is not None:
            counts: dict[str, int] = {}
            for inst in out:
                sn = str(inst.desc.get("SubnetId") or "")  # type: ignore[attr-defined]
                counts[sn] = counts.get(sn, 0) + 1
            for sn, n in counts.items():
                self.m_instances.labels(subnet_id=sn).set(n)
        if self.spot_price_interval > 0 and any(
                i.is_spot for i in out):  # type: ignore[attr-defined]
            await self._update_spot_prices(out)
        return out

    async def _update_spot_prices(self, insts: list[Instance]) -> None:
        now = time.time()
        if now - self._spot_updated < self.spot_price_interval:
            return
        types = sorted({i.provider_type for i in insts if i.is_spot})  # type: ignore[attr-defined]
        try:
            page = await self.call(
                "describe_spot_price_history", InstanceTypes=types,
                ProductDescriptions=["Linux/UNIX"],
                StartTime=datetime.fromtimestamp(now - 3 * self.spot_price_interval))
        except DriverError as exc:
            log.warning("error getting spot prices: %s", exc)
            return
        prices: dict[tuple[str, str], list[PricePoint]] = {}
        for rec in page.get("SpotPriceHistory") or []:
            ts = rec.get("Timestamp")
            start = ts.timestamp() if hasattr(ts, "timestamp") else now
            key = (str(rec.get("InstanceType")), str(rec.get("AvailabilityZone")))
            prices.setdefault(key, []).append(PricePoint(start, float(rec.get("SpotPrice", 0))))
        self.spot_prices = {k: normalize_price_history(v) for k, v in prices.items()}
        self._spot_updated = now


def new_instance_set(cfg: ClusterConfig, instance_set_id: str, *, registry: Any = None,
                     **_: Any) -> EC2InstanceSet:
    return EC2InstanceSet(cfg, instance_set_id, metrics=registry)
