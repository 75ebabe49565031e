"""One exception hierarchy for the whole product.

Every error carries a stable ``code`` (part of the API contract: it becomes the
problem+json ``type``) and an HTTP ``status``. The API maps them to
problem+json once; the CLI maps them to exit codes once.
"""

from __future__ import annotations

from typing import Any


class OndeckError(Exception):
    code = "error"
    status = 500
    title = "Internal error"

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None, **extensions: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}
        self.extensions = extensions


class Unauthenticated(OndeckError):
    code = "unauthenticated"
    status = 401
    title = "Authentication required"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": 'Bearer realm="ondeck"'})


class Forbidden(OndeckError):
    code = "forbidden"
    status = 403
    title = "Forbidden"


class RateLimited(OndeckError):
    code = "rate-limited"
    status = 429
    title = "Too many requests"

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after)}, retry_after=retry_after)


class CircuitOpen(OndeckError):
    code = "circuit-open"
    status = 503
    title = "Circuit breaker open"

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after)}, retry_after=retry_after)


class InvalidRequest(OndeckError):
    code = "invalid-request"
    status = 400
    title = "Invalid request"


class NotFound(OndeckError):
    code = "not-found"
    status = 404
    title = "Not found"


class PayloadTooLarge(OndeckError):
    code = "payload-too-large"
    status = 413
    title = "Payload too large"


class UnsupportedMediaType(OndeckError):
    code = "unsupported-media-type"
    status = 415
    title = "Unsupported media type"


class Conflict(OndeckError):
    code = "conflict"
    status = 409
    title = "Conflict"


class InvalidDefinition(OndeckError):
    """An automation definition is malformed; ``errors`` names file and field."""

    code = "invalid-definition"
    status = 422
    title = "Invalid automation definition"


class UnloadableDefinition(Conflict):
    """A stored version this release's spec refuses: it was applied under a looser
    check. Runs of it cannot start until a corrected definition is applied."""

    code = "unloadable-definition"
    title = "Stored automation definition no longer loads"


class InvalidParams(OndeckError):
    """Params fail the automation's schema; ``errors`` lists the failing paths."""

    code = "invalid-params"
    status = 422
    title = "Invalid parameters"


class IdempotencyMismatch(OndeckError):
    code = "idempotency-key-reused"
    status = 422
    title = "Idempotency key reused with different parameters"


class ConcurrencyRejected(OndeckError):
    code = "concurrency-limit"
    status = 409
    title = "Concurrency limit reached"


class IllegalTransition(OndeckError):
    code = "illegal-transition"
    status = 409
    title = "Illegal run state transition"


class StoreUnavailable(OndeckError):
    """The database cannot be reached, or stays busy, for now: answered with a
    ``Retry-After``, as such outages are mostly short (a restart, a failover)."""

    code = "store-unavailable"
    status = 503
    title = "Store unavailable"
    retry_after = 1

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"Retry-After": str(self.retry_after)}, retry_after=self.retry_after)
