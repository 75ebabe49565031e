"""One ondeck process: its store, wake-ups, and background loops (worker, reaper).

``ondeck server`` runs a Node inside the web app's lifespan; ``ondeck worker``
runs one on its own. Both share everything below.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from anyio import to_thread

from ondeck.engine import catalog
from ondeck.engine.wakeup import PostgresListener, WakeBus
from ondeck.engine.worker import Worker, reap_forever
from ondeck.settings import Settings
from ondeck.spec.loader import load_directory
from ondeck.store.store import Store

log = logging.getLogger(__name__)


@dataclass
class Node:
    settings: Settings
    run_worker: bool = True
    load_automations: bool = True
    worker_group: str | None = None
    worker_concurrency: int | None = None
    store: Store = field(init=False)
    bus: WakeBus = field(init=False, default_factory=WakeBus)
    worker: Worker | None = field(init=False, default=None)
    _stop: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(init=False, default_factory=list)
    _listener: PostgresListener | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.store = Store(self.settings.resolved_database_url)

    async def start(self) -> None:
        self.bus.bind(asyncio.get_running_loop())
        self.store.subscribe(self.bus.from_thread)
        await to_thread.run_sync(self.store.upgrade)
        if self.load_automations:
            await to_thread.run_sync(self._load_automations)
        if self.store.dialect == "postgresql":
            self._listener = PostgresListener(self.store.url, self.bus)
            self._listener.start()
        reap_interval = min(5.0, max(0.5, self.settings.lease_seconds / 4))
        self._tasks.append(asyncio.create_task(reap_forever(self.store, reap_interval, self._stop)))
        if self.run_worker:
            self.worker = Worker(
                self.store,
                self.settings,
                self.bus,
                group=self.worker_group,
                concurrency=self.worker_concurrency,
            )
            self._tasks.append(asyncio.create_task(self.worker.run(self._stop)))

    def _load_automations(self) -> None:
        directory = self.settings.resolved_automations_dir()
        automations, problems = load_directory(directory)
        for problem in problems:
            log.error("automation not loaded: %s", problem)
        for automation in automations:
            applied = catalog.apply(self.store, automation)
            if applied.changed:
                log.info("loaded %s version %d", automation.name, applied.version.version)
        log.info("%d automations from %s", len(automations), directory)

    async def stop(self) -> None:
        self._stop.set()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._listener is not None:
            await to_thread.run_sync(self._listener.stop)
        self.store.dispose()
