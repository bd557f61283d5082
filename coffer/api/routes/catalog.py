"""Catalogue routes: flavors, datastores and their versions, and the admin-only
``/mgmt/datastore-versions`` that registers, edits and removes versions.

Shapes follow Trove (``trove-api.md`` §1.8, §1.11, §2.7); the logic lives in ``coffer.catalog``.
Each route names its policy rule in ``authorize("<rule>")`` (``coffer.api.policy``).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict

from coffer import catalog
from coffer.api.audit import AuditedRoute
from coffer.api.context import RequestContext, ServicesDep
from coffer.api.pagination import page_request, paginate
from coffer.api.policy import authorize
from coffer.api.responses import JSONBody
from coffer.db.models import DatastoreVersion
from coffer.db.session import transaction

router = APIRouter(prefix="/v1.0/{tenant_id}", tags=["catalogue"], route_class=AuditedRoute)


class _Body(BaseModel):
    # Strict: a string "true" is not a boolean, a number is not a name. Unknown keys are refused
    # like Trove's ``additionalProperties: false``.
    model_config = ConfigDict(extra="forbid", strict=True)


class NewVersion(_Body):
    name: str
    datastore_name: str
    datastore_manager: str
    active: bool = True
    default: bool = False
    version: str | None = None
    image: str | None = None
    image_tags: list[str] | None = None
    packages: list[str] | str | None = None
    registry_ext: str | None = None
    repl_strategy: str | None = None


class NewVersionRequest(_Body):
    version: NewVersion


class VersionChanges(_Body):
    """The unwrapped body of ``PATCH /mgmt/datastore-versions/{id}``; every key optional."""

    name: str | None = None
    datastore_manager: str | None = None
    image: str | None = None
    image_tags: list[str] | None = None
    packages: list[str] | str | None = None
    registry_ext: str | None = None
    repl_strategy: str | None = None
    active: bool | None = None
    default: bool | None = None


def _version_id(version: DatastoreVersion) -> str:
    return version.id


# -- flavors ------------------------------------------------------------------------------------


@router.get("/flavors", summary="List flavors")
def list_flavors(
    ctx: Annotated[RequestContext, Depends(authorize("flavor:index"))], services: ServicesDep
) -> JSONBody:
    # Reads only: a plain session, so a busy list never queues for the control DB's write lock.
    with services.session_factory() as session:
        flavors = catalog.list_flavors(session)
        return JSONBody({"flavors": [catalog.flavor_view(f, ctx.project_url) for f in flavors]})


@router.get("/flavors/{flavor_id}", summary="Show a flavor (by id)")
def show_flavor(
    flavor_id: str,
    ctx: Annotated[RequestContext, Depends(authorize("flavor:show"))],
    services: ServicesDep,
) -> dict[str, Any]:
    with services.session_factory() as session:
        flavor = catalog.find_flavor(session, flavor_id)
        return {"flavor": catalog.flavor_view(flavor, ctx.project_url)}


# -- datastores and versions --------------------------------------------------------------------


@router.get("/datastores", summary="List datastores")
def list_datastores(
    ctx: Annotated[RequestContext, Depends(authorize("datastore:index"))], services: ServicesDep
) -> dict[str, Any]:
    with transaction(services.session_factory) as session:
        pairs = catalog.visible_datastores(session, ctx.is_admin)
        return {
            "datastores": [
                catalog.datastore_view(ds, versions, ctx.is_admin, ctx.project_url)
                for ds, versions in pairs
            ]
        }


# Declared before /datastores/{datastore}/... so "versions" is never taken for a datastore name.
@router.get("/datastores/versions/{version_id}", summary="Show a datastore version by id")
def show_version_by_id(
    version_id: str,
    ctx: Annotated[RequestContext, Depends(authorize("datastore:version_show_by_uuid"))],
    services: ServicesDep,
) -> dict[str, Any]:
    with transaction(services.session_factory) as session:
        version = catalog.find_version_by_id(session, version_id, admin=ctx.is_admin)
        ds = catalog.datastore_of(session, version)
        return {"version": catalog.version_view(version, ds, ctx.is_admin, ctx.project_url)}


@router.get("/datastores/{datastore}", summary="Show a datastore (id or name)")
def show_datastore(
    datastore: str,
    ctx: Annotated[RequestContext, Depends(authorize("datastore:show"))],
    services: ServicesDep,
) -> dict[str, Any]:
    with transaction(services.session_factory) as session:
        ds = catalog.find_datastore(session, datastore, admin=ctx.is_admin)
        versions = catalog.versions_of(session, ds, ctx.is_admin)
        return {"datastore": catalog.datastore_view(ds, versions, ctx.is_admin, ctx.project_url)}


@router.get("/datastores/{datastore}/versions", summary="List a datastore's versions")
def list_versions(
    datastore: str,
    request: Request,
    ctx: Annotated[RequestContext, Depends(authorize("datastore:version_index"))],
    services: ServicesDep,
) -> dict[str, Any]:
    page_req = page_request(request)
    with transaction(services.session_factory) as session:
        ds = catalog.find_datastore(session, datastore, admin=ctx.is_admin)
        page = paginate(catalog.versions_of(session, ds, ctx.is_admin), page_req, _version_id)
        return {
            "versions": [
                catalog.version_view(v, ds, ctx.is_admin, ctx.project_url) for v in page.items
            ],
            **page.links_field(request),
        }


@router.get("/datastores/{datastore}/versions/{version}", summary="Show a version (id or name)")
def show_version(
    datastore: str,
    version: str,
    ctx: Annotated[RequestContext, Depends(authorize("datastore:version_show"))],
    services: ServicesDep,
) -> dict[str, Any]:
    with transaction(services.session_factory) as session:
        ds = catalog.find_datastore(session, datastore, admin=ctx.is_admin)
        row = catalog.find_version(session, ds, version, admin=ctx.is_admin)
        return {"version": catalog.version_view(row, ds, ctx.is_admin, ctx.project_url)}


@router.get(
    "/datastores/{datastore}/versions/{version}/flavors",
    summary="Flavors usable with a version (all flavors)",
)
def list_version_flavors(
    datastore: str,
    version: str,
    ctx: Annotated[RequestContext, Depends(authorize("datastore:list_associated_flavors"))],
    services: ServicesDep,
) -> dict[str, Any]:
    with transaction(services.session_factory) as session:
        ds = catalog.find_datastore(session, datastore, admin=ctx.is_admin)
        catalog.find_version(session, ds, version, admin=ctx.is_admin)
        flavors = catalog.list_flavors(session)
        return {"flavors": [catalog.flavor_view(f, ctx.project_url) for f in flavors]}


# -- management (admin only) --------------------------------------------------------------------


@router.get("/mgmt/datastore-versions", summary="List every datastore version (admin)")
def mgmt_list_versions(
    request: Request,
    ctx: Annotated[RequestContext, Depends(authorize("mgmt:datastore_version:index"))],
    services: ServicesDep,
) -> dict[str, Any]:
    page_req = page_request(request)
    with transaction(services.session_factory) as session:
        rows = [
            (version, ds)
            for ds in catalog.list_datastores(session)
            for version in catalog.versions_of(session, ds, admin=True)
        ]
        page = paginate(rows, page_req, lambda pair: pair[0].id)
        return {
            "versions": [catalog.mgmt_version_view(v, ds) for v, ds in page.items],
            **page.links_field(request),
        }


@router.post(
    "/mgmt/datastore-versions",
    status_code=202,
    summary="Register a datastore version (admin); creates the datastore if missing",
)
def mgmt_create_version(
    body: NewVersionRequest,
    ctx: Annotated[RequestContext, Depends(authorize("mgmt:datastore_version:create"))],
    services: ServicesDep,
) -> Response:
    """Answers 202 with an empty body: openstackclient reports any JSON body as a failure."""
    new = body.version
    with transaction(services.session_factory) as session:
        catalog.register_datastore_version(
            session,
            datastore=new.datastore_name,
            name=new.name,
            manager=new.datastore_manager,
            version=new.version,
            active=new.active,
            default=new.default,
            image_tags=new.image_tags,
            packages=new.packages,
            image_id=new.image or None,
            registry_ext=new.registry_ext or None,
            repl_strategy=new.repl_strategy or None,
        )
    return Response(status_code=202)


@router.get("/mgmt/datastore-versions/{version_id}", summary="Show a datastore version (admin)")
def mgmt_show_version(
    version_id: str,
    ctx: Annotated[RequestContext, Depends(authorize("mgmt:datastore_version:show"))],
    services: ServicesDep,
) -> dict[str, Any]:
    with transaction(services.session_factory) as session:
        version = catalog.find_version_by_id(session, version_id)
        ds = catalog.datastore_of(session, version)
        return {"version": catalog.mgmt_version_view(version, ds)}


@router.patch(
    "/mgmt/datastore-versions/{version_id}", status_code=202, summary="Edit a version (admin)"
)
def mgmt_edit_version(
    version_id: str,
    body: VersionChanges,
    ctx: Annotated[RequestContext, Depends(authorize("mgmt:datastore_version:edit"))],
    services: ServicesDep,
) -> Response:
    changes = body.model_dump(exclude_unset=True)
    with transaction(services.session_factory) as session:
        catalog.update_datastore_version(session, version_id, changes)
    return Response(status_code=202)


@router.delete(
    "/mgmt/datastore-versions/{version_id}",
    status_code=202,
    summary="Delete a version (admin); refused while instances use it",
)
def mgmt_delete_version(
    version_id: str,
    ctx: Annotated[RequestContext, Depends(authorize("mgmt:datastore_version:delete"))],
    services: ServicesDep,
) -> Response:
    with transaction(services.session_factory) as session:
        catalog.delete_datastore_version(session, version_id)
    return Response(status_code=202)
