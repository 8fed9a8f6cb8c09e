"""The composition root: build the Starlette app from a running Coordinator.

:func:`create_app` only wires routes, the exception handlers and a lifespan that
closes the engine; nothing happens at import time. ``fedsilo-coordinator serve``
runs :func:`create_app_from_env` under uvicorn as a factory (one per worker
process), reading the data directory from ``FEDSILO_DATA_DIR``.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from . import federation, logs, opening, openapi, startup, ui
from .api import admin, audit, silo, transparency
from .api.errors import exception_handlers
from .context import Coordinator
from .startup import DATA_DIR_ENV, StartupError

__all__ = ["DATA_DIR_ENV", "StartupError", "create_app", "create_app_from_env", "open_coordinator"]



def create_app(ctx: Coordinator) -> Starlette:
    """The coordinator's HTTP application around ``ctx`` (which it closes at shutdown)."""

    async def healthz(request: Request) -> Response:
        def probe() -> int:
            with ctx.read() as s:
                return federation.current_version(s, ctx.federation_id)

        retry = {"Retry-After": str(ctx.config.retry_after_seconds)}
        try:
            version = await run_in_threadpool(probe)
        except Exception:  # the process is up but cannot serve: say so, do not crash
            return JSONResponse({"status": "unavailable", "database": "unreachable"}, status_code=503, headers=retry)
        if ctx.health.degraded:  # reads work, writes do not (a full disk): updates get 503
            return JSONResponse({"status": "degraded", "database": "not_writable", "reason": "unavailable",
                                 "detail": ctx.health.detail, "current_version": version},
                                status_code=503, headers=retry)
        if opener.state is not None:  # a ready masked buffer waits for the helper: masked updates get 503
            return JSONResponse({"status": "degraded", "database": "ok", "reason": opener.state["reason"],
                                 "detail": opener.state["detail"], "secure_aggregation": opener.state,
                                 "current_version": version}, status_code=503, headers=retry)
        return JSONResponse({"status": "ok", "database": "ok", "current_version": version})

    opener = opening.Opener(ctx)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(opener.run)  # opens ready secure-aggregation buffers (coordinator.opening)
                try:
                    yield
                finally:
                    tasks.cancel_scope.cancel()
        finally:
            ctx.close()

    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        *ctx.metrics.routes(),
        # before /api/v1, which would shadow it
        Mount("/api/v1/log", routes=transparency.routes(
            ctx, interval=timedelta(seconds=ctx.config.checkpoint_interval_seconds))),
        Mount("/api/v1", routes=silo.routes(ctx)),
        Mount("/api/admin/log", routes=transparency.admin_routes(ctx)),
        Mount("/api/admin", routes=admin.routes(ctx)),
        Mount("/api/audit", routes=audit.routes(ctx)),
        Mount("/ui", routes=ui.routes(ctx)),  # HTML pages for people, left out of OpenAPI
        *openapi.routes(),
    ]
    logs.install_event_log(ctx.engine)  # one log line per committed audit entry
    return Starlette(routes=routes, exception_handlers=exception_handlers(retry_after=ctx.config.retry_after_seconds),
                     lifespan=lifespan, middleware=[Middleware(logs.RequestLog)])


def open_coordinator(data_dir: Path | str) -> Coordinator:
    """Load the configuration and keys of ``data_dir`` and open its database.

    Raises StartupError for a directory that was never initialised, unusable keys, or
    a database that is unreachable or not at this version's schema.
    """
    config = startup.load_config(data_dir)
    startup.limit_torch_threads(config.torch_threads)
    ctx = Coordinator(config, Coordinator.engine_for(config), startup.load_identity(config))
    try:
        startup.check_schema(ctx.engine)
    except startup.StartupError:
        ctx.close()
        raise
    return ctx


def create_app_from_env() -> Starlette:
    """App factory for uvicorn (``coordinator.app:create_app_from_env``, factory=True)."""
    data_dir = os.environ.get(DATA_DIR_ENV)
    if not data_dir:
        raise StartupError(f"set {DATA_DIR_ENV} to the coordinator's data directory")
    return create_app(open_coordinator(data_dir))
