"""Blocking calls off the event loop: a cancelled caller never leaves its call running behind it."""

from __future__ import annotations

import asyncio
import threading

from ondeck import blocking


def test_a_cancelled_caller_returns_only_once_its_call_has_ended() -> None:
    started, release = threading.Event(), threading.Event()
    ended: list[str] = []

    def write() -> str:
        started.set()
        release.wait(30)
        ended.append("written")
        return "written"

    async def scenario() -> None:
        caller = asyncio.create_task(blocking.run(write))
        assert await asyncio.to_thread(started.wait, 30)
        caller.cancel()
        # The call is still running, so the cancelled caller has not gone on.
        done, _ = await asyncio.wait({caller}, timeout=0.3)
        assert not done and ended == []
        release.set()
        done, _ = await asyncio.wait({caller}, timeout=30)
        assert done and caller.cancelled()
        assert ended == ["written"]

    asyncio.run(scenario())


def test_results_and_errors_come_back_to_the_caller() -> None:
    def divide(a: int, *, by: int) -> float:
        return a / by

    async def scenario() -> None:
        assert await blocking.run(divide, 6, by=3) == 2
        try:
            await blocking.run(divide, 1, by=0)
        except ZeroDivisionError:
            return
        raise AssertionError("the error did not reach the caller")

    asyncio.run(scenario())
