"""All configuration, from ``ONDECK_*`` environment variables, in one object.

No other module reads ``os.environ``: they receive a ``Settings``.
"""

from __future__ import annotations

import os
from datetime import timedelta
from functools import cached_property
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ondeck.runner.attempt import PID_MAX

# Where a server saves the admin token it made at first start, in its data directory (the
# CLI on the same host reads it from there).
TOKEN_FILE = "admin-token"
RATE_LIMIT = "6000/1m"  # ONDECK_RATE_LIMIT's default

BUNDLED_EXAMPLES = Path(__file__).parent / "examples" / "automations"


def default_worker_processes() -> int:
    """One embedded worker process per core this process may use, at most two.

    A worker process executes runs on one interpreter lock, and at a few hundred runs a
    second that lock, not the machine, is what runs out: with one process on two cores,
    runs queued for most of a second under load while a core had time to spare. Past
    two, SQLite's single writer is the limit; on PostgreSQL, scale out with more
    ``ondeck worker`` processes instead.
    """
    affinity = getattr(os, "sched_getaffinity", None)  # Linux only: not on macOS or Windows
    usable = len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)
    return max(1, min(2, usable))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ONDECK_", extra="ignore")

    data_dir: Path = Field(Path(".ondeck"), description="Where the SQLite file and workspaces live.")
    workspaces_dir: Path | None = Field(
        None, description="Where runs' workspaces are made; default data_dir/workspaces. tmpfs is cheapest."
    )
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL; default sqlite under data_dir. Use postgresql+psycopg://… to scale out.",
    )
    automations_dir: Path | None = Field(
        None, description="Loaded at server start; default ./automations, else the bundled examples."
    )
    url: str = Field("http://127.0.0.1:8000", description="Server URL the CLI talks to.")
    host: str = "127.0.0.1"
    port: int = 8000

    lease_seconds: float = Field(30.0, gt=0.5, description="Run lease; renewed every third of it.")
    poll_seconds: float = Field(1.0, gt=0, description="Fallback queue poll when no wake-up arrives.")
    worker_concurrency: int = Field(8, ge=1, description="Runs one worker process executes at once.")
    worker_processes: int = Field(
        default_factory=default_worker_processes,
        ge=1,
        le=16,
        description="Embedded worker processes of `ondeck server` (each with its own GIL); "
        "default one per usable CPU core, at most 2.",
    )
    worker_group: str = "default"
    isolate: bool = Field(True, description="Run each attempt in its own PID namespace when possible.")
    script_user: str | None = Field(
        None, description="User (name or uid) scripts run as; needs root. Default: ondeck's own user."
    )
    kill_grace_seconds: float = Field(5.0, ge=0, description="SIGTERM to SIGKILL grace period.")
    default_timeout: str = Field("1h", description="Run timeout when an automation sets none.")
    log_cap_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="Captured output per run.")
    idempotency_ttl_seconds: float = Field(24 * 3600, gt=0)
    admin_token: str | None = Field(None, description="Use this value as the bootstrap admin token.")
    token: str | None = Field(None, description="The CLI's API token.")
    master_key: str | None = Field(None, description="Fernet key(s) for secrets; default a key file.")
    rate_limit: str | None = Field(RATE_LIMIT, description="Per-principal trigger limit; empty disables.")
    callback_secret: str | None = Field(
        None, description="whsec_… key signing callbacks; default a key file."
    )
    callback_allow: str | None = Field(
        None, description="CIDRs/hosts callbacks may reach despite SSRF rules."
    )
    slack_signing_secret: str | None = Field(None, description="Slack app signing secret.")
    slack_users: str | None = Field(None, description="Slack user id to token name: U123=alice,U456=bob")
    callback_retry_seconds: float = Field(5.0, gt=0, description="First callback retry delay; doubles.")
    max_body_bytes: int = Field(
        1024 * 1024, description="Largest request body accepted: triggers, webhooks, ChatOps."
    )

    limit_memory: str = Field("4GiB", description="RLIMIT_AS default for scripts.")
    limit_cpu: str = Field("1h", description="RLIMIT_CPU default for scripts.")
    limit_processes: int = Field(4096, ge=1, le=PID_MAX, description="RLIMIT_NPROC default (per user).")
    limit_file_size: str = Field("1GiB", description="RLIMIT_FSIZE default for scripts.")

    @field_validator("script_user")
    @classmethod
    def _known_script_user(cls, value: str | None) -> str | None:
        if value:
            from ondeck.runner.isolation import script_user

            script_user(value)
        return value or None

    @field_validator("rate_limit")
    @classmethod
    def _valid_rate_limit(cls, value: str | None) -> str | None:
        if value in (RATE_LIMIT, "", None):  # no need to load the engine (the CLI starts faster)
            return value
        from ondeck.engine.limits import parse_global_limit

        parse_global_limit(value)
        return value

    @model_validator(mode="after")
    def _grace_within_lease(self) -> Settings:
        # A worker that cannot renew a lease stops the attempt with a third of it left:
        # the attempt's processes must be dead before it lapses (see engine.worker).
        if self.kill_grace_seconds >= self.lease_seconds / 3:
            raise ValueError(
                f"kill_grace_seconds ({self.kill_grace_seconds:g}) must be under a third of "
                f"lease_seconds ({self.lease_seconds:g})"
            )
        return self

    def as_environment(self) -> dict[str, str]:
        """``ONDECK_*`` variables that make ``Settings()`` in a child process equal to these
        settings, however they were made (so values given in code reach it too).
        A field left None is left out: the child takes its default."""
        return {
            f"ONDECK_{name.upper()}": str(value)
            for name, value in self.model_dump().items()
            if value is not None
        }

    @cached_property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'ondeck.db').resolve()}"

    @property
    def idempotency_ttl(self) -> timedelta:
        return timedelta(seconds=self.idempotency_ttl_seconds)

    @cached_property
    def workspace_root(self) -> Path:
        return (self.workspaces_dir or self.data_dir / "workspaces").resolve()

    def resolved_automations_dir(self) -> Path:
        if self.automations_dir is not None:
            return self.automations_dir
        local = Path("automations")
        return local if local.is_dir() else BUNDLED_EXAMPLES
