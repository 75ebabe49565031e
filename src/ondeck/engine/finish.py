"""Ending an attempt: in one transaction, retry or finish the run, record the
attempt, and free its concurrency slot.

Used by the worker for attempts that ran to an end and by the reaper for
attempts whose worker disappeared; both go through ``_end_attempt`` so the
rules for retries and slots are in one place.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from ondeck.domain import LogChunk, Outcome, Run, RunStatus, utcnow
from ondeck.durations import format_duration
from ondeck.engine import catalog, limits, states
from ondeck.engine.queue import Claim, held
from ondeck.errors import StoreUnavailable, UnloadableDefinition
from ondeck.spec.models import Automation, Retries
from ondeck.store.store import AttemptEnd, Store, Transaction

log = logging.getLogger(__name__)
RETRYABLE = frozenset({RunStatus.FAILED, RunStatus.TIMED_OUT})


def backoff(retries: Retries, finished_attempt: int) -> float:
    """Exponential backoff with equal jitter: half fixed, half random."""
    delay = min(retries.max_backoff, retries.backoff * 2 ** (finished_attempt - 1))
    return float(delay / 2 + random.uniform(0, delay / 2))


def append_logs(store: Store, claim: Claim, chunks: Sequence[LogChunk]) -> bool:
    """Write a batch of output; False if the lease was lost (the attempt is void)."""
    with store.transaction() as tx:
        run = tx.get_run(claim.run.id, lock=True)
        if not held(run, claim):
            return False
        tx.append_logs(claim.run.id, claim.run.attempt, chunks)
        return True


def finish(store: Store, claim: Claim, outcome: Outcome, chunks: Sequence[LogChunk] = ()) -> bool:
    """Record the attempt's end with its last output; False if the lease was lost meanwhile."""
    with store.transaction(alone=stands_alone(claim, outcome, chunks)) as tx:
        return finish_in(tx, claim, outcome, chunks)


def stands_alone(claim: Claim, outcome: Outcome, chunks: Sequence[LogChunk]) -> bool:
    """Whether ``finish_in`` ends this attempt in one write, the run's move: no output
    left to append, no retry to weigh against a cancel, no concurrency slot to free, no
    callback or notification to queue, no circuit breaker to count it. Then it needs no
    transaction around it (``Store.transaction(alone=True)``): nearly every end of a run
    whose output was written while it ran."""
    automation = claim.automation
    return not (
        chunks
        or _may_retry(claim.run, outcome)
        or claim.run.concurrency_key is not None
        or claim.run.callback_url
        or automation.notify
        or automation.circuit_breaker is not None
    )


def finish_in(tx: Transaction, claim: Claim, outcome: Outcome, chunks: Sequence[LogChunk]) -> bool:
    """``finish`` within ``tx``.

    When the outcome alone decides where the run goes (it succeeded, was cancelled,
    or has no attempts left), the run is not read first: the move itself checks,
    as a compare-and-set, that this worker still holds this attempt. A retry also
    depends on whether a cancel was asked for since the claim, so then it is read.
    """
    now = utcnow()
    run = claim.run
    if _may_retry(run, outcome):
        current = tx.get_run(run.id, lock=True)
        if current is None or not held(current, claim):
            return False
        run = current
    if not _end_attempt(tx, run, outcome, claim.automation, now, (claim.worker, claim.run.attempt)):
        return False
    tx.append_logs(run.id, run.attempt, chunks)
    return True


def _may_retry(run: Run, outcome: Outcome) -> bool:
    return outcome.status in RETRYABLE and run.attempt < run.max_attempts


def hand_back(store: Store, claims: Sequence[Claim], reason: str) -> None:
    """Return claimed runs that never started to the queue, as if never claimed: the
    attempt is not counted, and the runs are due at once for another worker. A run
    asked to cancel meanwhile is cancelled instead."""
    now = utcnow()
    with store.transaction() as tx:
        for claim in claims:
            run = tx.get_run(claim.run.id, lock=True)
            if run is None or not held(run, claim):
                continue
            if run.cancel_requested:
                outcome = Outcome(RunStatus.CANCELLED, error="cancelled before it started")
                _end_attempt(tx, run, outcome, claim.automation, now, (claim.worker, run.attempt))
                continue
            previous = run.attempt - 1
            states.move(
                tx,
                run,
                RunStatus.QUEUED,
                now,
                reason,
                attempt=previous,
                lease_owner=None,
                lease_expires_at=None,
                started_at=run.started_at if previous else None,
            )
            tx.delete_attempt(run.id, run.attempt)
            if run.concurrency_key is not None:
                tx.release_slot(run.id)
            tx.notify("queue", run.worker_group)


def reap_expired_leases(store: Store, limit: int = 100) -> list[tuple[str, int]]:
    """End every attempt whose lease lapsed (its worker died or hung); returns (run id, attempt).

    Each in a transaction of its own: a run whose end cannot be written is logged and left
    for the next pass, and does not keep the others from ending.

    Leases are judged in the store's time, which their workers wrote them in, read
    afresh for each pass (``Store.sync_clock``): never in this host's, which may be
    ahead of the workers' and would end healthy attempts.
    """
    store.sync_clock()
    cutoff, now = store.now(), utcnow()
    with store.read() as tx:
        lapsed = tx.expired_leases(cutoff, limit)
    reaped = []
    for run_id in lapsed:
        try:
            ended = _reap(store, run_id, cutoff, now)
        except StoreUnavailable:
            raise
        except Exception:
            log.exception("ending run %s, whose lease lapsed, failed; it is tried again next pass", run_id)
            continue
        if ended is not None:
            reaped.append(ended)
    return reaped


def _reap(store: Store, run_id: str, cutoff: datetime, now: datetime) -> tuple[str, int] | None:
    """End ``run_id``'s attempt if its lease still lapsed before ``cutoff`` (store time);
    ``now`` (this host's) dates the end."""
    with store.transaction() as tx:
        run = tx.lock_expired_lease(run_id, cutoff)
        if run is None:  # renewed or ended meanwhile, or another reaper has it
            return None
        automation = _definition(tx, run)
        status = RunStatus.CANCELLED if run.cancel_requested else RunStatus.FAILED
        error = f"worker lost: {run.lease_owner} stopped renewing its lease"
        if not _end_attempt(tx, run, Outcome(status, error=error), automation, now):
            return None
        return run.id, run.attempt


def _definition(tx: Transaction, run: Run) -> Automation | None:
    """The run's automation version, or None when it is gone or no longer loads: the
    attempt still ends, under the default retry policy."""
    version = tx.automation_version(run.automation, run.version)
    try:
        return catalog.definition_of(version) if version else None
    except UnloadableDefinition:
        return None


def _end_attempt(
    tx: Transaction,
    run: Run,
    outcome: Outcome,
    automation: Automation | None,
    now: datetime,
    lease: tuple[str, int] | None = None,
) -> bool:
    """Move the run on (retry or end it) and record the attempt's end; False, with nothing
    written, if the run was no longer running (under ``lease``, when given)."""
    retries = automation.retries if automation is not None else Retries()
    released: dict[str, Any] = {"lease_owner": None, "lease_expires_at": None}
    result: dict[str, Any] = {"exit_code": outcome.exit_code, "error": outcome.error}
    retry = _may_retry(run, outcome) and not run.cancel_requested
    ended = AttemptEnd(run.attempt, outcome.status, outcome.exit_code, outcome.error)
    if retry:
        delay = backoff(retries, run.attempt)
        reason = (
            f"attempt {run.attempt} {outcome.status}"
            + (f" ({outcome.error})" if outcome.error else "")
            + f"; retry {run.attempt + 1}/{run.max_attempts} in {format_duration(delay)}"
        )
        moved = states.move(
            tx,
            run,
            RunStatus.QUEUED,
            now,
            reason,
            lease=lease,
            with_attempt=ended,
            not_before=tx.now() + timedelta(seconds=delay),  # in the time claims judge it by
            **released,
            **result,
        )
    else:
        moved = states.move(
            tx,
            run,
            outcome.status,
            now,
            outcome.error or str(outcome.status),
            definition=automation,
            lease=lease,
            with_attempt=ended,
            outputs=outcome.outputs,
            finished_at=now,
            **released,
            **result,
        )
    if not moved:
        return False
    if run.concurrency_key is not None:  # only such runs take a slot (queue.claim)
        tx.release_slot(run.id)
    if retry or run.concurrency_key is not None:
        tx.notify("queue", run.worker_group)  # the retry, or a run waiting for the slot, may go
    if not retry and automation is not None and automation.circuit_breaker is not None:
        limits.record_result(tx, run.automation, run.id, outcome.status, automation.circuit_breaker, now)
    return True
