"""JSON shapes of instances (Trove ``InstanceView`` / ``InstanceDetailView``).

The views read only the attributes the protocols below name, so they render ORM objects
(``Instance``, ``ServiceStatusRow``, ...) and the plain rows the busiest reads fetch with Core
queries (``coffer.api.routes.instance_support.read_views``) alike.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Protocol

from coffer.db.models import utcnow
from coffer.status import ServerStatus, ServiceStatus, Task, trove_operating_status, trove_status

GIB = 1024**3


class InstanceFields(Protocol):
    """What a view reads of an instance (an ``Instance`` or a row with its columns)."""

    @property
    def id(self) -> str: ...
    @property
    def tenant_id(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def flavor_id(self) -> str: ...
    @property
    def volume_size(self) -> int: ...
    @property
    def task(self) -> Task: ...
    @property
    def server_status(self) -> ServerStatus: ...
    @property
    def access(self) -> dict[str, Any]: ...
    @property
    def region_id(self) -> str: ...
    @property
    def compute_ref(self) -> dict[str, Any]: ...
    @property
    def volume_used_bytes(self) -> int | None: ...
    @property
    def volume_total_bytes(self) -> int | None: ...
    @property
    def created(self) -> datetime: ...
    @property
    def updated(self) -> datetime: ...


class StatusFields(Protocol):
    """What a view reads of an instance's service status row."""

    @property
    def status(self) -> ServiceStatus: ...
    @property
    def updated_at(self) -> datetime: ...


class VersionFields(Protocol):
    """What a view reads of a datastore version."""

    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str: ...


class NameField(Protocol):
    """What a view reads of a datastore."""

    @property
    def name(self) -> str: ...


class FaultFields(Protocol):
    """What a view reads of an instance fault."""

    @property
    def message(self) -> str: ...
    @property
    def details(self) -> str: ...
    @property
    def created(self) -> datetime: ...


def iso(value: datetime | None) -> str | None:
    return value.strftime("%Y-%m-%dT%H:%M:%S") if value else None


def effective_service_status(
    inst: InstanceFields,
    row: StatusFields | None,
    heartbeat_expiry: int,
    stale_before: datetime | None = None,
) -> ServiceStatus:
    """The engine status, or FAILED_TIMEOUT_GUESTAGENT when the guest has gone quiet (its
    status is older than ``stale_before``, by default ``heartbeat_expiry`` seconds ago)."""
    status = row.status if row else ServiceStatus.NEW
    if (
        row is not None
        and inst.task is Task.NONE
        and status is not ServiceStatus.RESTART_REQUIRED
        and row.updated_at < (stale_before or utcnow() - timedelta(seconds=heartbeat_expiry))
    ):
        return ServiceStatus.FAILED_TIMEOUT_GUESTAGENT
    return status


def instance_links(base: str, tenant_id: str, instance_id: str) -> list[dict[str, str]]:
    return [
        {"rel": "self", "href": f"{base}/v1.0/{tenant_id}/instances/{instance_id}"},
        {"rel": "bookmark", "href": f"{base}/instances/{instance_id}"},
    ]


def instance_view(
    inst: InstanceFields,
    *,
    version: VersionFields,
    datastore: NameField,
    status_row: StatusFields | None,
    fault: FaultFields | None,
    base: str,
    heartbeat_expiry: int,
    detail: bool,
    admin: bool,
    stale_before: datetime | None = None,
) -> dict[str, Any]:
    """Trove's view of ``inst``; ``stale_before`` as in ``effective_service_status`` (a list
    passes one value for all its instances)."""
    service = effective_service_status(inst, status_row, heartbeat_expiry, stale_before)
    addresses = []
    ref = inst.compute_ref or {}
    if ref.get("private"):
        addresses.append({"address": ref["private"], "type": "private", "network": "private"})
    if ref.get("public"):
        addresses.append({"address": ref["public"], "type": "public", "network": "public"})
    access = dict(inst.access or {})
    access.setdefault("is_public", bool(ref.get("public")))
    view: dict[str, Any] = {
        "id": inst.id,
        "name": inst.name,
        "status": trove_status(inst.task, inst.server_status, service),
        "operating_status": trove_operating_status(inst.task, inst.server_status, service),
        "links": instance_links(base, inst.tenant_id, inst.id),
        "flavor": {
            "id": inst.flavor_id,
            "links": [
                {"rel": "self", "href": f"{base}/v1.0/{inst.tenant_id}/flavors/{inst.flavor_id}"},
                {"rel": "bookmark", "href": f"{base}/flavors/{inst.flavor_id}"},
            ],
        },
        "datastore": {"type": datastore.name, "version": version.name},
        "region": inst.region_id,
        "access": access,
        "volume": {"size": inst.volume_size},
        "ip": [a["address"] for a in addresses],
        "addresses": addresses,
    }
    if admin:
        view["tenant_id"] = inst.tenant_id
    if detail:
        view["datastore"]["version_number"] = version.version
        view["created"] = iso(inst.created)
        view["updated"] = iso(inst.updated)
        view["service_status_updated"] = iso(status_row.updated_at if status_row else None)
        if inst.volume_used_bytes is not None:
            view["volume"]["used"] = round(inst.volume_used_bytes / GIB, 4)
            if inst.volume_total_bytes:
                view["volume"]["used_percent"] = round(
                    100.0 * inst.volume_used_bytes / inst.volume_total_bytes, 2
                )
        if fault is not None and (inst.task.is_error or view["status"] == "ERROR"):
            view["fault"] = {
                "message": fault.message,
                "created": iso(fault.created),
                **({"details": fault.details} if admin else {}),
            }
        if admin:
            view["server_id"] = inst.id
            view["encrypted_rpc_messaging"] = True
    return view
