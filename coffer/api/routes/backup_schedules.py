"""Backup schedules: Coffer's extension to the Trove API (Trove has no schedules of its own).

``/v1.0/{project}/backup_schedules``: create (200), list (200; ``?instance_id=`` filters),
show (200), update (PUT, 200: only the fields given change), delete (202). A schedule is
``{"backup_schedule": {"instance", "name", "pattern", "retention", "incremental", "enabled",
"description"}}``: a 5-field cron pattern read in UTC, and a retention of ``{"count": N}``
and/or ``{"max_age": "<days>"}``. Everything is checked before anything is recorded (the
instance is the caller's, live, of an engine that backs up, and incremental only where the
engine has incremental backups). The view adds what the taskmanager's scheduler
(``coffer.taskmanager.schedules``) records: ``next_run``, ``last_run``, ``last_result``
(started, refused, completed or failed), ``last_reason`` and ``last_backup_id``.

Deleting a schedule leaves the backups it made; deleting its instance deletes the schedule.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from coffer.api.audit import AuditedRoute, note_target
from coffer.api.context import RequestContext, get_services
from coffer.api.instance_views import iso
from coffer.api.policy import authorize
from coffer.api.routes.instance_support import load_instance
from coffer.datastores.registry import require_capability
from coffer.db.models import DatastoreVersion, Instance, utcnow
from coffer.db.models_schedules import BackupSchedule, BackupScheduleRun
from coffer.db.session import transaction
from coffer.errors import BadRequest, NotFound, NotImplementedByDatastore
from coffer.guest.backup import supports_incremental
from coffer.guest.datastores.base import Capability
from coffer.status import Task
from coffer.taskmanager.schedules import (
    MAX_SCHEDULES_PER_INSTANCE,
    Retention,
    check_pattern,
    next_slot,
)

router = APIRouter(prefix="/v1.0/{tenant_id}", tags=["backup schedules"], route_class=AuditedRoute)

_HAS_ALNUM_MESSAGE = "must contain at least one letter or digit"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _named(value: str | None) -> str | None:
    if value is not None and not any(c.isalnum() for c in value):
        raise ValueError(_HAS_ALNUM_MESSAGE)
    return value


class ScheduleIn(_Body):
    instance: str = Field(min_length=1, max_length=64)
    name: str = Field(min_length=1, max_length=200)
    pattern: str = Field(min_length=9, max_length=128)
    retention: dict[str, Any]
    incremental: bool = False
    enabled: bool = True
    description: str | None = Field(default=None, max_length=255)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return _named(value)


class ScheduleChange(_Body):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    pattern: str | None = Field(default=None, min_length=9, max_length=128)
    retention: dict[str, Any] | None = None
    incremental: bool | None = None
    enabled: bool | None = None
    description: str | None = Field(default=None, max_length=255)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return _named(value)


class CreateBody(_Body):
    backup_schedule: ScheduleIn


class UpdateBody(_Body):
    backup_schedule: ScheduleChange


def schedule_view(row: BackupSchedule) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "description": row.description,
        "instance_id": row.instance_id,
        "project_id": row.tenant_id,
        "pattern": row.pattern,
        "retention": Retention(row.retention_count, row.retention_days).view(),
        "incremental": row.incremental,
        "enabled": row.enabled,
        "next_run": iso(row.next_run) if row.enabled else None,
        "last_run": iso(row.last_run),
        "last_result": row.last_result,
        "last_reason": row.last_reason,
        "last_backup_id": row.last_backup_id,
        "created": iso(row.created),
        "updated": iso(row.updated),
    }


def _check_incremental(session: Session, inst: Instance, incremental: bool) -> None:
    version = session.get(DatastoreVersion, inst.datastore_version_id)
    assert version is not None
    require_capability(version.manager, Capability.BACKUP)
    if incremental and not supports_incremental(version.manager):
        raise NotImplementedByDatastore(
            f"{version.manager} backups are always full backups; leave incremental out."
        )


def _live(session: Session, ctx: RequestContext, instance_id: str) -> Instance:
    inst = load_instance(session, ctx, instance_id)
    if inst.task is Task.DELETING:
        raise NotFound(f"Instance {instance_id} could not be found.")
    return inst


def load_schedule(session: Session, ctx: RequestContext, schedule_id: str) -> BackupSchedule:
    row = session.get(BackupSchedule, schedule_id)
    inst = session.get(Instance, row.instance_id) if row is not None else None
    if (
        row is None
        or inst is None
        or inst.deleted
        or (row.tenant_id != ctx.project_id and not ctx.auth.is_admin)
    ):
        # 404, not 403: a project must not learn that another project's schedule exists.
        raise NotFound(f"Backup schedule {schedule_id} could not be found.")
    return row


@router.post("/backup_schedules")
def create_backup_schedule(
    request: Request,
    body: CreateBody,
    ctx: Annotated[RequestContext, Depends(authorize("backup_schedule:create"))],
) -> dict[str, Any]:
    factory = get_services(request).session_factory
    spec = body.backup_schedule
    pattern = check_pattern(spec.pattern)
    retention = Retention.parse(spec.retention)
    with transaction(factory) as session:
        inst = _live(session, ctx, spec.instance)
        _check_incremental(session, inst, spec.incremental)
        count = session.scalar(
            select(func.count())
            .select_from(BackupSchedule)
            .where(BackupSchedule.instance_id == inst.id)
        )
        if (count or 0) >= MAX_SCHEDULES_PER_INSTANCE:
            raise BadRequest(
                f"Instance {inst.id} has {count} backup schedules already, the most it may "
                "have; change or delete one."
            )
        row = BackupSchedule(
            tenant_id=inst.tenant_id,
            instance_id=inst.id,
            name=spec.name,
            description=spec.description,
            pattern=pattern,
            retention_count=retention.count,
            retention_days=retention.days,
            incremental=spec.incremental,
            enabled=spec.enabled,
            next_run=next_slot(pattern, utcnow()),
        )
        session.add(row)
        session.flush()
        view = schedule_view(row)
    note_target(request, backup_schedule_id=row.id, instance_id=inst.id)
    return {"backup_schedule": view}


@router.get("/backup_schedules")
def list_backup_schedules(
    request: Request,
    ctx: Annotated[RequestContext, Depends(authorize("backup_schedule:index"))],
    instance_id: str | None = Query(None),
) -> dict[str, Any]:
    factory = get_services(request).session_factory
    with factory() as session:
        query = (
            select(BackupSchedule)
            .join(Instance, Instance.id == BackupSchedule.instance_id)
            .where(BackupSchedule.tenant_id == ctx.project_id, Instance.deleted.is_(False))
        )
        if instance_id is not None:
            query = query.where(BackupSchedule.instance_id == instance_id)
        rows = session.scalars(query.order_by(BackupSchedule.created, BackupSchedule.id))
        return {"backup_schedules": [schedule_view(r) for r in rows]}


@router.get("/backup_schedules/{schedule_id}")
def show_backup_schedule(
    request: Request,
    schedule_id: str,
    ctx: Annotated[RequestContext, Depends(authorize("backup_schedule:show"))],
) -> dict[str, Any]:
    factory = get_services(request).session_factory
    with factory() as session:
        return {"backup_schedule": schedule_view(load_schedule(session, ctx, schedule_id))}


@router.put("/backup_schedules/{schedule_id}")
def update_backup_schedule(
    request: Request,
    schedule_id: str,
    body: UpdateBody,
    ctx: Annotated[RequestContext, Depends(authorize("backup_schedule:update"))],
) -> dict[str, Any]:
    factory = get_services(request).session_factory
    change = body.backup_schedule
    given = change.model_fields_set
    if not given:
        raise BadRequest("Say what to change: name, pattern, retention, incremental, enabled.")
    for field in ("name", "pattern", "retention", "incremental", "enabled"):
        if field in given and getattr(change, field) is None:
            raise BadRequest(f"{field} cannot be null.")
    pattern = check_pattern(change.pattern) if change.pattern is not None else None
    retention = Retention.parse(change.retention) if change.retention is not None else None
    with transaction(factory) as session:
        row = load_schedule(session, ctx, schedule_id)
        inst = session.get(Instance, row.instance_id)
        assert inst is not None
        if change.incremental is not None:
            _check_incremental(session, inst, change.incremental)
            row.incremental = change.incremental
        if change.name is not None:
            row.name = change.name
        if "description" in given:
            row.description = change.description
        if retention is not None:
            row.retention_count, row.retention_days = retention.count, retention.days
        # A new pattern, or a schedule enabled again, runs at its next slot from now (not at a
        # slot that passed while it was off).
        reschedule = pattern is not None or (change.enabled and not row.enabled)
        if pattern is not None:
            row.pattern = pattern
        if change.enabled is not None:
            row.enabled = change.enabled
        if reschedule:
            row.next_run = next_slot(row.pattern, utcnow())
        session.flush()
        view = schedule_view(row)
    return {"backup_schedule": view}


@router.delete("/backup_schedules/{schedule_id}", status_code=202)
def delete_backup_schedule(
    request: Request,
    schedule_id: str,
    ctx: Annotated[RequestContext, Depends(authorize("backup_schedule:delete"))],
) -> Response:
    factory = get_services(request).session_factory
    with transaction(factory) as session:
        row = load_schedule(session, ctx, schedule_id)
        # The backups it made stay (they are the project's, listed and deleted as any other).
        for run in session.scalars(
            select(BackupScheduleRun).where(BackupScheduleRun.schedule_id == row.id)
        ):
            session.delete(run)
        session.delete(row)
    return Response(status_code=202)
