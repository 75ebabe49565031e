"""Principals and the built-in roles."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Permission(StrEnum):
    READ = "read"  # catalog, runs, logs
    TRIGGER = "trigger"  # start runs, cancel one's own
    APPROVE = "approve"  # decide approvals
    ADMIN = "admin"  # automations, tokens, secrets, environments, audit, any run


ROLE_PERMISSIONS: dict[str, frozenset[Permission]] = {
    "viewer": frozenset({Permission.READ}),
    "operator": frozenset({Permission.READ, Permission.TRIGGER}),
    "approver": frozenset({Permission.READ, Permission.TRIGGER, Permission.APPROVE}),
    "admin": frozenset(Permission),
}
ROLES = tuple(ROLE_PERMISSIONS)


@dataclass(frozen=True)
class Principal:
    name: str
    roles: frozenset[str]

    def can(self, permission: Permission) -> bool:
        return any(permission in ROLE_PERMISSIONS.get(role, ()) for role in self.roles)

    @property
    def is_admin(self) -> bool:
        return self.can(Permission.ADMIN)

    def matches(self, entry: str) -> bool:
        """An access list entry names a role or a principal (token name)."""
        return entry in self.roles or entry == self.name

    def describe(self) -> str:
        return f"{self.name} (roles: {', '.join(sorted(self.roles)) or 'none'})"


SYSTEM = Principal("system", frozenset({"admin"}))
