"""Reading and verifying the audit chain."""

from __future__ import annotations

from dataclasses import dataclass

from ondeck.audit import AuditEntry, first_broken
from ondeck.store.store import Store


@dataclass(frozen=True)
class Verification:
    entries: int
    broken_id: int | None
    reason: str | None

    @property
    def intact(self) -> bool:
        return self.broken_id is None


def page(
    store: Store,
    *,
    action: str | None,
    actor: str | None,
    target: str | None,
    before: int | None,
    limit: int,
) -> tuple[list[AuditEntry], int | None]:
    with store.read() as tx:
        found = tx.audit_entries(action=action, actor=actor, target=target, before=before, limit=limit + 1)
    if len(found) > limit:
        return found[:limit], found[limit - 1].id
    return found, None


def verify(store: Store) -> Verification:
    """Recompute the whole chain; name the first entry that does not fit."""
    with store.read() as tx:
        rows = tx.audit_chain()
    broken = first_broken(rows)
    if broken is None:
        return Verification(len(rows), None, None)
    return Verification(len(rows), broken[0], broken[1])
