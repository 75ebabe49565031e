"""The store alone on PostgreSQL: a run's admission, and its end with the next run's claim.

    .venv/bin/python bench/store.py [--runs N] [--rounds R] [--src DIR ...]

Admits N runs of a bash ``true`` automation in this process (no HTTP), then ends them
one after another the way a worker under a backlog does, each end claiming the next run
(``Worker._finish_and_claim``; nothing is executed). Prints, per run, the CPU this process
spent (ondeck's side: SQLAlchemy, psycopg, the engine) and PostgreSQL's, for each half. A
fraction of an end-to-end run, but a steady one: a change of a round trip or two per run,
lost in the noise of ``throughput.py``, shows here.

With ``--src`` trees (e.g. ``git archive`` of two commits), the rounds alternate them,
each measured in a child process with that tree first on ``PYTHONPATH``; compare within
one invocation. Prints figures and never asserts.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

from throughput import alternate, database, database_cpu_seconds, ms  # bench/ is on the path: run as a script

from ondeck.domain import Outcome, RunStatus
from ondeck.engine import catalog, queue
from ondeck.engine.admission import TriggerRequest, admit
from ondeck.engine.worker import Worker
from ondeck.spec.loader import parse_definition
from ondeck.store.store import Store


@contextlib.contextmanager
def _measured(label: str, count: int) -> Iterator[None]:
    """Print this process's and PostgreSQL's CPU per run spent in the block."""
    own, postgres = time.process_time(), database_cpu_seconds()
    yield
    own, postgres = time.process_time() - own, database_cpu_seconds() - postgres
    print(f"  {label}: ondeck {ms(own / count)}, PostgreSQL {ms(postgres / count)} per run", flush=True)


def _end_and_claim(store: Store) -> Callable[[queue.Claim], list[queue.Claim]]:
    """``Worker._finish_and_claim`` of a worker made for it alone, ending each run as succeeded."""
    worker = Worker.__new__(Worker)  # no runner, no settings: only what the method uses
    worker.store, worker.id, worker.group = store, "bench-worker", "default"
    worker.lease, worker._definitions = timedelta(seconds=60), queue.DefinitionCache()
    done = Outcome(RunStatus.SUCCEEDED, 0)

    def end(claim: queue.Claim) -> list[queue.Claim]:
        claimed = worker._finish_and_claim(claim, done, [])
        return claimed[0] if claimed is not None else []

    return end


def measure(count: int) -> None:
    with database("postgresql", Path.cwd()) as url:
        store = Store(url)
        try:
            store.upgrade()
            catalog.apply(
                store, parse_definition({"name": "job", "run": {"runtime": "bash", "script": "true"}})
            )
            print(flush=True)
            with _measured("admission", count):
                for _ in range(count):
                    admit(store, TriggerRequest("job"))
            claims, _ = queue.claim(
                store, "bench-worker", "default", 1, timedelta(seconds=60), queue.DefinitionCache()
            )
            end = _end_and_claim(store)
            with _measured("end + next claim", count):
                while claims:
                    (claim,) = claims
                    claims = end(claim)
        finally:
            store.dispose()


if __name__ == "__main__":
    alternate(__file__, __doc__ or "", measure, "runs", 2000)
