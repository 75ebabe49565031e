"""Request-scoped access to the process's Node and the caller, and running engine calls off the loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from anyio import to_thread
from fastapi import Depends, Header, Request

from ondeck.auth import tokens
from ondeck.auth.policy import require
from ondeck.auth.principals import Permission, Principal
from ondeck.node import Node

T = TypeVar("T")


def get_node(request: Request) -> Node:
    node: Node = request.app.state.node
    return node


async def call(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Engine functions do blocking database I/O: run them on a worker thread."""
    return await to_thread.run_sync(lambda: function(*args, **kwargs))


NodeDep = Annotated[Node, Depends(get_node)]


async def get_principal(
    node: NodeDep,
    authorization: Annotated[str | None, Header(description="Bearer odk_…")] = None,
) -> Principal:
    return await call(tokens.authenticate, node.store, authorization)


PrincipalDep = Annotated[Principal, Depends(get_principal)]


async def require_admin(principal: PrincipalDep) -> Principal:
    require(principal, Permission.ADMIN, "administer ondeck")
    return principal


AdminDep = Annotated[Principal, Depends(require_admin)]


async def require_reader(principal: PrincipalDep) -> Principal:
    require(principal, Permission.READ, "read")
    return principal


ReaderDep = Annotated[Principal, Depends(require_reader)]
