"""Domain objects shared by every layer: runs, their states, log entries, versions."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any


def utcnow() -> datetime:
    return datetime.now(UTC)


class RunStatus(StrEnum):
    PENDING = "pending"
    WAITING_APPROVAL = "waiting_approval"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    REJECTED = "rejected"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset(
    {RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.TIMED_OUT, RunStatus.CANCELLED, RunStatus.REJECTED}
)


@dataclass(frozen=True)
class AutomationVersion:
    name: str
    version: int
    definition: dict[str, Any]
    digest: str
    created_at: datetime


@dataclass(frozen=True)
class Run:
    id: str
    automation: str
    version: int
    status: RunStatus
    params: dict[str, Any]
    max_attempts: int
    worker_group: str
    trigger: str
    created_at: datetime
    not_before: datetime
    priority: int = 0
    attempt: int = 0
    outputs: dict[str, Any] | None = None
    exit_code: int | None = None
    error: str | None = None
    concurrency_key: str | None = None
    concurrency_limit: int | None = None
    lease_owner: str | None = None
    lease_expires_at: datetime | None = None
    cancel_requested: bool = False
    idempotency_key: str | None = None
    rerun_of: str | None = None
    log_seq: int = 0
    log_bytes: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    principal: str | None = None
    environment: str | None = None
    approval: dict[str, Any] | None = None
    callback_url: str | None = None
    watched: bool = False  # someone waited on it or followed its log (see ``Transaction.watch_run``)


@dataclass(frozen=True)
class LogChunk:
    """Output captured from one stream, not yet numbered by the store."""

    stream: str
    text: str
    at: datetime


@dataclass(frozen=True)
class LogEntry:
    seq: int
    attempt: int
    stream: str
    text: str
    at: datetime


@dataclass(frozen=True)
class Transition:
    from_status: str | None
    to_status: str
    at: datetime
    reason: str


@dataclass(frozen=True)
class AttemptRecord:
    number: int
    worker: str
    status: str
    exit_code: int | None
    error: str | None
    started_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True)
class Outcome:
    """How one attempt ended."""

    status: RunStatus
    exit_code: int | None = None
    error: str | None = None
    outputs: dict[str, Any] | None = None


@dataclass(frozen=True)
class TokenRecord:
    id: str
    name: str
    roles: list[str]
    created_by: str
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None


@dataclass(frozen=True)
class SecretInfo:
    """A secret's metadata: never its value."""

    name: str
    scope: str
    updated_by: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class Decision:
    approver: str
    decision: str  # approve | reject
    comment: str
    at: datetime
