"""How far the restore that builds an instance has got (``GET /instances/{id}/restore``).

``{"backup_id", "phase", "total_bytes", "verified_bytes", "restored_bytes", "rate"}``:
``total_bytes`` is the engine bytes of the backup's chain (what the restore writes); the bytes
verified and restored so far and the rate (bytes per second) are the guest's latest report, as
the conductor recorded it (``RestoreProgress``; 0 until the first). ``phase`` comes from the
create operation's step (``waiting`` while the server is made, ``starting`` once the engine
starts on the restored data) and, during the restore step, from the guest (``verifying``, then
``restoring``). The ``coffer backup`` CLI follows it; see ``docs/backups.md``.

Reads plain rows (Core statements), so it serves an ORM session and a bare connection alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from sqlalchemy import Connection, select
from sqlalchemy.orm import Session

from coffer.db.models import Operation
from coffer.db.models_backups import Backup
from coffer.db.models_restore import RestoreProgress
from coffer.status import Task

#: The steps of an instance create, and what a restore is doing during each.
RESTORE_PHASES = {
    "start": "waiting",
    "allocate": "waiting",
    "create_server": "waiting",
    "restore": "restoring",
    "prepare": "starting",
    "wait_ready": "starting",
}
#: Longest chain walked for its total (a retention-bounded chain is far shorter).
_MAX_CHAIN = 1000


class _Instance(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def task(self) -> Task: ...


def show_restores(
    db: Session | Connection, pairs: Sequence[tuple[_Instance, dict[str, Any]]]
) -> None:
    """Add ``restore`` to the views (``pairs`` of instance and view) of instances being built
    from a backup; two queries for all of them, plus one per backup of each chain."""
    building = {inst.id: view for inst, view in pairs if inst.task is Task.BUILDING}
    if not building:
        return
    ops = db.execute(
        select(Operation.instance_id, Operation.step, Operation.payload).where(
            Operation.instance_id.in_(list(building)),
            Operation.kind == "create_instance",
            Operation.state.in_(("pending", "running")),
        )
    ).all()
    restores = [
        (instance_id, step, spec)
        for instance_id, step, payload in ops
        if instance_id in building and isinstance(spec := (payload or {}).get("restore"), dict)
    ]
    if not restores:
        return
    reports = {
        row.instance_id: row
        for row in db.execute(
            select(
                RestoreProgress.instance_id,
                RestoreProgress.phase,
                RestoreProgress.verified_bytes,
                RestoreProgress.restored_bytes,
                RestoreProgress.total_bytes,
                RestoreProgress.rate,
            ).where(RestoreProgress.instance_id.in_([r[0] for r in restores]))
        )
    }
    for instance_id, step, spec in restores:
        report = reports.get(instance_id)
        phase = RESTORE_PHASES.get(step, "restoring")
        if phase == "restoring" and (report is None or report.phase == "verifying"):
            phase = "verifying"  # what a restore does first
        total = _chain_bytes(db, str(spec.get("backup_id")))
        building[instance_id]["restore"] = {
            "backup_id": spec.get("backup_id"),
            "phase": phase,
            "total_bytes": total or (report.total_bytes if report is not None else None),
            "verified_bytes": report.verified_bytes if report is not None else 0,
            "restored_bytes": report.restored_bytes if report is not None else 0,
            "rate": report.rate if report is not None else 0,
        }


def _chain_bytes(db: Session | Connection, backup_id: str) -> int | None:
    """The engine bytes of ``backup_id`` and the parents it builds on; None if a link is gone
    or its size unknown."""
    total = 0
    current: str | None = backup_id
    for _ in range(_MAX_CHAIN):
        if current is None:
            return total or None
        row = db.execute(
            select(Backup.raw_size, Backup.parent_id, Backup.deleted).where(Backup.id == current)
        ).first()
        if row is None or row.deleted or not row.raw_size:
            return None
        total += int(row.raw_size)
        current = row.parent_id
    return None
