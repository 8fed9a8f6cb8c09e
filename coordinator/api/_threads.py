"""Running a service off the event loop, inside one transaction.

Services are synchronous functions ``fn(session, ...)`` (SQLAlchemy and the crypto are
blocking); a route awaits them in a worker thread so the event loop keeps serving.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from starlette.concurrency import run_in_threadpool

from coordinator.context import Coordinator

T = TypeVar("T")


async def in_read(ctx: Coordinator, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``fn(session, *args, **kwargs)`` in one read-only transaction, in a worker thread."""

    def run() -> T:
        with ctx.read() as session:
            return fn(session, *args, **kwargs)

    return await run_in_threadpool(run)


async def in_transaction(ctx: Coordinator, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``fn(session, *args, **kwargs)`` in one write transaction, in a worker thread."""

    def run() -> T:
        with ctx.transaction() as session:
            return fn(session, *args, **kwargs)

    return await run_in_threadpool(run)
