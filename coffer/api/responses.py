"""What the busiest read routes answer with, and the route class that serves them.

``JSONBody``: a route that returns a plain dict has FastAPI validate it against the declared
return type and, for a ``def`` route, do that in a worker thread: one more thread hop per
request. Returning a ``JSONBody`` skips both. It renders with pydantic-core's serializer (the
one FastAPI uses for declared responses), so the bytes are the same as before, only cheaper to
make.

``HotRoute``: ``GET /instances``, ``/instances/detail``, ``/instances/{id}`` and ``/flavors``
are most of what clients ask (every ``openstack database instance list``, every poll of a
create). FastAPI spends more per request on them than the routes' own work (matching the
request against every route, solving the dependency graph, validating parameters), so these are
served by a plain Starlette route placed in front of the FastAPI one for the same path. The hot
endpoint authorizes exactly as ``authorize(rule)`` does (``coffer.api.policy.
authorize_request``) and calls the same code as the FastAPI handler; a request it does not take
(an unusual query string) goes on to the FastAPI route unchanged, which also still documents
the route in the OpenAPI document and answers every other method.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pydantic_core
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, compile_path, get_route_path
from starlette.types import Receive, Scope, Send

from coffer.api.audit import rate_limited_response
from coffer.quotas import RateLimited

#: A hot endpoint: the response, or None to leave the request to the FastAPI route.
HotEndpoint = Callable[[Request], Awaitable[Response | None]]

#: Set in the scope of a request a hot endpoint passed on, so routing skips the hot routes.
_PASSED_ON = "coffer.hot_route_passed"


class JSONBody(JSONResponse):
    """``application/json``, rendered compactly as UTF-8 by pydantic-core."""

    def render(self, content: Any) -> bytes:
        return pydantic_core.to_json(content)


class JSONBytes(Response):
    """``application/json`` already rendered (the same headers as ``JSONBody``)."""

    media_type = "application/json"


class HotRoute(BaseRoute):
    """``GET path`` served by ``endpoint`` without FastAPI's per-request machinery.

    Errors the endpoint raises reach the app's exception handlers as a FastAPI route's do, and
    a ``RateLimited`` gets Trove's 413 with ``Retry-After``, as on an ``AuditedRoute``.
    """

    def __init__(self, path: str, endpoint: HotEndpoint) -> None:
        self.path = path
        self.endpoint = endpoint
        self.path_regex, self.path_format, self.param_convertors = compile_path(path)
        self.include_in_schema = False

    def __repr__(self) -> str:
        return f"HotRoute(path={self.path!r})"

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] != "http" or scope["method"] != "GET" or scope.get(_PASSED_ON):
            return Match.NONE, {}
        found = self.path_regex.match(get_route_path(scope))
        if found is None:
            return Match.NONE, {}
        # Every parameter of these paths is a plain string (no convertors).
        path_params = {**scope.get("path_params", {}), **found.groupdict()}
        return Match.FULL, {"endpoint": self.endpoint, "path_params": path_params}

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            response = await self.endpoint(request)
        except RateLimited as exc:
            response = rate_limited_response(exc)
        if response is None:
            # Route the request again as if this route did not exist: the FastAPI route for the
            # same path takes it, with its own validation and errors.
            scope[_PASSED_ON] = True
            await scope["router"](scope, receive, send)
            return
        await response(scope, receive, send)


def install_hot_routes(app: FastAPI, routes: list[HotRoute]) -> None:
    """Put ``routes`` in front of every other route of ``app``, in the order given (list a
    fixed path such as ``/instances/detail`` before a pattern it would match)."""
    app.router.routes[0:0] = routes
