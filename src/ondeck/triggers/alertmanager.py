"""Prometheus Alertmanager webhook notifications (payload version "4") as events.

A notification carries a group of alerts; each alert becomes an event of its
own (the alert object plus the group's fields), so a trigger's ``when`` and
``params`` look at one alert's labels at a time.

Alertmanager re-sends a group every ``repeat_interval`` while it fires, and
retries a notification that failed. The de-duplication key — fingerprint,
startsAt, status — is the same across those repeats, so they start nothing
new; the ``resolved`` notification of the same alert has a key of its own.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from ondeck import storable
from ondeck.errors import InvalidRequest

VERSION = "4"
GROUP_FIELDS = ("receiver", "groupKey", "groupLabels", "commonLabels", "commonAnnotations", "externalURL")
_GROUP_MAPS = ("groupLabels", "commonLabels", "commonAnnotations")
STATUSES = ("firing", "resolved")
# Go's zero time.Time: what Alertmanager sends as endsAt for an alert with no end yet.
ZERO_TIME = "0001-01-01T00:00:00Z"


class InvalidNotification(InvalidRequest):
    code = "invalid-alertmanager-notification"
    title = "Not an Alertmanager notification"


@dataclass(frozen=True)
class Alert:
    """One alert of a notification, as the event triggers see, and its de-duplication key."""

    event: dict[str, Any]
    key: str


def decode(body: bytes) -> list[Alert]:
    """Every alert of a version 4 notification; ``InvalidNotification`` says what does not fit."""
    try:
        payload = storable.load_json(body)
    except ValueError as exc:  # the reason says where, never what: it does not quote the body
        raise InvalidNotification(f"the body is not JSON ondeck can keep: {exc}") from exc
    if not isinstance(payload, dict):
        raise InvalidNotification("the body is not a JSON object")
    if payload.get("version") != VERSION:
        raise InvalidNotification(
            f"Alertmanager payload version {payload.get('version')!r} is not supported; expected {VERSION!r}"
        )
    alerts = payload.get("alerts")
    if not isinstance(alerts, list):
        raise InvalidNotification("alerts is missing or not a list")
    group = {name: payload.get(name) for name in GROUP_FIELDS}
    for name in _GROUP_MAPS:
        group[name] = _mapping(payload.get(name), name)
    return [_alert(index, alert, group) for index, alert in enumerate(alerts)]


def _mapping(value: Any, where: str) -> dict[str, Any]:
    # Alertmanager sends null for an empty map (commonAnnotations, often).
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidNotification(f"{where} is not an object")
    return value


def _alert(index: int, raw: Any, group: dict[str, Any]) -> Alert:
    where = f"alerts[{index}]"
    if not isinstance(raw, dict):
        raise InvalidNotification(f"{where} is not an object")
    status = raw.get("status")
    if status not in STATUSES:
        raise InvalidNotification(f"{where}.status is {status!r}; expected firing or resolved")
    starts_at = raw.get("startsAt")
    if not isinstance(starts_at, str) or not starts_at:
        raise InvalidNotification(f"{where}.startsAt is missing")
    labels = _mapping(raw.get("labels"), f"{where}.labels")
    ends_at = raw.get("endsAt")
    fingerprint = raw.get("fingerprint")
    if not isinstance(fingerprint, str) or not fingerprint:
        # Alertmanager before 0.19 sent none: the labels identify the alert.
        fingerprint = hashlib.sha256(json.dumps(labels, sort_keys=True).encode()).hexdigest()[:16]
    event = {
        **group,
        **raw,
        "labels": labels,
        "annotations": _mapping(raw.get("annotations"), f"{where}.annotations"),
        "endsAt": None if ends_at in (None, "", ZERO_TIME) else ends_at,
        "fingerprint": fingerprint,
    }
    return Alert(event, f"{fingerprint}:{starts_at}:{status}")
