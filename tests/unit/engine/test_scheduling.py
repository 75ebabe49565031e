from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import update

from ondeck.auth.principals import SYSTEM
from ondeck.domain import utcnow
from ondeck.engine import catalog, outbox, runs, scheduler
from ondeck.engine.admission import AdmissionPolicy, TriggerRequest, admit
from ondeck.engine.outbox import Destinations
from ondeck.engine.scheduler import due_ticks, fire_due, listing
from ondeck.errors import InvalidDefinition, InvalidRequest
from ondeck.spec.loader import parse_definition
from ondeck.spec.triggers import ScheduleSpec, Trigger
from ondeck.store.store import Store
from ondeck.store.tables import automation_versions
from tests.support import wait_until

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


@pytest.mark.parametrize("cron", ["0 0 30 2 *", "0 0 31 4 *", "0 0 0 31 11 *"])
def test_a_cron_that_never_fires_is_refused_naming_the_field(cron: str) -> None:
    """It once made every pass of the scheduler fail, so no schedule fired, and listing them was a 500."""
    definition = {"name": "never", "run": {"runtime": "bash", "script": "true"}}
    with pytest.raises(InvalidDefinition, match=r"ops/never.yaml: triggers.0.schedule: .* never fires"):
        parse_definition({**definition, "triggers": [{"schedule": {"cron": cron}}]}, "ops/never.yaml")


def test_a_cron_that_fires_only_in_leap_years_is_accepted() -> None:
    leap_day = spec("all", "0 0 29 2 *")
    assert leap_day.next_after(datetime(2097, 3, 1, tzinfo=UTC)) == datetime(2104, 2, 29, tzinfo=UTC)


def schedule(store: Store, name: str, cron: str) -> None:
    definition = {"name": name, "run": {"runtime": "bash", "script": "true"}}
    catalog.apply(store, parse_definition({**definition, "triggers": [{"schedule": {"cron": cron}}]}))


def fired_runs(store: Store) -> list[str]:
    started, _ = fire_due(store, AdmissionPolicy())
    return [runs.get(store, run_id).automation for run_id in started]


def test_a_schedule_stored_by_an_older_release_that_never_fires_spares_the_others(store: Store) -> None:
    schedule(store, "never", "0 2 * * *")
    never = {"name": "never", "run": {"runtime": "bash", "script": "true"}}
    with store.transaction() as tx:  # as a release that did not check it stored it
        tx._c.execute(
            update(automation_versions)
            .where(automation_versions.c.name == "never")
            .values(
                definition={**never, "triggers": [{"schedule": {"cron": "0 0 30 2 *"}}]},
                digest="stored-by-an-older-release",
            )
        )
    schedule(store, "ticker", "* * * * * *")
    assert wait_until(lambda: fired_runs(store), timeout=10, message="the ticker to fire") == ["ticker"]
    assert [s.automation for s in listing(store)] == ["ticker"]


def test_a_schedule_that_fails_is_passed_over_and_the_others_fire(
    store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    schedule(store, "broken", "0 2 * * *")
    schedule(store, "ticker", "* * * * * *")
    ticks = scheduler.due_ticks

    def failing_for_broken(spec: ScheduleSpec, since: datetime, now: datetime) -> list[datetime]:
        if spec.cron == "0 2 * * *":
            raise RuntimeError("cannot compute the ticks")
        return ticks(spec, since, now)

    monkeypatch.setattr(scheduler, "due_ticks", failing_for_broken)
    assert wait_until(lambda: fired_runs(store), timeout=10, message="the ticker to fire") == ["ticker"]
    assert "schedule broken#0 failed; the other schedules go on" in caplog.text


def test_a_webhook_id_is_short_enough_for_its_principal_to_be_stored() -> None:
    """A delivery runs as webhook:<id>, kept in 100 characters: PostgreSQL refused longer ones."""
    hook = {"scheme": "token", "secret": "HOOK_TOKEN"}
    assert Trigger.model_validate({"webhook": {**hook, "id": "h" * 92}}).webhook is not None
    definition = {"name": "hooked", "run": {"runtime": "bash", "script": "true"}}
    with pytest.raises(
        InvalidDefinition, match=r"ops/hooked.yaml: triggers.0.webhook.id: String should match"
    ):
        parse_definition(
            {**definition, "triggers": [{"webhook": {**hook, "id": "h" * 93}}]}, "ops/hooked.yaml"
        )


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


def test_a_host_no_resolver_takes_is_refused_at_admission_and_at_sending() -> None:
    """A label past 63 characters made the resolver raise a UnicodeError, which killed the
    sender: no delivery of any run went out again, not even after a restart."""
    url = f"http://{'a' * 64}.example.com/"
    with pytest.raises(InvalidRequest, match="callback URL must be an http"):
        outbox.check_url(url)
    assert "cannot resolve" in (Destinations(None).refusal(url) or "")


def test_a_delivery_the_sender_fails_on_fails_alone_and_the_others_go_out(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog.apply(store, parse_definition({"name": "job", "run": {"runtime": "bash", "script": "true"}}))
    run = admit(store, TriggerRequest("job")).run
    with store.transaction() as tx:
        for delivery_id in ("d1", "d2"):
            tx.insert_delivery(
                delivery_id, run.id, f"https://{delivery_id}.example/", "callback", {}, utcnow()
            )
    sent: list[str] = []

    async def send(delivery: dict[str, Any], *_: Any) -> tuple[int | None, str | None]:
        sent.append(delivery["id"])
        if len(sent) == 1:
            raise RuntimeError("a bug in sending")
        return 200, None

    monkeypatch.setattr(outbox, "send", send)

    async def main() -> None:
        stop = asyncio.Event()
        sender = asyncio.create_task(
            outbox.deliver_forever(store, "s", Destinations(None), 60, asyncio.Event(), stop)
        )
        while len(sent) < 2 and not sender.done():
            await asyncio.sleep(0.01)
        stop.set()
        await sender

    asyncio.run(asyncio.wait_for(main(), 30))
    statuses = {d["id"]: (d["status"], d["attempts"]) for d in runs.deliveries(store, SYSTEM, run.id)}
    first, second = sent
    assert statuses == {first: ("pending", 1), second: ("delivered", 1)}


def test_a_pass_looks_again_at_a_schedule_only_when_its_tick_comes_or_it_changed(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass a second once computed every schedule's ticks and read its last fire, so an
    idle server's scheduler grew with the catalog."""
    looked: list[str] = []
    look = scheduler._fire_schedule

    def counted(store: Store, policy: AdmissionPolicy, name: str, *rest: Any) -> Any:
        looked.append(name)
        return look(store, policy, name, *rest)

    monkeypatch.setattr(scheduler, "_fire_schedule", counted)
    quiet: dict[str, scheduler.Quiet] = {}
    fired: list[str] = []

    def passes(count: int) -> list[str]:
        for _ in range(count):
            fired.extend(fire_due(store, AdmissionPolicy(), quiet)[0])
        return fired

    schedule(store, "nightly", "0 2 * * *")
    passes(3)
    assert looked == ["nightly", "nightly"]  # the first pass makes its state: not quiet yet

    scheduler.set_paused(store, SYSTEM, "nightly", 0, True)
    passes(1)
    scheduler.set_paused(store, SYSTEM, "nightly", 0, False)
    passes(2)
    assert looked == ["nightly"] * 4 and fired == []

    schedule(store, "nightly", "* * * * * *")  # every second now: its ticks come
    wait_until(lambda: len(passes(1)) >= 2, timeout=10, message="two ticks to fire")
    assert {runs.get(store, run_id).automation for run_id in fired} == {"nightly"}
