"""Blocking calls (database work, mostly) off the event loop, on one small pool per process.

A plain ``ThreadPoolExecutor`` costs the loop about a third of what
``anyio.to_thread`` does per call (no task-group or token bookkeeping, a C
queue), and every run makes several such calls. Few threads, because each
competes with the loop for the GIL, and the loop must keep answering.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
THREADS = 4
_pool = ThreadPoolExecutor(THREADS, thread_name_prefix="ondeck-blocking")


async def run(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``function(*args, **kwargs)`` on the pool.

    A cancelled caller still waits for the call to end (as ``anyio.to_thread``
    did), so once this returns or raises, the call is over: a task cancelled at
    shutdown never leaves a database write running behind it.
    """
    return await _run_on(_pool, function, *args, **kwargs)


class Serial:
    """Blocking calls one at a time, on a thread of their own (``run``'s way otherwise).

    For a stream of short calls beside a busy event loop, as a worker's database calls
    are: spread over the pool's threads, several at once, each thread contends with the
    loop and the others for the interpreter lock at every statement, and the hand-overs
    cost more CPU than the calls (see ``Worker``)."""

    def __init__(self, name: str) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=name)

    async def run(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await _run_on(self._executor, function, *args, **kwargs)


async def _run_on(executor: ThreadPoolExecutor, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    call = functools.partial(function, *args, **kwargs) if kwargs or args else function
    future = asyncio.get_running_loop().run_in_executor(executor, call)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait({future})
        raise


async def inline(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``function(*args, **kwargs)`` on the event loop's own thread: ``run``'s stand-in for
    calls that cost less than the hand-over to a thread and back (see ``Worker``)."""
    return function(*args, **kwargs)
