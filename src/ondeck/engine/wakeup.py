"""Wake-ups: the store says what changed, waiting coroutines hear it at once.

Channels: ``queue`` (a run became due; payload is the worker group), ``run``
(a run changed or logged; payload is its id), ``cancel`` (a running run was
asked to stop). On SQLite the store's in-process notifications are all there
is; on PostgreSQL a ``LISTEN`` connection adds those of every other process.
An embedded worker process hears the server's notifications, and the server
the worker's, through a ``Relay`` (SQLite has no ``NOTIFY``).
Polling remains only as a fallback: every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator

import psycopg

from ondeck.store.notifier import conninfo
from ondeck.streaks import Failures

log = logging.getLogger(__name__)
WORKER_CHANNELS = frozenset({"queue", "cancel"})  # what a worker waits for: runs to claim, runs to stop


class Watch:
    """Registered before state is read, so a change in between is never missed."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._event.set()

    async def wait(self, timeout: float) -> bool:
        """True if woken, False on timeout; re-arms for the next wait."""
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            return False
        self._event.clear()
        return True


class WakeBus:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue_watches: set[Watch] = set()
        self._run_watches: dict[str, set[Watch]] = defaultdict(set)
        self._cancel_handlers: list[Callable[[str], None]] = []
        self._delivery_handlers: list[Callable[[], None]] = []

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def from_thread(self, channel: str, payload: str) -> None:
        """Thread-safe entry point (store commits and the LISTEN thread call this)."""
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop closing during shutdown
                self._loop.call_soon_threadsafe(self.publish, channel, payload)

    def publish(self, channel: str, payload: str) -> None:
        if channel == "queue":
            for watch in list(self._queue_watches):
                watch.fire()
        elif channel == "run":
            for watch in list(self._run_watches.get(payload, ())):
                watch.fire()
        elif channel == "cancel":
            for handler in self._cancel_handlers:
                handler(payload)
        elif channel == "delivery":
            for wake in self._delivery_handlers:
                wake()

    def on_cancel(self, handler: Callable[[str], None]) -> None:
        self._cancel_handlers.append(handler)

    def on_delivery(self, wake: Callable[[], None]) -> None:
        self._delivery_handlers.append(wake)

    @contextlib.contextmanager
    def watch_queue(self) -> Iterator[Watch]:
        watch = Watch()
        self._queue_watches.add(watch)
        try:
            yield watch
        finally:
            self._queue_watches.discard(watch)

    @contextlib.contextmanager
    def watch_run(self, run_id: str) -> Iterator[Watch]:
        watch = Watch()
        self._run_watches[run_id].add(watch)
        try:
            yield watch
        finally:
            watches = self._run_watches.get(run_id)
            if watches is not None:
                watches.discard(watch)
                if not watches:
                    del self._run_watches[run_id]


class PostgresListener:
    """A thread holding one ``LISTEN`` connection to ``channels``; reconnects if it drops.

    Only to the channels this process waits on: PostgreSQL delivers each notification
    to every connection listening to its channel, and each delivery wakes that
    connection's server process, this thread and the event loop. A worker hearing
    every change of every run (three per run) spent more on them than on its claims.
    """

    def __init__(self, database_url: str, bus: WakeBus, channels: Iterable[str]) -> None:
        self._conninfo = conninfo(database_url)
        self._bus = bus
        self._channels = sorted(channels)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ondeck-listen", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        failures = Failures(log, "listening for wake-ups (LISTEN)", logging.WARNING)  # a lost connection
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True) as connection:
                    for channel in self._channels:
                        connection.execute(f"LISTEN ondeck_{channel}")
                    failures.succeeded()
                    # Anything missed while (re)connecting: wake everyone once.
                    self._bus.from_thread("queue", "")
                    while not self._stop.is_set():
                        for note in connection.notifies(timeout=1.0):
                            self._bus.from_thread(note.channel.removeprefix("ondeck_"), note.payload)
            except psycopg.Error:
                failures.failed()
                self._stop.wait(1.0)
            except Exception:  # a bug or a lack of memory must not end wake-ups for good
                log.exception("listening failed; reconnecting")
                self._stop.wait(1.0)


class Relay:
    """Forwards wake-ups to a peer process over a socketpair, and publishes the peer's.

    ``SOCK_SEQPACKET`` keeps each notification one message (no framing) and tells
    each side when the other is gone, so the socket is also the embedded
    worker's lifeline: ``on_closed`` runs when the peer exits, however it died.
    A message the peer cannot take at once is dropped: wake-ups are hints, every
    wait has a polling fallback, and a store commit must never block on a peer.
    """

    def __init__(self, sock: socket.socket, bus: WakeBus, on_closed: Callable[[], None]) -> None:
        self._sock, self._bus, self._on_closed = sock, bus, on_closed
        self._sock.setblocking(False)
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self._sock.fileno(), self._receive)

    def send(self, channel: str, payload: str) -> None:
        """Store listener: safe from any thread (the kernel keeps each message whole)."""
        with contextlib.suppress(OSError):  # full (dropped, see above) or peer gone
            self._sock.send(f"{channel}\n{payload}".encode())

    def _receive(self) -> None:
        while True:
            try:
                message = self._sock.recv(4096)
            except BlockingIOError:
                return
            except OSError:
                message = b""
            if not message:
                self.close()
                self._on_closed()
                return
            channel, _, payload = message.decode().partition("\n")
            self._bus.publish(channel, payload)

    def close(self) -> None:
        if self._loop is not None and self._sock.fileno() >= 0:
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
