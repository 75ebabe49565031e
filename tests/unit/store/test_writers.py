"""SQLite writers from several processes take turns through a lock file, not by polling."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

from ondeck.store.store import Store


def test_a_writer_waits_while_another_process_writes_then_goes(tmp_path: Path) -> None:
    database = tmp_path / "ondeck.db"
    store = Store(f"sqlite:///{database}")
    store.upgrade()
    # Another process's writer: a separate open file description holding the lock.
    other = os.open(f"{database}-writer.lock", os.O_RDWR | os.O_CREAT)
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
