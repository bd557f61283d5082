"""What the instance route modules share: finding the caller's instance, rendering it, calling
its guest, and paging lists."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from types import ModuleType
from typing import Any, NamedTuple, Protocol
from urllib.parse import unquote

import pydantic_core
from fastapi import Request
from sqlalchemy import Connection, Text, and_, bindparam, exists, or_, select, type_coerce
from sqlalchemy.orm import Session

from coffer.api.context import RequestContext
from coffer.api.instance_views import (
    FaultFields,
    NameField,
    StatusFields,
    VersionFields,
    effective_service_status,
    instance_view,
)
from coffer.controlplane import ControlPlane
from coffer.datastores.registry import require_capability, rules_for
from coffer.db.models import (
    Datastore,
    DatastoreVersion,
    Instance,
    InstanceFault,
    ServiceStatusRow,
    utcnow,
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
from coffer.status import SERVICE_READY, ServerStatus, ServiceStatus, Task, trove_status

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


class ConfigurationFields(Protocol):
    """What a detail view reads of an instance's configuration group."""

    @property
    def id(self) -> str: ...
    @property
    def name(self) -> str: ...


class _Status(NamedTuple):
    status: ServiceStatus
    updated_at: datetime


class _Version(NamedTuple):
    name: str
    version: str


class _Datastore(NamedTuple):
    name: str


class _Named(NamedTuple):
    id: str
    name: str


class ViewRow(NamedTuple):
    """An instance with everything its view needs, read in one query (``view_rows``)."""

    #: The instance's columns (a Core row: attribute access like an ``Instance``).
    inst: Any
    status: StatusFields | None
    version: VersionFields
    datastore: NameField
    configuration: ConfigurationFields | None
    #: A backup of the instance is being taken (its view then says BACKUP, as Trove's does).
    backup_running: bool


# Built once: a request only binds values, so it pays neither for building the statement nor
# for compiling it (SQLAlchemy caches the compiled form by the statement's shape). The columns
# are read as plain rows, not ORM objects: building and tracking five mapped objects per
# instance was most of what a page cost.
_BACKUP_RUNNING = (
    exists()
    .where(
        Backup.instance_id == Instance.id,
        Backup.deleted.is_(False),
        # One bound value per state rather than an expanding IN, which SQLAlchemy would
        # re-render into the SQL on every execution.
        or_(*(Backup.state == state for state in sorted(RUNNING_STATES))),
    )
    .label("backup_running")
)


class _ViewValues(NamedTuple):
    """The columns of ``_VIEW_COLUMNS``, by name: rows are copied into this tuple once, because
    reading a column of a SQLAlchemy ``Row`` by name costs several times more. Its first fields
    are an instance's (it serves as the ``InstanceFields`` of a view)."""

    id: str
    tenant_id: str
    name: str
    flavor_id: str
    volume_size: int
    task: Task
    server_status: ServerStatus
    access: dict[str, Any]
    region_id: str
    compute_ref: dict[str, Any]
    volume_used_bytes: int | None
    volume_total_bytes: int | None
    created: datetime
    updated: datetime
    deleted: bool
    #: None when the instance has no status row (its status is never NULL); the time is then
    #: None too.
    service_status: ServiceStatus | None
    service_updated: datetime
    version_name: str
    version_number: str
    datastore_name: str
    #: None when no configuration group is attached (the name is then None too).
    configuration_ref: str | None
    configuration_name: str
    backup_running: bool


_INSTANCE_COLUMNS = _ViewValues._fields[: _ViewValues._fields.index("deleted") + 1]


def _raw(column: Any, name: str) -> Any:
    # Read as the driver returns it, without SQLAlchemy's per-value result processing:
    # ``_view_row`` turns the values into what the views read (enums, datetimes, parsed JSON),
    # and ``RenderedViews`` compares rows as read. (pydantic-core parses JSON several times
    # faster than the ``json`` module SQLAlchemy's JSON type calls per value.)
    return type_coerce(column, Text).label(name)


def _json_value(value: Any) -> Any:
    """A JSON column's value read as text (SQLite, MariaDB) or already decoded by the driver
    (PostgreSQL's psycopg decodes ``json`` itself)."""
    return pydantic_core.from_json(value) if isinstance(value, str) else value


_VIEW_COLUMNS = (
    select(
        *(_raw(Instance.__table__.c[name], name) for name in _INSTANCE_COLUMNS),
        _raw(ServiceStatusRow.status, "service_status"),
        _raw(ServiceStatusRow.updated_at, "service_updated"),
        _raw(DatastoreVersion.name, "version_name"),
        _raw(DatastoreVersion.version, "version_number"),
        _raw(Datastore.name, "datastore_name"),
        _raw(Configuration.id, "configuration_ref"),
        _raw(Configuration.name, "configuration_name"),
        _BACKUP_RUNNING,
    )
    .select_from(Instance)
    .join(DatastoreVersion, DatastoreVersion.id == Instance.datastore_version_id)
    .join(Datastore, Datastore.id == DatastoreVersion.datastore_id)
    .outerjoin(ServiceStatusRow, ServiceStatusRow.instance_id == Instance.id)
    .outerjoin(Configuration, Configuration.id == Instance.configuration_id)
)
if tuple(c.name for c in _VIEW_COLUMNS.selected_columns) != _ViewValues._fields:
    raise RuntimeError("_ViewValues must name the columns of _VIEW_COLUMNS, in their order")


class _ShortValues(NamedTuple):
    """The columns of ``_SHORT_COLUMNS``: what a list's short view (Trove's ``InstanceView``)
    reads, a subset of ``_ViewValues`` (no sizes used, times but the status report's, version
    number, configuration group or ``deleted``). Fewer columns and one join less make a short
    page cheaper to read and its rows cheaper to compare (``RenderedViews``)."""

    id: str
    tenant_id: str
    name: str
    flavor_id: str
    volume_size: int
    task: Task
    server_status: ServerStatus
    access: dict[str, Any]
    region_id: str
    compute_ref: dict[str, Any]
    service_status: ServiceStatus | None
    service_updated: datetime
    version_name: str
    datastore_name: str
    backup_running: bool


_SHORT_COLUMNS = (
    select(*(c for c in _VIEW_COLUMNS.selected_columns if c.name in _ShortValues._fields))
    .select_from(Instance)
    .join(DatastoreVersion, DatastoreVersion.id == Instance.datastore_version_id)
    .join(Datastore, Datastore.id == DatastoreVersion.datastore_id)
    .outerjoin(ServiceStatusRow, ServiceStatusRow.instance_id == Instance.id)
)
if tuple(c.name for c in _SHORT_COLUMNS.selected_columns) != _ShortValues._fields:
    raise RuntimeError("_ShortValues must name the columns of _SHORT_COLUMNS, in their order")
_LATEST_FAULTS = (
    select(
        InstanceFault.instance_id,
        InstanceFault.message,
        InstanceFault.details,
        InstanceFault.created,
    )
    .where(InstanceFault.instance_id.in_(bindparam("ids", expanding=True)))
    .order_by(InstanceFault.instance_id, InstanceFault.created.desc(), InstanceFault.id)
)
_VIEW_ROW = _VIEW_COLUMNS.where(Instance.id == bindparam("id"))
_VIEW_ROWS = _VIEW_COLUMNS.where(Instance.id.in_(bindparam("ids", expanding=True)))
# A page of a project's instances, newest first, keyed on (created, id). ix_instances_page
# (tenant_id, deleted, created, id) serves the filter and the order, so a page costs O(the
# page), not O(the project's instances); the joins and the backup check run for its rows only.
_AFTER_MARKER = or_(
    Instance.created < bindparam("created"),
    and_(Instance.created == bindparam("created"), Instance.id < bindparam("after")),
)


def _page_of(columns: Any) -> Any:
    return (
        columns.where(Instance.tenant_id == bindparam("tenant"), Instance.deleted.is_(False))
        .order_by(Instance.created.desc(), Instance.id.desc())
        .limit(bindparam("limit"))
    )


#: ``(first page, page after a marker)`` of the detail view's and of the short view's columns.
_PAGES = {
    True: (_page_of(_VIEW_COLUMNS), _page_of(_VIEW_COLUMNS).where(_AFTER_MARKER)),
    False: (_page_of(_SHORT_COLUMNS), _page_of(_SHORT_COLUMNS).where(_AFTER_MARKER)),
}
_MARKER = select(Instance.tenant_id, Instance.deleted, Instance.created, Instance.id).where(
    Instance.id == bindparam("id")
)
#: A session (reads what it has pending too) or a plain connection (cheaper: no ORM).
Reader = Session | Connection


class _Shape:
    """How the rows of one of the view queries become ``ViewRow``s: which of their columns are
    JSON, times, enums and booleans (read as the driver returns them, see ``_raw``)."""

    def __init__(self, kind: type[_ViewValues] | type[_ShortValues]) -> None:
        self.make: Any = kind._make
        names = kind._fields
        index = {name: at for at, name in enumerate(names)}

        def present(*wanted: str) -> tuple[int, ...]:
            return tuple(index[name] for name in wanted if name in index)

        self.json = present("access", "compute_ref")
        self.times = present("created", "updated", "service_updated")
        self.enums = tuple(
            (index[name], {member.value: member for member in members})
            for name, members in (
                ("task", Task),
                ("server_status", ServerStatus),
                ("service_status", ServiceStatus),
            )
        )
        self.bools = present("deleted", "backup_running")
        self.detail = "configuration_ref" in index
        #: Where ``RenderedViews.key`` finds the task and the status report's time.
        self.task = index["task"]
        self.service_updated = index["service_updated"]


_DETAIL_SHAPE = _Shape(_ViewValues)
_SHORT_SHAPE = _Shape(_ShortValues)


def _shape(detail: bool) -> _Shape:
    return _DETAIL_SHAPE if detail else _SHORT_SHAPE


def _time(value: Any) -> datetime | None:
    """A DATETIME as its driver returns it: text on SQLite, a ``datetime`` elsewhere."""
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(value)


@lru_cache(maxsize=256)
def _versions(version: str, number: str, datastore: str) -> tuple[_Version, _Datastore]:
    # Few distinct values, the same for most rows: made once, not per row.
    return _Version(version, number), _Datastore(datastore)


def _view_row(row: Any, shape: _Shape = _DETAIL_SHAPE) -> ViewRow:
    """The ``ViewRow`` of a row of ``_VIEW_COLUMNS`` or, with ``_SHORT_SHAPE``, of
    ``_SHORT_COLUMNS`` (whose ``ViewRow`` serves a short view only: it has no version number
    and no configuration group, and its ``inst`` lacks the columns only detail views show)."""
    fields = list(row)
    for index in shape.json:
        fields[index] = _json_value(fields[index])
    for index in shape.times:
        fields[index] = _time(fields[index])
    for index, members in shape.enums:
        if fields[index] is not None:
            fields[index] = members[fields[index]]
    for index in shape.bools:
        fields[index] = bool(fields[index])
    values = shape.make(fields)
    status = (
        _Status(values.service_status, values.service_updated)
        if values.service_status is not None
        else None
    )
    configuration = None
    number = ""
    if shape.detail:
        number = values.version_number
        if values.configuration_ref is not None:
            configuration = _Named(values.configuration_ref, values.configuration_name)
    version, datastore = _versions(values.version_name, number, values.datastore_name)
    return ViewRow(
        values,
        status,
        version,
        datastore,
        configuration,
        bool(values.backup_running),
    )


def view_rows(db: Reader, ids: Sequence[str]) -> list[ViewRow]:
    """The ``ViewRow`` of each of ``ids`` that exists, in the order of ``ids``; one query."""
    if not ids:
        return []
    if len(ids) == 1:  # a show: no list to expand into the statement
        return [_view_row(values) for values in db.execute(_VIEW_ROW, {"id": ids[0]})]
    found = {
        row.inst.id: row
        for row in (_view_row(values) for values in db.execute(_VIEW_ROWS, {"ids": list(ids)}))
    }
    return [found[i] for i in ids if i in found]


class _SQLiteShortPage:
    """The first page of a short list (``_PAGES[False][0]``) read from a SQLite control DB
    through the driver's own cursor: the statement compiled once, its constant values (the
    running backup states) bound once, and the rows made ``_ShortValues`` (the same values a
    SQLAlchemy ``Row`` holds). SQLAlchemy's per-execution work (execution context, result
    set-up, its transaction's ``BEGIN``) cost about as much as SQLite's own reading of the
    page. Run outside a transaction (the driver in autocommit, see ``coffer.db.session``), the
    one statement reads a consistent and current snapshot, as it does inside one."""

    def __init__(self, dialect: Any) -> None:
        compiled = _PAGES[False][0].compile(dialect=dialect)
        self.sql = str(compiled)
        self.names = tuple(compiled.positiontup or ())
        self.fixed: dict[str, Any] = {}
        for name in self.names:
            bind = compiled.binds[name]
            process = bind.type.bind_processor(dialect)
            if name in ("tenant", "limit"):
                if process is not None:  # a value the driver must not be given as it is
                    raise TypeError(f"{name} needs its bind processor")
                continue
            value = bind.effective_value
            self.fixed[name] = process(value) if process is not None else value

    def read(self, db: Connection, project_id: str, limit: int) -> list[Any]:
        given = {**self.fixed, "tenant": project_id, "limit": limit}
        cursor = db.connection.driver_connection.cursor()  # type: ignore[union-attr]
        try:
            found = cursor.execute(self.sql, [given[name] for name in self.names]).fetchall()
        finally:
            cursor.close()
        make = _ShortValues._make
        return [make(values) for values in found]


_sqlite_short_page: _SQLiteShortPage | None = None


def _short_page_reader(db: Reader) -> _SQLiteShortPage | None:
    """The driver-level reader of a first short page, for a plain connection to a SQLite
    control DB that is not inside a transaction; None otherwise."""
    global _sqlite_short_page
    if (
        not isinstance(db, Connection)
        or db.dialect.name != "sqlite"
        or db.dialect.paramstyle != "qmark"
        or db.in_transaction()
    ):
        return None
    if _sqlite_short_page is None:
        _sqlite_short_page = _SQLiteShortPage(db.dialect)
    return _sqlite_short_page


def page_values(
    db: Reader, project_id: str, limit: int, marker: str | None = None, detail: bool = True
) -> list[Any]:
    """Up to ``limit`` of the project's instances (not deleted), newest first, after the one
    ``marker`` names, as rows of ``_VIEW_COLUMNS``, or with ``detail`` False of the fewer
    ``_SHORT_COLUMNS`` a short view needs (see ``render_values``, which must be given the same
    ``detail``); ``BadRequest`` when ``marker`` is not one of them. One query (two with a
    marker)."""
    params: dict[str, Any] = {"tenant": project_id, "limit": limit}
    if not marker and not detail:
        reader = _short_page_reader(db)
        if reader is not None:
            return reader.read(db, project_id, limit)  # type: ignore[arg-type]
    first, following = _PAGES[detail]
    statement = first
    if marker:
        after = db.execute(_MARKER, {"id": marker}).first()
        if after is None or after.deleted or after.tenant_id != project_id:
            raise BadRequest(f"Marker {marker} does not name an instance in this list.")
        statement = following
        params.update(created=after.created, after=after.id)
    return list(db.execute(statement, params).all())


def shown_values(db: Reader, ctx: RequestContext, instance_id: str) -> Any:
    """The row of ``_VIEW_COLUMNS`` of the caller's instance ``instance_id``; the same
    ``NotFound`` as ``load_instance`` for one the caller may not see. One query."""
    values = db.execute(_VIEW_ROW, {"id": instance_id}).first()
    if (
        values is None
        or values.deleted
        or (values.tenant_id != ctx.project_id and not ctx.auth.is_admin)
    ):
        raise NotFound(f"Instance {instance_id} could not be found.")
    return values


def render_values(
    request: Request, ctx: RequestContext, db: Reader, rows: Sequence[Any], detail: bool
) -> list[dict[str, Any]]:
    """``render_view_rows`` for rows of ``_VIEW_COLUMNS`` (``page_values``, ``shown_values``);
    with ``detail`` False, for rows of ``_SHORT_COLUMNS`` (``page_values`` of a short list)."""
    shape = _shape(detail)
    return render_view_rows(request, ctx, db, [_view_row(values, shape) for values in rows], detail)


_NO_TASK = Task.NONE.value


class RenderedViews:
    """The JSON of instance views, by the rows they were rendered from.

    A list page or a show reads its rows from the control DB on every request (one query, as
    always); when those rows are exactly, column for column, the rows an earlier request
    rendered, and everything else a view depends on is the same too (whether each status
    report is older than the heartbeat expiry now, the caller's base URL, project and admin
    role, list or detail), the JSON rendered then is the JSON this request would render, and is
    answered again. Any write to a column the views show, by any process, makes the rows
    differ, so nothing stale is ever served; what is saved is turning the rows into views and
    the views into JSON. Rows whose views take anything from elsewhere are never kept:
    instances with a task in flight (a restore's progress) and detail views with a fault.

    At most ``size`` entries (a few tens of KB each); when full, it starts again. Thread-safe
    (single dict operations). ``hits`` and ``misses`` count lookups.
    """

    def __init__(self, size: int = 128) -> None:
        self.size = size
        self._json: dict[Any, bytes] = {}
        self.hits = 0
        self.misses = 0

    def key(self, rows: Sequence[Any], stale_before: datetime, *caller: Any) -> Any:
        """What ``rows`` render to depends on, or None when they may not be kept."""
        stale = []
        for values in rows:
            if values.task != _NO_TASK:
                return None
            updated = _time(values.service_updated)
            stale.append(updated is not None and updated < stale_before)
        # Rows read through the driver (``_SQLiteShortPage``) are tuples already.
        kept = tuple(values if isinstance(values, tuple) else tuple(values) for values in rows)
        key = (kept, tuple(stale), caller)
        try:
            hash(key)
        except TypeError:  # a driver that decodes JSON columns itself: dicts do not hash
            return None
        return key

    def get(self, key: Any) -> bytes | None:
        found = self._json.get(key)
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
        return found

    def put(self, key: Any, rendered: bytes) -> None:
        if len(self._json) >= self.size:
            self._json.clear()
        self._json[key] = rendered


def rendered_views(request: Request) -> RenderedViews | None:
    """The app's ``RenderedViews`` (one per API process, made on first use); None when
    ``app.state.coffer_rendered_views`` is ``False`` (turned off, e.g. to measure without)."""
    state = request.app.state
    memo: RenderedViews | bool | None = getattr(state, "coffer_rendered_views", None)
    if memo is False:
        return None
    if not isinstance(memo, RenderedViews):
        memo = state.coffer_rendered_views = RenderedViews()
    return memo


def render_json(
    request: Request, ctx: RequestContext, db: Reader, rows: Sequence[Any], detail: bool
) -> bytes:
    """The JSON array of the views of ``rows`` (see ``render_values``), answered from the
    app's ``RenderedViews`` when it has them."""
    memo = rendered_views(request)
    key = None
    if memo is not None:
        expiry = control_plane(request).settings.default.agent_heartbeat_expiry
        stale_before = utcnow() - timedelta(seconds=expiry)
        key = memo.key(rows, stale_before, base_url(request), ctx.project_url, ctx.is_admin, detail)
        if key is not None:
            found = memo.get(key)
            if found is not None:
                return found
    views = render_values(request, ctx, db, rows, detail)
    rendered = pydantic_core.to_json(views)
    faulty = detail and any("fault" in view or view["status"] == "ERROR" for view in views)
    if memo is not None and key is not None and not faulty:
        memo.put(key, rendered)
    return rendered


def load_view_row(db: Reader, ctx: RequestContext, instance_id: str) -> ViewRow:
    """``load_instance`` (the same 404 for an instance the caller may not see) and, in the same
    query, what its view needs."""
    rows = view_rows(db, [instance_id])
    inst = rows[0].inst if rows else None
    if inst is None or inst.deleted or (inst.tenant_id != ctx.project_id and not ctx.auth.is_admin):
        raise NotFound(f"Instance {instance_id} could not be found.")
    return rows[0]


def _latest_faults(db: Reader, ids: Sequence[str]) -> dict[str, FaultFields]:
    """The newest fault of each of ``ids`` that has one; one query."""
    faults: dict[str, FaultFields] = {}
    if ids:
        for fault in db.execute(_LATEST_FAULTS, {"ids": list(ids)}):
            faults.setdefault(fault.instance_id, fault)
    return faults


def configuration_view(group: ConfigurationFields, project_url: str) -> dict[str, Any]:
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
    db: Reader,
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
    stale_before = utcnow() - timedelta(seconds=expiry)
    admin = ctx.auth.is_admin
    faults: dict[str, FaultFields] = {}
    if detail:
        failed = [
            row.inst.id
            for row in rows
            if row.inst.task.is_error
            or trove_status(
                row.inst.task,
                row.inst.server_status,
                effective_service_status(row.inst, row.status, expiry, stale_before),
            )
            == "ERROR"
        ]
        faults = _latest_faults(db, failed)
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
            stale_before=stale_before,
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
    query whatever their number (changes pending in ``session`` included)."""
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


def paginated_json(
    request: Request, items: bytes, next_marker: str | None, key: str, limit: int
) -> bytes:
    """``paginated`` rendered, for ``items`` already rendered as a JSON array: the same bytes
    as rendering ``paginated``'s body."""
    links = b""
    if next_marker is not None:
        links = b',"links":' + _next_links(request, limit, next_marker)
    return b"{" + pydantic_core.to_json(key) + b":" + items + links + b"}"


_next_links_made: dict[tuple[Any, ...], bytes] = {}


def _next_links(request: Request, limit: int, marker: str) -> bytes:
    """``[{"rel": "next", "href": ...}]`` as JSON, remembered by everything the href is made of
    (the request's own URL, ``limit`` and ``marker``): building a URL costs more than a page's
    SQL."""
    scope = request.scope
    key = (
        scope.get("scheme"),
        _scope_value(scope.get("server")),
        scope.get("root_path"),
        scope["path"],
        scope.get("query_string"),
        request.headers.get("host"),
        limit,
        marker,
    )
    made = _next_links_made.get(key)
    if made is None:
        url = request.url.include_query_params(limit=limit, marker=marker)
        made = pydantic_core.to_json([{"rel": "next", "href": str(url)}])
        if len(_next_links_made) >= 1024:
            _next_links_made.clear()
        _next_links_made[key] = made
    return made


def _scope_value(value: Any) -> Any:
    # ASGI servers give lists where the spec says tuples (the test client does).
    return tuple(value) if isinstance(value, list) else value


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
