"""Trove v1.0 backup routes: backups, an instance's backups, and backup strategies.

``POST /backups`` checks everything before it changes anything (the instance is the caller's and
ACTIVE, its engine can back up, no other backup of it runs, the parent is usable), then records
the backup NEW, charges one ``backups`` quota unit to the instance's project and enqueues the
``create_backup`` operation, all in one transaction (``coffer.taskmanager.backups`` does the
rest). ``DELETE /backups/{id}`` deletes the backup and, first, the incremental backups that
depend on it. Lists are ordered by ``updated``, newest first, and paged with Trove's integer
offset ``marker``.

Also here, for the instance routes: the restore point of an instance create
(``restore_plan``) and the BACKUP status of instances whose backup runs
(``show_running_backups``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from coffer import quotas
from coffer.api.audit import AuditedRoute, note_target
from coffer.api.context import RequestContext
from coffer.api.instance_views import GIB, iso
from coffer.api.policy import authorize, enforce
from coffer.api.restore_views import show_restores
from coffer.api.routes.instance_support import (
    control_plane,
    ensure_ready,
    load_instance,
    wake_taskmanager,
)
from coffer.backup.errors import BackupIntegrityError
from coffer.config import Settings
from coffer.datastores.registry import require_capability
from coffer.db.models import (
    Datastore,
    DatastoreVersion,
    Instance,
    new_id,
    utcnow,
)
from coffer.db.models_archive import InstanceArchive
from coffer.db.models_backups import (
    FULL,
    INCREMENTAL,
    RUNNING_STATES,
    Backup,
    BackupState,
    BackupStrategy,
)
from coffer.db.session import transaction
from coffer.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    NotImplementedByDatastore,
    UnprocessableEntity,
)
from coffer.guest.backup import supports_incremental, supports_point_in_time
from coffer.guest.datastores.base import Capability
from coffer.status import Task
from coffer.storage.base import StorageIntegrityError, StorageNotFound
from coffer.taskmanager.backups import (
    CREATE_BACKUP,
    DELETE_BACKUP,
    backup_holder,
    descendants,
    open_storage,
    restore_chain,
    running_backup,
    storage_key,
)
from coffer.taskmanager.operations import enqueue

router = APIRouter(prefix="/v1.0/{tenant_id}", tags=["backups"], route_class=AuditedRoute)

#: Trove's ``backups_page_size`` default.
PAGE_SIZE = 20
#: How long a backup may take before its operation gives up.
BACKUP_DEADLINE = timedelta(hours=24)
_HAS_ALNUM = re.compile(r".*[0-9a-zA-Z]+.*")


# --- bodies ------------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BackupIn(_Body):
    name: str = Field(min_length=1, max_length=255)
    instance: str | None = Field(default=None, max_length=64)
    description: str | None = Field(default=None, max_length=255)
    parent_id: str | None = Field(default=None, max_length=64)
    incremental: int | None = Field(default=None, ge=0, le=1)
    swift_container: str | None = Field(default=None, min_length=1, max_length=255)
    storage_driver: str | None = None
    restore_from: dict[str, Any] | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _HAS_ALNUM.match(value):
            raise ValueError("must contain at least one letter or digit")
        return value


class BackupCreateBody(_Body):
    backup: BackupIn


class StrategyIn(_Body):
    instance_id: str | None = Field(default=None, max_length=64)
    swift_container: str = Field(min_length=1, max_length=255)


class StrategyBody(_Body):
    backup_strategy: StrategyIn


# --- views -------------------------------------------------------------------------------------


def backup_view(
    row: Backup, version: DatastoreVersion | None, datastore: Datastore | None
) -> dict[str, Any]:
    """Trove's backup view. Coffer's additions: ``fail_reason`` (present when one is known),
    ``size_bytes`` and ``raw_size_bytes`` (bytes stored and bytes the engine produced)."""
    view: dict[str, Any] = {
        "id": row.id,
        "name": row.name,
        "description": row.description,
        "locationRef": f"{row.storage_driver}://{row.storage_key}",
        "instance_id": row.instance_id,
        "created": iso(row.created),
        "updated": iso(row.updated),
        # Trove gives sizes in GB.
        "size": row.size / GIB if row.size is not None else None,
        "status": row.state.value.upper(),
        "parent_id": row.parent_id,
        "project_id": row.tenant_id,
    }
    if version is not None and datastore is not None:
        view["datastore"] = {
            "type": datastore.name,
            "version": version.name,
            "version_id": version.id,
        }
    if row.fail_reason:
        view["fail_reason"] = row.fail_reason
    # Coffer's byte counts (Trove's size is in GB): stored so far while the backup runs (the
    # guest reports them every few seconds), final once it is COMPLETED.
    view["size_bytes"] = row.size
    view["raw_size_bytes"] = row.raw_size
    return view


def _render(session: Session, rows: list[Backup]) -> list[dict[str, Any]]:
    versions: dict[str, tuple[DatastoreVersion | None, Datastore | None]] = {}
    views = []
    for row in rows:
        if row.datastore_version_id not in versions:
            version = session.get(DatastoreVersion, row.datastore_version_id)
            datastore = session.get(Datastore, version.datastore_id) if version else None
            versions[row.datastore_version_id] = (version, datastore)
        views.append(backup_view(row, *versions[row.datastore_version_id]))
    return views


def _page(
    request: Request,
    session: Session,
    query: Select[Backup],
    limit: int | None,
    marker: str | None,
) -> dict[str, Any]:
    """Trove's backup paging: an integer offset marker, newest ``updated`` first."""
    if limit is not None and limit < 1:
        raise BadRequest("limit must be a positive whole number.")
    page = min(limit or PAGE_SIZE, PAGE_SIZE) if limit else PAGE_SIZE
    offset = 0
    if marker is not None:
        if not marker.isdigit():
            raise BadRequest(f"Marker {marker!r} is not a backup list offset (a whole number).")
        offset = int(marker)
    rows = list(
        session.scalars(
            query.order_by(Backup.updated.desc(), Backup.id).offset(offset).limit(page + 1)
        )
    )
    body: dict[str, Any] = {"backups": _render(session, rows[:page])}
    if len(rows) > page:
        url = request.url.include_query_params(limit=page, marker=str(offset + page))
        body["links"] = [{"rel": "next", "href": str(url)}]
    return body


def load_backup(session: Session, ctx: RequestContext, backup_id: str) -> Backup:
    row = session.get(Backup, backup_id)
    if row is None or row.deleted or (row.tenant_id != ctx.project_id and not ctx.auth.is_admin):
        # 404, not 403: a project must not learn that another project's backup exists.
        raise NotFound(f"Backup {backup_id} could not be found.")
    return row


# --- backups -----------------------------------------------------------------------------------


@router.get("/backups")
def list_backups(
    request: Request,
    ctx: Annotated[RequestContext, Depends(authorize("backup:index"))],
    datastore: str | None = Query(None),
    instance_id: str | None = Query(None),
    project_id: str | None = Query(None),
    all_projects: str | None = Query(None),
    limit: int | None = Query(None),
    marker: str | None = Query(None),
) -> dict[str, Any]:
    everyone = all_projects is not None and all_projects.lower() not in ("0", "false", "no")
    if everyone or (project_id is not None and project_id != ctx.project_id):
        enforce(request, ctx, "backup:index:all_projects")
    query = select(Backup).where(Backup.deleted.is_(False))
    if not everyone:
        query = query.where(Backup.tenant_id == (project_id or ctx.project_id))
    if instance_id is not None:
        query = query.where(Backup.instance_id == instance_id)
    if datastore is not None:
        query = (
            query.join(DatastoreVersion, DatastoreVersion.id == Backup.datastore_version_id)
            .join(Datastore, Datastore.id == DatastoreVersion.datastore_id)
            .where(Datastore.name == datastore)
        )
    cp = control_plane(request)
    with cp.session_factory() as session:
        return _page(request, session, query, limit, marker)


@router.get("/instances/{instance_id}/backups")
def list_instance_backups(
    request: Request,
    instance_id: str,
    ctx: Annotated[RequestContext, Depends(authorize("instance:backups"))],
    limit: int | None = Query(None),
    marker: str | None = Query(None),
) -> dict[str, Any]:
    cp = control_plane(request)
    with cp.session_factory() as session:
        inst = load_instance(session, ctx, instance_id)
        query = select(Backup).where(Backup.deleted.is_(False), Backup.instance_id == inst.id)
        return _page(request, session, query, limit, marker)


@router.get("/instances/{instance_id}/restore")
def show_instance_restore(
    request: Request,
    instance_id: str,
    ctx: Annotated[RequestContext, Depends(authorize("instance:show"))],
) -> dict[str, Any]:
    """Coffer's extension: how far the restore that builds this instance has got
    (``coffer.api.restore_views``); ``{"restore": null}`` when it is not being built from a
    backup. Kept out of the instance view, whose show is one query."""
    cp = control_plane(request)
    with cp.session_factory() as session:
        inst = load_instance(session, ctx, instance_id)
        view: dict[str, Any] = {}
        show_restores(session, [(inst, view)])
    return {"restore": view.get("restore")}


@router.get("/backups/{backup_id}")
def show_backup(
    request: Request,
    backup_id: str,
    ctx: Annotated[RequestContext, Depends(authorize("backup:show"))],
) -> dict[str, Any]:
    cp = control_plane(request)
    with cp.session_factory() as session:
        row = load_backup(session, ctx, backup_id)
        return {"backup": _render(session, [row])[0]}


def _parent(session: Session, inst: Instance, spec: BackupIn) -> Backup | None:
    if spec.parent_id is not None:
        parent = session.get(Backup, spec.parent_id)
        if parent is None or parent.deleted or parent.tenant_id != inst.tenant_id:
            raise NotFound(f"Parent backup {spec.parent_id} could not be found.")
        if parent.instance_id != inst.id:
            raise BadRequest(
                f"Parent backup {parent.id} is of another instance; an incremental backup "
                "builds on a backup of the same instance."
            )
        if not parent.state.restorable:
            raise BadRequest(
                f"Parent backup {parent.id} is {parent.state.value.upper()}; an incremental "
                "backup needs a COMPLETED parent."
            )
        return parent
    if spec.incremental:
        return session.scalars(
            select(Backup)
            .where(
                Backup.instance_id == inst.id,
                Backup.deleted.is_(False),
                Backup.state == BackupState.COMPLETED,
            )
            .order_by(Backup.created.desc(), Backup.id.desc())
            .limit(1)
        ).first()
    return None


@router.post("/backups", status_code=202)
def create_backup(
    request: Request,
    body: BackupCreateBody,
    ctx: Annotated[RequestContext, Depends(authorize("backup:create"))],
) -> dict[str, Any]:
    cp = control_plane(request)
    spec = body.backup
    if spec.restore_from is not None:
        raise NotImplementedByDatastore(
            "Importing a backup from another location (restore_from) is not supported yet."
        )
    if spec.instance is None:
        raise BadRequest("instance is required: pass the id of the instance to back up.")
    driver = cp.settings.storage.driver
    if spec.storage_driver is not None and spec.storage_driver != driver:
        raise BadRequest(
            f"This deployment stores backups with the {driver!r} driver only; leave "
            "storage_driver out."
        )
    with transaction(cp.session_factory) as session:
        inst = load_instance(session, ctx, spec.instance)
        row, op_id = record_backup(session, cp.settings, inst, spec)
        view = _render(session, [row])[0]
    note_target(request, backup_id=row.id, instance_id=inst.id)
    wake_taskmanager(cp, op_id)
    return {"backup": view}


def record_backup(
    session: Session, settings: Settings, inst: Instance, spec: BackupIn
) -> tuple[Backup, str]:
    """Check that ``inst`` can be backed up now as ``spec`` asks, then record the backup NEW,
    charge its quota and enqueue its operation, in the caller's transaction; the row and the
    operation's id. The one create-backup path of the API and of backup schedules
    (``coffer.taskmanager.schedules``): any refusal raises before anything is recorded."""
    driver = settings.storage.driver
    # Locks the instance row (PostgreSQL/MariaDB control DBs), so two creates cannot both
    # see no running backup; SQLite serialises write transactions anyway.
    session.execute(select(Instance.id).where(Instance.id == inst.id).with_for_update())
    version = session.get(DatastoreVersion, inst.datastore_version_id)
    assert version is not None
    require_capability(version.manager, Capability.BACKUP)
    if inst.task is not Task.NONE:
        raise UnprocessableEntity(
            f"Instance {inst.id} is busy ({inst.task.value}); back it up when its status is ACTIVE."
        )
    ensure_ready(session, inst)
    running = running_backup(session, inst.id)
    if running is not None:
        raise UnprocessableEntity(
            f"Instance {inst.id} is already being backed up (backup {running.id}); try "
            "again when its status is ACTIVE."
        )
    parent = _parent(session, inst, spec)
    if parent is not None and not supports_incremental(version.manager):
        raise NotImplementedByDatastore(
            f"{version.manager} backups are always full backups; leave out parent_id and "
            "incremental."
        )
    backup_id = new_id()
    row = Backup(
        id=backup_id,
        tenant_id=inst.tenant_id,
        name=spec.name,
        description=spec.description,
        instance_id=inst.id,
        datastore_version_id=version.id,
        parent_id=parent.id if parent is not None else None,
        backup_type=INCREMENTAL if parent is not None else FULL,
        state=BackupState.NEW,
        storage_driver=driver,
        storage_key=storage_key(inst.tenant_id, backup_id),
        volume_size=inst.volume_size,
        engine_position={},
    )
    session.add(row)
    session.flush()
    # Checked and charged under the project's quota lock; a refusal rolls the row back.
    quotas.reserve(session, settings, inst.tenant_id, backup_holder(backup_id), {"backups": 1})
    op_id = enqueue(
        session,
        CREATE_BACKUP,
        inst.id,
        {"backup_id": backup_id},
        deadline=utcnow() + BACKUP_DEADLINE,
    ).id
    return row, op_id


@router.delete("/backups/{backup_id}", status_code=202)
def delete_backup(
    request: Request,
    backup_id: str,
    ctx: Annotated[RequestContext, Depends(authorize("backup:delete"))],
) -> Response:
    cp = control_plane(request)
    with transaction(cp.session_factory) as session:
        row = load_backup(session, ctx, backup_id)
        doomed = [*descendants(session, row.id), row]
        busy = [b for b in doomed if b.state in RUNNING_STATES]
        if busy:
            raise UnprocessableEntity(
                f"Backup {busy[0].id} is still being taken; delete it once it is COMPLETED or "
                "FAILED."
            )
        op_id = enqueue(session, DELETE_BACKUP, None, {"backup_ids": [b.id for b in doomed]}).id
    wake_taskmanager(cp, op_id)
    return Response(status_code=202)


# --- backup strategies -------------------------------------------------------------------------


def _strategy_view(row: BackupStrategy) -> dict[str, Any]:
    return {
        "project_id": row.tenant_id,
        "instance_id": row.instance_id,
        "backend": row.backend,
        "swift_container": row.swift_container,
    }


def _strategy_project(ctx: RequestContext, project_id: str | None) -> str:
    if project_id is not None and project_id != ctx.project_id and not ctx.auth.is_admin:
        raise Forbidden("Only an administrator may see or change another project's strategies.")
    return project_id or ctx.project_id


@router.post("/backup_strategies", status_code=202)
def create_backup_strategy(
    request: Request,
    body: StrategyBody,
    ctx: Annotated[RequestContext, Depends(authorize("backup_strategy:create"))],
) -> dict[str, Any]:
    cp = control_plane(request)
    spec = body.backup_strategy
    with transaction(cp.session_factory) as session:
        instance_id = ""
        if spec.instance_id:
            instance_id = load_instance(session, ctx, spec.instance_id).id
        row = session.get(BackupStrategy, (ctx.project_id, instance_id))
        if row is None:
            row = BackupStrategy(tenant_id=ctx.project_id, instance_id=instance_id)
            session.add(row)
        row.backend = "swift"
        row.swift_container = spec.swift_container
        session.flush()
        view = _strategy_view(row)
    return {"backup_strategy": view}


@router.get("/backup_strategies")
def list_backup_strategies(
    request: Request,
    ctx: Annotated[RequestContext, Depends(authorize("backup_strategy:index"))],
    instance_id: str | None = Query(None),
    project_id: str | None = Query(None),
) -> dict[str, Any]:
    project = _strategy_project(ctx, project_id)
    cp = control_plane(request)
    with cp.session_factory() as session:
        query = select(BackupStrategy).where(BackupStrategy.tenant_id == project)
        if instance_id is not None:
            query = query.where(BackupStrategy.instance_id == instance_id)
        rows = session.scalars(query.order_by(BackupStrategy.instance_id))
        return {"backup_strategies": [_strategy_view(r) for r in rows]}


@router.delete("/backup_strategies", status_code=202)
def delete_backup_strategies(
    request: Request,
    ctx: Annotated[RequestContext, Depends(authorize("backup_strategy:delete"))],
    instance_id: str | None = Query(None),
    project_id: str | None = Query(None),
) -> Response:
    project = _strategy_project(ctx, project_id)
    cp = control_plane(request)
    with transaction(cp.session_factory) as session:
        # As in Trove, deleting a strategy that is not set is not an error.
        row = session.get(BackupStrategy, (project, instance_id or ""))
        if row is not None:
            session.delete(row)
    return Response(status_code=202)


# --- for the instance routes -------------------------------------------------------------------


@dataclass(frozen=True)
class RestorePlan:
    """What an instance create restores: the backup, the datastore version it needs, and for a
    point-in-time restore the time (UTC) and the instance whose log archive reaches it."""

    backup_id: str
    version: DatastoreVersion
    restore_time: datetime | None = None
    archive_instance_id: str | None = None

    def payload(self) -> dict[str, Any]:
        """The ``restore`` entry of the create operation's payload (``RestoreStep``)."""
        payload: dict[str, Any] = {"backup_id": self.backup_id}
        if self.restore_time is not None:
            payload["restore_time"] = self.restore_time.replace(tzinfo=UTC).isoformat()
            payload["archive_instance_id"] = self.archive_instance_id
        return payload


def restore_version(session: Session, restore_point: object) -> DatastoreVersion:
    """The datastore version of the backup a restore point names, to create the instance on
    when the request names no datastore. BadRequest for a malformed restore point, NotFound
    for a backup that does not exist (``restore_plan`` checks the rest, the project included).
    """
    ref = _backup_ref(restore_point)
    row = session.get(Backup, ref)
    version = session.get(DatastoreVersion, row.datastore_version_id) if row else None
    if row is None or row.deleted or version is None:
        raise NotFound(f"Backup {ref} could not be found.")
    return version


def _backup_ref(restore_point: object) -> str:
    if not isinstance(restore_point, dict) or not isinstance(restore_point.get("backupRef"), str):
        raise BadRequest(
            'restorePoint needs the id of a backup: {"restorePoint": {"backupRef": "<id>"}}.'
        )
    ref: str = restore_point["backupRef"]
    return ref


def restore_plan(
    cp: Any,
    session: Session,
    ctx: RequestContext,
    restore_point: object,
    version: DatastoreVersion,
    volume_size: int,
) -> RestorePlan:
    """Check an instance create's ``restorePoint`` before anything is recorded.

    The backup must be the caller's project's (404 otherwise), COMPLETED (409), restorable with
    its whole chain (400), of the instance's datastore and engine version (400: physical backups
    restore only into the version they were taken with), no larger than the new volume (400),
    and its stored objects must exist (400) and not be known damaged (409). Their contents are
    verified by the guest before it writes anything.

    With ``restore_time`` (ISO 8601; without a zone it is UTC): a point-in-time restore. The
    engine must have one (501 with the reason), and the time must lie in the window the backup
    and its instance's log archive cover, from the backup's completion to the archive's extent
    (400 naming the window; 400 if the instance has no archive yet).
    """
    ref = _backup_ref(restore_point)
    assert isinstance(restore_point, dict)
    extra = sorted(set(restore_point) - {"backupRef", "restore_time"})
    if extra:
        raise BadRequest(
            f"restorePoint accepts backupRef and restore_time; {', '.join(extra)} is not known."
        )
    restore_time = _restore_time(restore_point.get("restore_time"))
    row = load_backup(session, ctx, ref)
    if not row.state.restorable:
        raise Conflict(
            f"Backup {row.id} is {row.state.value.upper()}; only a COMPLETED backup can be "
            "restored."
        )
    chain = restore_chain(session, row.id)
    source = session.get(DatastoreVersion, row.datastore_version_id)
    assert source is not None
    if source.datastore_id != version.datastore_id or source.manager != version.manager:
        datastore = session.get(Datastore, source.datastore_id)
        name = datastore.name if datastore else source.manager
        raise BadRequest(
            f"Backup {row.id} is a {name} backup; restore it into a {name} instance (leave "
            "datastore out to use the backup's)."
        )
    if source.id != version.id and _series(source) != _series(version):
        raise BadRequest(
            f"Backup {row.id} was taken with version {source.version}; a physical backup "
            f"restores only into that version's release series, not {version.version}."
        )
    if volume_size < row.volume_size:
        raise BadRequest(
            f"Backup {row.id} comes from a {row.volume_size} GB volume; ask for a volume of "
            f"at least {row.volume_size} GB."
        )
    with open_storage(cp.settings) as storage:
        for link in chain:
            try:
                found = storage.stat(link.storage_key)
            except StorageNotFound:
                found = None
            except StorageIntegrityError:
                raise BackupIntegrityError(
                    link.id, "the store reports its stored object damaged"
                ) from None
            if found is None:
                raise BadRequest(
                    f"The stored data of backup {link.id} is missing from backup storage; "
                    "restore another backup."
                )
    if restore_time is None:
        return RestorePlan(row.id, version)
    archive = _check_window(session, row, source.manager, restore_time)
    return RestorePlan(row.id, version, restore_time, archive.instance_id)


def _restore_time(value: object) -> datetime | None:
    """``restore_time`` as a naive UTC datetime (None when absent); BadRequest if malformed."""
    if value is None:
        return None
    parsed = None
    if isinstance(value, str) and value.strip():
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            parsed = None
    if parsed is None:
        raise BadRequest(
            f"restore_time {value!r} is not an ISO 8601 time (e.g. 2024-05-01T12:30:00Z; "
            "without a zone it is UTC)."
        )
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(UTC).replace(tzinfo=None)
    return parsed


def _check_window(
    session: Session, row: Backup, manager: str, restore_time: datetime
) -> InstanceArchive:
    """The source's archive, if ``restore_time`` lies in the window it and ``row`` cover."""
    if not supports_point_in_time(manager):
        raise NotImplementedByDatastore(
            f"{manager} backups restore only to the moment they were taken: this datastore "
            "keeps no log archive to replay to another time. Leave out restore_time."
        )
    archive = session.get(InstanceArchive, row.instance_id) if row.instance_id else None
    start = row.completed or row.created
    if archive is None or archive.newest_time is None or archive.newest_time < start:
        raise BadRequest(
            f"The log archive of instance {row.instance_id} does not reach past backup {row.id} "
            f"yet (backups restore to a point in time only within what their instance's "
            f"archive holds); restore the backup itself, or wait until its log is archived."
        )
    if not start <= restore_time <= archive.newest_time:
        raise BadRequest(
            f"restore_time {_utc(restore_time)} is outside the window backup {row.id} can be "
            f"restored to: from {_utc(start)} to {_utc(archive.newest_time)}."
        )
    return archive


def _utc(value: datetime) -> str:
    return value.isoformat() + "Z"


def fail_running_backups(session: Session, instance_id: str, reason: str) -> None:
    """Mark the instance's backups still being taken FAILED and give their quota back (for
    ``reset_status``, which stops the operations that would have ended them)."""
    for row in session.scalars(
        select(Backup).where(
            Backup.instance_id == instance_id,
            Backup.deleted.is_(False),
            Backup.state.in_(list(RUNNING_STATES)),
        )
    ):
        row.state = BackupState.FAILED
        row.fail_reason = reason
        quotas.release(session, backup_holder(row.id))


def _series(version: DatastoreVersion) -> tuple[str, ...]:
    """The release series whose servers read each other's data files: PostgreSQL's major
    version (15), MariaDB's and Redis's first two numbers (10.11, 7.0)."""
    parts = tuple(version.version.split("."))
    return parts[:1] if version.manager == "postgresql" else parts[:2]


def show_running_backups(session: Session, pairs: list[tuple[Instance, dict[str, Any]]]) -> None:
    """Set ``status`` to BACKUP in the views of instances with a backup running (Trove's rule:
    after task states, before the server's); and add ``restore`` to those being restored."""
    show_restores(session, pairs)
    candidates = {inst.id: view for inst, view in pairs if inst.task is Task.NONE}
    if not candidates:
        return
    busy = set(
        session.scalars(
            select(Backup.instance_id).where(
                Backup.instance_id.in_(list(candidates)),
                Backup.deleted.is_(False),
                Backup.state.in_(list(RUNNING_STATES)),
            )
        )
    )
    for instance_id in busy:
        if instance_id is not None:
            candidates[instance_id]["status"] = "BACKUP"
