"""Configuration group routes: ``/configurations``, the parameters a datastore version accepts,
and the admin-only ``/mgmt/datastores/versions/{id}/parameters`` that manages them.

Shapes and codes follow Trove (``trove-api.md`` §1.7, §1.11, §2.6): create 200, PUT 202 (all
values replaced), PATCH 200 with an empty body (values merged), DELETE 202 (400 while attached);
a single parameter is shown unwrapped. Values a rule refuses are 422 naming the parameter and
the rule. The logic lives in ``coffer.configuration``; each route names its policy rule in
``authorize("<rule>")`` (``coffer.api.policy``).

Attaching a group to an instance (``PUT /instances/{id}``) is not here. PUT and PATCH hand the
new values to the group's instances at once: in the transaction that writes them, an
``apply_configuration`` operation is recorded for each attached instance that is ACTIVE
(``day2_requests.request_group_applies``), and the taskmanager is woken after the commit. An
instance busy at that moment gets them from the taskmanager once it is ACTIVE again.
"""

from __future__ import annotations

import math
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from coffer import catalog
from coffer.api.audit import AuditedRoute, note_target
from coffer.api.context import RequestContext, Services, ServicesDep
from coffer.api.pagination import page_request, paginate
from coffer.api.policy import authorize
from coffer.api.routes.instance_support import wake_taskmanager
from coffer.configuration import groups
from coffer.configuration import parameter_rules as rules
from coffer.db.models import DatastoreVersion, Instance
from coffer.db.session import transaction
from coffer.errors import ValidationError
from coffer.taskmanager import day2, day2_requests

router = APIRouter(prefix="/v1.0/{tenant_id}", tags=["configurations"], route_class=AuditedRoute)

_PARAMETERS_KEY = "configuration-parameters"


class _Body(BaseModel):
    # Unknown keys are refused, so a misspelt "values" cannot silently mean "no values".
    model_config = ConfigDict(extra="forbid")


class DatastoreChoice(_Body):
    type: str | None = None
    version: str | None = None
    version_number: str | None = None


class NewConfiguration(_Body):
    name: str
    values: dict[str, Any]
    description: str | None = None
    datastore: DatastoreChoice | None = None


class CreateBody(_Body):
    configuration: NewConfiguration


class ConfigurationReplacement(_Body):
    #: Absent means none: PUT replaces every value (Trove's behaviour).
    values: dict[str, Any] = {}
    name: str | None = None
    description: str | None = None


class ReplaceBody(_Body):
    configuration: ConfigurationReplacement


class ConfigurationChanges(_Body):
    values: dict[str, Any]


class EditBody(_Body):
    configuration: ConfigurationChanges


class ParameterRuleIn(BaseModel):
    """Trove's management body; troveclient sends ``restart_required`` as 0/1 and may send the
    sizes as strings."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    restart_required: bool | int
    data_type: str
    min_size: int | float | str | None = None
    max_size: int | float | str | None = None
    allowed_values: list[str] | None = None


class ParameterRuleBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    parameter: ParameterRuleIn = Field(alias="configuration-parameter")


def _owner(ctx: RequestContext) -> groups.Owner:
    return groups.Owner(project_id=ctx.project_id, is_admin=ctx.is_admin)


def _caller(ctx: RequestContext) -> day2.Caller:
    return day2.Caller(ctx.project_id, ctx.auth.user_id, ctx.auth.is_admin)


def _wake(services: Services, op_ids: list[str]) -> None:
    """One wake is enough: the taskmanager then claims every operation that is due."""
    if op_ids:
        wake_taskmanager(services.rpc, op_ids[0])


def _instance_item(inst: Instance, ctx: RequestContext) -> dict[str, Any]:
    base = ctx.project_url.rsplit("/v1.0/", 1)[0]
    return {
        "id": inst.id,
        "name": inst.name,
        "links": [
            {"rel": "self", "href": f"{ctx.project_url}/instances/{inst.id}"},
            {"rel": "bookmark", "href": f"{base}/instances/{inst.id}"},
        ],
    }


# -- configuration groups -----------------------------------------------------------------------


@router.get("/configurations", summary="List configuration groups")
def list_configurations(
    request: Request,
    ctx: Annotated[RequestContext, Depends(authorize("configuration:index"))],
    services: ServicesDep,
) -> dict[str, Any]:
    page_req = page_request(request)
    with services.session_factory() as session:
        page = paginate(groups.list_groups(session, _owner(ctx)), page_req, lambda g: g.id)
        return {
            "configurations": groups.group_list_views(session, page.items),
            **page.links_field(request),
        }


@router.post("/configurations", summary="Create a configuration group (200, as Trove)")
def create_configuration(
    body: CreateBody,
    request: Request,
    ctx: Annotated[RequestContext, Depends(authorize("configuration:create"))],
    services: ServicesDep,
) -> dict[str, Any]:
    new = body.configuration
    choice = new.datastore or DatastoreChoice()
    with transaction(services.session_factory) as session:
        group = groups.create_group(
            session,
            _owner(ctx),
            new.name,
            new.values,
            description=new.description,
            datastore=choice.type,
            version=choice.version,
            version_number=choice.version_number,
        )
        note_target(request, configuration_id=group.id)
        return {"configuration": groups.group_detail_view(session, group)}


@router.get("/configurations/{configuration_id}", summary="Show a configuration group")
def show_configuration(
    configuration_id: str,
    ctx: Annotated[RequestContext, Depends(authorize("configuration:show"))],
    services: ServicesDep,
) -> dict[str, Any]:
    with services.session_factory() as session:
        group = groups.load_group(session, _owner(ctx), configuration_id)
        return {"configuration": groups.group_detail_view(session, group)}


@router.get(
    "/configurations/{configuration_id}/instances",
    summary="List the instances a configuration group is attached to",
)
def list_configuration_instances(
    configuration_id: str,
    request: Request,
    ctx: Annotated[RequestContext, Depends(authorize("configuration:instances"))],
    services: ServicesDep,
) -> dict[str, Any]:
    page_req = page_request(request)
    with services.session_factory() as session:
        group = groups.load_group(session, _owner(ctx), configuration_id)
        page = paginate(groups.group_instances(session, group.id), page_req, lambda i: i.id)
        return {
            "instances": [_instance_item(inst, ctx) for inst in page.items],
            **page.links_field(request),
        }


@router.put(
    "/configurations/{configuration_id}",
    status_code=202,
    summary="Replace all of a group's values (and its name or description)",
)
def replace_configuration(
    configuration_id: str,
    body: ReplaceBody,
    ctx: Annotated[RequestContext, Depends(authorize("configuration:update"))],
    services: ServicesDep,
) -> Response:
    change = body.configuration
    with transaction(services.session_factory) as session:
        _, attached = groups.replace_values(
            session,
            _owner(ctx),
            configuration_id,
            change.values,
            name=change.name,
            description=change.description,
        )
        op_ids = day2_requests.request_group_applies(services.rpc, session, _caller(ctx), attached)
    _wake(services, op_ids)
    return Response(status_code=202)


@router.patch(
    "/configurations/{configuration_id}",
    summary="Set some of a group's values (200 with an empty body, as Trove)",
)
def edit_configuration(
    configuration_id: str,
    body: EditBody,
    ctx: Annotated[RequestContext, Depends(authorize("configuration:edit"))],
    services: ServicesDep,
) -> Response:
    with transaction(services.session_factory) as session:
        _, attached = groups.merge_values(
            session, _owner(ctx), configuration_id, body.configuration.values
        )
        op_ids = day2_requests.request_group_applies(services.rpc, session, _caller(ctx), attached)
    _wake(services, op_ids)
    return Response(status_code=200)


@router.delete(
    "/configurations/{configuration_id}",
    status_code=202,
    summary="Delete a configuration group (refused while attached to an instance)",
)
def delete_configuration(
    configuration_id: str,
    ctx: Annotated[RequestContext, Depends(authorize("configuration:delete"))],
    services: ServicesDep,
) -> Response:
    with transaction(services.session_factory) as session:
        groups.delete_group(session, _owner(ctx), configuration_id)
    return Response(status_code=202)


# -- parameters a version accepts ---------------------------------------------------------------


def _version_by_name(
    session: Session, ctx: RequestContext, datastore: str, version: str
) -> DatastoreVersion:
    ds = catalog.find_datastore(session, datastore, admin=ctx.is_admin)
    return catalog.find_version(session, ds, version, admin=ctx.is_admin)


def _parameter_list(session: Session, version: DatastoreVersion) -> dict[str, Any]:
    return {
        _PARAMETERS_KEY: [
            rule.public_view(version.id) for rule in rules.rules_for_version(session, version.id)
        ]
    }


# Declared before /datastores/{datastore}/... so "versions" is never taken for a datastore name.
@router.get(
    "/datastores/versions/{version_id}/parameters",
    summary="List the configuration parameters of a datastore version (by id)",
)
def list_parameters_by_version(
    version_id: str,
    ctx: Annotated[RequestContext, Depends(authorize("configuration-parameter:index_by_version"))],
    services: ServicesDep,
) -> dict[str, Any]:
    with services.session_factory() as session:
        version = catalog.find_version_by_id(session, version_id, admin=ctx.is_admin)
        return _parameter_list(session, version)


@router.get(
    "/datastores/versions/{version_id}/parameters/{parameter_name}",
    summary="Show one configuration parameter of a datastore version (by id; unwrapped)",
)
def show_parameter_by_version(
    version_id: str,
    parameter_name: str,
    ctx: Annotated[RequestContext, Depends(authorize("configuration-parameter:show_by_version"))],
    services: ServicesDep,
) -> dict[str, Any]:
    with services.session_factory() as session:
        version = catalog.find_version_by_id(session, version_id, admin=ctx.is_admin)
        return rules.find_rule(session, version, parameter_name).public_view(version.id)


@router.get(
    "/datastores/{datastore}/versions/{version}/parameters",
    summary="List the configuration parameters of a datastore version",
)
def list_parameters(
    datastore: str,
    version: str,
    ctx: Annotated[RequestContext, Depends(authorize("configuration-parameter:index"))],
    services: ServicesDep,
) -> dict[str, Any]:
    with services.session_factory() as session:
        return _parameter_list(session, _version_by_name(session, ctx, datastore, version))


@router.get(
    "/datastores/{datastore}/versions/{version}/parameters/{parameter_name}",
    summary="Show one configuration parameter of a datastore version (unwrapped)",
)
def show_parameter(
    datastore: str,
    version: str,
    parameter_name: str,
    ctx: Annotated[RequestContext, Depends(authorize("configuration-parameter:show"))],
    services: ServicesDep,
) -> dict[str, Any]:
    with services.session_factory() as session:
        row = _version_by_name(session, ctx, datastore, version)
        return rules.find_rule(session, row, parameter_name).public_view(row.id)


# -- management (admin only) --------------------------------------------------------------------


def _size(value: int | float | str | None, kind: str) -> int | float | None:
    """A size from the body; troveclient may send it as a string of digits."""
    if value is None or not isinstance(value, str):
        return value
    try:
        exact = Decimal(value.strip())
    except InvalidOperation as exc:
        raise ValidationError(f"{kind} must be a number, not {value[:40]!r}.") from exc
    if not exact.is_finite():
        raise ValidationError(f"{kind} must be a finite number.")
    if exact == exact.to_integral_value():
        return int(exact)
    number = float(exact)
    if not math.isfinite(number):
        raise ValidationError(f"{kind} must be a finite number.")
    return number


def _rule_from_body(body: ParameterRuleIn, name: str) -> rules.ParameterRule:
    return rules.make_rule(
        name,
        body.data_type,
        body.restart_required,
        _size(body.min_size, "min_size"),
        _size(body.max_size, "max_size"),
        body.allowed_values,
    )


@router.get(
    "/mgmt/datastores/versions/{version_id}/parameters",
    summary="List a version's parameter rules (admin)",
)
def mgmt_list_parameters(
    version_id: str,
    ctx: Annotated[RequestContext, Depends(authorize("mgmt:configuration_parameter:index"))],
    services: ServicesDep,
) -> dict[str, Any]:
    with services.session_factory() as session:
        version = catalog.find_version_by_id(session, version_id)
        return {
            _PARAMETERS_KEY: [
                rule.mgmt_view(version.id) for rule in rules.rules_for_version(session, version.id)
            ]
        }


@router.post(
    "/mgmt/datastores/versions/{version_id}/parameters",
    summary="Add a parameter rule to a version (admin)",
)
def mgmt_create_parameter(
    version_id: str,
    body: ParameterRuleBody,
    ctx: Annotated[RequestContext, Depends(authorize("mgmt:configuration_parameter:create"))],
    services: ServicesDep,
) -> dict[str, Any]:
    if body.parameter.name is None:
        raise ValidationError("Validation error: configuration-parameter.name: Field required.")
    rule = _rule_from_body(body.parameter, body.parameter.name)
    with transaction(services.session_factory) as session:
        version = catalog.find_version_by_id(session, version_id)
        rules.create_rule(session, version.id, rule)
        return rule.mgmt_view(version.id)


@router.get(
    "/mgmt/datastores/versions/{version_id}/parameters/{parameter_name}",
    summary="Show a parameter rule (admin)",
)
def mgmt_show_parameter(
    version_id: str,
    parameter_name: str,
    ctx: Annotated[RequestContext, Depends(authorize("mgmt:configuration_parameter:show"))],
    services: ServicesDep,
) -> dict[str, Any]:
    with services.session_factory() as session:
        version = catalog.find_version_by_id(session, version_id)
        return rules.find_rule(session, version, parameter_name).mgmt_view(version.id)


@router.put(
    "/mgmt/datastores/versions/{version_id}/parameters/{parameter_name}",
    summary="Change a parameter rule (admin)",
)
def mgmt_update_parameter(
    version_id: str,
    parameter_name: str,
    body: ParameterRuleBody,
    ctx: Annotated[RequestContext, Depends(authorize("mgmt:configuration_parameter:update"))],
    services: ServicesDep,
) -> dict[str, Any]:
    given = body.parameter.name
    if given is not None and given.lower() != parameter_name.lower():
        raise ValidationError(
            f"The body names parameter {given[:128]!r} but the URL names {parameter_name[:128]!r}; "
            "a rule cannot be renamed: delete it and add the new one."
        )
    rule = _rule_from_body(body.parameter, parameter_name)
    with transaction(services.session_factory) as session:
        version = catalog.find_version_by_id(session, version_id)
        rules.update_rule(session, version, rule)
        return rule.mgmt_view(version.id)


@router.delete(
    "/mgmt/datastores/versions/{version_id}/parameters/{parameter_name}",
    status_code=204,
    summary="Delete a parameter rule (admin)",
)
def mgmt_delete_parameter(
    version_id: str,
    parameter_name: str,
    ctx: Annotated[RequestContext, Depends(authorize("mgmt:configuration_parameter:delete"))],
    services: ServicesDep,
) -> Response:
    with transaction(services.session_factory) as session:
        version = catalog.find_version_by_id(session, version_id)
        rules.delete_rule(session, version, parameter_name)
    return Response(status_code=204)
