"""Bearer-token authentication and roles for the admin and audit APIs.

Every admin or audit endpoint is wrapped by :func:`guarded`, which names the roles
that may call it; there is no unguarded variant and no switch to turn checks off.
``admin`` may do anything; ``auditor`` is read-only: it may call the audit API and
the admin API's listings, and gets 403 ``forbidden`` on every route that changes
state. A missing, malformed, unknown or revoked token gets 401 ``bad_token`` with the
same detail whatever the cause (reveal nothing).

Silo routes are not here: a silo authenticates each request with its signature
(``privacy.envelope.verify_request``), not with a bearer token.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from coordinator import tokens
from coordinator.context import Coordinator
from coordinator.errors import AuthError, Reason
from coordinator.models import ApiToken, Role

__all__ = ["ADMIN", "ANY_ROLE", "Principal", "bearer_token", "guarded", "require_role", "roles_of"]

ADMIN: tuple[Role, ...] = (Role.ADMIN,)
ANY_ROLE: tuple[Role, ...] = (Role.ADMIN, Role.AUDITOR)

# Attribute set on guarded endpoints: the roles allowed. OpenAPI and the tests read it
# (e.g. to find every route an auditor must be refused).
_ROLES_ATTR = "__fedsilo_roles__"


@dataclass(frozen=True)
class Principal:
    """Who is calling: a token's public id, name and role (never the token)."""

    token_id: str
    name: str
    role: Role

    @property
    def actor(self) -> str:
        """How this caller appears in the audit log's ``actor`` column.

        Prefixed so an operator-chosen token name can never pass for a silo id or
        for ``"system"``.
        """
        return f"token:{self.name}"

    @classmethod
    def of(cls, row: ApiToken) -> Principal:
        return cls(row.id, row.name, Role(row.role))


def bearer_token(request: Request) -> str | None:
    """The credentials of an ``Authorization: Bearer`` header (scheme case-insensitive, RFC 7235 2.1)."""
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return credentials.strip() or None


def _authenticate(ctx: Coordinator, bearer: str | None) -> Principal:
    now = ctx.clock()
    # Look the token up in a read-only transaction (on SQLite it does not queue behind
    # the fold for the write lock); write last_used_at only when it is stale.
    with ctx.read() as session:
        row = tokens.authenticate(session, bearer, now=now, record_use=False)
        principal, stale = Principal.of(row), tokens.needs_touch(row, now)
    if stale:
        with ctx.transaction() as session:
            tokens.touch(session, principal.token_id, now=now)
    return principal


async def require_role(ctx: Coordinator, request: Request, *roles: Role) -> Principal:
    """Authenticate ``request``'s bearer token and check its role is in ``roles``.

    Raises AuthError: 401 ``bad_token`` for no or a bad token, 403 ``forbidden`` for
    a valid token whose role may not do this.
    """
    principal = await run_in_threadpool(_authenticate, ctx, bearer_token(request))
    if principal.role not in roles:
        raise AuthError(Reason.FORBIDDEN, f"role {principal.role.value!r} may not do this")
    return principal


Endpoint = Callable[[Request, Principal], Awaitable[Response]]


def guarded(ctx: Coordinator, *roles: Role) -> Callable[[Endpoint], Callable[[Request], Awaitable[Response]]]:
    """Decorate ``async def endpoint(request, principal)`` into a Starlette endpoint
    that first calls :func:`require_role` with ``roles``."""
    if not roles:
        raise TypeError("guarded() needs at least one role")

    def decorate(endpoint: Endpoint) -> Callable[[Request], Awaitable[Response]]:
        @functools.wraps(endpoint)
        async def wrapper(request: Request) -> Response:
            principal = await require_role(ctx, request, *roles)
            return await endpoint(request, principal)

        setattr(wrapper, _ROLES_ATTR, tuple(roles))
        return wrapper

    return decorate


def roles_of(endpoint: object) -> tuple[Role, ...] | None:
    """The roles a guarded endpoint admits, or None if it is not bearer-guarded."""
    return getattr(endpoint, _ROLES_ATTR, None)
