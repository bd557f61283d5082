"""Point-in-time restore in the API and the control DB: ``restorePoint.restore_time`` is checked
against the window a backup and its instance's log archive cover before anything is recorded,
and the guests' archive reports only ever move the archive's extent forward."""

from __future__ import annotations

import struct
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select
from test_backup_api import World, world  # noqa: F401 - the fixture

from coffer.db.models import Instance, Operation
from coffer.db.models_archive import InstanceArchive
from coffer.db.models_backups import Backup, BackupState
from coffer.db.session import transaction
from coffer.guest.backup.archive import (
    EXTENT_MARGIN,
    SEGMENT_SIZE,
    Archiver,
    LogSource,
    PointInTime,
    WalPosition,
    nothing_unarchived,
)
from coffer.guest.layout import InstanceLayout
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


# --- an idle PostgreSQL server: is anything past the newest archived WAL file? ------------------

NEWEST = "000000010000000000000006"
NEXT_START = 7 * SEGMENT_SIZE  # where the segment after NEWEST starts: 0/7000000


def _page(timeline: int = 1, address: int = NEXT_START, info: int = 0x0006) -> bytes:
    """A segment's first page header (magic, info, timeline, address, remainder, system id,
    segment size, block size), 40 bytes."""
    return struct.pack("<HHIQI4xQII", 0xD110, info, timeline, address, 0, 7, SEGMENT_SIZE, 8192)


def _record(prev: int, rmgr: int = 8, info: int = 0x10, xid: int = 0, body: int = 26) -> bytes:
    """One WAL record (header and ``body`` bytes), padded to 8 bytes; a standby snapshot by
    default (resource manager 8, RUNNING_XACTS), as the background writer logs on an idle server."""
    data = struct.pack("<IIQBB2xI", 24 + body, xid, prev, info, rmgr, 0) + b"\x01" * body
    return data + b"\0" * (-len(data) % 8)


def _head(*records: bytes, page: bytes | None = None) -> bytes:
    return (page if page is not None else _page()) + b"".join(records)


def _decide(head: bytes, timeline: int = 1, written: int | None = None) -> bool:
    insert = NEXT_START + len(head)
    at = WalPosition(timeline, insert, insert if written is None else written)
    asked: list[tuple[str, int]] = []

    def read(name: str, length: int) -> bytes:
        asked.append((name, length))
        return head[:length]

    decided = nothing_unarchived(NEWEST, at, read)
    assert all(name == "000000010000000000000007" for name, _ in asked)
    return decided


def test_a_wal_switch_leaves_nothing_unarchived() -> None:
    # After pg_switch_wal() the insert position is just past the next segment's page header.
    assert _decide(_page())
    assert nothing_unarchived(NEWEST, WalPosition(1, NEXT_START, NEXT_START), lambda n, k: b"")


def test_standby_snapshots_alone_are_nothing_unarchived() -> None:
    first = _record(prev=NEXT_START - 0x28)
    second = _record(prev=NEXT_START + 40, body=40)  # linked to the first
    assert _decide(_head(first))
    assert _decide(_head(first, second))


def test_any_other_record_is_unarchived_work() -> None:
    snapshot = _record(prev=NEXT_START - 0x28)
    commit = _record(prev=NEXT_START + 40, rmgr=1, info=0x00, xid=736, body=10)  # Transaction
    heap_insert = _record(prev=NEXT_START - 0x28, rmgr=10, info=0x00, xid=737)
    checkpoint = _record(prev=NEXT_START - 0x28, rmgr=0, info=0x10, body=88)  # XLOG
    assert not _decide(_head(snapshot, commit))
    assert not _decide(_head(heap_insert))
    assert not _decide(_head(checkpoint))
    # A snapshot record carrying a transaction id is not one the background writer logs.
    assert not _decide(_head(_record(prev=NEXT_START - 0x28, xid=5)))


def test_what_cannot_be_read_for_sure_is_unarchived_work() -> None:
    snapshot = _record(prev=NEXT_START - 0x28)
    # Not yet written out: the bytes on disk may not be the records.
    assert not _decide(_head(snapshot), written=NEXT_START + 40)
    # Past the first page: not read.
    many = [snapshot] + [_record(prev=NEXT_START + 40 + 56 * i) for i in range(150)]
    assert not _decide(_head(*many))
    # A recycled file (another page address), a record continued from the previous segment, a
    # broken chain of records, a truncated record.
    assert not _decide(_head(snapshot, page=_page(address=NEXT_START - SEGMENT_SIZE)))
    assert not _decide(_head(snapshot, page=_page(info=0x0007)))
    assert not _decide(_head(snapshot, _record(prev=NEXT_START + 8)))
    assert not _decide(_head(snapshot)[:-8])


def test_another_timeline_or_segment_is_unarchived_work() -> None:
    # A server on timeline 2 (promoted after a restore) against an archive of timeline 1.
    assert not _decide(_page(timeline=2), timeline=2)
    # Inserting in a later segment, or behind the archive's newest file.
    later = NEXT_START + SEGMENT_SIZE + 40
    assert not nothing_unarchived(NEWEST, WalPosition(1, later, later), lambda n, k: b"")
    behind = NEXT_START - 100
    assert not nothing_unarchived(NEWEST, WalPosition(1, behind, behind), lambda n, k: b"")


class _IdleSource(LogSource):
    """A log source whose engine says it is idle up to ``idle_until`` (None: busy)."""

    def __init__(self, spool: Path) -> None:
        self.spool = spool
        self.idle_until: datetime | None = None
        self.asked = 0

    def enable(self) -> None:
        self.spool.mkdir(exist_ok=True)

    def pending(self) -> list[Path]:
        return sorted(self.spool.iterdir())

    def uploaded(self, path: Path) -> None:
        path.unlink()

    def covered_until(self, extent: dict[str, Any]) -> datetime | None:
        self.asked += 1
        return self.idle_until

    def extent_of(self, name: str, written: datetime) -> dict[str, Any] | None:
        return {"segment": name, "lsn": None, "time": written.isoformat()}


def test_the_idle_extent_moves_forward_at_most_every_idle_check(tmp_path: Path) -> None:
    source = _IdleSource(tmp_path / "spool")
    source.enable()
    (tmp_path / "instance").mkdir()
    reports: list[dict[str, Any]] = []
    archiver = Archiver(
        InstanceLayout(tmp_path / "instance"), source, reports.append, _no_storage, idle_every=60
    )
    archived = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    first = {"segment": NEWEST, "lsn": "0/7000000", "time": archived.isoformat()}
    archiver._extent = dict(first)

    # Busy: the extent stays.
    archiver._ask_idle(300)
    assert source.asked == 1 and archiver.extent() == first and reports == []
    # Idle, but asked again only after idle_every seconds, or the archive timeout if shorter.
    source.idle_until = archived + timedelta(minutes=5)
    archiver._ask_idle(300)
    archiver._idle_asked -= 20
    archiver._ask_idle(30)
    assert source.asked == 1 and archiver.extent() == first
    archiver._ask_idle(20)
    assert source.asked == 2
    moved = archiver.extent()
    assert moved is not None and moved["segment"] == NEWEST
    assert datetime.fromisoformat(moved["time"]) == source.idle_until - EXTENT_MARGIN
    assert reports == [moved]
    # Never backwards.
    source.idle_until = archived + timedelta(minutes=1)
    archiver._idle_asked -= 60
    archiver._ask_idle(300)
    assert source.asked == 3 and archiver.extent() == moved and len(reports) == 1
    # Not asked while a file waits for upload.
    (source.spool / "000000010000000000000007").write_bytes(b"wal")
    source.idle_until = archived + timedelta(minutes=9)
    archiver._idle_asked -= 60
    archiver._ask_idle(300)
    assert source.asked == 3 and archiver.extent() == moved
    # A newer file archived between the question and the answer: the answer is about the
    # older one, so it moves nothing.
    (source.spool / "000000010000000000000007").unlink()
    archiver._idle_extent(archived + timedelta(minutes=9), 0, "000000010000000000000005")
    assert archiver.extent() == moved and len(reports) == 1


def _no_storage(spec: dict[str, Any]) -> Any:
    raise AssertionError("nothing is uploaded in these tests")


def test_a_time_in_the_idle_extent_is_covered_only_through_its_newest_file() -> None:
    covered = datetime(2024, 5, 1, 13, 0, tzinfo=UTC)
    reader: Any = None

    def point(when: datetime, newest: str | None = NEWEST) -> PointInTime:
        return PointInTime(reader, when, newest, covered if newest else None)

    assert point(covered).idle_covers(NEWEST)
    assert point(covered - timedelta(minutes=30)).idle_covers(NEWEST)
    assert not point(covered + timedelta(seconds=1)).idle_covers(NEWEST)  # past the extent
    assert not point(covered).idle_covers("000000010000000000000005")  # stopped short of it
    assert not point(covered).idle_covers("")  # nothing fetched
    assert not point(covered, newest=None).idle_covers(NEWEST)  # no extent sent
