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
_pool: ThreadPoolExecutor | None = None


async def run(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``function(*args, **kwargs)`` on the pool. If the caller is cancelled, the call
    still runs to its end; only its result is dropped."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(THREADS, thread_name_prefix="ondeck-blocking")
    call = functools.partial(function, *args, **kwargs) if kwargs or args else function
    return await asyncio.get_running_loop().run_in_executor(_pool, call)
