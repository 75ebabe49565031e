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
    # True by default: every run stored so far, and every run a release before this one
    # writes during a rolling upgrade (it leaves the column out), may have a waiter of that
    # release on it, which does not mark what it waits on. ondeck writes the flag itself.
    op.add_column("runs", sa.Column("watched", sa.Boolean(), nullable=False, server_default=sa.true()))


def downgrade() -> None:
    op.drop_column("runs", "watched")  # SQLite, too, drops a column in place (3.35 on)
