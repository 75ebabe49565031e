"""The worker's end-of-attempt transaction against a real store (SQLite and PostgreSQL)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from ondeck.domain import Outcome, RunStatus
from ondeck.engine import queue, runs
from ondeck.engine.admission import TriggerRequest, admit
from ondeck.engine.wakeup import WakeBus
from ondeck.engine.worker import Worker
from ondeck.settings import Settings
from ondeck.store.store import Store
from ondeck.vault import Vault
from tests.unit.engine.test_lifecycle import LEASE, define

DONE = Outcome(RunStatus.SUCCEEDED, 0)


@pytest.fixture
def worker(store: Store, tmp_path: Path) -> Worker:
    return Worker(store, Settings(data_dir=tmp_path), WakeBus(), Vault([Fernet.generate_key()]))


def _claim_one(store: Store, worker: Worker) -> queue.Claim:
    (claimed,) = queue.claim(store, worker.id, "default", 1, LEASE, queue.DefinitionCache())[0]
    return claimed


def test_an_ending_attempt_claims_the_next_due_run_for_its_slot(store: Store, worker: Worker) -> None:
    define(store)
    first, second = (admit(store, TriggerRequest("job")).run for _ in range(2))
    (following,) = worker._finish_and_claim(_claim_one(store, worker), DONE, [])
    assert following.run.id == second.id
    assert runs.get(store, first.id).status == RunStatus.SUCCEEDED
    assert runs.get(store, second.id).lease_owner == worker.id
    assert worker._finish_and_claim(following, DONE, []) == []  # nothing left: it only finishes
    assert runs.get(store, second.id).status == RunStatus.SUCCEEDED


def test_a_failing_claim_does_not_undo_the_end_of_the_attempt(
    store: Store, worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    define(store)
    first, second = (admit(store, TriggerRequest("job")).run for _ in range(2))
    claimed = _claim_one(store, worker)

    def broken(*_args: object) -> None:
        raise RuntimeError("a stored definition no longer parses")

    monkeypatch.setattr(worker._definitions, "get", broken)
    assert worker._finish_and_claim(claimed, DONE, []) == []
    assert runs.get(store, first.id).status == RunStatus.SUCCEEDED
    assert runs.get(store, second.id).status == RunStatus.QUEUED  # the claim was undone alone
