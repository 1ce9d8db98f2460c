"""Exceptions raised by the Arvados API client (:mod:`dispatcher.arvados.client`).

One hierarchy: everything the client raises on purpose is an :class:`ArvadosError`. HTTP-level
failures are :class:`ApiError` carrying the status, the server's ``errors`` list, the method and
the path (never the token, never the query string, which may carry filters but no secrets).
"""

from __future__ import annotations

from collections.abc import Sequence

from dispatcher.logs import redact


class ArvadosError(Exception):
    """Base class of every error raised by the API client."""


class ApiError(ArvadosError):
    """The API server answered with an error status (or could not be reached, see subclasses).

    ``status`` is the HTTP status (0 when no response was received), ``errors`` the list from the
    server's ``{"errors": [...]}`` body (or a short excerpt of a non-JSON body).
    """

    def __init__(self, status: int, errors: Sequence[str], method: str, path: str) -> None:
        self.status = status
        self.errors = [redact(str(e)) for e in errors]
        self.method = method
        self.path = path
        detail = "; ".join(self.errors) or "(no error message)"
        where = f"{method} {path}"
        if status:
            msg = f"{where}: HTTP {status}: {detail}"
        else:
            msg = f"{where}: {detail}"
        super().__init__(redact(msg + self._hint()))

    def _hint(self) -> str:
        return ""


class NotFound(ApiError):
    """HTTP 404: the object does not exist (or is not visible to this token)."""


class Forbidden(ApiError):
    """HTTP 401/403: the token is wrong, expired, or lacks permission."""

    def _hint(self) -> str:
        return " (check ARVADOS_API_TOKEN / SystemRootToken and the token's scopes)"


class Unprocessable(ApiError):
    """HTTP 422: the server refused the change (e.g. "cannot lock when Locked")."""


class ApiUnavailable(ApiError):
    """The server could not be reached, or kept failing with 5xx/429, after all retries."""

    def _hint(self) -> str:
        return " (is the controller running and ARVADOS_API_HOST right? retry later)"


def error_for_status(status: int, errors: Sequence[str], method: str, path: str) -> ApiError:
    """The :class:`ApiError` subclass that fits ``status``."""
    if status == 404:
        return NotFound(status, errors, method, path)
    if status in (401, 403):
        return Forbidden(status, errors, method, path)
    if status == 422:
        return Unprocessable(status, errors, method, path)
    return ApiError(status, errors, method, path)
