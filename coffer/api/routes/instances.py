"""Trove v1.0 instance routes: instances, actions, databases, users, user access and root.

Every handler validates its input completely before it changes anything. Long work (create,
delete) is recorded as a durable operation in the same transaction as the instance's new desired
state, then the taskmanager is woken; database/user/root calls are short calls to the guest.
Handlers are plain functions: FastAPI runs them in its thread pool, so blocking RPC is fine.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from types import ModuleType
from typing import Any
from urllib.parse import unquote

from fastapi import APIRouter, Depends, Query, Request, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from coffer.api.context import RequestContext, get_context, require_admin
from coffer.api.instance_schemas import (
    AccessGrantBody,
    DatabasesBody,
    InstanceCreateBody,
    InstanceUpdateBody,
    RootEnableBody,
    UsersBody,
    UsersPasswordBody,
    UserUpdateBody,
)
from coffer.api.instance_views import effective_service_status, instance_view
from coffer.catalog import find_flavor, resolve_datastore_version
from coffer.controlplane import ControlPlane
from coffer.datastores.registry import require_capability, rules_for, serving_engine
from coffer.db.models import (
    Datastore,
    DatastoreVersion,
    Instance,
    InstanceFault,
    Operation,
    RootEnabledHistory,
    ServiceStatusRow,
    utcnow,
)
from coffer.db.session import transaction
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
    RootHistoryNotFound,
    UnprocessableEntity,
    ValidationError,
)
from coffer.guest.datastores.base import Capability
from coffer.status import SERVICE_READY, ServerStatus, ServiceStatus, Task
from coffer.taskmanager.instances import CREATE, DELETE, seal_secret
from coffer.taskmanager.operations import PENDING, RUNNING, enqueue

LOG = logging.getLogger(__name__)

router = APIRouter(prefix="/v1.0/{tenant_id}", tags=["instances"])

NOT_YET = {
    "configuration": "configuration groups",
    "restorePoint": "restore from backup",
    "replica_of": "replication",
    "replica_count": "replication",
    "modules": "modules",
    "locality": "locality",
}


# --- helpers -----------------------------------------------------------------------------------


def _cp(request: Request) -> ControlPlane:
    cp: ControlPlane = request.app.state.services.rpc
    return cp


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def _reserved(request: Request) -> list[str]:
    """The engine's OS user name is the guest's own; tenants may not take it."""
    return [_cp(request).settings.engine_user]


def _write_allowed(ctx: RequestContext) -> None:
    if "admin" not in ctx.auth.roles and "member" not in ctx.auth.roles:
        raise Forbidden("Your role may look at instances but not change them.")


def _load(session: Session, ctx: RequestContext, instance_id: str) -> Instance:
    inst = session.get(Instance, instance_id)
    if inst is None or inst.deleted or (inst.tenant_id != ctx.project_id and not ctx.auth.is_admin):
        # 404 rather than 403: a project must not learn that another project's instance exists.
        raise NotFound(f"Instance {instance_id} could not be found.")
    return inst


def _render(
    request: Request,
    ctx: RequestContext,
    session: Session,
    inst: Instance,
    detail: bool,
) -> dict[str, Any]:
    cp = _cp(request)
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
        base=_base(request),
        heartbeat_expiry=cp.settings.default.agent_heartbeat_expiry,
        detail=detail,
        admin=ctx.auth.is_admin,
    )


def _wake_taskmanager(cp: ControlPlane, op_id: str) -> None:
    try:
        cp.taskmanager().cast("wake", op_id=op_id)
    except CofferError as exc:
        # The operation is durable; the taskmanager's poll will find it.
        LOG.warning("could not wake the taskmanager (%s); it will poll", exc)


def _guest_call(cp: ControlPlane, inst: Instance, method: str, **kwargs: Any) -> Any:
    """A short call to the instance's guest, with its errors turned into API errors."""
    try:
        return cp.guest(inst.id).call(
            method, timeout=cp.settings.default.agent_call_low_timeout, **kwargs
        )
    except RemoteError as exc:
        raise _api_error(exc) from exc


_BY_STATUS: dict[int, type[CofferError]] = {
    400: BadRequest,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: OverLimit,
    422: UnprocessableEntity,
    501: NotImplementedByDatastore,
}


def _api_error(exc: RemoteError) -> CofferError:
    return _BY_STATUS.get(exc.status, GuestError)(exc.message)


def _ready(session: Session, inst: Instance) -> None:
    """Databases/users/root calls need a running engine (Trove answers 422 otherwise)."""
    row = session.get(ServiceStatusRow, inst.id)
    status = row.status if row else ServiceStatus.NEW
    if inst.task is Task.BUILDING or status not in SERVICE_READY:
        raise UnprocessableEntity(
            f"Instance {inst.id} is not ready (its database is {status.value}); try again when "
            "its status is ACTIVE."
        )


def _split_user(user: str) -> tuple[str, str]:
    """``name`` or ``name@host`` from the path (URL-quoted by the clients)."""
    text = unquote(user)
    name, sep, host = text.rpartition("@")
    if not sep:
        return text, "%"
    return name, host or "%"


def _paginate(
    request: Request, items: list[dict[str, Any]], next_marker: str | None, key: str, limit: int
) -> dict[str, Any]:
    body: dict[str, Any] = {key: items}
    if next_marker is not None:
        url = request.url.include_query_params(limit=limit, marker=next_marker)
        body["links"] = [{"rel": "next", "href": str(url)}]
    return body


def _limit(request: Request, value: int | None, default: int) -> int:
    if value is None:
        return default
    if value < 1:
        raise ValidationError("limit must be a positive whole number.")
    return min(value, default)


# --- instances ---------------------------------------------------------------------------------


def _list(
    request: Request, ctx: RequestContext, limit: int | None, marker: str | None, detail: bool
) -> dict[str, Any]:
    cp = _cp(request)
    page = _limit(request, limit, cp.settings.default.instances_page_size)
    with cp.session_factory() as session:
        query = (
            select(Instance)
            .where(Instance.deleted.is_(False), Instance.tenant_id == ctx.project_id)
            .order_by(Instance.created.desc(), Instance.id)
        )
        rows = list(session.scalars(query))
        if marker:
            ids = [r.id for r in rows]
            if marker not in ids:
                raise BadRequest(f"Marker {marker} does not name an instance in this list.")
            rows = rows[ids.index(marker) + 1 :]
        more = len(rows) > page
        rows = rows[:page]
        items = [_render(request, ctx, session, r, detail) for r in rows]
    return _paginate(request, items, rows[-1].id if more and rows else None, "instances", page)


@router.get("/instances")
def list_instances(
    request: Request,
    ctx: RequestContext = Depends(get_context),  # noqa: B008 - FastAPI idiom
    limit: int | None = Query(None),
    marker: str | None = Query(None),
    include_clustered: str | None = Query(None),
) -> dict[str, Any]:
    return _list(request, ctx, limit, marker, detail=False)


@router.get("/instances/detail")
def list_instances_detail(
    request: Request,
    ctx: RequestContext = Depends(get_context),  # noqa: B008
    limit: int | None = Query(None),
    marker: str | None = Query(None),
) -> dict[str, Any]:
    return _list(request, ctx, limit, marker, detail=True)


@router.get("/instances/{instance_id}")
def show_instance(
    request: Request,
    instance_id: str,
    ctx: RequestContext = Depends(get_context),  # noqa: B008
) -> dict[str, Any]:
    cp = _cp(request)
    with cp.session_factory() as session:
        inst = _load(session, ctx, instance_id)
        return {"instance": _render(request, ctx, session, inst, detail=True)}


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
    version = resolve_datastore_version(
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


@router.post("/instances")
def create_instance(
    request: Request,
    body: InstanceCreateBody,
    ctx: RequestContext = Depends(get_context),  # noqa: B008
) -> dict[str, Any]:
    _write_allowed(ctx)
    cp = _cp(request)
    spec = body.instance
    with transaction(cp.session_factory) as session:
        version, flavor, size = _validate_create(cp, session, body)
        inst = Instance(
            tenant_id=ctx.project_id,
            user_id=ctx.auth.user_id,
            name=spec.name,
            flavor_id=flavor.id,
            volume_size=size,
            datastore_version_id=version.id,
            task=Task.BUILDING,
            server_status=ServerStatus.BUILD,
            access=spec.access.model_dump() if spec.access else {"is_public": False},
            region_id=cp.settings.default.region_name,
            encrypted_key="",
        )
        session.add(inst)
        session.flush()
        _key, wrapped = cp.new_instance_key(inst.id)
        inst.encrypted_key = wrapped
        session.add(ServiceStatusRow(instance_id=inst.id, status=ServiceStatus.NEW))
        users = [u.model_dump(exclude_none=True) for u in spec.users]
        payload: dict[str, Any] = {
            "databases": [d.model_dump(exclude_none=True) for d in spec.databases],
        }
        if users:
            payload["sealed_users"] = seal_secret(cp, users, f"users:{inst.id}")
        op = enqueue(
            session,
            CREATE,
            inst.id,
            payload,
            deadline=utcnow() + timedelta(seconds=cp.settings.default.usage_timeout),
        )
        op_id = op.id
        view = _render(request, ctx, session, inst, detail=True)
    _wake_taskmanager(cp, op_id)
    return {"instance": view}


@router.delete("/instances/{instance_id}", status_code=202)
def delete_instance(
    request: Request,
    instance_id: str,
    ctx: RequestContext = Depends(get_context),  # noqa: B008
) -> Response:
    _write_allowed(ctx)
    cp = _cp(request)
    with transaction(cp.session_factory) as session:
        inst = _load(session, ctx, instance_id)
        if inst.task is Task.DELETING:
            return Response(status_code=202)
        inst.task = Task.DELETING
        inst.task_description = "Deleting the instance."
        op_id = enqueue(session, DELETE, inst.id, {}).id
    _wake_taskmanager(cp, op_id)
    return Response(status_code=202)


@router.put("/instances/{instance_id}", status_code=202)
def update_instance(
    request: Request,
    instance_id: str,
    body: InstanceUpdateBody,
    ctx: RequestContext = Depends(get_context),  # noqa: B008
) -> Response:
    _write_allowed(ctx)
    cp = _cp(request)
    changes = body.instance.model_dump(exclude_unset=True)
    other = [k for k in changes if k != "name"]
    if len(other) > 1:
        raise BadRequest("Change at most one attribute besides 'name' per request.")
    if other:
        raise NotImplementedByDatastore(
            f"Changing '{other[0]}' is not supported by this deployment yet."
        )
    with transaction(cp.session_factory) as session:
        inst = _load(session, ctx, instance_id)
        if body.instance.name is not None:
            inst.name = body.instance.name
    return Response(status_code=202)


@router.patch("/instances/{instance_id}", status_code=202)
def edit_instance(
    request: Request,
    instance_id: str,
    body: InstanceUpdateBody,
    ctx: RequestContext = Depends(get_context),  # noqa: B008
) -> Response:
    """Trove's deprecated PATCH: the same as PUT."""
    return update_instance(request, instance_id, body, ctx)


@router.post("/instances/{instance_id}/action", status_code=202)
def instance_action(
    request: Request,
    instance_id: str,
    body: dict[str, Any],
    ctx: RequestContext = Depends(get_context),  # noqa: B008
) -> Response:
    _write_allowed(ctx)
    cp = _cp(request)
    if len(body) != 1:
        raise BadRequest(
            'An action body must have exactly one key naming the action, e.g. {"reset_status": {}}.'
        )
    (action,) = body
    if action == "reset_status":
        force_delete = isinstance(body[action], dict) and "force_delete" in body[action]
        if not force_delete:
            require_admin(ctx)
        return _reset_status(cp, ctx, instance_id, force_delete)
    if action in ("restart", "resize", "promote_to_replica_source", "eject_replica_source"):
        raise NotImplementedByDatastore(f"The {action} action is not supported yet.")
    raise BadRequest(f"Unknown action {action!r}.")


def _reset_status(
    cp: ControlPlane, ctx: RequestContext, instance_id: str, force_delete: bool
) -> Response:
    with transaction(cp.session_factory) as session:
        inst = _load(session, ctx, instance_id)
        # Stop any operation still holding the instance, so it cannot overwrite the reset.
        for op in session.scalars(
            select(Operation).where(
                Operation.instance_id == inst.id, Operation.state.in_((PENDING, RUNNING))
            )
        ):
            op.state = "failed"
            op.error = "cancelled by reset_status"
            op.lease_owner = None
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
        _wake_taskmanager(cp, op_id)
    return Response(status_code=202)


# --- databases ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """An instance a database/user/root call is about, with its engine's name rules."""

    inst: Instance
    manager: str
    rules: ModuleType


def _target(
    request: Request, ctx: RequestContext, instance_id: str, capability: Capability
) -> Target:
    """Load the caller's instance, refuse (501) what its engine cannot do, then (422) an engine
    that is not running; in that order, and before anything is sent to the guest."""
    cp = _cp(request)
    with cp.session_factory() as session:
        inst = _load(session, ctx, instance_id)
        version = session.get(DatastoreVersion, inst.datastore_version_id)
        assert version is not None
        require_capability(version.manager, capability)
        _ready(session, inst)
        return Target(inst, version.manager, rules_for(version.manager))


@router.get("/instances/{instance_id}/databases")
def list_databases(
    request: Request,
    instance_id: str,
    ctx: RequestContext = Depends(get_context),  # noqa: B008
    limit: int | None = Query(None),
    marker: str | None = Query(None),
) -> dict[str, Any]:
    t = _target(request, ctx, instance_id, Capability.DATABASES)
    cp = _cp(request)
    page = _limit(request, limit, cp.settings.default.databases_page_size)
    items, next_marker = _guest_call(cp, t.inst, "list_databases", limit=page, marker=marker)
    return _paginate(request, items, next_marker, "databases", page)


@router.post("/instances/{instance_id}/databases", status_code=202)
def create_databases(
    request: Request,
    instance_id: str,
    body: DatabasesBody,
    ctx: RequestContext = Depends(get_context),  # noqa: B008
) -> Response:
    _write_allowed(ctx)
    t = _target(request, ctx, instance_id, Capability.DATABASES)
    dbs = [d.model_dump(exclude_none=True) for d in body.databases]
    for db in dbs:
        t.rules.validate_database(db)
    _guest_call(_cp(request), t.inst, "create_databases", databases=dbs)
    return Response(status_code=202)


@router.get("/instances/{instance_id}/databases/{name}")
def show_database(
    request: Request,
    instance_id: str,
    name: str,
    ctx: RequestContext = Depends(get_context),  # noqa: B008
) -> Response:
    raise NotImplementedByDatastore("Showing a single database is not supported; list them.")


@router.delete("/instances/{instance_id}/databases/{name}", status_code=202)
def delete_database(
    request: Request,
    instance_id: str,
    name: str,
    ctx: RequestContext = Depends(get_context),  # noqa: B008
) -> Response:
    _write_allowed(ctx)
    t = _target(request, ctx, instance_id, Capability.DATABASES)
    t.rules.validate_database({"name": name})
    _guest_call(_cp(request), t.inst, "delete_database", name=name)
    return Response(status_code=202)


# --- users -------------------------------------------------------------------------------------


@router.get("/instances/{instance_id}/users")
def list_users(
    request: Request,
    instance_id: str,
    ctx: RequestContext = Depends(get_context),  # noqa: B008
    limit: int | None = Query(None),
    marker: str | None = Query(None),
) -> dict[str, Any]:
    t = _target(request, ctx, instance_id, Capability.USERS)
    cp = _cp(request)
    page = _limit(request, limit, cp.settings.default.users_page_size)
    items, next_marker = _guest_call(cp, t.inst, "list_users", limit=page, marker=marker)
    return _paginate(request, items, next_marker, "users", page)


@router.post("/instances/{instance_id}/users", status_code=202)
def create_users(
    request: Request,
    instance_id: str,
    body: UsersBody,
    ctx: RequestContext = Depends(get_context),  # noqa: B008
) -> Response:
    _write_allowed(ctx)
    t = _target(request, ctx, instance_id, Capability.USERS)
    users = [u.model_dump(exclude_none=True) for u in body.users]
    seen = set()
    for user in users:
        t.rules.validate_user(user, extra_reserved=_reserved(request))
        key = (user["name"], user.get("host", "%"))
        if key in seen:
            raise BadRequest(f"User {key[0]}@{key[1]} is listed twice.")
        seen.add(key)
    _guest_call(_cp(request), t.inst, "create_users", users=users)
    return Response(status_code=202)


@router.put("/instances/{instance_id}/users", status_code=202)
def change_passwords(
    request: Request,
    instance_id: str,
    body: UsersPasswordBody,
    ctx: RequestContext = Depends(get_context),  # noqa: B008
) -> Response:
    _write_allowed(ctx)
    t = _target(request, ctx, instance_id, Capability.USERS)
    users = [u.model_dump(exclude_none=True) for u in body.users]
    for user in users:
        t.rules.validate_user({**user, "databases": []}, extra_reserved=_reserved(request))
    _guest_call(_cp(request), t.inst, "change_passwords", users=users)
    return Response(status_code=202)


@router.get("/instances/{instance_id}/users/{user}")
def show_user(
    request: Request,
    instance_id: str,
    user: str,
    ctx: RequestContext = Depends(get_context),  # noqa: B008
) -> dict[str, Any]:
    t = _target(request, ctx, instance_id, Capability.USERS)
    name, host = _split_user(user)
    t.rules.validate_user_name(name, _reserved(request))
    return {"user": _guest_call(_cp(request), t.inst, "get_user", name=name, host=host)}


@router.put("/instances/{instance_id}/users/{user}", status_code=202)
def update_user(
    request: Request,
    instance_id: str,
    user: str,
    body: UserUpdateBody,
    ctx: RequestContext = Depends(get_context),  # noqa: B008
) -> Response:
    _write_allowed(ctx)
    t = _target(request, ctx, instance_id, Capability.USERS)
    name, host = _split_user(user)
    t.rules.validate_user_name(name, _reserved(request))
    attrs = body.user.model_dump(exclude_none=True)
    if not attrs:
        raise BadRequest("Give at least one of name, password or host to change.")
    t.rules.validate_user_update(attrs, _reserved(request))
    _guest_call(_cp(request), t.inst, "update_user", name=name, host=host, attrs=attrs)
    return Response(status_code=202)


@router.delete("/instances/{instance_id}/users/{user}", status_code=202)
def delete_user(
    request: Request,
    instance_id: str,
    user: str,
    ctx: RequestContext = Depends(get_context),  # noqa: B008
) -> Response:
    _write_allowed(ctx)
    t = _target(request, ctx, instance_id, Capability.USERS)
    name, host = _split_user(user)
    t.rules.validate_user_name(name, _reserved(request))
    _guest_call(_cp(request), t.inst, "delete_user", name=name, host=host)
    return Response(status_code=202)


@router.get("/instances/{instance_id}/users/{user}/databases")
def list_access(
    request: Request,
    instance_id: str,
    user: str,
    ctx: RequestContext = Depends(get_context),  # noqa: B008
) -> dict[str, Any]:
    t = _target(request, ctx, instance_id, Capability.DATABASES)
    name, host = _split_user(user)
    t.rules.validate_user_name(name, _reserved(request))
    return {"databases": _guest_call(_cp(request), t.inst, "list_access", name=name, host=host)}


@router.put("/instances/{instance_id}/users/{user}/databases", status_code=202)
def grant_access(
    request: Request,
    instance_id: str,
    user: str,
    body: AccessGrantBody,
    ctx: RequestContext = Depends(get_context),  # noqa: B008
) -> Response:
    _write_allowed(ctx)
    t = _target(request, ctx, instance_id, Capability.DATABASES)
    name, host = _split_user(user)
    t.rules.validate_user_name(name, _reserved(request))
    dbs = [d.name for d in body.databases]
    for db in dbs:
        t.rules.validate_database({"name": db})
    _guest_call(_cp(request), t.inst, "grant_access", name=name, host=host, databases=dbs)
    return Response(status_code=202)


@router.delete("/instances/{instance_id}/users/{user}/databases/{database}", status_code=202)
def revoke_access(
    request: Request,
    instance_id: str,
    user: str,
    database: str,
    ctx: RequestContext = Depends(get_context),  # noqa: B008
) -> Response:
    _write_allowed(ctx)
    t = _target(request, ctx, instance_id, Capability.DATABASES)
    name, host = _split_user(user)
    t.rules.validate_user_name(name, _reserved(request))
    t.rules.validate_database({"name": database})
    _guest_call(_cp(request), t.inst, "revoke_access", name=name, host=host, database=database)
    return Response(status_code=202)


# --- root --------------------------------------------------------------------------------------


@router.get("/instances/{instance_id}/root")
def root_show(
    request: Request,
    instance_id: str,
    ctx: RequestContext = Depends(get_context),  # noqa: B008
) -> dict[str, Any]:
    cp = _cp(request)
    with cp.session_factory() as session:
        inst = _load(session, ctx, instance_id)
        history = session.get(RootEnabledHistory, inst.id)
    return {"rootEnabled": history is not None}


@router.post("/instances/{instance_id}/root")
def root_enable(
    request: Request,
    instance_id: str,
    body: RootEnableBody | None = None,
    ctx: RequestContext = Depends(get_context),  # noqa: B008
) -> dict[str, Any]:
    _write_allowed(ctx)
    t = _target(request, ctx, instance_id, Capability.ROOT)
    cp = _cp(request)
    password = body.password if body else None
    if password is not None:
        t.rules.validate_password(password)
    user = _guest_call(cp, t.inst, "enable_root", password=password)
    with transaction(cp.session_factory) as session:
        if session.get(RootEnabledHistory, t.inst.id) is None:
            session.add(RootEnabledHistory(instance_id=t.inst.id, user=ctx.auth.user_id))
    return {"user": user}


@router.delete("/instances/{instance_id}/root", status_code=204)
def root_disable(
    request: Request,
    instance_id: str,
    ctx: RequestContext = Depends(get_context),  # noqa: B008
) -> Response:
    _write_allowed(ctx)
    t = _target(request, ctx, instance_id, Capability.ROOT)
    cp = _cp(request)
    with cp.session_factory() as session:
        if session.get(RootEnabledHistory, t.inst.id) is None:
            raise RootHistoryNotFound(f"Root was never enabled on instance {t.inst.id}.")
    _guest_call(cp, t.inst, "disable_root")
    with transaction(cp.session_factory) as session:
        history = session.get(RootEnabledHistory, t.inst.id)
        if history is not None:
            session.delete(history)
    return Response(status_code=204)


# --- admin -------------------------------------------------------------------------------------


@router.get("/mgmt/instances")
def mgmt_list_instances(
    request: Request,
    ctx: RequestContext = Depends(get_context),  # noqa: B008
    project_id: str | None = Query(None),
    deleted: bool = Query(False),
) -> dict[str, Any]:
    require_admin(ctx)
    cp = _cp(request)
    with cp.session_factory() as session:
        query = select(Instance).where(Instance.deleted.is_(deleted))
        if project_id:
            query = query.where(Instance.tenant_id == project_id)
        rows = session.scalars(query.order_by(Instance.created.desc())).all()
        items = []
        for row in rows:
            view = _render(request, ctx, session, row, detail=True)
            status = session.get(ServiceStatusRow, row.id)
            view["service_status"] = effective_service_status(
                row, status, cp.settings.default.agent_heartbeat_expiry
            ).value
            view["server"] = dict(row.compute_ref or {})
            items.append(view)
    return {"instances": items}


@router.post("/mgmt/instances/{instance_id}/action", status_code=202)
def mgmt_instance_action(
    request: Request,
    instance_id: str,
    body: dict[str, Any],
    ctx: RequestContext = Depends(get_context),  # noqa: B008
) -> Response:
    """Admin actions on the engine: ``stop`` (stays stopped until started) and ``reboot``."""
    require_admin(ctx)
    if len(body) != 1 or next(iter(body)) not in ("stop", "reboot"):
        raise BadRequest('The body must be {"stop": {}} or {"reboot": {}}.')
    (action,) = body
    cp = _cp(request)
    with cp.session_factory() as session:
        inst = _load(session, ctx, instance_id)
        if inst.task is not Task.NONE:
            raise UnprocessableEntity(
                f"Instance {inst.id} is busy ({inst.task.value}); try again when it is not."
            )
    _guest_call(cp, inst, "stop_db" if action == "stop" else "restart")
    return Response(status_code=202)
