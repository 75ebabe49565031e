"""The automation catalog: apply definitions as new versions, look them up."""

from __future__ import annotations

from dataclasses import dataclass

from ondeck.domain import AutomationVersion, utcnow
from ondeck.errors import NotFound
from ondeck.spec.models import Automation
from ondeck.store.store import Store


@dataclass(frozen=True)
class Applied:
    version: AutomationVersion
    changed: bool


def apply(store: Store, automation: Automation) -> Applied:
    """Store ``automation`` as a new version unless it equals the current one."""
    digest = automation.digest()
    with store.transaction() as tx:
        current = tx.current_automation(automation.name)
        if current is not None and current.digest == digest:
            return Applied(current, changed=False)
        saved = tx.save_automation_version(automation.name, automation.definition(), digest, utcnow())
        return Applied(saved, changed=True)


def get(store: Store, name: str, version: int | None = None) -> AutomationVersion:
    with store.read() as tx:
        found = tx.current_automation(name) if version is None else tx.automation_version(name, version)
    if found is None:
        what = f"automation {name!r}" + (f" version {version}" if version is not None else "")
        raise NotFound(f"{what} does not exist")
    return found


def list_current(store: Store) -> list[AutomationVersion]:
    with store.read() as tx:
        return tx.current_automations()


def definition_of(version: AutomationVersion) -> Automation:
    """The stored definition as a model (it was validated when it was applied)."""
    return Automation.model_validate(version.definition)
