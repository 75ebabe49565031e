"""Authentication without a trip to the database, and what must still take one."""

from __future__ import annotations

import pytest

from ondeck.auth import tokens
from ondeck.auth.principals import SYSTEM
from ondeck.errors import InvalidRequest, Unauthenticated
from ondeck.store.store import Store


def test_a_recently_seen_token_needs_no_database(store: Store) -> None:
    issued = tokens.create(store, SYSTEM, "ci", ["operator"])
    header = f"Bearer {issued.token}"
    assert tokens.authenticate_recent(header) is None  # never seen: the caller must ask the store

    principal = tokens.authenticate(store, header)  # first use: read, and last use recorded
    assert principal.name == "ci"
    assert tokens.authenticate_recent(header) == principal


def test_revoking_in_this_process_takes_effect_at_once(store: Store) -> None:
    issued = tokens.create(store, SYSTEM, "deploy-bot", ["operator"])
    header = f"Bearer {issued.token}"
    tokens.authenticate(store, header)

    tokens.revoke(store, SYSTEM, "deploy-bot")

    assert tokens.authenticate_recent(header) is None
    with pytest.raises(Unauthenticated, match="revoked"):
        tokens.authenticate(store, header)


@pytest.mark.parametrize(
    ("header", "detail"),
    [(None, "send Authorization"), ("Basic abc", "must be: Bearer"), ("Bearer ", "must be: Bearer")],
)
def test_malformed_headers_are_refused_without_the_database(header: str | None, detail: str) -> None:
    with pytest.raises(Unauthenticated, match=detail):
        tokens.authenticate_recent(header)


def test_a_record_read_before_a_revocation_is_not_cached_after_it(store: Store) -> None:
    """What a request racing a revocation in another thread does: read, then cache."""
    issued = tokens.create(store, SYSTEM, "racer", ["operator"])
    token_hash = tokens.hash_token(issued.token)
    generation = tokens._recent.generation
    with store.read() as tx:
        active = tx.token_by_hash(token_hash)
    assert active is not None and active.revoked_at is None

    tokens.revoke(store, SYSTEM, "racer")
    tokens._recent.put(token_hash, active, generation)  # the slower request caches what it read

    header = f"Bearer {issued.token}"
    assert tokens.authenticate_recent(header) is None
    with pytest.raises(Unauthenticated, match="revoked"):
        tokens.authenticate(store, header)


@pytest.mark.parametrize(
    "name", ["a/b", "webhook:x", "slack:U1", "system", " ", "ops\n", "-x", "a" * 101, ""]
)
def test_a_token_name_is_one_its_holder_can_be_told_by(store: Store, name: str) -> None:
    """One with "/" could not be revoked by URL; "webhook:x" or "system" would read as
    ondeck's own principals in the audit log."""
    with pytest.raises(InvalidRequest, match="a token name is"):
        tokens.create(store, SYSTEM, name, ["viewer"])


def test_a_token_name_with_dots_and_at_signs_can_be_revoked(store: Store) -> None:
    tokens.create(store, SYSTEM, "alice.smith@example.com", ["viewer"])
    tokens.revoke(store, SYSTEM, "alice.smith@example.com")
    assert [t.name for t in tokens.listing(store) if t.revoked_at is None] == []
