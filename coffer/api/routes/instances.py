"""Trove v1.0 instance routes: create, list, show, update, delete and actions.

Every handler validates its input completely before it changes anything. Long work (create,
delete) is recorded as a durable operation in the same transaction as the instance's new desired
state, then the taskmanager is woken; database/user/root calls are short calls to the guest.
Handlers are plain functions: FastAPI runs them in its thread pool, so blocking RPC is fine.

Each route names its policy rule in ``authorize("<rule>")`` (``coffer.api.policy``), which runs
before the handler; instance creates are charged to the project's quota (``coffer.quotas``) in
the same transaction that records the instance.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from sqlalchemy import Connection, select
from sqlalchemy.orm import Session

from coffer import quotas
from coffer.api.audit import AuditedRoute, note_target
from coffer.api.context import RequestContext
from coffer.api.instance_schemas import (
    InstanceCreateBody,
    InstanceUpdateBody,
)
from coffer.api.policy import authorize, enforce
from coffer.api.responses import JSONBytes
from coffer.api.routes import quotas as quota_routes
from coffer.api.routes.backups import (
    fail_running_backups,
    restore_plan,
    restore_version,
)
from coffer.api.routes.instance_support import (
    control_plane,
    load_instance,
    page_size,
    page_values,
    paginated_json,
    render_instance,
    render_json,
    shown_values,
    wake_taskmanager,
)
from coffer.catalog import find_flavor, resolve_datastore_version
from coffer.configuration import groups
from coffer.configuration.values import validate_values
from coffer.controlplane import ControlPlane
from coffer.datastores.registry import require_capability, rules_for, serving_engine
from coffer.db.models import (
    DatastoreVersion,
    Instance,
    Operation,
    ServiceStatusRow,
    utcnow,
)
from coffer.db.session import transaction
from coffer.errors import (
    BadRequest,
    NotImplementedByDatastore,
    OverLimit,
)
from coffer.guest.datastores.base import Capability
from coffer.status import ServerStatus, ServiceStatus, Task
from coffer.taskmanager import day2, day2_requests, warm_pool
from coffer.taskmanager.instances import CLAIMED_KEY, CREATE, DELETE, seal_secret
from coffer.taskmanager.operations import PENDING, RUNNING, enqueue

LOG = logging.getLogger(__name__)

router = APIRouter(prefix="/v1.0/{tenant_id}", tags=["instances"], route_class=AuditedRoute)

NOT_YET = {
    "replica_of": "replication",
    "replica_count": "replication",
    "modules": "modules",
    "locality": "locality",
}


# --- instances ---------------------------------------------------------------------------------


def list_page(
    conn: Connection,
    request: Request,
    ctx: RequestContext,
    limit: int | None,
    marker: str | None,
    detail: bool,
) -> bytes:
    """One page as JSON, newest first, keyed on (created, id): one query (two with a marker)
    whatever the page size, on a read-only connection, without ORM objects (views of rows an
    earlier request rendered are taken from ``RenderedViews``)."""
    cp = control_plane(request)
    page = page_size(request, limit, cp.settings.default.instances_page_size)
    rows = page_values(conn, ctx.project_id, page + 1, marker, detail)
    more = len(rows) > page
    rows = rows[:page]
    items = render_json(request, ctx, conn, rows, detail)
    next_marker = rows[-1].id if more and rows else None
    return paginated_json(request, items, next_marker, "instances", page)


def show_view(conn: Connection, request: Request, ctx: RequestContext, instance_id: str) -> bytes:
    """``{"instance": <detail view>}`` as JSON, or ``NotFound`` for an instance the caller may
    not see; one query."""
    values = shown_values(conn, ctx, instance_id)
    view = render_json(request, ctx, conn, [values], detail=True)
    return b'{"instance":' + view[1:-1] + b"}"


@router.get("/instances")
def list_instances(
    request: Request,
    ctx: Annotated[RequestContext, Depends(authorize("instance:index"))],
    limit: int | None = Query(None),
    marker: str | None = Query(None),
    include_clustered: str | None = Query(None),
) -> JSONBytes:
    with control_plane(request).engine.connect() as conn:
        return JSONBytes(list_page(conn, request, ctx, limit, marker, detail=False))


@router.get("/instances/detail")
def list_instances_detail(
    request: Request,
    ctx: Annotated[RequestContext, Depends(authorize("instance:detail"))],
    limit: int | None = Query(None),
    marker: str | None = Query(None),
) -> JSONBytes:
    with control_plane(request).engine.connect() as conn:
        return JSONBytes(list_page(conn, request, ctx, limit, marker, detail=True))


@router.get("/instances/{instance_id}")
def show_instance(
    request: Request,
    instance_id: str,
    ctx: Annotated[RequestContext, Depends(authorize("instance:show"))],
) -> JSONBytes:
    with control_plane(request).engine.connect() as conn:
        return JSONBytes(show_view(conn, request, ctx, instance_id))


@router.get("/instances/{instance_id}/events")
def list_instance_events(
    request: Request,
    instance_id: str,
    ctx: Annotated[RequestContext, Depends(authorize("instance:show"))],
) -> dict[str, Any]:
    """The instance's operations (what, who, when, outcome, fault), newest first; whoever may
    see the instance may see them."""
    cp = control_plane(request)
    with cp.session_factory() as session:
        inst = load_instance(session, ctx, instance_id)
        return {"events": day2.list_events(session, inst.id)}


def _caller(ctx: RequestContext) -> day2.Caller:
    return day2.Caller(ctx.project_id, ctx.auth.user_id, ctx.auth.is_admin)


def _validate_create(
    cp: ControlPlane, session: Session, body: InstanceCreateBody
) -> tuple[DatastoreVersion, Any, int]:
    spec = body.instance
    for field, feature in NOT_YET.items():
        if getattr(spec, field) is not None:
            raise NotImplementedByDatastore(
                f"'{field}' ({feature}) is not supported by this deployment yet."
            )
    if spec.flavorRef is None:
        raise BadRequest("flavorRef is required: pass the id of a flavor from GET /flavors.")
    flavor = find_flavor(session, spec.flavorRef)
    ds = spec.datastore or None
    # A restore that names no datastore gets the backup's (checked fully in restore_plan).
    restored = restore_version(session, spec.restorePoint) if spec.restorePoint and not ds else None
    version = restored or resolve_datastore_version(
        session,
        ds.type if ds else None,
        ds.version if ds else None,
        ds.version_number if ds else None,
    )
    serving_engine(version.manager, version.version)
    if spec.volume is None:
        raise BadRequest('volume is required: pass {"volume": {"size": <GB>}}.')
    size = int(spec.volume.size)
    max_size = cp.settings.default.max_accepted_volume_size
    if size > max_size:
        raise OverLimit(
            f"Volume size {size} GB is larger than the largest accepted size, {max_size} GB."
        )
    rules = rules_for(version.manager)
    if spec.databases:
        require_capability(version.manager, Capability.DATABASES)
    if spec.users:
        require_capability(version.manager, Capability.USERS)
    db_names = []
    for db in spec.databases:
        rules.validate_database(db.model_dump(exclude_none=True))
        if db.name in db_names:
            raise BadRequest(f"Database {db.name!r} is listed twice.")
        db_names.append(db.name)
    seen_users = set()
    reserved = [cp.settings.engine_user]
    for user in spec.users:
        rules.validate_user(user.model_dump(exclude_none=True), extra_reserved=reserved)
        key = (user.name, user.host or "%")
        if key in seen_users:
            raise BadRequest(f"User {user.name}@{user.host or '%'} is listed twice.")
        seen_users.add(key)
        for ref in user.databases:
            if ref.name not in db_names:
                raise BadRequest(
                    f"User {user.name} is granted database {ref.name!r}, which is not in the "
                    "instance's databases list; add it there too."
                )
    return version, flavor, size


def _create_configuration(
    session: Session, ctx: RequestContext, version: DatastoreVersion, group_id: str
) -> str:
    """The group an instance is created with: the caller's (404 otherwise), for the instance's
    datastore version (400), with values its rules still take (422). Locked, so it cannot be
    deleted before the instance that holds it is recorded."""
    group = groups.lock_group(session, groups.Owner(ctx.project_id, ctx.auth.is_admin), group_id)
    if group.tenant_id != ctx.project_id:
        raise day2_requests.ConfigurationMismatch(
            f"Configuration group {group.id} belongs to another project; create the instance "
            "with a group of its own project."
        )
    if group.datastore_version_id != version.id:
        raise day2_requests.ConfigurationMismatch(
            f"Configuration group {group.id} is for another datastore version than the "
            f"instance ({version.name}); create a group for that version."
        )
    validate_values(session, version.id, groups.group_values(session, group.id))
    return group.id


@router.post("/instances")
def create_instance(
    request: Request,
    body: InstanceCreateBody,
    ctx: Annotated[RequestContext, Depends(authorize("instance:create"))],
) -> dict[str, Any]:
    cp = control_plane(request)
    spec = body.instance
    # As in Trove, creating databases or users with the instance needs their rules too.
    if spec.databases:
        enforce(request, ctx, "instance:extension:database:create")
    if spec.users:
        enforce(request, ctx, "instance:extension:user:create")
    with transaction(cp.session_factory) as session:
        version, flavor, size = _validate_create(cp, session, body)
        configuration_id = None
        if spec.configuration is not None:
            configuration_id = _create_configuration(session, ctx, version, spec.configuration)
        restore = None
        if spec.restorePoint is not None:
            restore = restore_plan(cp, session, ctx, spec.restorePoint, version, size)
        access = spec.access.model_dump() if spec.access else {"is_public": False}
        inst = None
        if (
            configuration_id is None
            and restore is None
            and warm_pool.fits(cp.settings, version.manager, flavor.id, size, access)
        ):
            inst = warm_pool.claim(
                session,
                version_id=version.id,
                flavor_id=flavor.id,
                size=size,
                tenant_id=ctx.project_id,
                user_id=ctx.auth.user_id,
                name=spec.name,
                region_id=cp.settings.default.region_name,
            )
        claimed = inst is not None
        if inst is None:
            inst = Instance(
                tenant_id=ctx.project_id,
                user_id=ctx.auth.user_id,
                name=spec.name,
                flavor_id=flavor.id,
                volume_size=size,
                datastore_version_id=version.id,
                task=Task.BUILDING,
                server_status=ServerStatus.BUILD,
                access=access,
                region_id=cp.settings.default.region_name,
                encrypted_key="",
                configuration_id=configuration_id,
            )
            session.add(inst)
            session.flush()
        # Checked and charged under the project's quota lock; a refusal rolls the row back
        # (a warm instance taken over stays a warm instance).
        quotas.reserve(
            session,
            cp.settings,
            ctx.project_id,
            inst.id,
            {"instances": 1, "ram": flavor.ram, "volumes": size},
        )
        if not claimed:
            _key, wrapped = cp.new_instance_key(inst.id)
            inst.encrypted_key = wrapped
            session.add(ServiceStatusRow(instance_id=inst.id, status=ServiceStatus.NEW))
        users = [u.model_dump(exclude_none=True) for u in spec.users]
        payload: dict[str, Any] = {
            "databases": [d.model_dump(exclude_none=True) for d in spec.databases],
        }
        if users:
            payload["sealed_users"] = seal_secret(cp, users, f"users:{inst.id}")
        if restore is not None:
            payload["restore"] = restore.payload()
        if claimed:
            payload[CLAIMED_KEY] = True
        op = enqueue(
            session,
            CREATE,
            inst.id,
            payload,
            deadline=utcnow() + timedelta(seconds=cp.settings.default.usage_timeout),
        )
        if claimed:
            # The warm instance's server runs: its agent needs only the databases and users.
            op.step = "prepare"
        op_id = op.id
        view = render_instance(request, ctx, session, inst, detail=True)
        if configuration_id is not None and "configuration" not in view:
            view["configuration"] = day2_requests.configuration_ref(session, inst, ctx.project_url)
    note_target(request, instance_id=inst.id)
    wake_taskmanager(cp, op_id)
    return {"instance": view}


@router.delete("/instances/{instance_id}", status_code=202)
def delete_instance(
    request: Request,
    instance_id: str,
    ctx: Annotated[RequestContext, Depends(authorize("instance:delete"))],
) -> Response:
    cp = control_plane(request)
    with transaction(cp.session_factory) as session:
        inst = load_instance(session, ctx, instance_id)
        if inst.task is Task.DELETING:
            return Response(status_code=202)
        inst.task = Task.DELETING
        inst.task_description = "Deleting the instance."
        op_id = enqueue(session, DELETE, inst.id, {}).id
    wake_taskmanager(cp, op_id)
    return Response(status_code=202)


@router.put("/instances/{instance_id}", status_code=202)
def update_instance(
    request: Request,
    instance_id: str,
    body: InstanceUpdateBody,
    ctx: Annotated[RequestContext, Depends(authorize("instance:update"))],
) -> Response:
    cp = control_plane(request)
    changes = body.instance.model_dump(exclude_unset=True)
    other = [k for k in changes if k != "name"]
    if len(other) > 1:
        raise BadRequest("Change at most one attribute besides 'name' per request.")
    if other and other[0] not in ("configuration", "access", "datastore_version"):
        raise NotImplementedByDatastore(
            f"Changing '{other[0]}' is not supported by this deployment yet."
        )
    op_id = None
    with transaction(cp.session_factory) as session:
        inst = load_instance(session, ctx, instance_id)
        if other:
            op_id = day2_requests.request_update(
                cp, session, _caller(ctx), inst, other[0], changes[other[0]]
            )
        if body.instance.name is not None:
            day2_requests.record_rename(session, _caller(ctx), inst, body.instance.name)
    if op_id is not None:
        wake_taskmanager(cp, op_id)
    return Response(status_code=202)


@router.patch("/instances/{instance_id}", status_code=202)
def edit_instance(
    request: Request,
    instance_id: str,
    body: InstanceUpdateBody,
    ctx: Annotated[RequestContext, Depends(authorize("instance:edit"))],
) -> Response:
    """Trove's deprecated PATCH: the same as PUT."""
    return update_instance(request, instance_id, body, ctx)


#: The policy rule of each instance action (``resize`` has two; see ``_action_rule``).
ACTION_RULES = {
    "restart": "instance:restart",
    "promote_to_replica_source": "instance:promote_to_replica_source",
    "eject_replica_source": "instance:eject_replica_source",
}
_ACTION_RULE_NAMES = (
    *ACTION_RULES.values(),
    "instance:resize_flavor",
    "instance:resize_volume",
    "instance:reset_status",
    "instance:force_delete",
)


def _action_rule(action: str, args: Any) -> str | None:
    if action == "reset_status":
        # Trove's rule: force_delete is the owner's; a plain reset is the admin's.
        forced = isinstance(args, dict) and "force_delete" in args
        return "instance:force_delete" if forced else "instance:reset_status"
    if action == "resize":
        volume = isinstance(args, dict) and "volume" in args
        return "instance:resize_volume" if volume else "instance:resize_flavor"
    return ACTION_RULES.get(action)


@router.post("/instances/{instance_id}/action", status_code=202)
def instance_action(
    request: Request,
    instance_id: str,
    body: dict[str, Any],
    ctx: Annotated[RequestContext, Depends(authorize(None, deferred=_ACTION_RULE_NAMES))],
) -> Response:
    cp = control_plane(request)
    if len(body) != 1:
        raise BadRequest(
            'An action body must have exactly one key naming the action, e.g. {"reset_status": {}}.'
        )
    ((action, args),) = body.items()
    rule = _action_rule(action, args)
    if rule is None:
        known = ", ".join(sorted([*ACTION_RULES, "resize", "reset_status"]))
        raise BadRequest(f"Unknown action {action!r}; actions are {known}.")
    enforce(request, ctx, rule)
    if action == "reset_status":
        return _reset_status(cp, ctx, instance_id, rule == "instance:force_delete")
    if action in ("restart", "resize"):
        with transaction(cp.session_factory) as session:
            inst = load_instance(session, ctx, instance_id)
            op_id = day2_requests.request_action(cp, session, _caller(ctx), inst, action, args)
        wake_taskmanager(cp, op_id)
        return Response(status_code=202)
    with cp.session_factory() as session:
        load_instance(session, ctx, instance_id)  # another project's id is 404 whatever the action
    raise NotImplementedByDatastore(f"The {action} action is not supported yet.")


def _reset_status(
    cp: ControlPlane, ctx: RequestContext, instance_id: str, force_delete: bool
) -> Response:
    with transaction(cp.session_factory) as session:
        inst = load_instance(session, ctx, instance_id)
        # Stop any operation still holding the instance, so it cannot overwrite the reset.
        for op in session.scalars(
            select(Operation).where(
                Operation.instance_id == inst.id, Operation.state.in_((PENDING, RUNNING))
            )
        ):
            op.state = "failed"
            op.error = "cancelled by reset_status"
            op.lease_owner = None
        # As in Trove, backups still being taken end FAILED (their operations were just stopped).
        fail_running_backups(session, inst.id, "The backup was cancelled by reset_status.")
        inst.task = Task.NONE
        inst.task_description = ""
        row = session.get(ServiceStatusRow, inst.id)
        if row is not None:
            row.status = ServiceStatus.UNKNOWN
            row.updated_at = utcnow()
        op_id = None
        if force_delete:
            inst.task = Task.DELETING
            op_id = enqueue(session, DELETE, inst.id, {}).id
    if op_id:
        wake_taskmanager(cp, op_id)
    return Response(status_code=202)


# The database/user/root routes (Trove's "MYSQL" extension), the admin routes and the quota
# routes are mounted under this router's prefix.
from coffer.api.routes import instance_extensions, mgmt_instances  # noqa: E402

router.include_router(instance_extensions.router)
router.include_router(mgmt_instances.router)
router.include_router(quota_routes.router)
