"""PostgreSQL notifications, sent after the transactions that made them commit.

A ``NOTIFY`` inside a transaction makes its commit take a lock that every notifying
commit in the database takes (PostgreSQL delivers notifications in commit order), and
hold it through the commit's flush to disk. Nearly every transaction of a run notifies
(its admission wakes the workers, its start and end wake whoever watches it), so they
all queued behind one another's flushes: under load, an admission waited milliseconds
for the lock, and every admission after it for the rows it held meanwhile.

So a process sends its notifications from a thread and a connection of their own, once
their transaction has committed. That connection's commits do not wait for the disk
(``synchronous_commit`` off): a notification is a hint, gone with a crash like the
wake-up it stands for. The lock is then held for a moment, and notifications that come
meanwhile go out together. One that cannot be sent is dropped with a warning: every wait
on a notification also polls. While the database is out of reach, what is queued is
dropped at each failed attempt to reconnect, and the thread, should it ever die, is
started again by the next notification.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Sequence

import psycopg
from sqlalchemy import make_url

from ondeck.store.database import keepalive

log = logging.getLogger(__name__)
_NOTIFY = "SELECT pg_notify(c, p) FROM unnest(%(c)s::text[], %(p)s::text[]) AS n(c, p)"


def conninfo(database_url: str) -> str:
    """``database_url`` (SQLAlchemy's form) as psycopg's connection string, with the
    options that notice a dead connection (``database.keepalive``)."""
    url = make_url(database_url).set(drivername="postgresql")
    url = url.update_query_dict(keepalive(url.query))
    return url.render_as_string(hide_password=False)


class Notifier:
    """Sends ``(channel, payload)`` notifications, in the order given, on ``ondeck_<channel>``."""

    def __init__(self, database_url: str) -> None:
        self._conninfo = conninfo(database_url)
        self._pending: queue.SimpleQueue[list[tuple[str, str]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start = threading.Lock()
        self._closed = False
        self._connection: psycopg.Connection[tuple[object, ...]] | None = None  # the thread's

    def send(self, notifications: Sequence[tuple[str, str]]) -> None:
        """Queue ``notifications`` (never blocks on the database). Once closed, drop them:
        a thread started then would hold a connection that nothing ever closes."""
        with self._start:
            if self._closed:
                return
            self._pending.put(list(notifications))
            if self._thread is None:  # the first, or one that died (see ``_run``)
                self._spawn()

    def close(self) -> None:
        """Send what is queued, then stop."""
        with self._start:
            self._closed = True
            thread, self._thread = self._thread, None
        if thread is not None:
            self._pending.put(None)
            thread.join(timeout=5)

    def _run(self) -> None:
        try:
            while (batch := self._next_batch()) is not None:
                try:
                    self._send(batch)
                except Exception:  # not the database's refusal: this thread goes on all the same
                    log.exception("notifying failed: listeners poll")
                    self._disconnect()
        finally:
            self._disconnect()
            # Should this thread die nonetheless, the next ``send`` starts another, and one
            # starts now for what was queued meanwhile.
            with self._start:
                if self._thread is threading.current_thread():
                    self._thread = None
                    if not self._closed and not self._pending.empty():
                        self._spawn()

    def _spawn(self) -> None:
        """Start the sending thread (with ``_start`` held)."""
        self._thread = threading.Thread(target=self._run, name="ondeck-notify", daemon=True)
        self._thread.start()

    def _send(self, batch: list[tuple[str, str]]) -> None:
        # A connection lost since the last batch (a restart, an idle timeout) is replaced
        # once; a new one that cannot be had means the database is out of reach.
        tries = 1 if self._connection is None else 2
        for _ in range(tries):
            try:
                self._execute(batch)
                return
            except psycopg.Error as exc:
                error = exc
                if self._usable():
                    break  # refused
                self._disconnect()
        else:
            log.warning("could not send %d notification(s) (%s): listeners poll", len(batch), error)
            return
        for sent, (channel, payload) in enumerate(batch):  # one at a time: one refused costs no other
            try:
                self._execute([(channel, payload)])
            except psycopg.Error as exc:
                log.warning("could not notify %s (%s): listeners poll", channel, exc)
                if not self._usable():
                    if sent + 1 < len(batch):
                        log.warning("dropped %d more notification(s): listeners poll", len(batch) - sent - 1)
                    self._disconnect()
                    return

    def _usable(self) -> bool:
        connection = self._connection
        return connection is not None and not connection.closed and not connection.broken

    def _execute(self, batch: list[tuple[str, str]]) -> None:
        if not self._usable():
            self._disconnect()
            self._connection = psycopg.connect(self._conninfo, autocommit=True, connect_timeout=10)
            self._connection.execute("SET synchronous_commit = off")
        assert self._connection is not None
        channels = [f"ondeck_{channel}" for channel, _ in batch]
        self._connection.execute(_NOTIFY, {"c": channels, "p": [payload for _, payload in batch]})

    def _disconnect(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.close()
            self._connection = None

    def _next_batch(self) -> list[tuple[str, str]] | None:
        """What is queued, waiting for some; None once ``close`` was called and all is sent."""
        batch = self._pending.get()
        while batch is not None:
            try:
                more = self._pending.get_nowait()
            except queue.Empty:
                return batch
            if more is None:
                self._pending.put(None)  # send this batch first, stop at the next call
                return batch
            batch += more
        return None
