"""The store's own PostgreSQL connections."""

from __future__ import annotations

from ondeck.store.store import Store


def test_the_stores_connections_notice_a_vanished_server_too(pg_store: Store, pg_url: str) -> None:
    with pg_store.engine.connect() as connection:
        dsn = connection.connection.driver_connection.info.dsn
    options = dict(item.split("=", 1) for item in dsn.split())
    assert options["keepalives_idle"] == "10" and options["tcp_user_timeout"] == "30000"
    other = Store(pg_url + "&tcp_user_timeout=5000")
    try:
        with other.engine.connect() as connection:
            dsn = connection.connection.driver_connection.info.dsn
    finally:
        other.dispose()
    assert "tcp_user_timeout=5000" in dsn.split()
