"""Async client for the Arvados controller API (``/arvados/v1/...``), on aiohttp.

Wire format is the one of Arvados' legacy Go client (``arvadosclient``), which the HPC
dispatchers use (reference ``dispatch.md`` 2.1):

* GET parameters go in the query string; every other method sends parameters and the resource
  body as ``application/x-www-form-urlencoded`` fields.
* A string value is sent raw; anything else (lists, objects, numbers, booleans) is JSON.
  ``None`` means "not given" and is left out.
* A resource body is one form field named after the singular resource, holding JSON:
  ``container={"state":"Cancelled"}``.
* Every call carries ``Authorization: Bearer <token>`` and ``X-Request-Id: req-<20 alnum>``
  (the same id for all attempts of one call, so server logs tie retries together).

Retries (improving on the reference, which retries for up to 25 minutes):

* *Idempotent* calls — GET, PUT/PATCH (update), DELETE, and :meth:`ArvadosClient.create_log`
  (a duplicated log line is better than a lost one) — are retried on transport errors, timeouts,
  HTTP 429 and 5xx except 501, with jittered exponential backoff (``retry_min_s`` doubling up to
  ``retry_max_s``, each delay drawn from [50%, 100%] of that), honouring ``Retry-After``, at most
  ``retries`` times. 4xx answers are never retried.
* Non-idempotent calls (POST create, lock, unlock) are retried only when the connection could
  not be established at all (the server cannot have seen the request).
* :meth:`ArvadosClient.lock` / :meth:`ArvadosClient.unlock` handle a *lost* answer (timeout,
  reset, 5xx after the request was sent) by reading the container back: if it is now locked by
  this client's token (lock) or no longer locked by it (unlock), the call succeeded and the
  container is returned; if nothing changed, the call is repeated; otherwise it fails as the
  server would have (:class:`Unprocessable`). So a lock that succeeded server-side is never
  reported as an error, and never silently repeated on top of someone else's lock.

The token never appears in an exception message, ``repr`` or log line: it is registered with
:func:`dispatcher.logs.register_secret` and only ever placed in the Authorization header.
"""

from __future__ import annotations

import asyncio
import builtins
import email.utils
import json
import logging
import os
import random
import ssl
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp

from dispatcher.arvados.errors import (
    ApiError,
    ApiUnavailable,
    ArvadosError,
    Forbidden,
    NotFound,
    Unprocessable,
    error_for_status,
)
from dispatcher.arvados.ids import UUID_RE, random_alnum
from dispatcher.logs import redact, register_secret

if TYPE_CHECKING:
    from dispatcher.config import ClusterConfig

__all__ = [
    "ApiError",
    "ApiUnavailable",
    "ArvadosClient",
    "ArvadosError",
    "Forbidden",
    "NotFound",
    "Unprocessable",
    "encode_params",
    "new_request_id",
]

log = logging.getLogger("crunchgate.arvados.client")

API_PREFIX = "/arvados/v1/"
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "PATCH", "DELETE", "OPTIONS"})
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
def new_request_id() -> str:
    """``req-`` followed by 20 random lowercase alphanumerics, as Arvados clients send."""
    return "req-" + random_alnum(20)


def encode_value(value: Any) -> str:
    """One parameter value: strings raw, everything else compact JSON (legacy client rule)."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def encode_params(params: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """Parameters as (name, text) pairs for a query string or a form body; ``None`` omitted."""
    if not params:
        return []
    return [(k, encode_value(v)) for k, v in params.items() if v is not None]


def singular(resource: str) -> str:
    """The form-field name of a resource body: ``containers`` -> ``container``."""
    return resource[:-1] if resource.endswith("s") else resource


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    delta = when.timestamp() - (time.time() if now is None else now)
    return max(0.0, delta)


def is_retryable_status(status: int) -> bool:
    """Statuses worth another attempt: 429 and 5xx except 501 (as the reference client)."""
    return status == 429 or (500 <= status < 600 and status != 501)


class _Lost(Exception):
    """Internal: the request may have reached the server but no usable answer came back."""

    def __init__(self, error: ApiUnavailable, sent: bool, retry_after: float | None = None):
        super().__init__(str(error))
        self.error = error
        self.sent = sent
        self.retry_after = retry_after


class ArvadosClient:
    """One connection pool to one Arvados API server, authenticated with one token.

    Use as ``async with ArvadosClient(host, token) as c:`` or call :meth:`close` when done.
    ``api_host`` is ``host:port`` (HTTPS) or a URL (``http://`` is honoured, for tests and the
    plain-HTTP embedded controller). TLS certificates are verified unless ``insecure``;
    ``ca_file`` adds a trusted CA bundle.
    """

    def __init__(
        self,
        api_host: str,
        token: str,
        *,
        insecure: bool = False,
        ca_file: str | None = None,
        timeout_s: float = 300,
        retries: int = 8,
        retry_min_s: float = 1.0,
        retry_max_s: float = 60.0,
    ) -> None:
        if not api_host:
            raise ArvadosError("no API host given: set ARVADOS_API_HOST or Services.Controller")
        if not token:
            raise ArvadosError("no API token given: set ARVADOS_API_TOKEN or SystemRootToken")
        register_secret(token)
        self.base_url = _base_url(api_host)
        self._token = token
        self.insecure = insecure
        self.ca_file = ca_file
        self.timeout_s = timeout_s
        self.retries = max(0, retries)
        self.retry_min_s = retry_min_s
        self.retry_max_s = max(retry_min_s, retry_max_s)
        self._session: aiohttp.ClientSession | None = None
        self._token_uuid: str | None = None

    # --- construction ---------------------------------------------------------------------

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **kwargs: Any) -> ArvadosClient:
        """Client from ``ARVADOS_API_HOST``, ``ARVADOS_API_TOKEN``, ``ARVADOS_API_HOST_INSECURE``."""
        env = os.environ if environ is None else environ
        host = env.get("ARVADOS_API_HOST", "")
        token = env.get("ARVADOS_API_TOKEN", "")
        if not host or not token:
            missing = [n for n, v in (("ARVADOS_API_HOST", host), ("ARVADOS_API_TOKEN", token))
                       if not v]
            raise ArvadosError(f"{' and '.join(missing)} not set in the environment")
        insecure = env.get("ARVADOS_API_HOST_INSECURE", "").strip().lower() in TRUE_WORDS
        kwargs.setdefault("insecure", insecure)
        return cls(host, token, **kwargs)

    @classmethod
    def from_config(cls, cfg: ClusterConfig, **kwargs: Any) -> ArvadosClient:
        """Client for the cluster's controller, authenticated with ``SystemRootToken``."""
        from dispatcher import config as config_mod

        url_of = getattr(config_mod, "controller_url", None)
        url = url_of(cfg) if url_of is not None else cfg.services.controller.external_url
        if not url:
            raise ArvadosError(
                "no controller URL in the config: set Services.Controller.ExternalURL"
            )
        kwargs.setdefault("insecure", cfg.tls.insecure)
        return cls(url, cfg.system_root_token, **kwargs)

    def __repr__(self) -> str:
        return f"ArvadosClient({self.base_url!r})"

    async def __aenter__(self) -> ArvadosClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection pool. The client can not be used afterwards."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            sslarg: ssl.SSLContext | bool
            if self.insecure:
                sslarg = False
            elif self.ca_file:
                sslarg = ssl.create_default_context(cafile=self.ca_file)
            else:
                sslarg = True
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=sslarg),
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                headers={"Authorization": f"Bearer {self._token}"},
            )
        return self._session

    # --- the one request loop --------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Mapping[str, Any] | None = None,
        idempotent: bool | None = None,
    ) -> dict[str, Any]:
        """Call ``method path`` and return the decoded JSON object.

        ``path`` is relative to ``/arvados/v1/`` unless it starts with ``/``. ``params`` and
        ``body`` are both encoded with :func:`encode_params`; for GET they go in the query string,
        otherwise in a form body. ``idempotent`` defaults from the method (see module doc).
        """
        method = method.upper()
        if idempotent is None:
            idempotent = method in IDEMPOTENT_METHODS
        request_id = new_request_id()
        attempt = 0
        while True:
            try:
                return await self._attempt(method, path, params, body, request_id)
            except _Lost as lost:
                if attempt >= self.retries or (lost.sent and not idempotent):
                    raise lost.error from None
                delay = self._backoff(attempt, lost.retry_after)
                log.warning(
                    "API call failed, retrying in %.1fs (attempt %d/%d): %s",
                    delay, attempt + 1, self.retries, lost.error,
                    extra={"request_id": request_id},
                )
                attempt += 1
                await asyncio.sleep(delay)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        base = min(self.retry_max_s, self.retry_min_s * (2**attempt))
        delay = base * random.uniform(0.5, 1.0)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.retry_max_s))
        return delay

    def _url(self, path: str) -> tuple[str, str]:
        shown = path if path.startswith("/") else API_PREFIX + path
        return self.base_url + shown, shown

    async def _attempt(
        self,
        method: str,
        path: str,
        params: Mapping[str, Any] | None,
        body: Mapping[str, Any] | None,
        request_id: str,
    ) -> dict[str, Any]:
        url, shown = self._url(path)
        fields = encode_params(params) + encode_params(body)
        # No redirects: the API never sends one, and following it could carry the token away.
        kwargs: dict[str, Any] = {"headers": {"X-Request-Id": request_id},
                                  "allow_redirects": False}
        if method in ("GET", "HEAD"):
            kwargs["params"] = fields
        elif fields:
            kwargs["data"] = fields
        session = self._get_session()
        try:
            async with session.request(method, url, **kwargs) as resp:
                status = resp.status
                raw = await resp.read()
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
        except aiohttp.ClientConnectorCertificateError as exc:
            # A certificate problem does not go away by retrying (reference: not retried).
            raise ApiUnavailable(
                0,
                [f"TLS certificate verification failed ({exc.certificate_error}); "
                 "set ARVADOS_API_HOST_INSECURE=1 or give a CA file if the server is trusted"],
                method, shown,
            ) from None
        except aiohttp.ClientConnectorError as exc:
            # The connection was never established: the server cannot have seen the request.
            raise _Lost(
                ApiUnavailable(0, [f"cannot connect to {self.base_url}: {exc.strerror or exc}"],
                               method, shown),
                sent=False,
            ) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            what = "timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
            raise _Lost(
                ApiUnavailable(0, [f"no answer from {self.base_url} ({what})"], method, shown),
                sent=True,
            ) from None
        if 200 <= status < 300:
            return _decode_object(raw, status, method, shown)
        errors = _error_list(raw)
        if is_retryable_status(status):
            raise _Lost(ApiUnavailable(status, errors, method, shown), sent=True,
                        retry_after=retry_after)
        raise error_for_status(status, errors, method, shown)

    # --- generic resource calls ----------------------------------------------------------------

    async def list(
        self,
        resource: str,
        *,
        filters: Sequence[Any] | None = None,
        order: Sequence[str] | str | None = None,
        select: Sequence[str] | None = None,
        limit: int | None = None,
        offset: int | None = None,
        count: str | None = None,
    ) -> dict[str, Any]:
        """One list call; returns the raw response (``items``, ``items_available``, ...)."""
        params = {
            "filters": list(filters) if filters is not None else None,
            "order": order if order is None or isinstance(order, str) else list(order),
            "select": list(select) if select is not None else None,
            "limit": limit,
            "offset": offset,
            "count": count,
        }
        return await self.request("GET", resource, params=params)

    async def list_all(
        self,
        resource: str,
        *,
        filters: Sequence[Any],
        order: Sequence[str] | str | None = None,
        select: Sequence[str] | None = None,
        page_size: int = 1000,
    ) -> builtins.list[dict[str, Any]]:
        """Every matching item, paged as the HPC dispatch loop does (reference 2.3).

        First ``count=exact&limit=0`` gives N; then ``count=none&limit=page_size&offset=k``
        pages until a page is empty or offset >= N. Items whose uuid was already seen (the list
        shifted between pages) are dropped. Any failed page fails the whole call: a partial list
        must never be mistaken for the full one.
        """
        if page_size < 1:
            raise ValueError("page_size must be >= 1")
        first = await self.list(resource, filters=filters, order=order, select=select,
                                limit=0, count="exact")
        total = int(first.get("items_available") or 0)
        items: list[dict[str, Any]] = []
        seen: set[str] = set()
        offset = 0
        while offset < total:
            page = await self.list(resource, filters=filters, order=order, select=select,
                                   limit=page_size, offset=offset, count="none")
            got = page.get("items") or []
            if not got:
                break
            for item in got:
                uuid = item.get("uuid") if isinstance(item, dict) else None
                if uuid is not None:
                    if uuid in seen:
                        continue
                    seen.add(uuid)
                items.append(item)
            offset += len(got)
        return items

    async def get(
        self, resource: str, uuid: str, *, select: Sequence[str] | None = None
    ) -> dict[str, Any]:
        """``GET resource/uuid``. A malformed uuid is refused without a request."""
        _check_uuid(uuid)
        params = {"select": list(select)} if select is not None else None
        return await self.request("GET", f"{resource}/{uuid}", params=params)

    async def create(
        self, resource: str, attrs: Mapping[str, Any], *, idempotent: bool = False
    ) -> dict[str, Any]:
        """``POST resource`` with ``<singular>=<JSON attrs>``. Not retried once sent."""
        return await self.request("POST", resource, body={singular(resource): dict(attrs)},
                                  idempotent=idempotent)

    async def update(self, resource: str, uuid: str, attrs: Mapping[str, Any]) -> dict[str, Any]:
        """``PUT resource/uuid`` with ``<singular>=<JSON attrs>`` (idempotent: retried)."""
        _check_uuid(uuid)
        return await self.request("PUT", f"{resource}/{uuid}",
                                  body={singular(resource): dict(attrs)})

    # --- containers and tokens ------------------------------------------------------------------

    async def current_token(self) -> dict[str, Any]:
        """``GET api_client_authorizations/current``: the token record (its ``uuid`` is "me")."""
        rec = await self.request("GET", "api_client_authorizations/current")
        if rec.get("uuid"):
            self._token_uuid = str(rec["uuid"])
        return rec

    async def token_uuid(self) -> str:
        """This client's token UUID (cached after the first call)."""
        if self._token_uuid is None:
            await self.current_token()
        if not self._token_uuid:
            raise ArvadosError("the API server did not return a uuid for the current token")
        return self._token_uuid

    async def container_auth(self, uuid: str) -> dict[str, Any]:
        """``GET containers/{uuid}/auth``: the container's runtime token record."""
        _check_uuid(uuid)
        rec = await self.request("GET", f"containers/{uuid}/auth")
        register_secret(rec.get("api_token"))
        return rec

    async def lock(self, uuid: str) -> dict[str, Any]:
        """``POST containers/{uuid}/lock``; a lost answer is resolved by reading back (module doc)."""
        return await self._lock_call(uuid, "lock")

    async def unlock(self, uuid: str) -> dict[str, Any]:
        """``POST containers/{uuid}/unlock``; a lost answer is resolved by reading back."""
        return await self._lock_call(uuid, "unlock")

    async def _lock_call(self, uuid: str, action: str) -> dict[str, Any]:
        _check_uuid(uuid)
        path = f"containers/{uuid}/{action}"
        lost: ApiUnavailable | None = None
        for attempt in range(self.retries + 1):
            try:
                return await self.request("POST", path, idempotent=False)
            except ApiUnavailable as exc:
                lost = exc
            # We do not know whether the server applied it: look, rather than guess.
            await asyncio.sleep(self._backoff(attempt, None))
            ctr = await self.get("containers", uuid,
                                 select=["uuid", "state", "priority", "locked_by_uuid", "auth_uuid"])
            me = await self.token_uuid()
            mine = ctr.get("locked_by_uuid") == me
            state = ctr.get("state")
            if action == "lock":
                if mine and state in ("Locked", "Running"):
                    log.info("lock answer was lost but the container is locked by us: %s", lost,
                             extra={"container_uuid": uuid})
                    return ctr
                if state == "Queued" and not ctr.get("locked_by_uuid"):
                    continue
                raise Unprocessable(422, [f"cannot lock when {state} (after a lost answer: "
                                          f"{'; '.join(lost.errors)})"], "POST", lost.path)
            if not mine or state != "Locked":
                log.info("unlock answer was lost but the container is no longer locked by us: %s",
                         lost, extra={"container_uuid": uuid})
                return ctr
        assert lost is not None
        raise lost

    async def create_log(
        self,
        object_uuid: str,
        event_type: str,
        text: str | None = None,
        properties: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Create a ``logs`` record; ``text`` goes to ``properties.text``.

        Retried like an idempotent call: losing a container's log tail is worse than a rare
        duplicate record after a lost answer.
        """
        props = dict(properties or {})
        if text is not None:
            props["text"] = text
        return await self.create(
            "logs",
            {"object_uuid": object_uuid, "event_type": event_type, "properties": props},
            idempotent=True,
        )


# --- helpers ------------------------------------------------------------------------------------


def _base_url(api_host: str) -> str:
    """``https://host:port`` from ``host:port`` or a URL (path ignored; http kept if given)."""
    text = api_host.strip()
    if "://" not in text:
        text = "https://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ArvadosError(f"bad API host {api_host!r}: want host:port or https://host:port/")
    return f"{parts.scheme}://{parts.netloc}"


def _check_uuid(uuid: str) -> None:
    # Also keeps "/", "?" and ".." out of the URL path.
    if not isinstance(uuid, str) or not UUID_RE.match(uuid):
        raise ArvadosError(f"not an Arvados UUID: {uuid!r}")


def _decode_object(raw: bytes, status: int, method: str, path: str) -> dict[str, Any]:
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        raise ApiError(status, [f"response is not JSON: {_excerpt(raw)}"], method, path) from None
    if not isinstance(data, dict):
        raise ApiError(status, ["response is not a JSON object"], method, path)
    return data


def _error_list(raw: bytes) -> list[str]:
    """The ``errors`` array of an Arvados error body, or an excerpt of whatever came back."""
    try:
        data = json.loads(raw)
    except ValueError:
        return [_excerpt(raw)] if raw.strip() else []
    if isinstance(data, dict):
        errs = data.get("errors")
        if isinstance(errs, list):
            return [str(e) for e in errs]
        if isinstance(errs, str):
            return [errs]
        if "error" in data:
            return [str(data["error"])]
    return [_excerpt(raw)]


def _excerpt(raw: bytes, limit: int = 200) -> str:
    text = raw.decode("utf-8", errors="replace").strip()
    if len(text) > limit:
        text = text[:limit] + "..."
    return redact(text)
