"""Request-scoped access to the process's Node, and running engine calls off the loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from anyio import to_thread
from fastapi import Request

from ondeck.node import Node

T = TypeVar("T")


def get_node(request: Request) -> Node:
    node: Node = request.app.state.node
    return node


async def call(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Engine functions do blocking database I/O: run them on a worker thread."""
    return await to_thread.run_sync(lambda: function(*args, **kwargs))
