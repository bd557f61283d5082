"""``GET /limits`` and the quota admin API ``GET/PUT /mgmt/quotas/{project_id}``.

Shapes follow Trove (``trove-api.md`` §7.2, §7.3). The paths here are relative: the router is
mounted under ``/v1.0/{tenant_id}`` (``coffer.api.routes.instances`` includes it).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request

from coffer import quotas
from coffer.api.audit import AuditedRoute
from coffer.api.context import RequestContext, ServicesDep
from coffer.api.policy import authorize, enforce, rate_limiter_of
from coffer.db.session import transaction
from coffer.errors import BadRequest

router = APIRouter(tags=["quotas"], route_class=AuditedRoute)


@router.get("/limits", summary="The project's absolute limits and rate limits")
def list_limits(
    request: Request,
    ctx: Annotated[RequestContext, Depends(authorize("limits:index"))],
    services: ServicesDep,
) -> dict[str, Any]:
    """Trove's shape: one ``ABSOLUTE`` entry with the project's quota limits, then one entry
    per rate limit with what the caller's project has left of it."""
    with services.session_factory() as session:
        limits = quotas.get_limits(session, services.settings, ctx.project_id)
    absolute = {
        "verb": "ABSOLUTE",
        "max_instances": limits["instances"],
        "max_backups": limits["backups"],
        "max_volumes": limits["volumes"],
        "max_ram": limits["ram"],
    }
    return {"limits": [absolute, *rate_limiter_of(request).report(ctx.auth.project_id)]}


@router.get("/mgmt/quotas/{project_id}", summary="A project's quotas and usage")
def show_quotas(
    request: Request,
    project_id: str,
    ctx: Annotated[RequestContext, Depends(authorize(None, deferred=("quota:show",)))],
    services: ServicesDep,
) -> dict[str, Any]:
    """Admins see any project's; a project's members and readers see their own."""
    enforce(request, ctx, "quota:show", {"tenant": project_id})
    with services.session_factory() as session:
        return {"quotas": quotas.usage_report(session, services.settings, project_id)}


@router.put("/mgmt/quotas/{project_id}", summary="Set a project's quotas (admin)")
def update_quotas(
    request: Request,
    project_id: str,
    ctx: Annotated[RequestContext, Depends(authorize(None, deferred=("quota:update",)))],
    services: ServicesDep,
    body: Annotated[Any, Body()],
) -> dict[str, Any]:
    """Body ``{"quotas": {"instances": 20, "ram": -1, ...}}``; ``null`` leaves a resource as it
    is. Answers ``{"quotas": {<resource>: <limit>}}`` with the limits that were set."""
    enforce(request, ctx, "quota:update", {"tenant": project_id})
    changes = body.get("quotas") if isinstance(body, dict) else None
    if not isinstance(changes, dict):
        raise BadRequest(
            'The body must be {"quotas": {<resource>: <limit>, ...}} with resources among '
            f"{', '.join(quotas.RESOURCES)}."
        )
    with transaction(services.session_factory) as session:
        applied = quotas.set_limits(session, services.settings, project_id, changes)
    return {"quotas": applied}
