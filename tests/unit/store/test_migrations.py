"""Each migration can be undone, and done again, on both backends (a "stairway" test): a
downgrade that fails, or leaves a table, an index or a function behind, is a rolled-back
release that cannot be upgraded again."""

from __future__ import annotations

from typing import Any

from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect, text

from ondeck.store import database
from ondeck.store.store import Store

POSTGRESQL_ONLY = {"0005", "0006"}  # they add functions, which SQLite has none of


def _migrate(engine: Engine, action: str, revision: str) -> None:
    config = database._alembic_config()
    with engine.connect() as connection, connection.begin():
        config.attributes["connection"] = connection
        getattr(command, action)(config, revision)


def _schema(engine: Engine) -> dict[str, Any]:
    """Tables with their columns, indexes and constraints, and on PostgreSQL the functions,
    that the store's schema holds (alembic's own version table aside)."""
    inspector = inspect(engine)
    schema: dict[str, Any] = {
        table: (
            [
                (column["name"], str(column["type"]), column["nullable"], column["default"])
                for column in inspector.get_columns(table)
            ],
            sorted(repr(sorted(index.items())) for index in inspector.get_indexes(table)),  # sort orders too
            inspector.get_pk_constraint(table)["constrained_columns"],
            sorted(repr(sorted(unique.items())) for unique in inspector.get_unique_constraints(table)),
            sorted(repr(sorted(check.items())) for check in inspector.get_check_constraints(table)),
            sorted(repr(sorted(key.items())) for key in inspector.get_foreign_keys(table)),
        )
        for table in inspector.get_table_names()
        if table != "alembic_version"
    }
    with engine.connect() as connection:
        if engine.dialect.name == "postgresql":
            functions = connection.execute(
                text(
                    "SELECT p.proname, pg_get_function_identity_arguments(p.oid) FROM pg_proc p"
                    " JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = current_schema()"
                )
            )
            schema["functions"] = sorted(tuple(row) for row in functions)
        else:  # SQLite's reflected indexes omit their columns' order
            indexes = connection.execute(
                text("SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name != 'alembic_version'")
            )
            schema["indexes"] = sorted(str(sql) for (sql,) in indexes)
    return schema


def test_each_migration_is_undone_to_the_schema_before_it_and_done_again(database_url: str) -> None:
    scripts = ScriptDirectory.from_config(database._alembic_config())
    revisions = [script.revision for script in reversed(list(scripts.walk_revisions()))]
    assert len(revisions) >= 6
    store = Store(database_url)
    try:
        engine = store.engine
        schemas = [_schema(engine)]  # before any
        assert schemas[0] in ({"functions": []}, {"indexes": []})
        for revision in revisions:
            _migrate(engine, "upgrade", revision)
            schemas.append(_schema(engine))
            if engine.dialect.name == "postgresql" or revision not in POSTGRESQL_ONLY:
                assert schemas[-1] != schemas[-2], f"{revision} changed nothing"
            _migrate(engine, "downgrade", "-1")
            assert _schema(engine) == schemas[-2], f"undoing {revision} left a different schema"
            _migrate(engine, "upgrade", revision)
            assert _schema(engine) == schemas[-1], f"redoing {revision} made a different schema"
        _migrate(engine, "downgrade", "base")
        assert _schema(engine) == schemas[0]
    finally:
        store.dispose()
