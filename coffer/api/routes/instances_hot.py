"""The hot instance reads (``GET /instances``, ``/instances/detail``, ``/instances/{id}``) as
``HotRoute`` endpoints (see ``coffer.api.responses``).

Each does what its FastAPI route in ``coffer.api.routes.instances`` does, through the same
functions (``list_page``, ``show_view``): the same policy rule, checks and errors, the same
bytes. Authorization runs on the event loop when the token was validated lately, and so do the
control-DB read and the rendering on a SQLite control DB (``read_on_loop`` says why; on
another database they run in the thread pool). A query string the FastAPI route
would read differently (a repeated or non-numeric ``limit``, a repeated ``marker``) is left to
that route.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import Response

from coffer.api.context import read_on_loop
from coffer.api.policy import authorize_request
from coffer.api.responses import HotRoute, JSONBytes
from coffer.api.routes.instances import list_page, show_view

PREFIX = "/v1.0/{tenant_id}"
#: A ``limit`` the FastAPI route would read as this same whole number.
_PLAIN_LIMIT = re.compile(r"0|[1-9][0-9]{0,8}")


def _page_query(request: Request) -> tuple[int | None, str | None] | None:
    """``(limit, marker)`` from the query string, or None when the FastAPI route should read it."""
    raw = request.scope["query_string"]
    if not raw:
        return None, None
    values: dict[str, str] = {}
    for key, value in parse_qsl(raw.decode("latin-1"), keep_blank_values=True):
        if key in ("limit", "marker"):
            if key in values:
                return None
            values[key] = value
    text = values.get("limit")
    if text is not None and _PLAIN_LIMIT.fullmatch(text) is None:
        return None
    return (int(text) if text is not None else None), values.get("marker")


def _list_endpoint(rule: str, detail: bool) -> Any:
    async def hot_list(request: Request) -> Response | None:
        query = _page_query(request)
        if query is None:
            return None
        limit, marker = query
        ctx = await authorize_request(request, request.path_params["tenant_id"], rule)
        body = await read_on_loop(request, list_page, request, ctx, limit, marker, detail)
        return JSONBytes(body)

    return hot_list


async def _show(request: Request) -> Response:
    params = request.path_params
    ctx = await authorize_request(request, params["tenant_id"], "instance:show")
    body = await read_on_loop(request, show_view, request, ctx, params["instance_id"])
    return JSONBytes(body)


def hot_routes() -> list[HotRoute]:
    """The hot instance routes, ``/instances/detail`` before ``/instances/{instance_id}``."""
    return [
        HotRoute(f"{PREFIX}/instances", _list_endpoint("instance:index", detail=False)),
        HotRoute(f"{PREFIX}/instances/detail", _list_endpoint("instance:detail", detail=True)),
        HotRoute(f"{PREFIX}/instances/{{instance_id}}", _show),
    ]
