"""An automation as users want to see it: its definition and its live trigger state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ondeck.auth.principals import Principal
from ondeck.domain import AutomationVersion
from ondeck.engine import catalog, scheduler
from ondeck.store.store import Store


@dataclass(frozen=True)
class Description:
    version: AutomationVersion
    triggers: list[dict[str, Any]]


def automation(store: Store, principal: Principal, name: str, version: int | None = None) -> Description:
    found = catalog.get_visible(store, principal, name, version)
    schedules = {s.index: s for s in scheduler.listing(store) if s.automation == name}
    triggers = []
    for index, trigger in enumerate(found.definition.get("triggers", [])):
        view = {"index": index, **trigger}
        if index in schedules and version is None:
            view["paused"] = schedules[index].paused
            next_fire = schedules[index].next_fire_at
            view["next_fire_at"] = next_fire.isoformat() if next_fire else None
        triggers.append(view)
    return Description(found, triggers)
