"""Settings handed to a child process through its environment."""

from __future__ import annotations

import os
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
