"""One ondeck process: its store, wake-ups, and background loops (worker, reaper).

``ondeck server`` runs a Node inside the web app's lifespan, and its embedded
worker as a child process (see ``worker_process``); ``ondeck worker`` runs one
on its own. All share everything below.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import socket
import sys
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from anyio import to_thread

from ondeck import blocking
from ondeck.auth import tokens
from ondeck.auth.principals import SYSTEM
from ondeck.engine import catalog, environments, limits, outbox, scheduler
from ondeck.engine.admission import AdmissionPolicy
from ondeck.engine.wakeup import WORKER_CHANNELS, PostgresListener, Relay, WakeBus
from ondeck.engine.worker import Worker, reap_forever
from ondeck.errors import InvalidDefinition
from ondeck.settings import TOKEN_FILE, Settings
from ondeck.spec.environments import load_environments
from ondeck.spec.loader import load_directory
from ondeck.store.store import Store
from ondeck.triggers import standard_webhooks
from ondeck.vault import Vault
from ondeck.worker_process import WorkerProcess

log = logging.getLogger(__name__)


@dataclass
class Node:
    """What runs here: ``run_worker`` executes runs in this process, ``embedded_worker``
    in a child process; ``run_services`` is the reaper and the callback sender;
    ``parent_fd`` makes this the child of a server, joined to it by that socket."""

    settings: Settings
    run_worker: bool = True
    load_automations: bool = True
    run_scheduler: bool = True
    worker_group: str | None = None
    worker_concurrency: int | None = None
    embedded_worker: bool = False
    run_services: bool = True
    parent_fd: int | None = None
    store: Store = field(init=False)
    vault: Vault = field(init=False)
    admission_policy: AdmissionPolicy = field(init=False)
    callback_secret: str = field(init=False)
    bus: WakeBus = field(init=False, default_factory=WakeBus)
    worker: Worker | None = field(init=False, default=None)
    _stop: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(init=False, default_factory=list)
    _listener: PostgresListener | None = field(init=False, default=None)
    _delivery_wake: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    _worker_processes: list[WorkerProcess] = field(init=False, default_factory=list)
    detached: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    """Set when the server this worker was started by is gone."""
    closing: bool = field(init=False, default=False)
    """Set when the server was told to stop: the HTTP server waits for open requests to
    end before the application's own shutdown, so what streams (live logs) ends itself."""

    def __post_init__(self) -> None:
        self.store = Store(self.settings.resolved_database_url)
        self.vault = Vault.open(self.settings.data_dir, self.settings.master_key)
        self.admission_policy = AdmissionPolicy(
            idempotency_ttl=self.settings.idempotency_ttl,
            global_rate_limit=limits.parse_global_limit(self.settings.rate_limit),
        )
        self.callback_secret = self.settings.callback_secret or _callback_secret(self.settings.data_dir)

    async def start(self) -> None:
        # Database work goes to ondeck.blocking's few threads; this caps the threads
        # Starlette itself may start, which also compete with the loop for the GIL.
        to_thread.current_default_thread_limiter().total_tokens = blocking.THREADS
        # Database threads give the GIL back to the event loop sooner, so a busy loop does not
        # stall every statement (and the SQLite write lock held around it) by 5 ms each time.
        sys.setswitchinterval(0.001)
        _watch_children_with_pidfds()
        self.bus.bind(asyncio.get_running_loop())
        self.store.subscribe(self.bus.from_thread)
        await blocking.run(self.store.upgrade)
        # Read the database's clock before any lease is written or judged, and tell the
        # operator at start if this host's is off.
        await blocking.run(self.store.sync_clock)
        if self.load_automations:
            await blocking.run(self._load_automations)
            token = await blocking.run(
                tokens.bootstrap, self.store, self.settings.data_dir, self.settings.admin_token
            )
            if token:
                # Printed, not logged: log lines are kept and shipped, this must not be.
                print(
                    f"\nondeck: first start. Admin token (shown once; also saved to "
                    f"{self.settings.data_dir / TOKEN_FILE}):\n\n    {token}\n",
                    file=sys.stderr,
                    flush=True,
                )
        if self.store.dialect == "postgresql":
            self._listener = PostgresListener(self.store.url, self.bus, self._channels())
            self._listener.start()
        if self.parent_fd is not None:
            relay = Relay(socket.socket(fileno=self.parent_fd), self.bus, on_closed=self.detached.set)
            relay.start(asyncio.get_running_loop())
            if self.store.dialect == "sqlite":
                self.store.subscribe(relay.send)
        if self.run_services:
            self._start_services()
        if self.run_scheduler:
            self._tasks.append(
                asyncio.create_task(scheduler.schedule_forever(self.store, self.admission_policy, self._stop))
            )
        if self.run_worker:
            self.worker = Worker(
                self.store,
                self.settings,
                self.bus,
                self.vault,
                group=self.worker_group,
                concurrency=self.worker_concurrency,
            )
            self._tasks.append(asyncio.create_task(self.worker.run(self._stop)))
        if self.embedded_worker:
            try:
                for _ in range(self.settings.worker_processes):
                    worker = WorkerProcess(self.store, self.bus, self.settings)
                    await worker.start()
                    self._worker_processes.append(worker)
            except BaseException:
                await self._stop_worker_processes()
                raise
        # A full collection walks every object alive, most of them modules, classes and
        # routes made at startup: under load that paused the loop for 50-160 ms at a time.
        # Frozen, they are never walked again; only what is made from now on is.
        gc.collect()
        gc.freeze()

    def _channels(self) -> set[str]:
        """The wake-ups something here waits on: a worker's, or the API's (a run's changes,
        for ``?wait=`` and live logs: a worker's process serves no API), and the callback
        sender's."""
        channels = set(WORKER_CHANNELS) if self.run_worker else {"run"}
        if self.run_services:
            channels.add("delivery")
        return channels

    def _start_services(self) -> None:
        reap_interval = min(5.0, max(0.5, self.settings.lease_seconds / 4))
        self._tasks.append(
            asyncio.create_task(
                reap_forever(self.store, self.settings.workspace_root, reap_interval, self._stop)
            )
        )
        self.bus.on_delivery(self._delivery_wake.set)
        self._tasks.append(
            asyncio.create_task(
                outbox.deliver_forever(
                    self.store,
                    self.callback_secret,
                    outbox.Destinations(self.settings.callback_allow),
                    self.settings.callback_retry_seconds,
                    self._delivery_wake,
                    self._stop,
                )
            )
        )

    def _load_automations(self) -> None:
        directory = self.settings.resolved_automations_dir()
        try:
            for environment in load_environments(directory):
                environments.put(self.store, SYSTEM, environment)
        except InvalidDefinition as exc:
            log.error("environments not loaded: %s", exc.detail)
        automations, problems = load_directory(directory)
        for problem in problems:
            log.error("automation not loaded: %s", problem)
        for automation in automations:
            applied = catalog.apply(self.store, automation)
            if applied.changed:
                log.info("loaded %s version %d", automation.name, applied.version.version)
        log.info("%d automations from %s", len(automations), directory)

    async def _stop_worker_processes(self) -> None:
        results = await asyncio.gather(
            *(worker.stop() for worker in self._worker_processes), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                log.error("stopping an embedded worker failed", exc_info=result)

    async def stop(self) -> None:
        await self._stop_worker_processes()
        self._stop.set()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._listener is not None:
            await blocking.run(self._listener.stop)
        self.store.dispose()


def _watch_children_with_pidfds() -> None:
    """Learn of exited run processes from pidfds in the event loop (Python 3.12 does so
    by default), not from a thread started per process, which cost 8-10% of the
    worker's CPU per trivial run."""
    if type(asyncio.get_running_loop()).__module__.startswith("uvloop"):
        return  # uvloop watches its children itself
    if sys.version_info >= (3, 12) or threading.current_thread() is not threading.main_thread():
        return  # the watcher is process-wide: only the CLI's main-thread loop sets it
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return  # a kernel before 5.3: keep asyncio's thread-based watcher
    watcher = asyncio.PidfdChildWatcher()
    watcher.attach_loop(asyncio.get_running_loop())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        asyncio.set_child_watcher(watcher)


def _callback_secret(data_dir: Path) -> str:
    """The key that signs outgoing callbacks: a 0600 file in the data dir, made on first use."""
    path = data_dir / "callback.secret"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as handle:
                handle.write(standard_webhooks.new_secret() + "\n")
    return path.read_text().strip()
