"""``POST /chatops/slack``: Slack slash commands, authenticated by Slack's request signature.

Outside ``/api/v1`` because Slack sends no bearer token: the v0 signature
over the raw body is the authentication, and the Slack user is then mapped
to a token's principal by the engine. Slack wants an answer within three
seconds, so a run is only queued here; its result goes to ``response_url``.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from ondeck.api.deps import NodeDep, StrictRoute, call, read_body
from ondeck.api.problems import MEDIA_TYPE, problem
from ondeck.engine import chatops
from ondeck.triggers import slack

router = APIRouter(tags=["chatops"], route_class=StrictRoute)
log = logging.getLogger(__name__)


class SlackReply(BaseModel):
    response_type: Literal["ephemeral", "in_channel"]
    text: str


def _problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"content": {MEDIA_TYPE: {}}} for status in statuses}


@router.post("/chatops/slack", response_model=SlackReply, responses=_problems(400, 401, 413, 503))
async def slack_command(node: NodeDep, request: Request) -> SlackReply | JSONResponse:
    """A slash command (`run`, `status`, `list`, `approve`, `help`); the reply is for Slack to show."""
    secret = node.settings.slack_signing_secret
    if not secret:
        return problem(
            503, "slack-not-configured", "Slack is not configured", "set ONDECK_SLACK_SIGNING_SECRET"
        )
    try:
        users = slack.read_users(node.settings.slack_users)
    except ValueError as exc:
        return problem(503, "slack-not-configured", "Slack is not configured", str(exc))
    body = await read_body(request, node.settings.max_body_bytes)
    try:
        slack.verify(
            secret,
            request.headers.get(slack.TIMESTAMP_HEADER),
            request.headers.get(slack.SIGNATURE_HEADER),
            body,
        )
        command = slack.read_form(body)
    except slack.SignatureError as exc:
        return problem(401, "invalid-signature", "Invalid Slack signature", str(exc))
    except slack.CommandError as exc:
        return problem(400, "invalid-request", "Invalid request", str(exc))
    try:
        reply = await call(chatops.answer, node.store, node.admission_policy, users, command)
    except Exception:
        # Slack would show a 500 as an opaque failure; say so plainly instead.
        log.exception("Slack command from %s failed", command.user_id)
        reply = chatops.Reply(
            "Sorry, something went wrong inside ondeck; an admin can find it in the server log."
        )
    return SlackReply(response_type=reply.response_type, text=reply.text)
