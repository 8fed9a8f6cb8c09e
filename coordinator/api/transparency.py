"""The transparency log's HTTP API: public checkpoints and proofs, silos' cosignatures.

Mounted at ``/api/v1/log`` (docs/protocol.md, "Transparency log"). No token: anyone
may fetch checkpoints and proofs -- they reveal sizes and hashes, never entries -- and a
cosignature authenticates itself. :func:`admin_routes` (mounted at ``/api/admin/log``)
lets an operator issue a checkpoint on demand.
"""

from __future__ import annotations

import base64
import re
from datetime import timedelta

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from coordinator import audit, checkpoints, transparency
from coordinator.api._params import field, json_object, path_int, query_int
from coordinator.api.auth import Principal, guarded
from coordinator.context import Coordinator
from coordinator.errors import ApiError, CoordinatorError, Reason
from coordinator.models import Cosignature, Role
from privacy.errors import KeyFileError
from privacy.keys import b64d, signing_public_from_raw
from coordinator.openapi import describe, path_param, query

__all__ = ["admin_routes", "routes"]

#: Most cosignatures one may ask for: more than any federation has silos, and within a
#: 32-bit column comparison on every database.
MAX_COSIGNATURES = 1_000_000

_NOTE = "text/plain; charset=utf-8"
_INT = {"type": "integer", "minimum": 0}
_B64_LIST = {"type": "array", "items": {"type": "string", "contentEncoding": "base64"}}
_CONSISTENCY = {"type": "object", "required": ["old", "new", "proof"],
                "properties": {"old": _INT, "new": _INT, "proof": _B64_LIST}}
_INCLUSION = {"type": "object", "required": ["index", "size", "leaf_hash", "proof"],
              "properties": {"index": _INT, "size": _INT, "leaf_hash": {"type": "string"}, "proof": _B64_LIST}}
_COSIGN_BODY = {"type": "object", "required": ["size", "cosignature"],
                "properties": {"size": _INT, "cosignature": {"type": "string"}}}
_COSIGN_OK = {"type": "object", "required": ["size", "timestamp"],
              "properties": {"size": _INT, "silo_id": {"type": "string"}, "witness": {"type": "string"},
                             "timestamp": _INT}}
_WITNESS_BODY = {"type": "object", "required": ["name", "signing_key"], "additionalProperties": False,
                 "properties": {"name": {"type": "string", "pattern": "^[A-Za-z0-9._~-]{1,64}$"},
                                "signing_key": {"type": "string", "pattern": "^[A-Za-z0-9_-]{43}$",
                                                "description": "unpadded base64url of the raw 32-byte Ed25519 key"}}}
_WITNESS_OK = {"type": "object", "required": ["name", "key"],
               "properties": {"name": {"type": "string"}, "key": {"type": "string"}}}
_WITNESS_NAME = re.compile(r"[A-Za-z0-9._~-]{1,64}")
_RAW_KEY = re.compile(r"[A-Za-z0-9_-]{43}")


def _b64(hashes: list[bytes]) -> list[str]:
    return [base64.b64encode(h).decode() for h in hashes]


def routes(ctx: Coordinator, *, interval: timedelta = checkpoints.DEFAULT_INTERVAL) -> list[Route]:
    """The public routes, relative to ``/api/v1/log``."""

    def read(fn):
        def run():
            with ctx.read() as session:
                return fn(session)
        return run_in_threadpool(run)

    def write(fn):
        def run():
            with ctx.transaction() as session:
                return fn(session)
        return run_in_threadpool(run)

    def within_log(session, *sizes: int) -> None:
        size = audit.get_head(session)[0]
        if any(s > size for s in sizes):
            raise ApiError(Reason.INVALID_REQUEST, f"the log has {size} entries")

    @describe("The newest signed checkpoint with every cosignature (C2SP tlog-checkpoint)", tag="log",
              description="Issues a new checkpoint first if the log grew and the interval passed. "
                          "With min_cosignatures, the newest checkpoint that many silos cosigned.",
              parameters=[query("min_cosignatures", {"type": "integer", "minimum": 1, "maximum": MAX_COSIGNATURES})],
              response={"type": "string"}, content_type=_NOTE, errors=[Reason.NOT_FOUND], security=[])
    async def checkpoint(request: Request) -> Response:
        wanted = query_int(request, "min_cosignatures", lo=1, hi=MAX_COSIGNATURES)
        if wanted is None:
            def fresh(session):
                row = checkpoints.latest(session, ctx.identity, ctx.federation_id, ctx.clock(), interval)
                return checkpoints.render(session, row)

            def served(session):
                row = checkpoints.newest(session)
                return None if row is None else checkpoints.render(session, row)

            # only a due checkpoint takes the write lock; a plain fetch reads a snapshot
            text = None
            if not await read(lambda s: checkpoints.due(s, ctx.clock(), interval)):
                text = await read(served)
            return PlainTextResponse(text if text is not None else await write(fresh), media_type=_NOTE)
        return PlainTextResponse(
            await read(lambda s: checkpoints.render(s, checkpoints.newest_cosigned(s, wanted))), media_type=_NOTE)

    @describe("One issued checkpoint by its tree size, with every cosignature", tag="log",
              parameters=[path_param("size")], response={"type": "string"}, content_type=_NOTE,
              errors=[Reason.NOT_FOUND, Reason.INVALID_REQUEST], security=[])
    async def checkpoint_at(request: Request) -> Response:
        size = path_int(request, "size")
        return PlainTextResponse(await read(lambda s: checkpoints.render(s, checkpoints.get(s, size))),
                                 media_type=_NOTE)

    @describe("RFC 9162 consistency proof between two tree sizes", tag="log",
              parameters=[query("old", _INT), query("new", _INT)], response=_CONSISTENCY,
              errors=[Reason.INVALID_REQUEST], security=[])
    async def consistency(request: Request) -> Response:
        old = query_int(request, "old", lo=0)
        new = query_int(request, "new", lo=0)
        if old is None or new is None or old > new:
            raise ApiError(Reason.INVALID_REQUEST, "give old <= new, both tree sizes")

        def proof(session):
            within_log(session, new)
            return transparency.consistency_proof(session, old, new)

        return JSONResponse({"old": old, "new": new, "proof": _b64(await read(proof))})

    @describe("RFC 9162 inclusion proof of one entry (leaf index = seq - 1) in a tree size", tag="log",
              parameters=[query("index", _INT), query("size", _INT)], response=_INCLUSION,
              errors=[Reason.INVALID_REQUEST], security=[])
    async def inclusion(request: Request) -> Response:
        index = query_int(request, "index", lo=0)
        size = query_int(request, "size", lo=1)
        if index is None or size is None or index >= size:
            raise ApiError(Reason.INVALID_REQUEST, "give index < size")

        def proof(session):
            within_log(session, size)
            return transparency.leaf_hash_at(session, index), transparency.inclusion_proof(session, index, size)

        leaf, path = await read(proof)
        return JSONResponse({"index": index, "size": size, "leaf_hash": leaf.hex(), "proof": _b64(path)})

    @describe("Hand back a silo's cosignature (tlog-cosignature/v1) of an issued checkpoint", tag="log",
              description="Authenticated by the cosignature itself: its key name is the silo's witness "
                          "name and it verifies with the silo's enrolled Ed25519 key. Refusals are audited.",
              body=_COSIGN_BODY, response=_COSIGN_OK,
              errors=[Reason.MALFORMED, Reason.NOT_FOUND, Reason.UNKNOWN_SILO, Reason.REVOKED,
                      Reason.BAD_SIGNATURE, Reason.INVALID_REQUEST, Reason.TOO_LARGE], security=[])
    async def cosign(request: Request) -> Response:
        size, line = None, None
        try:
            body = await json_object(request, ctx.config.max_request_bytes)
            size = field(body, "size", int)
            line = field(body, "cosignature", str)
            if size < 0:
                raise ApiError(Reason.INVALID_REQUEST, "size must be >= 0")
            stored = await write(lambda s: checkpoints.add_cosignature(s, ctx.federation_id, size, line,
                                                                       ctx.clock()))
        except CoordinatorError as exc:
            refusal = exc  # the except block unbinds ``exc``; the lambda must not depend on that
            await write(lambda s: checkpoints.record_rejection(s, size, line, refusal, ctx.clock()))
            raise
        who = ({"silo_id": stored.silo_id} if isinstance(stored, Cosignature) else {"witness": stored.witness})
        return JSONResponse({"size": stored.checkpoint_size, **who, "timestamp": stored.timestamp})

    @describe("Verifier keys: the coordinator's (type 0x01) and each enrolled silo's witness key (0x04)",
              tag="log", description="One C2SP verifier key per line, the roster file of python -m "
                                     "privacy.verify_log. Confirm fingerprints with each key's owner.",
              response={"type": "string"}, content_type=_NOTE, security=[])
    async def witnesses(request: Request) -> Response:
        keys = await read(lambda s: checkpoints.verifier_keys(s, ctx.identity, ctx.federation_id))
        return PlainTextResponse("".join(k + "\n" for k in keys), media_type=_NOTE)

    return [
        Route("/witnesses", witnesses, methods=["GET"]),
        Route("/checkpoint", checkpoint, methods=["GET"]),
        Route("/checkpoints/{size}", checkpoint_at, methods=["GET"]),
        Route("/proof/consistency", consistency, methods=["GET"]),
        Route("/proof/inclusion", inclusion, methods=["GET"]),
        Route("/cosignatures", cosign, methods=["POST"]),
    ]


def admin_routes(ctx: Coordinator) -> list[Route]:
    """The operator's routes, relative to ``/api/admin/log``."""

    @guarded(ctx, Role.ADMIN)
    @describe("Issue a checkpoint of the log now (audited: checkpoint_issued)", tag="log",
              response={"type": "string"}, content_type=_NOTE)
    async def issue(request: Request, who: Principal) -> Response:
        def run():
            with ctx.transaction() as session:
                row = checkpoints.issue_on_demand(session, ctx.identity, ctx.federation_id, who.actor, ctx.clock())
                return checkpoints.render(session, row)
        return PlainTextResponse(await run_in_threadpool(run), media_type=_NOTE)

    @guarded(ctx, Role.ADMIN)
    @describe("Register a witness of the log that is not a silo (the helper aggregator), by its Ed25519 key",
              tag="log", description="Its cosignatures (key name <origin>/witness/<name>) are then accepted "
                                     "and served, and its key listed at /api/v1/log/witnesses. Re-registering a "
                                     "name replaces its key. Audited: log_witness_registered.",
              body=_WITNESS_BODY, response=_WITNESS_OK, errors=[Reason.MALFORMED, Reason.INVALID_REQUEST])
    async def register(request: Request, who: Principal) -> Response:
        body = await json_object(request, ctx.config.max_request_bytes)
        if set(body) - {"name", "signing_key"}:
            raise ApiError(Reason.INVALID_REQUEST, "the body holds exactly name and signing_key")
        name = field(body, "name", str)
        raw = field(body, "signing_key", str)
        if not _WITNESS_NAME.fullmatch(name):
            raise ApiError(Reason.INVALID_REQUEST, "name: 1 to 64 letters, digits or ._~-")
        try:
            if not _RAW_KEY.fullmatch(raw):
                raise ValueError(raw)
            key = b64d(raw)
            signing_public_from_raw(key)
        except (KeyFileError, ValueError):
            raise ApiError(Reason.INVALID_REQUEST, "signing_key must be a base64url raw Ed25519 public key") from None

        def run():
            with ctx.transaction() as session:
                return checkpoints.register_witness(session, ctx.federation_id, name, key, who.actor, ctx.clock())
        return JSONResponse({"name": name, "key": await run_in_threadpool(run)})

    return [Route("/checkpoint", issue, methods=["POST"]), Route("/witnesses", register, methods=["POST"])]
