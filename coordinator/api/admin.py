"""The operator's HTTP API, mounted at ``/api/admin`` (docs/operations.md).

Thin routes: parse, call one service (``coordinator.admin``, ``coordinator.enrolment``,
``coordinator.tokens``), serialize. Every route is bearer-guarded: listings admit
``admin`` and ``auditor``, anything that changes state admits ``admin`` only. Each
change is audited by its service in the same transaction as the change.
"""

from __future__ import annotations

import functools

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from coordinator import admin, enrolment, tokens
from coordinator.api._routing import merged
from coordinator.api._params import MAX_VERSION, field, json_object, path_int, path_str, query_int, query_str
from coordinator.api._threads import in_read, in_transaction
from coordinator.api.auth import ADMIN, ANY_ROLE, Principal, guarded
from coordinator.context import Coordinator
from coordinator.models import ApiToken, SiloStatus, UpdateStatus
from coordinator.errors import Reason
from coordinator.openapi import TEXT_PARAM, describe, integer, path_param, query
from privacy.envelope import utc_timestamp
from privacy.keys import b64e

__all__ = ["routes", "token_json"]

_STR = {"type": "string"}

_LIMIT = query("limit", integer(1, admin.MAX_LIMIT),
               f"page size (default {admin.DEFAULT_LIMIT}, at most {admin.MAX_LIMIT})")


def token_json(row: ApiToken) -> dict:
    """A token's public fields (never its hash)."""
    return {
        "token_id": row.id,
        "name": row.name,
        "role": row.role,
        "created_at": utc_timestamp(row.created_at),
        "revoked_at": utc_timestamp(row.revoked_at) if row.revoked_at else None,
        "last_used_at": utc_timestamp(row.last_used_at) if row.last_used_at else None,
    }


def _limit(request: Request) -> int:
    return query_int(request, "limit", default=admin.DEFAULT_LIMIT, lo=1, hi=admin.MAX_LIMIT)


def routes(ctx: Coordinator) -> list[Route]:
    """The admin routes, relative to their mount point."""
    fid = ctx.federation_id
    body_limit = ctx.config.max_request_bytes

    read = functools.partial(in_read, ctx)
    write = functools.partial(in_transaction, ctx)

    # ------------------------------------------------------------------ silos

    @guarded(ctx, *ADMIN)
    @describe("Create a silo with a privacy budget; returns its one-time enrolment token",
              tag="silos", body="CreateSilo", response="SiloCreated", status=201,
              errors=[Reason.TOO_LARGE, Reason.INVALID_REQUEST, Reason.CONFLICT])
    async def create_silo(request: Request, who: Principal) -> Response:
        body = await json_object(request, body_limit)
        new = await write(
            enrolment.create_silo,
            name=field(body, "name", str),
            epsilon_cap=field(body, "epsilon_cap", (int, float)),
            delta=field(body, "delta", (int, float)),
            actor=who.actor,
            now=ctx.clock(),
            ttl_seconds=ctx.config.enrolment_token_ttl_seconds,
            federation_id=fid,
        )
        return JSONResponse(new.to_json(), status_code=201)

    @guarded(ctx, *ANY_ROLE)
    @describe("List silos with budget spent, cap, last seen and update counts", tag="silos",
              parameters=[query("status", {"enum": list(SiloStatus)}, "only silos with this status")],
              response="SiloList")
    async def list_silos(request: Request, who: Principal) -> Response:
        status = query_str(request, "status", choices=tuple(SiloStatus))
        silos = await read(admin.list_silos, federation_id=fid, status=status)
        return JSONResponse({"silos": [s.to_json() for s in silos]})

    @guarded(ctx, *ANY_ROLE)
    @describe("One silo", tag="silos", parameters=[path_param("silo_id")], response="Silo",
              errors=[Reason.NOT_FOUND])
    async def get_silo(request: Request, who: Principal) -> Response:
        silo = await read(admin.get_silo, path_str(request, "silo_id"), federation_id=fid)
        return JSONResponse(silo.to_json())

    @guarded(ctx, *ADMIN)
    @describe("Revoke a silo: its signatures stop being accepted at once", tag="silos",
              parameters=[path_param("silo_id")],
              body={"type": "object", "properties": {"reason": {"anyOf": [_STR, {"type": "null"}]}}},
              body_required=False, response="Silo",
              errors=[Reason.TOO_LARGE, Reason.INVALID_REQUEST, Reason.NOT_FOUND])
    async def revoke_silo(request: Request, who: Principal) -> Response:
        silo_id = path_str(request, "silo_id")
        body = await json_object(request, body_limit, optional=True)
        await write(enrolment.revoke_silo, silo_id, actor=who.actor, now=ctx.clock(),
                    reason=field(body, "reason", str, required=False))
        return JSONResponse((await read(admin.get_silo, silo_id, federation_id=fid)).to_json())

    # ------------------------------------------------------------- federation

    @guarded(ctx, *ANY_ROLE)
    @describe("The federation: task, schema, current version, strategy settings", tag="federation",
              response="Federation")
    async def get_federation(request: Request, who: Principal) -> Response:
        return JSONResponse((await read(admin.get_federation, federation_id=fid)).to_json())

    @guarded(ctx, *ADMIN)
    @describe("Change strategy settings (partial; validated as a whole; audited)", tag="federation",
              body="SettingsChange", response="Federation",
              errors=[Reason.TOO_LARGE, Reason.INVALID_REQUEST, Reason.CONFLICT])
    async def patch_federation(request: Request, who: Principal) -> Response:
        body = await json_object(request, body_limit)
        settings = field(body, "settings", dict)
        info = await write(admin.change_settings, settings, actor=who.actor, now=ctx.clock(), federation_id=fid)
        return JSONResponse(info.to_json())

    # --------------------------------------------------------------- versions

    @guarded(ctx, *ANY_ROLE)
    @describe("Model versions, oldest first (metadata only)", tag="versions",
              parameters=[query("after", integer(-1, MAX_VERSION), "list versions after this one"), _LIMIT],
              response="VersionPage")
    async def list_versions(request: Request, who: Principal) -> Response:
        page = await read(admin.list_versions, after=query_int(request, "after", lo=-1, hi=MAX_VERSION),
                          limit=_limit(request), federation_id=fid)
        return JSONResponse({"versions": [v.to_json() for v in page.items], "next_after": page.next_after})

    @guarded(ctx, *ANY_ROLE)
    @describe("One model version's metadata", tag="versions",
              parameters=[path_param("version", integer(0, MAX_VERSION))],
              response="Version", errors=[Reason.UNKNOWN_VERSION])
    async def get_version(request: Request, who: Principal) -> Response:
        info = await read(admin.get_version, path_int(request, "version", hi=MAX_VERSION), federation_id=fid)
        return JSONResponse(info.to_json())

    @guarded(ctx, *ANY_ROLE)
    @describe("Download a version's weights (safetensors) with the signed release headers", tag="versions",
              parameters=[path_param("version", integer(0, MAX_VERSION))],
              response={"type": "string", "format": "binary"},
              content_type="application/octet-stream",
              response_headers={"Fedsilo-Version": "the version", "Fedsilo-Release": "base64url statement",
                                "Fedsilo-Release-Signature": "base64url signature"},
              errors=[Reason.UNKNOWN_VERSION])
    async def version_weights(request: Request, who: Principal) -> Response:
        rel = await read(admin.model_release, path_int(request, "version", hi=MAX_VERSION), identity=ctx.identity,
                         federation_id=fid, releases=ctx.releases)
        return Response(
            rel.blob,
            media_type="application/octet-stream",
            headers={
                "Fedsilo-Version": str(rel.version),
                "Fedsilo-Release": b64e(rel.statement),
                "Fedsilo-Release-Signature": b64e(rel.signature),
                "Content-Disposition": f'attachment; filename="model-v{rel.version}.safetensors"',
            },
        )

    # ---------------------------------------------------------------- updates

    @guarded(ctx, *ANY_ROLE)
    @describe("Updates in the order received, with filters and keyset paging", tag="updates",
              parameters=[query("silo_id", TEXT_PARAM), query("status", {"enum": list(UpdateStatus)}),
                          query("reason", TEXT_PARAM, "rejection reason code"),
                          query("after", TEXT_PARAM, "the last update_id of the previous page"), _LIMIT],
              response="UpdatePage", errors=[Reason.INVALID_REQUEST, Reason.NOT_FOUND])
    async def list_updates(request: Request, who: Principal) -> Response:
        page = await read(
            admin.list_updates,
            silo_id=query_str(request, "silo_id"),
            status=query_str(request, "status", choices=tuple(UpdateStatus)),
            reason=query_str(request, "reason"),
            after=query_str(request, "after"),
            limit=_limit(request),
            federation_id=fid,
        )
        return JSONResponse({"updates": [u.to_json() for u in page.items], "next_after": page.next_after})

    @guarded(ctx, *ANY_ROLE)
    @describe("One update with its signed header", tag="updates", parameters=[path_param("update_id")],
              response="Update", errors=[Reason.NOT_FOUND])
    async def get_update(request: Request, who: Principal) -> Response:
        return JSONResponse((await read(admin.get_update, path_str(request, "update_id"))).to_json())

    # ----------------------------------------------------------------- tokens

    @guarded(ctx, *ADMIN)
    @describe("Create an API token (admin or auditor); the token is shown once", tag="tokens",
              body="CreateToken", response="TokenCreated", status=201,
              errors=[Reason.TOO_LARGE, Reason.INVALID_REQUEST, Reason.CONFLICT])
    async def create_token(request: Request, who: Principal) -> Response:
        body = await json_object(request, body_limit)
        token, row = await write(tokens.create_token, name=field(body, "name", str),
                                 role=field(body, "role", str), actor=who.actor, now=ctx.clock())
        return JSONResponse({**token_json(row), "token": token}, status_code=201)

    @guarded(ctx, *ANY_ROLE)
    @describe("List API tokens (never the tokens themselves)", tag="tokens", response="TokenList")
    async def list_tokens(request: Request, who: Principal) -> Response:
        rows = await read(tokens.list_tokens)
        return JSONResponse({"tokens": [token_json(r) for r in rows]})

    @guarded(ctx, *ADMIN)
    @describe("Revoke an API token; it stops working at once", tag="tokens",
              parameters=[path_param("token_id")], response="Token",
              errors=[Reason.NOT_FOUND, Reason.CONFLICT])
    async def revoke_token(request: Request, who: Principal) -> Response:
        row = await write(tokens.revoke_token, path_str(request, "token_id"), actor=who.actor, now=ctx.clock())
        return JSONResponse(token_json(row))

    return merged([
        Route("/silos", create_silo, methods=["POST"]),
        Route("/silos", list_silos, methods=["GET"]),
        Route("/silos/{silo_id}", get_silo, methods=["GET"]),
        Route("/silos/{silo_id}/revoke", revoke_silo, methods=["POST"]),
        Route("/federation", get_federation, methods=["GET"]),
        Route("/federation", patch_federation, methods=["PATCH"]),
        Route("/versions", list_versions, methods=["GET"]),
        Route("/versions/{version}", get_version, methods=["GET"]),
        Route("/versions/{version}/weights", version_weights, methods=["GET"]),
        Route("/updates", list_updates, methods=["GET"]),
        Route("/updates/{update_id}", get_update, methods=["GET"]),
        Route("/tokens", create_token, methods=["POST"]),
        Route("/tokens", list_tokens, methods=["GET"]),
        Route("/tokens/{token_id}/revoke", revoke_token, methods=["POST"]),
    ])
