"""Settings handed to a child process through its environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ondeck.settings import Settings


def test_settings_made_in_code_reach_a_child_through_its_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    given = Settings(
        data_dir=tmp_path,
        workspaces_dir=tmp_path / "ws",
        database_url=f"sqlite:///{tmp_path / 'x.db'}",
        worker_concurrency=3,
        isolate=False,
        kill_grace_seconds=0.5,
        rate_limit="",
        limit_memory="512MiB",
    )
    for key in list(os.environ):
        if key.startswith("ONDECK_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("ONDECK_WORKER_CONCURRENCY", "99")  # the server's settings win
    for key, value in given.as_environment().items():
        monkeypatch.setenv(key, value)

    assert Settings().model_dump() == given.model_dump()


def test_server_embeds_one_worker_process_per_usable_core_up_to_two(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ONDECK_WORKER_PROCESSES", raising=False)
    cores = sorted(os.sched_getaffinity(0))
    assert Settings().worker_processes == min(2, len(cores))
    pinned = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import os; os.sched_setaffinity(0, {{{cores[0]}}}); "
            "from ondeck.settings import Settings; print(Settings().worker_processes)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert pinned.stdout.strip() == "1"
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert Settings().worker_processes == 2
    monkeypatch.setenv("ONDECK_WORKER_PROCESSES", "3")
    assert Settings().worker_processes == 3


def test_default_worker_processes_without_sched_getaffinity(monkeypatch: pytest.MonkeyPatch) -> None:
    """macOS and Windows have no sched_getaffinity: Settings (and so every CLI command) must still load."""
    monkeypatch.delenv("ONDECK_WORKER_PROCESSES", raising=False)
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert Settings().worker_processes == 2
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert Settings().worker_processes == 1


def test_the_kill_grace_period_must_fit_in_the_last_third_of_a_lease() -> None:
    """A worker that cannot renew a lease stops the attempt with a third of it left."""
    assert Settings(lease_seconds=6, kill_grace_seconds=1.9).kill_grace_seconds == 1.9
    with pytest.raises(ValueError, match="under a third of lease_seconds"):
        Settings(lease_seconds=6, kill_grace_seconds=2)


@pytest.mark.parametrize(
    ("given", "problem"),
    [
        ("100/0s", "from 1s to 1d"),
        ("0/1m", "greater than or equal to 1"),
        ("x/1m", "integer"),
        ("5/2d", "to 1d"),
    ],
)
def test_a_global_rate_limit_is_bounded_as_an_automations_is(given: str, problem: str) -> None:
    """100/0s divided by zero at every trigger."""
    assert Settings(rate_limit="100/10s").rate_limit == "100/10s"
    with pytest.raises(ValueError, match="rate limit") as caught:
        Settings(rate_limit=given)
    assert problem in str(caught.value)
