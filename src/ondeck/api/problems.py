"""Every error leaves the API as ``application/problem+json`` (RFC 9457)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ondeck.errors import OndeckError

log = logging.getLogger(__name__)
MEDIA_TYPE = "application/problem+json"


def problem_body(status: int, code: str, title: str, detail: str, **ext: Any) -> dict[str, Any]:
    # Extensions never override the standard members.
    return {**ext, "type": f"/problems/{code}", "title": title, "status": status, "detail": detail}


def problem(
    status: int, code: str, title: str, detail: str, headers: dict[str, str] | None = None, **ext: Any
) -> JSONResponse:
    body = problem_body(status, code, title, detail, **ext)
    return JSONResponse(body, status_code=status, media_type=MEDIA_TYPE, headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(OndeckError)
    async def _ondeck_error(request: Request, exc: OndeckError) -> JSONResponse:
        return problem(exc.status, exc.code, exc.title, exc.detail, headers=exc.headers, **exc.extensions)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"path": "/" + "/".join(str(p) for p in e.get("loc", ())), "message": e.get("msg", "")}
            for e in exc.errors()
        ]
        invalid = [e for e in exc.errors() if e.get("type") == "json_invalid"]
        if invalid:
            # The parsers' reasons say where, never what: they do not quote the body.
            reason = invalid[0].get("ctx", {}).get("error")
            detail = "the request body is not valid JSON" + (f": {reason}" if reason else "")
            return problem(400, "invalid-json", "Invalid JSON", detail)
        detail = "; ".join(f"{e['path']}: {e['message']}" for e in errors)
        return problem(422, "invalid-request", "Invalid request", detail, errors=errors)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        titles = {404: "Not found", 405: "Method not allowed"}
        detail = str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no such endpoint: {request.method} {request.url.path}"
        return problem(
            exc.status_code,
            f"http-{exc.status_code}",
            titles.get(exc.status_code, "Error"),
            detail,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem(500, "internal", "Internal error", "an unexpected error occurred; see the server log")
