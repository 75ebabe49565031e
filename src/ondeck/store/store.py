"""The store: one transaction at a time, each a ``Transaction`` of domain-level queries.

Business rules live in the engine, which composes these queries inside one
``store.transaction()``; this module only knows how to read and write rows.
On SQLite, writers take turns through a lock file (SQLite allows one writer anyway;
its own retries on SQLITE_BUSY sleep up to 100 ms and leave the lock idle).
On PostgreSQL, claims and reaping use ``FOR UPDATE SKIP LOCKED`` and
notifications go out after commit (see ``notifier``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import json
import os
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, fields, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Integer,
    Select,
    String,
    Text,
    and_,
    bindparam,
    cast,
    delete,
    func,
    insert,
    literal,
    literal_column,
    make_url,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects import sqlite
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from ondeck.audit import GENESIS, AuditEntry, canonical_detail, chain_content, chain_hash
from ondeck.domain import (
    TERMINAL,
    AttemptRecord,
    AutomationVersion,
    Decision,
    LogChunk,
    LogEntry,
    Run,
    RunStatus,
    SecretInfo,
    TokenRecord,
    Transition,
    utcnow,
)
from ondeck.errors import StoreUnavailable
from ondeck.store import database, direct
from ondeck.store.clock import DatabaseClock
from ondeck.store.direct import Direct
from ondeck.store.notifier import Notifier
from ondeck.store.tables import (
    UTCDateTime,
    approval_decisions,
    attempts,
    audit_entries,
    automation_versions,
    automations,
    circuit_breakers,
    concurrency_slots,
    deliveries,
    delivery_attempts,
    environments,
    idempotency_keys,
    log_entries,
    rate_counters,
    run_transitions,
    runs,
    schedule_fires,
    schedules,
    secrets,
    tokens,
)

Listener = Callable[[str, str], None]
ACTIVE = (RunStatus.PENDING, RunStatus.WAITING_APPROVAL, RunStatus.QUEUED, RunStatus.RUNNING)
_RUN_FIELDS = [f.name for f in fields(Run)]
_AUDIT_LOCK = 0x0ADA0D17  # serialises appends to the audit chain on PostgreSQL
_CLAIMS_LOCK = 0x0ADC  # with the worker's name: held by each of its claims until it commits


def _claims_lock(worker: Any) -> Any:
    """Take ``worker``'s claims lock (``_CLAIMS_LOCK``) until the transaction ends."""
    return func.pg_advisory_xact_lock(_CLAIMS_LOCK, func.hashtext(worker))


__all__ = ["IntegrityError", "Store", "Transaction"]

# Statements every run goes through, built once. SQLAlchemy then skips building the
# statement and its cache key on each call, which was most of the CPU of admitting,
# claiming and finishing a run. Values come as bound parameters.
_CURRENT_VERSIONS = select(automation_versions).join(
    automations,
    and_(
        automations.c.name == automation_versions.c.name,
        automations.c.current_version == automation_versions.c.version,
    ),
)
_CURRENT_VERSION = _CURRENT_VERSIONS.where(automations.c.name == bindparam("name"))
_CURRENT_VERSION_NUMBER = Direct(
    select(automations.c.current_version).where(automations.c.name == bindparam("name"))
)
_VERSION = select(automation_versions).where(
    automation_versions.c.name == bindparam("name"), automation_versions.c.version == bindparam("version")
)
_INSERT_RUN = Direct(insert(runs))
_SLOTS_USED = (
    select(func.count())
    .select_from(concurrency_slots)
    .where(concurrency_slots.c.key == runs.c.concurrency_key)
    .scalar_subquery()
)
_QUEUED_CANDIDATES = Direct(
    select(runs)
    .where(
        runs.c.status == RunStatus.QUEUED.value,
        runs.c.worker_group == bindparam("worker_group"),
        runs.c.not_before <= bindparam("now"),
        or_(runs.c.concurrency_key.is_(None), runs.c.concurrency_limit > _SLOTS_USED),
    )
    .order_by(runs.c.priority.desc(), runs.c.id)
    .limit(bindparam("limit"))
    .with_for_update(skip_locked=True, of=runs)
)


@functools.cache
def _pg_start_queued() -> Direct:
    """``_QUEUED_CANDIDATES``, starting the first candidate in the same statement if it has
    no concurrency key (see ``Transaction.start_queued``); the started run's transition
    and attempt are written from the update's result, as ``_pg_move`` writes them.

    Only the first: the update finds it by id, a scalar, so by primary key whatever the
    plan (see ``_status_is``). A set of ids (``= ANY``) is read by a scan of the whole
    table in a generic plan made while the table was small, and kept while it grows.

    Before it locks a row it takes the worker's claims lock (``_CLAIMS_LOCK``, held until
    it commits), which ``Transaction.leased_runs`` waits for."""
    worker = bindparam("_worker", type_=String)
    locked = _QUEUED_CANDIDATES.statement
    assert isinstance(locked, Select)
    # An uncorrelated subquery: evaluated once, before the scan.
    claims_lock = select(_claims_lock(worker)).subquery()
    candidate = locked.where(select(func.count()).select_from(claims_lock).scalar_subquery() == 1).cte(
        "candidate"
    )
    order = (candidate.c.priority.desc(), candidate.c.id)
    at = bindparam("_at", type_=UTCDateTime)
    moved = (
        update(runs)
        .where(
            runs.c.id == select(candidate.c.id).order_by(*order).limit(1).scalar_subquery(),
            runs.c.concurrency_key.is_(None),
            _status_is(RunStatus.QUEUED.value),
        )
        .values(
            status=RunStatus.RUNNING.value,
            attempt=runs.c.attempt + 1,
            lease_owner=worker,
            lease_expires_at=bindparam("_until", type_=UTCDateTime),
            started_at=func.coalesce(runs.c.started_at, at),
        )
        .returning(runs.c.id, runs.c.attempt, runs.c.started_at, runs.c.watched)
        .cte("moved")
    )
    reason = literal("attempt ") + cast(moved.c.attempt, Text) + literal(" started on ") + worker
    transition = insert(run_transitions).from_select(
        ["run_id", "from_status", "to_status", "at", "reason"],
        select(moved.c.id, literal(RunStatus.QUEUED.value), literal(RunStatus.RUNNING.value), at, reason),
    )
    attempt = insert(attempts).from_select(
        ["run_id", "number", "worker", "status", "started_at"],
        select(moved.c.id, moved.c.attempt, worker, literal("running"), at),
    )
    statement = (
        select(candidate, moved.c.attempt, moved.c.started_at, moved.c.watched)
        .select_from(candidate.outerjoin(moved, moved.c.id == candidate.c.id))
        .order_by(*order)
        .add_cte(transition.cte("transition"))
        .add_cte(attempt.cte("attempt"))
    )
    return Direct(statement, spells_out=True)


_GET_RUN = select(runs).where(runs.c.id == bindparam("run_id"))
_GET_RUNS = {False: Direct(_GET_RUN), True: Direct(_GET_RUN.with_for_update())}
# No SET clause: it is made from the column values passed with the bound parameters.
_MOVE_RUN = update(runs).where(runs.c.id == bindparam("_run_id"), runs.c.status == bindparam("_from"))
_MOVE_LEASED_RUN = _MOVE_RUN.where(
    runs.c.lease_owner == bindparam("_owner"), runs.c.attempt == bindparam("_attempt")
)
# Each returns whether the run is watched, if it moved (SQLite's; PostgreSQL's: ``_pg_move``).
_MOVES = {
    leased: Direct(move.returning(runs.c.watched))
    for leased, move in ((False, _MOVE_RUN), (True, _MOVE_LEASED_RUN))
}
_INSERT_TRANSITION = Direct(insert(run_transitions).inline())  # no RETURNING of the generated id
_INSERT_ATTEMPT = Direct(insert(attempts))
_FINISH_ATTEMPT = Direct(
    update(attempts)
    .where(attempts.c.run_id == bindparam("_run_id"), attempts.c.number == bindparam("_number"))
    .values(
        status=bindparam("_attempt_status"),
        exit_code=bindparam("_exit_code"),
        error=bindparam("_error"),
        finished_at=bindparam("_at", type_=UTCDateTime),
    ),
    spells_out=True,
)
_WATCH_RUN = (
    update(runs)
    .where(runs.c.id == bindparam("run_id"), ~runs.c.watched, runs.c.status.not_in(sorted(TERMINAL)))
    .values(watched=True)
    .returning(runs.c.status, runs.c.worker_group)
)
_RELEASE_SLOT = delete(concurrency_slots).where(concurrency_slots.c.run_id == bindparam("run_id"))
_COUNT_LOGS = (
    update(runs)
    .where(runs.c.id == bindparam("run_id"))
    .values(log_seq=runs.c.log_seq + bindparam("count"), log_bytes=runs.c.log_bytes + bindparam("size"))
    .returning(runs.c.log_seq, runs.c.watched)
)
_INSERT_LOGS = insert(log_entries)
_LAST_AUDIT_HASH = Direct(select(audit_entries.c.hash).order_by(audit_entries.c.id.desc()).limit(1))
_INSERT_AUDIT = Direct(insert(audit_entries))


_LOCK_NOT_AVAILABLE = "55P03"  # PostgreSQL's lock_timeout expired


class RowBusy(Exception):
    """A row stayed locked by another transaction past the patience asked for."""


def _call(function: str, arguments: int) -> tuple[str, str]:
    """A call of ``function`` taking ``arguments``, sent with the commit with its values as
    literals (see ``Transaction.commit``), and how an error names it. The functions: see
    migrations 0005 and 0006; a check that fails raises ``_REFUSED``, its message the tag
    it was given."""
    return f"SELECT FROM {function}({', '.join(['%s'] * arguments)})", f"SELECT FROM {function}(…)"


_APPEND_AUDIT = _call("ondeck_append_audit", 7)
_COUNT_RATE_AT_COMMIT = _call("ondeck_count_rate", 4)
_REQUIRE_VERSION = _call("ondeck_require_version", 3)
_REFUSED = "OD001"
_COUNT_RATE = Direct(  # SQLite's
    sqlite.insert(rate_counters)
    .values(key=bindparam("key"), window=bindparam("window"), count=1)
    .on_conflict_do_update(index_elements=["key", "window"], set_={"count": rate_counters.c.count + 1})
    .returning(rate_counters.c.count)
)


@dataclass(frozen=True)
class AttemptStart:
    """Written with a run's move to running: the attempt that move starts."""

    number: int
    worker: str


@dataclass(frozen=True)
class AttemptEnd:
    """Written with a run's move out of running: how its attempt ``number`` ended."""

    number: int
    status: str
    exit_code: int | None
    error: str | None


# On PostgreSQL a run's move is one statement: the compare-and-set UPDATE of the run in a
# CTE, and the rows that go with it (its transition; the attempt it starts or ends) written
# from that CTE's result, so only when the run moved. SQLite, which has no writing CTEs,
# makes them one statement each; its statements cost a fraction of a round trip.


def _status_is(expected: object) -> ColumnElement[bool]:
    """``runs.status = expected``, written so no index on the status can serve it: for a
    statement that finds its run by id, whatever the table's statistics say.

    PostgreSQL plans a prepared statement once for any values (a generic plan) after a
    few runs, with the statistics of that moment. On a new database those are none
    until autovacuum first analyses the tables, a minute or so; the plan it made then
    read the queue's index (status, ...) for a run's start, every queued run's entry to
    find one, and the lease index for its end: each move cost more the longer the queue,
    and the plan stayed for the life of the connection. Found by id alone, a move reads
    one row, whatever the statistics (``|| ''`` leaves the value as it is)."""
    unindexed: ColumnElement[str] = runs.c.status.op("||")(literal_column("''"))
    return unindexed == expected


@functools.cache
def _pg_move(names: frozenset[str], leased: bool, attempt: str | None) -> Direct:
    """The statement moving a run on PostgreSQL, setting the run's columns ``names``, and
    starting or ending an attempt (``attempt``: "start", "end" or None); it returns
    whether the run is watched, and its worker group, if it moved, else no row."""
    guard = [runs.c.id == bindparam("_run_id"), _status_is(bindparam("_from", type_=String))]
    if leased:
        guard += [runs.c.lease_owner == bindparam("_owner"), runs.c.attempt == bindparam("_attempt")]
    set_ = {name: bindparam(name, type_=runs.c[name].type) for name in sorted(names)}
    moving = update(runs).where(*guard).values(set_)
    moved = moving.returning(runs.c.id, runs.c.watched, runs.c.worker_group).cte("moved")
    at = bindparam("_at", type_=UTCDateTime)
    transition = insert(run_transitions).from_select(
        ["run_id", "from_status", "to_status", "at", "reason"],
        select(
            moved.c.id,
            bindparam("_from", type_=String),
            bindparam("status", type_=String),
            at,
            bindparam("_reason", type_=Text),
        ),
    )
    number = bindparam("_number", type_=Integer)
    statement = select(moved.c.watched, moved.c.worker_group).add_cte(transition.cte("transition"))
    if attempt == "start":
        statement = statement.add_cte(
            insert(attempts)
            .from_select(
                ["run_id", "number", "worker", "status", "started_at"],
                select(moved.c.id, number, bindparam("_worker", type_=String), literal("running"), at),
            )
            .cte("attempt")
        )
    elif attempt == "end":
        statement = statement.add_cte(
            update(attempts)
            # By the run's id itself too, so the attempt is found by its primary key (see
            # ``_status_is``), not by a scan of every attempt joined to the moved run.
            .where(attempts.c.run_id == bindparam("_run_id"), attempts.c.run_id == moved.c.id)
            .where(attempts.c.number == number)
            .values(
                status=bindparam("_attempt_status", type_=String),
                exit_code=bindparam("_exit_code", type_=Integer),
                error=bindparam("_error", type_=Text),
                finished_at=at,
            )
            .cte("attempt")
        )
    return Direct(statement, spells_out=True)


@functools.cache
def _pg_insert_run(transitions: int) -> Direct:
    """The statement writing a new run with ``transitions`` transitions on PostgreSQL."""
    history = [
        {
            "run_id": bindparam("id", type_=String),
            "from_status": bindparam(f"_from{i}", type_=String),
            "to_status": bindparam(f"_to{i}", type_=String),
            "at": bindparam("created_at", type_=UTCDateTime),
            "reason": bindparam(f"_reason{i}", type_=Text),
        }
        for i in range(transitions)
    ]
    columns = {name: bindparam(name, type_=runs.c[name].type) for name in _RUN_FIELDS}
    statement = insert(runs).values(columns).add_cte(insert(run_transitions).values(history).cte("history"))
    return Direct(statement, spells_out=True)


def _attempt_values(attempt: AttemptStart | AttemptEnd | None) -> dict[str, Any]:
    """The bound values of ``_pg_move`` and ``_FINISH_ATTEMPT`` for ``attempt``."""
    if isinstance(attempt, AttemptStart):
        return {"_number": attempt.number, "_worker": attempt.worker}
    if isinstance(attempt, AttemptEnd):
        return {
            "_number": attempt.number,
            "_attempt_status": str(attempt.status),
            "_exit_code": attempt.exit_code,
            "_error": attempt.error,
        }
    return {}


def _transition_row(
    run_id: str, from_status: str | None, to_status: str, at: datetime, reason: str
) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "from_status": None if from_status is None else str(from_status),
        "to_status": str(to_status),
        "at": at,
        "reason": reason,
    }


_RUN_POSITIONS = [[column.key for column in runs.columns].index(name) for name in _RUN_FIELDS]


def _run(row: Sequence[Any]) -> Run:
    """The run of a row of ``select(runs)``, read through SQLAlchemy or ``Direct.rows``."""
    values = {name: row[position] for name, position in zip(_RUN_FIELDS, _RUN_POSITIONS, strict=True)}
    values["status"] = RunStatus(values["status"])
    return Run(**values)


def _token(row: Any) -> TokenRecord:
    return TokenRecord(
        row.id,
        row.name,
        list(row.roles),
        row.created_by,
        row.created_at,
        row.expires_at,
        row.last_used_at,
        row.revoked_at,
    )


def _version(row: Any) -> AutomationVersion:
    return AutomationVersion(row.name, row.version, row.definition, row.digest, row.created_at)


class Transaction:
    """Queries bound to one open database transaction."""

    def __init__(self, connection: Connection, now: Callable[[], datetime], *, alone: bool = False) -> None:
        self._c = connection
        self.now = now
        """The time leases and due times are reckoned in (``Store.now``)."""
        self.postgres = connection.dialect.name == "postgresql"
        self.alone = alone
        """Whether each statement commits by itself (``Store.transaction``)."""
        self.notifications: list[tuple[str, str]] = []
        self.wakeups_on_rollback: list[tuple[str, str]] = []
        """What to send instead of ``notifications`` if this rolls back (see ``_locked_queued``)."""
        # PostgreSQL's audit appends and checks, made at commit: each with its name in errors.
        self._at_commit: list[tuple[str, tuple[Any, ...], str]] = []
        self._refusals: list[Exception] = []  # what a check that fails at commit raises, by tag

    def commit(self) -> None:
        """Commit; on PostgreSQL, with the checks (``count_within``, ``require_version``)
        and audit appends in the same round trip.

        An append takes the chain's lock, which every append needs and which is held until
        commit, as a rate counter's row is locked for every trigger it counts: sent with the
        commit in one query (so with values as literals, quoted by the driver), the lock is
        held for the statement and the commit's flush alone, not also for a round trip back
        here and the wait for this thread's turn at the interpreter lock. A check that fails
        fails the commit, and its refusal is raised; a failing append fails the commit, as
        it would have failed its statement. The error names the statements without their
        values, which may be params (see ``database.create_db_engine``)."""
        if self._at_commit:
            statements = "; ".join([*(statement for statement, _, _ in self._at_commit), "COMMIT"])
            values = [value for _, arguments, _ in self._at_commit for value in arguments]
            driver = self._c.connection.driver_connection
            assert isinstance(driver, psycopg.Connection)
            query = psycopg.ClientCursor(driver).mogrify(statements, values)  # quoted by the driver
            shown = "; ".join([*(name for _, _, name in self._at_commit), "COMMIT"])
            self._at_commit.clear()
            try:  # the transaction's own commit then has nothing to do
                direct.statement(self._c, query, shown=shown)
            except DBAPIError as exc:
                refusal = self._refusal(exc.orig)
                if refusal is None:
                    raise
                raise refusal from None

    def _refusal(self, error: BaseException | None) -> Exception | None:
        """The refusal a check of this transaction left for ``error``, if it is one's."""
        if not isinstance(error, psycopg.Error) or error.sqlstate != _REFUSED:
            return None
        tag = error.diag.message_primary or ""
        return self._refusals[int(tag)] if tag.isdigit() and int(tag) < len(self._refusals) else None

    def _call_at_commit(self, call: tuple[str, str], *arguments: Any) -> None:
        assert not self.alone, "no commit to make the call with"
        statement, name = call
        self._at_commit.append((statement, arguments, name))

    def _check_at_commit(self, check: tuple[str, str], refusal: Exception, *arguments: Any) -> None:
        """Call ``check`` with the commit, which raises ``refusal`` if it fails."""
        self._call_at_commit(check, *arguments, str(len(self._refusals)))
        self._refusals.append(refusal)

    def notify(self, channel: str, payload: str) -> None:
        """Wake listeners after commit (in this process, and on PostgreSQL everywhere)."""
        if (channel, payload) not in self.notifications:
            self.notifications.append((channel, payload))

    def _locked_queued(self, worker_group: str, *, leaves_queue: bool = False) -> None:
        """Wake the workers of a queued run whose row this has locked, when it ends.

        On PostgreSQL a claim skips a locked row (SKIP LOCKED), and a worker that then
        found nothing to claim waits for a wake-up, or the poll: without one, the run could
        start a poll period late. No wake-up is needed when this commits the run out of
        the queue (``leaves_queue``), nor on SQLite, where a claim waits for the writer."""
        if not self.postgres:
            return
        if ("queue", worker_group) not in self.wakeups_on_rollback:
            self.wakeups_on_rollback.append(("queue", worker_group))
        if not leaves_queue:
            self.notify("queue", worker_group)

    def ping(self) -> None:
        self._c.execute(text("SELECT 1"))

    # --- automations -------------------------------------------------------

    def current_automation(self, name: str) -> AutomationVersion | None:
        row = self._c.execute(_CURRENT_VERSION, {"name": name}).first()
        return _version(row) if row else None

    def current_version(self, name: str) -> int | None:
        """The number of the current version of ``name`` (None if there is no such automation)."""
        value = _CURRENT_VERSION_NUMBER.scalar(self._c, {"name": name})
        return None if value is None else int(value)

    def require_version(self, name: str, version: int, refusal: Exception) -> None:
        """Raise ``refusal`` unless ``version`` is the current version of ``name``: on
        PostgreSQL from ``commit``, as of the commit."""
        if self.postgres:
            self._check_at_commit(_REQUIRE_VERSION, refusal, name, version)
        elif self.current_version(name) != version:
            raise refusal

    def automation_version(self, name: str, version: int) -> AutomationVersion | None:
        row = self._c.execute(_VERSION, {"name": name, "version": version}).first()
        return _version(row) if row else None

    def current_automations(self) -> list[AutomationVersion]:
        rows = self._c.execute(_CURRENT_VERSIONS.order_by(automation_versions.c.name))
        return [_version(row) for row in rows]

    def save_automation_version(
        self, name: str, definition: dict[str, Any], digest: str, now: datetime
    ) -> AutomationVersion:
        latest = self._c.execute(
            select(func.max(automation_versions.c.version)).where(automation_versions.c.name == name)
        ).scalar()
        version = (latest or 0) + 1
        self._c.execute(
            insert(automation_versions).values(
                name=name, version=version, definition=definition, digest=digest, created_at=now
            )
        )
        if latest is None:
            self._c.execute(
                insert(automations).values(name=name, current_version=version, created_at=now, updated_at=now)
            )
        else:
            self._c.execute(
                update(automations)
                .where(automations.c.name == name)
                .values(current_version=version, updated_at=now)
            )
        return AutomationVersion(name, version, definition, digest, now)

    # --- runs --------------------------------------------------------------

    def insert_run(self, run: Run, history: Sequence[tuple[RunStatus | None, RunStatus, str]]) -> None:
        """Write a new run with the transitions that brought it to its status, all at its creation.

        Unlike a run's changes, its creation notifies no one: nobody can be watching a run
        before it exists, and on PostgreSQL each notification wakes every API process."""
        values = {name: getattr(run, name) for name in _RUN_FIELDS}
        values["status"] = str(run.status)
        if self.postgres:
            for i, (from_status, to_status, reason) in enumerate(history):
                values |= {f"_from{i}": from_status, f"_to{i}": str(to_status), f"_reason{i}": reason}
            _pg_insert_run(len(history)).execute(self._c, values)
        else:
            _INSERT_RUN.execute(self._c, values)
            transitions = [
                _transition_row(run.id, from_status, to_status, run.created_at, reason)
                for from_status, to_status, reason in history
            ]
            _INSERT_TRANSITION.executemany(self._c, transitions)

    def get_run(self, run_id: str, *, lock: bool = False) -> Run | None:
        rows = _GET_RUNS[lock].rows(self._c, {"run_id": run_id})
        if not rows:
            return None
        run = _run(rows[0])
        if lock and run.status == RunStatus.QUEUED:
            self._locked_queued(run.worker_group)
        return run

    def list_runs(
        self,
        *,
        automation: str | None = None,
        statuses: Sequence[str] = (),
        before: str | None = None,
        limit: int = 50,
        among: Sequence[str] | None = None,
    ) -> list[Run]:
        query = select(runs).order_by(runs.c.id.desc()).limit(limit)
        if among is not None:
            query = query.where(runs.c.automation.in_(list(among)))
        if automation:
            query = query.where(runs.c.automation == automation)
        if statuses:
            query = query.where(runs.c.status.in_(list(statuses)))
        if before:
            query = query.where(runs.c.id < before)
        return [_run(row) for row in self._c.execute(query)]

    def move_run(
        self,
        run_id: str,
        from_status: RunStatus,
        to_status: RunStatus,
        now: datetime,
        reason: str,
        lease: tuple[str, int] | None = None,
        with_attempt: AttemptStart | AttemptEnd | None = None,
        **values: Any,
    ) -> bool:
        """Set a run's status if it is still ``from_status``; record the transition, and
        the start or end of an attempt that goes with it (``with_attempt``).

        The status guard in the WHERE clause makes every move a compare-and-set,
        so two processes can never both move the same run. With ``lease`` (worker,
        attempt), the run must also still be leased to that worker for that attempt.
        """
        guard: dict[str, Any] = {"_run_id": run_id, "_from": str(from_status)}
        if lease is not None:
            guard["_owner"], guard["_attempt"] = lease
        values["status"] = str(to_status)
        if self.postgres:
            kind = {AttemptStart: "start", AttemptEnd: "end"}.get(type(with_attempt))
            extra = {"_at": now, "_reason": reason, **_attempt_values(with_attempt)}
            statement = _pg_move(frozenset(values), lease is not None, kind)
            moved = statement.rows(self._c, {**guard, **values, **extra})
            if not moved:
                return False
            watched, worker_group = moved[0]
            if from_status == RunStatus.QUEUED:
                self._locked_queued(worker_group, leaves_queue=to_status != RunStatus.QUEUED)
        else:
            watched = _MOVES[lease is not None].scalar(self._c, {**guard, **values})
            if watched is None:
                return False
            _INSERT_TRANSITION.execute(self._c, _transition_row(run_id, from_status, to_status, now, reason))
            if isinstance(with_attempt, AttemptStart):
                started = {"run_id": run_id, "number": with_attempt.number, "worker": with_attempt.worker}
                _INSERT_ATTEMPT.execute(self._c, {**started, "status": "running", "started_at": now})
            elif isinstance(with_attempt, AttemptEnd):
                ended = {**_attempt_values(with_attempt), "_run_id": run_id, "_at": now}
                _FINISH_ATTEMPT.execute(self._c, ended)
        if watched:
            self.notify("run", run_id)
        return True

    def watch_run(self, run_id: str, patience: float) -> None:
        """Announce the run's changes and output from now on (the ``run`` notification),
        for a waiter about to read it: it must commit before that read. Until then they
        are not, as nearly every run is never watched, and each announcement wakes a
        process in every API server (and PostgreSQL) for nobody.

        No change is missed: a move or an append reads the flag on the run's row, which
        it locks, in the same statement; one that committed before this did is seen by
        the read that follows this commit, and one after it sees the flag. A finished
        run, which changes no more, is left as it is.

        On PostgreSQL, ``RowBusy`` if the row stays locked for ``patience`` seconds (a
        transaction stuck holding it): a waiter is not kept past its wait."""
        if self.postgres:
            timeout = f"{max(1, int(patience * 1000))}ms"
            self._c.execute(text("SELECT set_config('lock_timeout', :timeout, true)"), {"timeout": timeout})
        try:
            marked = self._c.execute(_WATCH_RUN, {"run_id": run_id}).first()
        except OperationalError as exc:
            if getattr(exc.orig, "sqlstate", None) == _LOCK_NOT_AVAILABLE:
                raise RowBusy(f"run {run_id} is locked by another transaction") from exc
            raise
        if marked is not None and marked.status == RunStatus.QUEUED:
            self._locked_queued(marked.worker_group)

    def update_run(self, run_id: str, **values: Any) -> None:
        self._c.execute(update(runs).where(runs.c.id == run_id).values(**values))

    def request_cancel(self, run_id: str) -> bool:
        """Ask the worker running ``run_id`` to stop it; False if it is not running."""
        result = self._c.execute(
            update(runs)
            .where(runs.c.id == run_id, _status_is(RunStatus.RUNNING.value))
            .values(cancel_requested=True)
        )
        return result.rowcount == 1

    def transitions(self, run_id: str) -> list[Transition]:
        rows = self._c.execute(
            select(run_transitions).where(run_transitions.c.run_id == run_id).order_by(run_transitions.c.id)
        )
        return [Transition(r.from_status, r.to_status, r.at, r.reason) for r in rows]

    # --- queue and concurrency --------------------------------------------

    def start_queued(
        self,
        worker_group: str,
        due: datetime,
        limit: int,
        worker: str,
        at: datetime,
        until: datetime,
    ) -> list[tuple[Run, Run | None]]:
        """Lock up to ``limit`` queued runs of ``worker_group`` that are due at ``due`` and
        whose concurrency key has a free slot, in claim order; each with itself as started
        at ``at`` under a lease to ``worker`` until ``until`` (a new attempt), or None.

        On PostgreSQL the first candidate, if it has no concurrency key, is started by the
        statement that finds it: a claim of one run, as a worker under a backlog makes
        for each run (``Worker._finish_and_claim``), is one round trip, not two. The
        caller starts the rest, a key's slot taken first, in claim order (on SQLite, whose
        statements cost a fraction of a round trip, all of them)."""
        values: dict[str, Any] = {"worker_group": worker_group, "now": due, "limit": limit}
        if not self.postgres:
            return [(_run(row), None) for row in _QUEUED_CANDIDATES.rows(self._c, values)]
        values |= {"_worker": worker, "_until": until, "_at": at}
        candidates: list[tuple[Run, Run | None]] = []
        for row in _pg_start_queued().rows(self._c, values):
            run = _run(row)
            attempt, started_at, watched = row[-3:]
            if attempt is None:
                candidates.append((run, None))
                continue
            lease = {"lease_owner": worker, "lease_expires_at": until, "started_at": started_at}
            candidates.append((run, replace(run, status=RunStatus.RUNNING, attempt=attempt, **lease)))
            if watched:
                self.notify("run", run.id)
        if candidates:  # locked: a claim that takes them commits them out of the queue
            self._locked_queued(worker_group, leaves_queue=True)
        return candidates

    def take_slot(self, key: str, limit: int, run_id: str) -> bool:
        """Occupy one of ``limit`` slots of ``key``; False when all are taken.

        The primary key (key, slot) is what enforces the limit, on every backend
        and across any number of processes.
        """
        assert not self.alone, "a slot is taken with the run's start"
        taken: set[int] = set(
            self._c.execute(select(concurrency_slots.c.slot).where(concurrency_slots.c.key == key)).scalars()
        )
        for slot in range(limit):
            if slot in taken:
                continue
            try:
                with self._c.begin_nested():
                    self._c.execute(insert(concurrency_slots).values(key=key, slot=slot, run_id=run_id))
            except IntegrityError:
                continue  # taken by a concurrent claim since we looked
            return True
        return False

    def release_slot(self, run_id: str) -> None:
        self._c.execute(_RELEASE_SLOT, {"run_id": run_id})

    def lock_concurrency_key(self, key: str) -> None:
        """Serialise admissions for one key (SQLite writers are serial already)."""
        if self.postgres:
            self._c.execute(text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": key})

    def active_runs_with_key(self, key: str) -> list[Run]:
        rows = self._c.execute(
            select(runs)
            .where(runs.c.concurrency_key == key, runs.c.status.in_([s.value for s in ACTIVE]))
            .order_by(runs.c.id)
        )
        return [_run(row) for row in rows]

    # --- leases and attempts -----------------------------------------------

    def renew_leases(
        self, worker: str, held: Sequence[tuple[str, int]], until: datetime
    ) -> list[tuple[str, int, bool]]:
        """Extend the leases ``worker`` holds on ``held`` (run id, attempt) pairs; returns
        (run id, attempt, cancel requested) of those it still holds."""
        rows = self._c.execute(
            update(runs)
            .where(
                tuple_(runs.c.id, runs.c.attempt).in_(list(held)),
                runs.c.lease_owner == worker,
                runs.c.status == RunStatus.RUNNING.value,
            )
            .values(lease_expires_at=until)
            .returning(runs.c.id, runs.c.attempt, runs.c.cancel_requested)
        )
        return [(row.id, row.attempt, bool(row.cancel_requested)) for row in rows]

    def expired_leases(self, now: datetime, limit: int) -> list[str]:
        """Ids of running runs whose lease lapsed before ``now``, oldest first; not locked:
        ``lock_expired_lease`` takes each in turn."""
        rows = self._c.execute(
            select(runs.c.id)
            .where(runs.c.status == RunStatus.RUNNING.value, runs.c.lease_expires_at < now)
            .order_by(runs.c.lease_expires_at)
            .limit(limit)
        )
        return [row.id for row in rows]

    def lock_expired_lease(self, run_id: str, now: datetime) -> Run | None:
        """The run, locked, if it is still running on a lease that lapsed before ``now``; None
        if not, or if another transaction (another reaper) holds it: skipped, not waited for."""
        rows = self._c.execute(
            select(runs)
            .where(
                runs.c.id == run_id,
                _status_is(RunStatus.RUNNING.value),
                runs.c.lease_expires_at < now,
            )
            .with_for_update(skip_locked=True)
        )
        found = rows.first()
        return _run(found) if found is not None else None

    def leased_runs(self, worker: str, until: datetime) -> list[Run]:
        """The running runs leased to ``worker`` until ``until``, locked; once any claim of
        ``worker`` still under way has ended (on PostgreSQL; see ``_pg_start_queued``): a
        run it is starting is not yet running, and so not waited for by the read itself."""
        if self.postgres:
            self._c.execute(select(_claims_lock(worker)))
        rows = self._c.execute(
            select(runs)
            .where(
                runs.c.status == RunStatus.RUNNING.value,
                runs.c.lease_expires_at == until,
                runs.c.lease_owner == worker,
            )
            .with_for_update()
        )
        return [_run(row) for row in rows]

    def delete_attempt(self, run_id: str, number: int) -> None:
        self._c.execute(delete(attempts).where(attempts.c.run_id == run_id, attempts.c.number == number))

    def attempts(self, run_id: str) -> list[AttemptRecord]:
        rows = self._c.execute(
            select(attempts).where(attempts.c.run_id == run_id).order_by(attempts.c.number)
        )
        return [
            AttemptRecord(r.number, r.worker, r.status, r.exit_code, r.error, r.started_at, r.finished_at)
            for r in rows
        ]

    # --- logs --------------------------------------------------------------

    def append_logs(self, run_id: str, attempt: int, chunks: Sequence[LogChunk]) -> None:
        if not chunks:
            return
        size = sum(len(chunk.text.encode()) for chunk in chunks)
        counted = self._c.execute(_COUNT_LOGS, {"run_id": run_id, "count": len(chunks), "size": size}).one()
        last: int = counted.log_seq
        first = last - len(chunks) + 1
        self._c.execute(
            _INSERT_LOGS,
            [
                {
                    "run_id": run_id,
                    "seq": first + i,
                    "attempt": attempt,
                    "stream": chunk.stream,
                    "text": chunk.text,
                    "at": chunk.at,
                }
                for i, chunk in enumerate(chunks)
            ],
        )
        if counted.watched:
            self.notify("run", run_id)

    def logs_after(
        self, run_id: str, after: int = 0, limit: int = 1000, attempt: int | None = None
    ) -> list[LogEntry]:
        query = (
            select(log_entries)
            .where(log_entries.c.run_id == run_id, log_entries.c.seq > after)
            .order_by(log_entries.c.seq)
            .limit(limit)
        )
        if attempt is not None:
            query = query.where(log_entries.c.attempt == attempt)
        return [LogEntry(r.seq, r.attempt, r.stream, r.text, r.at) for r in self._c.execute(query)]

    # --- idempotency -------------------------------------------------------

    def find_idempotency(self, scope: str, key: str, now: datetime) -> tuple[str, str] | None:
        """(fingerprint, run id) for an unexpired key."""
        row = self._c.execute(
            select(idempotency_keys.c.fingerprint, idempotency_keys.c.run_id).where(
                idempotency_keys.c.scope == scope,
                idempotency_keys.c.key == key,
                idempotency_keys.c.expires_at > now,
            )
        ).first()
        return (row.fingerprint, row.run_id) if row else None

    def save_idempotency(
        self, scope: str, key: str, fingerprint: str, run_id: str, expires_at: datetime, now: datetime
    ) -> None:
        self._c.execute(
            delete(idempotency_keys).where(
                idempotency_keys.c.scope == scope,
                idempotency_keys.c.key == key,
                idempotency_keys.c.expires_at <= now,
            )
        )
        self._c.execute(
            insert(idempotency_keys).values(
                scope=scope, key=key, fingerprint=fingerprint, run_id=run_id, expires_at=expires_at
            )
        )

    def purge_idempotency(self, now: datetime) -> int:
        result = self._c.execute(delete(idempotency_keys).where(idempotency_keys.c.expires_at <= now))
        return int(result.rowcount or 0)

    # --- tokens --------------------------------------------------------------

    def insert_token(self, record: TokenRecord, token_hash: str) -> None:
        self._c.execute(insert(tokens).values(token_hash=token_hash, **record.__dict__))

    def token_by_hash(self, token_hash: str) -> TokenRecord | None:
        row = self._c.execute(select(tokens).where(tokens.c.token_hash == token_hash)).first()
        return _token(row) if row else None

    def token_by_name(self, name: str) -> TokenRecord | None:
        row = self._c.execute(select(tokens).where(tokens.c.name == name)).first()
        return _token(row) if row else None

    def tokens(self) -> list[TokenRecord]:
        return [_token(row) for row in self._c.execute(select(tokens).order_by(tokens.c.name))]

    def count_tokens(self) -> int:
        return int(self._c.execute(select(func.count()).select_from(tokens)).scalar_one())

    def revoke_token(self, name: str, now: datetime) -> bool:
        result = self._c.execute(
            update(tokens).where(tokens.c.name == name, tokens.c.revoked_at.is_(None)).values(revoked_at=now)
        )
        return bool(result.rowcount)

    def touch_token(self, token_id: str, now: datetime) -> None:
        self._c.execute(update(tokens).where(tokens.c.id == token_id).values(last_used_at=now))

    # --- secrets -------------------------------------------------------------

    def put_secret(self, name: str, scope: str, ciphertext: str, by: str, now: datetime) -> bool:
        """Insert or replace; True if it was new."""
        updated = self._c.execute(
            update(secrets)
            .where(secrets.c.name == name, secrets.c.scope == scope)
            .values(ciphertext=ciphertext, updated_by=by, updated_at=now)
        )
        if updated.rowcount:
            return False
        self._c.execute(
            insert(secrets).values(
                name=name, scope=scope, ciphertext=ciphertext, updated_by=by, created_at=now, updated_at=now
            )
        )
        return True

    def delete_secret(self, name: str, scope: str) -> bool:
        result = self._c.execute(delete(secrets).where(secrets.c.name == name, secrets.c.scope == scope))
        return bool(result.rowcount)

    def secret_infos(self) -> list[SecretInfo]:
        rows = self._c.execute(
            select(
                secrets.c.name,
                secrets.c.scope,
                secrets.c.updated_by,
                secrets.c.created_at,
                secrets.c.updated_at,
            ).order_by(secrets.c.name, secrets.c.scope)
        )
        return [SecretInfo(r.name, r.scope, r.updated_by, r.created_at, r.updated_at) for r in rows]

    def secret_ciphertexts(self, names: Sequence[str] | None = None) -> list[tuple[str, str, str]]:
        """(name, scope, ciphertext) for the given names (all when None)."""
        query = select(secrets.c.name, secrets.c.scope, secrets.c.ciphertext)
        if names is not None:
            query = query.where(secrets.c.name.in_(list(names)))
        return [(r.name, r.scope, r.ciphertext) for r in self._c.execute(query)]

    # --- audit ---------------------------------------------------------------

    def append_audit(
        self, actor: str, action: str, target: str, detail: dict[str, Any], now: datetime
    ) -> None:
        """Append to the chain; appends are serialised so the chain never forks (on
        PostgreSQL by a lock held until commit, in the one statement that appends, which
        goes with the commit)."""
        if now.utcoffset() != timedelta(0):  # the hash covers its text, which must read back the same
            raise ValueError("an audit entry's time must be timezone-aware UTC")
        body = canonical_detail(detail)
        if self.postgres:
            content = chain_content(now, actor, action, target, body)
            self._call_at_commit(_APPEND_AUDIT, _AUDIT_LOCK, now, actor, action, target, body, content)
        else:  # SQLite's writers take turns already
            prev_hash = _LAST_AUDIT_HASH.scalar(self._c, {}) or GENESIS
            digest = chain_hash(prev_hash, now, actor, action, target, body)
            values = {"at": now, "actor": actor, "action": action, "target": target, "detail": body}
            _INSERT_AUDIT.execute(self._c, {**values, "prev_hash": prev_hash, "hash": digest})

    def audit_entries(
        self,
        *,
        action: str | None = None,
        actor: str | None = None,
        target: str | None = None,
        before: int | None = None,
        limit: int = 100,
    ) -> list[AuditEntry]:
        query = select(audit_entries).order_by(audit_entries.c.id.desc()).limit(limit)
        for column, value in (
            (audit_entries.c.action, action),
            (audit_entries.c.actor, actor),
            (audit_entries.c.target, target),
        ):
            if value is not None:
                query = query.where(column == value)
        if before is not None:
            query = query.where(audit_entries.c.id < before)
        return [
            AuditEntry(r.id, r.at, r.actor, r.action, r.target, json.loads(r.detail), r.prev_hash, r.hash)
            for r in self._c.execute(query)
        ]

    def audit_chain(self) -> list[tuple[int, datetime, str, str, str, str, str, str]]:
        rows = self._c.execute(select(audit_entries).order_by(audit_entries.c.id))
        return [(r.id, r.at, r.actor, r.action, r.target, r.detail, r.prev_hash, r.hash) for r in rows]

    # --- approvals -----------------------------------------------------------

    def insert_decision(self, run_id: str, decision: Decision) -> None:
        self._c.execute(insert(approval_decisions).values(run_id=run_id, **decision.__dict__))

    def decisions(self, run_id: str) -> list[Decision]:
        rows = self._c.execute(
            select(approval_decisions)
            .where(approval_decisions.c.run_id == run_id)
            .order_by(approval_decisions.c.at)
        )
        return [Decision(r.approver, r.decision, r.comment, r.at) for r in rows]

    def runs_in_status(self, status: RunStatus, limit: int = 500) -> list[Run]:
        rows = self._c.execute(
            select(runs).where(runs.c.status == status.value).order_by(runs.c.id).limit(limit)
        )
        return [_run(row) for row in rows]

    # --- environments --------------------------------------------------------

    def put_environment(self, name: str, definition: dict[str, Any], now: datetime) -> None:
        updated = self._c.execute(
            update(environments)
            .where(environments.c.name == name)
            .values(definition=definition, updated_at=now)
        )
        if not updated.rowcount:
            self._c.execute(insert(environments).values(name=name, definition=definition, updated_at=now))

    def environment(self, name: str) -> dict[str, Any] | None:
        value = self._c.execute(select(environments.c.definition).where(environments.c.name == name)).scalar()
        return dict(value) if value is not None else None

    def environments(self) -> list[dict[str, Any]]:
        rows: Any = self._c.execute(select(environments.c.definition).order_by(environments.c.name)).scalars()
        return [dict(value) for value in rows]

    # --- rate limits and circuit breakers ------------------------------------

    def count_within(self, key: str, window: int, limit: int, refusal: Exception) -> None:
        """Add one to the counter of ``key`` for ``window``, and raise ``refusal`` if that
        takes it over ``limit``: on PostgreSQL from ``commit``, which counts."""
        if self.postgres:
            self._check_at_commit(_COUNT_RATE_AT_COMMIT, refusal, key, window, limit)
        elif int(_COUNT_RATE.scalar(self._c, {"key": key, "window": window})) > limit:
            raise refusal

    def purge_counters(self, before_window: int) -> None:
        self._c.execute(delete(rate_counters).where(rate_counters.c.window < before_window))

    def breaker(self, automation: str, *, lock: bool = False) -> dict[str, Any] | None:
        query = select(circuit_breakers).where(circuit_breakers.c.automation == automation)
        if lock:
            query = query.with_for_update()
        row = self._c.execute(query).first()
        return dict(row._mapping) if row else None

    def save_breaker(self, automation: str, **values: Any) -> None:
        updated = self._c.execute(
            update(circuit_breakers).where(circuit_breakers.c.automation == automation).values(**values)
        )
        if not updated.rowcount:
            self._c.execute(insert(circuit_breakers).values(automation=automation, **values))

    def count_failures(self, automation: str, since: datetime) -> int:
        query = (
            select(func.count())
            .select_from(runs)
            .where(
                runs.c.automation == automation,
                runs.c.status.in_([RunStatus.FAILED.value, RunStatus.TIMED_OUT.value]),
                runs.c.finished_at > since,
            )
        )
        return int(self._c.execute(query).scalar_one())

    # --- schedules -------------------------------------------------------------

    def ensure_schedule(self, key: str, automation: str, now: datetime) -> dict[str, Any]:
        """The schedule's state, recording when it was first seen (fires start from then)."""
        row = self._c.execute(select(schedules).where(schedules.c.key == key)).first()
        if row is not None:
            return dict(row._mapping)
        values = {"key": key, "automation": automation, "paused": False, "first_seen": now}
        try:
            with self._c.begin_nested():
                self._c.execute(insert(schedules).values(**values))
        except IntegrityError:  # another process saw it first
            row = self._c.execute(select(schedules).where(schedules.c.key == key)).first()
            return dict(row._mapping) if row else values
        return values

    def schedule_states(self) -> dict[str, dict[str, Any]]:
        return {row.key: dict(row._mapping) for row in self._c.execute(select(schedules))}

    def set_schedule_paused(self, key: str, paused: bool, now: datetime) -> bool:
        """Pause or resume; resuming moves ``first_seen`` so ticks missed while paused never fire."""
        values: dict[str, Any] = {"paused": paused}
        if not paused:
            values["first_seen"] = now
        result = self._c.execute(update(schedules).where(schedules.c.key == key).values(**values))
        return bool(result.rowcount)

    def last_fire(self, key: str) -> datetime | None:
        value: datetime | None = self._c.execute(
            select(func.max(schedule_fires.c.fire_at)).where(schedule_fires.c.schedule_key == key)
        ).scalar()
        return value

    def insert_fire(self, key: str, fire_at: datetime, run_id: str | None) -> None:
        """Raises IntegrityError if this tick was already fired (by any process)."""
        self._c.execute(insert(schedule_fires).values(schedule_key=key, fire_at=fire_at, run_id=run_id))

    # --- delivery outbox ---------------------------------------------------------

    def insert_delivery(
        self, delivery_id: str, run_id: str, url: str, kind: str, payload: dict[str, Any], now: datetime
    ) -> None:
        self._c.execute(
            insert(deliveries).values(
                id=delivery_id,
                run_id=run_id,
                url=url,
                kind=kind,
                payload=payload,
                status="pending",
                attempts=0,
                next_attempt_at=self.now(),  # due now in the time senders judge it in
                created_at=now,
            )
        )
        self.notify("delivery", delivery_id)

    def claim_deliveries(self, now: datetime, hold_until: datetime, limit: int) -> list[dict[str, Any]]:
        """Due pending deliveries, held until ``hold_until`` so no other process sends them meanwhile."""
        rows = self._c.execute(
            select(deliveries)
            .where(deliveries.c.status == "pending", deliveries.c.next_attempt_at <= now)
            .order_by(deliveries.c.next_attempt_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).all()
        claimed = [dict(row._mapping) for row in rows]
        if claimed:
            self._c.execute(
                update(deliveries)
                .where(deliveries.c.id.in_([d["id"] for d in claimed]))
                .values(next_attempt_at=hold_until)
            )
        return claimed

    def record_delivery_attempt(
        self,
        delivery_id: str,
        number: int,
        now: datetime,
        status_code: int | None,
        error: str | None,
        duration_ms: int,
        **delivery: Any,
    ) -> None:
        self._c.execute(
            insert(delivery_attempts).values(
                delivery_id=delivery_id,
                number=number,
                at=now,
                status_code=status_code,
                error=error,
                duration_ms=duration_ms,
            )
        )
        self._c.execute(
            update(deliveries).where(deliveries.c.id == delivery_id).values(attempts=number, **delivery)
        )

    def deliveries_of(self, run_id: str) -> list[dict[str, Any]]:
        found = [
            dict(row._mapping)
            for row in self._c.execute(
                select(deliveries).where(deliveries.c.run_id == run_id).order_by(deliveries.c.created_at)
            )
        ]
        for delivery in found:
            delivery["attempt_log"] = [
                dict(row._mapping)
                for row in self._c.execute(
                    select(delivery_attempts)
                    .where(delivery_attempts.c.delivery_id == delivery["id"])
                    .order_by(delivery_attempts.c.number)
                )
            ]
        return found


_TURN_TAKEN: ContextVar[_SqliteWriters | None] = ContextVar("ondeck_store_turn_taken", default=None)


class _SqliteWriters:
    """One writer at a time on an SQLite file: across this process's threads, and across
    processes (a server and its embedded worker) with an ``flock`` beside it.

    SQLite makes a second process's writer retry with sleeps growing to 100 ms
    (``busy_timeout``), so the write lock could sit free while the waiter sleeps; a
    waiter here retries within a millisecond. Like SQLite, it gives up after the busy
    timeout, so a stopped or hung writer makes others fail rather than hang.
    SQLite's own locking still guards the file.
    """

    def __init__(self, database_file: str | None) -> None:
        self._threads = threading.Lock()
        self._path = f"{database_file}-writer.lock" if database_file else None
        self._fd: int | None = None
        # The tasks of each event loop wait for a turn one at a time (see ``turn``).
        self._queues: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )

    @contextmanager
    def hold(self) -> Iterator[None]:
        if _TURN_TAKEN.get() is self:  # this context holds the lock already (``turn``)
            yield
            return
        with self._threads:
            if self._path is None:
                yield
                return
            fd = self._file()
            self._lock(fd)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    @asynccontextmanager
    async def turn(self, patience: float) -> AsyncIterator[bool]:
        """See ``Store.write_turn``."""
        loop = asyncio.get_running_loop()
        queue = self._queues.setdefault(loop, asyncio.Lock())
        deadline = time.monotonic() + patience
        pause = 0.0005
        async with queue:
            while not (taken := self._take_if_free()) and time.monotonic() + pause < deadline:
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.002)
        if not taken:
            yield False
            return
        token = _TURN_TAKEN.set(self)
        try:
            yield True
        finally:
            _TURN_TAKEN.reset(token)
            if self._path is not None:
                fcntl.flock(self._file(), fcntl.LOCK_UN)
            self._threads.release()

    def _take_if_free(self) -> bool:
        if not self._threads.acquire(blocking=False):
            return False
        if self._path is None:
            return True
        try:
            fcntl.flock(self._file(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another process writes
            self._threads.release()
            return False
        except BaseException:
            self._threads.release()
            raise
        return True

    def _file(self) -> int:
        assert self._path is not None
        if self._fd is None:
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return self._fd

    @staticmethod
    def _lock(fd: int) -> None:
        deadline = time.monotonic() + database.BUSY_TIMEOUT_SECONDS
        pause = 0.0001
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StoreUnavailable(
                        f"database is busy: another process kept writing for "
                        f"{database.BUSY_TIMEOUT_SECONDS:.0f} s"
                    ) from None
                time.sleep(pause)
                pause = min(pause * 2, 0.001)

    def close(self) -> None:
        with self._threads:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


class Store:
    """Owns the engine; hands out transactions; tells listeners what changed."""

    def __init__(self, url: str, *, clock: Callable[[], datetime] = utcnow) -> None:
        """``clock`` is this host's clock, UTC (the test suite shifts it to play a skewed host)."""
        self.url = url
        self.engine: Engine = database.create_db_engine(url)
        self.dialect = self.engine.dialect.name
        self._local_clock = clock
        self._database_clock = DatabaseClock(clock) if self.dialect == "postgresql" else None
        self._writers: _SqliteWriters | None = None
        # The SQLite database's file (None for PostgreSQL, or SQLite in memory).
        self.file: Path | None = None
        if self.dialect == "sqlite":
            file = make_url(url).database
            self.file = Path(file) if file and file != ":memory:" else None
            self._writers = _SqliteWriters(str(self.file) if self.file else None)
        self._notifier = Notifier(url) if self.dialect == "postgresql" else None
        self._listeners: list[Listener] = []

    def upgrade(self) -> None:
        database.upgrade(self.engine)

    def now(self) -> datetime:
        """The time every lease, and when each queued run is due, is written and judged
        in. On PostgreSQL, the database's clock, which every host shares (see
        ``store.clock``), read at the first call if ``sync_clock`` was not called yet. On
        SQLite, which is one host's, this host's."""
        if self._database_clock is None:
            return self._local_clock()
        if not self._database_clock.measured:
            self.sync_clock()
        return self._database_clock.now()

    def sync_clock(self) -> timedelta:
        """Read the database's clock again, for ``now``; returns how far it is ahead of this
        host's (zero on SQLite). Called now and then by whatever holds or judges leases."""
        if self._database_clock is None:
            return timedelta(0)
        with self._translate_errors(), self.engine.connect() as connection:
            return self._database_clock.measure(connection)

    @property
    def clock_offset(self) -> timedelta | None:
        """The database's clock minus this host's at the last reading; None before one
        (and always on SQLite)."""
        return self._database_clock.offset if self._database_clock is not None else None

    def is_current(self) -> bool:
        return database.is_current(self.engine)

    @asynccontextmanager
    async def write_turn(self, patience: float) -> AsyncIterator[bool]:
        """On SQLite, wait for the write lock on the event loop, without blocking it, for
        up to ``patience`` seconds; if had, hold it for the block (True), whose write
        transactions then need not wait for it. For writes done on the event loop, which
        must never wait for another process. False if the lock was not had, or on
        PostgreSQL, whose writers never wait for one another to begin: then write as usual.

        The block must run straight through: no ``await``, and no tasks or threads started
        in it (they would inherit the turn's context and write without the lock)."""
        if self._writers is None:
            yield False
            return
        async with self._writers.turn(patience) as taken:
            yield taken

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener(channel, payload)`` after each commit that notified."""
        self._listeners.append(listener)

    @contextmanager
    def transaction(self, *, alone: bool = False) -> Iterator[Transaction]:
        """A read-write transaction, committed when the block ends without error.

        With ``alone``, on PostgreSQL, each statement commits by itself instead, as it
        ends: no BEGIN and COMMIT round trips, two of the three a write of one statement
        makes. Only for writes each of which stands alone, whatever becomes of the others
        (``Transaction.alone`` says which it is). On SQLite a transaction as usual."""
        tx: Transaction | None = None
        alone = alone and self.dialect == "postgresql"
        try:
            with (
                self._writers.hold() if self._writers is not None else contextlib.nullcontext(),
                self._translate_errors(),
                self.engine.connect().execution_options(ondeck_write=True) as connection,
            ):
                if alone:
                    connection.execution_options(isolation_level="AUTOCOMMIT")
                with connection.begin():
                    tx = Transaction(connection, self.now, alone=alone)
                    yield tx
                    tx.commit()
        except BaseException:
            if tx is not None:  # rolled back, its locks released; alone, what committed stays
                self._announce(
                    [*tx.notifications, *tx.wakeups_on_rollback] if alone else tx.wakeups_on_rollback
                )
            raise
        assert tx is not None
        self._announce(tx.notifications)

    def _announce(self, notifications: list[tuple[str, str]]) -> None:
        if self._notifier is not None and notifications:
            self._notifier.send(notifications)
        for channel, payload in notifications:
            for listener in self._listeners:
                listener(channel, payload)

    @contextmanager
    def read(self) -> Iterator[Transaction]:
        """Reads; never blocks writers on either backend.

        On PostgreSQL each statement reads its own snapshot, as it would in a transaction
        at the default isolation level (read committed), so no transaction is begun: a
        read of one statement, as nearly every read is, makes one round trip, not three
        (BEGIN, the read, COMMIT). On SQLite a read transaction: one snapshot."""
        with self._translate_errors(), self.engine.connect() as connection:
            if self.dialect == "postgresql":
                connection.execution_options(isolation_level="AUTOCOMMIT")
            with connection.begin():
                yield Transaction(connection, self.now)

    @contextmanager
    def _translate_errors(self) -> Iterator[None]:
        try:
            yield
        except OperationalError as exc:
            raise StoreUnavailable(f"database unavailable: {exc.orig}") from exc

    def ping(self) -> None:
        with self.read() as tx:
            tx.ping()

    def dispose(self) -> None:
        if self._notifier is not None:
            self._notifier.close()
        self.engine.dispose()
        if self._writers is not None:
            self._writers.close()
