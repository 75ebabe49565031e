"""Catalog routes: list, read, and put automation definitions."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends

from ondeck.api.deps import call, get_node
from ondeck.api.schemas import AutomationList, AutomationOut, AutomationSummary
from ondeck.engine import catalog
from ondeck.errors import InvalidDefinition
from ondeck.node import Node
from ondeck.spec.loader import parse_definition

router = APIRouter(prefix="/automations", tags=["automations"])
NodeDep = Annotated[Node, Depends(get_node)]


@router.get("", response_model=AutomationList)
async def list_automations(node: NodeDep) -> AutomationList:
    versions = await call(catalog.list_current, node.store)
    return AutomationList(items=[AutomationSummary.of(v) for v in versions])


@router.get("/{name}", response_model=AutomationOut)
async def get_automation(node: NodeDep, name: str, version: int | None = None) -> AutomationOut:
    return AutomationOut.of(await call(catalog.get, node.store, name, version))


@router.put("/{name}", response_model=AutomationOut)
async def put_automation(
    node: NodeDep, name: str, definition: Annotated[dict[str, Any], Body()]
) -> AutomationOut:
    """Create or update; an identical definition does not make a new version."""
    definition.setdefault("name", name)
    if definition["name"] != name:
        raise InvalidDefinition(
            f"name in the body ({definition['name']!r}) differs from the URL ({name!r})",
            errors=[{"field": "name", "message": "must match the URL"}],
        )
    automation = parse_definition(definition)
    applied = await call(catalog.apply, node.store, automation)
    return AutomationOut.of(applied.version, changed=applied.changed)
