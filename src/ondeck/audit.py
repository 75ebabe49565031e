"""The audit chain: each entry's hash covers its content and the previous entry's hash."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

GENESIS = "0" * 64
ACTOR_MAX = 100  # the store's column, as a principal's name


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: datetime
    actor: str
    action: str
    target: str
    detail: dict[str, Any]
    prev_hash: str
    hash: str


def canonical_detail(detail: dict[str, Any]) -> str:
    return json.dumps(detail, sort_keys=True, separators=(",", ":"), default=str)


def chain_content(at: datetime, actor: str, action: str, target: str, detail: str) -> str:
    """What an entry's hash covers besides the previous hash (``detail`` canonical)."""
    return "\n".join([at.isoformat(timespec="microseconds"), actor, action, target, detail])


def chain_hash(prev_hash: str, at: datetime, actor: str, action: str, target: str, detail: str) -> str:
    """SHA-256, in hex, of the previous hash, a newline and the entry's content (on
    PostgreSQL the store computes the same in SQL: see migration 0005)."""
    material = prev_hash + "\n" + chain_content(at, actor, action, target, detail)
    return hashlib.sha256(material.encode()).hexdigest()


def first_broken(entries: list[tuple[int, datetime, str, str, str, str, str, str]]) -> tuple[int, str] | None:
    """(entry id, why) for the first entry that breaks the chain, or None if it is intact.

    ``entries`` are raw rows in id order: id, at, actor, action, target, detail, prev_hash, hash.
    """
    previous = GENESIS
    for entry_id, at, actor, action, target, detail, prev_hash, stored in entries:
        if prev_hash != previous:
            return entry_id, "its prev_hash does not match the hash of the entry before it"
        if chain_hash(prev_hash, at, actor, action, target, detail) != stored:
            return entry_id, "its content does not match its hash (edited after it was written)"
        previous = stored
    return None
