"""A streak of failures is logged once, then reminded of, then its end."""

from __future__ import annotations

import logging

import pytest

from ondeck.streaks import Failures


def test_a_streak_is_logged_at_its_start_every_minute_while_it_lasts_and_at_its_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    now = [1000.0]
    failures = Failures(logging.getLogger("test.streaks"), "claiming runs", clock=lambda: now[0])

    def fail(times: int) -> None:
        for _ in range(times):
            try:
                raise ConnectionError("the database is away")
            except ConnectionError:
                failures.failed()
            now[0] += 1

    fail(30)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("ERROR", "claiming runs failed; will retry")
    ]
    assert caplog.records[0].exc_info is not None  # the first one with its traceback
    fail(31)  # a minute after the first
    assert [r.getMessage() for r in caplog.records][1:] == ["claiming runs still fails (61 tries)"]
    failures.succeeded()
    failures.succeeded()  # no streak: nothing more
    assert [r.getMessage() for r in caplog.records][2:] == [
        "claiming runs works again, after 61 failed tries"
    ]
    fail(1)  # a new streak starts in full
    assert caplog.records[-1].getMessage() == "claiming runs failed; will retry"
