"""What the instance route modules share: finding the caller's instance, rendering it, calling
its guest, and paging lists."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, NamedTuple
from urllib.parse import unquote

from fastapi import Request
from sqlalchemy import bindparam, exists, select
from sqlalchemy.orm import Session

from coffer.api.context import RequestContext
from coffer.api.instance_views import effective_service_status, instance_view
from coffer.controlplane import ControlPlane
from coffer.datastores.registry import require_capability, rules_for
from coffer.db.models import (
    Datastore,
    DatastoreVersion,
    Instance,
    InstanceFault,
    ServiceStatusRow,
)
from coffer.db.models_backups import RUNNING_STATES, Backup
from coffer.db.models_day2 import Configuration
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
from coffer.status import SERVICE_READY, ServiceStatus, Task, trove_status

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


class ViewRow(NamedTuple):
    """An instance with everything its view needs, read in one query (``view_rows``)."""

    inst: Instance
    status: ServiceStatusRow | None
    version: DatastoreVersion
    datastore: Datastore
    configuration: Configuration | None
    #: A backup of the instance is being taken (its view then says BACKUP, as Trove's does).
    backup_running: bool


# Built once: a request only binds values, so it pays neither for building the statement nor
# for compiling it (SQLAlchemy caches the compiled form by the statement's shape).
_BACKUP_RUNNING = (
    exists()
    .where(
        Backup.instance_id == Instance.id,
        Backup.deleted.is_(False),
        Backup.state.in_(sorted(RUNNING_STATES)),
    )
    .label("backup_running")
)
_VIEW_COLUMNS = (
    select(Instance, ServiceStatusRow, DatastoreVersion, Datastore, Configuration, _BACKUP_RUNNING)
    .join(DatastoreVersion, DatastoreVersion.id == Instance.datastore_version_id)
    .join(Datastore, Datastore.id == DatastoreVersion.datastore_id)
    .outerjoin(ServiceStatusRow, ServiceStatusRow.instance_id == Instance.id)
    .outerjoin(Configuration, Configuration.id == Instance.configuration_id)
)
_VIEW_ROW = _VIEW_COLUMNS.where(Instance.id == bindparam("id"))
_VIEW_ROWS = _VIEW_COLUMNS.where(Instance.id.in_(bindparam("ids", expanding=True)))
_LATEST_FAULTS = (
    select(InstanceFault)
    .where(InstanceFault.instance_id.in_(bindparam("ids", expanding=True)))
    .order_by(InstanceFault.instance_id, InstanceFault.created.desc(), InstanceFault.id)
)


def view_rows(session: Session, ids: Sequence[str]) -> list[ViewRow]:
    """The ``ViewRow`` of each of ``ids`` that exists, in the order of ``ids``; one query."""
    if not ids:
        return []
    if len(ids) == 1:  # a show: no list to expand into the statement
        return [ViewRow(*values) for values in session.execute(_VIEW_ROW, {"id": ids[0]})]
    found = {
        row.inst.id: row
        for row in (ViewRow(*values) for values in session.execute(_VIEW_ROWS, {"ids": list(ids)}))
    }
    return [found[i] for i in ids if i in found]


def load_view_row(session: Session, ctx: RequestContext, instance_id: str) -> ViewRow:
    """``load_instance`` (the same 404 for an instance the caller may not see) and, in the same
    query, what its view needs."""
    rows = view_rows(session, [instance_id])
    inst = rows[0].inst if rows else None
    if inst is None or inst.deleted or (inst.tenant_id != ctx.project_id and not ctx.auth.is_admin):
        raise NotFound(f"Instance {instance_id} could not be found.")
    return rows[0]


def _latest_faults(session: Session, ids: Sequence[str]) -> dict[str, InstanceFault]:
    """The newest fault of each of ``ids`` that has one; one query."""
    faults: dict[str, InstanceFault] = {}
    if ids:
        for fault in session.scalars(_LATEST_FAULTS, {"ids": list(ids)}):
            faults.setdefault(fault.instance_id, fault)
    return faults


def configuration_view(group: Configuration, project_url: str) -> dict[str, Any]:
    """Trove's ``configuration`` of an instance detail view: ``{id, name, links}``."""
    base = project_url.rsplit("/v1.0/", 1)[0]
    return {
        "id": group.id,
        "name": group.name,
        "links": [
            {"rel": "self", "href": f"{project_url}/configurations/{group.id}"},
            {"rel": "bookmark", "href": f"{base}/configurations/{group.id}"},
        ],
    }


def render_view_rows(
    request: Request,
    ctx: RequestContext,
    session: Session,
    rows: Sequence[ViewRow],
    detail: bool,
) -> list[dict[str, Any]]:
    """The views of ``rows``, in order. ``status`` is BACKUP while a backup of an instance
    with no task runs (Trove's rule: after task states, before the server's). Detail views
    carry the attached configuration group (``{id, name, links}``) and, for instances in ERROR,
    their latest fault, which costs one more query for the whole set and only when some
    instance is in ERROR."""
    cp = control_plane(request)
    base = base_url(request)
    expiry = cp.settings.default.agent_heartbeat_expiry
    admin = ctx.auth.is_admin
    faults: dict[str, InstanceFault] = {}
    if detail:
        failed = [
            row.inst.id
            for row in rows
            if row.inst.task.is_error
            or trove_status(
                row.inst.task,
                row.inst.server_status,
                effective_service_status(row.inst, row.status, expiry),
            )
            == "ERROR"
        ]
        faults = _latest_faults(session, failed)
    views = []
    for row in rows:
        view = instance_view(
            row.inst,
            version=row.version,
            datastore=row.datastore,
            status_row=row.status,
            fault=faults.get(row.inst.id),
            base=base,
            heartbeat_expiry=expiry,
            detail=detail,
            admin=admin,
        )
        if row.backup_running and row.inst.task is Task.NONE:
            view["status"] = "BACKUP"
        if detail and row.configuration is not None:
            view["configuration"] = configuration_view(row.configuration, ctx.project_url)
        views.append(view)
    return views


def render_instances(
    request: Request,
    ctx: RequestContext,
    session: Session,
    instances: Sequence[Instance],
    detail: bool,
) -> list[dict[str, Any]]:
    """The views of ``instances`` (see ``render_view_rows``), their relations read in one
    query whatever their number."""
    rows = view_rows(session, [inst.id for inst in instances])
    return render_view_rows(request, ctx, session, rows, detail)


def render_instance(
    request: Request,
    ctx: RequestContext,
    session: Session,
    inst: Instance,
    detail: bool,
) -> dict[str, Any]:
    """The view of one instance (see ``render_view_rows``)."""
    return render_instances(request, ctx, session, [inst], detail)[0]


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
