"""The worker loop: claim due runs, execute them, keep their leases, finish them."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import socket
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

from ondeck import blocking
from ondeck.domain import LogChunk, Outcome, RunStatus
from ondeck.durations import parse_duration, parse_size
from ondeck.engine import admission, approvals, finish, queue, secret_store
from ondeck.engine.queue import Claim, DefinitionCache
from ondeck.engine.wakeup import WakeBus
from ondeck.errors import OndeckError, UnloadableDefinition
from ondeck.ids import new_id
from ondeck.runner import isolation
from ondeck.runner.attempt import Attempt, Finished, Output, ResourceLimits
from ondeck.runner.process import python_unusable, run_attempt
from ondeck.runner.workspace import Workspace
from ondeck.settings import Settings
from ondeck.spec.expressions import ExpressionError, render
from ondeck.spec.params import sensitive_values
from ondeck.store import clock
from ondeck.store.store import Store
from ondeck.streaks import Failures
from ondeck.vault import Vault

log = logging.getLogger(__name__)
T = TypeVar("T")
_RESTART_SECONDS = 1.0  # before a failed heartbeat or fence watch is started again
_Guard = Callable[[], Awaitable[None]]
_FLUSH_SECONDS = 0.1
_FLUSH_BYTES = 512 * 1024
_FLUSH_RETRY_MAX_SECONDS = 2.0


def _stamped(function: Callable[..., T], *args: object) -> tuple[float, T]:
    """``function(*args)``, and when it began (``clock.elapsed``), read on the thread that
    runs it. A worker's calls take turns on one thread on PostgreSQL: a claim may wait
    behind a slow call, and a lease reckoned from when it was asked for would be short by
    that wait, its attempt stopped as lost at once if the wait was long."""
    since = clock.elapsed()
    return since, function(*args)


class _Active:
    """An attempt this worker is running: how to stop it, and until when its lease is
    known to hold.

    The worker stops the attempt itself once it has gone two thirds of a lease without
    renewing it (the store unreachable, say), and at once when a renewal or a write of
    its output finds the lease gone: by the time the lease lapses, the reaper may end the
    attempt and another worker start the run again, so the attempt must be over by then
    (the kill grace period is shorter than the third of the lease that is left).

    That moment, the fence, is reckoned on the clock leases are (``clock.elapsed``), which
    counts on while the host is suspended; the event loop's timers do not, so the worker
    checks the fences itself every ``step`` seconds (``Worker._watch_fences``) and each
    fence stands a step early.
    """

    def __init__(self, key: tuple[str, int], since: float, lease: float) -> None:
        self.key, self.lease = key, lease
        self.stop = asyncio.Event()
        self.lost = False  # the lease lapsed, or may have: the attempt is void
        self.cancelled = False  # a cancel was asked for
        self.ended = False  # only its end is left to write
        self.fence = math.inf
        self.renewed(since)

    @staticmethod
    def step(lease: float) -> float:
        """How often the fences of attempts under ``lease`` are checked."""
        return min(1.0, lease / 30)

    def renewed(self, since: float) -> None:
        """The lease holds for a lease from ``since`` (``clock.elapsed``, taken before the
        write that set it). A fence that has passed stays passed: the attempt is void."""
        if not (self.lost or self.ended):
            self.fence = since + 2 * self.lease / 3 - self.step(self.lease)

    def check_fence(self, now: float) -> None:
        if now >= self.fence:
            self.lose("it could not be renewed")

    def cancel(self) -> None:
        self.cancelled = True
        self.stop.set()

    def lose(self, why: str) -> None:
        if not self.lost:
            log.warning("run %s attempt %d: stopping it, its lease is lost: %s", *self.key, why)
        self.lost = True
        self.stop.set()

    def cancel_fence(self) -> None:
        """The attempt is over: only its end is left to write."""
        self.ended = True
        self.fence = math.inf


class _LogBuffer:
    """Output waiting to be written; flushed on a timer so live viewers see it promptly."""

    def __init__(self, worker: Worker, claim: Claim, active: _Active) -> None:
        self._worker, self._claim, self._active = worker, claim, active
        self._chunks: list[LogChunk] = []
        self._size = 0
        self._lock = asyncio.Lock()
        self._failures = Failures(log, f"run {claim.run.id}: writing its output", logging.WARNING)

    @property
    def full(self) -> bool:
        return self._size >= _FLUSH_BYTES

    def add(self, chunk: LogChunk) -> None:
        self._chunks.append(chunk)
        self._size += len(chunk.text)

    async def flush(self) -> None:
        async with self._lock:
            if not self._chunks:
                return
            batch, self._chunks, self._size = self._chunks, [], 0
            try:
                written = await self._worker.call(finish.append_logs, self._worker.store, self._claim, batch)
            except Exception:
                # Not written (say, the database was unreachable): keep the chunks, in order,
                # for the next flush or for ``finish``.
                self._chunks[:0] = batch
                self._size += sum(len(c.text) for c in batch)
                raise
            if not written:
                self._active.lose("another process owns the run now")

    async def flush_patiently(self, stop: asyncio.Event, until: float = math.inf) -> None:
        """Flush; while that fails (the database unreachable, say), keep the output and try
        again, less and less often, until it is written, ``stop`` is set or the event loop's
        clock reaches ``until`` (then the output goes with the attempt's end). Meanwhile the
        program blocks on its pipes once they fill: it is slowed down, not failed, by a
        store outage."""
        loop = asyncio.get_running_loop()
        delay = _FLUSH_SECONDS
        while not stop.is_set() and loop.time() < until:
            try:
                await self.flush()
            except Exception:
                self._failures.failed()
            else:
                self._failures.succeeded()
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), min(delay, max(0.0, until - loop.time())))
            delay = min(2 * delay, _FLUSH_RETRY_MAX_SECONDS)

    async def flush_periodically(self, done: asyncio.Event) -> None:
        """Flush every so often until ``done``; never cancelled mid-write, so nothing is dropped."""
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), _FLUSH_SECONDS)
            if not done.is_set():
                await self.flush_patiently(done)

    async def take_rest(self) -> list[LogChunk]:
        async with self._lock:
            batch, self._chunks, self._size = self._chunks, [], 0
            return batch


class Worker:
    def __init__(
        self,
        store: Store,
        settings: Settings,
        bus: WakeBus,
        vault: Vault,
        *,
        group: str | None = None,
        concurrency: int | None = None,
    ) -> None:
        self.store, self.settings, self.bus, self.vault = store, settings, bus, vault
        # How the worker makes its database calls. SQLite's take a fraction of a millisecond
        # of CPU, less than handing them to a thread: the hand-over and the interpreter lock
        # passing back and forth between the threads at each statement cost about 50 context
        # switches and a third of the worker's CPU per run. So on SQLite they run on the event
        # loop, which only has the worker's own attempts to keep: while one waits for the
        # write lock, those attempts wait too, as they would for the database anyway.
        # PostgreSQL's wait a round trip per statement, which the loop must not: they go to
        # one thread of their own, one at a time. Spread over the shared pool's four, they
        # cost a twentieth more of the machine's CPU per run, in the interpreter lock passing
        # between the threads, than one at a time. Lease renewals keep to the shared pool,
        # so a call that hangs (a connection gone silent) does not hold them up.
        self.call = blocking.inline if store.dialect == "sqlite" else blocking.Serial("ondeck-worker-db").run
        self.group = group or settings.worker_group
        self.concurrency = concurrency or settings.worker_concurrency
        self.id = f"{socket.gethostname()}:{os.getpid()}:{new_id()[-6:]}"
        self.lease = timedelta(seconds=settings.lease_seconds)
        self._definitions = DefinitionCache()
        self.isolation = isolation.best() if settings.isolate else isolation.GROUP
        # The data directory holds the database, the master key and the admin token; a
        # SQLite file configured elsewhere holds run params, write-only ones included.
        directories = [settings.data_dir, settings.workspace_root]
        if store.file is not None and not store.file.resolve().is_relative_to(settings.data_dir.resolve()):
            elsewhere = isolation.database_directory(store.file)
            directories += [elsewhere] if elsewhere is not None else []
        self._hidden = isolation.hidden(*directories)
        self._run_as = isolation.script_user(settings.script_user) if settings.script_user else None
        script_uid = self._run_as[0] if self._run_as else os.geteuid()
        unusable = python_unusable(self.isolation, self._run_as) if self._run_as else None
        if unusable is not None:
            log.warning(
                "python automations cannot start as the script user %s (%s): install ondeck and "
                "its Python where that user can read them",
                settings.script_user,
                unusable,
            )
        if self._hidden and self.isolation != isolation.LAUNCHER:
            # Whatever the scripts' user: the workspaces are all that user's, and a SQLite
            # database is as readable as its umask made it.
            log.warning(
                "scripts may read what is in %s (ondeck's keys, a SQLite database, other runs' "
                "workspaces) as far as file permissions let their user: only runs started "
                "through ondeck-launch have it hidden (isolation here: %s)",
                ", ".join(map(str, self._hidden)),
                self.isolation,
            )
        if self._hidden and script_uid == 0:
            # Root keeps its capabilities in the script's namespaces: it may unmount the
            # cover, or read the disk itself. Only a user without them is kept out.
            log.warning(
                "scripts run as root and can undo the hiding of ondeck's data: set ONDECK_SCRIPT_USER"
            )
        self._default_timeout = parse_duration(settings.default_timeout)
        self._default_limits = ResourceLimits(
            memory_bytes=parse_size(settings.limit_memory),
            cpu_seconds=int(parse_duration(settings.limit_cpu)),
            processes=settings.limit_processes,
            file_size_bytes=parse_size(settings.limit_file_size),
        )
        self._active: dict[tuple[str, int], _Active] = {}  # by (run id, attempt)
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        # Whether due runs may be waiting: then an attempt that ends claims the next run for
        # its slot in the same transaction (``_finish_and_claim``).
        self._backlog = False
        # Wake-ups that came while every slot was busy (see ``_claim`` and ``_record``).
        self._woken_while_full = 0
        self._claim_failures = Failures(log, "claiming runs")
        self._renewal_failures = Failures(log, "renewing leases")
        self._clock_failures = Failures(
            log, "reading the database's clock (the last reading serves)", logging.WARNING
        )
        bus.on_cancel(self._cancel)

    def _cancel(self, run_id: str) -> None:
        for (active_id, _), active in self._active.items():
            if active_id == run_id:
                active.cancel()

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and execute until ``stop`` is set; then stop in-flight attempts."""
        # Started again after a failure, the heartbeat renews at once: the last renewal may
        # be a period old.
        again = functools.partial(self._heartbeat, 0.0)
        heartbeat = asyncio.create_task(self._keep("heartbeat", self._heartbeat, again))
        fences = asyncio.create_task(self._keep("fence watch", self._watch_fences))
        log.info(
            "worker %s started (group %s, concurrency %d, isolation: %s)",
            self.id,
            self.group,
            self.concurrency,
            self.isolation,
        )
        try:
            while not stop.is_set():
                with self.bus.watch_queue() as woken:
                    if await self._claim() and len(self._active) < self.concurrency:
                        continue  # more may be due right now
                    # Otherwise every due run was seen: one admitted meanwhile has fired `woken`.
                    waiter = asyncio.create_task(woken.wait(self.settings.poll_seconds))
                    stopped = asyncio.create_task(stop.wait())
                    await asyncio.wait({waiter, stopped}, return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
                    stopped.cancel()
        finally:
            self._stopping = True
            for active in self._active.values():
                active.stop.set()
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=self.settings.kill_grace_seconds + 10)
            heartbeat.cancel()
            fences.cancel()
            log.info("worker %s stopped", self.id)

    async def _claim(self) -> bool:
        """Claim and start due runs for the free slots; True if more may be due."""
        free = self.concurrency - len(self._active)
        if free <= 0:
            # Woken while every slot is busy: a run may be due, so the next attempt to end
            # claims for its slot (``_finish_and_claim``).
            self._backlog = True
            self._woken_while_full += 1
            return False
        try:
            since, (claims, more) = await self.call(
                _stamped, queue.claim, self.store, self.id, self.group, free, self.lease, self._definitions
            )
        except Exception:
            self._claim_failures.failed()
            return False
        self._claim_failures.succeeded()
        # Every free slot filled, or not every due run seen: more may be waiting.
        self._backlog = more or (bool(claims) and len(claims) == free)
        self._start(claims, since)
        return bool(claims) and more  # claiming nothing again at once would spin

    def _start(self, claims: list[Claim], since: float) -> None:
        """Run ``claims``, whose leases were taken by a write begun at ``since``."""
        for claim in claims:
            key = (claim.run.id, claim.run.attempt)
            self._active[key] = _Active(key, since, self.lease.total_seconds())
            task = asyncio.create_task(self._execute(claim))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _keep(self, name: str, guard: _Guard, again: _Guard | None = None) -> None:
        """Run ``guard`` (the heartbeat, the fence watch) as long as the worker runs: they keep
        attempts from outliving their leases, so one that fails (a bug) is logged and started
        again, by ``again`` if given, rather than left dead unseen."""
        start = guard
        while True:
            try:
                await start()
            except Exception:
                log.critical("the worker's %s failed; starting it again", name, exc_info=True)
            await asyncio.sleep(_RESTART_SECONDS)  # one failing at once must not spin
            start = again or guard

    async def _watch_fences(self) -> None:
        """Stop the attempts whose fence has passed (see ``_Active``). A task of its own:
        the heartbeat may wait on an unreachable store for longer than a fence leaves."""
        lease = self.lease.total_seconds()
        while True:
            await asyncio.sleep(_Active.step(lease))
            self._check_fences()

    def _check_fences(self) -> None:
        now = clock.elapsed()
        for active in list(self._active.values()):
            active.check_fence(now)

    async def _sleep(self, seconds: float) -> None:
        """Sleep ``seconds`` by the lease clock: a suspend of the host counts (see ``_Active``)."""
        until = clock.elapsed() + seconds
        while (left := until - clock.elapsed()) > 0:
            await asyncio.sleep(min(left, _Active.step(self.lease.total_seconds())))

    async def _heartbeat(self, delay: float | None = None) -> None:
        """Renew the leases every third of a lease, and soon again after a renewal failed;
        stop the attempts whose lease is gone (see ``_Active``), and those asked to cancel.
        The beats keep to the lease clock, so the first after a suspend comes at once.
        Each beat, busy or idle, reads the store's clock again, which claims and renewals
        write leases in (``Store.now``).

        The renewal runs on a thread even on SQLite, where it could wait for the write
        lock as long as the busy timeout: the event loop must stay free meanwhile, so an
        attempt's lease running out can stop it. The first beat comes after ``delay``
        seconds, a period if None.
        """
        period = self.lease.total_seconds() / 3
        delay = period if delay is None else delay
        while True:
            await self._sleep(delay)
            try:
                await blocking.run(self.store.sync_clock)  # with the renewals (see ``__init__``)
            except Exception:
                self._clock_failures.failed()
            else:
                self._clock_failures.succeeded()
            # A fence passed while the host was suspended stops its attempt before any
            # renewal could revive it, whichever of this and ``_watch_fences`` wakes first.
            self._check_fences()
            held = {key: active for key, active in self._active.items() if not active.lost}
            if not held:
                delay = period
                continue
            since = clock.elapsed()
            try:
                renewed = await blocking.run(queue.renew_leases, self.store, self.id, self.lease, list(held))
            except Exception:
                self._renewal_failures.failed()
                delay = period / 4  # a few tries before two thirds of a lease have passed
                continue
            self._renewal_failures.succeeded()
            delay = max(0.0, period - (clock.elapsed() - since))
            for key, active in held.items():
                if self._active.get(key) is not active:
                    continue  # ended meanwhile
                if key not in renewed:
                    active.lose("the renewal found it gone")
                    continue
                active.renewed(since)
                if renewed[key]:
                    active.cancel()

    def attempt_for(self, claim: Claim, secrets: dict[str, str]) -> Attempt:
        """Translate a claimed run into the runner's terms (limits, args, budget)."""
        automation, run, settings = claim.automation, claim.run, self.settings
        context = {"params": run.params, "run": {"id": run.id, "attempt": run.attempt}}
        limits, defaults = automation.limits, self._default_limits
        return Attempt(
            run_id=run.id,
            number=run.attempt,
            runtime=automation.run.runtime,
            script=automation.run.script,
            args=[render(arg, context) for arg in automation.run.args],
            entrypoint=automation.run.entrypoint,
            params=run.params,
            timeout=automation.timeout or self._default_timeout,
            limits=ResourceLimits(
                memory_bytes=limits.memory or defaults.memory_bytes,
                cpu_seconds=int(limits.cpu or defaults.cpu_seconds),
                processes=limits.processes or defaults.processes,
                file_size_bytes=limits.file_size or defaults.file_size_bytes,
            ),
            log_budget=settings.log_cap_bytes - run.log_bytes,
            workspace_root=settings.workspace_root,
            kill_grace=settings.kill_grace_seconds,
            extra_env=secrets,
            # Secrets, and the params the schema marks writeOnly or format password.
            redact=(*secrets.values(), *sensitive_values(automation.params_schema, run.params)),
            isolation=self.isolation,
            hidden=self._hidden,
            run_as=self._run_as,
        )

    async def _execute(self, claim: Claim) -> None:
        run_id = claim.run.id
        active = self._active[run_id, claim.run.attempt]
        buffer = _LogBuffer(self, claim, active)
        output_done = asyncio.Event()
        flusher: asyncio.Task[None] | None = None  # from the first output on: most runs print little
        outcome = Outcome(RunStatus.FAILED, None, "the attempt ended without a result")
        try:
            secrets = (
                await self.call(
                    secret_store.resolve,
                    self.store,
                    self.vault,
                    claim.automation.secrets,
                    claim.automation.name,
                    claim.run.environment,
                )
                if claim.automation.secrets
                else {}
            )
            attempt = self.attempt_for(claim, secrets)
            # Past this, the attempt has been timed out and killed: output it could not write
            # waits for its end, rather than hold it up.
            patience = asyncio.get_running_loop().time() + attempt.timeout + attempt.kill_grace + 1
            async with contextlib.aclosing(run_attempt(attempt, active.stop)) as events:
                async for event in events:
                    if isinstance(event, Output):
                        buffer.add(event.chunk)
                        if flusher is None:
                            flusher = asyncio.create_task(buffer.flush_periodically(output_done))
                        if buffer.full:
                            await buffer.flush_patiently(active.stop, patience)
                    elif isinstance(event, Finished):
                        outcome = event.outcome
        except ExpressionError as exc:
            outcome = Outcome(RunStatus.FAILED, None, f"run.args: {exc}")
        except OndeckError as exc:
            outcome = Outcome(RunStatus.FAILED, None, exc.detail)
        except Exception as exc:
            log.exception("run %s: the runner failed", run_id)
            outcome = Outcome(RunStatus.FAILED, None, f"runner error: {type(exc).__name__}: {exc}")
        finally:
            output_done.set()
            if flusher is not None:
                await asyncio.wait({flusher})
        active.cancel_fence()
        if outcome.status == RunStatus.CANCELLED and not active.cancelled:  # stopped by this worker
            if active.lost:
                # Recorded only if the lease held after all (the store was unreachable for a
                # while); then the run may be retried, as when the reaper ends a lost attempt.
                outcome = Outcome(
                    RunStatus.FAILED, outcome.exit_code, f"worker {self.id} lost the run's lease"
                )
            elif self._stopping:
                outcome = Outcome(RunStatus.FAILED, outcome.exit_code, "worker shut down during the attempt")
        following: list[Claim] = []
        since = 0.0  # no claim, no lease
        try:
            following, since = await self._record(claim, outcome, await buffer.take_rest())
        finally:
            del self._active[active.key]
            if following and self._stopping:  # the worker began to stop meanwhile
                await self._hand_back(following)
            else:
                self._start(following, since)
            if self._backlog and not following:  # a run may be due and its end did not claim
                self.bus.publish("queue", self.group)

    async def _record(
        self, claim: Claim, outcome: Outcome, chunks: list[LogChunk]
    ) -> tuple[list[Claim], float]:
        """Write the attempt's end (see ``_finish_and_claim`` for what it claims), retrying
        for half a lease from the first failure while the store fails. If it never lands,
        the lease lapses and the reaper ends the attempt as lost, and may retry a run that
        in fact succeeded: so a short outage of the store must not get that far. Returns
        the runs claimed, and when the write that took their leases began."""
        deadline = math.inf
        delay = 0.05
        failures = Failures(log, f"run {claim.run.id}: recording the result", logging.WARNING)
        while True:
            try:
                if self._backlog and not self._stopping:
                    seen = self._woken_while_full
                    since, claimed = await self.call(_stamped, self._finish_and_claim, claim, outcome, chunks)
                    following, more = claimed if claimed is not None else ([], True)
                    # A run may still be due if the claim failed or met a run it left, or
                    # if a wake-up came while every slot was busy during the write: the
                    # claim may have read the queue before that run was there. Then the
                    # end wakes the loop (``_execute``).
                    self._backlog = more or self._woken_while_full != seen
                else:
                    await self.call(finish.finish, self.store, claim, outcome, chunks)
                    following, since = [], 0.0
            except Exception:
                now = clock.elapsed()
                deadline = min(deadline, now + self.lease.total_seconds() / 2)
                if now + delay > deadline:
                    log.exception("run %s: recording the result failed; the reaper will end it", claim.run.id)
                    return [], 0.0
                failures.failed()
            else:
                failures.succeeded()
                return following, since
            await asyncio.sleep(delay)
            delay = min(2 * delay, 2.0)

    def _finish_and_claim(
        self, claim: Claim, outcome: Outcome, chunks: list[LogChunk]
    ) -> tuple[list[Claim], bool] | None:
        """``finish.finish``, and claim a due run for the freed slot in the same transaction:
        the claim, and whether a due run was seen (claimed or not); None if the claim
        failed (the end is recorded all the same, or found lost like ``finish.finish``).

        Under a backlog this halves the worker's write transactions: each run is claimed
        by the commit that ends the one before it in that slot. The claim reads just the
        run it takes; if it cannot take it, the main loop claims with a wider look. It
        cannot undo the finish: if the transaction fails, the end is written again alone
        (a savepoint around the claim would cost two round trips a run on PostgreSQL,
        to spare a second transaction when a claim fails, which it should not). If the
        end turns out to be written already, the transaction may have committed and only
        its answer been lost: then the runs it claimed that are still leased to this
        worker are its to run (else their leases would lapse, and each be ended as lost
        without having run).

        When the end is one write (``finish.stands_alone``), the two need no transaction:
        the end commits alone, as does the claim, whose one statement starts a run without
        a concurrency key (``Transaction.start_queued``; for one with a key the main loop
        claims). On PostgreSQL that is two round trips instead of four. If the claim's
        answer is lost, the run it may have started is found by its lease.
        """
        claimed: tuple[list[Claim], bool] | None = None
        alone = self.store.dialect == "postgresql" and finish.stands_alone(claim, outcome, chunks)
        until = self.store.now() + self.lease
        try:
            with self.store.transaction(alone=alone) as tx:
                finish.finish_in(tx, claim, outcome, chunks)
                claimed = queue.claim_in(tx, self.id, self.group, 1, until, self._definitions, spare=0)
            return claimed
        except UnloadableDefinition:
            pass  # of the run the claim started: ``claimed_until`` fails it
        except Exception:
            log.exception("ending run %s and claiming the next run failed; ending it alone", claim.run.id)
        # If this fails too, ``_record`` writes the end again (and any run claimed with it
        # that did commit is the reaper's once its lease lapses).
        if finish.finish(self.store, claim, outcome, chunks):
            return None
        if claimed is not None:
            return queue.still_held(self.store, claimed[0], self.lease), True
        if alone:  # the claim's statement may have committed (its answer lost, or its run unloadable)
            try:
                found = queue.claimed_until(self.store, self.id, until, self.lease, self._definitions)
                # Not one this worker runs already, should a renewal have set its lease to the same instant.
                return [c for c in found if (c.run.id, c.run.attempt) not in self._active], True
            except Exception:
                log.exception("looking for the run a failed claim took failed; the reaper ends it if so")
        return None

    async def _hand_back(self, claims: list[Claim]) -> None:
        try:
            reason = f"handed back: worker {self.id} stopping"
            await self.call(finish.hand_back, self.store, claims, reason)
        except Exception:
            # Their leases lapse and the reaper ends or retries them.
            log.exception("handing back runs %s failed", ", ".join(c.run.id for c in claims))


async def reap_forever(store: Store, workspaces: Path, interval: float, stop: asyncio.Event) -> None:
    """End attempts whose leases lapsed, expire approvals, purge expired idempotency keys.

    A lost attempt's workspace is removed too when it is on this host (its
    processes already died with their worker: see runner.isolation).
    """
    failures = Failures(log, "reaping")
    while not stop.is_set():
        try:
            reaped = await blocking.run(finish.reap_expired_leases, store)
            if reaped:
                log.warning("reaped runs with lapsed leases: %s", ", ".join(run_id for run_id, _ in reaped))
            for run_id, attempt in reaped:
                await blocking.run(Workspace.remove_abandoned, workspaces, run_id, attempt)
            await blocking.run(admission.purge_expired, store)
            expired = await blocking.run(approvals.expire, store)
            if expired:
                log.info("approvals expired for runs: %s", ", ".join(expired))
        except Exception:
            failures.failed()
        else:
            failures.succeeded()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
