"""From an outside delivery to runs: signed webhooks (``POST /hooks/{id}``) and posted events.

A webhook is verified against its trigger's secret before its body is even
parsed; a request that fails is audited and answered 401, never acted on. A
verified delivery becomes one event (one per alert for Alertmanager), and each
event goes through ``dispatch.fire`` and so through admission like any other
trigger, as the principal ``webhook:<hook id>`` with the operator role, so the
automation's access rules still apply and can name that principal.

Repeated deliveries start nothing new: each event carries an idempotency key
derived from what the sender says identifies it (GitHub's delivery id, the
Standard Webhooks message id, an alert's fingerprint, start and status, a
posted event's source and id), so admission answers with the run the first
delivery started.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from ondeck import storable
from ondeck.auth.policy import require
from ondeck.auth.principals import Permission, Principal
from ondeck.domain import Run, utcnow
from ondeck.engine import dispatch, runs, secret_store
from ondeck.engine.admission import AdmissionPolicy, parse_idempotency_key
from ondeck.engine.dispatch import Bound
from ondeck.errors import IdempotencyMismatch, InvalidRequest, OndeckError
from ondeck.spec.expressions import ExpressionError, expressions_in
from ondeck.store.store import Store
from ondeck.triggers import alertmanager, webhooks
from ondeck.triggers.webhooks import WebhookRefused
from ondeck.vault import Vault

log = logging.getLogger(__name__)

WEBHOOK_ROLE = "operator"


class HookSecretMissing(OndeckError):
    code = "webhook-secret-missing"
    status = 503
    title = "Webhook secret not set"


@dataclass(frozen=True)
class Delivery:
    """One request to ``POST /hooks/{hook_id}``: headers (names in lower case) and the raw body."""

    hook_id: str
    headers: Mapping[str, str] = field(repr=False)  # may carry the secret itself (token schemes)
    body: bytes = field(repr=False)
    callback_url: str | None = None
    remote: str | None = None


@dataclass(frozen=True)
class Intake:
    """Runs started (or, for a repeated delivery, found) and how many events ``when`` turned away."""

    runs: list[Run]
    skipped: int


@dataclass(frozen=True)
class _Firing:
    bound: Bound
    event: dict[str, Any]
    key: str | None
    # A key derived from the sender's own delivery id names the occurrence, not its
    # params: a repeat whose params differ (an alert's annotations moved) is still a repeat.
    key_is_derived: bool


def webhook_principal(hook_id: str) -> Principal:
    return Principal(f"webhook:{hook_id}", frozenset({WEBHOOK_ROLE}))


def receive_webhook(
    store: Store, vault: Vault, policy: AdmissionPolicy, delivery: Delivery, now: float | None = None
) -> Intake:
    """Verify ``delivery`` against its hook's secret, then fire its trigger once per event.

    ``NotFound`` for an unknown hook, ``HookSecretMissing`` when the secret is
    not set, ``WebhookRefused`` (audited) when the request does not prove the
    secret; an admission refusal propagates as it is.
    """
    bound = dispatch.webhook(store, delivery.hook_id)
    spec = bound.trigger.webhook
    assert spec is not None
    secret = _hook_secret(store, vault, bound, spec.secret)
    try:
        webhooks.verify(spec.scheme, secret, delivery.headers, delivery.body, now)
    except WebhookRefused as refusal:
        _audit_refusal(store, delivery, bound, spec.scheme, refusal)
        raise
    firings = [_Firing(bound, event, key, derived) for event, key, derived in _events(spec.scheme, delivery)]
    return _fire_all(
        store, policy, firings, webhook_principal(delivery.hook_id), "webhook", delivery.callback_url
    )


def receive_event(
    store: Store,
    policy: AdmissionPolicy,
    principal: Principal,
    source: str,
    event_type: str | None,
    event_id: str | None,
    data: Any,
    callback_url: str | None = None,
) -> Intake:
    """Fire every ``event`` trigger for (source, type); the same (source, id) twice starts nothing new."""
    require(principal, Permission.TRIGGER, "post events")
    event = {"source": source, "type": event_type, "id": event_id, "data": data}
    key = f"event:{source}:{event_id}" if event_id is not None else None
    firings = [
        _Firing(bound, event, key, key is not None) for bound in dispatch.events(store, source, event_type)
    ]
    return _fire_all(store, policy, firings, principal, "event", callback_url)


def _hook_secret(store: Store, vault: Vault, bound: Bound, name: str) -> str:
    automation = bound.automation
    # Only a fixed environment can scope the secret: a computed one depends on params,
    # which come from the body, which is not to be read before it is verified.
    environment = automation.environment
    if environment is not None and expressions_in(environment):
        environment = None
    try:
        return secret_store.resolve(store, vault, [name], automation.name, environment)[name]
    except secret_store.MissingSecret as exc:
        # The sender is not known yet (the secret is what would tell): the server's log,
        # not the answer, names the secret and the automation.
        log.warning(
            "webhook secret %s is not set (for automation %r); an admin sets it with PUT /api/v1/secrets/%s",
            name,
            automation.name,
            name,
        )
        raise HookSecretMissing(
            "this webhook cannot verify deliveries yet: its secret is not set (the server's log names it)"
        ) from exc


def _audit_refusal(
    store: Store, delivery: Delivery, bound: Bound, scheme: str, refusal: WebhookRefused
) -> None:
    with store.transaction() as tx:
        tx.append_audit(
            webhook_principal(delivery.hook_id).name,
            "webhook.refused",
            f"automation:{bound.automation.name}",
            {"hook": delivery.hook_id, "scheme": scheme, "reason": refusal.detail, "remote": delivery.remote},
            utcnow(),
        )


def _events(scheme: str, delivery: Delivery) -> list[tuple[dict[str, Any], str | None, bool]]:
    """(event, idempotency key, key derived from the sender's id?) for each event in the delivery."""
    headers = delivery.headers
    if scheme == "alertmanager":
        return [
            (alert.event, f"alertmanager:{alert.key}", True) for alert in alertmanager.decode(delivery.body)
        ]
    sent_key = headers.get("idempotency-key")
    fallback = parse_idempotency_key(sent_key) if sent_key is not None else None
    data = _data(headers, delivery.body)
    if scheme == "github":
        event_type = headers.get("x-github-event")
        if not event_type:
            raise InvalidRequest("missing X-GitHub-Event header")
        delivery_id = headers.get("x-github-delivery")
        event = {"source": "github", "type": event_type, "id": delivery_id, "data": data}
        if delivery_id:
            return [(event, f"github:{delivery_id}", True)]
        return [(event, fallback, False)]
    message_id = headers.get("webhook-id")
    event = {"source": "webhook", "type": delivery.hook_id, "id": message_id, "data": data}
    if scheme == "standard" and message_id:
        return [(event, f"standard:{message_id}", True)]
    return [(event, fallback, False)]


def _data(headers: Mapping[str, str], body: bytes) -> Any:
    """The body as JSON; GitHub's form-encoded ``payload=``; else ``{"raw": text}`` (as
    when its JSON holds text no store can keep: see ``storable``)."""
    text = body.decode("utf-8", errors="replace")
    media_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "application/x-www-form-urlencoded":
        form = parse_qs(text)
        if "payload" in form:
            text = form["payload"][0]
    # NUL, which no store keeps in text, becomes U+FFFD as bytes that are not UTF-8 do.
    text = text.replace("\x00", "\ufffd")
    with contextlib.suppress(ValueError):
        return storable.load_json(text.encode())
    return {"raw": text}


def _fire_all(
    store: Store,
    policy: AdmissionPolicy,
    firings: list[_Firing],
    principal: Principal,
    via: str,
    callback_url: str | None,
) -> Intake:
    # A refusal stops the rest; runs already admitted stay, and since every one has
    # its idempotency key the sender's retry finds them instead of starting them again.
    started: list[Run] = []
    skipped = 0
    for firing in firings:
        try:
            run = dispatch.fire(
                store, policy, firing.bound, firing.event, principal, via, firing.key, callback_url
            )
        except ExpressionError as exc:
            automation = firing.bound.automation.name
            raise InvalidRequest(f"trigger {firing.bound.index} of {automation!r}: {exc}") from exc
        except IdempotencyMismatch as exc:
            if not firing.key_is_derived or "run_id" not in exc.extensions:
                raise
            run = runs.get(store, exc.extensions["run_id"])
        if run is None:
            skipped += 1
        else:
            started.append(run)
    return Intake(started, skipped)
