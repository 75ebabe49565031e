"""Reading runs and their logs, and cancelling them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from ondeck.domain import AttemptRecord, LogEntry, Run, RunStatus, Transition, utcnow
from ondeck.engine import states
from ondeck.errors import Conflict, InvalidRequest, NotFound
from ondeck.store.store import Store, Transaction


@dataclass(frozen=True)
class RunDetail:
    run: Run
    transitions: list[Transition]
    attempts: list[AttemptRecord]


def get(store: Store, run_id: str) -> Run:
    with store.read() as tx:
        run = tx.get_run(run_id)
    if run is None:
        raise NotFound(f"run {run_id} does not exist")
    return run


def detail(store: Store, run_id: str) -> RunDetail:
    with store.read() as tx:
        run = tx.get_run(run_id)
        if run is None:
            raise NotFound(f"run {run_id} does not exist")
        return RunDetail(run, tx.transitions(run_id), tx.attempts(run_id))


def page(
    store: Store,
    *,
    automation: str | None,
    statuses: list[str],
    before: str | None,
    limit: int,
) -> tuple[list[Run], str | None]:
    """One page of runs, newest first, and the cursor of the next page (None at the end)."""
    unknown = [s for s in statuses if s not in RunStatus.__members__.values()]
    if unknown:
        raise InvalidRequest(f"unknown status {', '.join(unknown)}; use one of {', '.join(RunStatus)}")
    with store.read() as tx:
        found = tx.list_runs(automation=automation, statuses=statuses, before=before, limit=limit + 1)
    if len(found) > limit:
        return found[:limit], found[limit - 1].id
    return found, None


def logs(
    store: Store, run_id: str, *, after: int = 0, limit: int = 1000, attempt: int | None = None
) -> tuple[Run, list[LogEntry]]:
    """The run (read first, so a terminal status means every entry is visible) and its logs."""
    with store.read() as tx:
        run = tx.get_run(run_id)
        if run is None:
            raise NotFound(f"run {run_id} does not exist")
        return run, tx.logs_after(run_id, after, limit, attempt)


def cancel(store: Store, run_id: str, reason: str = "cancelled on request") -> Run:
    now = utcnow()
    with store.transaction() as tx:
        run = tx.get_run(run_id, lock=True)
        if run is None:
            raise NotFound(f"run {run_id} does not exist")
        if run.status.terminal:
            raise Conflict(f"run {run_id} has already finished ({run.status})", run_status=str(run.status))
        request_cancel(tx, run, now, reason)
        updated = tx.get_run(run_id)
    assert updated is not None
    return updated


def request_cancel(tx: Transaction, run: Run, now: datetime, reason: str) -> None:
    """Cancel at once if the run has not started; else ask its worker to stop it."""
    if run.status == RunStatus.RUNNING:
        if not run.cancel_requested:
            tx.update_run(run.id, cancel_requested=True)
            tx.notify("cancel", run.id)
        return
    states.check(run.status, RunStatus.CANCELLED)
    tx.move_run(run.id, run.status, RunStatus.CANCELLED, now, reason, finished_at=now, error=reason)
