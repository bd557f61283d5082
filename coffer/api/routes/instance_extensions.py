"""Databases, users, user access and root of an instance (Trove's "MYSQL" extension).

Each call resolves the instance's engine, refuses (501) what that engine cannot do, applies its
name rules, and only then makes a short call to the guest.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response

from coffer.api.audit import AuditedRoute
from coffer.api.context import RequestContext
from coffer.api.instance_schemas import (
    AccessGrantBody,
    DatabasesBody,
    RootEnableBody,
    UsersBody,
    UsersPasswordBody,
    UserUpdateBody,
)
from coffer.api.policy import authorize
from coffer.api.routes.instance_support import (
    control_plane,
    guest_call,
    load_instance,
    page_size,
    paginated,
    reserved_names,
    split_user,
    target,
)
from coffer.db.models import (
    RootEnabledHistory,
)
from coffer.db.session import transaction
from coffer.errors import (
    BadRequest,
    NotImplementedByDatastore,
    RootHistoryNotFound,
)
from coffer.guest.datastores.base import Capability

LOG = logging.getLogger(__name__)

router = APIRouter(tags=["instances"], route_class=AuditedRoute)


# --- databases ---------------------------------------------------------------------------------


@router.get("/instances/{instance_id}/databases")
def list_databases(
    request: Request,
    instance_id: str,
    ctx: Annotated[RequestContext, Depends(authorize("instance:extension:database:index"))],
    limit: int | None = Query(None),
    marker: str | None = Query(None),
) -> dict[str, Any]:
    t = target(request, ctx, instance_id, Capability.DATABASES)
    cp = control_plane(request)
    page = page_size(request, limit, cp.settings.default.databases_page_size)
    items, next_marker = guest_call(cp, t.inst, "list_databases", limit=page, marker=marker)
    return paginated(request, items, next_marker, "databases", page)


@router.post("/instances/{instance_id}/databases", status_code=202)
def create_databases(
    request: Request,
    instance_id: str,
    body: DatabasesBody,
    ctx: Annotated[RequestContext, Depends(authorize("instance:extension:database:create"))],
) -> Response:
    t = target(request, ctx, instance_id, Capability.DATABASES)
    dbs = [d.model_dump(exclude_none=True) for d in body.databases]
    for db in dbs:
        t.rules.validate_database(db)
    guest_call(control_plane(request), t.inst, "create_databases", databases=dbs)
    return Response(status_code=202)


@router.get("/instances/{instance_id}/databases/{name}")
def show_database(
    request: Request,
    instance_id: str,
    name: str,
    ctx: Annotated[RequestContext, Depends(authorize("instance:extension:database:show"))],
) -> Response:
    target(request, ctx, instance_id, Capability.DATABASES)
    raise NotImplementedByDatastore("Showing a single database is not supported; list them.")


@router.delete("/instances/{instance_id}/databases/{name}", status_code=202)
def delete_database(
    request: Request,
    instance_id: str,
    name: str,
    ctx: Annotated[RequestContext, Depends(authorize("instance:extension:database:delete"))],
) -> Response:
    t = target(request, ctx, instance_id, Capability.DATABASES)
    t.rules.validate_database({"name": name})
    guest_call(control_plane(request), t.inst, "delete_database", name=name)
    return Response(status_code=202)


# --- users -------------------------------------------------------------------------------------


@router.get("/instances/{instance_id}/users")
def list_users(
    request: Request,
    instance_id: str,
    ctx: Annotated[RequestContext, Depends(authorize("instance:extension:user:index"))],
    limit: int | None = Query(None),
    marker: str | None = Query(None),
) -> dict[str, Any]:
    t = target(request, ctx, instance_id, Capability.USERS)
    cp = control_plane(request)
    page = page_size(request, limit, cp.settings.default.users_page_size)
    items, next_marker = guest_call(cp, t.inst, "list_users", limit=page, marker=marker)
    return paginated(request, items, next_marker, "users", page)


@router.post("/instances/{instance_id}/users", status_code=202)
def create_users(
    request: Request,
    instance_id: str,
    body: UsersBody,
    ctx: Annotated[RequestContext, Depends(authorize("instance:extension:user:create"))],
) -> Response:
    t = target(request, ctx, instance_id, Capability.USERS)
    users = [u.model_dump(exclude_none=True) for u in body.users]
    seen = set()
    for user in users:
        t.rules.validate_user(user, extra_reserved=reserved_names(request))
        key = (user["name"], user.get("host", "%"))
        if key in seen:
            raise BadRequest(f"User {key[0]}@{key[1]} is listed twice.")
        seen.add(key)
    guest_call(control_plane(request), t.inst, "create_users", users=users)
    return Response(status_code=202)


@router.put("/instances/{instance_id}/users", status_code=202)
def change_passwords(
    request: Request,
    instance_id: str,
    body: UsersPasswordBody,
    ctx: Annotated[RequestContext, Depends(authorize("instance:extension:user:update_all"))],
) -> Response:
    t = target(request, ctx, instance_id, Capability.USERS)
    users = [u.model_dump(exclude_none=True) for u in body.users]
    for user in users:
        t.rules.validate_user({**user, "databases": []}, extra_reserved=reserved_names(request))
    guest_call(control_plane(request), t.inst, "change_passwords", users=users)
    return Response(status_code=202)


@router.get("/instances/{instance_id}/users/{user}")
def show_user(
    request: Request,
    instance_id: str,
    user: str,
    ctx: Annotated[RequestContext, Depends(authorize("instance:extension:user:show"))],
) -> dict[str, Any]:
    t = target(request, ctx, instance_id, Capability.USERS)
    name, host = split_user(user)
    t.rules.validate_user_name(name, reserved_names(request))
    return {"user": guest_call(control_plane(request), t.inst, "get_user", name=name, host=host)}


@router.put("/instances/{instance_id}/users/{user}", status_code=202)
def update_user(
    request: Request,
    instance_id: str,
    user: str,
    body: UserUpdateBody,
    ctx: Annotated[RequestContext, Depends(authorize("instance:extension:user:update"))],
) -> Response:
    t = target(request, ctx, instance_id, Capability.USERS)
    name, host = split_user(user)
    t.rules.validate_user_name(name, reserved_names(request))
    attrs = body.user.model_dump(exclude_none=True)
    if not attrs:
        raise BadRequest("Give at least one of name, password or host to change.")
    t.rules.validate_user_update(attrs, reserved_names(request))
    guest_call(control_plane(request), t.inst, "update_user", name=name, host=host, attrs=attrs)
    return Response(status_code=202)


@router.delete("/instances/{instance_id}/users/{user}", status_code=202)
def delete_user(
    request: Request,
    instance_id: str,
    user: str,
    ctx: Annotated[RequestContext, Depends(authorize("instance:extension:user:delete"))],
) -> Response:
    t = target(request, ctx, instance_id, Capability.USERS)
    name, host = split_user(user)
    t.rules.validate_user_name(name, reserved_names(request))
    guest_call(control_plane(request), t.inst, "delete_user", name=name, host=host)
    return Response(status_code=202)


@router.get("/instances/{instance_id}/users/{user}/databases")
def list_access(
    request: Request,
    instance_id: str,
    user: str,
    ctx: Annotated[RequestContext, Depends(authorize("instance:extension:user_access:index"))],
) -> dict[str, Any]:
    t = target(request, ctx, instance_id, Capability.DATABASES)
    name, host = split_user(user)
    t.rules.validate_user_name(name, reserved_names(request))
    return {
        "databases": guest_call(control_plane(request), t.inst, "list_access", name=name, host=host)
    }


@router.put("/instances/{instance_id}/users/{user}/databases", status_code=202)
def grant_access(
    request: Request,
    instance_id: str,
    user: str,
    body: AccessGrantBody,
    ctx: Annotated[RequestContext, Depends(authorize("instance:extension:user_access:update"))],
) -> Response:
    t = target(request, ctx, instance_id, Capability.DATABASES)
    name, host = split_user(user)
    t.rules.validate_user_name(name, reserved_names(request))
    dbs = [d.name for d in body.databases]
    for db in dbs:
        t.rules.validate_database({"name": db})
    guest_call(control_plane(request), t.inst, "grant_access", name=name, host=host, databases=dbs)
    return Response(status_code=202)


@router.delete("/instances/{instance_id}/users/{user}/databases/{database}", status_code=202)
def revoke_access(
    request: Request,
    instance_id: str,
    user: str,
    database: str,
    ctx: Annotated[RequestContext, Depends(authorize("instance:extension:user_access:delete"))],
) -> Response:
    t = target(request, ctx, instance_id, Capability.DATABASES)
    name, host = split_user(user)
    t.rules.validate_user_name(name, reserved_names(request))
    t.rules.validate_database({"name": database})
    guest_call(
        control_plane(request), t.inst, "revoke_access", name=name, host=host, database=database
    )
    return Response(status_code=202)


# --- root --------------------------------------------------------------------------------------


@router.get("/instances/{instance_id}/root")
def root_show(
    request: Request,
    instance_id: str,
    ctx: Annotated[RequestContext, Depends(authorize("instance:extension:root:index"))],
) -> dict[str, Any]:
    cp = control_plane(request)
    with cp.session_factory() as session:
        inst = load_instance(session, ctx, instance_id)
        history = session.get(RootEnabledHistory, inst.id)
    return {"rootEnabled": history is not None}


@router.post("/instances/{instance_id}/root")
def root_enable(
    request: Request,
    instance_id: str,
    ctx: Annotated[RequestContext, Depends(authorize("instance:extension:root:create"))],
    body: RootEnableBody | None = None,
) -> dict[str, Any]:
    t = target(request, ctx, instance_id, Capability.ROOT)
    cp = control_plane(request)
    password = body.password if body else None
    if password is not None:
        t.rules.validate_password(password)
    user = guest_call(cp, t.inst, "enable_root", password=password)
    with transaction(cp.session_factory) as session:
        if session.get(RootEnabledHistory, t.inst.id) is None:
            session.add(RootEnabledHistory(instance_id=t.inst.id, user=ctx.auth.user_id))
    return {"user": user}


@router.delete("/instances/{instance_id}/root", status_code=204)
def root_disable(
    request: Request,
    instance_id: str,
    ctx: Annotated[RequestContext, Depends(authorize("instance:extension:root:delete"))],
) -> Response:
    t = target(request, ctx, instance_id, Capability.ROOT)
    cp = control_plane(request)
    with cp.session_factory() as session:
        if session.get(RootEnabledHistory, t.inst.id) is None:
            raise RootHistoryNotFound(f"Root was never enabled on instance {t.inst.id}.")
    guest_call(cp, t.inst, "disable_root")
    with transaction(cp.session_factory) as session:
        history = session.get(RootEnabledHistory, t.inst.id)
        if history is not None:
            session.delete(history)
    return Response(status_code=204)
