"""Catalog routes: list, read, and put automation definitions."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body

from ondeck.api.deps import AdminDep, NodeDep, ReaderDep, call
from ondeck.api.schemas import AutomationList, AutomationOut, AutomationSummary
from ondeck.engine import catalog
from ondeck.errors import InvalidDefinition
from ondeck.spec.loader import parse_definition

router = APIRouter(prefix="/automations", tags=["automations"])


@router.get("", response_model=AutomationList)
async def list_automations(node: NodeDep, principal: ReaderDep) -> AutomationList:
    """The automations the caller may see."""
    versions = await call(catalog.visible, node.store, principal)
    return AutomationList(items=[AutomationSummary.of(v) for v in versions])


@router.get("/{name}", response_model=AutomationOut)
async def get_automation(
    node: NodeDep, principal: ReaderDep, name: str, version: int | None = None
) -> AutomationOut:
    return AutomationOut.of(await call(catalog.get_visible, node.store, principal, name, version))


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
