"""Triggers: schedules and their fires, the delivery outbox, callback URLs on runs.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from ondeck.store.tables import JSONType, UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("callback_url", sa.Text))
    op.create_table(
        "schedules",
        sa.Column("key", sa.String(200), primary_key=True),
        sa.Column("automation", sa.String(63), nullable=False),
        sa.Column("paused", sa.Boolean, nullable=False),
        sa.Column("first_seen", UTCDateTime, nullable=False),
    )
    op.create_table(
        "schedule_fires",
        sa.Column("schedule_key", sa.String(200), primary_key=True),
        sa.Column("fire_at", UTCDateTime, primary_key=True),
        sa.Column("run_id", sa.String(26)),
    )
    op.create_table(
        "deliveries",
        sa.Column("id", sa.String(26), primary_key=True),
        sa.Column("run_id", sa.String(26), nullable=False),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("payload", JSONType, nullable=False),
        sa.Column("status", sa.String(12), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", UTCDateTime, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("delivered_at", UTCDateTime),
        sa.Column("last_error", sa.Text),
    )
    op.create_index("ix_deliveries_run_id", "deliveries", ["run_id"])
    op.create_index("ix_deliveries_due", "deliveries", ["status", "next_attempt_at"])
    op.create_table(
        "delivery_attempts",
        sa.Column("delivery_id", sa.String(26), primary_key=True),
        sa.Column("number", sa.Integer, primary_key=True),
        sa.Column("at", UTCDateTime, nullable=False),
        sa.Column("status_code", sa.Integer),
        sa.Column("error", sa.Text),
        sa.Column("duration_ms", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    for table in ("delivery_attempts", "deliveries", "schedule_fires", "schedules"):
        op.drop_table(table)
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("callback_url")
