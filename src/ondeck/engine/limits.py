"""Rate limits and circuit breakers, both decided inside the admission transaction.

Rate limits count in fixed windows stored in the database, so the limit holds
across any number of API processes. A circuit breaker opens after too many
failures within a period, refuses triggers while open, then lets one trial run
through (half-open): its success closes the breaker, its failure reopens it.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta

from pydantic import ValidationError

from ondeck.domain import RunStatus
from ondeck.durations import format_duration
from ondeck.errors import CircuitOpen, RateLimited
from ondeck.spec.loader import summarize
from ondeck.spec.models import CircuitBreaker, RateLimit
from ondeck.store.store import Transaction

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
_COUNT_MAX = 2**31 - 1  # rate_counters.count


def check_rate(tx: Transaction, key: str, limit: int, per: float, now: datetime, what: str) -> None:
    """Count the trigger against ``limit`` per ``per`` for ``key``: ``RateLimited`` if it is
    one too many, raised now or, on PostgreSQL, by the commit (``Transaction.count_within``)."""
    epoch = now.timestamp()
    window = int(epoch // per * per)
    retry_after = max(1, math.ceil(window + per - epoch))
    refusal = RateLimited(
        f"rate limit for {what} is {limit} per {format_duration(per)}; retry in {retry_after}s", retry_after
    )
    # Counts are 32-bit integers: a limit beyond them never refuses (and, as a literal of
    # another type, would match no function on PostgreSQL).
    tx.count_within(key, window, min(limit, _COUNT_MAX), refusal)


def parse_global_limit(text: str | None) -> tuple[int, float] | None:
    """``"100/1m"`` → (100, 60.0), bounded as an automation's ``rate_limit`` is (a window
    of 1s to 1d); ``"100"`` is per minute; empty means no global limit. ``ValueError``
    says what is wrong."""
    if not text:
        return None
    count, _, per = text.partition("/")
    try:
        rule = RateLimit(limit=count.strip(), per=per.strip() or "1m")
    except ValidationError as exc:
        raise ValueError(f"rate limit {text!r}: {summarize(exc)}") from None
    return rule.limit, rule.per


def check_breaker(tx: Transaction, automation: str, run_id: str, now: datetime) -> None:
    """Refuse (503) while open; turn the first trigger after the cooldown into the trial run
    (or, if the trial ended without a verdict, the next one)."""
    state = tx.breaker(automation, lock=True)
    if state is None or state["state"] == CLOSED:
        return
    if state["state"] == OPEN and now < state["opened_until"]:
        retry_after = max(1, math.ceil((state["opened_until"] - now).total_seconds()))
        raise CircuitOpen(
            f"automation {automation!r} is failing; its circuit breaker is open for another {retry_after}s",
            retry_after,
        )
    if state["state"] == HALF_OPEN and _trial_pending(tx, state["trial_run_id"]):
        raise CircuitOpen(
            f"automation {automation!r}: a trial run ({state['trial_run_id']}) is deciding whether "
            "its circuit breaker closes",
            5,
        )
    tx.save_breaker(automation, state=HALF_OPEN, trial_run_id=run_id)


def _trial_pending(tx: Transaction, run_id: str | None) -> bool:
    """Whether the trial run may still give its verdict. One that ended without one
    (cancelled or rejected before it ran) or is gone lets the next trigger be the trial,
    so the breaker never stays half open."""
    trial = tx.get_run(run_id) if run_id else None
    return trial is not None and not trial.status.terminal


def record_result(
    tx: Transaction, automation: str, run_id: str, status: RunStatus, breaker: CircuitBreaker, now: datetime
) -> None:
    """Called when a run of ``automation`` reaches a terminal state."""
    state = tx.breaker(automation, lock=True)
    if state is not None and state["state"] == HALF_OPEN and state["trial_run_id"] == run_id:
        if status == RunStatus.SUCCEEDED:
            tx.save_breaker(automation, state=CLOSED, closed_at=now, opened_until=None, trial_run_id=None)
        else:
            _open(tx, automation, breaker, now)
        return
    if status not in (RunStatus.FAILED, RunStatus.TIMED_OUT):
        return
    if state is not None and state["state"] != CLOSED:
        return
    since = now - timedelta(seconds=breaker.within)
    if state is not None and state["closed_at"] > since:
        since = state["closed_at"]
    if tx.count_failures(automation, since) >= breaker.failures:
        _open(tx, automation, breaker, now)


def _open(tx: Transaction, automation: str, breaker: CircuitBreaker, now: datetime) -> None:
    tx.save_breaker(
        automation,
        state=OPEN,
        opened_until=now + timedelta(seconds=breaker.cooldown),
        closed_at=now,
        trial_run_id=None,
    )
