"""Domain exceptions raised by fleet; the HTTP layer maps each to one status code.

Suggested mapping (service/): NotFound → 404, Conflict (and subclasses) → 409, InvalidRequest → 400,
PayloadTooLarge → 413, QuotaExceeded → 429 with Retry-After; FencedOut, CancelRequested and PauseWithdrawn
are internal to workers (never reach a client).
Every exception carries `message`, `param` (the request field at fault, or None) and `code`
(a short machine-readable string), matching OpenAI's error object `{message, type, param, code}`.
"""

from __future__ import annotations

__all__ = [
    "FleetError",
    "NotFound",
    "Conflict",
    "IdempotencyConflict",
    "InvalidState",
    "CancelRequested",
    "PauseWithdrawn",
    "InvalidRequest",
    "PayloadTooLarge",
    "FencedOut",
    "QuotaExceeded",
]


class FleetError(Exception):
    """Base of every fleet domain error."""

    default_code = "fleet_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code


class NotFound(FleetError):
    """The object does not exist, or belongs to another tenant (indistinguishable on purpose)."""

    default_code = "not_found"


class Conflict(FleetError):
    """The request conflicts with the current state of an object."""

    default_code = "conflict"


class IdempotencyConflict(Conflict):
    """An Idempotency-Key was reused with a different request body."""

    default_code = "idempotency_key_reused"


class InvalidState(Conflict):
    """The transition is not allowed from the object's current state (e.g. cancel a finished job)."""

    default_code = "invalid_state"


class CancelRequested(Conflict):
    """A worker tried to publish or succeed a job whose cancel request is pending.

    Nothing was changed; the worker should finish the job as cancelled instead.
    """

    default_code = "cancel_requested"


class PauseWithdrawn(Conflict):
    """A worker tried to end a job paused, but the tenant resumed it before the worker stopped.

    Nothing was changed; the worker should hand the job back (finish it queued), and the next attempt
    resumes from the checkpoint the pause saved.
    """

    default_code = "pause_withdrawn"


class InvalidRequest(FleetError):
    """The caller sent something invalid; `param` names the field at fault."""

    default_code = "invalid_request"


class PayloadTooLarge(InvalidRequest):
    """An upload exceeded the configured size limit."""

    default_code = "payload_too_large"


class FencedOut(FleetError):
    """A worker acted with a stale attempt number: another attempt owns the job now.

    The worker must stop working on the job and must not publish anything.
    """

    default_code = "fenced_out"


class QuotaExceeded(FleetError):
    """A submission over one of the tenant's limits (`limit` names the TenantQuota field).

    Nothing was created; the caller may retry after `retry_after_s` seconds (HTTP 429 + Retry-After).
    """

    default_code = "quota_exceeded"

    def __init__(self, message: str, *, limit: str, retry_after_s: int, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.limit = limit
        self.retry_after_s = retry_after_s
