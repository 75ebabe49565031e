"""SQLite writers from several processes take turns through a lock file, not SQLite's sleep-and-retry."""

from __future__ import annotations

import asyncio
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


def test_a_write_turn_waits_for_the_lock_on_the_event_loop_and_holds_it_for_its_block(
    tmp_path: Path,
) -> None:
    database_file = tmp_path / "ondeck.db"
    store = Store(f"sqlite:///{database_file}")
    store.upgrade()
    heard: list[tuple[str, str]] = []
    store.subscribe(lambda channel, payload: heard.append((channel, payload)))
    other = os.open(f"{database_file}-writer.lock", os.O_RDWR | os.O_CREAT)

    def other_can_lock() -> bool:
        try:
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(other, fcntl.LOCK_UN)
        return True

    async def scenario() -> tuple[bool, bool, int, bool]:
        loop = asyncio.get_running_loop()
        async with store.write_turn(5.0) as free:
            with store.transaction() as tx:
                tx.notify("queue", "free")
            held = not other_can_lock()
        fcntl.flock(other, fcntl.LOCK_EX)  # another process writes for a while
        loop.call_later(0.3, fcntl.flock, other, fcntl.LOCK_UN)
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        ticker = asyncio.create_task(tick())
        async with store.write_turn(5.0) as waited:
            ticks_meanwhile = ticks
            with store.transaction() as tx:
                tx.notify("queue", "waited")
        ticker.cancel()
        fcntl.flock(other, fcntl.LOCK_EX)
        async with store.write_turn(0.1) as impatient:
            pass
        fcntl.flock(other, fcntl.LOCK_UN)
        return free and held, waited, ticks_meanwhile, impatient

    try:
        had_it, waited, ticks, impatient = asyncio.run(scenario())
        with store.transaction() as tx:  # the turns gave the lock back
            tx.notify("queue", "after")
    finally:
        os.close(other)
        store.dispose()
    assert had_it, "the turn did not hold the lock for its block"
    assert waited and ticks >= 10, "the loop was blocked while the turn waited"
    assert not impatient
    assert heard == [("queue", "free"), ("queue", "waited"), ("queue", "after")]


def test_a_write_turn_is_for_its_own_store_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = (Store(f"sqlite:///{tmp_path / name}") for name in ("a.db", "b.db"))
    for store in (first, second):
        store.upgrade()
    monkeypatch.setattr(database, "BUSY_TIMEOUT_SECONDS", 0.3)
    other = os.open(f"{tmp_path / 'b.db'}-writer.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(other, fcntl.LOCK_EX)  # another process writes to the second store

    async def scenario() -> None:
        async with first.write_turn(5.0) as mine:
            assert mine
            with pytest.raises(StoreUnavailable, match="busy"), second.transaction():
                pass

    try:
        asyncio.run(scenario())
    finally:
        os.close(other)
        first.dispose()
        second.dispose()
