"""What the instance route modules share: finding the caller's instance, rendering it, calling
its guest, and paging lists."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any
from urllib.parse import unquote

from fastapi import Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from coffer.api.context import RequestContext
from coffer.api.instance_views import instance_view
from coffer.controlplane import ControlPlane
from coffer.datastores.registry import require_capability, rules_for
from coffer.db.models import (
    Datastore,
    DatastoreVersion,
    Instance,
    InstanceFault,
    ServiceStatusRow,
)
from coffer.errors import (
    BadRequest,
    CofferError,
    Conflict,
    Forbidden,
    GuestError,
    NotFound,
    NotImplementedByDatastore,
    OverLimit,
    RemoteError,
    UnprocessableEntity,
    ValidationError,
)
from coffer.guest.datastores.base import Capability
from coffer.status import SERVICE_READY, ServiceStatus, Task

LOG = logging.getLogger(__name__)


def control_plane(request: Request) -> ControlPlane:
    cp: ControlPlane = request.app.state.services.rpc
    return cp


def base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def reserved_names(request: Request) -> list[str]:
    """The engine's OS user name is the guest's own; tenants may not take it."""
    return [control_plane(request).settings.engine_user]


def load_instance(session: Session, ctx: RequestContext, instance_id: str) -> Instance:
    inst = session.get(Instance, instance_id)
    if inst is None or inst.deleted or (inst.tenant_id != ctx.project_id and not ctx.auth.is_admin):
        # 404 rather than 403: a project must not learn that another project's instance exists.
        raise NotFound(f"Instance {instance_id} could not be found.")
    return inst


def render_instance(
    request: Request,
    ctx: RequestContext,
    session: Session,
    inst: Instance,
    detail: bool,
) -> dict[str, Any]:
    cp = control_plane(request)
    version = session.get(DatastoreVersion, inst.datastore_version_id)
    assert version is not None
    datastore = session.get(Datastore, version.datastore_id)
    assert datastore is not None
    fault = None
    if detail:
        fault = session.scalars(
            select(InstanceFault)
            .where(InstanceFault.instance_id == inst.id)
            .order_by(InstanceFault.created.desc())
            .limit(1)
        ).first()
    return instance_view(
        inst,
        version=version,
        datastore=datastore,
        status_row=session.get(ServiceStatusRow, inst.id),
        fault=fault,
        base=base_url(request),
        heartbeat_expiry=cp.settings.default.agent_heartbeat_expiry,
        detail=detail,
        admin=ctx.auth.is_admin,
    )


def wake_taskmanager(cp: ControlPlane, op_id: str) -> None:
    try:
        cp.taskmanager().cast("wake", op_id=op_id)
    except CofferError as exc:
        # The operation is durable; the taskmanager's poll will find it.
        LOG.warning("could not wake the taskmanager (%s); it will poll", exc)


def guest_call(cp: ControlPlane, inst: Instance, method: str, **kwargs: Any) -> Any:
    """A short call to the instance's guest, with its errors turned into API errors."""
    try:
        return cp.guest(inst.id).call(
            method, timeout=cp.settings.default.agent_call_low_timeout, **kwargs
        )
    except RemoteError as exc:
        raise api_error(exc) from exc


_BY_STATUS: dict[int, type[CofferError]] = {
    400: BadRequest,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: OverLimit,
    422: UnprocessableEntity,
    501: NotImplementedByDatastore,
}


def api_error(exc: RemoteError) -> CofferError:
    return _BY_STATUS.get(exc.status, GuestError)(exc.message)


def ensure_ready(session: Session, inst: Instance) -> None:
    """Databases/users/root calls need a running engine (Trove answers 422 otherwise)."""
    row = session.get(ServiceStatusRow, inst.id)
    status = row.status if row else ServiceStatus.NEW
    if inst.task is Task.BUILDING or status not in SERVICE_READY:
        raise UnprocessableEntity(
            f"Instance {inst.id} is not ready (its database is {status.value}); try again when "
            "its status is ACTIVE."
        )


def split_user(user: str) -> tuple[str, str]:
    """``name`` or ``name@host`` from the path (URL-quoted by the clients)."""
    text = unquote(user)
    name, sep, host = text.rpartition("@")
    if not sep:
        return text, "%"
    return name, host or "%"


def paginated(
    request: Request, items: list[dict[str, Any]], next_marker: str | None, key: str, limit: int
) -> dict[str, Any]:
    body: dict[str, Any] = {key: items}
    if next_marker is not None:
        url = request.url.include_query_params(limit=limit, marker=next_marker)
        body["links"] = [{"rel": "next", "href": str(url)}]
    return body


def page_size(request: Request, value: int | None, default: int) -> int:
    if value is None:
        return default
    if value < 1:
        raise ValidationError("limit must be a positive whole number.")
    return min(value, default)


@dataclass(frozen=True)
class Target:
    """An instance a database/user/root call is about, with its engine's name rules."""

    inst: Instance
    manager: str
    rules: ModuleType


def target(
    request: Request, ctx: RequestContext, instance_id: str, capability: Capability
) -> Target:
    """Load the caller's instance, refuse (501) what its engine cannot do, then (422) an engine
    that is not running; in that order, and before anything is sent to the guest."""
    cp = control_plane(request)
    with cp.session_factory() as session:
        inst = load_instance(session, ctx, instance_id)
        version = session.get(DatastoreVersion, inst.datastore_version_id)
        assert version is not None
        require_capability(version.manager, capability)
        ensure_ready(session, inst)
        return Target(inst, version.manager, rules_for(version.manager))
