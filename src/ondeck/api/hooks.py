"""``POST /hooks/{hook_id}``: webhooks from outside, authenticated by their signature, not a token."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, Field

from ondeck.api.deps import NodeDep, StrictRoute, call, read_body, shown, wait_finished
from ondeck.api.schemas import RunOut
from ondeck.domain import Run
from ondeck.engine import intake
from ondeck.node import Node

router = APIRouter(tags=["hooks"], route_class=StrictRoute)


class Triggered(BaseModel):
    runs: list[str] = Field(description="Runs started, or for a repeated delivery the ones it started.")
    skipped: int = Field(0, description="Events whose trigger condition (`when`) was false.")
    results: list[RunOut] | None = Field(
        None, description="With `wait`: the finished runs, when all finished in time."
    )

    @classmethod
    def of(cls, received: intake.Intake, finished: list[Run] | None = None) -> Triggered:
        results = [RunOut.of(run) for run in finished] if finished is not None else None
        return cls(runs=[run.id for run in received.runs], skipped=received.skipped, results=results)


async def _wait_all(node: Node, started: list[Run], timeout: float) -> list[Run] | None:
    """The runs once all are terminal, or None if ``timeout`` passes first."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    finished = [await wait_finished(node, run, max(0.0, deadline - loop.time())) for run in started]
    return finished if all(run.status.terminal for run in finished) else None


@router.post(
    "/hooks/{hook_id}",
    response_model=Triggered,
    status_code=202,
    responses={200: {"description": "With `wait`: every run finished in time."}},
)
async def receive_hook(
    node: NodeDep,
    hook_id: str,
    request: Request,
    response: Response,
    wait: Annotated[float | None, Query(ge=0, le=600, description="Seconds to wait for the runs.")] = None,
    callback_url: Annotated[str | None, Query(description="Told when each run finishes.")] = None,
) -> Triggered:
    """Verify the delivery with the hook's scheme and secret, then start a run per matching event.

    A bad or missing signature is a 401 (and an audit entry); the body is never acted on.
    """
    body = await read_body(request, node.settings.max_body_bytes)
    delivery = intake.Delivery(
        hook_id,
        dict(request.headers.items()),
        body,
        callback_url,
        request.client.host if request.client else None,
    )
    received = await call(intake.receive_webhook, node.store, node.vault, node.admission_policy, delivery)
    if wait:  # as a trigger does (see runs._admit)
        await shown(node, *received.runs)
    finished = await _wait_all(node, received.runs, wait) if wait else None
    if finished is not None:
        response.status_code = 200
        finished = await shown(node, *finished)
    return Triggered.of(received, finished)
