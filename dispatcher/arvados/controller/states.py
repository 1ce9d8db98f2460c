"""Container and container-request rules, as explicit tables and pure functions.

Reference: ``dispatch.md`` 1.2 (states and side effects), 1.3 (lock/unlock), 1.4 (update
whitelist), 1.5 (priority), 1.6 (runtime_constraints defaults), 6.1 (MaxDispatchAttempts).
Nothing here touches the database: :func:`plan_container_update` takes the current record, the
requested changes and who asks, and returns the new field values plus the side effects the store
must carry out (create/expire the runtime token, finalize or retry requests).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .errors import Forbidden, Unprocessable

QUEUED, LOCKED, RUNNING, COMPLETE, CANCELLED = "Queued", "Locked", "Running", "Complete", "Cancelled"
CONTAINER_STATES = (QUEUED, LOCKED, RUNNING, COMPLETE, CANCELLED)
FINAL_STATES = frozenset({COMPLETE, CANCELLED})

# Allowed container state transitions (1.2). Anything unlisted is a 422.
TRANSITIONS: dict[str, frozenset[str]] = {
    QUEUED: frozenset({LOCKED, CANCELLED}),
    LOCKED: frozenset({QUEUED, RUNNING, CANCELLED}),
    RUNNING: frozenset({COMPLETE, CANCELLED}),
    COMPLETE: frozenset({CANCELLED}),  # admin-only "un-reuse"
    CANCELLED: frozenset(),
}

PROGRESS_FIELDS = frozenset(
    {"progress", "runtime_status", "subrequests_cost", "cost", "log", "output",
     "output_properties", "exit_code"}
)

# Update whitelist (1.4): extra fields permitted besides ``state``, by (old state, new state).
# ``started_at`` and ``interactive_session_started`` have extra conditions, checked in code.
_RUNNING_FIELDS = frozenset(
    {"priority", "output_properties", "gateway_address", "interactive_session_started"}
) | PROGRESS_FIELDS
_FINISHING_FIELDS = frozenset({"finished_at"}) | PROGRESS_FIELDS
WHITELIST: dict[tuple[str, str], frozenset[str]] = {
    (QUEUED, QUEUED): frozenset({"priority"}),
    (LOCKED, QUEUED): frozenset({"priority"}),
    (QUEUED, LOCKED): frozenset({"priority", "runtime_status", "log", "lock_count"}),
    (LOCKED, LOCKED): frozenset({"priority", "runtime_status", "log", "lock_count"}),
    (LOCKED, RUNNING): _RUNNING_FIELDS | {"started_at"},
    (RUNNING, RUNNING): _RUNNING_FIELDS,
    (RUNNING, COMPLETE): _FINISHING_FIELDS,
    (RUNNING, CANCELLED): _FINISHING_FIELDS,
    (QUEUED, CANCELLED): frozenset({"finished_at", "log", "runtime_status", "cost"}),
    (LOCKED, CANCELLED): frozenset({"finished_at", "log", "runtime_status", "cost"}),
    (COMPLETE, CANCELLED): frozenset(),
    (COMPLETE, COMPLETE): frozenset(),
    (CANCELLED, CANCELLED): frozenset(),
}

# Well-known runtime_status keys whose values must be strings (1.4).
RUNTIME_STATUS_STRING_KEYS = (
    "error", "errorDetail", "warning", "warningDetail", "activity", "preemptionNotice",
)

# Container fields an admin may set at create time (everything else is server-managed).
CREATE_FIELDS = frozenset(
    {"command", "cwd", "environment", "container_image", "mounts", "output_path",
     "output_glob", "runtime_constraints", "scheduling_parameters", "priority",
     "runtime_user_uuid", "runtime_auth_scopes", "output_storage_classes", "service",
     "published_ports", "owner_uuid", "state", "secret_mounts", "output_properties"}
)


def max_dispatch_attempts_error(lock_count: int) -> str:
    """The exact runtime_status error Arvados sets when MaxDispatchAttempts is exceeded."""
    return (
        "Failed to start container.  Cancelled after exceeding "
        f"'Containers.MaxDispatchAttempts' (lock_count={lock_count})"
    )


@dataclass(frozen=True)
class Caller:
    """Who is asking: the token's UUID, its user, and what it may do."""

    token_uuid: str
    user_uuid: str
    is_admin: bool
    # Set when the token is a container's runtime token (auth_uuid of that container).
    container_uuid: str | None = None


@dataclass
class ContainerChange:
    """The outcome of :func:`plan_container_update`: new values plus side effects to perform."""

    values: dict[str, Any]
    old_state: str
    new_state: str
    create_runtime_token: bool = False
    expire_runtime_token: bool = False
    # True when the caller asked for Queued and MaxDispatchAttempts turned it into Cancelled.
    dispatch_attempts_exceeded: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def became_final(self) -> bool:
        return self.old_state not in FINAL_STATES and self.new_state in FINAL_STATES


def check_transition(old: str, new: str) -> None:
    """Raise 422 "cannot change from X to Y" unless the transition is in :data:`TRANSITIONS`."""
    if new not in CONTAINER_STATES:
        raise Unprocessable(f"state: invalid value {new!r}; use one of {', '.join(CONTAINER_STATES)}")
    if old != new and new not in TRANSITIONS[old]:
        raise Unprocessable(f"state: cannot change from {old} to {new}")


def _validate_runtime_status(value: Any) -> None:
    if not isinstance(value, dict):
        raise Unprocessable("runtime_status: must be an object")
    for k in RUNTIME_STATUS_STRING_KEYS:
        if k in value and not isinstance(value[k], str):
            raise Unprocessable(f"runtime_status: {k} must be a string")


def plan_container_update(
    ctr: Mapping[str, Any],
    changes: Mapping[str, Any],
    caller: Caller,
    *,
    max_dispatch_attempts: int,
    now: str,
) -> ContainerChange:
    """Validate ``changes`` to container ``ctr`` by ``caller``; return the new values.

    Raises :class:`Forbidden` (403) or :class:`Unprocessable` (422). Fields whose new value
    equals the current one are ignored (clients often send back what they read).
    """
    old = ctr["state"]
    changes = {k: v for k, v in changes.items() if ctr.get(k) != v or k == "state"}
    new = changes.get("state", old)
    check_transition(old, new)

    own_token = caller.container_uuid is not None and caller.container_uuid == ctr["uuid"]
    if not caller.is_admin and not own_token:
        raise Forbidden("permission denied: only an admin or the container's own token may update a container")
    if own_token and old != RUNNING:
        raise Forbidden("permission denied: a container token may only update its container while it is Running")

    holder = ctr.get("locked_by_uuid")
    is_holder = holder is not None and holder == caller.token_uuid

    if old == LOCKED and new == QUEUED and not is_holder:
        raise Forbidden("cannot unlock: container is locked by a different token")
    if old == QUEUED and new == LOCKED and int(changes.get("priority", ctr["priority"]) or 0) <= 0:
        raise Unprocessable("cannot lock when priority<=0")

    permitted = WHITELIST.get((old, new), frozenset())
    for name in changes:
        if name == "state":
            continue
        if name not in permitted:
            raise Unprocessable(f"{name} cannot be modified in state '{old}' (to state '{new}')")
        # gateway_address / interactive_session_started are left to any admin: the in-process
        # tunnel broker writes them acting as the system root, whoever holds the lock.
        if name in PROGRESS_FIELDS | {"started_at", "finished_at"}:
            # Progress of a locked/running container belongs to the lock holder (or the
            # container's own token); other admins may still change state and priority.
            if old in (LOCKED, RUNNING) and not (is_holder or own_token):
                raise Forbidden(f"cannot modify {name}: container is locked by a different token")
        if own_token and name in ("log", "priority"):
            raise Forbidden(f"permission denied: a container token cannot modify {name}")
    if "interactive_session_started" in changes:
        if changes["interactive_session_started"] is not True or ctr.get("interactive_session_started"):
            raise Unprocessable("interactive_session_started can only change from false to true")
    if "runtime_status" in changes:
        _validate_runtime_status(changes["runtime_status"])
    if "priority" in changes:
        p = changes["priority"]
        if isinstance(p, bool) or not isinstance(p, int) or p < 0:
            raise Unprocessable("priority: must be a non-negative integer")

    values: dict[str, Any] = dict(changes)
    result = ContainerChange(values=values, old_state=old, new_state=new)

    if old == LOCKED and new == QUEUED:
        lock_count = int(ctr.get("lock_count") or 0)
        if lock_count >= max_dispatch_attempts:
            # 6.1: the server silently turns the unlock into a cancel.
            new = CANCELLED
            values["state"] = CANCELLED
            values["runtime_status"] = {"error": max_dispatch_attempts_error(lock_count)}
            result.new_state = CANCELLED
            result.dispatch_attempts_exceeded = True
        else:
            values["runtime_status"] = {}

    if old == QUEUED and new == LOCKED:
        values["lock_count"] = int(ctr.get("lock_count") or 0) + 1
        values["locked_by_uuid"] = caller.token_uuid
        result.create_runtime_token = True
    if new in (QUEUED, COMPLETE, CANCELLED) and old in (LOCKED, RUNNING):
        values["locked_by_uuid"] = None
        values["auth_uuid"] = None
        result.expire_runtime_token = True
    if new == RUNNING and old != RUNNING and not ctr.get("started_at"):
        values.setdefault("started_at", now)
    if new in FINAL_STATES and old not in FINAL_STATES:
        values.setdefault("finished_at", now)
    return result


def plan_lock(ctr: Mapping[str, Any], caller: Caller, *, now: str) -> ContainerChange:
    """``POST containers/{uuid}/lock`` (1.3)."""
    if not caller.is_admin:
        raise Forbidden("permission denied: only an admin token may lock a container")
    if ctr["state"] != QUEUED:
        raise Unprocessable(f"cannot lock when {ctr['state']}")
    if int(ctr.get("priority") or 0) <= 0:
        raise Unprocessable("cannot lock when priority<=0")
    return plan_container_update(
        ctr, {"state": LOCKED}, caller, max_dispatch_attempts=1 << 62, now=now
    )


def plan_unlock(
    ctr: Mapping[str, Any], caller: Caller, *, max_dispatch_attempts: int, now: str
) -> ContainerChange:
    """``POST containers/{uuid}/unlock`` (1.3); may become Cancelled (6.1)."""
    if not caller.is_admin:
        raise Forbidden("permission denied: only an admin token may unlock a container")
    if ctr["state"] != LOCKED:
        raise Unprocessable(f"cannot unlock when {ctr['state']}")
    return plan_container_update(
        ctr, {"state": QUEUED}, caller, max_dispatch_attempts=max_dispatch_attempts, now=now
    )


LOCK_RESPONSE_FIELDS = ("uuid", "state", "priority", "auth_uuid", "locked_by_uuid")

# --- priority (1.5) -----------------------------------------------------------------------------

PRIORITY_STEP = 1 << 50


def request_priority(priority: int, created_at_ms: int) -> int:
    """Top-level request → container priority: ``priority * 2^50 - created_at_ms``."""
    if priority <= 0:
        return 0
    return max(priority * PRIORITY_STEP - created_at_ms, 1)


def container_priority(candidates: Iterable[int]) -> int:
    """The container's priority: the maximum over its active requests, 0 if none."""
    return max((c for c in candidates if c > 0), default=0)


# --- container requests -------------------------------------------------------------------------

UNCOMMITTED, COMMITTED, FINAL = "Uncommitted", "Committed", "Final"
REQUEST_STATES = (UNCOMMITTED, COMMITTED, FINAL)
REQUEST_TRANSITIONS: dict[str, frozenset[str]] = {
    UNCOMMITTED: frozenset({COMMITTED, FINAL}),
    COMMITTED: frozenset({FINAL}),
    FINAL: frozenset(),
}

# Fields a client may set on a request; all of them while Uncommitted.
REQUEST_CLIENT_FIELDS = frozenset(
    {"name", "description", "properties", "state", "requesting_container_uuid",
     "container_count_max", "mounts", "runtime_constraints", "container_image", "environment",
     "cwd", "command", "output_path", "priority", "expires_at", "filters", "use_existing",
     "scheduling_parameters", "output_name", "output_ttl", "output_storage_classes",
     "output_properties", "output_glob", "service", "published_ports", "secret_mounts",
     "runtime_token", "owner_uuid"}
)
# Fields still modifiable once Committed / Final.
REQUEST_COMMITTED_FIELDS = frozenset(
    {"name", "description", "properties", "state", "priority", "container_count_max",
     "output_name", "output_ttl", "output_properties", "expires_at"}
)
REQUEST_FINAL_FIELDS = frozenset({"name", "description", "properties", "output_properties"})

# The fields that define "the same work" for container reuse, copied request → container.
CONTAINER_DEFINING_FIELDS = (
    "command", "cwd", "environment", "container_image", "mounts", "output_path",
    "output_glob", "runtime_constraints", "scheduling_parameters", "output_storage_classes",
    "service", "published_ports",
)


def check_request_transition(old: str, new: str) -> None:
    if new not in REQUEST_STATES:
        raise Unprocessable(f"state: invalid value {new!r}; use one of {', '.join(REQUEST_STATES)}")
    if old != new and new not in REQUEST_TRANSITIONS[old]:
        raise Unprocessable(f"state: cannot change from {old} to {new}")


def request_modifiable_fields(state: str) -> frozenset[str]:
    if state == UNCOMMITTED:
        return REQUEST_CLIENT_FIELDS
    if state == COMMITTED:
        return REQUEST_COMMITTED_FIELDS
    return REQUEST_FINAL_FIELDS


GiB = 1 << 30


def default_runtime_constraints(rc: Mapping[str, Any] | None, default_keep_cache_ram: int) -> dict[str, Any]:
    """runtime_constraints with Arvados defaults filled in (1.6).

    ``keep_cache_ram`` 0 → ``DefaultKeepCacheRAM``; if both cache sizes are then 0, the disk
    cache is ``ram`` clamped to [2 GiB, 32 GiB]. A deprecated ``cuda`` object becomes ``gpu``.
    """
    out: dict[str, Any] = {
        "API": False, "keep_cache_disk": 0, "keep_cache_ram": 0, "ram": 0, "vcpus": 0,
    }
    out.update(dict(rc or {}))
    if not out.get("keep_cache_ram"):
        out["keep_cache_ram"] = default_keep_cache_ram
    if not out.get("keep_cache_ram") and not out.get("keep_cache_disk"):
        out["keep_cache_disk"] = min(max(int(out.get("ram") or 0), 2 * GiB), 32 * GiB)
    cuda = out.pop("cuda", None)
    if isinstance(cuda, dict) and int(cuda.get("device_count") or 0) > 0 and not out.get("gpu"):
        out["gpu"] = {
            "device_count": int(cuda["device_count"]),
            "driver_version": cuda.get("driver_version", ""),
            "hardware_target": [cuda.get("hardware_capability", "")],
            "stack": "cuda",
            "vram": 0,
        }
    out.setdefault(
        "gpu",
        {"device_count": 0, "driver_version": "", "hardware_target": [], "stack": "", "vram": 0},
    )
    return out


def validate_committed_request(cr: Mapping[str, Any]) -> None:
    """What must hold before a request may be Committed (422 otherwise)."""
    missing = [f for f in ("command", "container_image", "output_path", "cwd") if not cr.get(f)]
    if missing:
        raise Unprocessable(f"cannot commit container request: {', '.join(missing)} must be set")
    if not isinstance(cr["command"], list) or not all(isinstance(a, str) for a in cr["command"]):
        raise Unprocessable("command: must be an array of strings")
    rc = cr.get("runtime_constraints") or {}
    for k in ("vcpus", "ram"):
        v = rc.get(k)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise Unprocessable(f"runtime_constraints: {k} must be a positive integer")
    sp = cr.get("scheduling_parameters") or {}
    allowed = {"partitions", "preemptible", "max_run_time", "supervisor"}
    extra = set(sp) - allowed
    if extra:
        raise Unprocessable(f"scheduling_parameters: unknown keys {sorted(extra)}")
    if "partitions" in sp and (
        not isinstance(sp["partitions"], list) or not all(isinstance(p, str) for p in sp["partitions"])
    ):
        raise Unprocessable("scheduling_parameters: partitions must be an array of strings")
    mrt = sp.get("max_run_time", 0)
    if isinstance(mrt, bool) or not isinstance(mrt, int) or mrt < 0:
        raise Unprocessable("scheduling_parameters: max_run_time must be a non-negative integer")


def default_scheduling_parameters(sp: Mapping[str, Any] | None, command: list[str] | None) -> dict[str, Any]:
    out = dict(sp or {})
    # 1.7: requests running arvados-cwl-runner are workflow supervisors.
    if command and command[0] == "arvados-cwl-runner" and "supervisor" not in out:
        out["supervisor"] = True
    return out


def merge_scheduling_parameters(params: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Scheduling parameters of a retry container serving several requests (1.2)."""
    if not params:
        return {}
    out: dict[str, Any] = {}
    parts: list[str] = []
    any_without = False
    for p in params:
        if p.get("partitions"):
            parts.extend(x for x in p["partitions"] if x not in parts)
        else:
            any_without = True
    if parts and not any_without:
        out["partitions"] = parts
    if any("preemptible" in p for p in params):
        out["preemptible"] = all(bool(p.get("preemptible")) for p in params)
    if any(p.get("supervisor") for p in params):
        out["supervisor"] = True
    runs = [int(p.get("max_run_time") or 0) for p in params]
    if any(r > 0 for r in runs):
        out["max_run_time"] = 0 if 0 in runs else max(runs)
    return out


# --- published ports (container web services, tunnel.md 5.7) ------------------------------------

PUBLISHED_PORT_KEYS = frozenset({"access", "label", "initial_path"})
# Filled in while the container is Running; never accepted from a client.
PUBLISHED_PORT_URL_KEYS = ("base_url", "initial_url", "external_port")


def validate_published_ports(value: Any) -> None:
    """``published_ports`` of a request (or an admin-created container): 422 naming the problem.

    A map keyed by a decimal port (1-65535) to ``{"access": "public"|"private", "label":
    non-empty string, "initial_path": string}`` and nothing else.
    """
    if value is None:
        return
    if not isinstance(value, dict):
        raise Unprocessable("published_ports: must be an object keyed by port number")
    for key, entry in value.items():
        where = f"published_ports[{key!r}]"
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and key[0] != "0"
                and int(key) <= 65535):
            raise Unprocessable(f"{where}: the key must be a port number from 1 to 65535 "
                                "written in decimal")
        if not isinstance(entry, dict):
            raise Unprocessable(f"{where}: must be an object with access, label and "
                                "initial_path")
        extra = sorted(set(entry) - PUBLISHED_PORT_KEYS)
        if extra:
            raise Unprocessable(f"{where}: unknown keys {extra}; allowed are access, label and "
                                "initial_path")
        if entry.get("access") not in ("public", "private"):
            raise Unprocessable(f"{where}.access: must be \"public\" or \"private\"")
        label = entry.get("label")
        if not isinstance(label, str) or not label:
            raise Unprocessable(f"{where}.label: must be a non-empty string")
        if not isinstance(entry.get("initial_path"), str):
            raise Unprocessable(f"{where}.initial_path: must be a string (may be empty)")


def validate_service_request(cr: Mapping[str, Any]) -> None:
    """A service container cannot be reused: ``service: true`` needs ``use_existing: false``."""
    validate_published_ports(cr.get("published_ports"))
    if cr.get("service") and cr.get("use_existing", True):
        raise Unprocessable("use_existing: cannot be true when service is true (a service "
                            "container must not be reused); set use_existing to false")


@dataclass(frozen=True)
class WebServicesConfig:
    """``Services.ContainerWebServices``: the URL form that ``base_url`` is built from."""

    external_url: str = ""
    port_min: int = 0
    port_max: int = 0

    @classmethod
    def from_config(cls, ws: Any) -> WebServicesConfig:
        """From the config's ``Services.ContainerWebServices`` section."""
        return cls(external_url=ws.external_url, port_min=ws.external_port_min,
                   port_max=ws.external_port_max)

    @property
    def wildcard(self) -> bool:
        return self.host.startswith("*")

    @property
    def host(self) -> str:
        return (urlsplit(self.external_url).hostname or "").lower()

    @property
    def port_range(self) -> bool:
        """The port-range form: a non-wildcard host and ``ExternalPortMin/Max`` > 0."""
        return (bool(self.external_url) and not self.wildcard and self.port_min > 0
                and self.port_max >= self.port_min)


def published_port_urls(uuid: str, ports: Mapping[str, Any], web: WebServicesConfig,
                        external: Mapping[str, int]) -> dict[str, Any]:
    """``published_ports`` of a container entering Running: each entry plus ``base_url``,
    ``initial_url`` and (port-range form) ``external_port``.

    ``external`` maps container port → assigned external port; a port without an assignment
    (range exhausted, or no web-services URL configured) gets no URLs.
    """
    parts = urlsplit(web.external_url)
    scheme = parts.scheme or "https"
    default = 443 if scheme == "https" else 80
    port_suffix = f":{parts.port}" if parts.port and parts.port != default else ""
    out: dict[str, Any] = {}
    for key, entry in ports.items():
        entry = {k: v for k, v in dict(entry).items() if k not in PUBLISHED_PORT_URL_KEYS}
        base = ""
        if web.wildcard:
            base = f"{scheme}://{uuid}-{key}{web.host[1:]}{port_suffix}/"
        elif web.port_range and key in external:
            entry["external_port"] = external[key]
            base = f"{scheme}://{web.host}:{external[key]}/"
        if base:
            entry["base_url"] = base
            entry["initial_url"] = base + str(entry.get("initial_path") or "").lstrip("/")
        out[key] = entry
    return out


def published_ports_without_urls(ports: Mapping[str, Any]) -> dict[str, Any]:
    """``published_ports`` of a container that left Running (its assignments are dropped)."""
    return {k: {f: v for f, v in dict(e).items() if f not in PUBLISHED_PORT_URL_KEYS}
            for k, e in ports.items()}
