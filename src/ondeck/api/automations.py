"""Catalog routes: list, read, and put automation definitions."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Query

from ondeck.api.deps import INT32_MAX, AdminDep, NodeDep, ReaderDep, StrictRoute, call
from ondeck.api.schemas import AutomationList, AutomationOut, AutomationSummary, ScheduleOut
from ondeck.engine import catalog, describe, scheduler
from ondeck.errors import InvalidDefinition
from ondeck.spec.loader import parse_definition

router = APIRouter(prefix="/automations", tags=["automations"], route_class=StrictRoute)


@router.get("", response_model=AutomationList)
async def list_automations(node: NodeDep, principal: ReaderDep) -> AutomationList:
    """The automations the caller may see."""
    versions = await call(catalog.visible, node.store, principal)
    return AutomationList(items=[AutomationSummary.of(v) for v in versions])


@router.get("/{name}", response_model=AutomationOut)
async def get_automation(
    node: NodeDep,
    principal: ReaderDep,
    name: str,
    version: Annotated[int | None, Query(ge=1, le=INT32_MAX)] = None,
) -> AutomationOut:
    """The definition, plus each trigger's live state (schedules: paused, next_fire_at)."""
    found = await call(describe.automation, node.store, principal, name, version)
    return AutomationOut.of(found.version, triggers=found.triggers)


@router.post("/{name}/schedules/{index}/pause", response_model=ScheduleOut)
async def pause_schedule(node: NodeDep, principal: AdminDep, name: str, index: int) -> ScheduleOut:
    """Stop a schedule from firing (admin); ticks while paused are skipped, not caught up."""
    return ScheduleOut.of(await call(scheduler.set_paused, node.store, principal, name, index, True))


@router.post("/{name}/schedules/{index}/resume", response_model=ScheduleOut)
async def resume_schedule(node: NodeDep, principal: AdminDep, name: str, index: int) -> ScheduleOut:
    return ScheduleOut.of(await call(scheduler.set_paused, node.store, principal, name, index, False))


@router.put("/{name}", response_model=AutomationOut)
async def put_automation(
    node: NodeDep, principal: AdminDep, name: str, definition: Annotated[dict[str, Any], Body()]
) -> AutomationOut:
    """Create or update (admin); an identical definition does not make a new version."""
    definition.setdefault("name", name)
    if definition["name"] != name:
        raise InvalidDefinition(
            f"name in the body ({definition['name']!r}) differs from the URL ({name!r})",
            errors=[{"field": "name", "message": "must match the URL"}],
        )
    automation = parse_definition(definition)
    applied = await call(catalog.apply_as, node.store, principal, automation)
    return AutomationOut.of(applied.version, changed=applied.changed)
