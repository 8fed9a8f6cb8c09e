"""The helper's HTTP API (Starlette): routes parse, call one service function, answer.

``POST /open``           the coordinator asks for a buffer's mask sum (helper.opening)
``POST /enrol``          a silo registers its signing key with its one-time token
``POST /admin/silos``    the operator adds a silo (admin token); ``.../{id}/revoke``
``GET /healthz``         the database answers
``GET /metrics``         Prometheus text: openings, refusals by reason, opening time

With a ``witness.toml``, a background task witnesses the coordinator's transparency log
every interval (helper/witness.py); after a fork ``/open`` answers ``log_forked``.

Every answer of ``/open`` -- the sum and each refusal -- is signed: headers
``Fedsilo-Helper-Statement`` (base64url of a ``helper_response`` statement: status,
SHA-256 of the request body, SHA-256 of the response body) and
``Fedsilo-Helper-Signature``, made with the helper's Ed25519 key like every statement
(docs/protocol.md §6).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from sqlalchemy import select, text
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from coordinator.tokens import hash_token
from privacy import strict_json
from privacy.envelope import canonical_json, sign_statement
from privacy.errors import JsonError
from privacy.keys import b64e

from . import roster, witness
from .config import load_policy
from .db import make_engine, session_factory
from .models import HelperAdminToken
from .opening import MAX_REQUEST, HelperPolicy, Refused, open_buffer

SAFETENSORS = "application/octet-stream"


def _now() -> datetime:
    return datetime.now(UTC)


def signed_response(policy: HelperPolicy, status: int, request_body: bytes, body: bytes, media_type: str) -> Response:
    statement, signature = sign_statement("helper_response", {
        "status": status,
        "request_digest": hashlib.sha256(request_body).hexdigest(),
        "body_digest": hashlib.sha256(body).hexdigest(),
    }, policy.identity.signing)
    return Response(body, status_code=status, media_type=media_type, headers={
        "Fedsilo-Helper-Statement": b64e(statement), "Fedsilo-Helper-Signature": b64e(signature)})


def _error(reason: str, status: int, detail: str) -> JSONResponse:
    return JSONResponse({"reason": reason, "detail": detail}, status_code=status)


def create_app(directory: Path) -> Starlette:
    url, policy = load_policy(directory)
    engine = make_engine(url)
    factory = session_factory(engine)
    registry = CollectorRegistry()
    openings = Counter("fedsilo_helper_openings", "Buffers opened (retries not counted)", registry=registry)
    refusals = Counter("fedsilo_helper_refusals", "Opening requests refused", ["reason"], registry=registry)
    open_seconds = Histogram("fedsilo_helper_open_seconds", "Seconds to decide an opening request that was opened "
                             "(checks, seeds, mask sum, commit; retries not counted)",
                             buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
                             registry=registry)

    async def open_route(request: Request) -> Response:
        body = await request.body()
        if len(body) > MAX_REQUEST:
            return _error("too_large", 413, "the request exceeds the helper's size limit")
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        started = time.perf_counter()
        try:
            opened = await run_in_threadpool(open_buffer, factory, policy, target=target, body=body,
                                             headers=request.headers, now=_now(),
                                             halted=lambda: witness.halted_reason(factory))
        except Refused as refusal:
            refusals.labels(refusal.reason.value).inc()
            answer = canonical_json({"reason": refusal.reason.value, "detail": refusal.detail})
            return signed_response(policy, refusal.reason.status, body, answer, "application/json")
        if not opened.repeated:
            openings.inc()
            open_seconds.observe(time.perf_counter() - started)
        if os.environ.get("FEDSILO_TEST_CRASH_AT") == "helper_opened":  # kill -9 tests: committed, unanswered
            os.kill(os.getpid(), signal.SIGKILL)
        return signed_response(policy, 200, body, opened.answer, SAFETENSORS)

    async def enrol_route(request: Request) -> Response:
        token = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        try:
            obj = strict_json.loads(await request.body(), max_bytes=4096)
        except JsonError as exc:
            return _error("malformed", 400, exc.message)
        if not isinstance(obj, dict) or set(obj) != {"silo_id", "signing_key"} or not all(
                isinstance(v, str) for v in obj.values()):
            return _error("malformed", 400, "the body holds exactly silo_id and signing_key")

        def run() -> None:
            with factory.begin() as session:
                roster.enrol(session, token, obj["silo_id"], obj["signing_key"], now=_now())

        try:
            await run_in_threadpool(run)
        except roster.RosterError as exc:
            return _error(exc.reason, exc.status, exc.detail)
        pub = policy.identity.public()
        return JSONResponse({"silo_id": obj["silo_id"], "helper_keys": pub.to_json(),
                             "helper_fingerprints": pub.fingerprints()})

    def _admin(request: Request) -> bool:
        presented = hash_token(request.headers.get("authorization", "").removeprefix("Bearer ").strip())
        with factory.begin() as session:
            rows = session.execute(select(HelperAdminToken.token_hash)).scalars().all()
        return any(hmac.compare_digest(presented, stored) for stored in rows)

    async def create_silo_route(request: Request) -> Response:
        if not await run_in_threadpool(_admin, request):
            return _error("bad_token", 401, "missing or unknown admin token")
        try:
            obj = strict_json.loads(await request.body(), max_bytes=4096)
        except JsonError as exc:
            return _error("malformed", 400, exc.message)
        silo_id = obj.get("silo_id") if isinstance(obj, dict) else None
        if not isinstance(silo_id, str):
            return _error("malformed", 400, "the body holds silo_id")

        def run() -> str:
            with factory.begin() as session:
                return roster.create_silo(session, silo_id, actor="admin", now=_now())

        try:
            token = await run_in_threadpool(run)
        except roster.RosterError as exc:
            return _error(exc.reason, exc.status, exc.detail)
        return JSONResponse({"silo_id": silo_id, "token": token}, status_code=201)

    async def revoke_route(request: Request) -> Response:
        if not await run_in_threadpool(_admin, request):
            return _error("bad_token", 401, "missing or unknown admin token")
        silo_id = request.path_params["silo_id"]

        def run() -> None:
            with factory.begin() as session:
                roster.revoke(session, silo_id, actor="admin", now=_now())

        try:
            await run_in_threadpool(run)
        except roster.RosterError as exc:
            return _error(exc.reason, exc.status, exc.detail)
        return JSONResponse({"silo_id": silo_id, "revoked": True})

    async def healthz(request: Request) -> Response:
        def probe() -> str | None:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return witness.halted_reason(factory)

        try:
            halted = await run_in_threadpool(probe)
        except Exception as exc:  # the database is the helper's one dependency
            return JSONResponse({"status": "unavailable", "detail": type(exc).__name__}, status_code=503)
        return JSONResponse({"status": "ok", "federation": policy.federation,
                             "helper_fingerprints": policy.identity.public().fingerprints(),
                             "log_forked": halted})

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")

    settings = witness.load_settings(directory)

    async def witness_loop() -> None:
        """Witness the coordinator's log every interval while serving (helper/witness.py)."""
        while True:
            try:
                await run_in_threadpool(witness.witness_round, factory, policy, settings, now=_now())
            except Exception:  # a database hiccup must not end witnessing for good
                witness.log.exception("witnessing failed this round")
            await asyncio.sleep(settings.interval_seconds)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(witness_loop()) if settings is not None else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
            engine.dispose()

    return Starlette(routes=[
        Route("/open", open_route, methods=["POST"]),
        Route("/enrol", enrol_route, methods=["POST"]),
        Route("/admin/silos", create_silo_route, methods=["POST"]),
        Route("/admin/silos/{silo_id}/revoke", revoke_route, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ], lifespan=lifespan)
