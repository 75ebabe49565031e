"""Cron schedules: each tick fires exactly once across any number of processes.

Every server process runs this loop. A tick is claimed by inserting
(schedule, fire time) under a unique key in the same transaction as its run,
so two processes racing for one tick produce one run — no leader election
that could split-brain. After downtime, ``catch_up`` decides what happens to
missed ticks: ``none`` skips them, ``latest`` fires the most recent one,
``all`` fires each (at most 1,000).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from ondeck import blocking
from ondeck.auth.principals import Principal
from ondeck.domain import utcnow
from ondeck.engine import catalog
from ondeck.engine.admission import AdmissionPolicy, TriggerRequest, admit
from ondeck.errors import NotFound, OndeckError, StoreUnavailable
from ondeck.spec.triggers import ScheduleSpec, Trigger
from ondeck.store.store import IntegrityError, Store
from ondeck.streaks import Failures

log = logging.getLogger(__name__)
MAX_CATCH_UP = 1000
ON_TIME = timedelta(seconds=5)  # with catch_up none, a tick this late still fires


@dataclass(frozen=True)
class Schedule:
    key: str
    automation: str
    index: int
    spec: ScheduleSpec
    paused: bool
    next_fire_at: datetime | None


def schedule_key(automation: str, index: int) -> str:
    return f"{automation}#{index}"


def due_ticks(spec: ScheduleSpec, since: datetime, now: datetime) -> list[datetime]:
    """Ticks after ``since`` up to ``now`` that should fire, per ``catch_up``."""
    ticks: list[datetime] = []
    moment = since
    while len(ticks) < MAX_CATCH_UP:
        moment = spec.next_after(moment)
        if moment > now:
            break
        ticks.append(moment)
    if spec.catch_up == "all":
        return ticks
    if spec.catch_up == "latest":
        return ticks[-1:]
    return [t for t in ticks[-1:] if now - t <= ON_TIME]


def listing(store: Store, now: datetime | None = None) -> list[Schedule]:
    """Every schedule of the catalog with its pause state and next fire time."""
    now = now or utcnow()
    with store.read() as tx:
        states = tx.schedule_states()
    found = []
    for automation in catalog.definitions(store):
        for index, trigger in enumerate(automation.triggers):
            if trigger.schedule is None:
                continue
            key = schedule_key(automation.name, index)
            paused = bool(states.get(key, {}).get("paused", False))
            next_fire = None if paused else trigger.schedule.next_after(now)
            found.append(Schedule(key, automation.name, index, trigger.schedule, paused, next_fire))
    return found


def visible(store: Store, principal: Principal) -> list[Schedule]:
    names = catalog.visible_names(store, principal)
    return [s for s in listing(store) if names is None or s.automation in names]


def set_paused(store: Store, principal: Principal, automation: str, index: int, paused: bool) -> Schedule:
    key = schedule_key(automation, index)
    match = [s for s in listing(store) if s.key == key]
    if not match:
        raise NotFound(f"automation {automation!r} has no schedule #{index}")
    now = utcnow()
    with store.transaction() as tx:
        tx.ensure_schedule(key, automation, now)
        tx.set_schedule_paused(key, paused, now)
        tx.append_audit(
            principal.name, "schedule.paused" if paused else "schedule.resumed", f"schedule:{key}", {}, now
        )
    return next(s for s in listing(store) if s.key == key)


@dataclass(frozen=True)
class Quiet:
    """A schedule as it was last looked at, and its next tick: until then, with the same
    spec and state, nothing of it can be due, and a pass need not look (see ``fire_due``)."""

    spec: ScheduleSpec
    state: dict[str, Any]
    until: datetime


def fire_due(
    store: Store, policy: AdmissionPolicy, quiet: dict[str, Quiet] | None = None
) -> tuple[list[str], datetime | None]:
    """Fire every due tick; returns the runs started and when the next tick is due.

    A schedule that fails is logged and passed over, so it cannot stop the others firing.
    With ``quiet`` (kept from one pass to the next), a schedule whose spec and state are
    as they were and whose next tick has not come is passed over without a query or a
    cron computation: a pass a second costs about the same with one schedule or hundreds.
    A tick another process fired meanwhile is found fired when it comes, as before.
    """
    now = utcnow()
    started: list[str] = []
    upcoming: list[datetime] = []
    with store.read() as tx:
        states = tx.schedule_states()
    seen: dict[str, Quiet] = {}
    for automation in catalog.definitions(store):
        for index, trigger in enumerate(automation.triggers):
            spec = trigger.schedule
            if spec is None:
                continue
            key = schedule_key(automation.name, index)
            state = states.get(key)
            known = quiet.get(key) if quiet is not None else None
            if known is not None and known.spec == spec and known.state == state and now < known.until:
                seen[key] = known
                upcoming.append(known.until)
                continue
            try:
                fired, next_tick = _fire_schedule(store, policy, automation.name, index, trigger, state, now)
            except StoreUnavailable:
                raise
            except Exception:
                log.exception("schedule %s failed; the other schedules go on", key)
                continue
            started.extend(fired)
            if next_tick is not None:
                upcoming.append(next_tick)
                if state is not None:
                    seen[key] = Quiet(spec, state, next_tick)
    if quiet is not None:
        quiet.clear()
        quiet.update(seen)
    return started, min(upcoming, default=None)


def _fire_schedule(
    store: Store,
    policy: AdmissionPolicy,
    name: str,
    index: int,
    trigger: Trigger,
    state: dict[str, Any] | None,
    now: datetime,
) -> tuple[list[str], datetime | None]:
    """Fire one schedule's due ticks; returns the runs started and its next tick (None if paused)."""
    spec = trigger.schedule
    assert spec is not None
    key = schedule_key(name, index)
    if state is None:
        with store.transaction() as tx:
            state = tx.ensure_schedule(key, name, now)
    if state["paused"]:
        return [], None
    with store.read() as tx:
        last = tx.last_fire(key)
    since = max(last or state["first_seen"], state["first_seen"])
    started = []
    for tick in due_ticks(spec, since, now):
        run_id = _fire(store, policy, name, index, trigger, key, tick)
        if run_id:
            started.append(run_id)
    return started, spec.next_after(now)


def _fire(
    store: Store, policy: AdmissionPolicy, name: str, index: int, trigger: Trigger, key: str, tick: datetime
) -> str | None:
    stamp = tick.isoformat()
    event = {"source": "schedule", "type": "tick", "id": f"{key}@{stamp}", "data": {"fire_at": stamp}}
    try:
        if not trigger.matches(event):
            _mark(store, key, tick)
            return None
        request = TriggerRequest(
            name,
            trigger.params_for(event),
            "schedule",
            f"schedule:{key}:{stamp}",
            principal=Principal(f"schedule:{name}", frozenset({"operator"})),
            schedule_fire=(key, tick),
        )
        return admit(store, request, policy).run.id
    except IntegrityError:
        return None  # another process fired this tick
    except OndeckError as exc:
        log.error("schedule %s tick %s refused: %s", key, stamp, exc.detail)
        _mark(store, key, tick)
        return None


def _mark(store: Store, key: str, tick: datetime) -> None:
    """Record a tick that started no run, so it is not considered again."""
    with contextlib.suppress(IntegrityError), store.transaction() as tx:
        tx.insert_fire(key, tick, None)


async def schedule_forever(store: Store, policy: AdmissionPolicy, stop: asyncio.Event) -> None:
    """Wake at the next tick (at least every second, to see catalog changes)."""
    failures = Failures(log, "firing schedules")
    quiet: dict[str, Quiet] = {}
    while not stop.is_set():
        upcoming = None
        try:
            started, upcoming = await blocking.run(fire_due, store, policy, quiet)
            if started:
                log.info("schedules started runs: %s", ", ".join(started))
        except Exception:
            failures.failed()
        else:
            failures.succeeded()
        delay = 1.0
        if upcoming is not None:
            delay = min(1.0, max(0.0, (upcoming - utcnow()).total_seconds()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
