"""Engines for SQLite (embedded default) and PostgreSQL (scale-out), and migrations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, make_url, text
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.exc import DBAPIError

from ondeck.store import direct

_MIGRATIONS = Path(__file__).parent / "migrations"
# Any fixed number: serialises concurrent `upgrade` calls from many processes on PostgreSQL.
_MIGRATION_LOCK = 0x0ADECC
# How long a writer waits for another before the store reports itself unavailable.
BUSY_TIMEOUT_SECONDS = 30.0


def create_db_engine(url: str) -> Engine:
    """An engine whose errors never show the statement's values (``hide_parameters``): they
    are logged, and values are params, outputs and logs, which may be sensitive."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(url)
    # More pooled connections than threads that use them (ondeck.blocking, anyio); recycled
    # hourly rather than pinged on every checkout.
    engine = create_engine(
        url,
        pool_size=16,
        max_overflow=16,
        pool_recycle=3600,
        pool_timeout=60,
        hide_parameters=True,
        connect_args=keepalive(parsed.query),
    )
    event.listen(engine, "handle_error", _concealed)
    event.listen(engine, "connect", _bounded_session)
    return engine


# How long PostgreSQL keeps a transaction whose client sends nothing more (see below).
IDLE_IN_TRANSACTION_SECONDS = 60


def _bounded_session(dbapi_connection: Any, _record: Any) -> None:
    """A transaction whose client went silent mid-way (a host gone, a partition) keeps its
    row locks until the server notices, which its TCP keepalives, two hours by default,
    do late: meanwhile nobody can move the runs it locked, and the reaper skips them.
    PostgreSQL ends such a session after ``IDLE_IN_TRANSACTION_SECONDS`` instead, unless
    its administrator chose a limit already; none of ondeck's transactions waits that long
    between two statements."""
    with dbapi_connection.cursor() as cursor:
        cursor.execute(
            "SELECT set_config('idle_in_transaction_session_timeout', %s, false)"
            " WHERE current_setting('idle_in_transaction_session_timeout') = '0'",
            [f"{IDLE_IN_TRANSACTION_SECONDS}s"],
        )
    dbapi_connection.commit()


def _concealed(context: ExceptionContext) -> BaseException | None:
    """SQLAlchemy's error for a statement of its own, the driver's message cut as
    ``direct.conceal`` cuts it (``hide_parameters`` hides only the bound values)."""
    error = context.original_exception
    if context.sqlalchemy_exception is None or not direct.conceal(error):
        return None
    return DBAPIError.instance(
        context.statement,
        context.parameters,
        error,
        context.dialect.loaded_dbapi.Error,
        hide_parameters=True,
        connection_invalidated=context.is_disconnect,
        dialect=context.dialect,
    )


def keepalive(query: Any) -> dict[str, str]:
    """libpq's options that notice a dead connection to PostgreSQL, those of them the URL's
    ``query`` does not set. Without them, a connection whose server vanished without a
    word (a host gone, a partition, a failover) waited for an answer as long as the
    kernel keeps retransmitting, a quarter of an hour: a worker's claim or renewal, or a
    listener's wake-ups, stalled that long. With them, about half a minute: probes after
    10 s of silence, and sent data unacknowledged for 30 s, end it."""
    options = {
        "keepalives": "1",
        "keepalives_idle": "10",
        "keepalives_interval": "5",
        "keepalives_count": "3",
        "tcp_user_timeout": "30000",  # ms
    }
    return {name: value for name, value in options.items() if name not in query}


def _sqlite_engine(url: str) -> Engine:
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, pool_size=20, max_overflow=20, pool_timeout=60, hide_parameters=True)

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        # pysqlite's own BEGIN handling is bypassed so writers can BEGIN IMMEDIATE:
        # taking the write lock up front avoids deadlocks on lock upgrade.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in (
            "journal_mode=WAL",
            "synchronous=NORMAL",
            f"busy_timeout={int(BUSY_TIMEOUT_SECONDS * 1000)}",
            "foreign_keys=ON",
        ):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        immediate = connection.get_execution_options().get("ondeck_write", False)
        direct.statement(connection, "BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def _alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    return config


def upgrade(engine: Engine) -> None:
    """Bring the schema to the newest migration; safe to call from many processes at once."""
    config = _alembic_config()
    with engine.connect().execution_options(ondeck_write=True) as connection, connection.begin():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def is_current(engine: Engine) -> bool:
    """True when the database schema is at the newest migration."""
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    with engine.connect() as connection:
        return bool(MigrationContext.configure(connection).get_current_revision() == head)
