"""The queue index in claim order (priority descending, then id), so a claim reads the
few runs it takes instead of sorting every queued run of its group first.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_runs_queue", table_name="runs")
    op.create_index("ix_runs_queue", "runs", ["status", "worker_group", sa.text("priority DESC"), "id"])


def downgrade() -> None:
    op.drop_index("ix_runs_queue", table_name="runs")
    op.create_index("ix_runs_queue", "runs", ["status", "worker_group", "priority", "id"])
