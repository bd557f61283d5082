"""JSON shapes of instances (Trove ``InstanceView`` / ``InstanceDetailView``)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from coffer.db.models import (
    Datastore,
    DatastoreVersion,
    Instance,
    InstanceFault,
    ServiceStatusRow,
    utcnow,
)
from coffer.status import ServiceStatus, Task, trove_operating_status, trove_status

GIB = 1024**3


def iso(value: datetime | None) -> str | None:
    return value.strftime("%Y-%m-%dT%H:%M:%S") if value else None


def effective_service_status(
    inst: Instance, row: ServiceStatusRow | None, heartbeat_expiry: int
) -> ServiceStatus:
    """The engine status, or FAILED_TIMEOUT_GUESTAGENT when the guest has gone quiet."""
    status = row.status if row else ServiceStatus.NEW
    if (
        row is not None
        and inst.task is Task.NONE
        and status is not ServiceStatus.RESTART_REQUIRED
        and row.updated_at < utcnow() - timedelta(seconds=heartbeat_expiry)
    ):
        return ServiceStatus.FAILED_TIMEOUT_GUESTAGENT
    return status


def instance_links(base: str, tenant_id: str, instance_id: str) -> list[dict[str, str]]:
    return [
        {"rel": "self", "href": f"{base}/v1.0/{tenant_id}/instances/{instance_id}"},
        {"rel": "bookmark", "href": f"{base}/instances/{instance_id}"},
    ]


def instance_view(
    inst: Instance,
    *,
    version: DatastoreVersion,
    datastore: Datastore,
    status_row: ServiceStatusRow | None,
    fault: InstanceFault | None,
    base: str,
    heartbeat_expiry: int,
    detail: bool,
    admin: bool,
) -> dict[str, Any]:
    service = effective_service_status(inst, status_row, heartbeat_expiry)
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
