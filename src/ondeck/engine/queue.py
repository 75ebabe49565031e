"""Claiming queued runs under a lease, and keeping the lease alive."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from ondeck.domain import Run, RunStatus, utcnow
from ondeck.engine import catalog, states
from ondeck.errors import UnloadableDefinition
from ondeck.spec.models import Automation
from ondeck.store.store import AttemptEnd, AttemptStart, Store, Transaction

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claim:
    """One attempt of one run, leased to ``worker`` until it finishes or the lease lapses."""

    run: Run
    automation: Automation
    worker: str


class DefinitionCache:
    """Versions never change once stored, so each is read once per process (and parsed
    once, by ``catalog.definition_of``)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int], Automation] = {}

    def get(self, tx: Transaction, name: str, version: int) -> Automation:
        key = (name, version)
        if key not in self._cache:
            stored = tx.automation_version(name, version)
            assert stored is not None, f"automation {name} version {version} is missing"
            self._cache[key] = catalog.definition_of(stored)
        return self._cache[key]


def claim(
    store: Store,
    worker: str,
    group: str,
    capacity: int,
    lease: timedelta,
    definitions: DefinitionCache,
) -> tuple[list[Claim], bool]:
    """Lease up to ``capacity`` due runs of ``group``, highest priority first (see ``claim_in``).

    If the commit fails, it may have happened all the same, its answer lost: the runs
    whose lease it took are then this worker's to run (``still_held``), or their leases
    would lapse and each be ended as lost without having run. If even that cannot be
    told (the store is still failing), the commit's error is raised: the reaper ends any
    such run when its lease lapses.
    """
    claimed: tuple[list[Claim], bool] | None = None
    try:
        with store.transaction() as tx:
            claimed = claim_in(tx, worker, group, capacity, tx.now() + lease, definitions)
        return claimed
    except Exception as exc:
        if claimed is None:
            raise
        log.warning("the commit of a claim failed; keeping the runs it leased if it happened", exc_info=True)
        try:
            return still_held(store, claimed[0], lease), True
        except Exception:
            raise exc from None


def held(run: Run | None, claim: Claim) -> bool:
    """Whether ``run`` is still running the attempt ``claim`` leased."""
    return (
        run is not None
        and run.status == RunStatus.RUNNING
        and run.lease_owner == claim.worker
        and run.attempt == claim.run.attempt
    )


def still_held(store: Store, claims: list[Claim], lease: timedelta) -> list[Claim]:
    """Those of ``claims`` that committed and are still theirs, with more than half the
    lease left to start them in (a heartbeat then renews it): the run still runs that
    attempt under the lease that claim set, which no other claim, even by another of
    this worker's slots, can have set. Each run is read locked, so a commit still under
    way (its answer lost) is waited for rather than missed."""
    until = store.now() + lease / 2
    with store.transaction() as tx:
        return [
            claim
            for claim in claims
            if held(run := tx.get_run(claim.run.id, lock=True), claim)
            and run is not None  # (held says so; for the type checker)
            and run.lease_expires_at == claim.run.lease_expires_at
            and claim.run.lease_expires_at is not None
            and claim.run.lease_expires_at > until
        ]


def claimed_until(
    store: Store, worker: str, until: datetime, lease: timedelta, definitions: DefinitionCache
) -> list[Claim]:
    """The runs a claim whose statements committed alone (``claim_in``) leased to
    ``worker`` until ``until``, if its answer was lost: they are this worker's to run
    (else their leases would lapse, and each be ended as lost without having run), if
    more than half the lease is left to start them in, as ``still_held`` judges. One
    whose definition no longer loads, which such a claim leaves, is failed here."""
    now = utcnow()
    with store.transaction() as tx:
        claims = []
        for run in tx.leased_runs(worker, until):
            try:
                claims.append(Claim(run, definitions.get(tx, run.automation, run.version), worker))
            except UnloadableDefinition as problem:
                _fail_unloadable(tx, run, worker, now, problem.detail)
        return claims if until > tx.now() + lease / 2 else []


def claim_in(
    tx: Transaction,
    worker: str,
    group: str,
    capacity: int,
    until: datetime,
    definitions: DefinitionCache,
    *,
    spare: int = 2,
) -> tuple[list[Claim], bool]:
    """Lease up to ``capacity`` due runs of ``group`` in ``tx``, highest priority first.

    A run with a concurrency key is only taken when a slot of its key can be
    occupied in this same transaction. Also says whether more runs may be due
    (False when every due run was seen), so a worker with free slots knows
    whether to claim again at once or to wait for a wake-up. On PostgreSQL the
    candidates this claim locked but left are hidden from other workers' claims
    (SKIP LOCKED) until it commits, so it wakes them then.

    It reads ``spare`` candidates beyond the capacity: room to skip runs whose key
    this batch just filled, and to tell whether more are due. Each is parsed and,
    on PostgreSQL, locked (a write), so a claim that needs neither reads none.

    Whether a run is due and when its lease ends (``until``) are in the store's time
    (``Store.now``), which the hosts that queued the run and that reap leases reckon in
    too, not in this host's.

    In a transaction whose statements commit alone (``Store.transaction(alone=True)``) it
    starts only what ``start_queued`` starts: a key's slot and the run's start must
    commit together. A candidate it leaves makes it say more may be due. A run it started
    whose definition no longer loads raises ``UnloadableDefinition``: ``claimed_until``
    fails it in a transaction.
    """
    now, store_now = utcnow(), tx.now()
    claims: list[Claim] = []
    window = capacity + spare
    states.check(RunStatus.QUEUED, RunStatus.RUNNING)  # the moves ``start_queued`` makes
    candidates = tx.start_queued(group, store_now, window, worker, now, until)
    for run, started in candidates:
        if len(claims) == capacity:
            if tx.postgres:  # SQLite has no such locks: nobody to wake, here or elsewhere
                tx.notify("queue", group)
            break
        if started is None and tx.alone:
            return claims, True
        try:
            automation = definitions.get(tx, run.automation, run.version)
        except UnloadableDefinition as problem:
            if tx.alone:  # its failure and the deliveries it queues must commit together
                raise
            _fail_unloadable(tx, started or run, worker, now, problem.detail)
            continue
        if started is None:
            if run.concurrency_key is not None and not tx.take_slot(
                run.concurrency_key, run.concurrency_limit or 1, run.id
            ):
                continue
            started = _start_attempt(tx, run, worker, now, until)
        if started is not None:
            claims.append(Claim(started, automation, worker))
    return claims, len(candidates) == window


def _start_attempt(tx: Transaction, run: Run, worker: str, now: datetime, until: datetime) -> Run | None:
    """Move ``run`` to running under a lease to ``worker`` with a new attempt; None if it
    was no longer queued (another worker took it)."""
    number = run.attempt + 1
    fields: dict[str, Any] = {
        "attempt": number,
        "lease_owner": worker,
        "lease_expires_at": until,
        "started_at": run.started_at or now,
    }
    reason = f"attempt {number} started on {worker}"
    if not states.move(
        tx, run, RunStatus.RUNNING, now, reason, with_attempt=AttemptStart(number, worker), **fields
    ):
        return None
    return replace(run, status=RunStatus.RUNNING, **fields)


def _fail_unloadable(tx: Transaction, run: Run, worker: str, now: datetime, reason: str) -> None:
    """A run whose stored definition no longer loads (a later release checks more) can
    never start: it fails at once, through an attempt as the state table requires (one
    ``start_queued`` started, or one started here), instead of failing every claim that
    meets it and so stalling the queue."""
    started = run if run.status == RunStatus.RUNNING else _start_attempt(tx, run, worker, now, now)
    if started is None:
        return
    states.move(
        tx,
        started,
        RunStatus.FAILED,
        now,
        reason,
        lease=(worker, started.attempt),
        with_attempt=AttemptEnd(started.attempt, RunStatus.FAILED, None, reason),
        error=reason,
        finished_at=now,
        lease_owner=None,
        lease_expires_at=None,
    )
    tx.notify("queue", run.worker_group)  # it took a candidate's place: the claim may have missed runs


def renew_leases(
    store: Store, worker: str, lease: timedelta, held: list[tuple[str, int]]
) -> dict[tuple[str, int], bool]:
    """Extend the worker's leases of ``held``, the (run id, attempt) pairs it is running;
    returns those it still holds, each with whether a cancel was asked for. One missing
    is no longer the worker's to run (its lease lapsed and the reaper ended it, say), so
    the worker stops it. A run it no longer runs (its end failed to record, say) keeps
    its lease only until it lapses, so the reaper ends it."""
    with store.transaction() as tx:
        renewed = tx.renew_leases(worker, held, store.now() + lease)
    return {(run_id, attempt): cancel for run_id, attempt, cancel in renewed}
