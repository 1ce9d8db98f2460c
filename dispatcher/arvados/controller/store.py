"""The controller's state in SQLite (WAL): users, tokens, containers, requests, logs, links.

Every public method is synchronous and runs one transaction; the HTTP layer calls them through
:meth:`Store.run`, which executes them on the store's single database thread, or, for the
quick one-row operations (get, lock, unlock, ...), :meth:`Store.run_small`, which runs them on
the event loop itself while the database thread is idle. Either way only one operation runs at
a time: a lock is "performed inside a row lock" (reference 1.3) simply because nothing else
touches the database meanwhile. The event loop never waits for another process's write lock
(it falls back to the thread) and never checkpoints the WAL (the thread does).

Records are kept as the JSON document served to clients (``doc``) plus indexed columns for the
fields hot queries filter on (see :mod:`.models`), so a list response is mostly the stored
documents spliced together, without decoding them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from dispatcher.arvados.ids import random_alnum

from . import states
from .errors import Forbidden, NotFound, StoreError, Unauthorized, Unprocessable
from .filters import ListQuery, format_time, parse_time
from .models import (
    API_CLIENT_AUTHORIZATION,
    CONTAINER,
    CONTAINER_REQUEST,
    LINK,
    LOG,
    RESOURCES,
    USER,
    Resource,
)
from .states import Caller

T = TypeVar("T")

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    uuid TEXT PRIMARY KEY, username TEXT, created_at TEXT NOT NULL, modified_at TEXT NOT NULL,
    doc TEXT NOT NULL, hidden TEXT NOT NULL DEFAULT '{}');
CREATE UNIQUE INDEX IF NOT EXISTS users_username ON users(username);
CREATE TABLE IF NOT EXISTS api_client_authorizations (
    uuid TEXT PRIMARY KEY, api_token TEXT NOT NULL UNIQUE, owner_uuid TEXT NOT NULL,
    container_uuid TEXT, expires_at TEXT, created_at TEXT NOT NULL, modified_at TEXT NOT NULL,
    doc TEXT NOT NULL, hidden TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS containers (
    uuid TEXT PRIMARY KEY, state TEXT NOT NULL, priority INTEGER NOT NULL,
    locked_by_uuid TEXT, auth_uuid TEXT, owner_uuid TEXT, created_at TEXT NOT NULL,
    modified_at TEXT NOT NULL, reuse_key TEXT, doc TEXT NOT NULL,
    hidden TEXT NOT NULL DEFAULT '{}');
CREATE INDEX IF NOT EXISTS containers_state_priority ON containers(state, priority, uuid);
CREATE INDEX IF NOT EXISTS containers_priority ON containers(priority);
DROP INDEX IF EXISTS containers_locked_by;
-- (locked_by_uuid, uuid): the dispatchers' "mine" query pages in uuid order without a sort.
CREATE INDEX IF NOT EXISTS containers_locked_by_uuid ON containers(locked_by_uuid, uuid);
CREATE INDEX IF NOT EXISTS containers_created_at ON containers(created_at);
CREATE INDEX IF NOT EXISTS containers_modified_at ON containers(modified_at);
CREATE INDEX IF NOT EXISTS containers_reuse ON containers(reuse_key, state);
CREATE TABLE IF NOT EXISTS container_requests (
    uuid TEXT PRIMARY KEY, state TEXT NOT NULL, priority INTEGER NOT NULL,
    container_uuid TEXT, requesting_container_uuid TEXT, owner_uuid TEXT NOT NULL,
    created_at TEXT NOT NULL, modified_at TEXT NOT NULL, doc TEXT NOT NULL,
    hidden TEXT NOT NULL DEFAULT '{}');
CREATE INDEX IF NOT EXISTS cr_container ON container_requests(container_uuid, state);
CREATE INDEX IF NOT EXISTS cr_owner ON container_requests(owner_uuid, created_at);
CREATE INDEX IF NOT EXISTS cr_requesting ON container_requests(requesting_container_uuid);
CREATE INDEX IF NOT EXISTS cr_created_at ON container_requests(created_at);
CREATE TABLE IF NOT EXISTS logs (
    id INTEGER PRIMARY KEY, uuid TEXT NOT NULL UNIQUE, object_uuid TEXT, event_type TEXT,
    owner_uuid TEXT, created_at TEXT NOT NULL, modified_at TEXT NOT NULL, doc TEXT NOT NULL,
    hidden TEXT NOT NULL DEFAULT '{}');
CREATE INDEX IF NOT EXISTS logs_object ON logs(object_uuid, id);
CREATE INDEX IF NOT EXISTS logs_created_at ON logs(created_at);
CREATE INDEX IF NOT EXISTS logs_event_type ON logs(event_type);
-- Port-range container web services: which Running container holds which external port.
CREATE TABLE IF NOT EXISTS container_ports (
    external_port INTEGER PRIMARY KEY, container_port INTEGER NOT NULL,
    container_uuid TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS container_ports_uuid ON container_ports(container_uuid);
CREATE TABLE IF NOT EXISTS links (
    uuid TEXT PRIMARY KEY, owner_uuid TEXT NOT NULL, link_class TEXT, name TEXT,
    head_uuid TEXT, tail_uuid TEXT, created_at TEXT NOT NULL, modified_at TEXT NOT NULL,
    doc TEXT NOT NULL, hidden TEXT NOT NULL DEFAULT '{}');
-- Container web services look a published_port link up by (link_class, name).
CREATE INDEX IF NOT EXISTS links_class_name ON links(link_class, name);
CREATE INDEX IF NOT EXISTS links_head ON links(head_uuid);
"""


@dataclass(frozen=True)
class Policy:
    """The cluster settings the controller's rules depend on."""

    cluster_id: str = "zzzzz"
    system_root_token: str = ""
    max_dispatch_attempts: int = 10
    max_retry_attempts: int = 3
    default_keep_cache_ram: int = 0
    default_priority: int = 500
    max_items_per_response: int = 1000
    web_services: states.WebServicesConfig = field(default_factory=states.WebServicesConfig)

    @classmethod
    def from_config(cls, cfg: Any) -> Policy:
        """Build from a :class:`dispatcher.config.ClusterConfig`."""
        return cls(
            cluster_id=cfg.cluster_id or "zzzzz",
            system_root_token=cfg.system_root_token,
            max_dispatch_attempts=cfg.containers.max_dispatch_attempts,
            max_retry_attempts=cfg.containers.max_retry_attempts,
            default_keep_cache_ram=cfg.containers.default_keep_cache_ram,
            default_priority=cfg.containers.default_priority,
            max_items_per_response=cfg.api.max_items_per_response,
            web_services=states.WebServicesConfig.from_config(
                cfg.services.container_web_services),
        )

    @property
    def root_token_uuid(self) -> str:
        return f"{self.cluster_id}-gj3su-000000000000000"

    @property
    def system_user_uuid(self) -> str:
        return f"{self.cluster_id}-tpzed-000000000000000"


@dataclass
class ListResult:
    """One page of a list: either raw JSON documents (no ``select``) or selected dicts."""

    kind: str
    docs: list[str] = field(default_factory=list)
    items: list[dict[str, Any]] | None = None
    items_available: int | None = None
    offset: int = 0
    limit: int = 0

    def to_json(self) -> str:
        """The list response body; stored documents are spliced in without re-encoding."""
        head: dict[str, Any] = {"kind": self.kind, "offset": self.offset, "limit": self.limit}
        if self.items_available is not None:
            head["items_available"] = self.items_available
        body = ",".join(self.docs) if self.items is None else ",".join(
            json.dumps(i, separators=(",", ":")) for i in self.items
        )
        return json.dumps(head, separators=(",", ":"))[:-1] + ',"items":[' + body + "]}"


ContainerListener = Callable[[dict[str, Any] | None, dict[str, Any]], None]


def new_uuid(cluster_id: str, infix: str) -> str:
    """``<cluster>-<infix>-<15 random lowercase alnum>``."""
    return f"{cluster_id}-{infix}-" + random_alnum(15)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=False)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _time_ms(ts: str) -> int:
    """Stored timestamp → epoch milliseconds, exactly (no float rounding)."""
    return (datetime.fromisoformat(ts.replace("Z", "+00:00")) - _EPOCH) // timedelta(milliseconds=1)


_TYPE_CHECKS: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "hash": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "datetime": lambda v: isinstance(v, str),
}


def check_types(resource: Resource, attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Type-check client-supplied attributes; normalise datetimes. 422 on a mismatch."""
    out: dict[str, Any] = {}
    for name, value in attrs.items():
        ftype = resource.fields.get(name)
        if ftype is None:
            if name in resource.hidden:
                out[name] = value
                continue
            raise Unprocessable(f"unknown attribute {name!r} for {resource.kind}")
        if value is None:
            out[name] = None
            continue
        if not _TYPE_CHECKS[ftype](value):
            raise Unprocessable(f"{name}: expected {ftype}, got {type(value).__name__}")
        if ftype == "datetime":
            try:
                value = parse_time(value)
            except ValueError:
                raise Unprocessable(f"{name}: invalid timestamp {value!r}") from None
        out[name] = value
    return out


def _busy(exc: sqlite3.OperationalError) -> bool:
    """Whether SQLite refused because another connection holds a lock (SQLITE_BUSY/LOCKED)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED (and their extended codes)
    msg = str(exc)
    return "locked" in msg or "busy" in msg


class Store:
    """SQLite-backed controller state. Construct, then call methods via :meth:`run`."""

    def __init__(
        self,
        path: str | Path,
        policy: Policy,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = str(path)
        self.policy = policy
        self._clock = clock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="controller-db")
        self._thread_ident: int | None = None
        # Operations handed to the database thread and not finished yet (event-loop thread
        # only): run_small() runs inline only when this is 0.
        self._on_thread = 0
        self._inline_conn: sqlite3.Connection | None = None
        self._inline_calls = 0
        self._background: set[asyncio.Future[Any]] = set()
        self._listeners: list[ContainerListener] = []
        self._pending: list[tuple[dict[str, Any] | None, dict[str, Any]]] = []
        try:
            # The database holds API tokens: owner-only from the start (SQLite gives its -wal
            # and -shm files the same mode).
            if self.path != ":memory:" and not os.path.exists(self.path):
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA busy_timeout=5000")
            self._conn.executescript(SCHEMA)
            if self.path != ":memory:":
                # The event loop's own connection: never waits for a lock (busy -> the
                # operation goes to the thread instead) and never checkpoints (an fsync).
                inline = sqlite3.connect(self.path, isolation_level=None,
                                         check_same_thread=False)
                inline.execute("PRAGMA synchronous=NORMAL")
                inline.execute("PRAGMA busy_timeout=0")
                inline.execute("PRAGMA wal_autocheckpoint=0")
                self._inline_conn = inline
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(
                f"cannot open the controller database {self.path}: {exc}; check the data "
                "directory's permissions and free space"
            ) from exc
        with self._tx():
            self._conn.execute(
                "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
            self._ensure_system_user()

    # --- plumbing -------------------------------------------------------------------------------

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` (a Store method) on the database thread."""
        loop = asyncio.get_running_loop()
        self._on_thread += 1
        try:
            return await loop.run_in_executor(
                self._executor, functools.partial(fn, *args, **kwargs))
        finally:
            self._on_thread -= 1

    # Inline calls between two checkpoints of the WAL on the database thread.
    CHECKPOINT_EVERY = 256

    async def run_small(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)``, a quick operation on a few rows (no lists, no bulk writes), on
        the event loop if the database thread is idle; otherwise, or if another process holds
        the database's write lock, on the thread like :meth:`run`.

        Why: the hop to the thread and back (two wake-ups, a future chained across threads)
        costs ~0.18 ms of CPU, a quarter of a whole ``lock`` request; a burst of 1,000 locks on
        a host that also runs slurmctld is CPU-bound. Inline, the loop is held for the
        operation only (~0.1-0.3 ms): it never sleeps on a lock (``busy_timeout=0``) and
        leaves checkpointing (which syncs) to the thread.
        """
        inline = self._inline_conn
        if inline is not None and self._on_thread == 0:
            conn, self._conn = self._conn, inline
            try:
                result = fn(*args)
            except sqlite3.OperationalError as exc:
                if not _busy(exc):
                    raise
                # Locked by another process (another controller on the same database, a
                # backup): nothing was written (the transaction rolled back); wait on the
                # thread instead.
            else:
                self._inline_calls += 1
                if self._inline_calls % self.CHECKPOINT_EVERY == 0:
                    self._in_background(self.run(self._checkpoint))
                return result
            finally:
                self._conn = conn
        return await self.run(fn, *args)

    def _in_background(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def _checkpoint(self) -> None:
        """Copy what the WAL holds into the database without blocking anyone (the inline
        connection's commits never do it themselves)."""
        self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._conn.close()
        if self._inline_conn is not None:
            self._inline_conn.close()

    def ping(self) -> None:
        """Touch the database (health check); raises if it is unusable."""
        self._conn.execute("SELECT count(*) FROM meta").fetchone()

    def container_counts(self) -> dict[str, int]:
        """Number of containers per state (metrics)."""
        rows = self._conn.execute("SELECT state, count(*) FROM containers GROUP BY state")
        return {state: n for state, n in rows}

    def add_container_listener(self, fn: ContainerListener) -> None:
        """Call ``fn(old, new)`` (on the database thread, after commit) for every container
        created or updated. ``old`` is None for a new container. Keep it cheap."""
        self._listeners.append(fn)

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        if self._conn.in_transaction:  # nested call inside an operation
            yield self._conn
            return
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            self._pending.clear()
            raise
        self._conn.execute("COMMIT")
        pending, self._pending = self._pending, []
        for old, new in pending:
            for fn in self._listeners:
                with contextlib.suppress(Exception):
                    fn(old, new)

    def _now(self) -> str:
        return format_time(self._clock())

    def _uuid(self, resource: Resource) -> str:
        return new_uuid(self.policy.cluster_id, resource.infix)

    @staticmethod
    def _etag(doc: Mapping[str, Any]) -> str:
        h = hashlib.md5(f"{doc['uuid']}{doc.get('modified_at')}".encode(), usedforsecurity=False)
        return h.hexdigest()[:25]

    def _write(self, resource: Resource, doc: dict[str, Any], hidden: Mapping[str, Any],
               *, insert: bool, extra: Mapping[str, Any] | None = None) -> None:
        doc["etag"] = self._etag(doc)
        cols: dict[str, Any] = {c: doc.get(c) for c in resource.promoted}
        cols.update(extra or {})
        cols["doc"] = _dumps(doc)
        cols["hidden"] = _dumps(dict(hidden))
        names = list(cols)
        if insert:
            sql = (f"INSERT INTO {resource.table} ({', '.join(names)}) "
                   f"VALUES ({', '.join('?' * len(names))})")
            self._conn.execute(sql, [cols[n] for n in names])
        else:
            sets = ", ".join(f"{n} = ?" for n in names if n != "uuid")
            self._conn.execute(
                f"UPDATE {resource.table} SET {sets} WHERE uuid = ?",
                [cols[n] for n in names if n != "uuid"] + [doc["uuid"]],
            )

    def _load(self, resource: Resource, uuid: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
        row = self._conn.execute(
            f"SELECT doc, hidden FROM {resource.table} WHERE uuid = ?", (uuid,)
        ).fetchone()
        if row is None:
            return None
        return json.loads(row[0]), json.loads(row[1])

    def _base_doc(self, resource: Resource, caller: Caller | None, now: str) -> dict[str, Any]:
        doc: dict[str, Any] = {f: None for f in resource.fields}
        doc["kind"] = resource.kind
        doc["uuid"] = self._uuid(resource)
        doc["created_at"] = doc["modified_at"] = now
        if "owner_uuid" in doc:
            doc["owner_uuid"] = caller.user_uuid if caller else self.policy.system_user_uuid
        if "modified_by_user_uuid" in doc:
            doc["modified_by_user_uuid"] = caller.user_uuid if caller else None
        return doc

    @property
    def system_caller(self) -> Caller:
        return Caller(self.policy.root_token_uuid, self.policy.system_user_uuid, True)

    # --- users and tokens -----------------------------------------------------------------------

    def _ensure_system_user(self) -> None:
        uuid = self.policy.system_user_uuid
        if self._load(USER, uuid) is not None:
            return
        now = self._now()
        doc = self._base_doc(USER, None, now)
        doc.update(uuid=uuid, owner_uuid=uuid, username="root", first_name="root",
                   last_name="", email="root", is_admin=True, is_active=True, prefs={},
                   identity_url="")
        self._write(USER, doc, {}, insert=True)

    def create_user(self, username: str, *, is_admin: bool = False) -> tuple[dict[str, Any], str]:
        """Create a user and a token for it; return (user record, token ``v2/<uuid>/<secret>``)."""
        if not username or any(c.isspace() for c in username):
            raise Unprocessable("username must be a non-empty word")
        with self._tx():
            if self._conn.execute("SELECT 1 FROM users WHERE username = ?", (username,)).fetchone():
                raise Unprocessable(f"a user named {username!r} already exists")
            now = self._now()
            doc = self._base_doc(USER, None, now)
            doc.update(username=username, first_name=username, last_name="",
                       email=f"{username}@localhost", is_admin=is_admin, is_active=True,
                       prefs={}, identity_url="")
            doc["owner_uuid"] = doc["uuid"]
            self._write(USER, doc, {}, insert=True)
            token_doc, secret = self._create_token(doc["uuid"])
        return doc, f"v2/{token_doc['uuid']}/{secret}"

    def _create_token(self, user_uuid: str, container_uuid: str | None = None) -> tuple[dict[str, Any], str]:
        now = self._now()
        doc = self._base_doc(API_CLIENT_AUTHORIZATION, None, now)
        doc.update(owner_uuid=user_uuid, scopes=["all"])
        secret = random_alnum(50)
        self._write(API_CLIENT_AUTHORIZATION, doc, {}, insert=True,
                    extra={"api_token": secret, "container_uuid": container_uuid})
        return doc, secret

    def _expire_token(self, token_uuid: str) -> None:
        loaded = self._load(API_CLIENT_AUTHORIZATION, token_uuid)
        if loaded is None:
            return
        doc, hidden = loaded
        now = self._now()
        doc["expires_at"] = doc["modified_at"] = now
        self._write(API_CLIENT_AUTHORIZATION, doc, hidden, insert=False)

    def authenticate(self, token: str) -> Caller:
        """Token (bare secret or ``v2/<uuid>/<secret>``) → :class:`Caller`; 401 if unknown."""
        root = self.policy.system_root_token
        if root and (
            hmac.compare_digest(token, root)
            or hmac.compare_digest(token, f"v2/{self.policy.root_token_uuid}/{root}")
        ):
            return self.system_caller
        if token.startswith("v2/") and token.count("/") == 2:
            _, uuid, secret = token.split("/")
            row = self._conn.execute(
                "SELECT uuid, api_token, owner_uuid, container_uuid, expires_at "
                "FROM api_client_authorizations WHERE uuid = ?", (uuid,)
            ).fetchone()
            if row is not None and not hmac.compare_digest(row[1], secret):
                row = None
        else:
            row = self._conn.execute(
                "SELECT uuid, api_token, owner_uuid, container_uuid, expires_at "
                "FROM api_client_authorizations WHERE api_token = ?", (token,)
            ).fetchone()
        if row is None or (row[4] is not None and row[4] <= self._now()):
            raise Unauthorized("Not logged in (invalid or expired API token)")
        user = self._load(USER, row[2])
        if user is None or not user[0].get("is_active", True):
            raise Unauthorized("Not logged in (token's user does not exist or is inactive)")
        return Caller(row[0], row[2], bool(user[0].get("is_admin")), row[3])

    def current_token(self, caller: Caller) -> dict[str, Any]:
        """``api_client_authorizations/current`` (without the secret)."""
        if caller.token_uuid == self.policy.root_token_uuid:
            return {
                "kind": API_CLIENT_AUTHORIZATION.kind, "uuid": caller.token_uuid,
                "owner_uuid": caller.user_uuid, "scopes": ["all"], "expires_at": None,
                "created_at": None, "modified_at": None, "etag": "",
            }
        loaded = self._load(API_CLIENT_AUTHORIZATION, caller.token_uuid)
        if loaded is None:
            raise Unauthorized("Not logged in")
        return loaded[0]

    def get_user(self, caller: Caller, uuid: str) -> dict[str, Any]:
        if uuid == "current":
            uuid = caller.user_uuid
        if not caller.is_admin and uuid != caller.user_uuid:
            raise NotFound(f"user {uuid} not found")
        loaded = self._load(USER, uuid)
        if loaded is None:
            raise NotFound(f"user {uuid} not found")
        return loaded[0]

    # --- generic listing ------------------------------------------------------------------------

    def list_page(self, resource: Resource, caller: Caller, q: ListQuery) -> ListResult:
        """Run a validated list query with the caller's visibility rules applied."""
        where, params = q.where, list(q.params)
        scope, scope_params = self._visibility(resource, caller)
        if scope:
            where = f"({where}) AND {scope}"
            params.extend(scope_params)
        result = ListResult(kind=resource.list_kind, offset=q.offset, limit=q.limit)
        if q.count:
            result.items_available = self._conn.execute(
                f"SELECT count(*) FROM {resource.table} WHERE {where}", params
            ).fetchone()[0]
        if q.limit > 0:
            rows = self._conn.execute(
                f"SELECT doc FROM {resource.table} WHERE {where} ORDER BY {q.order_by} "
                "LIMIT ? OFFSET ?",
                [*params, q.limit, q.offset],
            ).fetchall()
            if q.select is None:
                result.docs = [r[0] for r in rows]
            else:
                result.items = [select_fields(json.loads(r[0]), q.select) for r in rows]
        return result

    def _visibility(self, resource: Resource, caller: Caller) -> tuple[str, list[Any]]:
        if caller.is_admin:
            return "", []
        if resource is CONTAINER:
            return (
                "(uuid IN (SELECT container_uuid FROM container_requests WHERE owner_uuid = ? "
                "AND container_uuid IS NOT NULL) OR uuid = ?)",
                [caller.user_uuid, caller.container_uuid or ""],
            )
        if resource is CONTAINER_REQUEST:
            return "(owner_uuid = ? OR requesting_container_uuid = ?)", [
                caller.user_uuid, caller.container_uuid or ""]
        if resource is LOG:
            return (
                "(owner_uuid = ? OR object_uuid = ? OR object_uuid IN (SELECT uuid FROM "
                "container_requests WHERE owner_uuid = ?) OR object_uuid IN (SELECT "
                "container_uuid FROM container_requests WHERE owner_uuid = ? AND "
                "container_uuid IS NOT NULL))",
                [caller.user_uuid, caller.container_uuid or "", caller.user_uuid,
                 caller.user_uuid],
            )
        if resource is USER:
            return "uuid = ?", [caller.user_uuid]
        if resource is API_CLIENT_AUTHORIZATION:
            return "owner_uuid = ?", [caller.user_uuid]
        if resource is LINK:
            # Without permission links, a link is readable by its owner and by whoever owns
            # the container request it points at.
            return (
                "(owner_uuid = ? OR head_uuid IN (SELECT uuid FROM container_requests WHERE "
                "owner_uuid = ?))",
                [caller.user_uuid, caller.user_uuid],
            )
        return "0", []

    def _get_visible(self, resource: Resource, caller: Caller, uuid: str) -> tuple[dict[str, Any], dict[str, Any]]:
        loaded = self._load(resource, uuid)
        if loaded is not None and not caller.is_admin:
            scope, params = self._visibility(resource, caller)
            ok = self._conn.execute(
                f"SELECT 1 FROM {resource.table} WHERE uuid = ? AND {scope}", [uuid, *params]
            ).fetchone()
            if not ok:
                loaded = None
        if loaded is None:
            raise NotFound(f"{resource.singular} {uuid} not found")
        return loaded

    def get(self, resource: Resource, caller: Caller, uuid: str) -> dict[str, Any]:
        """Get one visible record (404 otherwise)."""
        return self._get_visible(resource, caller, uuid)[0]

    # --- containers -----------------------------------------------------------------------------

    def create_container(self, caller: Caller, attrs: Mapping[str, Any]) -> dict[str, Any]:
        """Admin-only direct container creation (tests, tools); state is always Queued."""
        if not caller.is_admin:
            raise Forbidden("permission denied: only an admin may create containers")
        unknown = set(attrs) - states.CREATE_FIELDS
        if unknown:
            raise Unprocessable(f"cannot set {sorted(unknown)} when creating a container")
        attrs = check_types(CONTAINER, attrs)
        states.validate_published_ports(attrs.get("published_ports"))
        if attrs.get("state", states.QUEUED) != states.QUEUED:
            raise Unprocessable("state: a new container must be Queued")
        with self._tx():
            doc, hidden = self._new_container_doc(
                attrs, runtime_user=attrs.get("runtime_user_uuid") or caller.user_uuid
            )
            doc["priority"] = int(attrs.get("priority") or 0)
            self._write(CONTAINER, doc, hidden, insert=True,
                        extra={"reuse_key": reuse_key(doc)})
            self._pending.append((None, dict(doc)))
        return doc

    def _new_container_doc(self, attrs: Mapping[str, Any], *, runtime_user: str) -> tuple[dict[str, Any], dict[str, Any]]:
        now = self._now()
        doc = self._base_doc(CONTAINER, None, now)
        doc.update(
            state=states.QUEUED, priority=0, lock_count=0, progress=None,
            command=[], cwd=".", environment={}, mounts={}, output_path=".",
            output_glob=[], runtime_status={}, output_properties={},
            output_storage_classes=["default"], runtime_auth_scopes=["all"],
            scheduling_parameters={}, interactive_session_started=False, service=False,
            published_ports={}, cost=0.0, subrequests_cost=0.0, container_image="",
        )
        for k, v in attrs.items():
            if k in CONTAINER.fields and k not in ("state", "priority"):
                doc[k] = v
        doc["runtime_constraints"] = states.default_runtime_constraints(
            attrs.get("runtime_constraints"), self.policy.default_keep_cache_ram
        )
        doc["runtime_user_uuid"] = runtime_user
        doc["owner_uuid"] = self.policy.system_user_uuid
        hidden = {"secret_mounts": attrs.get("secret_mounts") or {}}
        if attrs.get("runtime_token"):
            hidden["runtime_token"] = attrs["runtime_token"]
        return doc, hidden

    def update_container(self, caller: Caller, uuid: str, changes: Mapping[str, Any]) -> dict[str, Any]:
        """``PUT/PATCH containers/{uuid}`` with the state machine and whitelist of 1.2/1.4."""
        changes = check_types(CONTAINER, changes)
        with self._tx():
            ctr, hidden = self._get_visible(CONTAINER, caller, uuid)
            plan = states.plan_container_update(
                ctr, changes, caller,
                max_dispatch_attempts=self.policy.max_dispatch_attempts, now=self._now(),
            )
            return self._apply(caller, ctr, hidden, plan)

    def lock_container(self, caller: Caller, uuid: str) -> dict[str, Any]:
        with self._tx():
            ctr, hidden = self._get_visible(CONTAINER, caller, uuid)
            plan = states.plan_lock(ctr, caller, now=self._now())
            doc = self._apply(caller, ctr, hidden, plan)
        return {k: doc.get(k) for k in states.LOCK_RESPONSE_FIELDS}

    def unlock_container(self, caller: Caller, uuid: str) -> dict[str, Any]:
        with self._tx():
            ctr, hidden = self._get_visible(CONTAINER, caller, uuid)
            plan = states.plan_unlock(
                ctr, caller, max_dispatch_attempts=self.policy.max_dispatch_attempts,
                now=self._now(),
            )
            doc = self._apply(caller, ctr, hidden, plan)
        return {k: doc.get(k) for k in states.LOCK_RESPONSE_FIELDS}

    def delete_container(self, caller: Caller, uuid: str) -> dict[str, Any]:
        if not caller.is_admin:
            raise Forbidden("permission denied: only an admin may delete containers")
        with self._tx():
            ctr, _ = self._get_visible(CONTAINER, caller, uuid)
            self._conn.execute("DELETE FROM containers WHERE uuid = ?", (uuid,))
            self._conn.execute("DELETE FROM container_ports WHERE container_uuid = ?", (uuid,))
        return ctr

    def _may_see_secrets(self, caller: Caller, ctr: Mapping[str, Any]) -> bool:
        return (
            caller.token_uuid == self.policy.root_token_uuid
            or (ctr.get("locked_by_uuid") is not None and ctr["locked_by_uuid"] == caller.token_uuid)
            or caller.container_uuid == ctr["uuid"]
        )

    def container_auth(self, caller: Caller, uuid: str) -> dict[str, Any]:
        """``GET containers/{uuid}/auth``: the runtime token, to the system root or lock holder."""
        with self._tx():
            ctr, _ = self._get_visible(CONTAINER, caller, uuid)
            if not self._may_see_secrets(caller, ctr):
                raise Forbidden("permission denied: only the system root token or the lock holder may read a container's token")
            if not ctr.get("auth_uuid"):
                raise NotFound(f"container {uuid} has no runtime token (state {ctr['state']})")
            row = self._conn.execute(
                "SELECT doc, api_token FROM api_client_authorizations WHERE uuid = ?",
                (ctr["auth_uuid"],),
            ).fetchone()
        if row is None:
            raise NotFound(f"container {uuid}'s runtime token is gone")
        doc = json.loads(row[0])
        doc["api_token"] = row[1]
        return doc

    def container_secret_mounts(self, caller: Caller, uuid: str) -> dict[str, Any]:
        with self._tx():
            ctr, hidden = self._get_visible(CONTAINER, caller, uuid)
            if not self._may_see_secrets(caller, ctr):
                raise Forbidden("permission denied: only the system root token or the lock holder may read secret mounts")
        return {"secret_mounts": hidden.get("secret_mounts") or {}}

    def bulk_load(self, caller: Caller, containers: Sequence[Mapping[str, Any]]) -> list[str]:
        """Create containers and drive each to its ``state`` in ONE transaction (benchmarks,
        fixtures). Each entry is create attributes plus an optional target ``state``
        (Queued/Locked/Running/Complete/Cancelled); transitions go through the state machine."""
        path = {
            states.QUEUED: [], states.LOCKED: [states.LOCKED],
            states.RUNNING: [states.LOCKED, states.RUNNING],
            states.COMPLETE: [states.LOCKED, states.RUNNING, states.COMPLETE],
            states.CANCELLED: [states.CANCELLED],
        }
        uuids = []
        with self._tx():
            for attrs in containers:
                attrs = dict(attrs)
                target = attrs.pop("state", states.QUEUED)
                doc = self.create_container(caller, attrs)
                for step in path[target]:
                    if step == states.LOCKED:
                        self.lock_container(caller, doc["uuid"])
                    else:
                        self.update_container(caller, doc["uuid"], {"state": step})
                uuids.append(doc["uuid"])
        return uuids

    def _apply(self, caller: Caller, ctr: dict[str, Any], hidden: dict[str, Any],
               plan: states.ContainerChange) -> dict[str, Any]:
        """Write a planned container change and perform its side effects (inside a tx)."""
        old = dict(ctr)
        doc = dict(ctr)
        doc.update(plan.values)
        if plan.expire_runtime_token and ctr.get("auth_uuid"):
            self._expire_token(ctr["auth_uuid"])
        if plan.create_runtime_token and not hidden.get("runtime_token"):
            token, _ = self._create_token(
                doc.get("runtime_user_uuid") or self.policy.system_user_uuid, doc["uuid"]
            )
            doc["auth_uuid"] = token["uuid"]
        if plan.became_final:
            hidden = {k: v for k, v in hidden.items() if k not in ("secret_mounts", "runtime_token")}
        if plan.new_state == states.RUNNING and plan.old_state != states.RUNNING:
            doc["published_ports"] = self._publish_ports(doc)
        elif plan.old_state == states.RUNNING and plan.new_state != states.RUNNING:
            self._conn.execute("DELETE FROM container_ports WHERE container_uuid = ?",
                               (doc["uuid"],))
            doc["published_ports"] = states.published_ports_without_urls(
                doc.get("published_ports") or {})
        doc["modified_at"] = self._now()
        doc["modified_by_user_uuid"] = caller.user_uuid
        self._write(CONTAINER, doc, hidden, insert=False)
        self._pending.append((old, dict(doc)))
        if plan.became_final:
            self._container_finished(doc)
        elif doc["priority"] != old["priority"]:
            self._propagate_priority(doc["uuid"])
        return doc

    def _publish_ports(self, ctr: Mapping[str, Any]) -> dict[str, Any]:
        """URLs (and, port-range form, the lowest free external ports) for a container
        entering Running (tunnel.md 5.7). The single database thread makes the "lock" on
        ``container_ports`` implicit. Ports beyond an exhausted range get no assignment."""
        ports: dict[str, Any] = ctr.get("published_ports") or {}
        web = self.policy.web_services
        external: dict[str, int] = {}
        if ports and web.port_range:
            used = {row[0] for row in self._conn.execute(
                "SELECT external_port FROM container_ports WHERE external_port BETWEEN ? AND ?",
                (web.port_min, web.port_max))}
            free = (p for p in range(web.port_min, web.port_max + 1) if p not in used)
            for key in sorted(ports, key=int):
                ext = next(free, None)
                if ext is None:
                    break
                external[key] = ext
                self._conn.execute(
                    "INSERT INTO container_ports (external_port, container_port, container_uuid)"
                    " VALUES (?, ?, ?)", (ext, int(key), ctr["uuid"]))
        return states.published_port_urls(ctr["uuid"], ports, web, external)

    def _container_finished(self, ctr: Mapping[str, Any]) -> None:
        """Finalize or retry the requests of a container that reached Complete/Cancelled."""
        rows = self._conn.execute(
            "SELECT doc, hidden FROM container_requests WHERE container_uuid = ? AND state = ?",
            (ctr["uuid"], states.COMMITTED),
        ).fetchall()
        reqs = [(json.loads(d), json.loads(h)) for d, h in rows]
        retry: list[tuple[dict[str, Any], dict[str, Any]]] = []
        if ctr["state"] == states.CANCELLED:
            retry = [(cr, h) for cr, h in reqs if self._retryable(cr)]
        now = self._now()
        if retry:
            first, first_hidden = retry[0]
            attrs = {k: first.get(k) for k in states.CONTAINER_DEFINING_FIELDS}
            attrs["scheduling_parameters"] = states.merge_scheduling_parameters(
                [cr.get("scheduling_parameters") or {} for cr, _ in retry]
            )
            attrs["secret_mounts"] = first_hidden.get("secret_mounts") or {}
            new, new_hidden = self._new_container_doc(attrs, runtime_user=first["owner_uuid"])
            self._write(CONTAINER, new, new_hidden, insert=True,
                        extra={"reuse_key": reuse_key(new)})
            self._pending.append((None, dict(new)))
            for cr, h in retry:
                cr["container_uuid"] = new["uuid"]
                cr["container_count"] = int(cr.get("container_count") or 0) + 1
                cr["modified_at"] = now
                self._write(CONTAINER_REQUEST, cr, h, insert=False)
            self._update_container_priority(new["uuid"])
        retried = {cr["uuid"] for cr, _ in retry}
        for cr, h in reqs:
            if cr["uuid"] in retried:
                continue
            cr["state"] = states.FINAL
            cr["modified_at"] = now
            self._write(CONTAINER_REQUEST, cr, h, insert=False)
        # Children requested by this container are no longer wanted.
        children = self._conn.execute(
            "SELECT doc, hidden FROM container_requests WHERE requesting_container_uuid = ? "
            "AND state = ? AND priority > 0",
            (ctr["uuid"], states.COMMITTED),
        ).fetchall()
        for d, h in children:
            cr = json.loads(d)
            cr["priority"] = 0
            cr["modified_at"] = now
            self._write(CONTAINER_REQUEST, cr, json.loads(h), insert=False)
            if cr.get("container_uuid"):
                self._update_container_priority(cr["container_uuid"])

    def _retryable(self, cr: Mapping[str, Any]) -> bool:
        if int(cr.get("priority") or 0) <= 0:
            return False
        if int(cr.get("container_count") or 0) >= int(cr.get("container_count_max") or 0):
            return False
        parent = cr.get("requesting_container_uuid")
        if parent:
            loaded = self._load(CONTAINER, parent)
            if loaded is None or loaded[0]["state"] != states.RUNNING or loaded[0]["priority"] <= 0:
                return False
        return True

    def _update_container_priority(self, uuid: str, _seen: set[str] | None = None) -> None:
        """Recompute a container's priority from its active requests (1.5) and propagate."""
        loaded = self._load(CONTAINER, uuid)
        if loaded is None:
            return
        ctr, hidden = loaded
        if ctr["state"] in states.FINAL_STATES:
            return
        rows = self._conn.execute(
            "SELECT priority, created_at, requesting_container_uuid FROM container_requests "
            "WHERE container_uuid = ? AND state = ? AND priority > 0",
            (uuid, states.COMMITTED),
        ).fetchall()
        candidates = []
        for prio, created_at, parent in rows:
            if parent:
                p = self._conn.execute(
                    "SELECT priority FROM containers WHERE uuid = ?", (parent,)
                ).fetchone()
                candidates.append(p[0] if p else 0)
            else:
                candidates.append(states.request_priority(prio, _time_ms(created_at)))
        new_priority = states.container_priority(candidates)
        if new_priority == 0 and ctr["state"] == states.QUEUED:
            # Nobody wants it any more and nobody is running it: cancel it now rather than
            # leave it queued forever (its requests become Final).
            plan = states.ContainerChange(
                values={"priority": 0, "state": states.CANCELLED, "finished_at": self._now()},
                old_state=states.QUEUED, new_state=states.CANCELLED,
            )
            self._apply(self.system_caller, ctr, hidden, plan)
            return
        if new_priority != ctr["priority"]:
            old = dict(ctr)
            ctr["priority"] = new_priority
            ctr["modified_at"] = self._now()
            self._write(CONTAINER, ctr, hidden, insert=False)
            self._pending.append((old, dict(ctr)))
            self._propagate_priority(uuid, _seen)

    def _propagate_priority(self, uuid: str, _seen: set[str] | None = None) -> None:
        """Children of a container inherit its priority."""
        seen = _seen if _seen is not None else set()
        if uuid in seen:
            return
        seen.add(uuid)
        for (child,) in self._conn.execute(
            "SELECT DISTINCT container_uuid FROM container_requests WHERE "
            "requesting_container_uuid = ? AND state = ? AND container_uuid IS NOT NULL",
            (uuid, states.COMMITTED),
        ).fetchall():
            self._update_container_priority(child, seen)

    # --- container requests ---------------------------------------------------------------------

    def create_request(self, caller: Caller, attrs: Mapping[str, Any]) -> dict[str, Any]:
        unknown = set(attrs) - states.REQUEST_CLIENT_FIELDS
        if unknown:
            raise Unprocessable(f"cannot set {sorted(unknown)} on a container request")
        attrs = check_types(CONTAINER_REQUEST, attrs)
        now = self._now()
        with self._tx():
            doc = self._base_doc(CONTAINER_REQUEST, caller, now)
            doc.update(
                state=states.UNCOMMITTED, priority=self.policy.default_priority,
                container_count=0, container_count_max=self.policy.max_retry_attempts,
                use_existing=True, mounts={}, environment={}, properties={},
                output_properties={}, output_storage_classes=["default"], output_glob=[],
                scheduling_parameters={}, command=[], runtime_constraints={}, cwd=None,
                output_path=None, name="", description=None, output_name=None,
                output_ttl=0, cumulative_cost=0.0, service=False, published_ports={},
                filters=None,
            )
            hidden: dict[str, Any] = {}
            for k, v in attrs.items():
                if k in CONTAINER_REQUEST.hidden:
                    hidden[k] = v
                elif v is not None or k not in ("priority", "container_count_max", "use_existing"):
                    doc[k] = v
            if attrs.get("owner_uuid") and attrs["owner_uuid"] != caller.user_uuid:
                if not caller.is_admin:
                    raise Forbidden("permission denied: cannot create a request owned by someone else")
            if caller.container_uuid and not doc.get("requesting_container_uuid"):
                doc["requesting_container_uuid"] = caller.container_uuid
            states.check_request_transition(states.UNCOMMITTED, doc["state"])
            self._prepare_request(doc)
            self._write(CONTAINER_REQUEST, doc, hidden, insert=True)
            if doc["state"] == states.COMMITTED:
                self._request_committed(doc, hidden)
        return doc

    def _prepare_request(self, doc: dict[str, Any]) -> None:
        if not isinstance(doc.get("priority"), int) or doc["priority"] < 0:
            raise Unprocessable("priority: must be a non-negative integer")
        states.validate_service_request(doc)
        if doc["state"] == states.COMMITTED:
            doc["runtime_constraints"] = states.default_runtime_constraints(
                doc.get("runtime_constraints"), self.policy.default_keep_cache_ram
            )
            doc["scheduling_parameters"] = states.default_scheduling_parameters(
                doc.get("scheduling_parameters"), doc.get("command")
            )
            states.validate_committed_request(doc)

    def _request_committed(self, cr: dict[str, Any], hidden: Mapping[str, Any]) -> None:
        """A Committed request wants a container: find or create one, then fix priorities."""
        if cr["state"] != states.COMMITTED:
            return
        if not cr.get("container_uuid") and cr["priority"] > 0:
            attrs = {k: cr.get(k) for k in states.CONTAINER_DEFINING_FIELDS}
            ctr_uuid = None
            if cr.get("use_existing", True) and not hidden.get("secret_mounts"):
                key = reuse_key(attrs)
                row = self._conn.execute(
                    "SELECT uuid FROM containers WHERE reuse_key = ? AND state IN (?, ?, ?) "
                    "ORDER BY created_at LIMIT 1",
                    (key, states.QUEUED, states.LOCKED, states.RUNNING),
                ).fetchone()
                ctr_uuid = row[0] if row else None
            if ctr_uuid is None:
                attrs["secret_mounts"] = hidden.get("secret_mounts") or {}
                if hidden.get("runtime_token"):
                    attrs["runtime_token"] = hidden["runtime_token"]
                new, new_hidden = self._new_container_doc(attrs, runtime_user=cr["owner_uuid"])
                self._write(CONTAINER, new, new_hidden, insert=True,
                            extra={"reuse_key": reuse_key(new)})
                self._pending.append((None, dict(new)))
                ctr_uuid = new["uuid"]
            cr["container_uuid"] = ctr_uuid
            cr["container_count"] = int(cr.get("container_count") or 0) + 1
            self._write(CONTAINER_REQUEST, cr, hidden, insert=False)
        if cr.get("container_uuid"):
            self._update_container_priority(cr["container_uuid"])

    def update_request(self, caller: Caller, uuid: str, changes: Mapping[str, Any]) -> dict[str, Any]:
        changes = check_types(CONTAINER_REQUEST, changes)
        with self._tx():
            cr, hidden = self._get_visible(CONTAINER_REQUEST, caller, uuid)
            old_state = cr["state"]
            changes = {k: v for k, v in changes.items() if cr.get(k) != v or k in hidden}
            new_state = changes.get("state", old_state)
            states.check_request_transition(old_state, new_state)
            allowed = states.request_modifiable_fields(old_state)
            for name in changes:
                if name not in allowed:
                    raise Unprocessable(f"{name} cannot be modified in state '{old_state}'")
            if changes.get("priority", 0) is None:
                changes.pop("priority")
            for k, v in changes.items():
                if k in CONTAINER_REQUEST.hidden:
                    hidden[k] = v
                else:
                    cr[k] = v
            cr["modified_at"] = self._now()
            cr["modified_by_user_uuid"] = caller.user_uuid
            if old_state == states.UNCOMMITTED:
                self._prepare_request(cr)
            elif "priority" in changes:
                if not isinstance(cr["priority"], int) or cr["priority"] < 0:
                    raise Unprocessable("priority: must be a non-negative integer")
            self._write(CONTAINER_REQUEST, cr, hidden, insert=False)
            if cr["state"] == states.COMMITTED:
                self._request_committed(cr, hidden)
            elif old_state == states.COMMITTED and cr.get("container_uuid"):
                self._update_container_priority(cr["container_uuid"])
            loaded = self._load(CONTAINER_REQUEST, uuid)
        assert loaded is not None
        return loaded[0]

    def delete_request(self, caller: Caller, uuid: str) -> dict[str, Any]:
        with self._tx():
            cr, _ = self._get_visible(CONTAINER_REQUEST, caller, uuid)
            if cr["state"] != states.UNCOMMITTED:
                raise Unprocessable(
                    f"cannot delete a {cr['state']} container request; set its priority to 0 "
                    "to cancel it"
                )
            self._conn.execute("DELETE FROM container_requests WHERE uuid = ?", (uuid,))
        return cr

    # --- logs -----------------------------------------------------------------------------------

    LOG_CLIENT_FIELDS = frozenset(
        {"object_uuid", "event_type", "summary", "properties", "event_at", "object_owner_uuid",
         "owner_uuid"}
    )

    def create_log(self, caller: Caller, attrs: Mapping[str, Any]) -> dict[str, Any]:
        unknown = set(attrs) - self.LOG_CLIENT_FIELDS
        if unknown:
            raise Unprocessable(f"cannot set {sorted(unknown)} on a log")
        attrs = check_types(LOG, attrs)
        if attrs.get("owner_uuid") and attrs["owner_uuid"] != caller.user_uuid and not caller.is_admin:
            raise Forbidden("permission denied: cannot create a log owned by someone else")
        with self._tx():
            now = self._now()
            doc = self._base_doc(LOG, caller, now)
            doc.update(properties={}, event_at=now)
            doc.update({k: v for k, v in attrs.items() if v is not None})
            row = self._conn.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM logs").fetchone()
            doc["id"] = row[0]
            self._write(LOG, doc, {}, insert=True)
        return doc

    # --- links ----------------------------------------------------------------------------------

    LINK_CLIENT_FIELDS = frozenset(
        {"owner_uuid", "link_class", "name", "head_uuid", "tail_uuid", "properties"})

    def create_link(self, caller: Caller, attrs: Mapping[str, Any]) -> dict[str, Any]:
        """A link owned by the caller (an admin may give another owner). A non-admin may only
        point it at objects it can read; ``permission`` links are refused (not implemented, so
        they would grant nothing)."""
        unknown = set(attrs) - self.LINK_CLIENT_FIELDS
        if unknown:
            raise Unprocessable(f"cannot set {sorted(unknown)} on a link")
        attrs = check_types(LINK, attrs)
        if not attrs.get("link_class"):
            raise Unprocessable("link_class: a link needs a link_class")
        if attrs["link_class"] == "permission":
            raise Unprocessable("permission links are not supported by this controller")
        owner = attrs.get("owner_uuid") or caller.user_uuid
        if owner != caller.user_uuid and not caller.is_admin:
            raise Forbidden("permission denied: cannot create a link owned by someone else")
        with self._tx():
            if not caller.is_admin:
                for end in ("head_uuid", "tail_uuid"):
                    if attrs.get(end):
                        self._check_readable(caller, end, attrs[end])
            now = self._now()
            doc = self._base_doc(LINK, caller, now)
            doc.update(properties={}, name="")
            doc.update({k: v for k, v in attrs.items() if v is not None})
            doc["owner_uuid"] = owner
            self._write(LINK, doc, {}, insert=True)
        return doc

    def _check_readable(self, caller: Caller, what: str, uuid: str) -> None:
        infix = uuid[6:11] if len(uuid) == 27 else ""
        resource = next((r for r in RESOURCES.values() if r.infix == infix), None)
        try:
            if resource is None:
                raise NotFound(uuid)
            self._get_visible(resource, caller, uuid)
        except NotFound:
            raise Forbidden(f"permission denied: {what} {uuid} is not an object you can "
                            "read") from None

    def delete_link(self, caller: Caller, uuid: str) -> dict[str, Any]:
        """Delete a link: its owner or an admin."""
        with self._tx():
            link, _ = self._get_visible(LINK, caller, uuid)
            if not caller.is_admin and link["owner_uuid"] != caller.user_uuid:
                raise Forbidden("permission denied: only the link's owner or an admin may "
                                "delete it")
            self._conn.execute("DELETE FROM links WHERE uuid = ?", (uuid,))
        return link

    # Log event types written by crunch-run and dispatchers; swept after Containers.Logging.MaxAge.
    SWEPT_LOG_TYPES = ("stdout", "stderr", "crunch-run", "crunchstat", "hoststat", "arv-mount",
                       "node", "dispatch", "container")

    def sweep_logs(self, max_age_s: float) -> int:
        """Delete container log records older than ``max_age_s``; return how many."""
        cutoff = format_time(self._clock() - max_age_s)
        marks = ",".join("?" * len(self.SWEPT_LOG_TYPES))
        with self._tx():
            cur = self._conn.execute(
                f"DELETE FROM logs WHERE created_at < ? AND event_type IN ({marks})",
                (cutoff, *self.SWEPT_LOG_TYPES),
            )
        return cur.rowcount

    def create_logs(self, caller: Caller, batch: Sequence[Mapping[str, Any]]) -> int:
        """Insert several logs in one transaction (benchmarks, bulk uploads)."""
        with self._tx():
            for attrs in batch:
                self.create_log(caller, attrs)
        return len(batch)


def select_fields(doc: Mapping[str, Any], select: Sequence[str] | None) -> dict[str, Any]:
    """Apply ``select`` to one record (``kind`` always stays)."""
    if select is None:
        return dict(doc)
    out = {k: doc.get(k) for k in select}
    out.setdefault("kind", doc.get("kind"))
    return out


def reuse_key(attrs: Mapping[str, Any]) -> str:
    """Digest of the fields that make two containers "the same work" (container reuse)."""
    fields = {k: attrs.get(k) for k in states.CONTAINER_DEFINING_FIELDS}
    # runtime_constraints defaults are applied before comparing, so {} and the defaults agree.
    return hashlib.sha256(
        json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


