"""The composition root: build the Starlette app from a running Coordinator.

:func:`create_app` only wires routes, the exception handlers and a lifespan that
closes the engine; nothing happens at import time. ``fedsilo-coordinator serve``
runs :func:`create_app_from_env` under uvicorn as a factory (one per worker
process), reading the data directory from ``FEDSILO_DATA_DIR``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from privacy.errors import KeyFileError

from . import db, federation, openapi
from .api import admin, audit, silo
from .api.errors import exception_handlers
from .config import ConfigError, CoordinatorConfig
from .context import Coordinator

__all__ = ["DATA_DIR_ENV", "create_app", "create_app_from_env", "open_coordinator"]

DATA_DIR_ENV = "FEDSILO_DATA_DIR"


def create_app(ctx: Coordinator) -> Starlette:
    """The coordinator's HTTP application around ``ctx`` (which it closes at shutdown)."""

    async def healthz(request: Request) -> Response:
        def probe() -> int:
            with ctx.read() as s:
                return federation.current_version(s, ctx.federation_id)

        try:
            version = await run_in_threadpool(probe)
        except Exception:  # the process is up but cannot serve: say so, do not crash
            return JSONResponse({"status": "unavailable", "database": "unreachable"}, status_code=503)
        return JSONResponse({"status": "ok", "database": "ok", "current_version": version})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            ctx.close()

    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        *ctx.metrics.routes(),
        Mount("/api/v1", routes=silo.routes(ctx)),
        Mount("/api/admin", routes=admin.routes(ctx)),
        Mount("/api/audit", routes=audit.routes(ctx)),
        *openapi.routes(),
    ]
    return Starlette(routes=routes, exception_handlers=exception_handlers(), lifespan=lifespan)


class StartupError(Exception):
    """The coordinator cannot start; the message says what to do."""


def open_coordinator(data_dir: Path | str) -> Coordinator:
    """Load the configuration and keys of ``data_dir`` and open its database.

    Refuses (StartupError) a directory that was never initialised or a database
    whose schema is not at this version's head.
    """
    data_dir = Path(data_dir)
    if not (data_dir / "coordinator.toml").exists():
        raise StartupError(f"{data_dir} is not a coordinator data directory; run: fedsilo-coordinator init --data-dir {data_dir}")
    try:
        config = CoordinatorConfig.load(data_dir)
    except ConfigError as exc:
        raise StartupError(str(exc)) from None
    try:
        ctx = Coordinator.open(config)
    except KeyFileError as exc:
        raise StartupError(f"cannot load the coordinator's keys: {exc.message}") from None
    try:
        current, head = db.current_revision(ctx.engine), db.head_revision()
    except Exception as exc:
        ctx.close()
        raise StartupError(f"cannot reach the database: {exc}") from None
    if current != head:
        ctx.close()
        raise StartupError(
            f"the database schema is at {current!r}, this coordinator needs {head!r}; "
            "run: fedsilo-coordinator migrate --data-dir DIR"
        )
    return ctx


def create_app_from_env() -> Starlette:
    """App factory for uvicorn (``coordinator.app:create_app_from_env``, factory=True)."""
    data_dir = os.environ.get(DATA_DIR_ENV)
    if not data_dir:
        raise StartupError(f"set {DATA_DIR_ENV} to the coordinator's data directory")
    return create_app(open_coordinator(data_dir))
