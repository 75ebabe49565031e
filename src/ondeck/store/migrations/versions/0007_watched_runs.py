"""``runs.watched``: whether anyone ever waited on the run or followed its log. Only such
a run's changes and output are announced (the ``run`` notification): most runs are
never watched, and each announcement woke a process in every API server, and in
PostgreSQL, for nobody (see ``Transaction.watch_run``).

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("runs", sa.Column("watched", sa.Boolean(), nullable=False, server_default=sa.false()))
    # A run still under way may have a waiter (of a release before this one) on it now.
    runs = sa.table("runs", sa.column("status", sa.String), sa.column("watched", sa.Boolean))
    under_way = ["pending", "waiting_approval", "queued", "running"]
    op.execute(runs.update().where(runs.c.status.in_(under_way)).values(watched=True))


def downgrade() -> None:
    op.drop_column("runs", "watched")  # SQLite, too, drops a column in place (3.35 on)
