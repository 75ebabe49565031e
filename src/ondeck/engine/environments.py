"""Environments: stored definitions, and picking the one a run acts in."""

from __future__ import annotations

from ondeck.auth.principals import Principal
from ondeck.domain import utcnow
from ondeck.errors import InvalidRequest, NotFound
from ondeck.spec.environments import Environment
from ondeck.spec.expressions import ExpressionError, render
from ondeck.spec.models import Automation
from ondeck.store.store import Store, Transaction


def put(store: Store, principal: Principal, environment: Environment) -> Environment:
    definition = environment.model_dump(mode="json")
    with store.transaction() as tx:
        if tx.environment(environment.name) == definition:
            return environment
        tx.put_environment(environment.name, definition, utcnow())
        tx.append_audit(
            principal.name,
            "environment.put",
            f"environment:{environment.name}",
            environment.model_dump(mode="json"),
            utcnow(),
        )
    return environment


def listing(store: Store) -> list[Environment]:
    with store.read() as tx:
        return [Environment.model_validate(d) for d in tx.environments()]


def get(store: Store, name: str) -> Environment:
    with store.read() as tx:
        found = lookup(tx, name)
    if found is None:
        raise NotFound(f"environment {name!r} does not exist")
    return found


def lookup(tx: Transaction, name: str) -> Environment | None:
    definition = tx.environment(name)
    return Environment.model_validate(definition) if definition is not None else None


def resolve(store: Store, automation: Automation, params: dict[str, object]) -> Environment | None:
    """The environment ``automation.environment`` selects for these params (None if it has none)."""
    if automation.environment is None:
        return None
    try:
        name = render(automation.environment, {"params": params})
    except ExpressionError as exc:
        raise InvalidRequest(f"environment: {exc}") from exc
    if not name:
        return None
    with store.read() as tx:
        found = lookup(tx, name)
    if found is None:
        raise InvalidRequest(
            f"automation {automation.name!r} selects environment {name!r}, which is not defined"
        )
    return found
