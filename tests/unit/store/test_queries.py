"""Query plans that keep per-run costs flat however long the queue grows."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import text

from ondeck.store.store import _QUEUED_CANDIDATES, Store


def test_a_claim_reads_the_queue_in_its_order_instead_of_sorting_it(store: Store) -> None:
    """With the index in claim order, a claim stops after the few runs it takes; any sort
    step would read every queued run of the group first (it did: claims cost grew with
    the queue, 1 ms a run at 2,000 queued)."""
    compiled = _QUEUED_CANDIDATES.statement.compile(dialect=store.engine.dialect)
    now = datetime.now(UTC).isoformat()  # its type does not matter to the plan
    bound = compiled.construct_params({"worker_group": "default", "now": now, "limit": 3})
    with store.transaction() as tx:
        if tx.postgres:
            tx._c.execute(text("SET LOCAL enable_seqscan = off"))  # as it would be for a long queue
            explain, parameters = "EXPLAIN ", bound
        else:
            positional = tuple(bound[name] for name in compiled.positiontup or ())
            explain, parameters = "EXPLAIN QUERY PLAN ", positional
        plan = "\n".join(str(row[-1]) for row in tx._c.exec_driver_sql(explain + compiled.string, parameters))
    assert "ix_runs_queue" in plan
    assert "TEMP B-TREE" not in plan and "Sort" not in plan, plan
