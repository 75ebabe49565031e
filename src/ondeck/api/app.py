"""The FastAPI application; its lifespan runs this process's Node."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.routing import Route

from ondeck import __version__
from ondeck.api import admin, automations, chatops, events, health, hooks, problems, runs
from ondeck.node import Node
from ondeck.settings import Settings

API = "/api/v1"


def create_app(
    settings: Settings | None = None, *, run_worker: bool = True, load_automations: bool = True
) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        node = Node(settings, run_worker=False, embedded_worker=run_worker, load_automations=load_automations)
        app.state.node = node
        await node.start()
        try:
            yield
        finally:
            await node.stop()

    app = FastAPI(
        title="ondeck",
        version=__version__,
        summary="Run automations on demand, safely.",
        lifespan=lifespan,
    )
    problems.install(app)
    # Triggering is the hot path: matched before the routers, as a plain route, it skips FastAPI's
    # per-request route matching and dependency solving. The same endpoint is declared
    # in runs.router, which documents it in the OpenAPI schema.
    app.router.routes.append(Route(API + runs.TRIGGER_PATH, runs.trigger_run, methods=["POST"]))
    app.include_router(health.router)
    app.include_router(automations.router, prefix=API)
    app.include_router(runs.router, prefix=API)
    app.include_router(admin.router, prefix=API)
    app.include_router(events.router, prefix=API)
    app.include_router(hooks.router)
    app.include_router(chatops.router)
    return app
