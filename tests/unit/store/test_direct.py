"""Statements run on the driver's cursor store what SQLAlchemy would, and fail the same way."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import bindparam, insert, select, text, update
from sqlalchemy.exc import DBAPIError

from ondeck.store import direct
from ondeck.store.direct import Direct
from ondeck.store.store import IntegrityError, Store
from ondeck.store.tables import audit_entries, automation_versions, runs

AT = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


def _run_row(run_id: str, **values: object) -> dict[str, object]:
    row: dict[str, object] = {
        "id": run_id,
        "automation": "a",
        "version": 1,
        "status": "queued",
        "params": {"text": "ünïcode", "n": [1, None, True]},
        "max_attempts": 1,
        "worker_group": "default",
        "trigger": "api",
        "created_at": AT,
        "not_before": AT + timedelta(seconds=1),
        "attempt": 0,
        "priority": 0,
        "cancel_requested": False,
        "log_seq": 0,
        "log_bytes": 0,
    }
    row.update(values)
    return row


def test_rows_written_directly_read_back_as_written_through_sqlalchemy(store: Store) -> None:
    with store.transaction() as tx:
        connection = tx._c
        connection.execute(insert(runs), _run_row("core"))
        Direct(insert(runs)).execute(connection, _run_row("direct"))
    with store.read() as tx:
        core, direct = (tx.get_run(run_id) for run_id in ("core", "direct"))
    assert core is not None and direct is not None
    assert direct.created_at == core.created_at == AT
    assert direct == core.__class__(**{**core.__dict__, "id": "direct"})


def test_rows_read_directly_are_the_values_sqlalchemy_reads(store: Store) -> None:
    """Timestamps timezone-aware in UTC, JSON decoded, booleans as booleans, on both drivers."""
    query = select(runs).where(runs.c.id == bindparam("run_id"))
    with store.transaction() as tx:
        Direct(insert(runs)).execute(tx._c, _run_row("r", cancel_requested=True, outputs={"a": [1.5]}))
        (core,) = (tuple(row) for row in tx._c.execute(query, {"run_id": "r"}))
        (direct,) = Direct(query).rows(tx._c, {"run_id": "r"})
    assert direct == core
    values = dict(zip([c.key for c in runs.columns], direct, strict=True))
    assert values["created_at"] == AT and values["created_at"].tzinfo is not None
    assert values["params"] == {"text": "ünïcode", "n": [1, None, True]} and values["outputs"] == {"a": [1.5]}
    assert values["cancel_requested"] is True


def test_update_returns_the_rows_it_matched_and_returning_gives_the_value(store: Store) -> None:
    move = Direct(update(runs).where(runs.c.id == bindparam("_id"), runs.c.status == bindparam("_from")))
    append = Direct(insert(audit_entries).returning(audit_entries.c.id))
    entry = {"at": AT, "actor": "me", "action": "x", "target": "t", "detail": "{}", "prev_hash": "p"}
    with store.transaction() as tx:
        Direct(insert(runs)).execute(tx._c, _run_row("r1"))
        assert move.execute(tx._c, {"_id": "r1", "_from": "queued", "status": "running"}) == 1
        assert move.execute(tx._c, {"_id": "r1", "_from": "queued", "status": "failed"}) == 0
        first = append.scalar(tx._c, {**entry, "hash": "h1"})
        second = append.scalar(tx._c, {**entry, "hash": "h2"})
    assert second == first + 1
    with store.read() as tx:
        run = tx.get_run("r1")
    assert run is not None and run.status == "running"


def test_driver_errors_come_back_as_sqlalchemy_errors(store: Store) -> None:
    statement = Direct(insert(runs))
    with pytest.raises(IntegrityError) as caught, store.transaction() as tx:
        statement.execute(tx._c, _run_row("twice", params={"password": "hunter2"}))
        statement.execute(tx._c, _run_row("twice", params={"password": "hunter2"}))
    assert "hunter2" not in str(caught.value)  # errors are logged: values stay out of them
    with pytest.raises(IntegrityError) as caught, store.transaction() as tx:  # through SQLAlchemy
        tx._c.execute(insert(runs), _run_row("again", params={"password": "hunter2"}))
        tx._c.execute(insert(runs), _run_row("again", params={"password": "hunter2"}))
    assert "hunter2" not in str(caught.value)
    with store.read() as tx:
        assert tx.get_run("twice") is None  # the transaction rolled back as a whole


def test_a_statement_that_needs_python_side_defaults_goes_through_sqlalchemy(store: Store) -> None:
    row = _run_row("defaults")
    for column in ("attempt", "priority", "cancel_requested", "log_seq", "log_bytes"):
        del row[column]  # these have Python-side defaults, which only SQLAlchemy fills in
    with store.transaction() as tx:
        Direct(insert(runs)).execute(tx._c, row)
    with store.read() as tx:
        run = tx.get_run("defaults")
    assert run is not None and run.attempt == 0 and run.cancel_requested is False


def test_a_batch_of_rows_is_written_in_one_call_with_their_values_processed(store: Store) -> None:
    rows = [
        {"name": "n", "version": v, "definition": {"v": v}, "digest": f"d{v}", "created_at": AT}
        for v in (1, 2, 3)
    ]
    with store.transaction() as tx:
        Direct(insert(automation_versions)).executemany(tx._c, rows)
        stored = tx._c.execute(
            select(automation_versions.c.definition).order_by(automation_versions.c.version)
        ).scalars()
        assert list(stored) == [{"v": 1}, {"v": 2}, {"v": 3}]


def test_an_error_in_a_statement_shown_otherwise_quotes_none_of_it(pg_store: Store) -> None:
    """PostgreSQL's message for a statement with values in its text may quote it (here
    ``LINE 1: SELECT 'the-value' +``): the error names it as it is shown, and says what
    went wrong."""
    with pytest.raises(DBAPIError) as raised, pg_store.transaction() as tx:
        direct.statement(tx._c, "SELECT 'the-value' +", shown="SELECT …")
    assert "the-value" not in str(raised.value)
    assert "syntax error at end of input" in str(raised.value) and "SELECT …" in str(raised.value)


@pytest.mark.parametrize("way", ["sqlalchemy", "direct"])
def test_an_error_quotes_no_value_of_the_row_refused(pg_store: Store, way: str) -> None:
    """PostgreSQL's message for a refused row goes on with ``DETAIL: Failing row contains
    (…)``, every value in it (params, say), which ``hide_parameters`` alone lets through:
    both ways statements are sent, the error keeps the first line, naming the constraint."""
    row = _run_row("r-refused", params={"token": "the-value"}, worker_group=None)
    with pytest.raises(DBAPIError) as raised, pg_store.transaction() as tx:
        if way == "sqlalchemy":
            tx._c.execute(insert(runs).values(row))
        else:
            Direct(insert(runs)).execute(tx._c, row)
    assert "the-value" not in str(raised.value) and "the-value" not in str(raised.value.orig)
    assert 'null value in column "worker_group"' in str(raised.value)


def test_an_error_over_a_value_it_refused_does_not_quote_it(pg_store: Store) -> None:
    """The first line of a data exception may itself quote the value."""
    with pytest.raises(DBAPIError) as raised, pg_store.transaction() as tx:
        tx._c.execute(text("SELECT CAST(:value AS integer)"), {"value": "the-value"})
    assert "the-value" not in str(raised.value) and "SQLSTATE 22P02" in str(raised.value)
