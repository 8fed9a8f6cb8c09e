"""The silo API, mounted at ``/api/v1`` (docs/protocol.md is the wire format).

Thin routes: each parses the request, calls one service in a worker thread
(:mod:`coordinator.silos`, :mod:`coordinator.ingest`) and serializes the answer.
Errors are raised, never caught here: ``coordinator.api.errors`` renders them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from privacy.keys import b64e

from .. import ingest, silos, uploads
from ..context import Coordinator
from ..model_store import ReleaseStream
from ..pacing import MAX_DECLARED_ROUND
from ._params import MAX_VERSION, json_object, query_int, query_positive, read_body

__all__ = ["routes", "target_of"]


def target_of(request: Request) -> str:
    """The request target exactly as sent (path and query string), which silos sign."""
    path = request.scope.get("raw_path") or request.url.path.encode()
    query = request.scope.get("query_string") or b""
    return (path + (b"?" + query if query else b"")).decode("latin-1")


async def _streamed(stream: ReleaseStream) -> AsyncIterator[bytes]:
    """The stream's chunks, each read in a worker thread; closed however the response
    ends (done, client gone, server stopping), so its snapshot never outlives it."""
    try:
        while chunk := await run_in_threadpool(stream.read):
            yield chunk
    finally:
        with anyio.CancelScope(shield=True):
            await run_in_threadpool(stream.close)


def routes(ctx: Coordinator) -> list[Route]:
    """The silo-facing routes, relative to their mount point ``/api/v1``."""
    limit = ctx.config.max_request_bytes

    async def signed(request: Request) -> silos.SignedRequest:
        body = await read_body(request, limit)
        return silos.SignedRequest(request.method, target_of(request), body, request.headers)

    async def enroll(request: Request) -> Response:
        body = await json_object(request, limit)
        remote = request.client.host if request.client else None
        return JSONResponse(await run_in_threadpool(silos.enroll, ctx, body, remote=remote))

    async def model(request: Request) -> Response:
        version = query_int(request, "version", lo=0, hi=MAX_VERSION)
        declared = query_positive(request, "round_seconds", hi=MAX_DECLARED_ROUND)
        req = await signed(request)
        stream, hint = await run_in_threadpool(silos.model, ctx, req, version, declared)
        release = stream.release
        headers = {
            "Content-Length": str(release.size),
            "Fedsilo-Version": str(release.version),
            "Fedsilo-Release": b64e(release.statement),
            "Fedsilo-Release-Signature": b64e(release.signature),
            "ETag": f'"{release.digest}"',
            "Cache-Control": "no-store",
        }
        if hint is not None:
            headers["Fedsilo-Pacing"] = b64e(hint.statement)
            headers["Fedsilo-Pacing-Signature"] = b64e(hint.signature)
        return StreamingResponse(_streamed(stream), media_type="application/octet-stream", headers=headers)

    async def status(request: Request) -> Response:
        req = await signed(request)
        return JSONResponse(await run_in_threadpool(silos.status, ctx, req))

    async def updates(request: Request) -> Response:
        # Sender, length and in-flight limits are checked before the body is read.
        upload = await uploads.receive(ctx, request.method, target_of(request), request.headers, request.stream())
        try:
            outcome = await ingest.ingest(ctx, upload)
        finally:
            upload.close()
        return JSONResponse(outcome.body)

    return [
        Route("/enroll", enroll, methods=["POST"]),
        Route("/model", model, methods=["GET"]),
        Route("/status", status, methods=["GET"]),
        Route("/updates", updates, methods=["POST"]),
    ]
