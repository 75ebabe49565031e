"""Who may see and run what. The only place such decisions are made.

A run grant may carry a condition on the parameter *values*
(``when: "${{ params.env != 'prod' }}"``): an operator may restart in dev and
be refused in prod, with a ``detail`` that says which rule applied.
"""

from __future__ import annotations

from typing import Any

from ondeck.auth.principals import Permission, Principal
from ondeck.errors import Forbidden
from ondeck.spec.environments import Environment
from ondeck.spec.expressions import evaluate
from ondeck.spec.models import Access


def may_view(principal: Principal, access: Access | None) -> bool:
    if principal.is_admin:
        return True
    if not principal.can(Permission.READ):
        return False
    if access is None or access.view is None:
        return True
    grants = access.run_grants() or []
    return any(principal.matches(e) for e in access.view) or any(principal.matches(g.role) for g in grants)


def require(principal: Principal, permission: Permission, what: str) -> None:
    if not principal.can(permission):
        raise Forbidden(f"{principal.describe()} may not {what}")


def authorize_run(
    principal: Principal,
    automation: str,
    access: Access | None,
    params: dict[str, Any],
    environment: Environment | None,
) -> None:
    """Raise ``Forbidden`` (saying why) unless ``principal`` may run with these params."""
    if principal.is_admin:
        return
    require(principal, Permission.TRIGGER, "trigger runs")
    if not may_view(principal, access):
        raise Forbidden(f"{principal.describe()} may not see automation {automation!r}")
    grants = access.run_grants() if access is not None else None
    if grants is not None:
        mine = [g for g in grants if principal.matches(g.role)]
        if not mine:
            allowed = ", ".join(g.role for g in grants) or "admins only"
            raise Forbidden(
                f"automation {automation!r} may be run by: {allowed}; not by {principal.describe()}"
            )
        context = {"params": params}
        if not any(g.when is None or evaluate(g.when, context) for g in mine):
            rules = " or ".join(str(g.when) for g in mine)
            raise Forbidden(
                f"{principal.describe()} may run {automation!r} only when {rules}; "
                "these params do not satisfy it"
            )
    roles = environment.allowed_roles if environment is not None else None
    if environment is not None and roles is not None and not any(principal.matches(r) for r in roles):
        raise Forbidden(
            f"environment {environment.name!r} allows only {', '.join(roles)}; not {principal.describe()}"
        )
