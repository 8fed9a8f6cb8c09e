"""Helpers shared by the page tests: sign in like a browser, find every form route."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
from starlette.routing import Mount, Route

_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def csrf_of(html: str) -> str:
    """The CSRF token in a page's first form."""
    match = _CSRF.search(html)
    if match is None:
        raise AssertionError("the page has no form with a CSRF token")
    return match.group(1)


@contextmanager
def sign_in(base_url: str, token: str) -> Iterator[httpx.Client]:
    """A client holding a session cookie for ``token``, signed in through the form."""
    with httpx.Client(base_url=base_url, timeout=60) as client:
        page = client.get("/ui/login")
        r = client.post("/ui/login", data={"csrf": csrf_of(page.text), "token": token})
        if r.status_code != 303:
            raise AssertionError(f"sign-in failed: {r.status_code} {r.text[:300]}")
        yield client


def form_routes(routes, prefix: str = "") -> Iterator[tuple[str, tuple]]:
    """``(path, roles)`` of every POST form under ``/ui`` (the roles its endpoint admits)."""
    for route in routes:
        if isinstance(route, Mount):
            yield from form_routes(route.routes, prefix + route.path)
        elif isinstance(route, Route) and prefix.startswith("/ui") and "POST" in (route.methods or ()):
            roles = getattr(route.endpoint, "__fedsilo_ui_roles__", None)
            if roles is not None:
                yield prefix + route.path, roles
