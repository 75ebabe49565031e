from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from ondeck.engine.outbox import Destinations
from ondeck.engine.scheduler import due_ticks
from ondeck.spec.triggers import ScheduleSpec, Trigger

T0 = datetime(2026, 11, 23, 10, 0, 0, tzinfo=UTC)


def spec(catch_up: str, cron: str = "*/5 * * * *") -> ScheduleSpec:
    return ScheduleSpec.model_validate({"cron": cron, "catch_up": catch_up})


def test_all_fires_every_missed_tick() -> None:
    assert due_ticks(spec("all"), T0, T0 + timedelta(minutes=16)) == [
        T0 + timedelta(minutes=m) for m in (5, 10, 15)
    ]


def test_latest_fires_only_the_most_recent_missed_tick() -> None:
    assert due_ticks(spec("latest"), T0, T0 + timedelta(minutes=16)) == [T0 + timedelta(minutes=15)]


def test_none_skips_ticks_missed_by_more_than_a_moment() -> None:
    assert due_ticks(spec("none"), T0, T0 + timedelta(minutes=16)) == []
    assert due_ticks(spec("none"), T0, T0 + timedelta(minutes=15, seconds=2)) == [T0 + timedelta(minutes=15)]


def test_nothing_due_before_the_first_tick() -> None:
    assert due_ticks(spec("all"), T0, T0 + timedelta(minutes=4)) == []


def test_six_fields_means_seconds_first_and_timezones_apply() -> None:
    every_two = spec("all", "*/2 * * * * *")
    assert due_ticks(every_two, T0, T0 + timedelta(seconds=5)) == [T0 + timedelta(seconds=s) for s in (2, 4)]
    berlin = ScheduleSpec.model_validate({"cron": "0 9 * * *", "timezone": "Europe/Berlin"})
    assert berlin.next_after(T0) == datetime(2026, 11, 24, 8, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    "bad", [{"cron": "61 * * * *"}, {"cron": "* * *"}, {"cron": "0 9 * * *", "timezone": "Mars/Olympus"}]
)
def test_invalid_schedules_are_refused(bad: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        ScheduleSpec.model_validate(bad)


def test_trigger_params_and_condition_read_the_event() -> None:
    trigger = Trigger.model_validate(
        {
            "event": {"source": "ci"},
            "when": "${{ event.data.branch == 'main' }}",
            "params": {"sha": "${{ event.data.sha }}", "fixed": 3, "msg": "build ${{ event.data.sha }}"},
        }
    )
    event = {"source": "ci", "data": {"branch": "main", "sha": "abc"}}
    assert trigger.matches(event) and not trigger.matches({"data": {"branch": "dev"}})
    assert trigger.params_for(event) == {"sha": "abc", "fixed": 3, "msg": "build abc"}


def test_a_trigger_is_exactly_one_kind() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        Trigger.model_validate({"event": {"source": "a"}, "slack": {"command": "x"}})


@pytest.mark.parametrize(
    ("url", "refused"),
    [
        ("http://127.0.0.1:9/x", True),
        ("http://10.1.2.3/x", True),
        ("http://169.254.169.254/latest/meta-data", True),
        ("http://[::1]/x", True),
        ("http://192.168.1.10/x", True),
        ("http://8.8.8.8/x", False),
    ],
)
def test_private_destinations_are_refused_unless_allowed(url: str, refused: bool) -> None:
    assert (Destinations(None).refusal(url) is not None) == refused
    assert Destinations("127.0.0.0/8,10.0.0.0/8,169.254.0.0/16,::1/128,192.168.0.0/16").refusal(url) is None
