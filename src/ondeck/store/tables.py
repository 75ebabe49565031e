"""SQLAlchemy Core tables. Migrations in ``migrations/versions`` create them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    true,
)
from sqlalchemy.dialects.postgresql import JSONB


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in Python on every backend (SQLite stores naive text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JSONType: Any = JSON().with_variant(JSONB(), "postgresql")

metadata = MetaData()

automations = Table(
    "automations",
    metadata,
    Column("name", String(63), primary_key=True),
    Column("current_version", Integer, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

automation_versions = Table(
    "automation_versions",
    metadata,
    Column("name", String(63), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("definition", JSONType, nullable=False),
    Column("digest", String(64), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

runs = Table(
    "runs",
    metadata,
    Column("id", String(26), primary_key=True),
    Column("automation", String(63), nullable=False),
    Column("version", Integer, nullable=False),
    Column("status", String(20), nullable=False),
    Column("params", JSONType, nullable=False),
    Column("outputs", JSONType),
    Column("exit_code", Integer),
    Column("error", Text),
    Column("attempt", Integer, nullable=False, default=0),
    Column("max_attempts", Integer, nullable=False),
    Column("priority", Integer, nullable=False, default=0),
    Column("worker_group", String(63), nullable=False),
    Column("not_before", UTCDateTime, nullable=False),
    Column("concurrency_key", Text),
    Column("concurrency_limit", Integer),
    Column("lease_owner", String(80)),
    Column("lease_expires_at", UTCDateTime),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("trigger", String(40), nullable=False),
    Column("idempotency_key", Text),
    Column("rerun_of", String(26)),
    Column("log_seq", Integer, nullable=False, default=0),
    Column("log_bytes", BigInteger, nullable=False, default=0),
    Column("created_at", UTCDateTime, nullable=False),
    Column("started_at", UTCDateTime),
    Column("finished_at", UTCDateTime),
    Column("principal", String(100)),
    Column("environment", String(63)),
    Column("approval", JSONType),
    Column("callback_url", Text),
    # Whether anyone waited on the run or followed its log: only then are its changes
    # announced (see ``Transaction.watch_run``).
    Column("watched", Boolean, nullable=False, default=False, server_default=true()),
    Index("ix_runs_automation", "automation", "id"),
    Index("ix_runs_concurrency", "concurrency_key", "status"),
    Index("ix_runs_lease", "status", "lease_expires_at"),
)
# In claim order (the queue's ORDER BY priority DESC, id): a claim reads only the runs it
# takes, where an ascending priority made it sort every queued run of its group first.
Index("ix_runs_queue", runs.c.status, runs.c.worker_group, runs.c.priority.desc(), runs.c.id)

run_transitions = Table(
    "run_transitions",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("run_id", String(26), nullable=False, index=True),
    Column("from_status", String(20)),
    Column("to_status", String(20), nullable=False),
    Column("at", UTCDateTime, nullable=False),
    Column("reason", Text, nullable=False),
)

attempts = Table(
    "attempts",
    metadata,
    Column("run_id", String(26), primary_key=True),
    Column("number", Integer, primary_key=True),
    Column("worker", String(80), nullable=False),
    Column("status", String(20), nullable=False),
    Column("exit_code", Integer),
    Column("error", Text),
    Column("started_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime),
)

log_entries = Table(
    "log_entries",
    metadata,
    Column("run_id", String(26), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("attempt", Integer, nullable=False),
    Column("stream", String(10), nullable=False),
    Column("text", Text, nullable=False),
    Column("at", UTCDateTime, nullable=False),
)

idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("scope", String(200), primary_key=True),
    Column("key", String(255), primary_key=True),
    Column("fingerprint", String(64), nullable=False),
    Column("run_id", String(26), nullable=False),
    Column("expires_at", UTCDateTime, nullable=False, index=True),
)

concurrency_slots = Table(
    "concurrency_slots",
    metadata,
    Column("key", Text, primary_key=True),
    Column("slot", Integer, primary_key=True),
    Column("run_id", String(26), nullable=False, unique=True),
)

tokens = Table(
    "tokens",
    metadata,
    Column("id", String(26), primary_key=True),
    Column("name", String(100), nullable=False, unique=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("roles", JSONType, nullable=False),
    Column("created_by", String(100), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime),
    Column("last_used_at", UTCDateTime),
    Column("revoked_at", UTCDateTime),
)

secrets = Table(
    "secrets",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("scope", String(200), primary_key=True),
    Column("ciphertext", Text, nullable=False),
    Column("updated_by", String(100), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

audit_entries = Table(
    "audit_entries",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("at", UTCDateTime, nullable=False),
    Column("actor", String(100), nullable=False),
    Column("action", String(60), nullable=False),
    Column("target", String(200), nullable=False),
    Column("detail", Text, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    Index("ix_audit_action", "action", "id"),
)

approval_decisions = Table(
    "approval_decisions",
    metadata,
    Column("run_id", String(26), primary_key=True),
    Column("approver", String(100), primary_key=True),
    Column("decision", String(10), nullable=False),
    Column("comment", Text, nullable=False),
    Column("at", UTCDateTime, nullable=False),
)

environments = Table(
    "environments",
    metadata,
    Column("name", String(63), primary_key=True),
    Column("definition", JSONType, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

rate_counters = Table(
    "rate_counters",
    metadata,
    Column("key", String(300), primary_key=True),
    Column("window", BigInteger, primary_key=True),
    Column("count", Integer, nullable=False),
)

circuit_breakers = Table(
    "circuit_breakers",
    metadata,
    Column("automation", String(63), primary_key=True),
    Column("state", String(10), nullable=False),
    Column("opened_until", UTCDateTime),
    Column("closed_at", UTCDateTime, nullable=False),
    Column("trial_run_id", String(26)),
)

schedules = Table(
    "schedules",
    metadata,
    Column("key", String(200), primary_key=True),
    Column("automation", String(63), nullable=False),
    Column("paused", Boolean, nullable=False),
    Column("first_seen", UTCDateTime, nullable=False),
)

schedule_fires = Table(
    "schedule_fires",
    metadata,
    Column("schedule_key", String(200), primary_key=True),
    Column("fire_at", UTCDateTime, primary_key=True),
    Column("run_id", String(26)),
)

deliveries = Table(
    "deliveries",
    metadata,
    Column("id", String(26), primary_key=True),
    Column("run_id", String(26), nullable=False, index=True),
    Column("url", Text, nullable=False),
    Column("kind", String(20), nullable=False),
    Column("payload", JSONType, nullable=False),
    Column("status", String(12), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", UTCDateTime, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("delivered_at", UTCDateTime),
    Column("last_error", Text),
    Index("ix_deliveries_due", "status", "next_attempt_at"),
)

delivery_attempts = Table(
    "delivery_attempts",
    metadata,
    Column("delivery_id", String(26), primary_key=True),
    Column("number", Integer, primary_key=True),
    Column("at", UTCDateTime, nullable=False),
    Column("status_code", Integer),
    Column("error", Text),
    Column("duration_ms", Integer, nullable=False),
)
