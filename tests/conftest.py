"""Shared fixtures: every store-backed fixture runs on SQLite and on real PostgreSQL."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from ondeck.store.store import Store
from tests.support import PG_ADMIN, Server, base_env, pg_schema_url


def _pg_available() -> bool:
    try:
        with psycopg.connect(PG_ADMIN, connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


@pytest.fixture(scope="session")
def pg_reachable() -> None:
    if not _pg_available():
        message = f"PostgreSQL is not reachable at {PG_ADMIN}"
        if os.environ.get("CI"):
            pytest.fail(message + " (required in CI)")
        pytest.skip(message)


@pytest.fixture
def pg_url(pg_reachable: None) -> Iterator[str]:
    yield from pg_schema_url()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ondeck.db'}"
    else:
        request.getfixturevalue("pg_reachable")
        yield from pg_schema_url()


def _upgraded(url: str) -> Iterator[Store]:
    store = Store(url)
    store.upgrade()
    yield store
    store.dispose()


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    yield from _upgraded(database_url)


@pytest.fixture
def pg_store(pg_url: str) -> Iterator[Store]:
    """A store on PostgreSQL alone, for what only it does (another transaction's row locks)."""
    yield from _upgraded(pg_url)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def module_database(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, str]]:
    """A data directory (with an empty automations dir) and a database, per module and backend."""
    data = tmp_path_factory.mktemp("server")
    (data / "automations").mkdir()
    if request.param == "sqlite":
        yield data, f"sqlite:///{data / 'ondeck.db'}"
    else:
        request.getfixturevalue("pg_reachable")
        yield from ((data, url) for url in pg_schema_url())  # drops the schema afterwards


@pytest.fixture(scope="module")
def server(module_database: tuple[Path, str]) -> Iterator[Server]:
    """One real ``ondeck server`` (with its worker) per module and backend."""
    data, url = module_database
    proc = Server(base_env(data, url, ONDECK_WORKER_CONCURRENCY="8"), data / "server.log").start()
    try:
        yield proc
    finally:
        proc.stop()
