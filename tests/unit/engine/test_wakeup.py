"""The relay that carries wake-ups between a server and its embedded worker process."""

from __future__ import annotations

import asyncio
import socket
import threading

from ondeck.engine.wakeup import Relay, WakeBus


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
