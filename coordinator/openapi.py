"""The OpenAPI 3.1 description of every route, served at ``/openapi.json``.

The document is built from the application's own routing table, so it cannot list a
route that does not exist. Each operation's text comes from the endpoint itself
(:func:`describe`, used by the admin and audit routes) or, for routes defined
elsewhere (silo API, health), from :data:`OPERATIONS` below. A route documented
nowhere still appears, marked ``x-undocumented``; a test fails if any does.

Security schemes: ``bearer`` (admin and audit API; the roles allowed are listed in
``x-roles``), ``siloSignature`` (silo requests signed with the silo's enrolled
Ed25519 key, docs/protocol.md). ``POST /api/v1/updates`` is a signed request too, over
the body digest it declares in ``Fedsilo-Content-SHA256`` (checked before the body is
read), and its envelope carries its own signature; ``POST /api/v1/enroll`` is
authenticated by its one-time token.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Mount, Route

from coordinator.api._params import MAX_INT, MAX_NUMBER, MAX_STR, MAX_VERSION
from coordinator.api._routing import BY_METHOD
from coordinator.api.auth import roles_of
from coordinator.pacing import MAX_DECLARED_ROUND
from coordinator.strategies import DEFAULT_MAX_UPDATE_NORM, MAX_EPSILON_LEAD, MAX_INT_SETTING, MAX_UPDATE_NORM_LIMIT
from privacy.reasons import Reason

__all__ = [
    "OPERATIONS", "SCHEMAS", "TEXT_PARAM", "build_spec", "describe", "integer", "iter_operations", "path_param",
    "query", "routes",
]

_ATTR = "__openapi__"
_CONVERTER = re.compile(r"{([^}:]+)(:[^}]+)?}")


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(required: Iterable[str] = (), **props: Any) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        schema["required"] = list(required)
    return schema


_STR = {"type": "string"}
_INT = {"type": "integer"}
_NUM = {"type": "number"}
_BOOL = {"type": "boolean"}
_TIME = {"type": "string", "format": "date-time", "description": "ISO 8601 UTC with microseconds and Z"}
_B64 = {"type": "string", "contentEncoding": "base64url", "description": "unpadded base64url"}


#: A string path or query parameter as :mod:`coordinator.api._params` reads it.
TEXT_PARAM = {"type": "string", "maxLength": MAX_STR, "pattern": "^[^\\x00]*$"}


def integer(lo: int = -MAX_INT, hi: int = MAX_INT) -> dict[str, Any]:
    """An integer parameter's schema: every one is range-checked (api._params)."""
    return {"type": "integer", "minimum": max(lo, -MAX_INT), "maximum": min(hi, MAX_INT)}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


_POSITIVE = {"type": "number", "exclusiveMinimum": 0}
# The names the services accept (coordinator.enrolment, coordinator.tokens).
_SILO_NAME = "^[A-Za-z0-9][A-Za-z0-9 ._@:+-]{0,199}$"
_TOKEN_NAME = "^[A-Za-z0-9][A-Za-z0-9._@:+-]{0,127}$"
# A raw 32-byte public key, unpadded base64url (canonical: 43 characters).
_KEY = {**_B64, "pattern": "^[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]$"}

SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": _obj(
        ["reason", "detail"],
        reason={"type": "string", "enum": [r.value for r in Reason]},
        detail=_STR,
        audit_seq=_INT,
    ),
    "Silo": _obj(
        ["silo_id", "name", "status", "epsilon_spent", "epsilon_cap", "delta"],
        silo_id=_STR, name=_STR, status={"enum": ["pending", "active", "revoked"]},
        epsilon_spent=_NUM, epsilon_cap=_NUM, delta=_NUM, fingerprint=_nullable(_STR),
        created_at=_TIME, enrolled_at=_nullable(_TIME), last_seen_at=_nullable(_TIME),
        revoked_at=_nullable(_TIME), updates_accepted=_INT, updates_buffered=_INT, updates_rejected=_INT,
    ),
    "SiloList": _obj(["silos"], silos={"type": "array", "items": _ref("Silo")}),
    "CreateSilo": _obj(["name", "epsilon_cap", "delta"],
                       name={"type": "string", "pattern": _SILO_NAME},
                       epsilon_cap={"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1e6},
                       delta={"type": "number", "exclusiveMinimum": 0, "maximum": 1e-3}),
    "SiloCreated": _obj(
        ["silo_id", "name", "enrolment_token", "expires_at"],
        silo_id=_STR, name=_STR, enrolment_token={**_STR, "description": "shown once"}, expires_at=_TIME,
    ),
    "Settings": {
        "type": "object",
        "description": "strategy settings (coordinator.strategies.StrategySettings)",
        "properties": {
            "strategy": {"enum": ["fedasync", "fedbuff"]},
            "alpha": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            "staleness": {"enum": ["constant", "polynomial", "hinge"]},
            "poly_a": _POSITIVE, "hinge_a": _POSITIVE, "server_lr": _POSITIVE,
            "hinge_b": integer(0, MAX_INT_SETTING), "max_staleness": integer(0, MAX_INT_SETTING),
            "buffer_k": integer(1, MAX_INT_SETTING),
            "max_update_norm": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_UPDATE_NORM_LIMIT,
                                "description": f"always in force (default {DEFAULT_MAX_UPDATE_NORM:g}); "
                                               "may be raised, never removed"},
            "server_optimizer": {"enum": ["none", "fedadam", "fedyogi", "fedadagrad"]},
            "beta1": {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
            "beta2": {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
            "tau": _POSITIVE, "compression": {"enum": ["none", "int8", "topk"]},
            "calibration": {"enum": ["none", "ca2fl"],
                            "description": "FedBuff only, not with secure_aggregation: CA2FL's cached-update "
                                           "calibration (docs/operations.md)"},
            "step_damping": {"enum": ["none", "noise"],
                             "description": "FedBuff only: noise scales server_lr by the mean of "
                                            "1/(1+sigma^2) over the step's updates' declared noise "
                                            "multipliers (docs/operations.md)"},
            "pacing": {"type": "boolean", "description": "signed start/wait hints on model pulls (default true)"},
            "epsilon_lead": _nullable({"type": "number", "minimum": 1, "maximum": MAX_EPSILON_LEAD,
                                       "description": "null: off. Pacing holds a silo whose spent epsilon is "
                                                      "more than this many times the median silo's "
                                                      "(docs/operations.md, Pacing)"}),
            "secure_aggregation": _nullable({
                "type": "object",
                "description": "secure aggregation with a helper (docs/secure-aggregation.md); null: off. "
                               "FedBuff only; k_min <= buffer_k <= mask.max_updates; the mask must not wrap. "
                               "Changing it while the buffer holds updates is 409 conflict",
                "required": ["mode", "helper_url", "helper_signing_key", "helper_hpke_key", "k_min", "mask"],
                "properties": {
                    "mode": {"enum": ["helper"]}, "helper_url": _STR, "helper_signing_key": _STR,
                    "helper_hpke_key": _STR, "k_min": integer(2, MAX_INT_SETTING),
                    "mask": {"type": "object", "required": ["clip", "scale", "max_updates", "max_weight"],
                             "properties": {"clip": _POSITIVE, "scale": _POSITIVE, "max_updates": _INT,
                                            "max_weight": _INT},
                             "additionalProperties": False},
                },
                "additionalProperties": False,
            }),
        },
        "additionalProperties": False,
        "minProperties": 1,
    },
    "SettingsChange": _obj(["settings"], settings=_ref("Settings")),
    "Federation": _obj(
        ["name", "current_version", "settings"],
        name=_STR, task=_obj(name=_STR, options={"type": "object"}),
        schema={"type": "array", "items": _obj(name=_STR, shape={"type": "array", "items": _INT}, dtype=_STR)},
        schema_digest=_STR, current_version=_INT, settings=_ref("Settings"), buffered_updates=_INT,
        created_at=_TIME,
    ),
    "Version": _obj(
        ["version", "digest", "size", "retained"],
        version=_INT, digest=_STR, size=_INT, parent_version=_nullable(_INT),
        produced_by_update=_nullable(_STR), created_at=_TIME, retained=_BOOL, metrics={"type": "object"},
    ),
    "VersionPage": _obj(["versions", "next_after"], versions={"type": "array", "items": _ref("Version")},
                        next_after=_nullable(_INT)),
    "Update": _obj(
        ["update_id", "silo_id", "status"],
        update_id=_STR, silo_id=_STR, status={"enum": ["accepted", "buffered", "rejected"]},
        reason=_nullable(_STR), base_version=_INT, resulting_version=_nullable(_INT),
        staleness=_nullable(_INT), weight=_nullable(_NUM), num_samples=_INT, size=_INT,
        epsilon_claimed=_nullable(_NUM), epsilon_computed=_nullable(_NUM), envelope_digest=_STR,
        payload_digest=_STR, received_at=_TIME, decided_at=_TIME, header={"type": "object"},
    ),
    "UpdatePage": _obj(["updates", "next_after"], updates={"type": "array", "items": _ref("Update")},
                       next_after=_nullable(_STR)),
    "Token": _obj(
        ["token_id", "name", "role"],
        token_id=_STR, name=_STR, role={"enum": ["admin", "auditor"]}, created_at=_TIME,
        revoked_at=_nullable(_TIME), last_used_at=_nullable(_TIME),
    ),
    "TokenList": _obj(["tokens"], tokens={"type": "array", "items": _ref("Token")}),
    "CreateToken": _obj(["name", "role"], name={"type": "string", "pattern": _TOKEN_NAME},
                        role={"enum": ["admin", "auditor"]}),
    "TokenCreated": {
        "allOf": [_ref("Token"), _obj(["token"], token={**_STR, "description": "fst_<id>_<secret>, shown once"})]
    },
    "AuditEvent": _obj(
        ["seq", "at", "actor", "action", "subject", "details", "prev_hash", "hash"],
        seq=_INT, at=_STR, actor=_STR, action=_STR, subject=_STR, details={"type": "object"},
        prev_hash=_STR, hash=_STR,
    ),
    "EventPage": _obj(["events", "next_after_seq"], events={"type": "array", "items": _ref("AuditEvent")},
                      next_after_seq=_nullable(_INT)),
    "VerifyResult": _obj(
        ["ok", "checked", "first_bad_seq", "problem", "head_seq", "head_hash"],
        ok=_BOOL, checked=_INT, first_bad_seq=_nullable(_INT), problem=_nullable(_STR), message=_nullable(_STR),
        head_seq=_INT, head_hash=_STR,
    ),
    "BudgetEntry": _obj(
        ["update_id", "noise_multiplier", "sample_rate", "steps"],
        update_id=_STR, noise_multiplier=_NUM, sample_rate=_NUM, steps=_INT, max_grad_norm=_NUM, delta=_NUM,
        accountant=_STR, epsilon_after=_NUM, epsilon_claimed=_nullable(_NUM), created_at=_TIME,
    ),
    "Budget": _obj(
        ["silo_id", "epsilon_spent", "epsilon_cap", "delta", "history_length"],
        silo_id=_STR, name=_STR, status=_STR, accountant=_STR, delta=_NUM, epsilon_cap=_NUM, epsilon_spent=_NUM,
        epsilon_recorded=_NUM, epsilon_claimed=_nullable(_NUM), epsilon_remaining=_NUM, consistent=_BOOL,
        history_length=_INT, history={"type": "array", "items": _ref("BudgetEntry")},
    ),
    "BudgetList": _obj(["budgets"], budgets={"type": "array", "items": _ref("Budget")}),
    # silo API
    "EnrollRequest": _obj(
        ["token", "signing_key", "hpke_key"], token=_STR, signing_key=_KEY, hpke_key=_KEY,
        coordinator_fingerprint={"type": "string", "pattern": "^SHA256:[0-9a-f]{2}(:[0-9a-f]{2}){15}$",
                                 "description": "the fingerprint the silo expects; a mismatch is refused "
                                                "before the token is spent"},
    ),
    "EnrollResponse": _obj(
        ["silo_id", "name", "federation", "budget", "coordinator", "statement", "signature"],
        silo_id=_STR, name=_STR, federation={"type": "object"}, budget={"type": "object"},
        coordinator=_obj(signing_key=_B64, hpke_key=_B64, fingerprints={"type": "object"}),
        statement=_B64, signature=_B64,
    ),
    "SiloStatus": _obj(
        ["silo_id", "status", "epsilon_spent", "epsilon_cap"],
        silo_id=_STR, status=_STR, epsilon_spent=_NUM, epsilon_cap=_NUM, delta=_NUM, accountant=_STR,
        history={"type": "array", "items": {"type": "object"}}, updates_accepted=_INT, current_version=_INT,
    ),
    "Receipt": _obj(
        ["status", "receipt", "signature"],
        status={"enum": ["accepted", "buffered", "rejected"]}, receipt=_B64, signature=_B64,
        update_id=_STR, resulting_version=_nullable(_INT), audit_seq=_INT, audit_hash=_STR,
        leaf_index=_INT, tree_size=_INT, leaf_hash=_STR,
        charged={**_BOOL, "description": "rejections: whether the silo's budget was charged (payload decrypted)"},
        epsilon_computed=_nullable(_NUM),
    ),
    "Health": _obj(["status"], status=_STR),
}

_SECURITY_SCHEMES = {
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "An admin or auditor API token, fst_<token_id>_<secret> (docs/operations.md).",
    },
    "siloSignature": {
        "type": "apiKey",
        "in": "header",
        "name": "Fedsilo-Signature",
        "description": (
            "Ed25519 signature by the silo's enrolled key over the method, path and query, silo id, "
            "timestamp, nonce and body digest; sent with Fedsilo-Silo, Fedsilo-Timestamp and "
            "Fedsilo-Nonce (docs/protocol.md, privacy.envelope.sign_request)."
        ),
    },
}


# ------------------------------------------------------------------- describing operations


def query(name: str, schema: dict[str, Any], description: str = "", *, required: bool = False) -> dict[str, Any]:
    """An OpenAPI query parameter."""
    return {"name": name, "in": "query", "required": required, "schema": schema, "description": description}


def path_param(name: str, schema: dict[str, Any] | None = None, description: str = "") -> dict[str, Any]:
    """An OpenAPI path parameter."""
    return {"name": name, "in": "path", "required": True, "schema": schema or TEXT_PARAM,
            "description": description}


def _json(schema: dict[str, Any] | str) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(schema) if isinstance(schema, str) else schema}}


def _with_response(op: dict[str, Any], status: int, description: str, schema: str,
                   headers: dict[str, str] | None = None) -> dict[str, Any]:
    """``op`` with one more documented response (a status that is not an ``Error``)."""
    entry: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}
    if headers:
        entry["headers"] = {k: {"description": v, "schema": _STR} for k, v in headers.items()}
    op["responses"][str(status)] = entry
    return op


def _with_plain_400(op: dict[str, Any]) -> dict[str, Any]:
    """``op`` whose 400 may also be the HTTP server's own plain-text answer.

    A request whose HTTP framing is broken (an empty ``Content-Length``, say) is refused
    by the HTTP layer before the application sees it: 400, ``text/plain``.
    """
    entry = op["responses"].setdefault("400", {"description": "", "content": _json("Error")})
    entry["content"]["text/plain"] = {"schema": _STR}
    entry["description"] = ", ".join(filter(None, [entry["description"], "malformed HTTP framing (plain text)"]))
    return op


def _operation(
    summary: str,
    *,
    description: str = "",
    tag: str = "",
    parameters: Iterable[dict[str, Any]] = (),
    body: str | dict[str, Any] | None = None,
    body_type: str = "application/json",
    body_required: bool = True,
    response: str | dict[str, Any] | None = None,
    status: int = 200,
    content_type: str | tuple[str, ...] = "application/json",
    response_headers: dict[str, str] | None = None,
    errors: Iterable[Reason] = (),
    security: list[dict[str, list]] | None = None,
) -> dict[str, Any]:
    ok: dict[str, Any] = {"description": summary}
    if response is not None:
        schema = _ref(response) if isinstance(response, str) else response
        types = (content_type,) if isinstance(content_type, str) else content_type
        ok["content"] = {t: {"schema": schema} for t in types}
    if response_headers:
        ok["headers"] = {k: {"description": v, "schema": _STR} for k, v in response_headers.items()}
    responses: dict[str, Any] = {str(status): ok}
    for reason in errors:
        code = str(reason.status)
        entry = responses.setdefault(code, {"description": "", "content": _json("Error")})
        entry["description"] = ", ".join(filter(None, [entry["description"], reason.value]))
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if description:
        op["description"] = description
    if tag:
        op["tags"] = [tag]
    params = list(parameters)
    if params:
        op["parameters"] = params
    if body is not None:
        schema = _ref(body) if isinstance(body, str) else body
        op["requestBody"] = {"required": body_required, "content": {body_type: {"schema": schema}}}
    if security is not None:
        op["security"] = security
    return op


def describe(summary: str, **kwargs: Any) -> Callable[[Callable], Callable]:
    """Attach an OpenAPI operation to an endpoint (keywords as ``_operation``)."""
    op = _operation(summary, **kwargs)

    def decorate(endpoint: Callable) -> Callable:
        setattr(endpoint, _ATTR, op)
        return endpoint

    return decorate


_BINARY = {"type": "string", "format": "binary"}

#: Operations of routes defined outside the admin and audit modules, by (method, path).
OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/api/v1/enroll"): _operation(
        "Enrol a silo with its one-time token and public keys", tag="silo", body="EnrollRequest",
        response="EnrollResponse",
        errors=[Reason.BAD_TOKEN, Reason.REVOKED, Reason.ALREADY_ENROLLED, Reason.FINGERPRINT_MISMATCH,
                Reason.INVALID_REQUEST],
        security=[],
    ),
    ("GET", "/api/v1/model"): _operation(
        "Download the current (or an older retained) global model, with its signed release",
        tag="silo", parameters=[
            query("version", integer(0, MAX_VERSION), "an older version still retained"),
            query("round_seconds", {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_DECLARED_ROUND},
                  "the silo's expected round time in seconds, for pacing (protocol.md §6.1); "
                  f"written as a JSON number of at most {MAX_NUMBER} characters"),
        ],
        response=_BINARY, content_type="application/octet-stream",
        response_headers={
            "Fedsilo-Version": "the version served",
            "Fedsilo-Release": "base64url of the signed model_release statement",
            "Fedsilo-Release-Signature": "base64url Ed25519 signature by the coordinator",
            "Fedsilo-Pacing": "base64url of the signed pacing_hint statement (pulls of the current version only)",
            "Fedsilo-Pacing-Signature": "base64url Ed25519 signature of the pacing hint by the coordinator",
        },
        errors=[Reason.BAD_SIGNATURE, Reason.REVOKED, Reason.UNKNOWN_VERSION],
        security=[{"siloSignature": []}],
    ),
    ("GET", "/api/v1/status"): _operation(
        "The calling silo's record: budget spent, history, updates accepted", tag="silo",
        response="SiloStatus", errors=[Reason.BAD_SIGNATURE, Reason.REVOKED], security=[{"siloSignature": []}],
    ),
    ("POST", "/api/v1/updates"): _with_plain_400(
        _operation(
        "Submit one sealed update envelope; returns a signed receipt", tag="silo",
        description="A signed request (protocol.md §3) over the digest declared in Fedsilo-Content-SHA256, "
                    "with a Content-Length of at most max_update_bytes: both are checked, with the in-flight "
                    "limits (429 + Retry-After), before the body is read. The body must arrive within the "
                    "read timeouts (408) and match the declared digest; the envelope's own Ed25519 signature "
                    "is checked again. A resend of an update id returns the original receipt. Rejections "
                    "carry a reason code and audit_seq; 503 unavailable (with Retry-After) decides nothing.",
        parameters=[
            {"name": "Fedsilo-Content-SHA256", "in": "header", "required": True,
             "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
             "description": "hex SHA-256 of the body, covered by Fedsilo-Signature"},
            {"name": "Content-Length", "in": "header", "required": True,
             "schema": {"type": "integer", "minimum": 0}, "description": "at most max_update_bytes; no chunked bodies"},
        ],
        body=_BINARY, body_type="application/octet-stream", response="Receipt",
        errors=[r for r in Reason if r.value in {
            "too_large", "malformed", "unsupported_version", "unknown_silo", "revoked", "bad_signature", "replay",
            "unknown_base_version", "stale", "decrypt_failed", "digest_mismatch", "malformed_payload",
            "schema_mismatch", "non_finite", "norm_exceeded", "budget_exceeded", "invalid_dp_parameters",
            "request_timeout", "too_many_uploads", "unavailable"}],
        security=[{"siloSignature": []}],
    ),
    ),
    ("GET", "/healthz"): _with_response(
        _operation("Liveness and database readiness", tag="ops", response="Health", security=[]),
        503, "database unreachable (status unavailable) or not taking writes, e.g. a full disk "
             "(status degraded): updates get 503 unavailable meanwhile; or (status degraded, reason "
             "helper_unavailable / helper_refused / helper_bad_answer) a ready secure-aggregation buffer "
             "waits for the helper: masked updates get 503 unavailable meanwhile", "Health",
        headers={"Retry-After": "seconds to wait before asking again"},
    ),
    ("GET", "/metrics"): _operation(
        "Prometheus metrics: updates by outcome, fold latency, current version", tag="ops",
        response=_STR, content_type="text/plain; version=0.0.4", security=[],
    ),
    ("GET", "/openapi.json"): _operation(
        "This document", tag="ops", response={"type": "object"}, security=[],
    ),
}


# ------------------------------------------------------------------------- building the spec


def iter_operations(routes: Iterable[BaseRoute], prefix: str = "") -> Iterator[tuple[str, str, Any]]:
    """Every ``(method, path, endpoint)`` reachable through ``routes`` (Mounts followed).

    Paths are in OpenAPI form (``{id}``, converters dropped); HEAD is left out (it
    shadows GET).
    """
    for route in routes:
        if isinstance(route, Mount):
            yield from iter_operations(route.routes, prefix + route.path)
        elif isinstance(route, Route) and route.include_in_schema:  # False: an HTML page, not an API
            path = _CONVERTER.sub(r"{\1}", prefix + route.path)
            by_method = getattr(route.endpoint, BY_METHOD, {})  # api._routing.merged
            for method in sorted(route.methods or ("GET",)):
                if method != "HEAD":
                    yield method, path, by_method.get(method, route.endpoint)


def _path_params(path: str, op: dict[str, Any]) -> None:
    declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
    missing = [path_param(name) for name, _ in _CONVERTER.findall(path) if name not in declared]
    if missing:
        op["parameters"] = missing + op.get("parameters", [])


def _add_error(op: dict[str, Any], reason: Reason) -> None:
    responses = op["responses"] = dict(op["responses"])
    code = str(reason.status)
    entry = dict(responses.get(code) or {"description": "", "content": _json("Error")})
    if reason.value not in entry["description"].split(", "):
        entry["description"] = ", ".join(filter(None, [entry["description"], reason.value]))
    responses[code] = entry


def build_spec(routes: Iterable[BaseRoute], *, title: str = "fedsilo coordinator", version: str = "1") -> dict:
    """The OpenAPI document for ``routes`` (usually ``app.routes``)."""
    paths: dict[str, dict[str, Any]] = {}
    for method, path, endpoint in iter_operations(routes):
        op = getattr(endpoint, _ATTR, None) or OPERATIONS.get((method, path))
        op = dict(op) if op else {"summary": "", "responses": {"200": {"description": ""}}, "x-undocumented": True}
        roles = roles_of(endpoint)
        if roles is not None:
            op["security"] = [{"bearer": []}]
            op["x-roles"] = [r.value for r in roles]
            responses = dict(op["responses"])
            responses.setdefault("401", {"description": "bad_token", "content": _json("Error")})
            responses.setdefault("403", {"description": "forbidden", "content": _json("Error")})
            op["responses"] = responses
        # What api._params refuses for any route with parameters or a body.
        if op.get("parameters") or op.get("requestBody"):
            _add_error(op, Reason.INVALID_REQUEST)
        if op.get("requestBody"):
            _add_error(op, Reason.TOO_LARGE)
            _add_error(op, Reason.UNSUPPORTED_MEDIA_TYPE)
        op["operationId"] = f"{method.lower()}_{path.strip('/').replace('/', '_').replace('{', '').replace('}', '')}"
        _path_params(path, op)
        paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version,
                 "description": "Admin, audit and silo APIs of a fedsilo coordinator (docs/protocol.md, "
                                "docs/operations.md)."},
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": SCHEMAS, "securitySchemes": _SECURITY_SCHEMES},
    }


def routes() -> list[Route]:
    """``GET /openapi.json``, describing the application it is mounted in."""
    cache: dict[int, dict] = {}

    async def openapi(request: Request) -> JSONResponse:
        app = request.app
        spec = cache.get(id(app))
        if spec is None:  # the routing table is fixed once the app serves
            spec = cache[id(app)] = build_spec(app.routes)
        return JSONResponse(spec)

    return [Route("/openapi.json", openapi, methods=["GET"])]
