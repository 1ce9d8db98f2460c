"""Resource schemas of the embedded controller: field names and types, as in the Arvados API.

Each resource is stored as one JSON document (``doc``, the public record exactly as served)
plus a few "promoted" real columns that are indexed and used by the hot queries (state,
priority, locked_by_uuid, ...). Filters and ordering on promoted fields use the column; on any
other field they use ``json_extract(doc, ...)`` — see :mod:`.filters`.

Field types are the discovery document's: ``string``, ``integer``, ``float``, ``datetime``,
``boolean``, ``hash``, ``array``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# UUID infixes of the object kinds the controller knows (used for uuids and the is_a filter).
KIND_INFIX: dict[str, str] = {
    "arvados#container": "dz642",
    "arvados#containerRequest": "xvhdp",
    "arvados#user": "tpzed",
    "arvados#apiClientAuthorization": "gj3su",
    "arvados#log": "57u5n",
    "arvados#collection": "4zz18",
    "arvados#group": "j7d0g",
    "arvados#workflow": "7fd4e",
    "arvados#link": "o0j2j",
}


@dataclass(frozen=True)
class Resource:
    """One API resource: its table, kind, uuid infix and typed fields."""

    name: str  # URL path segment: "containers"
    singular: str  # request body key: "container"
    kind: str  # "arvados#container"
    table: str
    fields: dict[str, str]
    # Fields kept in real, indexed columns (everything else lives only in ``doc``).
    promoted: frozenset[str] = field(default_factory=frozenset)
    # Fields that are never filterable nor returned (kept in the ``hidden`` column).
    hidden: frozenset[str] = field(default_factory=frozenset)
    # Promoted fields that are never NULL (ordering on them needs no NULLS clause and so keeps
    # the index usable).
    not_null: frozenset[str] = field(default_factory=frozenset)

    @property
    def infix(self) -> str:
        return KIND_INFIX[self.kind]

    @property
    def list_kind(self) -> str:
        return self.kind + "List"


_COMMON = {
    "etag": "string",
    "uuid": "string",
    "owner_uuid": "string",
    "created_at": "datetime",
    "modified_at": "datetime",
    "modified_by_user_uuid": "string",
}

CONTAINER = Resource(
    name="containers",
    singular="container",
    kind="arvados#container",
    table="containers",
    fields={
        **_COMMON,
        "state": "string",
        "started_at": "datetime",
        "finished_at": "datetime",
        "log": "string",
        "environment": "hash",
        "cwd": "string",
        "command": "array",
        "output_path": "string",
        "mounts": "hash",
        "runtime_constraints": "hash",
        "output": "string",
        "container_image": "string",
        "progress": "float",
        "priority": "integer",
        "exit_code": "integer",
        "auth_uuid": "string",
        "locked_by_uuid": "string",
        "scheduling_parameters": "hash",
        "runtime_status": "hash",
        "runtime_user_uuid": "string",
        "runtime_auth_scopes": "array",
        "lock_count": "integer",
        "gateway_address": "string",
        "interactive_session_started": "boolean",
        "output_storage_classes": "array",
        "output_properties": "hash",
        "cost": "float",
        "subrequests_cost": "float",
        "output_glob": "array",
        "service": "boolean",
        "published_ports": "hash",
    },
    promoted=frozenset(
        {"uuid", "state", "priority", "locked_by_uuid", "auth_uuid", "created_at",
         "modified_at", "owner_uuid"}
    ),
    hidden=frozenset({"runtime_token", "secret_mounts"}),
    not_null=frozenset({"uuid", "state", "priority", "created_at", "modified_at"}),
)

CONTAINER_REQUEST = Resource(
    name="container_requests",
    singular="container_request",
    kind="arvados#containerRequest",
    table="container_requests",
    fields={
        **_COMMON,
        "name": "string",
        "description": "string",
        "properties": "hash",
        "state": "string",
        "requesting_container_uuid": "string",
        "container_uuid": "string",
        "container_count_max": "integer",
        "mounts": "hash",
        "runtime_constraints": "hash",
        "container_image": "string",
        "environment": "hash",
        "cwd": "string",
        "command": "array",
        "output_path": "string",
        "priority": "integer",
        "expires_at": "datetime",
        "filters": "string",
        "container_count": "integer",
        "use_existing": "boolean",
        "scheduling_parameters": "hash",
        "output_uuid": "string",
        "log_uuid": "string",
        "output_name": "string",
        "output_ttl": "integer",
        "output_storage_classes": "array",
        "output_properties": "hash",
        "cumulative_cost": "float",
        "output_glob": "array",
        "service": "boolean",
        "published_ports": "hash",
    },
    promoted=frozenset(
        {"uuid", "state", "priority", "container_uuid", "requesting_container_uuid",
         "owner_uuid", "created_at", "modified_at"}
    ),
    hidden=frozenset({"secret_mounts", "runtime_token"}),
    not_null=frozenset({"uuid", "state", "priority", "created_at", "modified_at",
                        "owner_uuid"}),
)

USER = Resource(
    name="users",
    singular="user",
    kind="arvados#user",
    table="users",
    fields={
        **_COMMON,
        "email": "string",
        "first_name": "string",
        "last_name": "string",
        "identity_url": "string",
        "is_admin": "boolean",
        "prefs": "hash",
        "is_active": "boolean",
        "username": "string",
    },
    promoted=frozenset({"uuid", "username", "created_at", "modified_at"}),
    not_null=frozenset({"uuid", "created_at", "modified_at"}),
)

API_CLIENT_AUTHORIZATION = Resource(
    name="api_client_authorizations",
    singular="api_client_authorization",
    kind="arvados#apiClientAuthorization",
    table="api_client_authorizations",
    fields={
        "etag": "string",
        "uuid": "string",
        "owner_uuid": "string",
        "created_by_ip_address": "string",
        "last_used_by_ip_address": "string",
        "last_used_at": "datetime",
        "expires_at": "datetime",
        "created_at": "datetime",
        "modified_at": "datetime",
        "scopes": "array",
    },
    promoted=frozenset({"uuid", "owner_uuid", "expires_at", "created_at", "modified_at"}),
    hidden=frozenset({"api_token"}),
    not_null=frozenset({"uuid", "created_at", "modified_at"}),
)

LOG = Resource(
    name="logs",
    singular="log",
    kind="arvados#log",
    table="logs",
    fields={
        **_COMMON,
        "id": "integer",
        "object_uuid": "string",
        "event_at": "datetime",
        "event_type": "string",
        "summary": "string",
        "properties": "hash",
        "object_owner_uuid": "string",
    },
    promoted=frozenset(
        {"id", "uuid", "object_uuid", "event_type", "owner_uuid", "created_at", "modified_at"}
    ),
    not_null=frozenset({"id", "uuid", "created_at", "modified_at"}),
)

# Only what container web services need (``published_port`` links, reference tunnel.md 5.2):
# no permission links, so a link grants nothing.
LINK = Resource(
    name="links",
    singular="link",
    kind="arvados#link",
    table="links",
    fields={
        **_COMMON,
        "tail_uuid": "string",
        "link_class": "string",
        "name": "string",
        "head_uuid": "string",
        "properties": "hash",
    },
    promoted=frozenset(
        {"uuid", "owner_uuid", "link_class", "name", "head_uuid", "tail_uuid", "created_at",
         "modified_at"}
    ),
    not_null=frozenset({"uuid", "created_at", "modified_at", "owner_uuid"}),
)

RESOURCES: dict[str, Resource] = {
    r.name: r for r in (CONTAINER, CONTAINER_REQUEST, USER, API_CLIENT_AUTHORIZATION, LOG, LINK)
}
