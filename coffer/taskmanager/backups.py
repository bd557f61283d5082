"""The backup flows: create a backup, delete backups, and the restore step of an instance create.

**Create** (``create_backup``): the API has recorded the backup NEW and charged the project's
``backups`` quota. ``start_backup`` asks the instance's guest to take it (streamed from the
engine, sealed, into ``[storage]`` under ``<project>/<backup id>``); ``wait_backup`` follows it:
the guest's reports reach the row through the conductor (BUILDING with progress, then COMPLETED
with size, checksum, wrapped key and engine position, or FAILED with a reason), and the step also
asks the guest now and then, so a guest agent that died (and was restarted by its supervisor)
ends the backup FAILED instead of leaving it BUILDING. ``finish`` removes the object of a failed
backup. A failed backup gives its quota back. The instance itself is never changed: its status
reads BACKUP while one of its backups runs and ACTIVE again after.

**Delete** (``delete_backup``): the backup and, first, every incremental backup that depends on
it (as Trove does): each object is removed from storage, the row soft-deleted and its quota given
back.

**Restore** (``RestoreStep``, the ``restore`` step of ``create_instance``): the chain of the
backup (its full backup first, then each incremental) is handed to the new instance's guest,
which verifies every object completely before it writes anything, then fills the empty data
directory; ``prepare`` then starts the restored engine.

**Log archive** (engines whose backups restore to a point in time: PostgreSQL): each backup
request also carries the instance's archive settings (``archive_request``: the storage, the prefix
``<project>/archive/<instance id>`` and the archive key), so the guest archives its log from its
first backup on; the control DB keeps the archive's extent (``InstanceArchive``), which the
guest's reports move forward (``apply_archive_report``). A point-in-time restore hands the new
guest the source's archive settings and the target time besides the chain.

Keys: each backup's data key is wrapped under a key-encryption key derived from the operator's
master key for that backup id (``backup_key``), and each archived file's under the instance's
archive key (``archive_key``). The guest gets those derived keys for what it writes or restores,
never the master key.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from coffer import quotas
from coffer.bus import keys
from coffer.config import Settings
from coffer.controlplane import ControlPlane
from coffer.db.models import DatastoreVersion, Instance, utcnow
from coffer.db.models_archive import InstanceArchive
from coffer.db.models_backups import INCREMENTAL, Backup, BackupState
from coffer.db.session import transaction
from coffer.errors import RemoteError, RpcTimeout, SealError, ValidationError
from coffer.guest.backup import supports_point_in_time
from coffer.status import Task
from coffer.storage.base import BackupStorage, StorageError, storage_from_settings
from coffer.taskmanager.operations import NEXT, Context, Flow, OperationFailed, StepResult, Wait

LOG = logging.getLogger(__name__)

CREATE_BACKUP = "create_backup"
DELETE_BACKUP = "delete_backup"
#: How long a finished backup may wait for its report to arrive through the conductor before the
#: guest's own answer to ``backup_status`` is recorded instead.
REPORT_GRACE = 10.0
#: Seconds between two ``backup_status`` questions while a backup runs.
POLL_SECONDS = 1.0
RESTORE_CALL_TIMEOUT = 60.0
FINAL_STATES = frozenset(
    {BackupState.COMPLETED, BackupState.FAILED, BackupState.DELETE_FAILED, BackupState.RESTORED}
)


def backup_holder(backup_id: str) -> str:
    """The quota holder of one backup (``quota_charges.holder_id``)."""
    return f"backup:{backup_id}"


def backup_key(cp: ControlPlane, backup_id: str) -> bytes:
    """The key-encryption key of one backup, derived from the master key (never stored)."""
    return keys.derive_key(cp.master_key, f"backup:{backup_id}")


def storage_key(project_id: str, backup_id: str) -> str:
    return f"{project_id}/{backup_id}"


def archive_key(cp: ControlPlane, instance_id: str) -> bytes:
    """The key-encryption key of one instance's log archive, derived from the master key."""
    return keys.derive_key(cp.master_key, f"archive:{instance_id}")


def archive_prefix(project_id: str, instance_id: str) -> str:
    return f"{project_id}/archive/{instance_id}"


def ensure_archive(session: Session, settings: Settings, inst: Instance) -> InstanceArchive:
    """The archive row of ``inst``, recorded now if this is its first backup."""
    row = session.get(InstanceArchive, inst.id)
    if row is None:
        row = InstanceArchive(
            instance_id=inst.id,
            tenant_id=inst.tenant_id,
            storage_driver=settings.storage.driver,
            prefix=archive_prefix(inst.tenant_id, inst.id),
        )
        session.add(row)
        session.flush()
    return row


def archive_request(cp: ControlPlane, row: InstanceArchive) -> dict[str, Any]:
    """What a guest needs to write (or read) one instance's archive; secrets included, so it
    travels only inside messages sealed with the receiving instance's key."""
    return {
        "instance_id": row.instance_id,
        "storage": storage_spec(cp.settings),
        "prefix": row.prefix,
        "key": base64.b64encode(archive_key(cp, row.instance_id)).decode(),
        "timeout": cp.settings.default.backup_archive_timeout,
    }


_WAL_FILE = re.compile(r"[0-9A-F]{24}")
_BINLOG_FILE = re.compile(r"[A-Za-z0-9_-]+\.(\d{6,})")


def _archive_order(name: str) -> tuple[int, str]:
    """Where an archived file stands: a WAL file by segment, a binary log by its number."""
    binlog = _BINLOG_FILE.fullmatch(name)
    if binlog is not None:
        return int(binlog.group(1)), ""
    return int(name[8:], 16), name[:8]


def apply_archive_report(
    session: Session, instance_id: str, segment: str, lsn: str | None, when: str | None
) -> bool:
    """Move the archive's extent of ``instance_id`` forward to ``segment`` (ended at ``lsn``,
    covering every commit before ``when``); True if it moved. A report that is malformed, about
    an archive never recorded, or not newer than what is known changes nothing."""
    row = session.get(InstanceArchive, instance_id)
    if row is None or not isinstance(segment, str):
        return False
    if not _WAL_FILE.fullmatch(segment) and not _BINLOG_FILE.fullmatch(segment):
        return False
    try:
        moment = datetime.fromisoformat(str(when))
    except ValueError:
        return False
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    newest = row.newest_segment
    if newest is not None:
        known, new = _archive_order(newest), _archive_order(segment)
        if new < known or (
            new == known and row.newest_time is not None and moment <= row.newest_time
        ):
            return False  # older, or the same file with no later time (an idle engine's)
    row.newest_segment = segment
    row.newest_lsn = str(lsn)[:32] if lsn else None
    row.newest_time = moment
    return True


def storage_spec(settings: Settings) -> dict[str, Any]:
    """The ``[storage]`` options a guest needs to reach the store, secrets included.

    Sent only inside messages sealed with the instance's key; the file driver's directory is made
    explicit, since a guest has no state directory to default it from.
    """
    section = settings.storage
    spec: dict[str, Any] = {}
    for name, value in section:
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        spec[name] = str(value) if isinstance(value, Path) else value
    if section.driver == "file":
        spec["file_directory"] = str(file_directory(settings))
    return spec


def file_directory(settings: Settings) -> Path:
    return settings.storage.file_directory or settings.state_dir / "backups"


def ensure_storage_ready(settings: Settings) -> None:
    """Make the file driver's directory exist and belong to the engine user, who writes it.

    Guests run as the engine user and write backups there; a no-op for the other drivers.
    """
    if settings.storage.driver != "file":
        return
    from coffer.compute.files import EngineUser

    directory = file_directory(settings)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    user = EngineUser.resolve(settings.engine_user)
    info = directory.stat()
    if (info.st_uid, info.st_gid) != (user.uid, user.gid) and os.geteuid() == 0:
        os.chown(directory, user.uid, user.gid)


def open_storage(settings: Settings) -> BackupStorage:
    return storage_from_settings(settings)


# --- what guests report (through the conductor, or answering the taskmanager) -------------------


def apply_backup_report(
    session: Session, instance_id: str, backup_id: str, report: Mapping[str, Any]
) -> BackupState | None:
    """Record what the guest of ``instance_id`` says about ``backup_id``; the new state.

    A guest may report only on its own instance's backups (``SealError`` otherwise: the report
    is dropped). A backup already COMPLETED or FAILED never changes again, so a late or repeated
    report does nothing. COMPLETED needs the size, the SHA-256 checksum and the wrapped key, else
    the backup is recorded FAILED: an object without them could never be restored. FAILED gives
    the backup's quota back. Returns None when the backup is unknown or deleted.
    """
    row = session.get(Backup, backup_id)
    if row is None or row.deleted:
        return None
    if row.instance_id != instance_id:
        raise SealError(
            f"instance {instance_id} reported on backup {backup_id} of another instance; "
            "a guest may only report on its own instance's backups"
        )
    if row.state in FINAL_STATES:
        return row.state
    state = report.get("state")
    if state == "building":
        row.state = BackupState.BUILDING
        for name in ("size", "raw_size"):
            value = report.get(name)
            if isinstance(value, int) and value >= 0:
                setattr(row, name, value)
        return row.state
    if state == "completed":
        checksum = report.get("checksum")
        wrapped = report.get("wrapped_key")
        size, raw_size = report.get("size"), report.get("raw_size")
        position = report.get("engine_position")
        if (
            isinstance(checksum, str)
            and len(checksum) == 64
            and isinstance(wrapped, str)
            and wrapped
            and isinstance(size, int)
            and size > 0
            and isinstance(raw_size, int)
        ):
            row.state = BackupState.COMPLETED
            row.checksum = checksum.lower()
            row.wrapped_key = wrapped
            row.size, row.raw_size = size, raw_size
            row.engine_position = dict(position) if isinstance(position, dict) else {}
            row.completed = utcnow()
            row.fail_reason = None
            return row.state
        report = {"reason": "The guest reported the backup complete without its checksum or key."}
    reason = report.get("reason")
    _fail(session, row, reason if isinstance(reason, str) and reason else "The backup failed.")
    return row.state


def _fail(session: Session, row: Backup, reason: str) -> None:
    row.state = BackupState.FAILED
    row.fail_reason = reason[:2000]
    quotas.release(session, backup_holder(row.id))


def running_backup(session: Session, instance_id: str) -> Backup | None:
    """The instance's backup that is being taken now, if any."""
    return session.scalars(
        select(Backup).where(
            Backup.instance_id == instance_id,
            Backup.deleted.is_(False),
            Backup.state.in_((BackupState.NEW, BackupState.BUILDING, BackupState.SAVING)),
        )
    ).first()


def restore_chain(session: Session, backup_id: str) -> list[Backup]:
    """The backups a restore of ``backup_id`` needs, its full backup first.

    ``ValidationError`` naming the first link that is missing, deleted or not restorable.
    """
    chain: list[Backup] = []
    current: str | None = backup_id
    while current is not None:
        row = session.get(Backup, current)
        if row is None or row.deleted:
            raise ValidationError(
                f"Backup {current} (needed to restore backup {backup_id}) has been deleted."
            )
        if not row.state.restorable or not row.checksum or not row.wrapped_key:
            raise ValidationError(
                f"Backup {row.id} is {row.state.value.upper()}; only COMPLETED backups (and "
                "chains of them) can be restored."
            )
        chain.append(row)
        if len(chain) > 1000:
            raise ValidationError(f"The chain of backup {backup_id} does not end in a full one.")
        current = row.parent_id
    chain.reverse()
    if chain[0].backup_type == INCREMENTAL:
        raise ValidationError(f"The chain of backup {backup_id} does not start with a full one.")
    return chain


def descendants(session: Session, backup_id: str) -> list[Backup]:
    """Every live backup whose chain goes through ``backup_id``, children before parents."""
    found: list[Backup] = []
    frontier = [backup_id]
    while frontier:
        children = list(
            session.scalars(
                select(Backup).where(Backup.parent_id.in_(frontier), Backup.deleted.is_(False))
            )
        )
        found.extend(children)
        frontier = [c.id for c in children]
    found.reverse()
    return found


# --- the flows ------------------------------------------------------------------------------


def archive_start(row: Backup) -> str | None:
    """The first archived file a full backup's point-in-time restores need (its WAL start or
    its binary log file); None if it recorded none."""
    position = row.engine_position or {}
    for key in ("start_wal_file", "binlog_file"):
        value = position.get(key)
        if isinstance(value, str) and (_WAL_FILE.fullmatch(value) or _BINLOG_FILE.fullmatch(value)):
            return value
    return None


def prune_archive(cp: ControlPlane, storage: BackupStorage, instance_id: str) -> int:
    """Delete the archived log of ``instance_id`` older than its oldest remaining full backup
    (all of it when none remains); drop the archive's record too once the instance is deleted
    and none of its backups remains. The number of objects deleted."""
    with cp.session_factory() as session:
        archive = session.get(InstanceArchive, instance_id)
        if archive is None:
            return 0
        fulls = list(
            session.scalars(
                select(Backup).where(
                    Backup.instance_id == instance_id,
                    Backup.deleted.is_(False),
                    Backup.backup_type != INCREMENTAL,
                )
            )
        )
        inst = session.get(Instance, instance_id)
        prefix = archive.prefix + "/"
    starts = [archive_start(row) for row in fulls]
    if any(start is None for start in starts):
        return 0  # a backup we cannot place: keep everything
    keep = min((_archive_order(s) for s in starts if s is not None), default=None)
    doomed = []
    for item in storage.list(prefix):
        name = item.key[len(prefix) :]
        if not (_WAL_FILE.fullmatch(name) or _BINLOG_FILE.fullmatch(name)):
            if keep is None and name.endswith(".history"):
                doomed.append(item.key)
            continue
        if keep is None or _archive_order(name) < keep:
            doomed.append(item.key)
    for key in doomed:
        storage.delete(key)
    if not fulls and (inst is None or inst.deleted):
        with transaction(cp.session_factory) as session:
            row = session.get(InstanceArchive, instance_id)
            if row is not None:
                session.delete(row)
    if doomed:
        LOG.info("pruned %d archived log file(s) of instance %s", len(doomed), instance_id)
    return len(doomed)


def purge_unfinished_objects(cp: ControlPlane, instance_id: str) -> None:
    """Remove what the instance's unfinished backups left in storage, once its guest is gone.

    A backup that fails because its instance is being deleted is ended before the guest is
    stopped, so the guest may still have been writing it; what it wrote (a partial upload) is
    removed here, after the server is deleted. Best effort: a storage error is logged, and the
    delete goes on."""
    with cp.session_factory() as session:
        keys_left = list(
            session.scalars(
                select(Backup.storage_key).where(
                    Backup.instance_id == instance_id,
                    Backup.state.not_in([BackupState.COMPLETED, BackupState.RESTORED]),
                )
            )
        )
    if not keys_left:
        return
    try:
        with open_storage(cp.settings) as storage:
            for key in keys_left:
                if key:
                    storage.delete(key)
    except (StorageError, OSError) as exc:
        LOG.warning("instance %s: partial backup objects not removed: %s", instance_id, exc)


class BackupFlows:
    """Builds the backup flows and the restore step bound to one control plane."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    def flows(self) -> dict[str, Flow]:
        return {
            CREATE_BACKUP: Flow(
                CREATE_BACKUP,
                [
                    ("start_backup", self.start_backup),
                    ("wait_backup", self.wait_backup),
                    ("finish", self.finish),
                ],
                fail=self.create_failed,
            ),
            DELETE_BACKUP: Flow(
                DELETE_BACKUP,
                [("delete_objects", self.delete_objects)],
                fail=self.delete_failed,
                max_attempts=8,
            ),
        }

    # -- create ----------------------------------------------------------------------------------

    def _backup(self, ctx: Context) -> Backup | None:
        with self.cp.session_factory() as session:
            row = session.get(Backup, ctx.payload["backup_id"])
        return None if row is None or row.deleted else row

    def _live_instance(self, session: Session, row: Backup) -> Instance:
        inst = session.get(Instance, row.instance_id) if row.instance_id else None
        if inst is None or inst.deleted or inst.task is Task.DELETING:
            raise OperationFailed("The instance was deleted while its backup was being taken.")
        return inst

    def start_backup(self, ctx: Context) -> StepResult:
        row = self._backup(ctx)
        if row is None or row.state in FINAL_STATES:
            return NEXT
        with self.cp.session_factory() as session:
            inst = self._live_instance(session, row)
            version = session.get(DatastoreVersion, row.datastore_version_id)
            assert version is not None
            parent = None
            if row.parent_id:
                parent_row = session.get(Backup, row.parent_id)
                if parent_row is None or parent_row.deleted or not parent_row.state.restorable:
                    raise OperationFailed(
                        f"The parent backup {row.parent_id} is no longer usable; take a full "
                        "backup instead."
                    )
                parent = dict(parent_row.engine_position or {})
        archive = None
        if supports_point_in_time(version.manager):
            with transaction(self.cp.session_factory) as session:
                live = session.get(Instance, inst.id)
                assert live is not None
                archive = archive_request(self.cp, ensure_archive(session, self.cp.settings, live))
        ensure_storage_ready(self.cp.settings)
        metadata = {
            "backup-id": row.id,
            "instance-id": inst.id,
            "project-id": row.tenant_id,
            "datastore": version.manager,
            "datastore-version": version.version,
            "backup-type": row.backup_type,
        }
        try:
            self.cp.guest(inst.id).call(
                "create_backup",
                timeout=self.cp.settings.default.agent_call_low_timeout,
                backup_id=row.id,
                storage=storage_spec(self.cp.settings),
                storage_key=row.storage_key,
                backup_key=base64.b64encode(backup_key(self.cp, row.id)).decode(),
                parent=parent,
                metadata=metadata,
                archive=archive,
            )
        except RemoteError as exc:
            raise OperationFailed(f"The guest could not start the backup: {exc.message}") from exc
        except RpcTimeout as exc:
            # Retried (create_backup is idempotent on the guest) with the runner's backoff.
            raise RuntimeError("the guest agent did not answer create_backup") from exc
        ctx.payload["started_at"] = time.time()
        return NEXT

    def wait_backup(self, ctx: Context) -> StepResult:
        row = self._backup(ctx)
        if row is None or row.state in FINAL_STATES:
            return NEXT
        with self.cp.session_factory() as session:
            inst = self._live_instance(session, row)
        try:
            status = self.cp.guest(inst.id).call(
                "backup_status",
                timeout=self.cp.settings.default.agent_call_low_timeout,
                backup_id=row.id,
            )
        except RpcTimeout:
            silent = ctx.payload.setdefault("silent_since", time.time())
            if time.time() - silent > self.cp.settings.default.agent_heartbeat_expiry:
                raise OperationFailed(
                    "The guest agent stopped answering while the backup was running."
                ) from None
            return Wait(POLL_SECONDS)
        except RemoteError as exc:
            raise OperationFailed(
                f"The guest could not report on the backup: {exc.message}"
            ) from exc
        ctx.payload.pop("silent_since", None)
        state = status.get("state") if isinstance(status, dict) else None
        if state == "unknown":
            raise OperationFailed("The guest agent has no record of the backup; it was lost.")
        if state in ("completed", "failed"):
            first = ctx.payload.setdefault("finished_at", time.time())
            if time.time() - first < REPORT_GRACE:
                return Wait(0.2)
            LOG.warning(
                "backup %s: the guest's report did not arrive; recording its answer", row.id
            )
            with transaction(self.cp.session_factory) as session:
                apply_backup_report(session, inst.id, row.id, status)
            return NEXT
        return Wait(POLL_SECONDS)

    def finish(self, ctx: Context) -> StepResult:
        row = self._backup(ctx)
        if row is not None and row.state is BackupState.FAILED:
            self._remove_object(row)
        if row is not None:
            LOG.info("backup %s ended %s", row.id, row.state.value)
        return NEXT

    def _remove_object(self, row: Backup) -> None:
        # A failed upload leaves nothing under its key (the storage contract); this also covers
        # a backup that failed after its upload completed.
        try:
            with open_storage(self.cp.settings) as storage:
                storage.delete(row.storage_key)
        except StorageError as exc:
            LOG.warning("could not remove the object of failed backup %s: %s", row.id, exc)

    def create_failed(self, ctx: Context, failure: OperationFailed) -> None:
        backup_id = ctx.payload.get("backup_id")
        if not backup_id:
            return
        with transaction(self.cp.session_factory) as session:
            row = session.get(Backup, backup_id)
            if row is None or row.state in FINAL_STATES:
                return
            _fail(session, row, failure.message)
        self._remove_object(row)

    # -- delete ----------------------------------------------------------------------------------

    def delete_objects(self, ctx: Context) -> StepResult:
        ids: list[str] = list(ctx.payload.get("backup_ids", []))
        with self.cp.session_factory() as session:
            rows = [session.get(Backup, backup_id) for backup_id in ids]
        with open_storage(self.cp.settings) as storage:
            for row in rows:
                if row is None or row.deleted:
                    continue
                state = BackupState.DELETE_FAILED
                try:
                    storage.delete(row.storage_key)
                    state = row.state
                except StorageError as exc:
                    if exc.transient:
                        raise  # retried with backoff
                    LOG.warning("could not delete the object of backup %s: %s", row.id, exc)
                with transaction(self.cp.session_factory) as session:
                    live = session.get(Backup, row.id)
                    if live is None:
                        continue
                    live.state = state
                    live.deleted = True
                    live.deleted_at = utcnow()
                    quotas.release(session, backup_holder(live.id))
            for instance_id in sorted({r.instance_id for r in rows if r and r.instance_id}):
                try:
                    prune_archive(self.cp, storage, instance_id)
                except StorageError as exc:
                    # The backups are gone either way; the next deletion prunes again.
                    LOG.warning("could not prune the log archive of %s: %s", instance_id, exc)
        return NEXT

    def delete_failed(self, ctx: Context, failure: OperationFailed) -> None:
        with transaction(self.cp.session_factory) as session:
            for backup_id in ctx.payload.get("backup_ids", []):
                row = session.get(Backup, backup_id)
                if row is not None and not row.deleted:
                    row.state = BackupState.DELETE_FAILED
                    row.fail_reason = failure.message[:2000]


class RestoreStep:
    """The ``restore`` step of ``create_instance``: does nothing unless the create names a
    backup (``payload["restore"] = {"backup_id"}``), else has the new guest fill its empty data
    directory from the backup's chain, and waits until it has."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    def __call__(self, ctx: Context) -> StepResult:
        spec = ctx.payload.get("restore")
        if not spec:
            return NEXT
        assert ctx.instance_id is not None
        with self.cp.session_factory() as session:
            inst = session.get(Instance, ctx.instance_id)
            if inst is None or inst.deleted or inst.task is not Task.BUILDING:
                raise OperationFailed(f"Instance {ctx.instance_id} is no longer being built.")
            try:
                chain = restore_chain(session, spec["backup_id"])
            except ValidationError as exc:
                raise OperationFailed(f"The backup cannot be restored: {exc.message}") from None
            pitr = None
            if spec.get("restore_time"):
                archive = session.get(InstanceArchive, spec.get("archive_instance_id", ""))
                if archive is None:
                    raise OperationFailed("The source instance's log archive is not recorded.")
                pitr = {
                    "archive": archive_request(self.cp, archive),
                    "restore_time": spec["restore_time"],
                }
                if archive.newest_segment and archive.newest_time:
                    # The window's end as recorded now (never before what the API checked).
                    end = archive.newest_time.replace(tzinfo=UTC).isoformat()
                    pitr["extent"] = {"segment": archive.newest_segment, "time": end}
        guest = self.cp.guest(ctx.instance_id)
        try:
            if not spec.get("started"):
                status = guest.call(
                    "restore",
                    timeout=RESTORE_CALL_TIMEOUT,
                    backups=[self._link(row) for row in chain],
                    storage=storage_spec(self.cp.settings),
                    pitr=pitr,
                )
                spec["started"] = True
            else:
                status = guest.call(
                    "restore_status", timeout=self.cp.settings.default.agent_call_low_timeout
                )
        except RpcTimeout:
            return Wait(1.0)  # the guest may still be starting; the operation's deadline bounds it
        except RemoteError as exc:
            raise OperationFailed(f"The backup could not be restored: {exc.message}") from exc
        state = status.get("state") if isinstance(status, dict) else None
        if state == "done":
            LOG.info("instance %s: restored backup %s", ctx.instance_id, spec["backup_id"])
            return NEXT
        if state == "failed":
            raise OperationFailed(f"The backup could not be restored: {status.get('reason')}")
        if state == "idle":
            spec["started"] = False  # the guest agent restarted: start again
            return Wait(0.2)
        return Wait(0.5)

    def _link(self, row: Backup) -> dict[str, Any]:
        return {
            "backup_id": row.id,
            "storage_key": row.storage_key,
            "backup_key": base64.b64encode(backup_key(self.cp, row.id)).decode(),
            "wrapped_key": row.wrapped_key,
            "checksum": row.checksum,
            "raw_size": row.raw_size,
        }
