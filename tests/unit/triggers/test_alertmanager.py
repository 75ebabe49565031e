"""Decoding Alertmanager notifications (payload version 4) into one event per alert."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ondeck.triggers import alertmanager
from ondeck.triggers.alertmanager import InvalidNotification

GROUP = {
    "version": "4",
    "groupKey": '{}/{severity="page"}:{alertname="HighCPU"}',
    "truncatedAlerts": 0,
    "status": "firing",
    "receiver": "ondeck",
    "groupLabels": {"alertname": "HighCPU"},
    "commonLabels": {"alertname": "HighCPU", "severity": "page"},
    "commonAnnotations": None,
    "externalURL": "http://alertmanager.example:9093",
}


def alert(instance: str, status: str = "firing", **extra: Any) -> dict[str, Any]:
    return {
        "status": status,
        "labels": {"alertname": "HighCPU", "instance": instance, "severity": "page"},
        "annotations": {"summary": f"CPU above 90% on {instance}"},
        "startsAt": "2024-05-02T10:15:30.123456789Z",
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus.example:9090/graph?g0.expr=cpu",
        "fingerprint": f"fp{instance.replace(':', '')}",
        **extra,
    }


def notification(*alerts: dict[str, Any], **group: Any) -> bytes:
    return json.dumps({**GROUP, **group, "alerts": list(alerts)}).encode()


def test_each_alert_becomes_an_event_with_the_group_fields() -> None:
    decoded = alertmanager.decode(notification(alert("web-1:9100"), alert("web-2:9100")))
    assert [a.event["labels"]["instance"] for a in decoded] == ["web-1:9100", "web-2:9100"]
    event = decoded[0].event
    assert event["receiver"] == "ondeck"
    assert event["groupKey"] == GROUP["groupKey"]
    assert event["groupLabels"] == {"alertname": "HighCPU"}
    assert event["commonLabels"]["severity"] == "page"
    assert event["externalURL"] == "http://alertmanager.example:9093"
    assert event["annotations"]["summary"] == "CPU above 90% on web-1:9100"
    assert event["generatorURL"].startswith("http://prometheus.example")
    assert event["status"] == "firing"


def test_null_common_annotations_and_go_zero_end_time_are_accepted() -> None:
    [decoded] = alertmanager.decode(notification(alert("web-1:9100")))
    assert decoded.event["commonAnnotations"] == {}
    assert decoded.event["endsAt"] is None
    ended = alert("web-1:9100", "resolved", endsAt="2024-05-02T10:45:00Z")
    [resolved] = alertmanager.decode(notification(ended, status="resolved"))
    assert resolved.event["endsAt"] == "2024-05-02T10:45:00Z"


def test_key_is_fingerprint_start_and_status() -> None:
    [firing] = alertmanager.decode(notification(alert("web-1:9100")))
    assert firing.key == "fpweb-19100:2024-05-02T10:15:30.123456789Z:firing"
    # A repeat notification (new annotations, same alert) keeps the key; resolution changes it.
    repeat = alert("web-1:9100", annotations={"summary": "CPU above 95%"})
    [repeated] = alertmanager.decode(notification(repeat))
    assert repeated.key == firing.key
    [resolved] = alertmanager.decode(notification(alert("web-1:9100", "resolved")))
    assert resolved.key != firing.key and resolved.key.endswith(":resolved")
    # The same alert firing again later is a new occurrence.
    [again] = alertmanager.decode(notification(alert("web-1:9100", startsAt="2024-05-03T08:00:00Z")))
    assert again.key != firing.key


def test_without_a_fingerprint_the_labels_identify_the_alert() -> None:
    first = alert("web-1:9100")
    del first["fingerprint"]
    [a] = alertmanager.decode(notification(first))
    [b] = alertmanager.decode(notification(first))
    other = {**first, "labels": {**first["labels"], "instance": "web-2:9100"}}
    [c] = alertmanager.decode(notification(other))
    assert a.key == b.key != c.key


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "not JSON"),
        (b"[" * 5000 + b"]" * 5000, "not JSON"),
        (b"[]", "not a JSON object"),
        (json.dumps({**GROUP, "version": "3", "alerts": []}).encode(), "version"),
        (json.dumps({**GROUP, "alerts": None}).encode(), "alerts"),
        (notification(alert("a", status="pending")), "alerts[0].status"),
        (notification({**alert("a"), "startsAt": None}), "startsAt"),
        (notification({**alert("a"), "labels": ["x"]}), "alerts[0].labels"),
        (notification(alert("a"), commonLabels="x"), "commonLabels"),
    ],
)
def test_what_is_not_a_notification_is_refused_saying_why(body: bytes, message: str) -> None:
    with pytest.raises(InvalidNotification) as caught:
        alertmanager.decode(body)
    assert message in caught.value.detail
    assert caught.value.status == 400
