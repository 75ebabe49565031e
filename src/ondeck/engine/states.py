"""The one table of legal run state transitions."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Any

from ondeck.domain import Run, RunStatus
from ondeck.engine import outbox
from ondeck.errors import IllegalTransition
from ondeck.spec.models import Automation
from ondeck.store.store import AttemptEnd, AttemptStart, Transaction

S = RunStatus

TRANSITIONS: dict[RunStatus | None, frozenset[RunStatus]] = {
    None: frozenset({S.PENDING}),
    S.PENDING: frozenset({S.WAITING_APPROVAL, S.QUEUED, S.REJECTED, S.CANCELLED}),
    S.WAITING_APPROVAL: frozenset({S.QUEUED, S.REJECTED, S.CANCELLED}),
    # running -> queued is a retry (or a lost worker's run going back to the queue).
    S.QUEUED: frozenset({S.RUNNING, S.CANCELLED}),
    S.RUNNING: frozenset({S.SUCCEEDED, S.FAILED, S.TIMED_OUT, S.CANCELLED, S.QUEUED}),
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset(),
    S.TIMED_OUT: frozenset(),
    S.CANCELLED: frozenset(),
    S.REJECTED: frozenset(),
}


def move(
    tx: Transaction,
    run: Run,
    to_status: RunStatus,
    now: datetime,
    reason: str,
    *,
    definition: Automation | None = None,
    lease: tuple[str, int] | None = None,
    with_attempt: AttemptStart | AttemptEnd | None = None,
    **values: Any,
) -> bool:
    """The one way a run changes state: checked against the table, recorded with its reason.

    False when the run is no longer in ``run.status`` (or, with ``lease``, no longer
    leased to that worker for that attempt): then nothing was written. The start or
    end of an attempt that goes with the move (``with_attempt``) is written with it.
    A move into a terminal state also queues the run's callback and notifications
    in the same transaction, so they are sent even if this process dies next
    (``definition``, the run's parsed automation, spares reading its notify rules).
    """
    check(run.status, to_status)
    if not tx.move_run(run.id, run.status, to_status, now, reason, lease, with_attempt, **values):
        return False
    if to_status.terminal:
        outbox.enqueue(tx, replace(run, status=to_status, **values), now, definition)
    return True


def admit(
    tx: Transaction,
    run: Run,
    to_status: RunStatus,
    triggered: str,
    reason: str,
    definition: Automation,
    **values: Any,
) -> Run:
    """Write a new run straight into the status admission decided (``queued``,
    ``waiting_approval`` or ``rejected``), recording both its transitions: from
    nothing to ``pending`` (``triggered``), and from ``pending`` on (``reason``).
    """
    check(None, RunStatus.PENDING)
    check(RunStatus.PENDING, to_status)
    admitted = replace(run, status=to_status, **values)
    tx.insert_run(admitted, [(None, RunStatus.PENDING, triggered), (RunStatus.PENDING, to_status, reason)])
    if to_status.terminal:
        outbox.enqueue(tx, admitted, run.created_at, definition)
    return admitted


def check(from_status: RunStatus | None, to_status: RunStatus) -> None:
    """Raise ``IllegalTransition`` unless ``from_status -> to_status`` is in the table."""
    if to_status not in TRANSITIONS[from_status]:
        raise IllegalTransition(
            f"a run cannot go from {from_status or 'nothing'} to {to_status}",
            from_status=from_status,
            to_status=str(to_status),
        )
