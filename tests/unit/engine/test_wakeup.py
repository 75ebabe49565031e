"""Wake-ups: the relay between a server and its embedded worker, and PostgreSQL notifications."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
import uuid
from typing import Any

import psycopg
import pytest
from sqlalchemy import make_url

from ondeck.domain import utcnow
from ondeck.engine.wakeup import WORKER_CHANNELS, PostgresListener, Relay, WakeBus
from ondeck.store.store import Store


def test_relay_publishes_the_peers_notifications_and_reports_when_the_peer_is_gone() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        here, there = WakeBus(), WakeBus()
        for bus in (here, there):
            bus.bind(loop)
        cancelled: list[str] = []
        there.on_cancel(cancelled.append)
        closed = asyncio.Event()
        near = Relay(ours, here, on_closed=lambda: None)
        far = Relay(theirs, there, on_closed=closed.set)
        near.start(loop)
        far.start(loop)

        with there.watch_run("run-1") as watch:
            # From another thread, as store commits call it.
            def send() -> None:
                near.send("cancel", "run-0")
                near.send("run", "run-1")

            sender = threading.Thread(target=send)
            sender.start()
            sender.join()
            assert await watch.wait(5.0), "the run notification did not arrive"
        assert cancelled == ["run-0"]

        with here.watch_queue() as queue:
            far.send("queue", "gpu\nsecond line")
            assert await queue.wait(5.0), "notifications travel both ways"

        near.close()
        await asyncio.wait_for(closed.wait(), 5.0)
        far.send("queue", "")  # the peer is gone: dropped, never raised

    asyncio.run(scenario())


def test_relay_drops_what_the_peer_cannot_take_instead_of_blocking() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    relay = Relay(ours, WakeBus(), on_closed=lambda: None)
    for _ in range(100_000):  # far more than the socket buffer holds; nobody reads
        relay.send("run", "01ARZ3NDEKTSV4RRFFQ69G5FAV")
    relay.close()
    theirs.close()


def test_a_transactions_notifications_reach_postgres_listeners_once_each_in_order_at_commit(
    pg_url: str,
) -> None:
    store = Store(pg_url)
    store.upgrade()
    local: list[tuple[str, str]] = []
    store.subscribe(lambda channel, payload: local.append((channel, payload)))
    conninfo = make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False)
    # Channels are shared by every schema in the database (other tests run alongside):
    # only payloads made here count.
    a, b, group, dropped = (f"{name}-{uuid.uuid4().hex}" for name in ("a", "b", "group", "dropped"))
    b += "'; \\ $$"  # quoted as data: the notifications and the commit go as one query

    def ours(listener: psycopg.Connection[Any], timeout: float, stop_after: int | None = None) -> list[Any]:
        mine = (a, b, group, dropped)
        found = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (stop_after is None or len(found) < stop_after):
            remaining = max(0.01, deadline - time.monotonic())
            for note in listener.notifies(timeout=remaining, stop_after=1):
                if note.payload in mine:
                    found.append((note.channel, note.payload))
        return found

    try:
        with psycopg.connect(conninfo, autocommit=True) as listener:
            listener.execute("LISTEN ondeck_run")
            listener.execute("LISTEN ondeck_queue")
            with contextlib.suppress(RuntimeError), store.transaction() as tx:
                tx.notify("run", dropped)
                raise RuntimeError("abort")
            with store.transaction() as tx:
                for channel, payload in [("run", a), ("queue", group), ("run", a), ("run", b)]:
                    tx.notify(channel, payload)
                assert ours(listener, 0.2) == [], "sent before commit"
            received = ours(listener, 5.0, stop_after=3)
            assert ours(listener, 0.2) == [], "more than once, or the rolled-back one"
    finally:
        store.dispose()
    assert received == [("ondeck_run", a), ("ondeck_queue", group), ("ondeck_run", b)]
    assert local == [("run", a), ("queue", group), ("run", b)]


def test_a_notification_that_cannot_be_sent_loses_nothing_else(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Notifications go out after their transaction commits: one PostgreSQL refuses (a
    payload over its 8000 bytes) is dropped with a warning, and neither its transaction
    nor the notifications after it are lost."""
    store = Store(pg_url)
    store.upgrade()
    conninfo = make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False)
    later = f"later-{uuid.uuid4().hex}"
    try:
        with psycopg.connect(conninfo, autocommit=True) as listener:
            listener.execute("LISTEN ondeck_run")
            with store.transaction() as tx:
                tx.put_environment("kept", {"name": "kept"}, utcnow())
                tx.notify("run", "x" * 9000)
            with store.transaction() as tx:
                tx.notify("run", later)
            heard: list[str] = []
            deadline = time.monotonic() + 10.0
            while not heard and time.monotonic() < deadline:
                notes = listener.notifies(timeout=max(0.01, deadline - time.monotonic()), stop_after=1)
                heard += [note.payload for note in notes if note.payload == later]
        with store.read() as tx:
            assert tx.environment("kept") is not None
    finally:
        store.dispose()
    assert heard == [later]
    assert "could not notify run (payload string too long)" in caplog.text


def test_a_postgres_listener_hears_only_the_channels_it_listens_to(pg_url: str) -> None:
    """A worker's listener takes runs to claim and runs to stop, not every run's changes."""
    store = Store(pg_url)
    store.upgrade()
    run_id, cancelled = f"r-{uuid.uuid4().hex}", f"c-{uuid.uuid4().hex}"

    async def scenario() -> tuple[list[str], bool]:
        bus = WakeBus()
        bus.bind(asyncio.get_running_loop())
        heard: list[str] = []
        bus.on_cancel(heard.append)
        listener = PostgresListener(pg_url, bus, WORKER_CHANNELS)
        try:
            with bus.watch_queue() as connected, bus.watch_run(run_id) as run_changed:
                listener.start()
                assert await connected.wait(10.0), "the listener did not connect"
                with store.transaction() as tx:
                    tx.notify("run", run_id)  # sent first: had it been heard, it came before the cancel
                    tx.notify("cancel", cancelled)
                deadline = time.monotonic() + 10.0
                while cancelled not in heard and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                return heard, run_changed._event.is_set()
        finally:
            await asyncio.to_thread(listener.stop)

    try:
        heard, run_heard = asyncio.run(scenario())
    finally:
        store.dispose()
    assert cancelled in heard
    assert not run_heard
