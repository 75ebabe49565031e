"""Slack slash commands, once their signature is verified: who asks, and what they asked for.

A Slack user acts as the API token its id is mapped to (``ONDECK_SLACK_USERS``),
with that token's roles, so a command passes the same admission, authorisation
and audit as the same request through the API. Every outcome, refusals
included, is a message for the user: Slack shows an HTTP error only as an
opaque "failed with the error", which tells nobody what to fix.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ondeck import storable
from ondeck.audit import ACTOR_MAX
from ondeck.auth import tokens
from ondeck.auth.principals import Principal
from ondeck.domain import Run, RunStatus, utcnow
from ondeck.engine import approvals, catalog, dispatch, runs
from ondeck.engine.admission import AdmissionPolicy, masked_params
from ondeck.errors import CircuitOpen, InvalidParams, OndeckError, RateLimited
from ondeck.spec.models import Automation
from ondeck.store.store import Store
from ondeck.triggers import slack
from ondeck.triggers.slack import Command, SlashCommand, escape

MAX_OUTPUTS_CHARS = 1500


@dataclass(frozen=True)
class Reply:
    """What Slack shows: only to the user (ephemeral), or to the whole channel."""

    text: str
    in_channel: bool = False

    @property
    def response_type(self) -> Literal["ephemeral", "in_channel"]:
        return "in_channel" if self.in_channel else "ephemeral"


def answer(store: Store, policy: AdmissionPolicy, users: Mapping[str, str], request: SlashCommand) -> Reply:
    """Carry out one verified slash command as the Slack user's principal.

    Engine refusals (403, 404, 409, 422, 429 …) come back as a reply saying why;
    only unexpected failures raise. ``run`` only queues: the result is posted to
    ``response_url`` through the outbox when the run ends. ``help``, and text
    that does not parse, are answered for anyone: they reveal nothing.
    """
    try:
        command = slack.parse(request.text)
    except slack.CommandError as exc:
        return Reply(f"Sorry, I did not understand that: {escape(str(exc))}.\n{_usage(request.command)}")
    if command.verb == "help":
        return Reply(_help(request.command))
    token_name = users.get(request.user_id)
    principal = tokens.principal_named(store, token_name) if token_name else None
    if principal is None:
        _audit_refusal(store, request, command, token_name)
        return Reply(_not_linked(request, token_name))
    try:
        if command.verb == "run":
            return _run(store, policy, principal, request, command)
        if command.verb == "status":
            return _status(store, principal, command)
        if command.verb == "approve":
            return _approve(store, principal, request, command)
        return _list(store, principal, request.command)
    except OndeckError as exc:
        return Reply(_explain(exc))


def _run(
    store: Store, policy: AdmissionPolicy, principal: Principal, request: SlashCommand, command: Command
) -> Reply:
    assert command.target is not None
    bound = dispatch.slack_command(store, command.target)
    params = slack.typed_params(command.pairs, bound.automation.params_schema)
    run = dispatch.fire(
        store,
        policy,
        bound,
        _event(request, params),
        principal,
        via="slack",
        callback_url=request.response_url,
        params=params,
    )
    name = escape(command.target)
    if run is None:
        return Reply(f"`{name}` did not start: its Slack trigger's `when` condition does not hold.")
    shown = masked_params(bound.automation, run.params)
    text = f"<@{escape(request.user_id)}> started *{escape(run.automation)}*: run `{run.id}`"
    if shown:
        text += f" with `{escape(json.dumps(shown, sort_keys=True))}`"
    if run.status == RunStatus.WAITING_APPROVAL and run.approval is not None:
        text += (
            f".\nIt is waiting for approval ({escape(approvals.describe(run.approval))}); "
            f"an approver can answer `{escape(request.command)} approve {run.id}`."
        )
    else:
        text += f" is {run.status}."
    if request.response_url:
        text += " I will post the result here when it ends."
    return Reply(text, in_channel=True)


def _event(request: SlashCommand, params: dict[str, Any]) -> dict[str, Any]:
    """The triggering event, as ``when`` and the trigger's ``params`` see it."""
    return {
        "source": "slack",
        "type": "command",
        "id": request.trigger_id or None,
        "data": {
            "command": request.command,
            "text": request.text,
            "user_id": request.user_id,
            "user_name": request.user_name,
            "channel_id": request.channel_id,
            "channel_name": request.channel_name,
            "team_id": request.team_id,
            "params": params,
        },
    }


def _status(store: Store, principal: Principal, command: Command) -> Reply:
    assert command.target is not None
    run = runs.get(store, command.target, principal)
    return Reply(_describe_run(run))


def _describe_run(run: Run) -> str:
    lines = [
        f"Run `{run.id}` of *{escape(run.automation)}* (version {run.version}): *{run.status}*",
        f"Started via {escape(run.trigger)} by {escape(run.principal or 'system')} "
        f"at {run.created_at.isoformat(timespec='seconds')}",
    ]
    if run.finished_at is not None:
        lines.append(f"Finished at {run.finished_at.isoformat(timespec='seconds')}")
    if run.status == RunStatus.WAITING_APPROVAL and run.approval is not None:
        approved = sorted({n for p in run.approval["policies"] for n in p["approved_by"]})
        lines.append(f"Needs approval: {escape(approvals.describe(run.approval))}")
        if approved:
            lines.append(f"Approved so far by {escape(', '.join(approved))}")
    if run.exit_code is not None:
        lines.append(f"Exit code {run.exit_code}")
    if run.error:
        lines.append(f"Error: {escape(run.error)}")
    if run.outputs:
        outputs = json.dumps(run.outputs, sort_keys=True)
        if len(outputs) > MAX_OUTPUTS_CHARS:
            outputs = outputs[:MAX_OUTPUTS_CHARS] + " …"
        lines.append(f"```{escape(outputs)}```")
    return "\n".join(lines)


def _approve(store: Store, principal: Principal, request: SlashCommand, command: Command) -> Reply:
    assert command.target is not None
    run = approvals.decide(store, principal, command.target, True, command.comment)
    text = f"<@{escape(request.user_id)}> approved run `{run.id}` of *{escape(run.automation)}*"
    if run.status == RunStatus.WAITING_APPROVAL and run.approval is not None:
        text += f"; it still needs approval ({escape(approvals.describe(run.approval))})."
    else:
        text += f"; it is {run.status} now."
    return Reply(text, in_channel=True)


def _list(store: Store, principal: Principal, slash: str) -> Reply:
    shown = {version.name for version in catalog.visible(store, principal)}
    entries = [
        _entry(slash, trigger.slack.command, automation)
        for automation in catalog.definitions(store)
        if automation.name in shown
        for trigger in automation.triggers
        if trigger.slack is not None
    ]
    if not entries:
        return Reply("There are no automations you can start from Slack.")
    return Reply("Automations you can start from Slack:\n" + "\n".join(sorted(entries)))


def _entry(slash: str, name: str, automation: Automation) -> str:
    schema = automation.params_schema
    required = set(schema.get("required") or [])
    properties = sorted(schema.get("properties") or {}, key=lambda key: (key not in required, key))
    names = [f"{key}*" if key in required else key for key in properties]
    text = f"• `{escape(slash)} run {escape(name)}` → *{escape(automation.name)}*"
    if automation.description:
        text += f": {escape(automation.description.strip().splitlines()[0])}"
    if names:
        text += f" (params: {escape(', '.join(names))})"
    return text


def _explain(error: OndeckError) -> str:
    text = f"Sorry, that did not work. {error.title}: {escape(error.detail)}"
    if isinstance(error, InvalidParams) and error.extensions.get("errors"):
        problems = [
            f"• `{escape(e['path'] or 'params')}`: {escape(e['message'])}" for e in error.extensions["errors"]
        ]
        text = "Sorry, those parameters do not fit:\n" + "\n".join(problems)
    if isinstance(error, RateLimited | CircuitOpen):
        text += f" Try again in {error.extensions.get('retry_after', 60)} s."
    return text


def _not_linked(request: SlashCommand, token_name: str | None) -> str:
    who = f"your Slack user (`{escape(request.user_id)}`)"
    if token_name is None:
        return (
            f"Sorry, {who} is not linked to an ondeck identity, so I cannot act for you. "
            f"Ask an ondeck admin to add `{escape(request.user_id)}=<token name>` to ONDECK_SLACK_USERS."
        )
    return (
        f"Sorry, the ondeck token linked to {who} is missing, revoked or expired, "
        "so I cannot act for you. Ask an ondeck admin to issue a new one."
    )


def _audit_refusal(store: Store, request: SlashCommand, command: Command, token_name: str | None) -> None:
    """Audited as ``slack:<user id>``, shortened to fit when the signed form's user id is
    long (the store refused it: the command failed); the detail keeps the whole id."""
    reason = "not linked" if token_name is None else f"token {token_name!r} is not active"
    with store.transaction() as tx:
        tx.append_audit(
            storable.bounded(f"slack:{request.user_id}", ACTOR_MAX),
            "slack.refused",
            f"slack:{command.verb}",
            {"user_id": request.user_id, "user_name": request.user_name, "reason": reason},
            utcnow(),
        )


def _usage(slash: str) -> str:
    return f"Try `{escape(slash)} help`."


def _help(slash: str) -> str:
    s = escape(slash)
    return "\n".join(
        [
            "*ondeck* slash commands:",
            f'• `{s} run NAME key=value …`: start an automation (quote spaces: `msg="hello world"`)',
            f"• `{s} status RUN_ID`: a run's status and result",
            f"• `{s} list`: the automations you can start from Slack",
            f"• `{s} approve RUN_ID [comment]`: approve a run that waits for approval",
            f"• `{s} help`: this message",
        ]
    )
