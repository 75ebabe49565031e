"""``POST /api/v1/events``: an event from another system starts every automation listening for it."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from ondeck.api.deps import NodeDep, PrincipalDep, StrictRoute, call
from ondeck.api.hooks import Triggered
from ondeck.engine import intake

router = APIRouter(tags=["events"], route_class=StrictRoute)


class EventBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(min_length=1, max_length=200, description="Matched against a trigger's event.source.")
    type: str | None = Field(None, max_length=200, description="Matched against event.type, if it names one.")
    id: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="Unique per source: the same (source, id) again starts nothing new.",
    )
    data: Any = Field(None, description="Seen by triggers as `event.data`.")
    callback_url: str | None = Field(None, description="Told when each run finishes.")


@router.post("/events", response_model=Triggered, status_code=202)
async def post_event(node: NodeDep, principal: PrincipalDep, body: EventBody) -> Triggered:
    """Start a run for each `event` trigger of (source, type) whose `when` holds; needs `trigger`."""
    received = await call(
        intake.receive_event,
        node.store,
        node.admission_policy,
        principal,
        body.source,
        body.type,
        body.id,
        body.data,
        body.callback_url,
    )
    return Triggered.of(received)
