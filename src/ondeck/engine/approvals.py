"""Approval gates: which runs need them, recording decisions, and expiry.

A run may be under several approval policies at once (its environment's
protection rule, and its automation's own rule when that rule's condition
holds); it is queued only when every policy has enough distinct approvers.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from ondeck.auth.principals import Permission, Principal
from ondeck.domain import Decision, Run, RunStatus, utcnow
from ondeck.engine import states
from ondeck.errors import Conflict, Forbidden, InvalidRequest, NotFound
from ondeck.spec.environments import Environment
from ondeck.spec.expressions import evaluate
from ondeck.spec.models import Automation
from ondeck.store.store import Store, Transaction


def requirement(
    automation: Automation, environment: Environment | None, params: dict[str, Any], now: datetime
) -> dict[str, Any] | None:
    """The approval state a new run starts with, or None if it needs no approval."""
    policies: list[dict[str, Any]] = []
    timeouts: list[float] = []
    if environment is not None and environment.protection is not None:
        rule = environment.protection
        policies.append(
            _policy(
                f"environment {environment.name}", rule.approvers, rule.required, rule.allow_self_approval
            )
        )
        timeouts.append(rule.timeout)
    own = automation.approval
    if own is not None and evaluate(own.when, {"params": params}):
        policies.append(
            _policy(f"automation {automation.name}", own.approvers, own.required, own.allow_self_approval)
        )
        timeouts.append(own.timeout)
    if not policies:
        return None
    return {"policies": policies, "expires_at": (now + timedelta(seconds=min(timeouts))).isoformat()}


def _policy(source: str, approvers: list[str], required: int, allow_self: bool) -> dict[str, Any]:
    return {
        "source": source,
        "approvers": list(approvers),
        "required": required,
        "allow_self_approval": allow_self,
        "approved_by": [],
    }


def describe(approval: dict[str, Any]) -> str:
    return "; ".join(
        f"{p['source']}: {p['required']} of {', '.join(p['approvers'])}" for p in approval["policies"]
    )


def decide(store: Store, principal: Principal, run_id: str, approve: bool, comment: str) -> Run:
    """Record one approver's decision; queue or reject the run when it is settled."""
    if len(comment) > 2000:
        raise InvalidRequest("a comment is at most 2000 characters")
    if not principal.can(Permission.APPROVE):
        raise Forbidden(f"{principal.describe()} may not decide approvals")
    now = utcnow()
    with store.transaction() as tx:
        run = tx.get_run(run_id, lock=True)
        if run is None:
            raise NotFound(f"run {run_id} does not exist")
        if run.status != RunStatus.WAITING_APPROVAL or run.approval is None:
            raise Conflict(f"run {run_id} is not waiting for approval (it is {run.status})")
        policies = run.approval["policies"]
        mine = [
            p for p in policies if principal.is_admin or any(principal.matches(a) for a in p["approvers"])
        ]
        if not mine:
            raise Forbidden(
                f"{principal.describe()} is not an approver of this run ({describe(run.approval)})"
            )
        if principal.name == run.principal and not all(p["allow_self_approval"] for p in mine):
            raise Forbidden("you requested this run, so someone else must approve it")
        if any(d.approver == principal.name for d in tx.decisions(run_id)):
            raise Conflict(f"{principal.name} has already decided on run {run_id}")
        verdict = "approve" if approve else "reject"
        tx.insert_decision(run_id, Decision(principal.name, verdict, comment, now))
        tx.append_audit(principal.name, f"approval.{verdict}", f"run:{run_id}", {"comment": comment}, now)
        if not approve:
            reason = f"rejected by {principal.name}" + (f": {comment}" if comment else "")
            _move(tx, run, RunStatus.REJECTED, now, reason, error=reason, finished_at=now)
        else:
            for policy in mine:
                policy["approved_by"].append(principal.name)
            approval = {**run.approval, "policies": policies}
            if all(len(p["approved_by"]) >= p["required"] for p in policies):
                _move(
                    tx, run, RunStatus.QUEUED, now, f"approved by {_approvers(policies)}", approval=approval
                )
                tx.notify("queue", run.worker_group)
            else:
                tx.update_run(run_id, approval=approval)
                tx.notify("run", run_id)
        updated = tx.get_run(run_id)
    assert updated is not None
    return updated


def _approvers(policies: list[dict[str, Any]]) -> str:
    return ", ".join(sorted({name for p in policies for name in p["approved_by"]}))


def _move(tx: Transaction, run: Run, status: RunStatus, now: datetime, reason: str, **values: Any) -> None:
    states.move(tx, run, status, now, reason, **values)


def decisions(store: Store, run_id: str) -> list[Decision]:
    with store.read() as tx:
        return tx.decisions(run_id)


def expire(store: Store) -> list[str]:
    """Reject runs whose approval window closed; returns their ids."""
    now = utcnow()
    expired = []
    with store.transaction() as tx:
        for run in tx.runs_in_status(RunStatus.WAITING_APPROVAL):
            if run.approval and datetime.fromisoformat(run.approval["expires_at"]) <= now:
                reason = "approval expired: not enough approvals in time"
                _move(tx, run, RunStatus.REJECTED, now, reason, error=reason, finished_at=now)
                tx.append_audit("system", "approval.expired", f"run:{run.id}", {}, now)
                expired.append(run.id)
    return expired
