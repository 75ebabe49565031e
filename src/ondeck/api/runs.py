"""Run routes: trigger, list, read, logs (JSON and SSE), cancel, rerun."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import Field, TypeAdapter, ValidationError

from ondeck.api.deps import (
    INT32_MAX,
    NodeDep,
    PrincipalDep,
    ReaderDep,
    StrictRoute,
    call,
    check_json,
    check_url,
    get_node,
    get_principal,
    read_body,
    shown,
    wait_finished,
    write_here,
)
from ondeck.api.schemas import (
    DecisionBody,
    DeliveryOut,
    LogEntryOut,
    LogPage,
    RunOut,
    RunPage,
    ScheduleOut,
    TriggerBody,
)
from ondeck.engine import admission, approvals, runs, scheduler
from ondeck.engine.admission import TriggerRequest
from ondeck.errors import StoreUnavailable, UnsupportedMediaType
from ondeck.node import Node
from ondeck.streaks import Failures

log = logging.getLogger(__name__)
T = TypeVar("T")
router = APIRouter(tags=["runs"], route_class=StrictRoute)
# A log stream with nothing to send says so this often, so that proxies keep it open; it
# also bounds how seldom a stream tries the store again during an outage.
_KEEP_ALIVE_SECONDS = 15.0
TRIGGER_PATH = "/automations/{name}/runs"
_WAIT_DESCRIPTION = "Seconds to wait for the run to finish before answering."
_WAIT_MAX = 600
_IDEMPOTENCY_DESCRIPTION = (
    "Same key and params within 24 h (ONDECK_IDEMPOTENCY_TTL_SECONDS) "
    "answer with the same run; same key with other params is a 422."
)
WaitQuery = Annotated[float | None, Query(ge=0, le=_WAIT_MAX, description=_WAIT_DESCRIPTION)]
IdempotencyHeader = Annotated[
    str | None, Header(alias="Idempotency-Key", description=_IDEMPOTENCY_DESCRIPTION)
]


def _adapter(form: Any) -> TypeAdapter[Any]:
    """A TypeAdapter of a typing form (a union, Annotated), where mypy takes only a class."""
    return TypeAdapter(form)


_WAIT: TypeAdapter[float] = _adapter(Annotated[float, Field(ge=0, le=_WAIT_MAX)])
_BODY: TypeAdapter[TriggerBody | None] = _adapter(TriggerBody | None)
_TRIGGER_DOCS: dict[str, Any] = {
    "parameters": [
        {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
        {
            "name": "wait",
            "in": "query",
            "description": _WAIT_DESCRIPTION,
            "schema": {"type": "number", "minimum": 0, "maximum": _WAIT_MAX},
        },
        {
            "name": "Idempotency-Key",
            "in": "header",
            "description": _IDEMPOTENCY_DESCRIPTION,
            "schema": {"type": "string"},
        },
        {
            "name": "authorization",
            "in": "header",
            "description": "Bearer odk_…",
            "schema": {"type": "string"},
        },
    ],
    "requestBody": {"content": {"application/json": {"schema": TriggerBody.model_json_schema()}}},
    "responses": {
        status: {"description": description, "content": {"application/problem+json": {}}}
        for status, description in (
            ("400", "The body is not valid JSON, or a header is malformed"),
            ("415", "The body is not declared as JSON"),
            ("422", "The params do not match the automation's schema, or the input is invalid"),
        )
    },
}


async def _admit(node: Node, request: TriggerRequest, wait: float | None) -> Response:
    """The admitted run, serialised here: answered as a ready ``Response``, it skips
    FastAPI's second validation of the route's return value against ``RunOut``
    (triggering is the API's hot path)."""
    result = await write_here(node.store, admission.admit, node.store, request, node.admission_policy)
    run = result.run
    if wait:
        # Read what showing the run needs (its params' schema) while the store answers: the
        # wait may outlast it, and an admitted run must not be answered with a 503.
        await shown(node, run)
        run = await wait_finished(node, run, wait)
    (run,) = await shown(node, run)
    headers = {"Location": f"/api/v1/runs/{run.id}"}
    if result.replayed:
        headers["Idempotent-Replayed"] = "true"
    return Response(
        RunOut.of(run).model_dump_json(),
        200 if wait and run.status.terminal else 202,
        headers,
        media_type="application/json",
    )


@router.post(
    TRIGGER_PATH,
    response_model=RunOut,
    status_code=202,
    openapi_extra=_TRIGGER_DOCS,
    description="Queue a run. 202 with the run; 200 with the finished run when `wait` sufficed.",
)
async def trigger_run(request: Request) -> Response:
    """Queue a run. 202 with the run; 200 with the finished run when `wait` sufficed.

    Triggering is the API's hot path, so this reads its own input (an empty or null
    body is ``{}``) and ``create_app`` also serves it ahead of FastAPI's router, skipping
    route matching and dependency solving: a third of a trigger's CPU. Bad input is
    refused as FastAPI would, with the same problem documents.
    """
    check_url(request)
    node = await get_node(request)
    principal = await get_principal(node, request.headers.get("authorization"))
    raw = await _json_body(node, request)
    body = (_valid(_BODY.validate_json, raw, "body") if raw else None) or TriggerBody()
    wait_text = request.query_params.get("wait")
    wait = None if wait_text is None else _valid(_WAIT.validate_python, wait_text, "query", "wait")
    key_text = request.headers.get("idempotency-key")
    key = admission.parse_idempotency_key(key_text) if key_text is not None else None
    via = "cli" if request.headers.get("user-agent", "").startswith("ondeck-cli") else "api"
    trigger = TriggerRequest(
        request.path_params["name"],
        body.params,
        via,
        key,
        principal=principal,
        callback_url=body.callback_url,
        watched=bool(wait),
    )
    return await _admit(node, trigger, wait)


async def _json_body(node: Node, request: Request) -> bytes:
    """The raw body, up to ``max_body_bytes`` (413: before, params of any size were read,
    and echoed back twice in a refusal). One declared as something other than JSON is
    refused (415), as FastAPI refused it (422) before this route read its own input."""
    raw = await read_body(request, node.settings.max_body_bytes)
    content_type = request.headers.get("content-type")
    if raw and content_type:
        media = content_type.partition(";")[0].strip().lower()
        json_like = media.startswith("application/") and media.endswith("+json")
        if media != "application/json" and not json_like:
            raise UnsupportedMediaType(
                f"the body must be JSON (Content-Type: application/json), not {media!r}"
            )
    raw = raw.removeprefix(b"\xef\xbb\xbf")  # json.loads, used before, ignored a UTF-8 BOM
    try:
        check_json(raw)
    except json.JSONDecodeError as exc:  # refused as FastAPI refuses a body that is not JSON
        error = {"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error"}
        raise RequestValidationError([{**error, "ctx": {"error": exc.msg}}]) from exc
    return raw


def _valid(validate: Callable[[Any], T], value: Any, *loc: str) -> T:
    """``validate(value)``; its errors as FastAPI's request validation error at ``loc``."""
    try:
        return validate(value)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**error, "loc": (*loc, *error["loc"])} for error in exc.errors()]
        ) from exc


@router.get("/runs", response_model=RunPage)
async def list_runs(
    node: NodeDep,
    principal: ReaderDep,
    request: Request,
    response: Response,
    automation: str | None = None,
    status: Annotated[list[str], Query(description="Repeat or comma-separate.")] = [],  # noqa: B006
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: str | None = None,
) -> RunPage:
    statuses = [s for value in status for s in value.split(",") if s]
    items, next_cursor = await call(
        runs.page, node.store, principal, automation=automation, statuses=statuses, before=cursor, limit=limit
    )
    if next_cursor:
        # This request's own query (its filters) with the next cursor, as a path reference.
        following = request.url.include_query_params(cursor=next_cursor, limit=limit)
        response.headers["Link"] = f'<{following.path}?{following.query}>; rel="next"'
    return RunPage(items=[RunOut.of(r) for r in await shown(node, *items)], next_cursor=next_cursor)


@router.get("/runs/{run_id}", response_model=RunOut)
async def get_run(node: NodeDep, principal: ReaderDep, run_id: str, wait: WaitQuery = None) -> RunOut:
    """The run with its transitions, attempts and approval decisions; `wait` long-polls until it ends."""
    if wait:
        await wait_finished(node, await call(runs.get, node.store, run_id, principal), wait, admitted=False)
    detail = await call(runs.detail, node.store, principal, run_id)
    (run,) = await shown(node, detail.run)
    return RunOut.of_detail(replace(detail, run=run))


@router.get("/runs/{run_id}/logs", response_model=LogPage)
async def get_logs(
    node: NodeDep,
    principal: ReaderDep,
    run_id: str,
    after: Annotated[int, Query(ge=0, le=INT32_MAX, description="Only entries with seq above this.")] = 0,
    limit: Annotated[int, Query(ge=1, le=5000)] = 1000,
    attempt: Annotated[int | None, Query(ge=1, le=INT32_MAX)] = None,
) -> LogPage:
    run, entries = await call(
        runs.logs, node.store, run_id, after=after, limit=limit, attempt=attempt, principal=principal
    )
    return LogPage.of(run, entries)


def _sse(event: str, data: str, event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {data}\n\n"


async def _log_events(node: Node, run_id: str, after: int) -> AsyncIterator[str]:
    """Every entry after ``after``, then an ``end`` event once the run is terminal; a
    comment when nothing was sent for a while, so that proxies keep the connection.

    The stream outlives an outage of the store (a restart, a failover): it waits, trying
    less and less often, and goes on where it was, as not every client reconnects with
    ``Last-Event-ID``. It ends without ``end`` when the server is stopping
    (``Node.closing``), which would otherwise wait for it, then cut it with an error."""
    loop = asyncio.get_running_loop()
    last, sent = after, loop.time()
    batch = 1000
    pause = node.settings.poll_seconds
    failures = Failures(log, f"the log stream of run {run_id}", logging.WARNING)
    watched = False
    while True:
        with node.bus.watch_run(run_id) as changed:
            try:
                if not watched:  # tried again at each pass while its row is locked long
                    seen = await call(runs.watch, node.store, run_id, _KEEP_ALIVE_SECONDS)
                    watched = seen.watched or seen.status.terminal
                run, entries = await call(runs.logs, node.store, run_id, after=last, limit=batch)
            except StoreUnavailable:
                failures.failed()
                run, entries = None, []
                pause = min(2 * pause, _KEEP_ALIVE_SECONDS)
            else:
                failures.succeeded()
                pause = node.settings.poll_seconds
            for entry in entries:
                yield _sse("log", LogEntryOut.model_validate(entry).model_dump_json(), entry.seq)
                last, sent = entry.seq, loop.time()
            if len(entries) == batch:
                continue
            if run is not None and run.status.terminal:
                yield _sse("end", json.dumps({"status": run.status.value, "exit_code": run.exit_code}))
                return
            await changed.wait(pause)
            if node.closing:  # ended for the server to stop; the client resumes elsewhere
                return
            if loop.time() - sent >= _KEEP_ALIVE_SECONDS:
                yield ": keep-alive\n\n"
                sent = loop.time()


@router.get(
    "/runs/{run_id}/logs/stream",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def stream_logs(
    node: NodeDep,
    principal: ReaderDep,
    run_id: str,
    after: Annotated[int, Query(ge=0, le=INT32_MAX)] = 0,
    last_event_id: Annotated[int | None, Header(alias="Last-Event-ID", ge=0, le=INT32_MAX)] = None,
) -> StreamingResponse:
    """Server-Sent Events: `log` events (id = seq) and a final `end` event."""
    await call(runs.get, node.store, run_id, principal)  # 404/403 before the stream starts
    start = max(after, last_event_id or 0)
    return StreamingResponse(
        _log_events(node, run_id, start),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.post("/runs/{run_id}/cancel", response_model=RunOut, status_code=202)
async def cancel_run(node: NodeDep, principal: PrincipalDep, run_id: str) -> RunOut:
    """Operators may cancel the runs they started; admins any run."""
    return RunOut.of(*await shown(node, await call(runs.cancel, node.store, principal, run_id)))


@router.post("/runs/{run_id}/approve", response_model=RunOut)
async def approve_run(
    node: NodeDep, principal: PrincipalDep, run_id: str, body: DecisionBody | None = None
) -> RunOut:
    """Approve a run waiting for approval; it is queued once every rule has enough approvers."""
    comment = body.comment if body else ""
    return RunOut.of(
        *await shown(node, await call(approvals.decide, node.store, principal, run_id, True, comment))
    )


@router.post("/runs/{run_id}/reject", response_model=RunOut)
async def reject_run(
    node: NodeDep, principal: PrincipalDep, run_id: str, body: DecisionBody | None = None
) -> RunOut:
    comment = body.comment if body else ""
    return RunOut.of(
        *await shown(node, await call(approvals.decide, node.store, principal, run_id, False, comment))
    )


@router.post("/runs/{run_id}/rerun", response_model=RunOut, status_code=202)
async def rerun(
    node: NodeDep,
    principal: PrincipalDep,
    run_id: str,
    wait: WaitQuery = None,
    idempotency_key: IdempotencyHeader = None,
) -> Response:
    """A new run of the automation's current version with the same params."""
    original = await call(runs.get, node.store, run_id, principal)
    key = admission.parse_idempotency_key(idempotency_key) if idempotency_key is not None else None
    trigger = TriggerRequest(
        original.automation,
        original.params,
        "rerun",
        key,
        rerun_of=original.id,
        principal=principal,
        watched=bool(wait),
    )
    return await _admit(node, trigger, wait)


@router.get("/runs/{run_id}/deliveries", response_model=list[DeliveryOut])
async def run_deliveries(node: NodeDep, principal: ReaderDep, run_id: str) -> list[DeliveryOut]:
    """Callbacks and notifications for this run, with every delivery attempt."""
    return [DeliveryOut(**d) for d in await call(runs.deliveries, node.store, principal, run_id)]


@router.get("/schedules", response_model=list[ScheduleOut], tags=["schedules"])
async def list_schedules(node: NodeDep, principal: ReaderDep) -> list[ScheduleOut]:
    """Every schedule the caller may see, with its next fire time."""
    return [ScheduleOut.of(s) for s in await call(scheduler.visible, node.store, principal)]
