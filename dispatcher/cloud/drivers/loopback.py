"""The ``loopback`` driver: this host, over real SSH, as a one-instance cloud (reference 5.11).

For development and the integration tests. At most one instance exists (a second create is a
``QuotaError`` "loopback driver is always at quota"); its ID is the provider type; its address
is ``DriverParameters.Host`` (default 127.0.0.1) on ``DriverParameters.Port`` (default
``CloudVMs.SSHPort``), logged into as ``DriverParameters.User`` (default: the dispatcher's
user). Commands run through the host's own sshd, so the SSH executor, crunch-run ``--detach``,
``--list`` and ``--kill`` are exercised for real.

The "instance" (its ID and tags) is kept in ``DriverParameters.StateFile`` (default
``$TMPDIR/crunchgate-loopback-<InstanceSetID>.json``), so a restarted dispatcher finds it again
like a cloud listing would. Host keys are verified against ``DriverParameters.HostKeyFile`` (the
sshd's public host key) when set; otherwise any key of this host is accepted.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from typing import Any

from dispatcher.cloud.drivers.base import Instance, InstanceSet
from dispatcher.cloud.errors import ConfigurationError, HostKeyError, QuotaError
from dispatcher.config import ClusterConfig, InstanceType

log = logging.getLogger("crunchgate.cloud.loopback")

KNOWN_PARAMS = {"Host", "Port", "User", "HostKeyFile", "StateFile"}


class LoopbackInstance(Instance):
    def __init__(self, iset: LoopbackInstanceSet, iid: str, provider_type: str,
                 tags: dict[str, str]) -> None:
        self._set = iset
        self._id = iid
        self._provider_type = provider_type
        self._tags = dict(tags)

    @property
    def id(self) -> str:
        return self._id

    @property
    def provider_type(self) -> str:
        return self._provider_type

    @property
    def address(self) -> str:
        return f"{self._set.host}:{self._set.port}"

    @property
    def remote_user(self) -> str:
        return self._set.user

    @property
    def tags(self) -> dict[str, str]:
        return self._tags

    async def set_tags(self, tags: Mapping[str, str]) -> None:
        state = self._set.load()
        if self._id in state:
            state[self._id]["tags"] = dict(tags)
            self._set.save(state)
        self._tags = dict(tags)

    async def destroy(self) -> None:
        state = self._set.load()
        state.pop(self._id, None)
        self._set.save(state)

    async def verify_host_key(self, key: Any) -> None:
        if not self._set.host_key_file:
            return  # this host: nothing else can answer on the loopback address
        import asyncssh

        try:
            want = asyncssh.read_public_key(self._set.host_key_file)
        except (OSError, asyncssh.KeyImportError) as exc:
            raise HostKeyError(f"cannot read DriverParameters.HostKeyFile: {exc}") from None
        if key is None or key.public_data != want.public_data:
            raise HostKeyError("host key does not match DriverParameters.HostKeyFile")


class LoopbackInstanceSet(InstanceSet):
    """See the module docstring."""

    def __init__(self, cfg: ClusterConfig, instance_set_id: str,
                 params: Mapping[str, Any] | None = None) -> None:
        p = dict(params if params is not None else cfg.containers.cloud_vms.driver_parameters)
        unknown = set(p) - KNOWN_PARAMS
        if unknown:
            raise ConfigurationError(
                f"Containers.CloudVMs.DriverParameters: unknown key(s) {sorted(unknown)} for the "
                f"loopback driver (known: {sorted(KNOWN_PARAMS)})")
        self.host = str(p.get("Host") or "127.0.0.1")
        self.port = str(p.get("Port") or cfg.containers.cloud_vms.ssh_port or "22")
        self.user = str(p.get("User") or getpass.getuser())
        self.host_key_file = str(p.get("HostKeyFile") or "")
        self.state_file = str(p.get("StateFile") or os.path.join(
            tempfile.gettempdir(), f"crunchgate-loopback-{instance_set_id}.json"))

    def load(self) -> dict[str, dict[str, Any]]:
        try:
            with open(self.state_file) as fh:
                data = json.load(fh)
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable loopback state file %s: %s", self.state_file, exc)
            return {}

    def save(self, state: dict[str, dict[str, Any]]) -> None:
        tmp = self.state_file + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(state, fh)
        os.replace(tmp, self.state_file)

    async def create(self, it: InstanceType, image_id: str, tags: Mapping[str, str],
                     init_command: str, public_key: str | None) -> Instance:
        state = self.load()
        if state:
            raise QuotaError("loopback driver is always at quota")
        iid = it.provider_type or it.name
        state[iid] = {"provider_type": iid, "tags": dict(tags)}
        self.save(state)
        return LoopbackInstance(self, iid, iid, dict(tags))

    async def instances(self, tags: Mapping[str, str]) -> list[Instance]:
        out: list[Instance] = []
        for iid, rec in self.load().items():
            itags = rec.get("tags") or {}
            if all(itags.get(k) == v for k, v in tags.items()):
                out.append(LoopbackInstance(self, iid, rec.get("provider_type", iid), itags))
        return out

    def instance_quota_group(self, it: InstanceType) -> str:
        return ""


def localhost_type() -> InstanceType:
    """The ``localhost`` instance type synthesized when no InstanceTypes are configured."""
    vcpus = os.cpu_count() or 1
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        ram = 1 << 30
    st = os.statvfs(tempfile.gettempdir())
    return InstanceType(name="localhost", provider_type="localhost", vcpus=vcpus, ram=ram,
                        included_scratch=st.f_bavail * st.f_frsize, price=1.0)


def new_instance_set(cfg: ClusterConfig, instance_set_id: str, **_: Any) -> LoopbackInstanceSet:
    if len(cfg.instance_types) > 1:
        raise ConfigurationError(
            "the loopback driver supports at most one instance type in InstanceTypes "
            f"(found {len(cfg.instance_types)})")
    return LoopbackInstanceSet(cfg, instance_set_id)
