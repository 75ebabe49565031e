"""Reading runs and their logs, and cancelling them."""

from __future__ import annotations

import contextlib
import re
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from ondeck import storable
from ondeck.auth.principals import Permission, Principal
from ondeck.domain import AttemptRecord, LogEntry, Run, RunStatus, Transition, utcnow
from ondeck.engine import catalog, states
from ondeck.errors import Conflict, Forbidden, InvalidRequest, NotFound, UnloadableDefinition
from ondeck.ids import ID_PATTERN
from ondeck.spec.params import masked
from ondeck.store.store import RowBusy, Store, Transaction


@dataclass(frozen=True)
class RunDetail:
    run: Run
    transitions: list[Transition]
    attempts: list[AttemptRecord]


def get(store: Store, run_id: str, principal: Principal | None = None) -> Run:
    """The run; with ``principal``, only if it may see the run's automation."""
    with store.read() as tx:
        run = tx.get_run(run_id)
    if run is None:
        raise NotFound(f"run {run_id} does not exist")
    if principal is not None:
        _check_visible(store, principal, run)
    return run


def watch(store: Store, run_id: str, patience: float) -> Run:
    """The run, its changes and output announced from now on (``Transaction.watch_run``):
    for a waiter, which reads it again here, once that is committed. A run already
    watched, or finished, is only read: every change it made unannounced committed
    before the flag did. If its row stays locked for ``patience`` seconds, the run as it
    is, not watched (``Run.watched``): the waiter polls, or tries again."""
    run = get(store, run_id)
    if run.watched or run.status.terminal:
        return run
    with contextlib.suppress(RowBusy), store.transaction() as tx:
        tx.watch_run(run_id, patience)
    return get(store, run_id)


# Per store, each version's params schema, or None when it cannot be read: versions
# never change.
_schemas: weakref.WeakKeyDictionary[Store, dict[tuple[str, int], Mapping[str, Any] | None]] = (
    weakref.WeakKeyDictionary()
)


def schemas_known(store: Store, found: Sequence[Run]) -> bool:
    """Whether ``shown`` can show ``found`` without reading the store."""
    known = _schemas.get(store, {})
    return all((run.automation, run.version) in known for run in found)


def shown(store: Store, found: Sequence[Run]) -> list[Run]:
    """``found`` as the API shows runs: params the schema marks write-only (``writeOnly``
    or ``format: password``) masked, as in the audit log; the run keeps them to run with
    (and to rerun). Every param is masked when the run's version cannot be read."""
    known = _schemas.setdefault(store, {})
    missing = {(run.automation, run.version) for run in found} - known.keys()
    if missing:
        with store.read() as tx:
            for name, version in missing:
                stored = tx.automation_version(name, version)
                try:
                    known[name, version] = catalog.definition_of(stored).params_schema if stored else None
                except UnloadableDefinition:
                    known[name, version] = None
    return [_masked(run, known[run.automation, run.version]) for run in found]


def _masked(run: Run, schema: Mapping[str, Any] | None) -> Run:
    params = masked(schema, run.params)
    if not isinstance(params, dict):  # the params object itself is write-only
        params = masked(None, run.params)
    if run.outputs is not None and storable.nesting(run.outputs) > storable.DEPTH_MAX:
        # Stored by a release that took outputs of any depth; no answer can hold them.
        withheld = f"its outputs nest more than {storable.DEPTH_MAX} levels of objects and arrays: not shown"
        error = withheld if run.error is None else f"{run.error}; {withheld}"
        return replace(run, params=params, outputs=None, error=error)
    return run if params is run.params else replace(run, params=params)


def _check_visible(store: Store, principal: Principal, run: Run) -> None:
    names = catalog.visible_names(store, principal)
    if names is not None and run.automation not in names:
        raise Forbidden(f"{principal.describe()} may not see runs of {run.automation!r}")


def detail(store: Store, principal: Principal, run_id: str) -> RunDetail:
    run = get(store, run_id, principal)
    with store.read() as tx:
        return RunDetail(tx.get_run(run_id) or run, tx.transitions(run_id), tx.attempts(run_id))


def page(
    store: Store,
    principal: Principal,
    *,
    automation: str | None,
    statuses: list[str],
    before: str | None,
    limit: int,
) -> tuple[list[Run], str | None]:
    """One page of the runs ``principal`` may see, newest first, and the next cursor (None at the end)."""
    unknown = [s for s in statuses if s not in RunStatus.__members__.values()]
    if unknown:
        raise InvalidRequest(f"unknown status {', '.join(unknown)}; use one of {', '.join(RunStatus)}")
    if before is not None and not re.fullmatch(ID_PATTERN, before):
        raise InvalidRequest("cursor is not one a page gave: pass a page's next_cursor as it is")
    names = catalog.visible_names(store, principal)
    if names is not None and automation is not None and automation not in names:
        return [], None
    with store.read() as tx:
        found = tx.list_runs(
            automation=automation,
            statuses=statuses,
            before=before,
            limit=limit + 1,
            among=sorted(names) if names is not None and automation is None else None,
        )
    if len(found) > limit:
        return found[:limit], found[limit - 1].id
    return found, None


def logs(
    store: Store,
    run_id: str,
    *,
    after: int = 0,
    limit: int = 1000,
    attempt: int | None = None,
    principal: Principal | None = None,
) -> tuple[Run, list[LogEntry]]:
    """The run (read first, so a terminal status means every entry is visible) and its logs."""
    if principal is not None:
        get(store, run_id, principal)
    with store.read() as tx:
        run = tx.get_run(run_id)
        if run is None:
            raise NotFound(f"run {run_id} does not exist")
        return run, tx.logs_after(run_id, after, limit, attempt)


def cancel(store: Store, principal: Principal, run_id: str) -> Run:
    """Operators may cancel their own runs; admins any run."""
    now = utcnow()
    with store.transaction() as tx:
        run = tx.get_run(run_id, lock=True)
        if run is None:
            raise NotFound(f"run {run_id} does not exist")
        if not principal.is_admin and not (
            principal.can(Permission.TRIGGER) and run.principal == principal.name
        ):
            raise Forbidden(f"{principal.describe()} may cancel only runs it started")
        reason = f"cancelled by {principal.name}"
        tx.append_audit(principal.name, "run.cancel", f"run:{run_id}", {"status": str(run.status)}, now)
        if run.status.terminal:
            raise Conflict(f"run {run_id} has already finished ({run.status})", run_status=str(run.status))
        request_cancel(tx, run, now, reason)
        updated = tx.get_run(run_id)
    assert updated is not None
    return updated


def request_cancel(tx: Transaction, run: Run, now: datetime, reason: str) -> None:
    """Cancel at once if the run has not started; else ask its worker to stop it.

    ``run`` may be out of date, read without a lock (a claim may have started it since,
    or a retry queued it again): each step is a compare-and-set on the status read, and
    when one misses, the run is read again, locked, so the next one cannot.
    """
    while not run.status.terminal:
        if run.status == RunStatus.RUNNING:
            if run.cancel_requested:
                return
            if tx.request_cancel(run.id):
                tx.notify("cancel", run.id)
                return
        elif states.move(tx, run, RunStatus.CANCELLED, now, reason, finished_at=now, error=reason):
            return
        current = tx.get_run(run.id, lock=True)
        if current is None:
            return
        run = current


def deliveries(store: Store, principal: Principal, run_id: str) -> list[dict[str, Any]]:
    """The run's callbacks and notifications with their attempts, if ``principal`` may see the run."""
    get(store, run_id, principal)
    with store.read() as tx:
        return tx.deliveries_of(run_id)
