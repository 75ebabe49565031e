"""On PostgreSQL, one function appends to the audit chain: it takes the chain's lock, reads
the last hash and writes the entry hashed onto it, in one round trip instead of three, so
admissions, which all append, hold the chain's lock for less time.

The hash is ``ondeck.audit.chain_hash``: SHA-256 in hex of the previous hash, a newline
and the entry's content, which the caller passes as ``chain_content`` made it. The read
of the last hash must see every append committed before the lock was had: a VOLATILE
function takes a fresh snapshot for each statement in it, where a single statement
would read from the snapshot it started with, before it waited for the lock.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        """
        CREATE FUNCTION ondeck_append_audit(
            chain_lock bigint, entry_at timestamptz, entry_actor text, entry_action text,
            entry_target text, entry_detail text, content text
        ) RETURNS TABLE (entry_id bigint, entry_prev_hash text, entry_hash text)
        LANGUAGE plpgsql VOLATILE AS $$
        DECLARE
            previous text;
        BEGIN
            PERFORM pg_advisory_xact_lock(chain_lock);
            SELECT a.hash INTO previous FROM audit_entries AS a ORDER BY a.id DESC LIMIT 1;
            previous := coalesce(previous, repeat('0', 64));  -- ondeck.audit.GENESIS
            RETURN QUERY
                INSERT INTO audit_entries AS a (at, actor, action, target, detail, prev_hash, hash)
                VALUES (
                    entry_at, entry_actor, entry_action, entry_target, entry_detail, previous,
                    encode(sha256(convert_to(previous || E'\\n' || content, 'UTF8')), 'hex')
                )
                RETURNING a.id, a.prev_hash::text, a.hash::text;
        END
        $$
        """
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION ondeck_append_audit")
