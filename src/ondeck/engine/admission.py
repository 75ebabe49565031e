"""``admit``: the one door every trigger goes through.

In order: the automation exists, the params fit its schema, the principal
may run it with these params in the selected environment; then, in one
transaction, idempotency, rate limits, the circuit breaker, the run row, its
concurrency rule, its approval gate, and the audit entry. Validation happens
before anything is written, so bad input never leaves a half-written run; a
refusal is audited in a transaction of its own.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from ondeck import storable
from ondeck.auth.policy import authorize_run
from ondeck.auth.principals import SYSTEM, Principal
from ondeck.domain import Run, RunStatus, utcnow
from ondeck.engine import approvals, catalog, environments, limits, outbox, states
from ondeck.engine.runs import request_cancel
from ondeck.errors import (
    ConcurrencyRejected,
    Conflict,
    IdempotencyMismatch,
    InvalidRequest,
    NotFound,
    OndeckError,
)
from ondeck.ids import new_id
from ondeck.masking import Masker
from ondeck.spec.expressions import ExpressionError, render
from ondeck.spec.models import NAME_PATTERN, Automation
from ondeck.spec.params import masked, sensitive_values, validate_params
from ondeck.store.store import IntegrityError, Store, Transaction

# Passes at most through admission when other processes keep applying new versions.
_CATALOG_TRIES = 3
IDEMPOTENCY_KEY_MAX = 255  # the store's column


@dataclass(frozen=True)
class TriggerRequest:
    automation: str
    params: dict[str, Any] = field(default_factory=dict)
    trigger: str = "api"
    idempotency_key: str | None = None
    rerun_of: str | None = None
    principal: Principal = SYSTEM
    callback_url: str | None = None
    schedule_fire: tuple[str, datetime] | None = None  # (schedule key, tick): fired once, ever
    watched: bool = False  # the caller waits for the run (see ``Transaction.watch_run``)


@dataclass(frozen=True)
class Admission:
    run: Run
    replayed: bool = False


@dataclass(frozen=True)
class AdmissionPolicy:
    idempotency_ttl: timedelta = timedelta(hours=24)
    global_rate_limit: tuple[int, float] | None = None  # (count, per seconds) per principal


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
    if not value or len(value) > IDEMPOTENCY_KEY_MAX or not value.isprintable() or not value.isascii():
        raise InvalidRequest(f"Idempotency-Key must be 1-{IDEMPOTENCY_KEY_MAX} printable ASCII characters")
    return value


def stored_idempotency_key(key: str) -> str:
    """``key`` as the store keeps it, in at most ``IDEMPOTENCY_KEY_MAX`` characters: a key
    derived from what a sender sent (an event's source and id, a delivery id) may be longer."""
    return storable.bounded(key, IDEMPOTENCY_KEY_MAX)


def _fingerprint(params: dict[str, Any]) -> str:
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def masked_params(automation: Automation | None, params: Any) -> Any:
    """Params for the audit log: values the schema marks writeOnly or format password are
    masked; all of them while the schema is not known."""
    if not isinstance(params, dict):
        return params
    return masked(automation.params_schema if automation is not None else None, params)


def admit(store: Store, request: TriggerRequest, policy: AdmissionPolicy | None = None) -> Admission:
    """Validate, authorise, de-duplicate and queue one run; raise a problem for bad input."""
    policy = policy or AdmissionPolicy()
    if not re.fullmatch(NAME_PATTERN, request.automation):
        # Refused unaudited: it names nothing, and the audit entry's target (the name) would
        # not fit the store when it is long (a 500 on PostgreSQL).
        raise NotFound(f"automation {request.automation!r} does not exist: no automation has such a name")
    automation: Automation | None = None
    try:
        if request.callback_url is not None:
            outbox.check_url(request.callback_url)
        # The version this process read last, without a read; the write checks that it is
        # still current (on PostgreSQL as of the commit: an apply committing alongside
        # may land just after, as it always could), and a refusal is only given once a
        # fresh read agrees. Otherwise the run is admitted again under the newer version.
        for _ in range(_CATALOG_TRIES):
            version = catalog.current(store, request.automation)
            try:
                automation = catalog.definition_of(version)
                found = _admit_version(store, request, policy, automation, version.version)
            except OndeckError:
                if catalog.still_current(store, version):
                    raise
                continue
            if found is not None:
                admission = found
                break
            catalog.forget(store, request.automation)
        else:
            raise Conflict(f"automation {request.automation!r} kept changing while the run was admitted")
    except OndeckError as refusal:
        if automation is not None:
            _unquote_secrets(refusal, automation, request.params)
        _audit_refusal(store, request, automation, refusal)
        raise
    if admission.run.status == RunStatus.REJECTED:
        raise ConcurrencyRejected(admission.run.error or "rejected", run_id=admission.run.id)
    return admission


def _unquote_secrets(refusal: OndeckError, automation: Automation, params: Any) -> None:
    """Mask in ``refusal`` what a write-only param holds: a refusal may quote a value
    rendered from params (an environment's name, say), as schema errors are masked."""
    masker = Masker(sensitive_values(automation.params_schema, params))
    if masker:
        refusal.detail = masker.text(refusal.detail)
        refusal.args = (refusal.detail,)


def _admit_version(
    store: Store, request: TriggerRequest, policy: AdmissionPolicy, automation: Automation, version: int
) -> Admission | None:
    """Admit under this version of the automation; None if it is no longer the current one."""
    params = validate_params(automation.params_schema, request.params)
    environment = environments.resolve(store, automation, params)
    authorize_run(request.principal, automation.name, automation.access, params, environment)
    hidden = sensitive_values(automation.params_schema, params)
    environment_name = environment.name if environment else None
    # Due at once in the store's time, which workers on other hosts judge it by.
    run = _new_run(request, automation, version, params, environment_name, hidden, store.now())
    approval = approvals.requirement(automation, environment, params, run.created_at)
    run = replace(run, approval=approval)
    fingerprint = _fingerprint(request.params)
    try:
        return _write(store, run, automation, fingerprint, policy, request)
    except IntegrityError:
        # A concurrent request with the same idempotency key won the insert race: this
        # second pass finds its run and answers with it.
        return _write(store, run, automation, fingerprint, policy, request)


def _new_run(
    request: TriggerRequest,
    automation: Automation,
    version: int,
    params: dict[str, Any],
    environment: str | None,
    hidden: list[str],
    due: datetime,
) -> Run:
    """The run as admitted. A concurrency key that holds a value of ``hidden`` (the
    write-only params) is kept as its digest: it is shown with the run, and still
    matches every run whose key is the same."""
    concurrency = automation.concurrency
    key = None
    if concurrency is not None:
        try:
            rendered = render(concurrency.key, {"params": params})
        except ExpressionError as exc:
            raise InvalidRequest(f"concurrency key: {exc}") from exc
        if any(value in rendered for value in hidden if value):
            rendered = "sha256:" + hashlib.sha256(rendered.encode()).hexdigest()
        key = f"{automation.name}:{rendered}"
    now = utcnow()
    return Run(
        id=new_id(),
        automation=automation.name,
        version=version,
        status=RunStatus.PENDING,
        params=params,
        max_attempts=automation.retries.attempts,
        worker_group=automation.worker_group,
        trigger=request.trigger,
        created_at=now,
        not_before=due,
        priority=automation.priority,
        concurrency_key=key,
        concurrency_limit=concurrency.limit if concurrency else None,
        idempotency_key=(
            stored_idempotency_key(request.idempotency_key) if request.idempotency_key is not None else None
        ),
        rerun_of=request.rerun_of,
        principal=request.principal.name,
        environment=environment,
        callback_url=request.callback_url,
        watched=request.watched,
    )


class _Superseded(Exception):
    """The version a run is admitted under is no longer the automation's current one."""


def _write(
    store: Store,
    run: Run,
    automation: Automation,
    fingerprint: str,
    policy: AdmissionPolicy,
    request: TriggerRequest,
) -> Admission | None:
    now = run.created_at
    try:
        with store.transaction() as tx:
            tx.require_version(run.automation, run.version, _Superseded())
            if run.idempotency_key is not None:
                found = tx.find_idempotency(run.automation, run.idempotency_key, now)
                if found is not None:
                    return _replay(tx, found, fingerprint)
                tx.save_idempotency(
                    run.automation,
                    run.idempotency_key,
                    fingerprint,
                    run.id,
                    now + policy.idempotency_ttl,
                    now,
                )
            status, reason = RunStatus.QUEUED, "admitted"
            if automation.concurrency is not None and run.concurrency_key is not None:
                status, reason = _apply_concurrency(
                    tx, run, automation.concurrency.policy, automation.concurrency.limit
                )
            if status == RunStatus.QUEUED and run.approval is not None:
                status, reason = (
                    RunStatus.WAITING_APPROVAL,
                    f"waiting for approval ({approvals.describe(run.approval)})",
                )
            extra: dict[str, Any] = (
                {"finished_at": now, "error": reason} if status == RunStatus.REJECTED else {}
            )
            # Pending only within this transaction: the run is written in the status decided.
            triggered = f"triggered via {run.trigger} by {run.principal}"
            admitted = states.admit(tx, run, status, triggered, reason, automation, **extra)
            if request.schedule_fire is not None:
                tx.insert_fire(*request.schedule_fire, run.id)
            if status == RunStatus.QUEUED:
                tx.notify("queue", run.worker_group)
            # Last, with the audit append: both lock a row (or the chain) that every admission
            # needs until commit, so taking them late keeps admissions from queueing on them
            # (on PostgreSQL both go with the commit). A refusal here, or from the commit,
            # rolls back everything above.
            _check_limits(tx, run, automation, policy)
            tx.append_audit(
                run.principal or "system",
                "run.triggered",
                f"run:{run.id}",
                {
                    "automation": run.automation,
                    "version": run.version,
                    "via": run.trigger,
                    "params": masked_params(automation, request.params),
                    "decision": str(status),
                    "reason": reason,
                },
                now,
            )
            return Admission(admitted)
    except _Superseded:
        return None


def _check_limits(tx: Transaction, run: Run, automation: Automation, policy: AdmissionPolicy) -> None:
    """The circuit breaker, then the rate limits. On PostgreSQL the rate limits are counted
    by the commit, after the breaker has had its say: so the breaker goes first on both
    backends, and a trigger refused by both gets the breaker's 503 on either."""
    now = run.created_at
    if automation.circuit_breaker is not None:
        limits.check_breaker(tx, automation.name, run.id, now)
    principal = run.principal or "system"
    if policy.global_rate_limit is not None:
        count, per = policy.global_rate_limit
        limits.check_rate(tx, f"*:{principal}", count, per, now, f"principal {principal}")
    rule = automation.rate_limit
    if rule is not None:
        if rule.scope == "principal":
            key, what = f"{automation.name}:{principal}", f"{automation.name!r} by {principal}"
        else:
            key, what = automation.name, f"{automation.name!r}"
        limits.check_rate(tx, key, rule.limit, rule.per, now, what)


def _audit_refusal(
    store: Store, request: TriggerRequest, automation: Automation | None, refusal: OndeckError
) -> None:
    with store.transaction() as tx:
        tx.append_audit(
            request.principal.name,
            "run.refused",
            f"automation:{request.automation}",
            {
                "via": request.trigger,
                "params": masked_params(automation, request.params),
                "status": refusal.status,
                "reason": refusal.detail,
            },
            utcnow(),
        )


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


def _apply_concurrency(tx: Transaction, run: Run, policy: str, limit: int) -> tuple[RunStatus, str]:
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


def purge_expired(store: Store) -> int:
    """Forget idempotency keys past their lifetime and rate windows older than a day."""
    now = utcnow()
    with store.transaction() as tx:
        tx.purge_counters(int(now.timestamp()) - 86400)
        return tx.purge_idempotency(now)
