"""API tokens: random, shown once, stored only as a SHA-256 hash.

Tokens carry 256 bits of randomness, so a fast hash is enough: there is
nothing to brute-force that a slow hash would protect.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path

from ondeck.auth.principals import ROLES, SYSTEM, Principal
from ondeck.domain import TokenRecord, utcnow
from ondeck.errors import Conflict, InvalidRequest, NotFound, Unauthenticated
from ondeck.ids import new_id
from ondeck.settings import TOKEN_FILE
from ondeck.store.store import Store, Transaction

PREFIX = "odk_"
BOOTSTRAP_NAME = "admin"
_TOUCH_EVERY = timedelta(minutes=1)


@dataclass(frozen=True)
class IssuedToken:
    record: TokenRecord
    token: str  # the only time the plaintext exists


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def generate() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def _insert(
    tx: Transaction, name: str, roles: list[str], created_by: str, expires_at: datetime | None, token: str
) -> TokenRecord:
    unknown = [r for r in roles if r not in ROLES]
    if unknown or not roles:
        raise InvalidRequest(f"roles must be some of {', '.join(ROLES)}; got {', '.join(roles) or 'none'}")
    if tx.token_by_name(name) is not None:
        raise Conflict(f"a token named {name!r} already exists; revoke it or pick another name")
    record = TokenRecord(new_id(), name, sorted(set(roles)), created_by, utcnow(), expires_at, None, None)
    tx.insert_token(record, hash_token(token))
    return record


# No "/" (it could not be revoked by URL) and no ":" (webhook:…, slack:… are principals
# ondeck names itself), so a token's name is never mistaken for another's in the audit log.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,99}")


def create(
    store: Store, principal: Principal, name: str, roles: list[str], expires_in: float | None = None
) -> IssuedToken:
    if not _NAME.fullmatch(name) or name == SYSTEM.name:
        raise InvalidRequest(
            "a token name is 1-100 letters, digits and . _ @ -, starting with a letter or digit, "
            f"and not {SYSTEM.name!r}: it names the token's holder in the audit log and in URLs"
        )
    token = generate()
    expires_at = utcnow() + timedelta(seconds=expires_in) if expires_in else None
    with store.transaction() as tx:
        record = _insert(tx, name, roles, principal.name, expires_at, token)
        tx.append_audit(principal.name, "token.created", f"token:{name}", {"roles": record.roles}, utcnow())
    return IssuedToken(record, token)


def revoke(store: Store, principal: Principal, name: str) -> None:
    with store.transaction() as tx:
        if not tx.revoke_token(name, utcnow()):
            raise NotFound(f"no active token named {name!r}")
        tx.append_audit(principal.name, "token.revoked", f"token:{name}", {}, utcnow())
    _recent.forget(name)


def listing(store: Store) -> list[TokenRecord]:
    with store.read() as tx:
        return tx.tokens()


class _Recent:
    """Tokens seen in the last few seconds, so most requests need no database read.

    A revocation is immediate in the process that revoked it and takes at most
    ``TTL`` seconds to reach other API processes. A record read before a revocation
    in this process is not cached after it: ``put`` takes the ``generation`` seen
    before the read, and every ``forget`` starts a new one.
    """

    TTL = 5.0

    def __init__(self) -> None:
        self._seen: dict[str, tuple[float, TokenRecord]] = {}
        self._lock = threading.Lock()
        self.generation = 0

    def get(self, token_hash: str) -> TokenRecord | None:
        hit = self._seen.get(token_hash)
        if hit is None or time.monotonic() - hit[0] > self.TTL:
            return None
        return hit[1]

    def put(self, token_hash: str, record: TokenRecord, generation: int) -> None:
        with self._lock:
            if generation != self.generation:
                return  # a revocation happened meanwhile: the record may predate it
            if len(self._seen) > 10_000:
                self._seen.clear()
            self._seen[token_hash] = (time.monotonic(), record)

    def forget(self, name: str) -> None:
        with self._lock:
            self.generation += 1
            self._seen = {h: (t, r) for h, (t, r) in self._seen.items() if r.name != name}


_recent = _Recent()


def authenticate(store: Store, authorization: str | None) -> Principal:
    """The principal behind an ``Authorization: Bearer odk_…`` header, or 401."""
    token_hash = _token_hash(authorization)
    generation = _recent.generation
    record = _recent.get(token_hash)
    if record is None:
        with store.read() as tx:
            record = tx.token_by_hash(token_hash)
        if record is not None:
            _recent.put(token_hash, record, generation)
    if record is None:
        raise Unauthenticated("unknown token")
    now = utcnow()
    principal = _principal(record, now)
    if _needs_touch(record, now):
        with store.transaction() as tx:
            tx.touch_token(record.id, now)
        _recent.put(token_hash, replace(record, last_used_at=now), generation)
    return principal


def authenticate_recent(authorization: str | None) -> Principal | None:
    """``authenticate`` when it needs no database: the token was seen in the last few
    seconds and its last use is fresh. None means: call ``authenticate``.

    Cheap enough for the event loop, which saves most requests a trip to a thread.
    """
    token_hash = _token_hash(authorization)
    record = _recent.get(token_hash)
    now = utcnow()
    if record is None or _needs_touch(record, now):
        return None
    return _principal(record, now)


def _token_hash(authorization: str | None) -> str:
    if not authorization:
        raise Unauthenticated("send Authorization: Bearer <token> (see `ondeck tokens create`)")
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("the Authorization header must be: Bearer <token>")
    # Tokens are 256 random bits, looked up by their hash: no timing leak to guard against.
    return hash_token(token)


def _principal(record: TokenRecord, now: datetime) -> Principal:
    if record.revoked_at is not None:
        raise Unauthenticated("this token has been revoked")
    if record.expires_at is not None and record.expires_at <= now:
        raise Unauthenticated("this token has expired")
    return Principal(record.name, frozenset(record.roles))


def _needs_touch(record: TokenRecord, now: datetime) -> bool:
    return record.last_used_at is None or now - record.last_used_at > _TOUCH_EVERY


def principal_named(store: Store, name: str) -> Principal | None:
    """The principal of the active token called ``name`` (for identities mapped from elsewhere)."""
    with store.read() as tx:
        record = tx.token_by_name(name)
    if record is None or record.revoked_at is not None:
        return None
    if record.expires_at is not None and record.expires_at <= utcnow():
        return None
    return Principal(record.name, frozenset(record.roles))


def bootstrap(store: Store, data_dir: Path, configured: str | None) -> str | None:
    """Make sure an admin can get in; returns a newly minted token to show once.

    With ``ONDECK_ADMIN_TOKEN`` set, that value is (idempotently) an admin
    token. Otherwise, on the very first start, one is generated and also
    written with mode 0600 to the data directory.
    """
    with store.transaction() as tx:
        if configured:
            if tx.token_by_hash(hash_token(configured)) is None:
                name = (
                    BOOTSTRAP_NAME if tx.token_by_name(BOOTSTRAP_NAME) is None else f"admin-{new_id()[-6:]}"
                )
                _insert(tx, name, ["admin"], "bootstrap", None, configured)
            return None
        if tx.count_tokens():
            return None
        token = generate()
        _insert(tx, BOOTSTRAP_NAME, ["admin"], "bootstrap", None, token)
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / TOKEN_FILE
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(token + "\n")
    return token
