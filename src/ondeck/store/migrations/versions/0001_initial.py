"""Initial schema: automations and versions, runs, transitions, attempts, logs, keys, slots.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from ondeck.store.tables import JSONType, UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_BIGID = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "automations",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("current_version", sa.Integer, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )
    op.create_table(
        "automation_versions",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("definition", JSONType, nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
    )
    op.create_table(
        "runs",
        sa.Column("id", sa.String(26), primary_key=True),
        sa.Column("automation", sa.String(63), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("params", JSONType, nullable=False),
        sa.Column("outputs", JSONType),
        sa.Column("exit_code", sa.Integer),
        sa.Column("error", sa.Text),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("max_attempts", sa.Integer, nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("worker_group", sa.String(63), nullable=False),
        sa.Column("not_before", UTCDateTime, nullable=False),
        sa.Column("concurrency_key", sa.Text),
        sa.Column("concurrency_limit", sa.Integer),
        sa.Column("lease_owner", sa.String(80)),
        sa.Column("lease_expires_at", UTCDateTime),
        sa.Column("cancel_requested", sa.Boolean, nullable=False),
        sa.Column("trigger", sa.String(40), nullable=False),
        sa.Column("idempotency_key", sa.Text),
        sa.Column("rerun_of", sa.String(26)),
        sa.Column("log_seq", sa.Integer, nullable=False),
        sa.Column("log_bytes", sa.BigInteger, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("started_at", UTCDateTime),
        sa.Column("finished_at", UTCDateTime),
    )
    op.create_index("ix_runs_queue", "runs", ["status", "worker_group", "priority", "id"])
    op.create_index("ix_runs_automation", "runs", ["automation", "id"])
    op.create_index("ix_runs_concurrency", "runs", ["concurrency_key", "status"])
    op.create_index("ix_runs_lease", "runs", ["status", "lease_expires_at"])
    op.create_table(
        "run_transitions",
        sa.Column("id", _BIGID, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(26), nullable=False),
        sa.Column("from_status", sa.String(20)),
        sa.Column("to_status", sa.String(20), nullable=False),
        sa.Column("at", UTCDateTime, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
    )
    op.create_index("ix_run_transitions_run_id", "run_transitions", ["run_id"])
    op.create_table(
        "attempts",
        sa.Column("run_id", sa.String(26), primary_key=True),
        sa.Column("number", sa.Integer, primary_key=True),
        sa.Column("worker", sa.String(80), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("exit_code", sa.Integer),
        sa.Column("error", sa.Text),
        sa.Column("started_at", UTCDateTime, nullable=False),
        sa.Column("finished_at", UTCDateTime),
    )
    op.create_table(
        "log_entries",
        sa.Column("run_id", sa.String(26), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("stream", sa.String(10), nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("at", UTCDateTime, nullable=False),
    )
    op.create_table(
        "idempotency_keys",
        sa.Column("scope", sa.String(200), primary_key=True),
        sa.Column("key", sa.String(255), primary_key=True),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("run_id", sa.String(26), nullable=False),
        sa.Column("expires_at", UTCDateTime, nullable=False),
    )
    op.create_index("ix_idempotency_keys_expires_at", "idempotency_keys", ["expires_at"])
    op.create_table(
        "concurrency_slots",
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("slot", sa.Integer, primary_key=True),
        sa.Column("run_id", sa.String(26), nullable=False, unique=True),
    )


def downgrade() -> None:
    for table in (
        "concurrency_slots",
        "idempotency_keys",
        "log_entries",
        "attempts",
        "run_transitions",
        "runs",
        "automation_versions",
        "automations",
    ):
        op.drop_table(table)
