"""Governance: tokens, secrets, audit chain, approvals, environments, rate counters, breakers.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from ondeck.store.tables import JSONType, UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_BIGID = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("principal", sa.String(100)))
        batch.add_column(sa.Column("environment", sa.String(63)))
        batch.add_column(sa.Column("approval", JSONType))
    op.create_table(
        "tokens",
        sa.Column("id", sa.String(26), primary_key=True),
        sa.Column("name", sa.String(100), nullable=False, unique=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("roles", JSONType, nullable=False),
        sa.Column("created_by", sa.String(100), nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("expires_at", UTCDateTime),
        sa.Column("last_used_at", UTCDateTime),
        sa.Column("revoked_at", UTCDateTime),
    )
    op.create_table(
        "secrets",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("scope", sa.String(200), primary_key=True),
        sa.Column("ciphertext", sa.Text, nullable=False),
        sa.Column("updated_by", sa.String(100), nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )
    op.create_table(
        "audit_entries",
        sa.Column("id", _BIGID, primary_key=True, autoincrement=True),
        sa.Column("at", UTCDateTime, nullable=False),
        sa.Column("actor", sa.String(100), nullable=False),
        sa.Column("action", sa.String(60), nullable=False),
        sa.Column("target", sa.String(200), nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.create_index("ix_audit_action", "audit_entries", ["action", "id"])
    op.create_table(
        "approval_decisions",
        sa.Column("run_id", sa.String(26), primary_key=True),
        sa.Column("approver", sa.String(100), primary_key=True),
        sa.Column("decision", sa.String(10), nullable=False),
        sa.Column("comment", sa.Text, nullable=False),
        sa.Column("at", UTCDateTime, nullable=False),
    )
    op.create_table(
        "environments",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("definition", JSONType, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )
    op.create_table(
        "rate_counters",
        sa.Column("key", sa.String(300), primary_key=True),
        sa.Column("window", sa.BigInteger, primary_key=True),
        sa.Column("count", sa.Integer, nullable=False),
    )
    op.create_table(
        "circuit_breakers",
        sa.Column("automation", sa.String(63), primary_key=True),
        sa.Column("state", sa.String(10), nullable=False),
        sa.Column("opened_until", UTCDateTime),
        sa.Column("closed_at", UTCDateTime, nullable=False),
        sa.Column("trial_run_id", sa.String(26)),
    )


def downgrade() -> None:
    for table in (
        "circuit_breakers",
        "rate_counters",
        "environments",
        "approval_decisions",
        "audit_entries",
        "secrets",
        "tokens",
    ):
        op.drop_table(table)
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("approval")
        batch.drop_column("environment")
        batch.drop_column("principal")
