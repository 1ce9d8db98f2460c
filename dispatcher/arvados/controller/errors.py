"""The embedded controller's one exception hierarchy.

Every error the API reports is an :class:`ApiError` carrying its HTTP status; the HTTP layer
turns it into ``{"errors": ["<message>"]}``. Messages never contain a token.
"""

from __future__ import annotations


class ControllerError(Exception):
    """Base class of every error raised by the embedded controller."""


class ApiError(ControllerError):
    """An error with an HTTP status, reported to the client as ``{"errors": [message]}``."""

    status = 500

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class BadRequest(ApiError):
    status = 400


class Unauthorized(ApiError):
    status = 401


class Forbidden(ApiError):
    status = 403


class NotFound(ApiError):
    status = 404


class Unprocessable(ApiError):
    """Validation failed (bad filter, forbidden state change, field not allowed ...)."""

    status = 422


class StoreError(ControllerError):
    """The database cannot be opened or migrated; the message says which file and why."""
