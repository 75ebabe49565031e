"""Notifications sent after commit, on PostgreSQL: in order, one refused costing no other,
a lost connection replaced, and the sending thread never gone for good."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from typing import TypeAlias

import psycopg
import pytest

from ondeck.store.notifier import Notifier, conninfo
from tests.support import PG_ADMIN


@pytest.fixture
def channel() -> str:
    return f"test{uuid.uuid4().hex[:12]}"  # channels are the database's: one of this test's own


Listener: TypeAlias = psycopg.Connection[tuple[object, ...]]


@pytest.fixture
def listener(channel: str, pg_url: str) -> Iterator[Listener]:
    with psycopg.connect(PG_ADMIN, autocommit=True) as connection:
        connection.execute(f"LISTEN ondeck_{channel}")
        yield connection


@pytest.fixture
def notifier(pg_url: str) -> Iterator[Notifier]:
    notifier = Notifier(pg_url)
    yield notifier
    notifier.close()


def received(listener: Listener, count: int) -> list[str]:
    payloads: list[str] = []
    deadline = time.monotonic() + 10
    while len(payloads) < count and time.monotonic() < deadline:
        payloads += [note.payload for note in listener.notifies(timeout=0.2, stop_after=count)]
    return payloads


def test_notifications_arrive_in_the_order_sent(notifier: Notifier, listener: Listener, channel: str) -> None:
    notifier.send([(channel, "1"), (channel, "2")])
    notifier.send([(channel, "3")])
    assert received(listener, 3) == ["1", "2", "3"]


def test_one_notification_refused_costs_no_other(
    notifier: Notifier, listener: Listener, channel: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="ondeck.store.notifier"):
        notifier.send([(channel, "before"), (channel, "x" * 9000), (channel, "after")])  # over 8000 bytes
        assert received(listener, 2) == ["before", "after"]
    assert "could not notify" in caplog.text and "too long" in caplog.text


def test_a_connection_lost_meanwhile_is_replaced_without_losing_the_next(
    notifier: Notifier, listener: Listener, channel: str
) -> None:
    """A restart or an idle timeout ends the notifier's connection while it waits."""
    notifier.send([(channel, "first")])
    assert received(listener, 1) == ["first"]
    connection = notifier._connection
    assert connection is not None
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", [connection.info.backend_pid])
    notifier.send([(channel, "second")])
    assert received(listener, 1) == ["second"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread's death
@pytest.mark.parametrize(
    "fault",
    [RuntimeError("a bug"), SystemExit()],  # the second gets past the thread's own handling and ends it
    ids=["a-fault-it-survives", "a-fault-that-ends-the-thread"],
)
def test_a_fault_that_is_no_database_error_costs_its_batch_alone(
    notifier: Notifier,
    listener: Listener,
    channel: str,
    monkeypatch: pytest.MonkeyPatch,
    fault: BaseException,
) -> None:
    """A bug or a lack of memory while sending must not end wake-ups for good: the thread
    goes on, or, should it die, the next ``send`` (even in its last moments) starts another."""
    real, faulted = Notifier._execute, threading.Event()

    def execute(self: Notifier, batch: list[tuple[str, str]]) -> None:
        if not faulted.is_set():
            faulted.set()
            raise fault
        real(self, batch)

    monkeypatch.setattr(Notifier, "_execute", execute)
    notifier.send([(channel, "lost to the fault")])
    assert faulted.wait(10)
    notifier.send([(channel, "sent")])
    assert received(listener, 1) == ["sent"]


def test_a_database_out_of_reach_drops_each_batch_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    notifier = Notifier("postgresql+psycopg://postgres@127.0.0.1:1/test")  # nothing listens there
    try:
        with caplog.at_level(logging.WARNING, logger="ondeck.store.notifier"):
            notifier.send([("queue", "a"), ("queue", "b"), ("run", "c")])
            notifier.close()  # sends (tries to) what is queued first
    finally:
        notifier.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("could not send 3 notification(s)"), warnings


def test_nothing_is_sent_once_closed(
    pg_url: str, notifier: Notifier, listener: Listener, channel: str
) -> None:
    notifier.close()
    notifier.send([(channel, "late")])
    assert notifier._thread is None  # nor anything queued for one
    another = Notifier(pg_url)
    another.send([(channel, "marker")])
    another.close()
    assert received(listener, 1) == ["marker"]


def test_connections_notice_a_vanished_server(pg_url: str) -> None:
    """Keepalive probes and a limit on unacknowledged data, unless the URL says otherwise."""
    with psycopg.connect(conninfo(pg_url)) as connection:
        options = dict(item.split("=", 1) for item in connection.info.dsn.split())
    assert options["keepalives_idle"] == "10" and options["tcp_user_timeout"] == "30000"
    assert "keepalives_idle=99" in conninfo(pg_url + "&keepalives_idle=99")
