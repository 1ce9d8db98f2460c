"""The exception hierarchy of ``dispatcher.cloud`` (drivers, SSH executor, pool, scheduler).

Drivers translate their SDK's errors into these classes at the boundary, so that the pool can
apply the reference's back-off rules (reference 5.6.1) without knowing which cloud it talks to:

* :class:`RateLimitError` — the provider asks us to slow down; carries the earliest retry time.
* :class:`QuotaError` — the account cannot have more instances (of any type) right now.
* :class:`CapacityError` — the provider has no capacity for this type (``instance_type_specific``)
  or for this quota group (``quota_group_specific``), or for anything (neither).
"""

from __future__ import annotations


class CloudError(Exception):
    """Base class of every error raised by ``dispatcher.cloud``."""


class DriverError(CloudError):
    """A cloud API call failed for a reason that needs no special back-off."""


class RateLimitError(DriverError):
    """The provider throttled us: do not call it again before ``earliest_retry`` (epoch s)."""

    def __init__(self, message: str, earliest_retry: float) -> None:
        super().__init__(message)
        self.earliest_retry = earliest_retry


class QuotaError(DriverError):
    """The account is at its instance quota: no new instance of any type can be created."""


class CapacityError(DriverError):
    """The provider lacks capacity; see the flags for which creates are affected."""

    def __init__(
        self,
        message: str,
        *,
        instance_type_specific: bool = False,
        quota_group_specific: bool = False,
    ) -> None:
        super().__init__(message)
        self.instance_type_specific = instance_type_specific
        self.quota_group_specific = quota_group_specific


class NotImplementedByDriver(DriverError):
    """The driver has no mechanism for this operation (e.g. host-key verification on EC2)."""


class ConfigurationError(CloudError):
    """The cloud dispatcher's configuration is unusable; the message names the key to fix."""


class ExecError(CloudError):
    """A remote command could not be run, failed, or timed out.

    ``exit_status`` is the remote command's exit status, or None if it did not run to the end
    (connection failure, timeout). ``stdout``/``stderr`` hold whatever was captured.
    """

    def __init__(
        self,
        message: str,
        *,
        exit_status: int | None = None,
        stdout: bytes = b"",
        stderr: bytes = b"",
        connect_failed: bool = False,
        timed_out: bool = False,
    ) -> None:
        super().__init__(message)
        self.exit_status = exit_status
        self.stdout = stdout
        self.stderr = stderr
        self.connect_failed = connect_failed
        self.timed_out = timed_out


class HostKeyError(ExecError):
    """The target's identity could not be verified (wrong instance secret, driver refused)."""


class PoolError(CloudError):
    """A pool operation was refused (unknown instance, wrong state)."""


class NotFoundError(PoolError):
    """The named instance or container is not known to the pool."""
