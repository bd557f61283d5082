"""Point-in-time restore in the API and the control DB: ``restorePoint.restore_time`` is checked
against the window a backup and its instance's log archive cover before anything is recorded,
and the guests' archive reports only ever move the archive's extent forward."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from test_backup_api import World, world  # noqa: F401 - the fixture

from coffer.db.models import Instance, Operation
from coffer.db.models_archive import InstanceArchive
from coffer.db.models_backups import Backup, BackupState
from coffer.db.session import transaction
from coffer.storage.file import FileStorage
from coffer.taskmanager.backups import apply_archive_report, archive_prefix, prune_archive

T0 = datetime(2024, 5, 1, 12, 0, 0)


def _pg_backup_with_archive(w: World, extent: datetime | None) -> str:
    backup = w.add_backup("pg", BackupState.COMPLETED)
    w.store(backup)
    with transaction(w.cp.session_factory) as session:
        row = session.get(Backup, backup)
        assert row is not None and row.instance_id is not None
        row.completed = T0
        session.add(
            InstanceArchive(
                instance_id=row.instance_id,
                tenant_id=row.tenant_id,
                storage_driver="file",
                prefix=archive_prefix(row.tenant_id, row.instance_id),
                newest_segment="000000010000000000000009" if extent else None,
                newest_time=extent,
            )
        )
    return backup


def _restore_at(w: World, backup: str, when: Any) -> Any:
    body = {
        "name": "pitr",
        "flavorRef": "6",
        "volume": {"size": 2},
        "restorePoint": {"backupRef": backup, "restore_time": when},
    }
    return w.request("POST", "demo", "/instances", json={"instance": body})


def test_a_time_inside_the_window_is_recorded_for_the_restore(world: World) -> None:  # noqa: F811
    backup = _pg_backup_with_archive(world, T0 + timedelta(hours=1))
    resp = _restore_at(world, backup, "2024-05-01T14:30:00+02:00")  # 12:30 UTC
    assert resp.status_code == 200, resp.text
    instance = resp.json()["instance"]
    with world.cp.session_factory() as session:
        op = session.scalars(select(Operation).where(Operation.instance_id == instance["id"])).one()
        source = session.get(Backup, backup)
        assert source is not None
    assert op.payload["restore"] == {
        "backup_id": backup,
        "restore_time": "2024-05-01T12:30:00+00:00",
        "archive_instance_id": source.instance_id,
    }


def test_times_outside_the_window_change_nothing(world: World) -> None:  # noqa: F811
    backup = _pg_backup_with_archive(world, T0 + timedelta(hours=1))
    before = world.counts()
    for when in ("2024-05-01T11:59:59", "2024-05-01T13:00:01Z", "2024-05-01 13:00:00.5"):
        resp = _restore_at(world, backup, when)
        assert resp.status_code == 400, resp.text
        message = world.fault(resp)["message"]
        assert "outside the window" in message
        assert "2024-05-01T12:00:00Z" in message and "2024-05-01T13:00:00Z" in message
    assert world.counts() == before


def test_no_archive_yet_is_refused(world: World) -> None:  # noqa: F811
    backup = _pg_backup_with_archive(world, None)
    before = world.counts()
    resp = _restore_at(world, backup, "2024-05-01T12:00:00")
    assert resp.status_code == 400
    assert "log archive" in world.fault(resp)["message"]
    assert world.counts() == before


def test_archive_reports_only_move_forward(world: World) -> None:  # noqa: F811
    _pg_backup_with_archive(world, None)
    with world.cp.session_factory() as session:
        (row,) = session.scalars(select(InstanceArchive)).all()
        instance_id = row.instance_id

    def report(segment: str, when: str) -> bool:
        with transaction(world.cp.session_factory) as session:
            return apply_archive_report(session, instance_id, segment, "0/A000000", when)

    assert report("000000010000000000000009", "2024-05-01T12:10:00+00:00")
    assert not report("000000010000000000000008", "2024-05-01T12:20:00+00:00")  # older
    assert not report("not-a-segment", "2024-05-01T12:20:00+00:00")
    assert not report("00000001000000000000000A", "whenever")
    with transaction(world.cp.session_factory) as session:
        assert not apply_archive_report(session, "unknown", "00000001000000000000000A", None, "x")
    assert report("00000001000000000000000A", "2024-05-01T14:20:00+02:00")
    with world.cp.session_factory() as session:
        row = session.get(InstanceArchive, instance_id)
        assert row is not None
        assert row.newest_segment == "00000001000000000000000A"
        assert row.newest_time == datetime(2024, 5, 1, 12, 20)
        assert row.newest_lsn == "0/A000000"


def test_pruning_keeps_the_log_the_oldest_full_backup_needs(world: World) -> None:  # noqa: F811
    first = _pg_backup_with_archive(world, T0)
    second = world.add_backup("pg", BackupState.COMPLETED)
    with transaction(world.cp.session_factory) as session:
        for backup_id, start in (
            (first, "000000010000000000000003"),
            (second, "000000010000000000000006"),
        ):
            row = session.get(Backup, backup_id)
            assert row is not None
            row.engine_position = {"start_wal_file": start}
        (archive,) = session.scalars(select(InstanceArchive)).all()
        instance_id, prefix = archive.instance_id, archive.prefix
    storage = FileStorage(world.cp.settings.state_dir / "backups")
    names = [f"0000000100000000000000{n:02X}" for n in range(1, 9)] + ["00000002.history"]
    for name in names:
        storage.put_stream(f"{prefix}/{name}", [b"sealed"])

    def left() -> list[str]:
        return [o.key.rsplit("/", 1)[1] for o in storage.list(prefix + "/")]

    # Both backups remain: only what precedes the first one's start goes.
    assert prune_archive(world.cp, storage, instance_id) == 2
    assert sorted(left()) == sorted(names[2:])
    # The first is deleted: the second's start is the new floor.
    with transaction(world.cp.session_factory) as session:
        row = session.get(Backup, first)
        assert row is not None
        row.deleted = True
    assert prune_archive(world.cp, storage, instance_id) == 3
    assert sorted(left()) == sorted(names[5:])
    # No backup remains and the instance is gone: everything goes, the record too.
    with transaction(world.cp.session_factory) as session:
        row = session.get(Backup, second)
        inst = session.get(Instance, instance_id)
        assert row is not None and inst is not None
        row.deleted = True
        inst.deleted = True
    assert prune_archive(world.cp, storage, instance_id) == 4
    assert left() == []
    with world.cp.session_factory() as session:
        assert session.get(InstanceArchive, instance_id) is None
