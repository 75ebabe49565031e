"""Leases across hosts whose clocks disagree, on PostgreSQL: every lease is written and
judged in the database's time, so no skew lets a reaper end a healthy attempt (and
another worker run it again). Each host is a store given a shifted local clock."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from ondeck import blocking
from ondeck.auth.principals import SYSTEM
from ondeck.domain import Outcome, RunStatus, utcnow
from ondeck.engine import finish, outbox, queue, runs
from ondeck.engine.admission import TriggerRequest, admit
from ondeck.ids import new_id
from ondeck.settings import Settings
from ondeck.store.store import Store
from tests.unit.engine.test_lifecycle import LEASE, claim, define
from tests.unit.engine.test_worker import _run_worker, _until
from tests.unit.store.test_clock import CLOSE, MINUTE, SkewedClock, database_now

Host = Callable[[timedelta], Store]
SKEWS = pytest.mark.parametrize("skew", [-MINUTE, MINUTE], ids=["behind", "ahead"])


@pytest.fixture
def host(pg_store: Store, pg_url: str) -> Iterator[Host]:
    """Another host on ``pg_store``'s database, whose clock is off by the given skew."""
    made: list[Store] = []

    def on(skew: timedelta) -> Store:
        made.append(Store(pg_url, clock=SkewedClock(skew)))
        return made[-1]

    yield on
    for store in made:
        store.dispose()


def _lease_left(store: Store, run_id: str) -> timedelta:
    """How long the run's lease has to go by the database's clock."""
    expires = runs.get(store, run_id).lease_expires_at
    assert expires is not None
    return expires - database_now()


@SKEWS
def test_a_worker_whose_clock_is_off_writes_leases_that_hold_by_the_databases_clock(
    pg_store: Store, host: Host, skew: timedelta
) -> None:
    worker = host(skew)
    define(pg_store)
    run = admit(pg_store, TriggerRequest("job")).run
    (claimed,) = claim(worker)
    assert LEASE - CLOSE < _lease_left(pg_store, run.id) <= LEASE
    assert queue.still_held(worker, [claimed], LEASE) == [claimed]  # with most of its lease to go
    with pg_store.transaction() as tx:  # the lease nearly spent, as a heartbeat is due
        tx.update_run(run.id, lease_expires_at=database_now() + timedelta(seconds=2))
    assert queue.renew_leases(worker, "w1", LEASE, [(run.id, 1)]) == {(run.id, 1): False}
    assert LEASE - CLOSE < _lease_left(pg_store, run.id) <= LEASE
    assert finish.reap_expired_leases(pg_store) == []


def test_a_reaper_whose_clock_is_ahead_leaves_a_healthy_lease_alone(pg_store: Store, host: Host) -> None:
    define(pg_store)
    run = admit(pg_store, TriggerRequest("job")).run
    claim(pg_store)
    assert finish.reap_expired_leases(host(MINUTE)) == []
    assert runs.get(pg_store, run.id).status == RunStatus.RUNNING


@pytest.mark.parametrize("skew", [-MINUTE, timedelta(0), MINUTE], ids=["behind", "right", "ahead"])
def test_a_lease_lapsed_by_the_databases_clock_is_reaped_whatever_the_reapers_clock_says(
    pg_store: Store, host: Host, skew: timedelta
) -> None:
    define(pg_store)
    run = admit(pg_store, TriggerRequest("job")).run
    claim(pg_store)
    with pg_store.transaction() as tx:
        tx.update_run(run.id, lease_expires_at=database_now() - timedelta(seconds=1))
    assert finish.reap_expired_leases(host(skew)) == [(run.id, 1)]
    assert runs.get(pg_store, run.id).status == RunStatus.FAILED


def test_a_run_admitted_on_a_host_ahead_is_due_at_once_for_a_worker_behind(
    pg_store: Store, host: Host
) -> None:
    """Reckoned in each host's own time, it would wait two minutes for its first worker."""
    define(pg_store)
    run = admit(host(MINUTE), TriggerRequest("job")).run
    assert [c.run.id for c in claim(host(-MINUTE))] == [run.id]


def test_a_retry_waits_out_its_backoff_whatever_the_clocks_of_the_hosts_that_end_and_claim_it(
    pg_store: Store, host: Host
) -> None:
    """The attempt ended on a host behind: a worker ahead must not start the retry two
    minutes before its backoff is over, nor one behind it two minutes after."""
    define(pg_store, retries={"attempts": 2, "backoff": "20s"})
    run = admit(pg_store, TriggerRequest("job")).run
    (first,) = claim(host(-MINUTE))
    assert finish.finish(host(-MINUTE), first, Outcome(RunStatus.FAILED, 1, "exit code 1"))
    assert claim(host(MINUTE)) == []
    with pg_store.transaction() as tx:  # as if its backoff were over
        tx.update_run(run.id, not_before=database_now() - timedelta(seconds=1))
    assert [c.run.attempt for c in claim(host(-MINUTE))] == [2]


def test_each_pass_of_the_reaper_reads_the_databases_clock_again(pg_store: Store, pg_url: str) -> None:
    clock = SkewedClock(MINUTE)
    reaper = Store(pg_url, clock=clock)
    try:
        finish.reap_expired_leases(reaper)
        offset = reaper.clock_offset
        assert offset is not None and abs(offset + MINUTE) < CLOSE
        clock.by = -MINUTE  # NTP or an operator set it back two minutes
        finish.reap_expired_leases(reaper)
        offset = reaper.clock_offset
        assert offset is not None and abs(offset - MINUTE) < CLOSE
    finally:
        reaper.dispose()


def test_the_worker_heartbeat_reads_the_databases_clock_again_even_when_idle(
    pg_store: Store, pg_url: str, tmp_path: Path
) -> None:
    clock = SkewedClock(timedelta(0))
    worker_store = Store(pg_url, clock=clock)
    settings = Settings(data_dir=tmp_path, lease_seconds=1.5, kill_grace_seconds=0.2, poll_seconds=120)

    def offset_is(expected: timedelta) -> bool:
        offset = worker_store.clock_offset
        return offset is not None and abs(offset - expected) < CLOSE

    async def scenario() -> None:
        await blocking.run(worker_store.sync_clock)
        assert offset_is(timedelta(0))
        clock.by = -MINUTE
        await _until("a heartbeat reads the clock again", lambda: offset_is(MINUTE), seconds=10)

    try:
        _run_worker(worker_store, settings, scenario)
    finally:
        worker_store.dispose()


def test_a_run_on_a_worker_behind_a_reaper_that_is_ahead_runs_once(
    pg_store: Store, host: Host, tmp_path: Path
) -> None:
    """Two minutes apart, four times the lease: reckoned in each host's own time, the
    reaper would find every lease the worker wrote long lapsed, end the attempt, and
    have the run started again."""
    worker, reaper = host(-MINUTE), host(MINUTE)
    settings = Settings(data_dir=tmp_path, lease_seconds=3, kill_grace_seconds=0.2, poll_seconds=120)
    define(pg_store, run={"runtime": "bash", "script": "sleep 4"}, retries={"attempts": 2, "backoff": "0s"})
    reaped: list[tuple[str, int]] = []

    async def scenario() -> None:
        run = admit(pg_store, TriggerRequest("job")).run
        deadline = time.monotonic() + 30
        while not runs.get(pg_store, run.id).status.terminal:  # reaping all along, as a server does
            assert time.monotonic() < deadline, "timed out waiting until the run ends"
            reaped.extend(await blocking.run(finish.reap_expired_leases, reaper))
            await asyncio.sleep(0.05)
        detail = runs.detail(pg_store, SYSTEM, run.id)
        assert detail.run.status == RunStatus.SUCCEEDED
        assert [(a.number, a.status) for a in detail.attempts] == [(1, "succeeded")]

    _run_worker(worker, settings, scenario)
    assert reaped == []


def test_deliveries_are_due_and_held_by_the_databases_clock(pg_store: Store, host: Host) -> None:
    """A callback is sent by whichever process claims it first and held from the others
    for a while: a sender whose clock runs ahead past the hold would send it again, and
    one whose clock is behind would leave a new one waiting for as long."""
    define(pg_store)
    run = admit(pg_store, TriggerRequest("job")).run
    with pg_store.transaction() as tx:
        tx.insert_delivery(new_id(), run.id, "http://127.0.0.1:9/hook", "callback", {}, utcnow())
    behind, ahead = host(-2 * MINUTE), host(2 * MINUTE)
    (claimed,) = outbox._claim(behind, 10)
    assert claimed["run_id"] == run.id
    assert outbox._claim(ahead, 10) == []  # held by the first sender, whatever this host's clock says
