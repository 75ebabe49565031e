"""Liveness and readiness."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from ondeck.api.deps import StrictRoute, call, get_node
from ondeck.api.problems import problem
from ondeck.errors import OndeckError
from ondeck.node import Node

router = APIRouter(tags=["health"], route_class=StrictRoute)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up and its event loop answers (no database round trip)."""
    return {"status": "ok"}


@router.get("/readyz", response_model=None)
async def readyz(node: Annotated[Node, Depends(get_node)]) -> dict[str, str] | JSONResponse:
    """The database answers and its schema is current."""
    try:
        current = await call(node.store.is_current)
    except OndeckError as exc:
        return problem(503, "not-ready", "Not ready", exc.detail)
    except Exception as exc:  # any driver error means "not ready", never a 500
        return problem(503, "not-ready", "Not ready", f"database check failed: {type(exc).__name__}")
    if not current:
        return problem(503, "not-ready", "Not ready", "database schema is not current: run ondeck db upgrade")
    return {"status": "ready", "database": node.store.dialect}
