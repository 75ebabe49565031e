"""Secrets: write-only values, encrypted at rest, resolved per run by scope.

Scopes: ``global``, ``environment:<name>``, ``automation:<name>``; a run gets
the most specific one of each name its automation declares.
"""

from __future__ import annotations

import re
from pathlib import Path

from ondeck.auth.principals import Principal
from ondeck.domain import SecretInfo, utcnow
from ondeck.errors import InvalidRequest, NotFound, OndeckError
from ondeck.spec.models import NAME_PATTERN, SECRET_NAME
from ondeck.store.store import Store
from ondeck.vault import Vault

GLOBAL = "global"
MIN_VALUE, MAX_VALUE = 4, 64 * 1024


class MissingSecret(OndeckError):
    code = "missing-secret"
    status = 422
    title = "Secret not set"


def check_scope(scope: str) -> str:
    kind, _, name = scope.partition(":")
    if scope == GLOBAL or (kind in ("environment", "automation") and re.fullmatch(NAME_PATTERN, name)):
        return scope
    raise InvalidRequest("scope is global, environment:<name> or automation:<name>")


def put(store: Store, vault: Vault, principal: Principal, name: str, scope: str, value: str) -> SecretInfo:
    # fullmatch, as for scopes: with re.match a pattern's $ also matches before a final
    # newline, so "NAME\n" was taken (and, 129 characters long, did not fit the store).
    if not re.fullmatch(SECRET_NAME, name):
        raise InvalidRequest("a secret name is a letter or _ then letters, digits or _ (an env var name)")
    check_scope(scope)
    if len(value) < MIN_VALUE or len(value.encode()) > MAX_VALUE:
        # Masked wherever it appears, a shorter one would mask ondeck's own words in logs and
        # errors ("e***it code 1"), showing what it is.
        raise InvalidRequest(f"a secret value is {MIN_VALUE} characters to {MAX_VALUE} bytes")
    now = utcnow()
    with store.transaction() as tx:
        created = tx.put_secret(name, scope, vault.encrypt(value), principal.name, now)
        action = "secret.created" if created else "secret.updated"
        tx.append_audit(principal.name, action, f"secret:{name}", {"scope": scope}, now)
        return next(s for s in tx.secret_infos() if s.name == name and s.scope == scope)


def delete(store: Store, principal: Principal, name: str, scope: str) -> None:
    check_scope(scope)
    with store.transaction() as tx:
        if not tx.delete_secret(name, scope):
            raise NotFound(f"no secret {name!r} in scope {scope}")
        tx.append_audit(principal.name, "secret.deleted", f"secret:{name}", {"scope": scope}, utcnow())


def listing(store: Store) -> list[SecretInfo]:
    with store.read() as tx:
        return tx.secret_infos()


def resolve(
    store: Store, vault: Vault, names: list[str], automation: str, environment: str | None
) -> dict[str, str]:
    """Values for ``names``, most specific scope first; ``MissingSecret`` if one is not set."""
    if not names:
        return {}
    with store.read() as tx:
        rows = tx.secret_ciphertexts(names)
    rank = {f"automation:{automation}": 0, GLOBAL: 2}
    if environment:
        rank[f"environment:{environment}"] = 1
    best: dict[str, tuple[int, str]] = {}
    for name, scope, ciphertext in rows:
        if scope in rank and (name not in best or rank[scope] < best[name][0]):
            best[name] = (rank[scope], ciphertext)
    missing = [n for n in names if n not in best]
    if missing:
        raise MissingSecret(f"secret {', '.join(missing)} is not set for automation {automation!r}")
    return {name: vault.decrypt(ciphertext) for name, (_, ciphertext) in best.items()}


def rotate_key(store: Store, vault: Vault, data_dir: Path) -> tuple[Vault, int]:
    """Re-encrypt every secret under a new key; returns the new vault and the count."""
    rotated = vault.rotated()
    now = utcnow()
    with store.transaction() as tx:
        rows = tx.secret_ciphertexts()
        for name, scope, ciphertext in rows:
            tx.put_secret(name, scope, rotated.reencrypt(ciphertext), "system", now)
        tx.append_audit("system", "secret.key_rotated", "secrets", {"count": len(rows)}, now)
    newest = Vault(rotated.keys[:1])
    newest.save(data_dir)
    return newest, len(rows)
