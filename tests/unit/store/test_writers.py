"""SQLite writers from several processes take turns through a lock file, not SQLite's sleep-and-retry."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

import pytest

from ondeck.errors import StoreUnavailable
from ondeck.store import database
from ondeck.store.store import Store


def test_a_writer_waits_while_another_process_writes_then_goes(tmp_path: Path) -> None:
    database_file = tmp_path / "ondeck.db"
    store = Store(f"sqlite:///{database_file}")
    store.upgrade()
    # Another process's writer: a separate open file description holding the lock.
    other = os.open(f"{database_file}-writer.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(other, fcntl.LOCK_EX)
    committed = threading.Event()

    def write() -> None:
        with store.transaction() as tx:
            tx.notify("queue", "default")
        committed.set()

    writer = threading.Thread(target=write)
    try:
        writer.start()
        assert not committed.wait(0.5), "wrote while another process held the writer lock"
        fcntl.flock(other, fcntl.LOCK_UN)
        assert committed.wait(10)
    finally:
        fcntl.flock(other, fcntl.LOCK_UN)
        os.close(other)
        writer.join(10)
        store.dispose()


def test_a_writer_gives_up_like_sqlite_when_another_process_never_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    database_file = tmp_path / "ondeck.db"
    store = Store(f"sqlite:///{database_file}")
    store.upgrade()
    monkeypatch.setattr(database, "BUSY_TIMEOUT_SECONDS", 0.3)
    other = os.open(f"{database_file}-writer.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(other, fcntl.LOCK_EX)  # say, a writer process that was stopped mid-transaction
    try:
        with pytest.raises(StoreUnavailable, match="busy"), store.transaction():
            pass
        fcntl.flock(other, fcntl.LOCK_UN)
        with store.transaction() as tx:  # and the store works again once it is gone
            tx.notify("queue", "default")
    finally:
        os.close(other)
        store.dispose()
