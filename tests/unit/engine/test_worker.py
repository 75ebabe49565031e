"""The worker's end-of-attempt transaction against a real store (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography.fernet import Fernet

from ondeck import blocking
from ondeck.auth.principals import SYSTEM
from ondeck.domain import LogChunk, Outcome, RunStatus, utcnow
from ondeck.engine import finish, queue, runs
from ondeck.engine.admission import TriggerRequest, admit
from ondeck.engine.wakeup import WakeBus
from ondeck.engine.worker import Worker, _Active
from ondeck.errors import StoreUnavailable
from ondeck.runner import isolation
from ondeck.settings import Settings
from ondeck.store import clock
from ondeck.store.store import Store, Transaction
from ondeck.vault import Vault
from tests.unit.engine.test_lifecycle import LEASE, define, store_as_an_older_release_did

T = TypeVar("T")

DONE = Outcome(RunStatus.SUCCEEDED, 0)


@pytest.fixture
def worker(store: Store, tmp_path: Path) -> Worker:
    return Worker(store, Settings(data_dir=tmp_path), WakeBus(), Vault([Fernet.generate_key()]))


def _fails_first(
    times: int, function: Callable[..., T], error: Exception
) -> tuple[Callable[..., T], list[str]]:
    """``function``, but its first ``times`` calls raise ``error``; and those failures so far."""
    failures: list[str] = []

    def failing(*args: Any) -> T:
        if len(failures) < times:
            failures.append(str(error))
            raise error
        return function(*args)

    return failing, failures


def _claim_one(store: Store, worker: Worker) -> queue.Claim:
    (claimed,) = queue.claim(store, worker.id, "default", 1, LEASE, queue.DefinitionCache())[0]
    return claimed


def test_the_worker_writes_to_sqlite_from_its_event_loop_and_to_postgresql_from_threads(
    store: Store, worker: Worker
) -> None:
    """An SQLite write costs less than its hand-over to a thread; a PostgreSQL one waits on the network."""

    async def threads() -> tuple[int, int]:
        return threading.get_ident(), await worker.call(threading.get_ident)

    loop_thread, call_thread = asyncio.run(threads())
    assert (call_thread == loop_thread) == (store.dialect == "sqlite")


def test_a_worker_s_postgresql_calls_take_turns_on_one_thread_and_renewals_go_on_beside_them(
    pg_store: Store, tmp_path: Path
) -> None:
    """One thread, one call at a time, costs less CPU than several contending for the
    interpreter lock; but a call that hangs there must not keep leases from being renewed."""
    store = pg_store
    settings = Settings(data_dir=tmp_path, lease_seconds=3, kill_grace_seconds=0.2, poll_seconds=120)
    define(store, run={"runtime": "bash", "script": "sleep 60"})
    bus = WakeBus()
    worker = Worker(store, settings, bus, Vault([Fernet.generate_key()]))
    release, held = threading.Event(), threading.Event()

    def hang() -> int:
        held.set()
        release.wait(30)
        return threading.get_ident()

    async def scenario() -> None:
        try:
            run = admit(store, TriggerRequest("job")).run
            await _until("the run starts", lambda: runs.get(store, run.id).status == RunStatus.RUNNING)
            hanging = asyncio.create_task(worker.call(hang))
            await _until("the call hangs", held.is_set)
            after = asyncio.create_task(worker.call(threading.get_ident))
            leases = {runs.get(store, run.id).lease_expires_at}

            def renewed_twice() -> bool:  # every second, while the worker's thread is taken
                leases.add(runs.get(store, run.id).lease_expires_at)
                return len(leases) >= 3

            await _until("the lease is renewed twice", renewed_twice, 10)
            assert not after.done()  # its turn comes after the hanging call's
            release.set()
            assert await hanging == await after != threading.get_ident()
            assert runs.get(store, run.id).status == RunStatus.RUNNING
            runs.cancel(store, SYSTEM, run.id)
            await _until("the run is cancelled", lambda: runs.get(store, run.id).status.terminal)
        finally:
            release.set()

    _run_worker(store, settings, scenario, bus, worker)


def test_a_claim_that_waited_its_turn_behind_a_slow_call_reckons_its_lease_from_its_write(
    pg_store: Store, tmp_path: Path
) -> None:
    """A claim asked for while the worker's database thread was taken began later than it
    was asked for: a lease reckoned from the asking was short by the wait, and the run was
    stopped as lost as soon as it started."""
    store = pg_store
    settings = Settings(data_dir=tmp_path, lease_seconds=3, kill_grace_seconds=0.2, poll_seconds=120)
    define(store, run={"runtime": "bash", "script": "sleep 3; echo ran"})
    bus = WakeBus()
    worker = Worker(store, settings, bus, Vault([Fernet.generate_key()]))
    held = threading.Event()

    def slow() -> None:  # longer than two thirds of the lease, less than a lease
        held.set()
        time.sleep(2.5)

    async def scenario() -> None:
        slowly = asyncio.create_task(worker.call(slow))
        await _until("the slow call holds the thread", held.is_set)
        run = admit(store, TriggerRequest("job")).run  # the wake-up's claim waits its turn
        await slowly
        await _until("the run ends", lambda: runs.get(store, run.id).status.terminal, 20)
        ended = runs.get(store, run.id)
        assert (ended.status, ended.error) == (RunStatus.SUCCEEDED, None)

    _run_worker(store, settings, scenario, bus, worker)


def test_an_ending_attempt_claims_the_next_due_run_for_its_slot(store: Store, worker: Worker) -> None:
    define(store)
    first, second = (admit(store, TriggerRequest("job")).run for _ in range(2))
    (following,), more = worker._finish_and_claim(_claim_one(store, worker), DONE, []) or ([], False)
    assert following.run.id == second.id and more
    assert runs.get(store, first.id).status == RunStatus.SUCCEEDED
    assert runs.get(store, second.id).lease_owner == worker.id
    assert worker._finish_and_claim(following, DONE, []) == ([], False)  # nothing left: it only finishes
    assert runs.get(store, second.id).status == RunStatus.SUCCEEDED


def test_a_failing_claim_does_not_undo_the_end_of_the_attempt(
    store: Store, worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    define(store)
    first, second = (admit(store, TriggerRequest("job")).run for _ in range(2))
    claimed = _claim_one(store, worker)

    def fails_after_writing(*args: Any) -> queue.Claim:
        # made once the next run is moved to running and its attempt recorded
        raise RuntimeError("the claim fails after its writes")

    monkeypatch.setattr(queue, "Claim", fails_after_writing)
    last_output = [LogChunk("stdout", "done\n", utcnow())]  # written with the end: one transaction
    assert worker._finish_and_claim(claimed, DONE, last_output) is None  # the claim failed, the end did not
    assert runs.get(store, first.id).status == RunStatus.SUCCEEDED
    undone = runs.detail(store, SYSTEM, second.id)  # the claim's writes were undone alone
    assert (undone.run.status, undone.run.attempt, undone.attempts) == (RunStatus.QUEUED, 0, [])


@pytest.mark.parametrize("running_here", [False, True])
def test_a_run_an_end_s_claim_started_is_run_if_the_claim_s_answer_was_lost(
    store: Store, worker: Worker, monkeypatch: pytest.MonkeyPatch, running_here: bool
) -> None:
    """On PostgreSQL an end of one write and its claim commit each alone: the claim's
    statement may have started a run though its answer never came. One the worker runs
    already (``running_here``), its lease renewed to that instant, is not the claim's."""
    define(store)
    first, second = (admit(store, TriggerRequest("job")).run for _ in range(2))
    claimed = _claim_one(store, worker)
    start_queued = Transaction.start_queued

    def answer_lost(tx: Transaction, *args: Any) -> Any:
        for _, started in start_queued(tx, *args):
            if running_here and started is not None:
                key = (started.id, started.attempt)
                worker._active[key] = _Active(key, clock.elapsed(), worker.lease.total_seconds())
        raise StoreUnavailable("the connection dropped before the answer came")

    monkeypatch.setattr(Transaction, "start_queued", answer_lost)
    claims = worker._finish_and_claim(claimed, DONE, [])
    assert runs.get(store, first.id).status == RunStatus.SUCCEEDED
    if store.dialect == "sqlite":  # one transaction: undone, the end written again alone
        assert claims is None and runs.get(store, second.id).status == RunStatus.QUEUED
        return
    assert runs.get(store, second.id).lease_owner == worker.id
    if running_here:
        assert claims == ([], True)
        return
    assert claims is not None
    (following,), more = claims
    assert (following.run.id, following.run.attempt, more) == (second.id, 1, True)


def test_a_run_an_end_s_claim_met_whose_definition_no_longer_loads_fails_with_its_deliveries(
    store: Store, worker: Worker
) -> None:
    """On PostgreSQL the claim, made alone, has started it: it is failed in a transaction
    of its own, so the deliveries its failure queues commit with it."""
    define(store)
    admit(store, TriggerRequest("job"))
    claimed = _claim_one(store, worker)
    define(store, name="other")
    stale = admit(store, TriggerRequest("other")).run
    store_as_an_older_release_did(store, "other", notify=[{"url": "https://hook.example/"}])
    assert worker._finish_and_claim(claimed, DONE, []) == ([], True)
    failed = runs.get(store, stale.id)
    assert failed.status == RunStatus.FAILED and "no longer loads" in (failed.error or "")
    assert [d["url"] for d in runs.deliveries(store, SYSTEM, stale.id)] == ["https://hook.example/"]


def test_a_run_claimed_as_the_worker_begins_to_stop_is_handed_back_unstarted(
    store: Store, worker: Worker
) -> None:
    define(store)
    first, second = (admit(store, TriggerRequest("job")).run for _ in range(2))

    def stop(_loop: asyncio.AbstractEventLoop) -> None:
        worker._stopping = True

    claimed, _ = _end_while(store, worker, stop)  # its end claims the second run
    assert claimed.run.id == first.id
    assert runs.get(store, first.id).status == RunStatus.SUCCEEDED
    back = runs.detail(store, SYSTEM, second.id)
    assert (back.run.status, back.run.attempt, back.attempts) == (RunStatus.QUEUED, 0, [])
    assert worker._active == {}  # nothing was started


def test_an_end_that_fails_to_record_is_written_again_while_the_lease_holds(
    store: Store, worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Left to the reaper, a run that succeeded would end as lost and might run again."""
    define(store, retries={"attempts": 3})
    run = admit(store, TriggerRequest("job")).run
    claimed = _claim_one(store, worker)
    briefly_unavailable, failures = _fails_first(
        2, finish.finish, RuntimeError("the store is briefly unavailable")
    )
    monkeypatch.setattr(finish, "finish", briefly_unavailable)
    asyncio.run(_execute(worker, claimed))
    assert len(failures) == 2
    ended = runs.detail(store, SYSTEM, run.id)
    assert ended.run.status == RunStatus.SUCCEEDED and [a.status for a in ended.attempts] == ["succeeded"]


def test_an_end_that_waited_its_turn_behind_a_slow_call_still_has_half_a_lease_to_land(
    pg_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Half a lease counted from when the end was asked for was gone by its first try, and
    the end was given up at its first failure: the run left to the reaper, as lost."""
    store = pg_store
    worker = Worker(
        store,
        Settings(data_dir=tmp_path, lease_seconds=3, kill_grace_seconds=0.2),
        WakeBus(),
        Vault([Fernet.generate_key()]),
    )
    define(store)
    run = admit(store, TriggerRequest("job")).run
    claimed = _claim_one(store, worker)
    briefly_unavailable, failures = _fails_first(
        1, finish.finish, RuntimeError("the store is briefly unavailable")
    )
    monkeypatch.setattr(finish, "finish", briefly_unavailable)
    held = threading.Event()

    def slow() -> None:  # longer than half the lease
        held.set()
        time.sleep(2)

    async def main() -> None:
        slowly = asyncio.create_task(worker.call(slow))
        await _until("the slow call holds the thread", held.is_set)
        await _execute(worker, claimed)
        await slowly

    asyncio.run(main())
    assert failures and runs.get(store, run.id).status == RunStatus.SUCCEEDED


def test_a_run_admitted_while_every_slot_is_busy_starts_when_one_frees_not_at_the_next_poll(
    store: Store, tmp_path: Path
) -> None:
    """The end of the busy run claims it: no wake-up is needed, and none is waited for."""
    settings = Settings(data_dir=tmp_path, worker_concurrency=1, poll_seconds=120)
    define(store, run={"runtime": "bash", "script": "sleep 0.3"})

    async def scenario() -> None:
        first = admit(store, TriggerRequest("job")).run
        await _until("the first run starts", lambda: runs.get(store, first.id).status == RunStatus.RUNNING)
        second = admit(store, TriggerRequest("job")).run  # the only slot is busy
        await _until("the second run ends", lambda: runs.get(store, second.id).status.terminal, seconds=60)
        assert runs.get(store, second.id).status == RunStatus.SUCCEEDED

    _run_worker(store, settings, scenario)


def test_a_run_claimed_by_a_commit_whose_answer_was_lost_is_still_run(
    store: Store, worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The end is found written, so the commit happened: the run it claimed is this
    worker's, and is not left leased to it unrun until the reaper ends it as lost."""
    define(store)
    first, second = (admit(store, TriggerRequest("job")).run for _ in range(2))
    claimed = _claim_one(store, worker)
    _lose_the_next_commits_answer(store, monkeypatch)
    (following,), more = worker._finish_and_claim(claimed, DONE, []) or ([], False)
    assert (following.run.id, following.run.attempt, more) == (second.id, 1, True)
    assert runs.get(store, first.id).status == RunStatus.SUCCEEDED
    assert runs.get(store, second.id).lease_owner == worker.id


@pytest.mark.parametrize("committed", [True, False])
def test_a_claim_whose_commit_failed_keeps_its_runs_if_it_happened(
    store: Store, worker: Worker, monkeypatch: pytest.MonkeyPatch, committed: bool
) -> None:
    define(store)
    run = admit(store, TriggerRequest("job")).run
    _lose_the_next_commits_answer(store, monkeypatch, committed=committed)
    claims, _ = queue.claim(store, worker.id, "default", 1, LEASE, queue.DefinitionCache())
    assert [c.run.id for c in claims] == ([run.id] if committed else [])
    stored = runs.get(store, run.id)
    assert (stored.status, stored.lease_owner) == (
        (RunStatus.RUNNING, worker.id) if committed else (RunStatus.QUEUED, None)
    )


def test_a_run_another_slot_claimed_since_a_claim_failed_is_not_taken_for_it(
    store: Store, worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The failed claim's run went back to the queue and this worker's other slot took
    it, for the same attempt number: that claim's lease, not the worker's name, tells."""
    define(store)
    run = admit(store, TriggerRequest("job")).run
    still_held = queue.still_held
    taken: list[queue.Claim] = []

    def another_slot_claims_first(*args: Any) -> list[queue.Claim]:
        taken.append(_claim_one(store, worker))
        return still_held(*args)

    monkeypatch.setattr(queue, "still_held", another_slot_claims_first)
    _lose_the_next_commits_answer(store, monkeypatch, committed=False)
    claims, _ = queue.claim(store, worker.id, "default", 1, LEASE, queue.DefinitionCache())
    assert claims == [] and [c.run.id for c in taken] == [run.id]


def test_a_claim_is_only_kept_with_half_its_lease_left(store: Store, worker: Worker) -> None:
    """Less, and its first heartbeat might come too late: the reaper's, then."""
    define(store)
    admit(store, TriggerRequest("job"))
    claimed = _claim_one(store, worker)
    assert queue.still_held(store, [claimed], LEASE) == [claimed]
    assert queue.still_held(store, [claimed], LEASE * 3) == []  # as if most of the lease had gone


def _lose_the_next_commits_answer(
    store: Store, monkeypatch: pytest.MonkeyPatch, *, committed: bool = True
) -> None:
    """The next transaction fails as if the connection dropped at its commit: before the
    commit's answer came (``committed``), or before the commit."""
    commit = store.transaction

    @contextlib.contextmanager
    def answer_lost(**options: bool) -> Iterator[Transaction]:
        monkeypatch.setattr(store, "transaction", commit)  # once
        with commit(**options) as tx:
            yield tx
            if not committed:
                raise StoreUnavailable("the connection dropped before the commit")
        raise StoreUnavailable("the connection dropped before the commit's answer came")

    monkeypatch.setattr(store, "transaction", answer_lost)


async def _execute(worker: Worker, claimed: queue.Claim) -> None:
    """Execute ``claimed`` as ``Worker._start`` has it do."""
    key = (claimed.run.id, claimed.run.attempt)
    worker._active[key] = _Active(key, clock.elapsed(), worker.lease.total_seconds())
    await worker._execute(claimed)


def _end_while(
    store: Store, worker: Worker, meanwhile: Callable[[asyncio.AbstractEventLoop], None]
) -> tuple[queue.Claim, bool]:
    """Claim the first due run and end its attempt while the worker believes runs may be
    due, calling ``meanwhile`` (with the worker's loop) in the writing thread right after
    the write; returns the claim and whether the end woke the claim loop."""
    claimed = _claim_one(store, worker)
    worker.call = blocking.run  # the write in a thread, as on PostgreSQL, so others can come meanwhile
    worker._backlog = True  # so the end of the attempt claims the next run
    finish_and_claim = worker._finish_and_claim

    async def scenario() -> bool:
        loop = asyncio.get_running_loop()

        def end_then(*args: Any) -> tuple[list[queue.Claim], bool] | None:
            following = finish_and_claim(*args)
            meanwhile(loop)
            return following

        worker._finish_and_claim = end_then  # type: ignore[method-assign]
        with worker.bus.watch_queue() as woken:
            await _execute(worker, claimed)
            return woken._event.is_set()  # the end publishes before it returns, or not at all

    return claimed, asyncio.run(scenario())


def test_a_wake_up_that_came_while_the_end_was_written_is_not_lost(store: Store, tmp_path: Path) -> None:
    """Its claim read the queue before the run came; the run's wake-up found every slot busy."""
    vault = Vault([Fernet.generate_key()])
    worker = Worker(store, Settings(data_dir=tmp_path), WakeBus(), vault, concurrency=1)

    def a_run_arrives(loop: asyncio.AbstractEventLoop) -> None:
        admit(store, TriggerRequest("job"))
        asyncio.run_coroutine_threadsafe(worker._claim(), loop).result()  # its wake-up, as the loop takes it

    define(store)
    admit(store, TriggerRequest("job"))
    _, woke = _end_while(store, worker, a_run_arrives)
    assert woke, "the end did not wake the claim loop"


def test_an_end_whose_claim_failed_wakes_the_claim_loop(
    store: Store, worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    define(store)
    for _ in range(2):  # the first is claimed; the end's claim meets the second
        admit(store, TriggerRequest("job"))

    def broken(*_args: object) -> None:
        raise RuntimeError("the claim failed")

    monkeypatch.setattr(worker._definitions, "get", broken)
    _, woke = _end_while(store, worker, lambda _loop: None)
    assert woke, "the end did not wake the claim loop"


def test_an_end_whose_claim_met_a_run_it_could_not_take_wakes_the_claim_loop(
    store: Store, worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It reads one run only; the loop's own claim looks past it."""
    define(
        store,
        concurrency={"key": "${{ params.k }}", "limit": 1},
        params={"type": "object", "properties": {"k": {"type": "string"}}},
    )
    for key in ("a", "b"):  # the first is claimed; the end's claim meets the second
        admit(store, TriggerRequest("job", {"k": key}))
    take_slot = Transaction.take_slot

    def taken_meanwhile(tx: Transaction, key: str, limit: int, run_id: str) -> bool:
        return key == "job:a" and take_slot(tx, key, limit, run_id)  # as if a concurrent claim took b's

    monkeypatch.setattr(Transaction, "take_slot", taken_meanwhile)
    _, woke = _end_while(store, worker, lambda _loop: None)
    assert woke, "the end did not wake the claim loop"


def _run_worker(
    store: Store,
    settings: Settings,
    scenario: Callable[[], Awaitable[None]],
    bus: WakeBus | None = None,
    worker: Worker | None = None,
) -> None:
    """Run a worker (``worker`` on ``bus``, or a new one) while ``scenario`` (a coroutine
    function) runs, then stop it."""
    bus = bus or WakeBus()

    async def main() -> None:
        bus.bind(asyncio.get_running_loop())
        store.subscribe(bus.from_thread)
        running_worker = worker or Worker(store, settings, bus, Vault([Fernet.generate_key()]))
        stop = asyncio.Event()
        running = asyncio.create_task(running_worker.run(stop))
        try:
            await scenario()
        finally:
            stop.set()
            await running

    asyncio.run(main())


async def _until(what: str, condition: Callable[[], bool], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_worker_that_cannot_renew_a_lease_stops_the_attempt_before_the_lease_lapses(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Else, once it lapsed, the reaper could end the attempt and another worker run the
    run again while this attempt still runs."""
    lease = 4.5  # the attempt should end at two thirds of it, 3s: a margin for a busy machine
    settings = Settings(data_dir=tmp_path, lease_seconds=lease, kill_grace_seconds=0.2, poll_seconds=120)
    define(store, run={"runtime": "bash", "script": "sleep 60"})

    def unreachable(*args: Any) -> dict[tuple[str, int], bool]:
        raise StoreUnavailable("the store is unreachable")

    monkeypatch.setattr(queue, "renew_leases", unreachable)

    async def scenario() -> None:
        run = admit(store, TriggerRequest("job")).run
        await _until("the run ends", lambda: runs.get(store, run.id).status.terminal)
        (attempt,) = runs.detail(store, SYSTEM, run.id).attempts
        assert attempt.status == RunStatus.FAILED and "lost the run's lease" in (attempt.error or "")
        assert attempt.started_at is not None and attempt.finished_at is not None
        assert (attempt.finished_at - attempt.started_at).total_seconds() < lease

    _run_worker(store, settings, scenario)


def test_a_run_cancelled_as_its_worker_stops_ends_cancelled(store: Store, worker: Worker) -> None:
    """Not failed as one the shutdown stopped (which may be retried)."""
    define(store, run={"runtime": "bash", "script": "sleep 60"}, retries={"attempts": 3})
    run = admit(store, TriggerRequest("job")).run
    claimed = _claim_one(store, worker)

    async def scenario() -> None:
        key = (claimed.run.id, claimed.run.attempt)
        worker._active[key] = active = _Active(key, clock.elapsed(), worker.lease.total_seconds())
        worker._stopping = True
        active.cancel()
        await worker._execute(claimed)

    asyncio.run(scenario())
    assert runs.get(store, run.id).status == RunStatus.CANCELLED


@pytest.mark.parametrize("watched", [True, False], ids=["fences-watched", "heartbeat-first"])
def test_an_attempt_is_stopped_soon_after_a_suspend_outlasted_its_lease(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, watched: bool
) -> None:
    """The host slept (a paused virtual machine, say) past the lease: meanwhile other hosts
    saw it lapse and may run the run again, so this attempt must stop at once on waking,
    not when the worker's next heartbeat comes round (the event loop's timers did not count
    the pause). The suspend is shown by moving the clock leases are reckoned on, which
    counts on through one (CLOCK_BOOTTIME), while the loop's clock stands. Whichever of
    the fence watcher and the heartbeat wakes first, the renewal must not revive it."""
    lease = 30.0  # the heartbeat renews every 10 s: it must not be what stops the attempt
    settings = Settings(data_dir=tmp_path, lease_seconds=lease, kill_grace_seconds=0.2, poll_seconds=120)
    define(store, run={"runtime": "bash", "script": "sleep 60"})
    elapsed = clock.elapsed
    if not watched:

        async def asleep(self: Worker) -> None:
            await asyncio.Event().wait()

        monkeypatch.setattr(Worker, "_watch_fences", asleep)

    async def scenario() -> None:
        run = admit(store, TriggerRequest("job")).run
        await _until("the run starts", lambda: runs.get(store, run.id).status == RunStatus.RUNNING)
        monkeypatch.setattr(clock, "elapsed", lambda: elapsed() + lease)  # asleep for a lease
        woke = time.monotonic()
        await _until("the run ends", lambda: runs.get(store, run.id).status.terminal, seconds=8)
        assert time.monotonic() - woke < 8 < lease / 3
        (attempt,) = runs.detail(store, SYSTEM, run.id).attempts
        assert attempt.status == RunStatus.FAILED and "lost the run's lease" in (attempt.error or "")

    _run_worker(store, settings, scenario)


@pytest.mark.parametrize("mode", [isolation.LAUNCHER, isolation.NAMESPACE, isolation.GROUP])
def test_a_worker_warns_when_scripts_can_read_ondecks_data(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    """Only the launcher hides the data directory; started otherwise, a script can read
    what file permissions let it (other runs' workspaces, the master key unless it runs
    as another user), so the operator must hear of it."""
    monkeypatch.setattr(isolation, "best", lambda: mode)
    Worker(store, Settings(data_dir=tmp_path), WakeBus(), Vault([Fernet.generate_key()]))
    warned = [r for r in caplog.records if "scripts may read" in r.getMessage()]
    assert bool(warned) == (mode != isolation.LAUNCHER)
    assert all(str(tmp_path.resolve()) in r.getMessage() and r.levelname == "WARNING" for r in warned)


@pytest.mark.parametrize("guard", ["_watch_fences", "_heartbeat"])
def test_a_task_guarding_the_leases_that_fails_is_logged_and_started_again(
    store: Store,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    guard: str,
) -> None:
    """Without them an attempt could outlive its lease, and a task's error shows only when it
    is awaited, which the worker does not do until it stops. The heartbeat, started again,
    renews at once: its last renewal may be a period old."""
    settings = Settings(data_dir=tmp_path, poll_seconds=120)
    calls: list[tuple[Any, ...]] = []

    async def fails_once(self: Worker, *args: Any) -> None:
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("the guard broke")
        await asyncio.Event().wait()

    monkeypatch.setattr(Worker, guard, fails_once)

    def logged() -> bool:
        return any(
            r.levelname == "CRITICAL" and "starting it again" in r.getMessage() for r in caplog.records
        )

    async def scenario() -> None:
        await _until("the guard is started again", lambda: len(calls) == 2)
        assert logged()

    _run_worker(store, settings, scenario)
    assert calls == [(), (0.0,)] if guard == "_heartbeat" else [(), ()]


def test_leases_are_renewed_soon_after_a_suspend_that_left_them_time(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A suspend past a heartbeat but short of the fence: the heartbeat comes on waking, so
    the attempt goes on rather than being stopped at its fence (shown as above)."""
    lease = 30.0  # the heartbeat is due every 10 s, the fence 19 s after a renewal
    settings = Settings(data_dir=tmp_path, lease_seconds=lease, kill_grace_seconds=0.2, poll_seconds=120)
    define(store, run={"runtime": "bash", "script": "sleep 60"})
    elapsed, slept = clock.elapsed, [0.0]
    monkeypatch.setattr(clock, "elapsed", lambda: elapsed() + slept[0])

    async def scenario() -> None:
        run = admit(store, TriggerRequest("job")).run
        await _until("the run starts", lambda: runs.get(store, run.id).status == RunStatus.RUNNING)
        for _ in range(2):  # 24 s asleep in all since the claim: past its fence, were it not renewed
            leased = runs.get(store, run.id).lease_expires_at
            slept[0] += 12
            renewed = functools.partial(lambda was: runs.get(store, run.id).lease_expires_at != was, leased)
            await _until("the lease is renewed", renewed, 5)
        assert runs.get(store, run.id).status == RunStatus.RUNNING
        runs.cancel(store, SYSTEM, run.id)
        await _until("the run is cancelled", lambda: runs.get(store, run.id).status.terminal)
        assert runs.get(store, run.id).status == RunStatus.CANCELLED

    _run_worker(store, settings, scenario)


def test_one_failed_renewal_is_retried_before_the_attempt_would_be_stopped(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A moment's outage of the store must not stop every attempt the worker runs."""
    settings = Settings(data_dir=tmp_path, lease_seconds=6, kill_grace_seconds=0.2, poll_seconds=120)
    define(store, run={"runtime": "bash", "script": "sleep 5"})
    fails_once, failures = _fails_first(
        1, queue.renew_leases, StoreUnavailable("the store is briefly unavailable")
    )
    monkeypatch.setattr(queue, "renew_leases", fails_once)

    async def scenario() -> None:
        run = admit(store, TriggerRequest("job")).run
        await _until("the run ends", lambda: runs.get(store, run.id).status.terminal)
        assert failures and runs.get(store, run.id).status == RunStatus.SUCCEEDED

    _run_worker(store, settings, scenario)


def test_a_store_outage_slows_a_chatty_run_down_without_failing_it_or_losing_output(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Output past the flush size must be written before more is read: while that fails,
    the worker reads no more (the program blocks on its pipe) and tries less and less
    often, rather than once per read; the outage is logged once, not at every try."""
    caplog.set_level(logging.INFO, logger="ondeck.engine.worker")
    settings = Settings(data_dir=tmp_path, poll_seconds=120)
    size = 6_000_000  # about 90 reads: one try per read would be as many
    define(
        store, run={"runtime": "bash", "script": f"head -c {size} /dev/zero | tr '\\0' x; echo; echo done"}
    )
    append, tries, outage = finish.append_logs, [], 1.5

    def away_for_a_while(*args: Any) -> bool:
        tries.append(time.monotonic())
        if tries[-1] - tries[0] < outage:
            raise StoreUnavailable("the store is away")
        return append(*args)

    monkeypatch.setattr(finish, "append_logs", away_for_a_while)

    async def scenario() -> None:
        run = admit(store, TriggerRequest("job")).run
        await _until("the run ends", lambda: runs.get(store, run.id).status.terminal)
        assert runs.get(store, run.id).status == RunStatus.SUCCEEDED
        _, entries = runs.logs(store, run.id, limit=100_000)
        assert "".join(e.text for e in entries if e.stream == "stdout") == "x" * size + "\ndone\n"

    _run_worker(store, settings, scenario)
    failed = [at for at in tries if at - tries[0] < outage]
    assert 2 <= len(failed) <= 20, len(failed)  # the flush on reads and the periodic one, backing off
    warned = [r for r in caplog.records if "writing its output failed" in r.getMessage()]
    assert len(warned) == 1 and any("works again" in r.getMessage() for r in caplog.records)


def test_output_that_cannot_be_written_does_not_keep_an_attempt_past_its_timeout(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Waiting for the store to take the output must not outlast the attempt's timeout:
    the store may take the renewals (the lease holds) and not the output (a full disk)."""
    settings = Settings(data_dir=tmp_path, kill_grace_seconds=0.2, poll_seconds=120)
    script = "head -c 1200000 /dev/zero | tr '\\0' x; sleep 60"
    define(store, run={"runtime": "bash", "script": script}, timeout="2s")

    def refused(*args: Any) -> bool:
        raise StoreUnavailable("the store takes no output")

    monkeypatch.setattr(finish, "append_logs", refused)

    async def scenario() -> None:
        run = admit(store, TriggerRequest("job")).run
        await _until("the run ends", lambda: runs.get(store, run.id).status.terminal, seconds=15)
        assert runs.get(store, run.id).status == RunStatus.TIMED_OUT
        _, entries = runs.logs(store, run.id, limit=100_000)
        # What the worker took went with the end; the program may have been killed while
        # blocked on its pipe, with the rest of its output unwritten.
        kept = "".join(e.text for e in entries if e.stream == "stdout")
        assert len(kept) >= 512 * 1024 and kept == "x" * len(kept)

    _run_worker(store, settings, scenario)


def test_an_attempt_whose_run_was_started_again_elsewhere_is_stopped_at_the_next_renewal(
    store: Store, tmp_path: Path
) -> None:
    """Its lease lapsed (the worker hung, say) and the reaper ended it: the run's next
    attempt may already run, here or on another worker, so this one must not go on."""
    settings = Settings(
        data_dir=tmp_path, lease_seconds=3, kill_grace_seconds=0.2, poll_seconds=120, isolate=False
    )
    define(
        store,
        params={"type": "object", "properties": {"dir": {"type": "string"}}},
        run={"runtime": "bash", "script": 'echo $$ > "$ONDECK_PARAM_DIR/$ONDECK_ATTEMPT"; sleep 60'},
        retries={"attempts": 2, "backoff": "0s"},
    )

    def pid(attempt: int) -> int | None:
        written = tmp_path / str(attempt)
        return int(text) if written.exists() and (text := written.read_text().strip()) else None

    async def scenario() -> None:
        run = admit(store, TriggerRequest("job", params={"dir": str(tmp_path)})).run
        await _until("attempt 1 runs", lambda: pid(1) is not None)
        with store.transaction() as tx:  # as if the worker had hung for a lease
            tx.update_run(run.id, lease_expires_at=utcnow() - timedelta(seconds=1))
        assert finish.reap_expired_leases(store) == [(run.id, 1)]
        await _until("attempt 2 runs", lambda: pid(2) is not None)
        first, second = pid(1), pid(2)
        assert first is not None and second is not None
        await _until("attempt 1 is stopped", lambda: not _alive(first), seconds=10)
        current = runs.get(store, run.id)
        assert (current.status, current.attempt) == (RunStatus.RUNNING, 2) and _alive(second)
        runs.cancel(store, SYSTEM, run.id)
        await _until("the run is cancelled", lambda: runs.get(store, run.id).status.terminal)

    _run_worker(store, settings, scenario)


@pytest.mark.parametrize("shared", [False, True], ids=["its-own-directory", "a-shared-directory"])
def test_a_sqlite_database_outside_the_data_directory_is_hidden_from_scripts_in_a_directory_of_its_own(
    tmp_path: Path, shared: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """It holds every run's params, write-only ones included, and is not under the data
    directory that the worker hides anyway. Hiding hides the whole directory, so one that
    holds anything else (a home directory, say) is left visible, with a warning."""
    elsewhere = tmp_path / "db"
    elsewhere.mkdir()
    if shared:
        (elsewhere / "notes.txt").write_text("a user's own file")
    store = Store(f"sqlite:///{elsewhere / 'ondeck.db'}")
    store.upgrade()
    try:
        settings = Settings(data_dir=tmp_path / "data")
        worker = Worker(store, settings, WakeBus(), Vault([Fernet.generate_key()]))
        assert worker.isolation == "launcher"  # which hides directories (make install builds it)
        script = f"ls {elsewhere}; test -e {elsewhere}/ondeck.db || echo gone"
        define(store, run={"runtime": "bash", "script": script})
        admit(store, TriggerRequest("job"))
        claimed = _claim_one(store, worker)
        asyncio.run(_execute(worker, claimed))
        with store.read() as tx:
            output = "".join(entry.text for entry in tx.logs_after(claimed.run.id))
            run = tx.get_run(claimed.run.id)
            assert run is not None and run.status == RunStatus.SUCCEEDED, (output, run and run.error)
    finally:
        store.dispose()
    if shared:
        assert "notes.txt" in output.split() and "ondeck.db" in output.split()
        assert "it holds more than the database (notes.txt)" in caplog.text
    else:
        assert output.split() == ["gone"]  # an empty directory in its place
    assert (elsewhere / "ondeck.db").stat().st_size > 0
