"""``admit``: the one door every trigger goes through.

Validation happens before anything is written, so bad input never leaves a
half-written run. Everything that is written — the run, its transitions, its
idempotency key, the cancellation of runs it displaces — is written in one
transaction.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

from ondeck.domain import Run, RunStatus, utcnow
from ondeck.engine import catalog, states
from ondeck.engine.runs import request_cancel
from ondeck.errors import ConcurrencyRejected, IdempotencyMismatch, InvalidRequest, NotFound
from ondeck.ids import new_id
from ondeck.spec.expressions import ExpressionError, render
from ondeck.spec.params import validate_params
from ondeck.store.store import IntegrityError, Store, Transaction


@dataclass(frozen=True)
class TriggerRequest:
    automation: str
    params: dict[str, Any] = field(default_factory=dict)
    trigger: str = "api"
    idempotency_key: str | None = None
    rerun_of: str | None = None


@dataclass(frozen=True)
class Admission:
    run: Run
    replayed: bool = False


@dataclass(frozen=True)
class AdmissionPolicy:
    idempotency_ttl: timedelta = timedelta(hours=24)


def parse_idempotency_key(header: str) -> str:
    """The key from an ``Idempotency-Key`` header: a structured-field string or bare text."""
    value = header.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        inner, out, escaped = value[1:-1], [], False
        for char in inner:
            if escaped:
                out.append(char)
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                raise InvalidRequest("Idempotency-Key has an unescaped quote inside the string")
            else:
                out.append(char)
        value = "".join(out)
    if not value or len(value) > 255 or not value.isprintable() or not value.isascii():
        raise InvalidRequest("Idempotency-Key must be 1-255 printable ASCII characters")
    return value


def _fingerprint(params: dict[str, Any]) -> str:
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def admit(store: Store, request: TriggerRequest, policy: AdmissionPolicy | None = None) -> Admission:
    """Validate, de-duplicate and queue one run; raise a problem for bad input."""
    policy = policy or AdmissionPolicy()
    version = catalog.get(store, request.automation)
    automation = catalog.definition_of(version)
    params = validate_params(automation.params_schema, request.params)
    concurrency = automation.concurrency
    key = None
    if concurrency is not None:
        try:
            key = f"{automation.name}:{render(concurrency.key, {'params': params})}"
        except ExpressionError as exc:
            raise InvalidRequest(f"concurrency key: {exc}") from exc
    now = utcnow()
    run = Run(
        id=new_id(),
        automation=automation.name,
        version=version.version,
        status=RunStatus.PENDING,
        params=params,
        max_attempts=automation.retries.attempts,
        worker_group=automation.worker_group,
        trigger=request.trigger,
        created_at=now,
        not_before=now,
        priority=automation.priority,
        concurrency_key=key,
        concurrency_limit=concurrency.limit if concurrency else None,
        idempotency_key=request.idempotency_key,
        rerun_of=request.rerun_of,
    )
    fingerprint = _fingerprint(request.params)
    # A concurrent request with the same idempotency key can win the insert race;
    # the second pass then finds its run and answers with it.
    limits = (concurrency.policy, concurrency.limit) if concurrency else None
    for last_try in (False, True):
        try:
            admission = _write(store, run, fingerprint, policy, limits)
            break
        except IntegrityError:
            if last_try:
                raise
    if admission.run.status == RunStatus.REJECTED:
        raise ConcurrencyRejected(admission.run.error or "rejected", run_id=admission.run.id)
    return admission


def _write(
    store: Store,
    run: Run,
    fingerprint: str,
    policy: AdmissionPolicy,
    concurrency: tuple[str, int] | None,
) -> Admission:
    now = run.created_at
    with store.transaction() as tx:
        if run.idempotency_key is not None:
            found = tx.find_idempotency(run.automation, run.idempotency_key, now)
            if found is not None:
                return _replay(tx, found, fingerprint)
            tx.save_idempotency(
                run.automation, run.idempotency_key, fingerprint, run.id, now + policy.idempotency_ttl, now
            )
        tx.insert_run(run, f"triggered via {run.trigger}")
        status, reason = RunStatus.QUEUED, "admitted"
        if concurrency is not None and run.concurrency_key is not None:
            status, reason = _apply_concurrency(tx, run, concurrency)
        states.check(RunStatus.PENDING, status)
        extra: dict[str, Any] = {"finished_at": now, "error": reason} if status == RunStatus.REJECTED else {}
        tx.move_run(run.id, RunStatus.PENDING, status, now, reason, **extra)
        if status == RunStatus.QUEUED:
            tx.notify("queue", run.worker_group)
        return Admission(replace(run, status=status, **extra))


def _replay(tx: Transaction, found: tuple[str, str], fingerprint: str) -> Admission:
    stored_fingerprint, run_id = found
    if stored_fingerprint != fingerprint:
        raise IdempotencyMismatch(
            "this Idempotency-Key was already used with different params; use a new key",
            run_id=run_id,
        )
    existing = tx.get_run(run_id)
    if existing is None:
        raise NotFound(f"run {run_id} recorded for this Idempotency-Key no longer exists")
    return Admission(existing, replayed=True)


def _apply_concurrency(tx: Transaction, run: Run, concurrency: tuple[str, int]) -> tuple[RunStatus, str]:
    policy, limit = concurrency
    key = run.concurrency_key
    assert key is not None
    tx.lock_concurrency_key(key)
    others = [r for r in tx.active_runs_with_key(key) if r.id != run.id]
    if policy == "reject" and len(others) >= limit:
        return RunStatus.REJECTED, (
            f"concurrency limit {limit} reached for key {key!r} "
            f"(active: {', '.join(r.id for r in others)}); policy is reject"
        )
    if policy == "cancel_running":
        for other in others:
            request_cancel(tx, other, run.created_at, f"superseded by run {run.id} (policy cancel_running)")
    return RunStatus.QUEUED, "admitted"


def purge_expired_keys(store: Store) -> int:
    """Forget idempotency keys past their published lifetime."""
    with store.transaction() as tx:
        return tx.purge_idempotency(utcnow())
