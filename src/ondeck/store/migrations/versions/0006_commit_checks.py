"""On PostgreSQL, two of the admission's checks go with its commit, in the commit's round
trip (see ``Transaction.commit``): counting the trigger against a rate limit, and making
sure the automation's version it was admitted under is still the current one. Each
raises ``REFUSED`` with the caller's tag as its message when the check fails, which
fails the commit; the caller raises the refusal it left under that tag.

So the rate counter's row, which every admission by the same principal updates, is
locked for the commit alone, not also for round trips back to the API process, and an
admission makes two round trips fewer. Each statement in a VOLATILE function sees what
committed before it began, so the version is read as of the commit.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

REFUSED = "OD001"  # ondeck.store.store._REFUSED


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        f"""
        CREATE FUNCTION ondeck_count_rate(
            counter_key text, counter_window bigint, counter_limit int, tag text
        ) RETURNS void LANGUAGE plpgsql VOLATILE AS $$
        DECLARE
            counted int;
        BEGIN
            INSERT INTO rate_counters AS r (key, "window", count) VALUES (counter_key, counter_window, 1)
                ON CONFLICT (key, "window") DO UPDATE SET count = r.count + 1
                RETURNING r.count INTO counted;
            IF counted > counter_limit THEN
                RAISE EXCEPTION USING ERRCODE = '{REFUSED}', MESSAGE = tag;
            END IF;
        END
        $$
        """
    )
    op.execute(
        f"""
        CREATE FUNCTION ondeck_require_version(automation_name text, automation_version int, tag text)
        RETURNS void LANGUAGE plpgsql VOLATILE AS $$
        BEGIN
            IF NOT EXISTS (
                SELECT FROM automations AS a
                WHERE a.name = automation_name AND a.current_version = automation_version
            ) THEN
                RAISE EXCEPTION USING ERRCODE = '{REFUSED}', MESSAGE = tag;
            END IF;
        END
        $$
        """
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION ondeck_require_version")
        op.execute("DROP FUNCTION ondeck_count_rate")
