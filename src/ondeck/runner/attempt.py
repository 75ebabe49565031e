"""What the runner is given, and what it reports back."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ondeck.domain import LogChunk, Outcome

# The most processes Linux allows at all (PID_MAX_LIMIT on 64 bits): a larger limit
# means nothing, and one too large for the launcher's arguments failed every run.
PID_MAX = 4 * 1024 * 1024


@dataclass(frozen=True)
class ResourceLimits:
    memory_bytes: int
    cpu_seconds: int
    processes: int
    file_size_bytes: int


@dataclass(frozen=True)
class Attempt:
    run_id: str
    number: int
    runtime: str  # bash | python | exec
    script: str | None
    args: list[str]
    entrypoint: str  # script | main
    params: dict[str, Any]
    timeout: float
    limits: ResourceLimits
    log_budget: int
    workspace_root: Path
    kill_grace: float = 5.0
    extra_env: dict[str, str] = field(default_factory=dict)
    # Values (the run's secrets) replaced by *** in everything the attempt reports.
    redact: tuple[str, ...] = ()
    # How the process is started and contained: see runner.isolation.
    isolation: str = "group"
    # Directories hidden from the program but for its workspace (runner.isolation.hidden).
    hidden: tuple[Path, ...] = ()
    # The (uid, gid) the program runs as; None: this process's own.
    run_as: tuple[int, int] | None = None


@dataclass(frozen=True)
class Started:
    pid: int


@dataclass(frozen=True)
class Output:
    chunk: LogChunk


@dataclass(frozen=True)
class Finished:
    outcome: Outcome


Event = Started | Output | Finished
