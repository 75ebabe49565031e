"""SQLite writers from several processes take turns through a lock file, not SQLite's sleep-and-retry."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

import pytest

from ondeck.errors import StoreUnavailable
from ondeck.store import database
from ondeck.store.store import Store, WouldWait


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


def test_a_writer_that_may_not_wait_is_refused_at_once_and_nothing_is_written(tmp_path: Path) -> None:
    database_file = tmp_path / "ondeck.db"
    store = Store(f"sqlite:///{database_file}")
    store.upgrade()
    heard: list[tuple[str, str]] = []
    store.subscribe(lambda channel, payload: heard.append((channel, payload)))
    other = os.open(f"{database_file}-writer.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(other, fcntl.LOCK_EX)
    in_this_process = threading.Event()
    done = threading.Event()

    def hold_in_a_thread() -> None:
        with store.transaction():
            in_this_process.set()
            done.wait(10)

    try:
        with store.without_waiting(), pytest.raises(WouldWait), store.transaction() as tx:
            tx.notify("queue", "another process")
        fcntl.flock(other, fcntl.LOCK_UN)
        holder = threading.Thread(target=hold_in_a_thread)
        holder.start()
        assert in_this_process.wait(10)
        with store.without_waiting(), pytest.raises(WouldWait), store.transaction() as tx:
            tx.notify("queue", "another thread")
        done.set()
        holder.join(10)
        with store.without_waiting(), store.transaction() as tx:  # free: it writes
            tx.notify("queue", "free")
        with pytest.raises(WouldWait), store.without_waiting():
            fcntl.flock(other, fcntl.LOCK_EX)
            with store.transaction():
                pass
        fcntl.flock(other, fcntl.LOCK_UN)
        with store.transaction() as tx:  # outside the block, writers wait as before
            tx.notify("queue", "after")
    finally:
        done.set()
        os.close(other)
        store.dispose()
    assert heard == [("queue", "free"), ("queue", "after")]
