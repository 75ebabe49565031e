"""Response and request bodies: the public JSON shape of the domain objects."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ondeck.domain import AutomationVersion, LogEntry, Run
from ondeck.engine.runs import RunDetail


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class TransitionOut(_Out):
    from_status: str | None
    to_status: str
    at: datetime
    reason: str


class AttemptOut(_Out):
    number: int
    worker: str
    status: str
    exit_code: int | None
    error: str | None
    started_at: datetime
    finished_at: datetime | None


class RunOut(_Out):
    id: str
    automation: str
    version: int
    status: str
    params: dict[str, Any]
    outputs: dict[str, Any] | None
    exit_code: int | None
    error: str | None
    attempt: int
    max_attempts: int
    trigger: str
    priority: int
    worker_group: str
    concurrency_key: str | None
    cancel_requested: bool
    idempotency_key: str | None
    rerun_of: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    principal: str | None
    environment: str | None
    approval: dict[str, Any] | None
    transitions: list[TransitionOut] | None = None
    attempts: list[AttemptOut] | None = None

    @classmethod
    def of(cls, run: Run) -> RunOut:
        return cls.model_validate(run)

    @classmethod
    def of_detail(cls, detail: RunDetail) -> RunOut:
        out = cls.of(detail.run)
        out.transitions = [TransitionOut.model_validate(t) for t in detail.transitions]
        out.attempts = [AttemptOut.model_validate(a) for a in detail.attempts]
        return out


class RunPage(BaseModel):
    items: list[RunOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next (older) page.")


class LogEntryOut(_Out):
    seq: int
    attempt: int
    stream: str
    text: str
    time: datetime = Field(validation_alias="at")


class LogPage(BaseModel):
    run_status: str
    entries: list[LogEntryOut]

    @classmethod
    def of(cls, run: Run, entries: list[LogEntry]) -> LogPage:
        return cls(run_status=run.status, entries=[LogEntryOut.model_validate(e) for e in entries])


class DecisionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    comment: str = ""


class TriggerBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    params: dict[str, Any] = Field(default_factory=dict)
    callback_url: str | None = Field(
        None, description="Told how the run ended (signed with Standard Webhooks, retried up to 24 h)."
    )


class ScheduleOut(BaseModel):
    automation: str
    index: int
    cron: str
    timezone: str
    catch_up: str
    paused: bool
    next_fire_at: datetime | None

    @classmethod
    def of(cls, schedule: Any) -> ScheduleOut:
        spec = schedule.spec
        return cls(
            automation=schedule.automation,
            index=schedule.index,
            cron=spec.cron,
            timezone=spec.timezone,
            catch_up=spec.catch_up,
            paused=schedule.paused,
            next_fire_at=schedule.next_fire_at,
        )


class DeliveryAttemptOut(BaseModel):
    number: int
    at: datetime
    status_code: int | None
    error: str | None
    duration_ms: int


class DeliveryOut(BaseModel):
    id: str
    url: str
    kind: str
    status: str
    attempts: int
    next_attempt_at: datetime
    created_at: datetime
    delivered_at: datetime | None
    last_error: str | None
    attempt_log: list[DeliveryAttemptOut]


class AutomationSummary(BaseModel):
    name: str
    version: int
    description: str
    tags: list[str]
    runtime: str
    params: dict[str, Any]
    updated_at: datetime

    @classmethod
    def of(cls, version: AutomationVersion) -> AutomationSummary:
        d = version.definition
        return cls(
            name=version.name,
            version=version.version,
            description=d.get("description", ""),
            tags=d.get("tags", []),
            runtime=d["run"]["runtime"],
            params=d.get("params", {}),
            updated_at=version.created_at,
        )


class AutomationOut(BaseModel):
    name: str
    version: int
    digest: str
    created_at: datetime
    definition: dict[str, Any]
    changed: bool | None = None
    triggers: list[dict[str, Any]] = Field(
        default_factory=list, description="Declared triggers; schedules with next_fire_at and paused."
    )

    @classmethod
    def of(
        cls,
        version: AutomationVersion,
        changed: bool | None = None,
        triggers: list[dict[str, Any]] | None = None,
    ) -> AutomationOut:
        return cls(
            name=version.name,
            version=version.version,
            digest=version.digest,
            created_at=version.created_at,
            definition=version.definition,
            changed=changed,
            triggers=triggers or [],
        )


class AutomationList(BaseModel):
    items: list[AutomationSummary]
