"""The writes every run makes, compiled once and run on the driver's own cursor.

A run takes about ten writes (admitted, claimed, finished). SQLAlchemy's execution path
(execution context, events, result set-up) costs about 50 µs a statement on two cores,
over ten times what sqlite3 itself takes, so those statements skip it. Each is compiled
once per dialect and set of parameter names; its values go through the bind processors
SQLAlchemy would apply, so the rows stored are the same; driver errors come back as
SQLAlchemy's (``IntegrityError``, ``OperationalError``…), so callers see no difference.
A statement whose compiled form needs more than that (Python-side column defaults,
expanding parameters) runs through SQLAlchemy as before. Rows read back (``rows``) go
through the result processors SQLAlchemy would apply; single values (``scalar``) are the
driver's own, not processed: only integers and text are read that way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.dml import UpdateBase


@dataclass(frozen=True)
class _Plan:
    compiled: Any  # SQLCompiler
    positions: tuple[str, ...] | None  # for drivers with positional parameters (sqlite3)
    processors: Mapping[str, Callable[[Any], Any]]
    escaped: Mapping[str, str]
    results: tuple[Callable[[Any], Any] | None, ...]  # per column of the rows it returns

    def parameters(self, values: Mapping[str, Any]) -> Sequence[Any] | dict[str, Any]:
        """What ``Connection.execute`` would hand the driver for ``values``."""
        bound = self.compiled.construct_params(values, escape_names=False, _check=False)
        processors = self.processors
        if self.positions is not None:
            return tuple(
                processors[key](bound[key]) if key in processors else bound[key] for key in self.positions
            )
        return {
            self.escaped.get(key, key): processors[key](value) if key in processors else value
            for key, value in bound.items()
        }


class Direct:
    """One statement, run on the connection's DBAPI cursor.

    An INSERT or UPDATE without a VALUES or SET clause gets one made from the names of
    the values it is run with (``Connection.execute`` does the same). With
    ``spells_out``, the statement names every value it binds and is compiled as it is:
    one whose CTEs write to other tables must be (the names would add SET clauses to
    those writes too).
    """

    def __init__(self, statement: UpdateBase | Select[Any], *, spells_out: bool = False) -> None:
        self._statement = statement
        self._spells_out = spells_out
        self._plans: dict[tuple[str, str, tuple[str, ...]], _Plan | None] = {}

    @property
    def statement(self) -> UpdateBase | Select[Any]:
        return self._statement

    def execute(self, connection: Connection, values: Mapping[str, Any]) -> int:
        """Run once; the number of rows it matched."""
        plan = self._plan(connection, values)
        if plan is None:
            return connection.execute(self._statement, dict(values)).rowcount
        with _driver_cursor(connection, plan.compiled.string, values) as cursor:
            cursor.execute(plan.compiled.string, plan.parameters(values))
            return int(cursor.rowcount)

    def scalar(self, connection: Connection, values: Mapping[str, Any]) -> Any:
        """Run once; the first column of the first row it returned (None without rows)."""
        plan = self._plan(connection, values)
        if plan is None:
            return connection.execute(self._statement, dict(values)).scalar()
        with _driver_cursor(connection, plan.compiled.string, values) as cursor:
            cursor.execute(plan.compiled.string, plan.parameters(values))
            row = cursor.fetchone()
            return None if row is None else row[0]

    def rows(self, connection: Connection, values: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """Run once; the rows it returned, their values as SQLAlchemy would read them (for
        column types whose result processing needs no driver type code, as this store's)."""
        plan = self._plan(connection, values)
        if plan is None:
            return [tuple(row) for row in connection.execute(self._statement, dict(values))]
        with _driver_cursor(connection, plan.compiled.string, values) as cursor:
            cursor.execute(plan.compiled.string, plan.parameters(values))
            fetched = cursor.fetchall()
        results = plan.results
        if not any(results):
            return [tuple(row) for row in fetched]
        return [tuple(v if f is None else f(v) for f, v in zip(results, row, strict=True)) for row in fetched]

    def executemany(self, connection: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        """Run once per row (every row with the same names)."""
        plan = self._plan(connection, rows[0])
        if plan is None:
            connection.execute(self._statement, [dict(row) for row in rows])
            return
        with _driver_cursor(connection, plan.compiled.string, rows) as cursor:
            cursor.executemany(plan.compiled.string, [plan.parameters(row) for row in rows])

    def _plan(self, connection: Connection, values: Mapping[str, Any]) -> _Plan | None:
        dialect = connection.dialect
        key = (dialect.name, dialect.driver, tuple(sorted(values)))
        try:
            return self._plans[key]
        except KeyError:
            pass
        column_keys = None if self._spells_out else list(key[2])
        compiled: Any = self._statement.compile(dialect=dialect, column_keys=column_keys)
        simple = not (
            compiled.insert_prefetch
            or compiled.update_prefetch
            or compiled.literal_execute_params
            or compiled.post_compile_params
            or compiled.schema_translate_map
        )
        plan = (
            _Plan(
                compiled,
                tuple(compiled.positiontup) if compiled.positional else None,
                compiled._bind_processors,
                compiled.escaped_bind_names or {},
                tuple(
                    column.type.dialect_impl(dialect).result_processor(dialect, None)
                    for column in compiled._result_columns
                ),
            )
            if simple
            else None
        )
        self._plans[key] = plan
        return plan


def conceal(error: BaseException) -> bool:
    """Cut a PostgreSQL error's message to its first line, with its SQLSTATE, and say
    whether that changed it: the rest may quote the statement (``LINE 1: …``) or the row
    refused (``DETAIL: Failing row contains …``, params or outputs, say), values
    ``hide_parameters`` keeps out of errors and so out of the logs. The first line names
    the constraint that failed; that of a data exception (class 22) may quote the value
    itself (``invalid input syntax for type integer: "…"``), so it is not kept."""
    diag: Any = getattr(error, "diag", None)
    primary = getattr(diag, "message_primary", None)
    if not primary:
        return False
    sqlstate = diag.sqlstate or "?????"
    if sqlstate.startswith("22"):
        primary = "the database refused a value"
    message = f"{primary} (SQLSTATE {sqlstate})"
    if error.args == (message,):
        return False
    error.args = (message,)
    return True


@contextmanager
def _driver_cursor(connection: Connection, sql: str, values: Any, shown: str | None = None) -> Iterator[Any]:
    """The connection's DBAPI cursor; driver errors come back as SQLAlchemy's, naming the
    statement as ``shown`` if given (one with values in its text, which the error would
    quote, ``hide_parameters`` or not), the driver's own message cut by ``conceal``."""
    dbapi = connection.dialect.loaded_dbapi
    cursor = connection.connection.cursor()
    try:
        yield cursor
    except dbapi.Error as exc:
        hide = connection.engine.hide_parameters
        if hide or shown is not None:
            conceal(exc)
        raise DBAPIError.instance(
            sql if shown is None else shown, values, exc, dbapi.Error, hide, dialect=connection.dialect
        ) from exc
    finally:
        cursor.close()


def first_row(connection: Connection, sql: str, parameters: Any) -> Any:
    """The first row of one statement (None without rows), straight on the driver, in the
    driver's own parameter style; values as the driver reads them."""
    with _driver_cursor(connection, sql, parameters) as cursor:
        cursor.execute(sql, parameters)
        return cursor.fetchone()


def statement(connection: Connection, sql: str, parameters: Any = None, *, shown: str | None = None) -> None:
    """One statement without results, straight on the driver, in the driver's own
    parameter style (``parameters`` as the driver takes them); an error names it as
    ``shown`` if given."""
    with _driver_cursor(connection, sql, parameters, shown) as cursor:
        if parameters is None:
            cursor.execute(sql)
        else:
            cursor.execute(sql, parameters)
