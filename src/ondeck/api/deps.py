"""Request-scoped access to the process's Node and the caller, and running engine calls off the loop."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Header, Request, Response
from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect

from ondeck import blocking, storable
from ondeck.auth import tokens
from ondeck.auth.policy import require
from ondeck.auth.principals import Permission, Principal
from ondeck.domain import Run
from ondeck.engine import runs
from ondeck.errors import InvalidRequest, PayloadTooLarge, StoreUnavailable
from ondeck.node import Node
from ondeck.store.store import Store

T = TypeVar("T")
log = logging.getLogger(__name__)
# Numbers in a query or header are refused past the store's columns: versions, attempts
# and log sequence numbers are 32-bit; audit ids 64-bit.
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1


def check_url(request: Request) -> None:
    """Refuse a NUL in the path or query: no store can look it up or keep it."""
    problem = storable.url_problem(request.scope["path"], request.scope.get("query_string", b""))
    if problem is not None:
        raise InvalidRequest(problem)


def check_json(raw: bytes) -> str:
    """The JSON body ``raw`` as text; refused as the parser refuses a body that is not
    JSON if it is not UTF-8 (RFC 8259; Python's parser also takes UTF-16 and UTF-32, and
    surrogates encoded as bytes), or holds a string no store can keep (see ``storable``)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        doc = raw.decode(errors="replace")
        raise json.JSONDecodeError(f"it is not UTF-8 ({exc.reason})", doc, exc.start) from None
    problem = storable.json_problem(raw)
    if problem is not None:
        raise json.JSONDecodeError(f"strings cannot hold {problem}", text, 0)
    return text


class _StrictRequest(Request):
    """JSON bodies are checked by ``check_json`` before they are parsed, and parsed with
    ``storable.parse_json``, as the trigger route parses its own."""

    _parsed: Any

    async def json(self) -> Any:
        if not hasattr(self, "_parsed"):
            text = check_json((await self.body()).removeprefix(b"\xef\xbb\xbf"))
            try:
                self._parsed = storable.parse_json(text)
            except ValueError as exc:  # refused as FastAPI refuses a body that is not JSON
                raise json.JSONDecodeError(str(exc), text, 0) from None
        return self._parsed


class StrictRoute(APIRoute):
    """Every API route: input no store can keep is refused before the endpoint sees it."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            check_url(request)
            return await handler(_StrictRequest(request.scope, request.receive))

        return strict


async def get_node(request: Request) -> Node:
    """Async so FastAPI does not hop to a thread just to read app state."""
    node: Node = request.app.state.node
    return node


async def call(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Engine functions do blocking database I/O: run them on a worker thread."""
    return await blocking.run(function, *args, **kwargs)


_TURN_PATIENCE = 0.1  # seconds: many writes' worth


async def write_here(store: Store, function: Callable[..., T], *args: Any) -> T:
    """``call`` for a short write such as an admission. On SQLite it is done right here,
    on the event loop, once it has the write lock, which it waits for on the loop:
    handing the write to a thread cost more than the write itself (the interpreter lock
    passes between the threads at every statement), half the API's CPU per trigger.
    If another process keeps the lock for long, the write goes to a thread, as ``call``,
    where it waits as long as SQLite would.
    """
    async with store.write_turn(_TURN_PATIENCE) as mine:
        if mine:
            return function(*args)
    return await call(function, *args)


NodeDep = Annotated[Node, Depends(get_node)]


async def get_principal(
    node: NodeDep,
    authorization: Annotated[str | None, Header(description="Bearer odk_…")] = None,
) -> Principal:
    principal = tokens.authenticate_recent(authorization)
    if principal is not None:
        return principal
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


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body (signatures are over the exact bytes), refused past ``limit`` bytes.

    Checked against Content-Length first and then against what actually arrives,
    so a chunked or lying upload is cut off too. A client that goes away mid-body gets
    a 400 (to no one), not an unhandled error.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InvalidRequest("Content-Length is not a number")
        if int(declared) > limit:
            raise PayloadTooLarge(f"the body is {declared} bytes; the limit is {limit}")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > limit:
                raise PayloadTooLarge(f"the body is over the limit of {limit} bytes")
    except ClientDisconnect:
        log.info("%s: the client closed the connection before its body arrived", request.url.path)
        raise InvalidRequest("the client closed the connection before the body arrived") from None
    return bytes(body)


async def shown(node: Node, *found: Run) -> list[Run]:
    """``runs.shown``: on the event loop when it need not read the store (every run's
    version was seen before), as for nearly every run."""
    if runs.schemas_known(node.store, found):
        return runs.shown(node.store, found)
    return await call(runs.shown, node.store, found)


async def wait_finished(node: Node, run: Run, timeout: float, *, admitted: bool = True) -> Run:
    """The run once it is terminal, or as it is when ``timeout`` seconds have passed. For
    a run just ``admitted`` by the request, as last seen if the store became unreachable
    meanwhile: a 503 would say to send the trigger again. Otherwise (a read) the outage
    is raised at once, for a 503 the client can retry, not one at the end of its wait.
    The run's changes are announced from the first read on (``runs.watch``), if there is
    time to wait."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not run.status.terminal:
        with node.bus.watch_run(run.id) as changed:
            try:
                if run.watched or timeout <= 0:
                    run = await call(runs.get, node.store, run.id)
                else:
                    run = await call(runs.watch, node.store, run.id, max(0.0, deadline - loop.time()))
            except StoreUnavailable:
                if not admitted:
                    raise
            remaining = deadline - loop.time()
            if run.status.terminal or remaining <= 0:
                break
            await changed.wait(min(remaining, node.settings.poll_seconds))
    return run
