"""The audit chain under concurrent appends (on PostgreSQL, appended by a function in SQL)."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy.exc import DBAPIError

from ondeck.audit import first_broken
from ondeck.domain import utcnow
from ondeck.store.store import Store


def test_concurrent_appends_make_one_unbroken_chain(store: Store) -> None:
    """Each append hashes onto the entry committed before it, whoever wrote that one and
    however long it waited for the chain; Python checks the hashes the store computed."""
    threads, each = 6, 15
    start = threading.Barrier(threads)

    def append(writer: int) -> None:
        start.wait()
        for n in range(each):
            with store.transaction() as tx:
                target = f"ünï\ncode\u2028{n} 🚀"  # hashed as UTF-8 in SQL on PostgreSQL, newline and all
                tx.append_audit(f"writer-{writer}", "test.append", target, {"n": n}, utcnow())

    workers = [threading.Thread(target=append, args=(w,)) for w in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    with store.read() as tx:
        chain = tx.audit_chain()
    assert len(chain) == threads * each
    assert first_broken(chain) is None


def test_a_failing_append_names_its_statement_without_the_values(pg_store: Store) -> None:
    """On PostgreSQL the appends go with the commit as one query, values in its text: an
    error quoting it would carry the entry (params, say) into the logs, past
    hide_parameters."""
    with pytest.raises(DBAPIError) as raised, pg_store.transaction() as tx:
        tx.append_audit("x" * 101, "test.append", "t", {"param": "the-value"}, utcnow())  # actor: 100 at most
    assert "the-value" not in str(raised.value) and "x" * 101 not in str(raised.value)
