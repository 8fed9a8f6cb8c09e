"""The web pages under ``/ui``: server-rendered HTML for the ``auditor`` and ``admin`` roles.

Thin routes, as in ``coordinator.api``: read the session, call one service, render one
template. Every page works without JavaScript; every form is a POST carrying the
session's CSRF token; every change goes through the same service (and the same audit
entry) as its admin API route. An auditor may read every page and is refused every
form that changes state (403, nothing written).

These routes are HTML for people, not API operations: they are declared
``include_in_schema=False`` and the OpenAPI document leaves them out.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, urlencode

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from coordinator import admin, audit, budget, enrolment, tokens
from coordinator.api._threads import in_read, in_transaction
from coordinator.context import Coordinator
from coordinator.errors import ApiError, AuthError, CoordinatorError, Reason
from coordinator.models import Role
from coordinator.ui import plots, views
from coordinator.ui.session import COOKIE, LOGIN_COOKIE, LOGIN_SECONDS, SESSION_SECONDS, SessionKeys
from privacy.envelope import utc_timestamp

__all__ = ["routes"]

#: Largest form body accepted (the settings form is the biggest, well under this).
MAX_FORM_BYTES = 16 * 1024
PAGE_SIZE = 50

# No script, no frame, no third party: the pages need none of them.
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True)
class Viewer:
    """Who is looking: the token's name and role, the session id and its form token."""

    token_id: str
    name: str
    role: Role
    sid: str
    csrf: str

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN

    @property
    def actor(self) -> str:  # as the admin API writes it (coordinator.api.auth.Principal)
        return f"token:{self.name}"


def _when(t: datetime | None) -> str:
    """A time to the second, in UTC (the log's own times are stored to the microsecond)."""
    return "" if t is None else utc_timestamp(t)[:19].replace("T", " ") + " UTC"


def _environment() -> Environment:
    env = Environment(loader=PackageLoader("coordinator.ui", "templates"),
                      autoescape=select_autoescape(default=True), trim_blocks=True, lstrip_blocks=True)
    env.filters["ts"] = _when
    env.filters["eps"] = lambda x: "" if x is None else ("unbounded" if x == float("inf") else f"{x:.4f}")
    env.filters["pretty"] = lambda obj: json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False)
    env.filters["short"] = lambda h: h[:16] + "…" if isinstance(h, str) and len(h) > 16 else h
    return env


async def _form(request: Request) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body, first value of each field."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        raise ApiError(Reason.INVALID_REQUEST, "expected a form")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise ApiError(Reason.TOO_LARGE, "form too large")
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise ApiError(Reason.INVALID_REQUEST, "form is not UTF-8") from None
    return {k: v[0] for k, v in fields.items()}


def _number(form: dict[str, str], name: str) -> float:
    try:
        return float(form.get(name, ""))
    except ValueError:
        raise ApiError(Reason.INVALID_REQUEST, f"{name} must be a number") from None


def _shown(value: Any) -> str:
    """How the settings form shows a value: strings as they are, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def _setting_value(text: str) -> Any:
    """A settings form field: JSON if it parses (numbers, true, null), else the text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _settings_fields(fed: admin.FederationInfo) -> list[tuple[str, str]]:
    return [(k, _shown(v)) for k, v in sorted(fed.settings.items())]


def routes(ctx: Coordinator) -> list[BaseRoute]:
    """The pages, relative to their mount point ``/ui``."""
    env = _environment()
    keys = SessionKeys.from_identity(ctx.identity)
    fid = ctx.federation_id
    read = functools.partial(in_read, ctx)
    write = functools.partial(in_transaction, ctx)

    def render(request: Request, template: str, viewer: Viewer | None, status: int = 200, **values: Any) -> Response:
        html = env.get_template(template).render(viewer=viewer, path=request.url.path, **values)
        return HTMLResponse(html, status_code=status, headers=_HEADERS)

    def set_cookie(request: Request, response: Response, name: str, value: str, max_age: int) -> None:
        # Secure whenever the browser reached us over TLS (directly, or through a
        # proxy that uvicorn trusts for X-Forwarded-Proto).
        response.set_cookie(name, value, max_age=max_age, path="/ui", httponly=True,
                            secure=request.url.scheme == "https", samesite="strict")

    async def viewer_of(request: Request) -> Viewer | None:
        session = keys.check(request.cookies.get(COOKIE), now=ctx.clock())
        if session is None:
            return None
        token = await read(views.active_token, session.token_id)
        if token is None:  # revoked since sign-in: the session ends with it
            return None
        return Viewer(session.token_id, token[0], token[1], session.sid, keys.csrf_token(session.sid))

    Handler = Callable[[Request, Viewer], Awaitable[Response]]

    def page(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        """A page anyone signed in may read; an error becomes an HTML page with its status."""

        @functools.wraps(handler)
        async def endpoint(request: Request) -> Response:
            viewer = await viewer_of(request)
            if viewer is None:
                return RedirectResponse("/ui/login", status_code=303, headers=_HEADERS)
            try:
                return await handler(request, viewer)
            except CoordinatorError as exc:
                return render(request, "error.html", viewer, exc.status, error=exc)

        return endpoint

    def form(*roles: Role) -> Callable[[Handler], Callable[[Request], Awaitable[Response]]]:
        """A form POST: signed in, the session's CSRF token, then one of ``roles``."""

        def decorate(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
            @functools.wraps(handler)
            async def endpoint(request: Request) -> Response:
                viewer = await viewer_of(request)
                try:
                    if viewer is None:
                        raise AuthError(Reason.BAD_TOKEN, "sign in first")
                    fields = await _form(request)
                    if not keys.csrf_ok(viewer.sid, fields.get("csrf")):
                        raise AuthError(Reason.FORBIDDEN, "the form's CSRF token is missing or wrong: reload the page")
                    if viewer.role not in roles:
                        raise AuthError(Reason.FORBIDDEN, f"role {viewer.role.value!r} may not do this")
                    request.state.form = fields
                    return await handler(request, viewer)
                except CoordinatorError as exc:
                    return render(request, "error.html", viewer, exc.status, error=exc)

            endpoint.__fedsilo_ui_roles__ = roles  # the tests find every form through this
            return endpoint

        return decorate

    # ----------------------------------------------------------- signing in

    async def login_page(request: Request, *, error: str | None = None, status: int = 200) -> Response:
        nonce = keys.new_nonce()
        response = render(request, "login.html", None, status, csrf=keys.csrf_token(nonce), error=error)
        set_cookie(request, response, LOGIN_COOKIE, nonce, LOGIN_SECONDS)
        return response

    async def login(request: Request) -> Response:
        if request.method == "GET":
            return await login_page(request)
        try:
            fields = await _form(request)
        except CoordinatorError as exc:
            return await login_page(request, error=exc.detail, status=exc.status)
        if not keys.csrf_ok(request.cookies.get(LOGIN_COOKIE), fields.get("csrf")):
            return await login_page(request, error="The form expired; please sign in again.", status=403)
        try:
            row = await read(tokens.authenticate, fields.get("token", "").strip(), now=ctx.clock(), record_use=False)
        except AuthError:
            return await login_page(request, error="That token is not valid.", status=401)
        cookie, _ = keys.issue(row.id, now=ctx.clock())
        response = RedirectResponse("/ui/", status_code=303, headers=_HEADERS)
        set_cookie(request, response, COOKIE, cookie, SESSION_SECONDS)
        response.delete_cookie(LOGIN_COOKIE, path="/ui")
        return response

    @form(Role.ADMIN, Role.AUDITOR)
    async def logout(request: Request, viewer: Viewer) -> Response:
        response = RedirectResponse("/ui/login", status_code=303, headers=_HEADERS)
        response.delete_cookie(COOKIE, path="/ui", httponly=True, samesite="strict",
                               secure=request.url.scheme == "https")
        return response

    # ---------------------------------------------------------------- pages

    @page
    async def overview(request: Request, viewer: Viewer) -> Response:
        fed = await read(admin.get_federation, federation_id=fid)
        act = await read(views.activity, now=ctx.clock(), federation_id=fid)
        history = await read(views.accuracy_history, federation_id=fid)
        hourly = plots.hourly_bars([(h.strftime("%H:00"), a, r) for h, a, r in act.hours],
                                   title="Updates per hour, last 24 hours")
        accuracy = plots.line_chart([(v, acc) for v, acc, _ in history], title="Accuracy by model version",
                                    y_label="mean accuracy", x_label="model version")
        return render(request, "overview.html", viewer, fed=fed, activity=act, hourly=hourly,
                      accuracy=accuracy, history=history[-10:])

    @page
    async def silos(request: Request, viewer: Viewer) -> Response:
        rows = await read(admin.list_silos, federation_id=fid)
        reports = {b.silo_id: b for b in await read(budget.budgets, accountant=ctx.config.accountant,
                                                     federation_id=fid)}
        bars = plots.budget_bars([(s.name, s.epsilon_spent, s.epsilon_cap) for s in rows],
                                 title="Epsilon spent against each silo's cap")
        return render(request, "silos.html", viewer, silos=rows, reports=reports, bars=bars)

    @page
    async def log(request: Request, viewer: Viewer) -> Response:
        q = request.query_params
        filters = {k: q.get(k) or None for k in ("silo_id", "action", "since", "until")}
        try:
            after = int(q["after"]) if q.get("after") else None
        except ValueError:
            raise ApiError(Reason.INVALID_REQUEST, "after must be a sequence number") from None
        result = await read(views.events, after_seq=after, limit=PAGE_SIZE, **filters)
        choices = await read(views.actions)
        silo_names = {s.silo_id: s.name for s in await read(admin.list_silos, federation_id=fid)}
        next_url = None
        if result.next_after is not None:
            next_url = "/ui/log?" + urlencode({**{k: v for k, v in filters.items() if v}, "after": result.next_after})
        return render(request, "log.html", viewer, page=result, filters=filters, actions=choices,
                      silo_names=silo_names, next_url=next_url)

    @page
    async def update(request: Request, viewer: Viewer) -> Response:
        view = await read(views.update_view, request.path_params["update_id"])
        return render(request, "update.html", viewer, view=view, u=view.update)

    @page
    async def checkpoints_page(request: Request, viewer: Viewer) -> Response:
        rows = await read(views.checkpoints)
        return render(request, "checkpoints.html", viewer, checkpoints=rows, result=None)

    @form(Role.ADMIN, Role.AUDITOR)
    async def verify(request: Request, viewer: Viewer) -> Response:
        # Read-only (both roles may run it): walks the chain, the Merkle tree and the
        # newest checkpoint's root, and names the first entry that fails.
        result = await read(audit.verify)
        rows = await read(views.checkpoints)
        return render(request, "checkpoints.html", viewer, checkpoints=rows, result=result)

    # ---------------------------------------------------------- admin forms

    @page
    async def new_silo_page(request: Request, viewer: Viewer) -> Response:
        return render(request, "silo_new.html", viewer, created=None)

    @form(Role.ADMIN)
    async def create_silo(request: Request, viewer: Viewer) -> Response:
        f = request.state.form
        new = await write(enrolment.create_silo, name=f.get("name", "").strip(),
                          epsilon_cap=_number(f, "epsilon_cap"), delta=_number(f, "delta"),
                          actor=viewer.actor, now=ctx.clock(),
                          ttl_seconds=ctx.config.enrolment_token_ttl_seconds, federation_id=fid)
        # Shown on this response only (no-store); it is stored hashed and never again readable.
        return render(request, "silo_new.html", viewer, 201, created=new)

    @form(Role.ADMIN)
    async def revoke_silo(request: Request, viewer: Viewer) -> Response:
        await write(enrolment.revoke_silo, request.path_params["silo_id"], actor=viewer.actor,
                    now=ctx.clock(), reason=request.state.form.get("reason") or None)
        return RedirectResponse("/ui/silos", status_code=303, headers=_HEADERS)

    @page
    async def settings_page(request: Request, viewer: Viewer) -> Response:
        fed = await read(admin.get_federation, federation_id=fid)
        return render(request, "settings.html", viewer, fields=_settings_fields(fed), saved=False)

    @form(Role.ADMIN)
    async def change_settings(request: Request, viewer: Viewer) -> Response:
        current = (await read(admin.get_federation, federation_id=fid)).settings
        f = request.state.form
        # Only the fields whose text differs from what the page showed are sent on.
        changes = {k: _setting_value(f[k]) for k in current if k in f and f[k] != _shown(current[k])}
        if not changes:
            raise ApiError(Reason.INVALID_REQUEST, "nothing was changed")
        fed = await write(admin.change_settings, changes, actor=viewer.actor, now=ctx.clock(), federation_id=fid)
        return render(request, "settings.html", viewer, fields=_settings_fields(fed), saved=True)

    return [
        Route("/", overview, methods=["GET"], include_in_schema=False),
        Route("/login", login, methods=["GET", "POST"], include_in_schema=False),
        Route("/logout", logout, methods=["POST"], include_in_schema=False),
        Route("/silos", silos, methods=["GET"], include_in_schema=False),
        Route("/silos/new", new_silo_page, methods=["GET"], include_in_schema=False),
        Route("/silos/new", create_silo, methods=["POST"], include_in_schema=False),
        Route("/silos/{silo_id}/revoke", revoke_silo, methods=["POST"], include_in_schema=False),
        Route("/log", log, methods=["GET"], include_in_schema=False),
        Route("/updates/{update_id}", update, methods=["GET"], include_in_schema=False),
        Route("/checkpoints", checkpoints_page, methods=["GET"], include_in_schema=False),
        Route("/checkpoints/verify", verify, methods=["POST"], include_in_schema=False),
        Route("/settings", settings_page, methods=["GET"], include_in_schema=False),
        Route("/settings", change_settings, methods=["POST"], include_in_schema=False),
        Mount("/static", app=StaticFiles(packages=[("coordinator.ui", "static")]), name="ui-static"),
    ]
