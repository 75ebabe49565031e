"""From an outside event to runs: find the triggers it matches and admit one run for each.

Webhooks, events, Alertmanager alerts, Slack commands and schedule ticks all
come through here and then through ``admission.admit``, so validation,
authorisation, idempotency, rate limits and audit apply to every one of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ondeck.auth.principals import Principal
from ondeck.domain import Run
from ondeck.engine import catalog
from ondeck.engine.admission import AdmissionPolicy, TriggerRequest, admit
from ondeck.errors import NotFound, UnloadableDefinition
from ondeck.spec.models import Automation
from ondeck.spec.triggers import Trigger
from ondeck.store.store import Store


@dataclass(frozen=True)
class Bound:
    """A trigger together with the automation that declares it."""

    automation: Automation
    trigger: Trigger
    index: int


def bound_triggers(store: Store, kind: str) -> list[Bound]:
    return [
        Bound(automation, trigger, index)
        for automation in catalog.definitions(store)
        for index, trigger in enumerate(automation.triggers)
        if trigger.kind == kind
    ]


def webhook(store: Store, hook_id: str) -> Bound:
    for bound in bound_triggers(store, "webhook"):
        assert bound.trigger.webhook is not None
        if bound.trigger.webhook.id == hook_id:
            return bound
    if hook_id in catalog.webhook_owners(store):
        # Declared by a version that no longer loads (logged with the details): say that,
        # not "no such hook", but tell an unauthenticated caller no more.
        raise UnloadableDefinition(f"webhook {hook_id!r} cannot be served until its automation is re-applied")
    raise NotFound(f"no webhook {hook_id!r}")


def slack_command(store: Store, name: str) -> Bound:
    for bound in bound_triggers(store, "slack"):
        assert bound.trigger.slack is not None
        if bound.trigger.slack.command == name:
            return bound
    raise NotFound(f"no automation answers to {name!r} in Slack")


def events(store: Store, source: str, event_type: str | None) -> list[Bound]:
    found = []
    for bound in bound_triggers(store, "event"):
        spec = bound.trigger.event
        assert spec is not None
        if spec.source == source and (spec.type is None or spec.type == event_type):
            found.append(bound)
    return found


def fire(
    store: Store,
    policy: AdmissionPolicy,
    bound: Bound,
    event: dict[str, Any],
    principal: Principal,
    via: str,
    idempotency_key: str | None = None,
    callback_url: str | None = None,
    params: dict[str, Any] | None = None,
) -> Run | None:
    """Admit one run for ``event`` if the trigger's ``when`` holds; None if it does not.

    ``params`` (typed by a person, say in Slack) are merged under the trigger's own
    mapping: a value the automation's author fixed in the trigger wins.
    """
    if not bound.trigger.matches(event):
        return None
    request = TriggerRequest(
        bound.automation.name,
        {**(params or {}), **bound.trigger.params_for(event)},
        via,
        idempotency_key,
        principal=principal,
        callback_url=callback_url,
    )
    return admit(store, request, policy).run
