"""The one exception hierarchy of the tunnel package."""

from __future__ import annotations


class TunnelError(Exception):
    """Base class of every error the tunnel package raises on purpose.

    ``status`` is the HTTP status the broker answers with when the error reaches a client.
    Messages are written for the user and never contain tokens or secrets.
    """

    status = 500

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
