"""``GET /flavors`` as a ``HotRoute`` endpoint (see ``coffer.api.responses``): the same rule,
order and view as the catalogue's FastAPI route (``coffer.api.routes.catalog.list_flavors``),
read with one Core query instead of ORM objects."""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import Connection, select
from starlette.requests import Request
from starlette.responses import Response

from coffer import catalog
from coffer.api.context import read_on_loop
from coffer.api.policy import authorize_request
from coffer.api.responses import HotRoute, JSONBody
from coffer.db.models import Flavor

# The order of ``catalog.list_flavors``.
_FLAVORS = select(*Flavor.__table__.c).order_by(Flavor.ram, Flavor.vcpus, Flavor.id)


def flavors_body(conn: Connection, project_url: str) -> dict[str, Any]:
    """``{"flavors": [...]}`` as ``GET /flavors`` answers it."""
    rows = conn.execute(_FLAVORS).all()
    # ``flavor_view`` reads only the attributes a row of the flavors table has.
    return {"flavors": [catalog.flavor_view(cast(Flavor, row), project_url) for row in rows]}


async def _list(request: Request) -> Response:
    ctx = await authorize_request(request, request.path_params["tenant_id"], "flavor:index")
    return JSONBody(await read_on_loop(request, flavors_body, ctx.project_url))


def hot_routes() -> list[HotRoute]:
    return [HotRoute("/v1.0/{tenant_id}/flavors", _list)]
