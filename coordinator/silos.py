"""The services behind the silo API (``/api/v1``): enrol, model, status.

Each takes the running :class:`~coordinator.context.Coordinator` and what the route
parsed, runs its transactions and returns plain data; ``coordinator.api.silo`` only
parses and serializes. Updates go through :mod:`coordinator.ingest`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from privacy.envelope import enrolment_statement
from privacy.keys import b64e

from . import enrolment, pacing_service
from .errors import CoordinatorError
from .federation import settings_of
from .model_store import ReleaseStream, open_release
from .models import Federation, Silo

if TYPE_CHECKING:
    from .context import Coordinator

__all__ = ["SignedRequest", "enroll", "model", "status"]


class SignedRequest:
    """What a signed silo request carries: method, target as sent, body and headers."""

    __slots__ = ("method", "target", "body", "headers")

    def __init__(self, method: str, target: str, body: bytes, headers: Mapping[str, str]) -> None:
        self.method, self.target, self.body, self.headers = method, target, body, headers


def enroll(ctx: Coordinator, body: Mapping, *, remote: str | None = None) -> dict:
    """Enrol a silo (one-time token + public keys) and return what it needs to start.

    A refused attempt is audited (never the token) and re-raised.
    """
    token = body.get("token")
    keys = {"signing_key": body.get("signing_key"), "hpke_key": body.get("hpke_key")}
    now = ctx.clock()
    try:
        with ctx.transaction() as s:
            silo = enrolment.enroll(s, token=token, keys=keys, now=now, coordinator=ctx.identity.public(),
                                    expected_fingerprint=body.get("coordinator_fingerprint"))
            fed = s.get(Federation, silo.federation_id)
            return _enrolled(ctx, silo, fed)
    except CoordinatorError as exc:
        with ctx.transaction() as s:
            enrolment.audit_rejection(s, reason=exc.reason.value, detail=exc.detail, now=now, remote=remote)
        raise


def _enrolled(ctx: Coordinator, silo: Silo, fed: Federation) -> dict:
    public = ctx.identity.public()
    cfg = ctx.config
    budget = {"epsilon_cap": silo.epsilon_cap, "delta": silo.delta, "accountant": cfg.accountant}
    task = {"name": fed.task_name, "options": fed.task_options}
    settings = settings_of(fed)
    statement, signature = enrolment_statement(
        {"silo_id": silo.id, "name": silo.name, "federation": fed.name, "task": task,
         "schema_digest": fed.schema_digest, "budget": budget,
         "silo_keys": {"signing_key": b64e(silo.signing_key), "hpke_key": b64e(silo.hpke_key)},
         "secure_aggregation": settings.secure_aggregation},
        ctx.identity.signing,
    )
    return {
        "silo_id": silo.id,
        "name": silo.name,
        "federation": {
            "name": fed.name,
            "task": task,
            "schema": fed.schema,
            "schema_digest": fed.schema_digest,
            "current_version": fed.current_version,
            "settings": settings.to_dict(),
            # the signed statement's member, unsigned copy (the silo checks it against the statement)
            "secure_aggregation": settings.secure_aggregation,
        },
        "budget": budget,
        "coordinator": {**public.to_json(), "fingerprints": public.fingerprints()},
        "limits": {
            "max_update_bytes": cfg.max_update_bytes,
            "max_clock_skew_seconds": cfg.max_clock_skew_seconds,
            "max_update_age_seconds": cfg.max_update_age_seconds,
        },
        # The substance above, signed: verifiable with the key the silo pins (protocol.md §2).
        "statement": b64e(statement),
        "signature": b64e(signature),
    }


def _authenticate(ctx: Coordinator, s, req: SignedRequest) -> Silo:
    return enrolment.authenticate_request(
        s, method=req.method, target=req.target, body=req.body, headers=req.headers,
        now=ctx.clock(), max_skew_seconds=ctx.config.max_clock_skew_seconds,
    )


def _seen(ctx: Coordinator, silo: Silo) -> None:
    now = ctx.clock()
    if enrolment.needs_touch(silo, now):
        with ctx.transaction() as s:
            enrolment.touch(s, silo.id, now)


def model(ctx: Coordinator, req: SignedRequest, version: int | None, declared_round: float | None = None
          ) -> tuple[ReleaseStream, pacing_service.SignedHint | None]:
    """The current (or a retained older) model, signed, opened for streaming from one
    snapshot; for a signed silo request only. The caller closes the stream.

    A pull of the current version (no ``version``) starts a round: it also gets the
    signed pacing hint (start now or come back later), bound to the request's nonce;
    ``declared_round`` is the round time the silo declared on it (docs/protocol.md §6.1).
    """
    with ctx.read() as s:
        silo = _authenticate(ctx, s, req)
    _seen(ctx, silo)
    stream = open_release(ctx.read, ctx.identity, ctx.releases, ctx.federation_id, version)
    if version is not None:
        return stream, None
    try:
        with ctx.read() as s:
            signed = pacing_service.hint(
                s, identity=ctx.identity, grants=ctx.grants, federation_id=ctx.federation_id, silo_id=silo.id,
                nonce=req.headers["fedsilo-nonce"], version=stream.release.version, now=ctx.clock(),
                declared_round=declared_round,
            )
    except BaseException:
        stream.close()
        raise
    return stream, signed


def status(ctx: Coordinator, req: SignedRequest) -> dict:
    """The calling silo's record: status, epsilon spent and cap, history, counts."""
    with ctx.read() as s:
        silo = _authenticate(ctx, s, req)
        fed = s.get(Federation, ctx.federation_id)
        out = enrolment.silo_status(s, silo, current_version=fed.current_version, accountant=ctx.config.accountant)
    _seen(ctx, silo)
    return out
