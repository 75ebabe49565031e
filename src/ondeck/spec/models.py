"""The automation definition, as written in YAML (or sent as JSON)."""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from ondeck.durations import DAY, YEAR, parse_duration, parse_size, within
from ondeck.runner.attempt import PID_MAX
from ondeck.spec.expressions import Expression
from ondeck.spec.params import check_schema
from ondeck.spec.python_main import find_main, infer_schema
from ondeck.spec.triggers import Trigger

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"

Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
# Every duration in a definition is at most a year, so that adding one to a time never
# overflows. A delay may be zero (retry at once); a period is at least a second: less is
# of no use (a CPU limit counts whole seconds; a timeout of 0 meant the default) and a rate
# window of next to nothing numbers its windows beyond any integer.
Delay = Annotated[Duration, AfterValidator(within(0, YEAR))]
Period = Annotated[Duration, AfterValidator(within(1, YEAR))]
# Rate counters are kept a day (admission.purge_expired): a longer window would be forgotten.
RateWindow = Annotated[Duration, AfterValidator(within(1, DAY))]


# The kernel's limit for one argument (MAX_ARG_STRLEN), less its terminating NUL.
BASH_SCRIPT_MAX = 128 * 1024 - 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunSpec(_Strict):
    """What to execute. ``file`` is resolved by the loader into ``script``."""

    runtime: Literal["bash", "python", "exec"]
    script: str | None = None
    file: str | None = None
    args: list[Expression] = Field(default_factory=list)
    entrypoint: Literal["script", "main"] = "script"

    @model_validator(mode="after")
    def _has_program(self) -> RunSpec:
        if self.runtime == "exec":
            if not self.args:
                raise ValueError("runtime exec needs args: the program and its arguments")
            if self.script is not None:
                raise ValueError("runtime exec takes args, not script")
        elif self.script is None:
            raise ValueError(f"runtime {self.runtime} needs script (or file)")
        # Bash scripts are given to bash as one argument (runner.process.build_argv);
        # no text of a definition holds NUL (parse_definition refuses it).
        elif self.runtime == "bash" and len(self.script.encode()) > BASH_SCRIPT_MAX:
            raise ValueError(f"a bash script is at most {BASH_SCRIPT_MAX} bytes (one argument to bash)")
        return self


class Retries(_Strict):
    attempts: int = Field(1, ge=1, le=100, description="Total attempts, the first included.")
    backoff: Delay = 1.0
    max_backoff: Delay = 60.0


class Concurrency(_Strict):
    key: Expression
    limit: int = Field(1, ge=1, le=10_000)
    policy: Literal["queue", "reject", "cancel_running"] = "queue"


class Limits(_Strict):
    memory: Size | None = None
    cpu: Period | None = None
    processes: int | None = Field(None, ge=1, le=PID_MAX)
    file_size: Size | None = None


class RunGrant(_Strict):
    """A role allowed to run, optionally only when a condition on the params holds."""

    role: str
    when: Expression | None = None


class Access(_Strict):
    """Narrows who may see and run an automation (admins always may)."""

    view: list[str] | None = None
    run: list[str | RunGrant] | None = None

    def run_grants(self) -> list[RunGrant] | None:
        if self.run is None:
            return None
        return [RunGrant(role=g) if isinstance(g, str) else g for g in self.run]


class Approval(_Strict):
    when: Expression = "true"
    approvers: list[str] = Field(min_length=1)
    required: int = Field(1, ge=1, le=10)
    allow_self_approval: bool = False
    timeout: Period = 3600.0


class RateLimit(_Strict):
    limit: int = Field(ge=1)
    per: RateWindow
    scope: Literal["principal", "automation"] = "principal"


class CircuitBreaker(_Strict):
    failures: int = Field(ge=1)
    within: Period
    cooldown: Delay = Field(gt=0)


SECRET_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
RESERVED_ENV = frozenset({"PATH", "HOME", "LANG", "LC_ALL", "TMPDIR"})  # see runner.process.build_env
TerminalState = Literal["succeeded", "failed", "timed_out", "cancelled", "rejected"]
TERMINAL_STATES: list[TerminalState] = ["succeeded", "failed", "timed_out", "cancelled", "rejected"]


class Notify(_Strict):
    """Tell a URL when a run ends in one of ``on`` (signed, retried, from the outbox)."""

    on: list[TerminalState] = Field(default_factory=lambda: list(TERMINAL_STATES))
    url: str = Field(pattern=r"^https?://", description="http(s) only")


class Automation(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    tags: list[str] = Field(default_factory=list)
    params: dict[str, Any] | None = Field(None, validate_default=True)
    run: RunSpec
    timeout: Period | None = None
    retries: Retries = Field(default_factory=Retries)
    concurrency: Concurrency | None = None
    limits: Limits = Field(default_factory=Limits)
    worker_group: str = Field("default", pattern=r"^[A-Za-z0-9._-]{1,63}$")
    priority: int = Field(0, ge=-100, le=100)
    environment: Expression | None = None
    secrets: list[Annotated[str, Field(pattern=SECRET_NAME)]] = Field(default_factory=list)
    access: Access | None = None
    approval: Approval | None = None
    rate_limit: RateLimit | None = None
    circuit_breaker: CircuitBreaker | None = None
    triggers: list[Trigger] = Field(default_factory=list)
    notify: list[Notify] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _infer_params(cls, data: Any) -> Any:
        """Python ``main(...)`` scripts get their schema from the signature.

        Runs before field validation so that the inferred schema goes through
        the same checks as a written one.
        """
        if not isinstance(data, dict):
            return data
        run = data.get("run")
        if not (isinstance(run, dict) and run.get("runtime") == "python"):
            return data
        script = run.get("script")
        if not isinstance(script, str):
            return data
        main = find_main(script)
        if main is None:
            return data
        data = {**data, "run": {**run, "entrypoint": run.get("entrypoint", "main")}}
        if data.get("params") is None:
            data["params"] = infer_schema(main)
        return data

    @field_validator("params")
    @classmethod
    def _params_schema(cls, value: dict[str, Any] | None) -> dict[str, Any]:
        """An absent schema means no params; unknown params are refused by default.

        ``additionalProperties: false`` unless the author says otherwise, so a
        mistyped ``-p nmae=x`` is an error rather than silently ignored.
        """
        schema: dict[str, Any] = dict(value) if value else {"type": "object", "properties": {}}
        schema.setdefault("additionalProperties", False)
        check_schema(schema)
        return schema

    @field_validator("secrets")
    @classmethod
    def _secrets_not_reserved(cls, value: list[str]) -> list[str]:
        """A secret is injected as the variable it is named: not as one ondeck sets for the
        script, nor as one that changes how programs load (``LD_*``)."""
        reserved = [name for name in value if name in RESERVED_ENV or name.startswith(("ONDECK_", "LD_"))]
        if reserved:
            raise ValueError(
                f"{', '.join(reserved)}: ondeck sets PATH, HOME, LANG, LC_ALL, TMPDIR and ONDECK_* "
                "for the script, and LD_* change how programs load; name the secret otherwise"
            )
        return value

    @property
    def params_schema(self) -> dict[str, Any]:
        assert self.params is not None
        return self.params

    def definition(self) -> dict[str, Any]:
        """The canonical JSON form stored as a version."""
        return self.model_dump(mode="json", exclude_none=True)

    def digest(self) -> str:
        canonical = json.dumps(self.definition(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()
