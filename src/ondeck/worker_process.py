"""The server's embedded worker, run as a child process.

In the server's own process, every claim, spawn, output read and finish would
compete with the API for one interpreter lock: under a flood of triggers,
``/healthz`` and live log streams waited behind runs, and runs behind requests.
As a child it has its own, so on two cores the API and the runs each get one.

The child is ``ondeck worker`` with the server's environment and, whatever the
environment says, the server's settings. A socketpair joins the two: it carries
wake-ups both ways on SQLite (see ``wakeup.Relay``), and its closing is the only
thing that stops the child: the server closes it to stop the worker, and the kernel
closes it if the server dies, so the child never outlives it. Signals meant for the
whole process group (Ctrl-C, a service manager's stop) are left to the server, which
may still be draining requests: a child that stopped on them would be restarted and
pick up its runs again mid-shutdown.
If the child dies, it is started again; the reaper ends whatever it was running.

``ONDECK_WORKER_PROCESSES`` above 1 starts several such children, each with its own
interpreter lock. Each gets the server's wake-ups; a child's own stay with it, which
is enough on SQLite: a child's commit only makes a run due by ending an attempt, and
then it has a free slot to claim that run itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import time

from ondeck.engine.wakeup import WORKER_CHANNELS, Relay, WakeBus
from ondeck.settings import Settings
from ondeck.store.store import Store

log = logging.getLogger(__name__)
_RESTART_DELAY = (1.0, 30.0)  # first, and most, seconds between restarts
_HEALTHY_AFTER = 60.0  # a child that lived this long restarts without delay
_STOP_MARGIN = 20.0  # beyond the kill grace: time for the child to record its results


class WorkerProcess:
    def __init__(self, store: Store, bus: WakeBus, settings: Settings) -> None:
        self._store, self._bus, self._stop_grace = store, bus, settings.kill_grace_seconds
        # The child reads its settings from the environment: the server's own, as given.
        self._env = {
            **{key: value for key, value in os.environ.items() if not key.startswith("ONDECK_")},
            **settings.as_environment(),
        }
        self._relay: Relay | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        if store.dialect == "sqlite":  # PostgreSQL's NOTIFY already reaches the child
            store.subscribe(self._forward)

    def _forward(self, channel: str, payload: str) -> None:
        relay = self._relay
        if relay is not None and channel in WORKER_CHANNELS:  # the rest is the server's
            relay.send(channel, payload)

    async def start(self) -> None:
        await self._spawn()
        self._task = asyncio.create_task(self._supervise())

    async def _spawn(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
        try:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "ondeck",
                "worker",
                "--parent-fd",
                str(theirs.fileno()),
                "--log-level",
                level,
                stdin=asyncio.subprocess.DEVNULL,
                env=self._env,
                pass_fds=(theirs.fileno(),),
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._relay = Relay(ours, self._bus, on_closed=lambda: None)
        self._relay.start(asyncio.get_running_loop())
        log.info("embedded worker started (pid %d)", self._process.pid)

    async def _supervise(self) -> None:
        delay = _RESTART_DELAY[0]
        while True:
            assert self._process is not None
            began = time.monotonic()
            code = await self._process.wait()
            if self._stopping:
                return
            self._close_relay()
            if time.monotonic() - began > _HEALTHY_AFTER:
                delay = _RESTART_DELAY[0]
            log.error("embedded worker exited with %s; restarting in %.0f s", code, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RESTART_DELAY[1])
            try:
                await self._spawn()
            except Exception:
                log.exception("starting the embedded worker failed; will retry")

    def _close_relay(self) -> None:
        if self._relay is not None:
            self._relay.close()
            self._relay = None

    async def stop(self) -> None:
        """Close the socket, which stops the child (it ends its attempts within the kill
        grace and records them), then wait for it."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._close_relay()
        process = self._process
        if process is not None and process.returncode is None:
            try:
                await asyncio.wait_for(process.wait(), self._stop_grace + _STOP_MARGIN)
            except TimeoutError:
                log.error("embedded worker did not stop in time; killing it")
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
