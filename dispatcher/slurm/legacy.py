"""The legacy standalone ``crunch-dispatch-slurm.yml`` (reference ``dispatch.md`` 3.15).

Before the cluster-wide ``config.yml`` existed, crunch-dispatch-slurm read its own file. The
original still accepts one (``-legacy-crunch-dispatch-slurm-config FILE``, default
``/etc/arvados/crunch-dispatch-slurm/crunch-dispatch-slurm.yml``, loaded only when it exists)
and lays its keys over the cluster config:

=============================  =====================================================
legacy key                     cluster config key
=============================  =====================================================
``Client.APIHost``             ``Services.Controller.ExternalURL`` (``https://HOST/``)
``Client.AuthToken``           ``SystemRootToken``
``Client.Insecure``            ``TLS.Insecure`` (the original's loader copies it too)
``Client.KeepServiceURIs``     ``Containers.SLURM.SbatchEnvironmentVariables.ARVADOS_KEEP_SERVICES``
                               (space-joined)
``SbatchArguments``            ``Containers.SLURM.SbatchArgumentsList``
``PollPeriod``                 ``Containers.CloudVMs.PollInterval``
``PrioritySpread``             ``Containers.SLURM.PrioritySpread``
``CrunchRunCommand``           first element ``Containers.CrunchRunCommand``, the rest
                               ``Containers.CrunchRunArgumentsList``
``ReserveExtraRAM``            ``Containers.ReserveExtraRAM`` (bytes)
``MinRetryPeriod``             ``Containers.MinRetryPeriod``
``BatchSize``                  ``API.MaxItemsPerResponse``
=============================  =====================================================

Pure apart from reading the file: :func:`apply_legacy_config` takes the parsed document.
Unknown keys are ignored with a warning, as the original ignores them; a key with a value of
the wrong type is an error naming the file and the key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import yaml

from dispatcher.config import ClusterConfig, ConfigError, parse_bytesize, parse_duration
from dispatcher.logs import register_secret

#: Where the original looks when the option is not given (loaded only if it exists).
DEFAULT_LEGACY_PATH = "/etc/arvados/crunch-dispatch-slurm/crunch-dispatch-slurm.yml"

_TOP_KEYS = frozenset({
    "Client", "SbatchArguments", "PollPeriod", "PrioritySpread", "CrunchRunCommand",
    "ReserveExtraRAM", "MinRetryPeriod", "BatchSize",
})
_CLIENT_KEYS = frozenset({"APIHost", "AuthToken", "Insecure", "KeepServiceURIs"})


def _str_list(value: Any, path: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{path}: must be a list of strings")
    return list(value)


def _int(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{path}: must be an integer")
    return value


def apply_legacy_config(cfg: ClusterConfig, doc: Any, source: str) -> list[str]:
    """Lay the legacy keys of ``doc`` (the parsed file) over ``cfg``, in place.

    Returns warnings (ignored keys). Raises :class:`ConfigError` naming ``source`` and the key.
    """
    if doc is None:
        return []
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{source}: a legacy crunch-dispatch-slurm config is a mapping of keys")
    warnings = [f"{source}: ignoring unknown legacy key {k!r}"
                for k in doc if k not in _TOP_KEYS]
    c = cfg.containers
    client = doc.get("Client")
    if client is not None:
        if not isinstance(client, Mapping):
            raise ConfigError(f"{source}: Client: must be a mapping")
        warnings += [f"{source}: ignoring unknown legacy key 'Client.{k}'"
                     for k in client if k not in _CLIENT_KEYS]
        host = client.get("APIHost")
        if host:
            if not isinstance(host, str) or "/" in host or host.strip() != host:
                raise ConfigError(f"{source}: Client.APIHost: must be a host[:port], "
                                  "e.g. zzzzz.example.org")
            cfg.services.controller.external_url = f"https://{host}/"
        token = client.get("AuthToken")
        if token:
            if not isinstance(token, str):
                raise ConfigError(f"{source}: Client.AuthToken: must be a string")
            register_secret(token)
            cfg.system_root_token = token
        if "Insecure" in client:
            if not isinstance(client["Insecure"], bool):
                raise ConfigError(f"{source}: Client.Insecure: must be true or false")
            cfg.tls.insecure = client["Insecure"]
        uris = client.get("KeepServiceURIs")
        if uris:
            keep = " ".join(_str_list(uris, f"{source}: Client.KeepServiceURIs"))
            c.slurm.sbatch_environment_variables = {
                **c.slurm.sbatch_environment_variables, "ARVADOS_KEEP_SERVICES": keep}
    if doc.get("SbatchArguments") is not None:
        c.slurm.sbatch_arguments_list = _str_list(doc["SbatchArguments"],
                                                  f"{source}: SbatchArguments")
    if doc.get("PollPeriod") is not None:
        c.cloud_vms.poll_interval_s = parse_duration(doc["PollPeriod"], f"{source}: PollPeriod")
    if doc.get("PrioritySpread") is not None:
        c.slurm.priority_spread = _int(doc["PrioritySpread"], f"{source}: PrioritySpread")
    if doc.get("CrunchRunCommand") is not None:
        argv = _str_list(doc["CrunchRunCommand"], f"{source}: CrunchRunCommand")
        if argv:
            c.crunch_run_command = argv[0]
        if len(argv) >= 2:
            c.crunch_run_arguments_list = argv[1:]
    if doc.get("ReserveExtraRAM") is not None:
        c.reserve_extra_ram = parse_bytesize(doc["ReserveExtraRAM"],
                                             f"{source}: ReserveExtraRAM")
    if doc.get("MinRetryPeriod") is not None:
        c.min_retry_period_s = parse_duration(doc["MinRetryPeriod"],
                                              f"{source}: MinRetryPeriod")
    if doc.get("BatchSize") is not None:
        size = _int(doc["BatchSize"], f"{source}: BatchSize")
        if size < 1:
            raise ConfigError(f"{source}: BatchSize: must be at least 1")
        cfg.api.max_items_per_response = size
    return warnings


def load_legacy_config(cfg: ClusterConfig, path: str, *, explicit: bool) -> list[str] | None:
    """Read ``path`` and apply it to ``cfg``. A missing file is an error only when the path was
    given on the command line (``explicit``); then ``None`` means "no file, nothing done"."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{path}: legacy crunch-dispatch-slurm config file not found") \
                from None
        return None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read legacy config file: {exc.strerror}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: YAML syntax error: {exc}") from None
    return apply_legacy_config(cfg, doc, path)


def is_cluster_config(path: str) -> bool:
    """False when ``path`` is a readable YAML mapping without a ``Clusters`` key: the original
    then reads ``-config FILE`` as the legacy file (``MungeLegacyConfigArgs``)."""
    if not os.path.isfile(path):
        return True
    try:
        with open(path, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError):
        return True  # let the real loader report the problem
    return not isinstance(doc, Mapping) or "Clusters" in doc
