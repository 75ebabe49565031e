"""Triggers declared in an automation's file: webhooks, events, schedules, Slack.

Each may carry a ``when`` condition and a ``params`` mapping, both ``${{ }}``
expressions over the triggering ``event``. Every trigger ends in the same
admission call as an API request.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ondeck.spec import expressions
from ondeck.spec.expressions import Expression

# A delivery runs as the principal ``webhook:<id>``, which must fit the 100 characters the
# store keeps of a principal's name.
HOOK_ID = r"^[A-Za-z0-9_-]{3,92}$"
# Whether a cron fires at all does not depend on when one asks: every date a cron can name
# comes round within 8 years (29 February), well inside the 50 years croniter searches.
_ANY_MOMENT = datetime(2000, 1, 1, tzinfo=UTC)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WebhookSpec(_Strict):
    id: str = Field(pattern=HOOK_ID, description="POST /hooks/{id}")
    scheme: Literal["github", "standard", "hmac", "token", "alertmanager"]
    secret: str = Field(description="Name of an entry of the secrets store.")


class EventSpec(_Strict):
    source: str
    type: str | None = None


def parse_cron(expression: str, timezone: str = "UTC") -> tuple[str, bool]:
    """Validate a 5-field cron, or 6 fields with seconds first; returns (expr, has_seconds)."""
    fields = expression.split()
    if len(fields) not in (5, 6):
        raise ValueError("cron takes 5 fields (minute hour day month weekday) or 6 with seconds first")
    seconds = len(fields) == 6
    if not croniter.is_valid(expression, second_at_beginning=seconds):
        raise ValueError(f"invalid cron expression {expression!r}")
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown timezone {timezone!r}") from exc
    return expression, seconds


class ScheduleSpec(_Strict):
    cron: str
    timezone: str = "UTC"
    catch_up: Literal["none", "latest", "all"] = "latest"

    @model_validator(mode="after")
    def _valid(self) -> ScheduleSpec:
        parse_cron(self.cron, self.timezone)
        try:
            self.next_after(_ANY_MOMENT)
        except CroniterBadDateError as exc:
            raise ValueError(
                f"cron {self.cron!r} never fires: no date matches it (such as 30 February)"
            ) from exc
        return self

    def next_after(self, moment: datetime) -> datetime:
        """The first fire time strictly after ``moment`` (timezone-aware)."""
        _, seconds = parse_cron(self.cron, self.timezone)
        local = moment.astimezone(ZoneInfo(self.timezone))
        result: datetime = croniter(self.cron, local, second_at_beginning=seconds).get_next(datetime)
        return result


class SlackSpec(_Strict):
    command: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$", description="Name used in `run NAME`.")


class Trigger(_Strict):
    webhook: WebhookSpec | None = None
    event: EventSpec | None = None
    schedule: ScheduleSpec | None = None
    slack: SlackSpec | None = None
    when: Expression | None = None
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _exactly_one(self) -> Trigger:
        kinds = [k for k in ("webhook", "event", "schedule", "slack") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("a trigger is exactly one of webhook, event, schedule, slack")
        return self

    @field_validator("params")
    @classmethod
    def _params_compile(cls, value: dict[str, Any]) -> dict[str, Any]:
        for template in _templates(value):
            expressions.check(template)
        return value

    @property
    def kind(self) -> str:
        return next(k for k in ("webhook", "event", "schedule", "slack") if getattr(self, k) is not None)

    def matches(self, event: dict[str, Any]) -> bool:
        return self.when is None or bool(expressions.evaluate(self.when, {"event": event}))

    def params_for(self, event: dict[str, Any]) -> dict[str, Any]:
        """The trigger's params mapping evaluated against ``event``."""
        result = _render(self.params, {"event": event})
        assert isinstance(result, dict)
        return result


def _templates(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _templates(v)]
    if isinstance(value, list):
        return [t for v in value for t in _templates(v)]
    return []


def _render(value: Any, context: dict[str, Any]) -> Any:
    if isinstance(value, str):
        return expressions.evaluate(value, context)
    if isinstance(value, dict):
        return {k: _render(v, context) for k, v in value.items()}
    if isinstance(value, list):
        return [_render(v, context) for v in value]
    return value
