"""Admin (mgmt) instance routes: every project's instances, their servers, and engine actions."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from sqlalchemy import select

from coffer import quotas
from coffer.api.audit import AuditedRoute
from coffer.api.context import RequestContext
from coffer.api.instance_views import effective_service_status, iso
from coffer.api.policy import authorize
from coffer.api.routes.instance_support import (
    control_plane,
    guest_call,
    load_instance,
    render_instance,
)
from coffer.db.models import (
    DatastoreVersion,
    Instance,
    Operation,
    RootEnabledHistory,
    ServiceStatusRow,
    utcnow,
)
from coffer.errors import (
    BadRequest,
    NotFound,
    UnprocessableEntity,
)
from coffer.status import ServiceStatus, Task

LOG = logging.getLogger(__name__)

router = APIRouter(tags=["instances"], route_class=AuditedRoute)


# --- admin -------------------------------------------------------------------------------------


def _server_view(inst: Instance) -> dict[str, Any]:
    return {"id": inst.id, "status": inst.server_status.value, **dict(inst.compute_ref or {})}


@router.get("/mgmt/instances")
def mgmt_list_instances(
    request: Request,
    ctx: Annotated[RequestContext, Depends(authorize("mgmt:instance:index"))],
    project_id: str | None = Query(None),
    deleted: bool = Query(False),
) -> dict[str, Any]:
    cp = control_plane(request)
    with cp.session_factory() as session:
        query = select(Instance).where(Instance.deleted.is_(deleted))
        if project_id:
            query = query.where(Instance.tenant_id == project_id)
        rows = session.scalars(query.order_by(Instance.created.desc())).all()
        items = []
        for row in rows:
            view = render_instance(request, ctx, session, row, detail=True)
            status = session.get(ServiceStatusRow, row.id)
            view["service_status"] = effective_service_status(
                row, status, cp.settings.default.agent_heartbeat_expiry
            ).value
            view["server"] = _server_view(row)
            items.append(view)
    return {"instances": items}


@router.get("/mgmt/instances/{instance_id}")
def mgmt_show_instance(
    request: Request,
    instance_id: str,
    ctx: Annotated[RequestContext, Depends(authorize("mgmt:instance:show"))],
    deleted: bool = Query(False),
) -> dict[str, Any]:
    """An instance as an operator needs it: task, server, guest agent (last heartbeat), engine,
    volume, root history, quota charges and recent operations. ``?deleted=true`` also finds
    deleted instances."""
    cp = control_plane(request)
    expiry = cp.settings.default.agent_heartbeat_expiry
    with cp.session_factory() as session:
        inst = session.get(Instance, instance_id)
        if (
            inst is None
            or (inst.deleted and not deleted)
            or (inst.tenant_id != ctx.project_id and not ctx.auth.is_admin)
        ):
            raise NotFound(f"Instance {instance_id} could not be found.")
        view = render_instance(request, ctx, session, inst, detail=True)
        status = session.get(ServiceStatusRow, inst.id)
        version = session.get(DatastoreVersion, inst.datastore_version_id)
        assert version is not None
        history = session.get(RootEnabledHistory, inst.id)
        ops = session.scalars(
            select(Operation)
            .where(Operation.instance_id == inst.id)
            .order_by(Operation.created.desc())
            .limit(5)
        ).all()
        heartbeat = status.updated_at if status else None
        age = (utcnow() - heartbeat).total_seconds() if heartbeat else None
        effective = effective_service_status(inst, status, expiry)
        view.update(
            {
                "tenant_id": inst.tenant_id,
                "user_id": inst.user_id,
                "deleted": inst.deleted,
                "deleted_at": iso(inst.deleted_at),
                "task": inst.task.value,
                "task_description": inst.task_description,
                "service_status": effective.value,
                "guest_status": {"state_description": effective.value},
                "server": _server_view(inst),
                "agent": {
                    "last_heartbeat": iso(heartbeat),
                    "last_report_sent": iso(status.reported_at if status else None),
                    "heartbeat_age_seconds": round(age, 1) if age is not None else None,
                    "heartbeat_expiry_seconds": expiry,
                    "alive": age is not None and age <= expiry,
                },
                "engine": {
                    "manager": version.manager,
                    "version": version.version,
                    "reported_status": (status.status if status else ServiceStatus.NEW).value,
                },
                "root_enabled": iso(history.created) if history else None,
                "root_enabled_by": history.user if history else None,
                "quota_charges": quotas.charges_of(session, inst.id),
                "operations": [
                    {
                        "id": op.id,
                        "kind": op.kind,
                        "state": op.state,
                        "step": op.step,
                        "attempts": op.attempts,
                        "error": op.error,
                        "created": iso(op.created),
                    }
                    for op in ops
                ],
            }
        )
        view["volume"].update(
            {"used_bytes": inst.volume_used_bytes, "total_bytes": inst.volume_total_bytes}
        )
    return {"instance": view}


@router.post("/mgmt/instances/{instance_id}/action", status_code=202)
def mgmt_instance_action(
    request: Request,
    instance_id: str,
    body: dict[str, Any],
    ctx: Annotated[RequestContext, Depends(authorize("mgmt:instance:action"))],
) -> Response:
    """Admin actions on the engine: ``stop`` (stays stopped until started) and ``reboot``."""
    if len(body) != 1 or next(iter(body)) not in ("stop", "reboot"):
        raise BadRequest('The body must be {"stop": {}} or {"reboot": {}}.')
    (action,) = body
    cp = control_plane(request)
    with cp.session_factory() as session:
        inst = load_instance(session, ctx, instance_id)
        if inst.task is not Task.NONE:
            raise UnprocessableEntity(
                f"Instance {inst.id} is busy ({inst.task.value}); try again when it is not."
            )
    guest_call(cp, inst, "stop_db" if action == "stop" else "restart")
    return Response(status_code=202)


# /limits and /mgmt/quotas share this router's prefix (and so its place in the app).
