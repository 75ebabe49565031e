"""Admission, claims, leases, retries and the reaper against a real store (SQLite and PostgreSQL)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import event, text, update

from ondeck.auth.principals import SYSTEM, Principal
from ondeck.domain import LogChunk, Outcome, Run, RunStatus, utcnow
from ondeck.engine import catalog, dispatch, finish, queue, runs
from ondeck.engine.admission import AdmissionPolicy, TriggerRequest, admit, parse_idempotency_key
from ondeck.engine.queue import DefinitionCache
from ondeck.errors import (
    CircuitOpen,
    ConcurrencyRejected,
    Conflict,
    Forbidden,
    IdempotencyMismatch,
    InvalidParams,
    InvalidRequest,
    NotFound,
    RateLimited,
    UnloadableDefinition,
)
from ondeck.spec.loader import parse_definition
from ondeck.store import database, direct
from ondeck.store.store import Store, Transaction
from ondeck.store.tables import automation_versions
from ondeck.store.tables import runs as runs_table
from tests.support import wait_until

LEASE = timedelta(seconds=30)


def define(store: Store, **fields: Any) -> str:
    definition = {"name": "job", "run": {"runtime": "bash", "script": "true"}, **fields}
    catalog.apply(store, parse_definition(definition))
    return str(definition["name"])


def claim(
    store: Store, worker: str = "w1", capacity: int = 10, lease: timedelta = LEASE
) -> list[queue.Claim]:
    claims, _ = queue.claim(store, worker, "default", capacity, lease, DefinitionCache())
    return claims


def test_applying_the_same_definition_twice_keeps_one_version(store: Store) -> None:
    automation = parse_definition({"name": "a", "run": {"runtime": "bash", "script": "true"}})
    assert catalog.apply(store, automation).changed
    again = catalog.apply(store, automation)
    assert not again.changed and again.version.version == 1
    changed = parse_definition({"name": "a", "run": {"runtime": "bash", "script": "false"}})
    assert catalog.apply(store, changed).version.version == 2
    assert catalog.get(store, "a", 1).definition["run"]["script"] == "true"


def test_a_run_records_the_version_it_was_admitted_with(store: Store) -> None:
    define(store)
    first = admit(store, TriggerRequest("job")).run
    define(store, description="changed")
    second = admit(store, TriggerRequest("job")).run
    assert (first.version, second.version) == (1, 2)


def test_a_version_applied_by_another_process_is_the_one_admission_validates_against(
    store: Store, database_url: str
) -> None:
    define(store, params={"type": "object", "properties": {"x": {}}})
    assert admit(store, TriggerRequest("job", {"x": "any"})).run.version == 1  # v1 now known here
    other = Store(database_url)  # another process on the same database
    try:
        schema = {"type": "object", "required": ["x"], "properties": {"x": {"type": "integer"}}}
        define(other, params=schema)
    finally:
        other.dispose()
    with pytest.raises(InvalidParams):
        admit(store, TriggerRequest("job", {"x": "nope"}))
    assert admit(store, TriggerRequest("job", {"x": 1})).run.version == 2


def test_params_refused_by_a_version_another_process_replaced_are_judged_by_the_new_one(
    store: Store, database_url: str
) -> None:
    define(store, params={"type": "object", "required": ["x"], "properties": {"x": {}}})
    assert admit(store, TriggerRequest("job", {"x": 1})).run.version == 1  # v1 now known here
    other = Store(database_url)
    try:
        define(other, params={"type": "object", "properties": {"x": {}}})  # x is optional now
    finally:
        other.dispose()
    assert admit(store, TriggerRequest("job", {})).run.version == 2


def test_a_trigger_over_a_rate_limit_is_refused_by_that_limit_and_not_counted(store: Store) -> None:
    """The limits are counted in the admission's transaction (on PostgreSQL, by its commit):
    the refusal names the limit that was reached, and the refused trigger writes no run
    and uses up no limit's window."""
    define(store, rate_limit={"limit": 2, "per": "1d", "scope": "automation"})
    define(store, name="other")
    policy = AdmissionPolicy(global_rate_limit=(3, 86400))  # windows of a day: one holds the test
    for _ in range(2):
        admit(store, TriggerRequest("job"), policy)
    with pytest.raises(RateLimited, match=r"rate limit for 'job' is 2 per 1d; retry in \d+s"):
        admit(store, TriggerRequest("job"), policy)
    admit(store, TriggerRequest("other"), policy)  # the principal's third: the refused one was not counted
    define(store, name="roomy", rate_limit={"limit": 100, "per": "1d", "scope": "automation"})
    for name in ("other", "roomy"):  # refused by the principal's limit alone, the automation's or none
        with pytest.raises(RateLimited, match="rate limit for principal system is 3 per 1d"):
            admit(store, TriggerRequest(name), policy)
    written, _ = runs.page(store, SYSTEM, automation=None, statuses=[], before=None, limit=10)
    assert sorted(run.automation for run in written) == ["job", "job", "other"]


@pytest.mark.parametrize("limit", [2**31, 2**70])
def test_a_rate_limit_beyond_what_a_counter_holds_never_refuses(store: Store, limit: int) -> None:
    define(store, rate_limit={"limit": limit, "per": "1d", "scope": "automation"})
    assert admit(store, TriggerRequest("job")).run.status == RunStatus.QUEUED


def test_invalid_params_write_nothing(store: Store) -> None:
    define(store, params={"type": "object", "required": ["x"], "properties": {"x": {"type": "integer"}}})
    with pytest.raises(InvalidParams):
        admit(store, TriggerRequest("job", {"x": "nope"}))
    assert runs.page(store, SYSTEM, automation=None, statuses=[], before=None, limit=10) == ([], None)


def test_unknown_automation_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound):
        admit(store, TriggerRequest("nope"))


def test_admitted_run_is_queued_with_defaults_and_history(store: Store) -> None:
    define(store, params={"type": "object", "properties": {"env": {"type": "string", "default": "dev"}}})
    run = admit(store, TriggerRequest("job")).run
    assert run.status == RunStatus.QUEUED and run.params == {"env": "dev"}
    history = runs.detail(store, SYSTEM, run.id).transitions
    assert [(t.from_status, t.to_status) for t in history] == [(None, "pending"), ("pending", "queued")]


def test_idempotency_key_returns_the_same_run(store: Store) -> None:
    define(store, params={"type": "object", "properties": {"n": {"type": "integer"}}})
    first = admit(store, TriggerRequest("job", {"n": 1}, idempotency_key="k1"))
    again = admit(store, TriggerRequest("job", {"n": 1}, idempotency_key="k1"))
    assert again.replayed and again.run.id == first.run.id
    with pytest.raises(IdempotencyMismatch):
        admit(store, TriggerRequest("job", {"n": 2}, idempotency_key="k1"))
    other = admit(store, TriggerRequest("job", {"n": 1}, idempotency_key="k2"))
    assert other.run.id != first.run.id


def test_a_key_longer_than_the_store_holds_is_kept_distinct_in_its_length(store: Store) -> None:
    """Keys derived from a sender's ids (event:<source>:<id>) can pass 255 characters,
    which PostgreSQL refused with a 500."""
    define(store)
    long_key = "event:" + "s" * 200 + ":" + "i" * 200
    first = admit(store, TriggerRequest("job", idempotency_key=long_key))
    assert admit(store, TriggerRequest("job", idempotency_key=long_key)).run.id == first.run.id
    stored = first.run.idempotency_key
    assert stored is not None and len(stored) == 255 and stored.startswith("event:sss")
    alike = admit(store, TriggerRequest("job", idempotency_key=long_key[:-1] + "j"))
    assert alike.run.id != first.run.id and not alike.replayed


def test_expired_idempotency_key_admits_a_new_run(store: Store) -> None:
    define(store)
    policy = AdmissionPolicy(idempotency_ttl=timedelta(seconds=-1))
    first = admit(store, TriggerRequest("job", idempotency_key="k"), policy)
    second = admit(store, TriggerRequest("job", idempotency_key="k"), policy)
    assert first.run.id != second.run.id and not second.replayed


@pytest.mark.parametrize(
    ("header", "key"), [('"abc-123"', "abc-123"), ("abc-123", "abc-123"), ('"a\\"b"', 'a"b')]
)
def test_idempotency_header_forms(header: str, key: str) -> None:
    assert parse_idempotency_key(header) == key


@pytest.mark.parametrize("header", ['""', "x" * 256, '"a"b"', "caf\u00e9"])
def test_bad_idempotency_headers_are_refused(header: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_idempotency_key(header)


def test_claim_takes_a_lease_and_finish_ends_the_run(store: Store) -> None:
    define(store)
    run = admit(store, TriggerRequest("job")).run
    (claimed,) = claim(store)
    assert claimed.run.id == run.id and claimed.run.attempt == 1
    assert claim(store, "w2") == []  # nothing left to take
    assert finish.finish(store, claimed, Outcome(RunStatus.SUCCEEDED, 0, None, {"ok": True}))
    done = runs.get(store, run.id)
    assert done.status == RunStatus.SUCCEEDED and done.outputs == {"ok": True}
    assert done.lease_owner is None and done.finished_at is not None


def test_a_move_records_its_transition_and_attempt_and_a_refused_one_records_nothing(store: Store) -> None:
    """Each move writes the run, its transition and the attempt it starts or ends together
    (on PostgreSQL in one statement), and only when the run moved."""
    define(store)
    run = admit(store, TriggerRequest("job")).run
    (claimed,) = claim(store)
    assert finish.finish(store, claimed, Outcome(RunStatus.FAILED, 3, "exit code 3"))
    done = runs.detail(store, SYSTEM, run.id)
    assert [(t.from_status, t.to_status, t.reason) for t in done.transitions[2:]] == [
        ("queued", "running", "attempt 1 started on w1"),
        ("running", "failed", "exit code 3"),
    ]
    (attempt,) = done.attempts
    assert (attempt.number, attempt.worker, attempt.status, attempt.exit_code, attempt.error) == (
        1,
        "w1",
        "failed",
        3,
        "exit code 3",
    )
    assert (attempt.started_at, attempt.finished_at) == (done.run.started_at, done.run.finished_at)
    assert not finish.finish(store, claimed, Outcome(RunStatus.SUCCEEDED, 0))  # ended already
    assert claim(store) == []
    again = runs.detail(store, SYSTEM, run.id)
    assert (again.run, again.transitions, again.attempts) == (done.run, done.transitions, done.attempts)


def store_as_an_older_release_did(store: Store, name: str, **run: Any) -> None:
    """Rewrite every stored version of ``name`` into one this release's spec refuses (a
    bash script over the one-argument cap), as an older, looser release might have stored it."""
    broken = {"name": name, "run": {"runtime": "bash", "script": "#" * (128 * 1024)}, **run}
    with store.transaction() as tx:
        tx._c.execute(
            update(automation_versions)
            .where(automation_versions.c.name == name)
            .values(definition=broken, digest=f"stored-by-an-older-release-{name}")
        )


def test_a_run_whose_stored_definition_no_longer_loads_fails_without_stalling_the_queue(
    store: Store,
) -> None:
    define(store)
    stale = admit(store, TriggerRequest("job")).run
    define(store, name="other")
    fine = admit(store, TriggerRequest("other")).run
    store_as_an_older_release_did(
        store, "job", notify=[{"url": "https://kept.example/"}, {"url": "https://bad.example/", "on": "x"}]
    )
    (claimed,) = claim(store)
    assert claimed.run.id == fine.id
    failed = runs.detail(store, SYSTEM, stale.id)
    assert failed.run.status == RunStatus.FAILED
    assert "version 1 no longer loads: run: a bash script is at most" in (failed.run.error or "")
    assert [a.status for a in failed.attempts] == ["failed"] and failed.run.lease_owner is None
    # The notify rule that still reads is honoured; the one that does not is left out.
    assert [d["url"] for d in runs.deliveries(store, SYSTEM, stale.id)] == ["https://kept.example/"]


def test_a_claim_that_only_met_unloadable_runs_wakes_workers_for_the_runs_behind_them(store: Store) -> None:
    """Claiming nothing would otherwise leave a worker waiting for its poll interval."""
    define(store)
    for _ in range(3):  # a claim of one looks at three candidates
        admit(store, TriggerRequest("job"))
    define(store, name="other")
    admit(store, TriggerRequest("other"))
    store_as_an_older_release_did(store, "job")
    with store.transaction() as tx:
        claims, more = queue.claim_in(tx, "w1", "default", 1, tx.now() + LEASE, DefinitionCache())
        assert claims == [] and more and ("queue", "default") in tx.notifications
    assert [c.run.automation for c in claim(store)] == ["other"]


def test_a_webhook_of_a_version_that_no_longer_loads_stays_its_own(store: Store) -> None:
    hook = {"webhook": {"id": "deploy-hook", "scheme": "token", "secret": "HOOK_TOKEN"}}
    define(store, triggers=[hook])
    store_as_an_older_release_did(store, "job", triggers=[hook])
    other = {"name": "other", "run": {"runtime": "bash", "script": "true"}, "triggers": [hook]}
    with pytest.raises(Conflict, match="already used by 'job'"):
        catalog.apply_as(store, SYSTEM, parse_definition(other))
    with pytest.raises(UnloadableDefinition):  # not "no such webhook"
        dispatch.webhook(store, "deploy-hook")
    define(store, triggers=[hook])  # the corrected definition takes its hook back
    assert dispatch.webhook(store, "deploy-hook").automation.name == "job"


def test_an_expired_lease_of_a_run_whose_definition_no_longer_loads_is_still_reaped(store: Store) -> None:
    define(store)
    run = admit(store, TriggerRequest("job")).run
    claim(store, lease=timedelta(seconds=-1))
    store_as_an_older_release_did(store, "job")
    assert finish.reap_expired_leases(store) == [(run.id, 1)]
    assert runs.get(store, run.id).status == RunStatus.FAILED


def test_a_current_version_that_no_longer_loads_is_refused_clearly_and_spares_the_rest(store: Store) -> None:
    define(store)
    define(store, name="other")
    store_as_an_older_release_did(store, "job")
    catalog.forget(store, "job")
    with pytest.raises(UnloadableDefinition, match=r"'job' version 1 no longer loads.*apply a corrected"):
        admit(store, TriggerRequest("job"))
    # Schedules, webhooks and ChatOps read the catalog through definitions(): the rest still show.
    assert [a.name for a in catalog.definitions(store)] == ["other"]
    define(store)  # re-applying a corrected definition is not blocked, and heals it
    assert admit(store, TriggerRequest("job")).run.version == 2


def test_claim_tells_whether_more_runs_may_be_due(store: Store) -> None:
    """A worker with free slots claims again at once only when the claim did not see every due run."""
    define(store)
    for _ in range(7):
        admit(store, TriggerRequest("job"))
    # A claim of 1 looks at 3 candidates: it cannot know about the others.
    claims, more = queue.claim(store, "w1", "default", 1, LEASE, DefinitionCache())
    assert len(claims) == 1 and more
    claims, more = queue.claim(store, "w1", "default", 10, LEASE, DefinitionCache())
    assert len(claims) == 6 and not more


def test_priority_orders_the_queue(store: Store) -> None:
    define(store, name="low", priority=-5)
    define(store, name="high", priority=5)
    admit(store, TriggerRequest("low"))
    admit(store, TriggerRequest("high"))
    assert [c.run.automation for c in claim(store, capacity=1)] == ["high"]


def test_failed_attempt_is_retried_after_backoff_then_fails(store: Store) -> None:
    define(store, retries={"attempts": 2, "backoff": "0s"})
    admit(store, TriggerRequest("job"))
    (first,) = claim(store)
    assert finish.finish(store, first, Outcome(RunStatus.FAILED, 1, "exit code 1"))
    assert runs.get(store, first.run.id).status == RunStatus.QUEUED
    (second,) = claim(store)
    assert second.run.attempt == 2
    assert finish.finish(store, second, Outcome(RunStatus.FAILED, 1, "exit code 1"))
    final = runs.get(store, second.run.id)
    assert final.status == RunStatus.FAILED
    attempts = runs.detail(store, SYSTEM, final.id).attempts
    assert [(a.number, a.status) for a in attempts] == [(1, "failed"), (2, "failed")]


def test_retry_waits_for_not_before(store: Store) -> None:
    define(store, retries={"attempts": 2, "backoff": "1h"})
    admit(store, TriggerRequest("job"))
    (first,) = claim(store)
    finish.finish(store, first, Outcome(RunStatus.FAILED, 1, "boom"))
    assert claim(store) == []


def test_backoff_grows_exponentially_within_jitter_and_cap() -> None:
    from ondeck.spec.models import Retries

    retries = Retries(attempts=10, backoff=2, max_backoff=10)
    for attempt, full in [(1, 2), (2, 4), (3, 8), (4, 10), (8, 10)]:
        delay = finish.backoff(retries, attempt)
        assert full / 2 <= delay <= full


def test_expired_lease_is_reaped_and_retried(store: Store) -> None:
    define(store, retries={"attempts": 2, "backoff": "0s"})
    run = admit(store, TriggerRequest("job")).run
    (lost,) = claim(store, lease=timedelta(seconds=-1))
    assert finish.reap_expired_leases(store) == [(run.id, 1)]
    requeued = runs.get(store, run.id)
    assert requeued.status == RunStatus.QUEUED
    assert "worker lost" in (requeued.error or "")
    # The dead worker's late result is refused: its lease is gone.
    assert not finish.finish(store, lost, Outcome(RunStatus.SUCCEEDED, 0))
    (again,) = claim(store, "w2")
    assert again.run.attempt == 2
    # Also once the run is running again, on another worker: nothing of it is written.
    late = [LogChunk("stdout", "late\n", utcnow())]
    assert not finish.finish(store, lost, Outcome(RunStatus.SUCCEEDED, 0, None, {"late": True}), late)
    current = runs.get(store, run.id)
    assert (current.status, current.attempt, current.lease_owner, current.outputs) == (
        RunStatus.RUNNING,
        2,
        "w2",
        None,
    )
    attempts = runs.detail(store, SYSTEM, run.id).attempts
    assert [(a.number, a.status) for a in attempts] == [(1, "failed"), (2, "running")]
    assert runs.logs(store, run.id)[1] == []


def test_expired_lease_without_retries_fails_the_run(store: Store) -> None:
    define(store)
    run = admit(store, TriggerRequest("job")).run
    claim(store, lease=timedelta(seconds=-1))
    finish.reap_expired_leases(store)
    failed = runs.get(store, run.id)
    assert failed.status == RunStatus.FAILED and "worker lost" in (failed.error or "")


def test_a_lapsed_run_whose_end_fails_does_not_keep_the_others_from_being_reaped(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One transaction for all of them once meant one such run failed every pass of the reaper."""
    define(store)
    stuck, other = (admit(store, TriggerRequest("job")).run for _ in range(2))
    claim(store, lease=timedelta(seconds=-1))
    end_attempt = finish._end_attempt

    def failing_for_stuck(tx: Any, run: Run, *args: Any, **kwargs: Any) -> bool:
        if run.id == stuck.id:
            raise OverflowError("date value out of range")
        return end_attempt(tx, run, *args, **kwargs)

    monkeypatch.setattr(finish, "_end_attempt", failing_for_stuck)
    assert finish.reap_expired_leases(store) == [(other.id, 1)]
    assert runs.get(store, stuck.id).status == RunStatus.RUNNING  # nothing of it was written
    monkeypatch.undo()
    assert finish.reap_expired_leases(store) == [(stuck.id, 1)]


def test_a_lapsed_run_another_reaper_holds_is_skipped_not_waited_for(pg_store: Store) -> None:
    """On PostgreSQL (SQLite has one writer at a time: there is no other reaper to skip)."""
    store = pg_store
    define(store)
    held_elsewhere, free = (admit(store, TriggerRequest("job")).run for _ in range(2))
    claim(store, lease=timedelta(seconds=-1))
    with store.transaction() as tx:
        assert tx.lock_expired_lease(held_elsewhere.id, utcnow()) is not None
        assert finish.reap_expired_leases(store) == [(free.id, 1)]
    assert finish.reap_expired_leases(store) == [(held_elsewhere.id, 1)]


def test_renewed_lease_is_not_reaped(store: Store) -> None:
    define(store)
    run = admit(store, TriggerRequest("job")).run
    claim(store, lease=timedelta(seconds=-1))
    assert queue.renew_leases(store, "w1", LEASE, [(run.id, 1)]) == {(run.id, 1): False}
    assert finish.reap_expired_leases(store) == []


def test_a_worker_renews_only_the_leases_of_runs_it_is_running(store: Store) -> None:
    """A run whose end failed to record is not kept alive by the worker's heartbeat."""
    define(store)
    running, forgotten = (admit(store, TriggerRequest("job")).run for _ in range(2))
    claim(store, lease=timedelta(seconds=-1))
    queue.renew_leases(store, "w1", LEASE, [(running.id, 1)])
    assert finish.reap_expired_leases(store) == [(forgotten.id, 1)]
    assert runs.get(store, running.id).status == RunStatus.RUNNING


def test_runs_handed_back_are_queued_as_if_never_claimed(store: Store) -> None:
    define(store, concurrency={"key": "k", "limit": 1})
    first = admit(store, TriggerRequest("job")).run
    (claimed,) = claim(store)
    finish.hand_back(store, [claimed], "handed back: worker stopping")
    back = runs.get(store, first.id)
    assert (back.status, back.attempt, back.lease_owner, back.started_at) == (RunStatus.QUEUED, 0, None, None)
    assert runs.detail(store, SYSTEM, first.id).attempts == []
    (again,) = claim(store, worker="w2")  # its concurrency slot was released too
    assert again.run.id == first.id and again.run.attempt == 1


def test_a_run_asked_to_cancel_before_it_was_handed_back_is_cancelled(store: Store) -> None:
    define(store, retries={"attempts": 3})
    run = admit(store, TriggerRequest("job")).run
    (claimed,) = claim(store)
    runs.cancel(store, SYSTEM, run.id)
    finish.hand_back(store, [claimed], "handed back: worker stopping")
    assert runs.get(store, run.id).status == RunStatus.CANCELLED
    assert claim(store, worker="w2") == []


def test_concurrency_key_limits_claims_and_slot_is_released(store: Store) -> None:
    define(
        store,
        params={"type": "object", "properties": {"env": {"type": "string"}}},
        concurrency={"key": "${{ params.env }}", "limit": 1},
    )
    a1 = admit(store, TriggerRequest("job", {"env": "a"})).run
    a2 = admit(store, TriggerRequest("job", {"env": "a"})).run
    b1 = admit(store, TriggerRequest("job", {"env": "b"})).run
    first = claim(store)
    assert sorted(c.run.id for c in first) == sorted([a1.id, b1.id])
    assert claim(store) == []  # a2 waits for a1's slot
    finish.finish(store, next(c for c in first if c.run.id == a1.id), Outcome(RunStatus.SUCCEEDED, 0))
    assert [c.run.id for c in claim(store)] == [a2.id]


def test_slot_is_released_when_the_reaper_ends_an_attempt(store: Store) -> None:
    define(store, concurrency={"key": "one", "limit": 1})
    admit(store, TriggerRequest("job"))
    second = admit(store, TriggerRequest("job")).run
    claim(store, lease=timedelta(seconds=-1))
    finish.reap_expired_leases(store)
    assert [c.run.id for c in claim(store)] == [second.id]


def test_reject_policy_records_a_rejected_run(store: Store) -> None:
    define(store, concurrency={"key": "k", "limit": 1, "policy": "reject"})
    admit(store, TriggerRequest("job"))
    with pytest.raises(ConcurrencyRejected) as caught:
        admit(store, TriggerRequest("job"))
    rejected = runs.get(store, caught.value.extensions["run_id"])
    assert rejected.status == RunStatus.REJECTED and "concurrency limit" in (rejected.error or "")


def test_cancel_running_policy_cancels_the_older_runs(store: Store) -> None:
    define(store, concurrency={"key": "k", "limit": 1, "policy": "cancel_running"})
    queued = admit(store, TriggerRequest("job")).run
    claim(store)
    newer = admit(store, TriggerRequest("job")).run
    assert runs.get(store, queued.id).cancel_requested
    assert runs.get(store, newer.id).status == RunStatus.QUEUED


def test_a_cancel_decided_on_a_run_read_before_a_claim_started_it_asks_its_worker(store: Store) -> None:
    """cancel_running reads the other runs of its key unlocked: a worker may claim one
    meanwhile, and the cancel must reach it all the same, not be dropped."""
    define(store)
    run = admit(store, TriggerRequest("job")).run  # read as queued
    claim(store)
    with store.transaction() as tx:
        runs.request_cancel(tx, run, utcnow(), "superseded")
    current = runs.get(store, run.id)
    assert (current.status, current.cancel_requested) == (RunStatus.RUNNING, True)


def test_a_cancel_decided_on_a_run_read_while_running_cancels_its_retry(store: Store) -> None:
    """The attempt failed and the run was queued again meanwhile: the flag would be set on
    a queued run, which the next claim would start as if no cancel had been asked."""
    define(store, retries={"attempts": 2, "backoff": "1h"})
    admit(store, TriggerRequest("job"))
    (claimed,) = claim(store)
    assert finish.finish(store, claimed, Outcome(RunStatus.FAILED, 1))
    with store.transaction() as tx:
        runs.request_cancel(tx, claimed.run, utcnow(), "superseded")  # read as running
    current = runs.get(store, claimed.run.id)
    assert (current.status, current.error) == (RunStatus.CANCELLED, "superseded")


def test_cancel_queued_is_immediate_and_cancel_finished_conflicts(store: Store) -> None:
    define(store)
    run = admit(store, TriggerRequest("job")).run
    assert runs.cancel(store, SYSTEM, run.id).status == RunStatus.CANCELLED
    with pytest.raises(Conflict):
        runs.cancel(store, SYSTEM, run.id)


def test_notify_rules_match_the_end_state_whether_or_not_the_definition_is_at_hand(store: Store) -> None:
    """Finish has the parsed automation; a cancel reads the rules from the stored version."""
    define(
        store,
        retries={"attempts": 1},
        notify=[{"on": ["cancelled"], "url": "https://a.example/"}, {"url": "https://every.example/"}],
    )

    def notified(run_id: str) -> list[str]:
        return sorted(d["url"] for d in runs.deliveries(store, SYSTEM, run_id))

    cancelled = admit(store, TriggerRequest("job")).run
    runs.cancel(store, SYSTEM, cancelled.id)
    assert notified(cancelled.id) == ["https://a.example/", "https://every.example/"]
    succeeded = admit(store, TriggerRequest("job")).run
    (claimed,) = claim(store)
    assert finish.finish(store, claimed, Outcome(RunStatus.SUCCEEDED, 0))
    assert notified(succeeded.id) == ["https://every.example/"]


def test_cancel_running_asks_the_worker_and_the_lease_renewal_tells_it(store: Store) -> None:
    define(store)
    run = admit(store, TriggerRequest("job")).run
    claim(store)
    assert runs.cancel(store, SYSTEM, run.id).cancel_requested
    assert queue.renew_leases(store, "w1", LEASE, [(run.id, 1)]) == {(run.id, 1): True}


def test_logs_are_numbered_in_order_and_kept_per_attempt(store: Store) -> None:
    define(store, retries={"attempts": 2, "backoff": "0s"})
    run = admit(store, TriggerRequest("job")).run
    (first,) = claim(store)
    finish.append_logs(
        store, first, [LogChunk("stdout", "a\n", utcnow()), LogChunk("stderr", "b\n", utcnow())]
    )
    finish.finish(store, first, Outcome(RunStatus.FAILED, 1, "x"), [LogChunk("stdout", "c\n", utcnow())])
    (second,) = claim(store)
    finish.finish(store, second, Outcome(RunStatus.SUCCEEDED, 0), [LogChunk("stdout", "d\n", utcnow())])
    _, entries = runs.logs(store, run.id)
    assert [(e.seq, e.attempt, e.text) for e in entries] == [
        (1, 1, "a\n"),
        (2, 1, "b\n"),
        (3, 1, "c\n"),
        (4, 2, "d\n"),
    ]
    _, only_second = runs.logs(store, run.id, attempt=2)
    assert [e.text for e in only_second] == ["d\n"]


def test_pagination_walks_all_runs_newest_first(store: Store) -> None:
    define(store)
    ids = [admit(store, TriggerRequest("job")).run.id for _ in range(5)]
    seen, cursor = [], None
    while True:
        items, cursor = runs.page(store, SYSTEM, automation="job", statuses=[], before=cursor, limit=2)
        seen += [r.id for r in items]
        if cursor is None:
            break
    assert seen == sorted(ids, reverse=True)
    with pytest.raises(InvalidRequest):
        runs.page(store, SYSTEM, automation=None, statuses=["bogus"], before=None, limit=2)


def test_rotate_key_reencrypts_every_secret(store: Store, tmp_path: Any) -> None:
    from ondeck.engine import secret_store
    from ondeck.vault import KEY_FILE, Vault

    vault = Vault.open(tmp_path, None)
    old_key = (tmp_path / KEY_FILE).read_bytes()
    secret_store.put(store, vault, SYSTEM, "API_KEY", "global", "hunter2")
    _, count = secret_store.rotate_key(store, vault, tmp_path)
    assert count == 1 and (tmp_path / KEY_FILE).read_bytes() != old_key
    assert secret_store.resolve(store, Vault.open(tmp_path, None), ["API_KEY"], "job", None) == {
        "API_KEY": "hunter2"
    }
    with pytest.raises(Exception, match="cannot be decrypted"):
        secret_store.resolve(store, Vault([old_key.strip()]), ["API_KEY"], "job", None)


def test_a_secret_too_short_to_mask_without_showing_it_is_refused(store: Store, tmp_path: Any) -> None:
    """Masked wherever it appears, "x" turned ondeck's "exit code 1" into "e***it code 1"."""
    from ondeck.engine import secret_store
    from ondeck.vault import Vault

    vault = Vault.open(tmp_path, None)
    with pytest.raises(InvalidRequest, match="a secret value is 4 characters to 65536 bytes"):
        secret_store.put(store, vault, SYSTEM, "PIN", "global", "123")
    secret_store.put(store, vault, SYSTEM, "PIN", "global", "1234")
    assert secret_store.resolve(store, vault, ["PIN"], "job", None) == {"PIN": "1234"}


def test_a_trial_run_that_ends_without_a_verdict_lets_the_next_trigger_be_the_trial(store: Store) -> None:
    define(store, circuit_breaker={"failures": 1, "within": "1m", "cooldown": "100ms"})
    admit(store, TriggerRequest("job"))
    (failing,) = claim(store)
    finish.finish(store, failing, Outcome(RunStatus.FAILED, 1, "exit code 1"))
    with pytest.raises(CircuitOpen):
        admit(store, TriggerRequest("job"))  # open for the cooldown
    trial = wait_until(lambda: _admitted(store), timeout=10, message="the cooldown to end")
    with pytest.raises(CircuitOpen, match="trial run"):
        admit(store, TriggerRequest("job"))

    runs.cancel(store, SYSTEM, trial.id)  # before it ran: no verdict

    assert admit(store, TriggerRequest("job")).run.status == RunStatus.QUEUED
    with pytest.raises(CircuitOpen, match="trial run"):
        admit(store, TriggerRequest("job"))  # the new trial is deciding


def _admitted(store: Store) -> Run | None:
    try:
        return admit(store, TriggerRequest("job")).run
    except CircuitOpen:
        return None


def test_a_claim_that_leaves_due_runs_locked_wakes_other_workers_on_postgresql_only(store: Store) -> None:
    """On PostgreSQL the candidates a claim locked but left are hidden from other workers'
    claims until it commits; on SQLite nothing is hidden, so nobody is woken for nothing."""
    define(store)
    for _ in range(3):
        admit(store, TriggerRequest("job"))
    heard: list[tuple[str, str]] = []
    store.subscribe(lambda channel, payload: heard.append((channel, payload)))
    assert len(claim(store, capacity=1)) == 1
    assert (("queue", "default") in heard) == (store.dialect == "postgresql")


def test_only_the_changes_and_output_of_a_watched_run_are_announced(store: Store) -> None:
    """Nobody can be watching a run before it exists, and most runs are never watched; on
    PostgreSQL each announcement wakes every API process."""
    define(store)
    heard: list[tuple[str, str]] = []
    store.subscribe(lambda channel, payload: heard.append((channel, payload)))
    unwatched = admit(store, TriggerRequest("job")).run
    waited = admit(store, TriggerRequest("job", watched=True)).run
    followed = runs.watch(store, admit(store, TriggerRequest("job")).run.id, 5)
    assert {channel for channel, _ in heard} == {"queue"}  # workers woken, nobody else
    assert (unwatched.watched, waited.watched, followed.watched) == (False, True, True)
    assert runs.watch(store, followed.id, 5).watched  # again: nothing changes
    claimed = claim(store)
    assert [c.run.id for c in claimed] == [unwatched.id, waited.id, followed.id]
    for each in claimed:
        finish.append_logs(store, each, [LogChunk("stdout", "out\n", utcnow())])
        assert finish.finish(store, each, Outcome(RunStatus.SUCCEEDED, 0))
    announced = [payload for channel, payload in heard if channel == "run"]
    # Each watched run's start, its output and its end.
    assert announced == [waited.id, followed.id] + [waited.id] * 2 + [followed.id] * 2
    assert not runs.watch(store, unwatched.id, 5).watched  # a finished run changes no more: no write


def test_watching_a_queued_run_wakes_the_workers_its_lock_hid_it_from(pg_store: Store) -> None:
    """Marking a queued run watched locks its row till commit; a claim meanwhile skips it
    (SKIP LOCKED), and its worker, having found nothing, waits for a wake-up."""
    define(pg_store)
    run = admit(pg_store, TriggerRequest("job")).run
    heard: list[tuple[str, str]] = []
    pg_store.subscribe(lambda channel, payload: heard.append((channel, payload)))
    with pg_store.transaction() as tx:
        tx.watch_run(run.id, 5)
        assert claim(pg_store) == []  # hidden by the lock
    assert heard == [("queue", "default")]
    (claimed,) = claim(pg_store)
    assert claimed.run.id == run.id and claimed.run.watched
    with pg_store.transaction() as tx:
        tx.watch_run(run.id, 5)  # watched already: nothing to write, nobody to wake
    assert heard == [("queue", "default"), ("run", run.id)]  # and the start announced


def test_whatever_locks_a_queued_run_wakes_its_workers_when_it_lets_go(pg_store: Store) -> None:
    """A refused cancel, a rolled-back move out of the queue, a rolled-back claim, and a
    late flush of output from an attempt the reaper gave up on each lock a queued run's
    row, hiding it from claims; each wakes the run's workers once it has let go of it,
    committed or not. A claim, which takes the run out of the queue for good, wakes nobody."""
    store = pg_store
    define(store, retries={"attempts": 2, "backoff": "0s"})
    run = admit(store, TriggerRequest("job")).run
    (lost,) = claim(store, lease=timedelta(seconds=-1))
    assert finish.reap_expired_leases(store) == [(run.id, 1)]  # back in the queue
    heard: list[tuple[str, str]] = []

    def hear(channel: str, payload: str) -> None:
        with store.engine.connect() as other:  # can a claim take it, now the wake-up comes?
            found = other.execute(text("SELECT id FROM runs FOR UPDATE SKIP LOCKED")).scalars().all()
            heard.append((channel, payload if found == [run.id] else "hidden"))

    store.subscribe(hear)

    def refused_cancel() -> None:
        runs.cancel(store, Principal("someone", frozenset({"operator"})), run.id)

    def rolled_back_move() -> None:
        with store.transaction() as tx:
            assert tx.move_run(run.id, RunStatus.QUEUED, RunStatus.CANCELLED, utcnow(), "superseded")
            assert claim(store) == []  # hidden by the lock
            raise Conflict("refused after the move")

    def rolled_back_claim() -> None:
        with store.transaction() as tx:
            assert [r.id for r, _ in tx.start_queued("default", tx.now(), 5, "w0", utcnow(), tx.now())] == [
                run.id
            ]
            assert claim(store) == []
            raise Conflict("failed before it took any")

    for locker in (refused_cancel, rolled_back_move, rolled_back_claim):
        heard.clear()
        with pytest.raises((Forbidden, Conflict)):
            locker()
        assert heard == [("queue", "default")], locker.__name__
    heard.clear()
    assert not finish.append_logs(store, lost, [LogChunk("stdout", "late line\n", utcnow())])
    assert heard == [("queue", "default")]
    heard.clear()
    (claimed,) = claim(store)
    assert claimed.run.id == run.id and heard == []


@pytest.mark.parametrize(
    ("fields", "request_fields", "outcome", "output", "alone"),
    [
        ({}, {}, Outcome(RunStatus.SUCCEEDED, 0), False, True),
        ({}, {}, Outcome(RunStatus.FAILED, 1), False, True),  # no attempts left
        ({}, {}, Outcome(RunStatus.SUCCEEDED, 0), True, False),  # the last output is appended
        ({"retries": {"attempts": 2}}, {}, Outcome(RunStatus.FAILED, 1), False, False),  # retry or cancel?
        ({"retries": {"attempts": 2}}, {}, Outcome(RunStatus.SUCCEEDED, 0), False, True),
        ({"concurrency": {"key": "k", "limit": 1}}, {}, Outcome(RunStatus.SUCCEEDED, 0), False, False),
        ({}, {"callback_url": "https://hook.example/"}, Outcome(RunStatus.SUCCEEDED, 0), False, False),
        ({"notify": [{"url": "https://n.example/"}]}, {}, Outcome(RunStatus.SUCCEEDED, 0), False, False),
        (
            {"circuit_breaker": {"failures": 3, "within": "1m", "cooldown": "1m"}},
            {},
            Outcome(RunStatus.SUCCEEDED, 0),
            False,
            False,
        ),
    ],
)
def test_only_an_end_of_one_write_is_made_without_a_transaction(
    store: Store,
    fields: dict[str, Any],
    request_fields: dict[str, Any],
    outcome: Outcome,
    output: bool,
    alone: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each write an end makes beside the run's move must commit with it: an end made
    without a transaction is one statement (on PostgreSQL, where it is made so)."""
    define(store, **fields)
    run = admit(store, TriggerRequest("job", **request_fields)).run
    (claimed,) = claim(store)
    chunks = [LogChunk("stdout", "last line\n", utcnow())] if output else []
    assert finish.stands_alone(claimed, outcome, chunks) is alone
    sent: list[str] = []
    driver_cursor = direct._driver_cursor

    def counted(connection: Any, sql: str, *args: Any) -> Any:
        sent.append(sql)
        return driver_cursor(connection, sql, *args)

    monkeypatch.setattr(direct, "_driver_cursor", counted)
    event.listen(store.engine, "before_cursor_execute", lambda *args: sent.append(args[2]))
    assert finish.finish(store, claimed, outcome, chunks)
    assert runs.get(store, run.id).status in (outcome.status, RunStatus.QUEUED)
    if alone and store.dialect == "postgresql":
        assert len(sent) == 2 and sent[0].startswith("WITH moved AS"), sent  # the end, then the read


def test_a_run_s_writes_find_it_and_its_attempt_by_id_however_long_the_queue(pg_url: str) -> None:
    """PostgreSQL plans a prepared statement once for any values (a generic plan), and on
    a new database, before autovacuum first analyses its tables, with no statistics.
    Such a plan for a run's start read the queue's index (every queued run's entry) to find
    the run, and for its end, a cancel and the reaper's look the lease index (every running
    run's), and every attempt. Each must find the run and its attempt by primary key,
    whatever the queue and the statistics. (A worker's renewal of its leases, every ten
    seconds, may read the whole table while it is small.)"""
    plans: list[str] = []
    # Every statement's plan, as a notice, and the generic plan from the first execution on.
    explained = pg_url + "%20".join(
        [
            "",
            "-csession_preload_libraries%3Dauto_explain",
            "-cauto_explain.log_min_duration%3D0",
            "-cauto_explain.log_level%3Dnotice",
            "-cplan_cache_mode%3Dforce_generic_plan",
        ]
    )
    store = Store(explained)
    event.listen(
        store.engine,
        "connect",
        lambda connection, _: connection.add_notice_handler(lambda d: plans.append(d.message_primary or "")),
    )
    try:
        store.upgrade()
        with store.engine.begin() as connection:  # and no statistics for the test's length
            for table in ("runs", "attempts", "run_transitions"):
                connection.execute(text(f"ALTER TABLE {table} SET (autovacuum_enabled = false)"))
        define(store)
        for _ in range(30):
            admit(store, TriggerRequest("job"))
        plans.clear()
        claims = claim(store, capacity=3)
        runs.cancel(store, SYSTEM, claims[0].run.id)
        with store.transaction() as tx:
            assert tx.lock_expired_lease(claims[0].run.id, utcnow()) is None  # not lapsed
        for claimed in claims:
            assert finish.finish(store, claimed, Outcome(RunStatus.SUCCEEDED, 0), [])
    finally:
        store.dispose()
    writes = [plan for plan in plans if "runs" in plan and ("WITH moved AS" in plan or "UPDATE runs" in plan)]
    writes += [plan for plan in plans if "FOR UPDATE SKIP LOCKED" in plan and "lease_expires_at <" in plan]
    assert (
        len(writes) == 8
    )  # the claim (it starts the first), two starts, a cancel, the reaper's look, three ends
    for plan in writes:
        if "WITH candidate AS" in plan:  # the claim: the queue's index finds its candidates
            update = plan[plan.index("Update on runs") :]
            assert "Index Scan using runs_pkey on runs" in update and "ix_runs_" not in update, plan
        else:
            assert "using runs_pkey on runs" in plan and "ix_runs_" not in plan, plan
    ends = [plan for plan in writes if "UPDATE attempts" in plan]
    assert len(ends) == 3
    for plan in ends:
        assert "using attempts_pkey on attempts" in plan and "Seq Scan" not in plan, plan


def _waits_on_a_lock(store: Store, holder: int, statement: str) -> bool:
    """Whether a session waits for the locks of session ``holder`` (a backend pid) in a
    statement starting so: only this test's own, not those of tests running beside it."""
    with store.engine.connect() as connection:
        sessions = connection.execute(
            text(
                "SELECT query FROM pg_stat_activity WHERE :h = ANY(pg_blocking_pids(pid)) AND query LIKE :q"
            ),
            {"h": holder, "q": statement + "%"},
        )
        return sessions.first() is not None


def _backend(tx: Transaction) -> int:
    return int(tx._c.execute(text("SELECT pg_backend_pid()")).scalar_one())


def test_a_watch_and_a_run_s_change_under_way_wait_for_each_other_and_miss_nothing(pg_store: Store) -> None:
    """Either the waiter's read sees the change, or the change sees the flag (and so is
    announced): whichever writes the run's row first, the other waits for its commit."""
    store = pg_store
    define(store)
    heard: list[tuple[str, str]] = []
    store.subscribe(lambda channel, payload: heard.append((channel, payload)))
    first, second = (admit(store, TriggerRequest("job")).run for _ in range(2))
    claimed = {c.run.id: c for c in claim(store)}
    with ThreadPoolExecutor(1) as pool:
        with store.transaction() as tx:  # the end first: the waiter reads it
            assert finish.finish_in(tx, claimed[first.id], Outcome(RunStatus.SUCCEEDED, 0), [])
            holder = _backend(tx)
            watched = pool.submit(runs.watch, store, first.id, 30)
            wait_until(lambda: _waits_on_a_lock(store, holder, "UPDATE runs SET watched"), message="a watch")
        assert watched.result(timeout=30).status == RunStatus.SUCCEEDED
        with store.transaction() as tx:  # the flag first: the end is announced
            tx.watch_run(second.id, 30)
            holder = _backend(tx)
            ended = pool.submit(finish.finish, store, claimed[second.id], Outcome(RunStatus.SUCCEEDED, 0), [])
            wait_until(lambda: _waits_on_a_lock(store, holder, "WITH moved AS"), message="an end")
        assert ended.result(timeout=30)
    assert ("run", first.id) not in heard and ("run", second.id) in heard


def test_a_watch_waits_for_a_locked_run_no_longer_than_its_patience(pg_store: Store) -> None:
    """A transaction stuck holding the run's row (its client gone silent) held a waiter,
    and its request, until it let go: long past the wait it asked for."""
    store = pg_store
    define(store)
    run = admit(store, TriggerRequest("job")).run
    with ThreadPoolExecutor(1) as pool, store.transaction() as tx:
        tx.update_run(run.id, priority=1)  # the row locked till this commits
        started = time.monotonic()
        seen = pool.submit(runs.watch, store, run.id, 0.5).result(timeout=30)
        assert time.monotonic() - started < 5 and not seen.watched
    assert runs.watch(store, run.id, 0.5).watched  # let go: watched


def test_a_transaction_whose_client_went_silent_lets_go_of_its_locks(
    pg_url: str, pg_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Until its host's TCP keepalives noticed (two hours by default), nobody could move
    the runs it had locked, and the reaper passed them by."""
    monkeypatch.setattr(database, "IDLE_IN_TRANSACTION_SECONDS", 1)
    define(pg_store)
    run = admit(pg_store, TriggerRequest("job")).run
    silent = Store(pg_url)
    try:
        connection = silent.engine.connect()
        connection.begin()
        connection.execute(update(runs_table).where(runs_table.c.id == run.id).values(priority=1))
        # ... and its client sends nothing more.
        wait_until(lambda: runs.watch(pg_store, run.id, 0.2).watched, timeout=30, message="the lock to go")
        connection.invalidate()
    finally:
        silent.dispose()


def test_a_lost_claim_s_run_is_found_by_its_lease_once_the_claim_ends(pg_store: Store) -> None:
    """``claimed_until`` waits for a claim of the worker still under way (its run is not
    running yet, so the read alone would pass it by), and takes only that claim's runs,
    while more than half their lease is left."""
    store = pg_store
    define(store)
    ours, other = (admit(store, TriggerRequest("job")).run for _ in range(2))
    (earlier,) = claim(store, capacity=1, lease=LEASE * 2)  # another claim of the worker, a later lease
    assert earlier.run.id == ours.id
    definitions = DefinitionCache()
    with ThreadPoolExecutor(1) as pool:
        with store.transaction() as tx:
            until = tx.now() + LEASE
            started = tx.start_queued("default", tx.now(), 1, "w1", utcnow(), until)
            assert [run.id for run, _ in started] == [other.id]
            holder = _backend(tx)
            found = pool.submit(queue.claimed_until, store, "w1", until, LEASE, definitions)
            wait_until(
                lambda: _waits_on_a_lock(store, holder, "SELECT pg_advisory_xact_lock"), message="a look"
            )
        assert [c.run.id for c in found.result(timeout=30)] == [other.id]
    assert queue.claimed_until(store, "w1", until, LEASE * 3, definitions) == []  # as if most had gone


def test_a_retry_keeps_the_time_the_run_first_started(store: Store) -> None:
    define(store, retries={"attempts": 2, "backoff": "1ms", "max_backoff": "1ms"})
    run = admit(store, TriggerRequest("job")).run
    (first,) = claim(store)
    assert finish.finish(store, first, Outcome(RunStatus.FAILED, 1), [])
    retried: list[queue.Claim] = []
    wait_until(lambda: retried.extend(claim(store)) or bool(retried), message="the retry")
    assert retried[0].run.attempt == 2 and retried[0].run.started_at == first.run.started_at
    assert runs.get(store, run.id).started_at == first.run.started_at
