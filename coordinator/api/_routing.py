"""One Starlette route per path, whatever the number of methods it serves.

Starlette answers a request whose path matches but whose method does not with 405
from the *first* route of that path, so two routes for one path (``GET /silos`` and
``POST /silos``) would send an ``Allow`` header naming only the first one's methods.
RFC 9110 section 15.5.6 wants every method the target supports: :func:`merged` joins
such routes into one that dispatches on the method. The endpoints of each method stay
reachable (``__by_method__``) for the OpenAPI document.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

__all__ = ["BY_METHOD", "merged"]

BY_METHOD = "__by_method__"


def _dispatch(by_method: dict[str, Callable]) -> Callable:
    async def endpoint(request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        return await by_method[method](request)

    setattr(endpoint, BY_METHOD, by_method)
    return endpoint


def merged(routes: Sequence[Route]) -> list[Route]:
    """``routes`` with those sharing a path joined into one (first position kept)."""
    groups: dict[str, list[Route]] = {}
    for route in routes:
        groups.setdefault(route.path, []).append(route)
    out = []
    for path, group in groups.items():
        if len(group) == 1:
            out.append(group[0])
            continue
        by_method = {m: r.endpoint for r in group for m in (r.methods or ()) if m != "HEAD"}
        out.append(Route(path, _dispatch(by_method), methods=sorted(by_method)))
    return out
