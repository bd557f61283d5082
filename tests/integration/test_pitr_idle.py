"""An idle PostgreSQL instance's point-in-time window reaches the present, on real servers.

A source writes, its WAL is archived, then it idles: with no new WAL file the archiver asks the
server where its WAL ends, and the extent moves to (nearly) now even though the background
writer leaves a standby snapshot record past the archived WAL. A restore to a time in the idle
period lands on the last commit and holds every row; a commit that is not archived yet holds the
extent back until its WAL file is archived.

The first test drives the guest's ``BackupWorker`` and archiver directly with the ``file``
storage driver, as ``test_pitr_postgresql.py`` does; the second goes through the Trove API of a
real ``coffer up`` (the extent reported through the conductor, checked by the API, and handed
to the restoring guest by the taskmanager).
"""

from __future__ import annotations

import secrets
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from coffer_harness import Coffer, TenantApi
from pitr_fixtures import Source, admin, commit_at, instances, make_source, read, restore, write
from test_pitr_api import _back_up, _body, _commit, _connect, _my_run, _ready, _rows
from test_pitr_api import coffer_fast_archive as coffer_fast_archive  # the fixture

from coffer.guest.backup.archive import SEGMENT_SIZE, ArchiveTarget, parse_lsn

pytestmark = pytest.mark.integration

#: How often the test's archiver asks an idle server (the default is 30 s).
IDLE_EVERY = 2.0


@pytest.fixture
def storage_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="coffer-pitr-idle-store-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _extent(source: Source) -> dict[str, Any]:
    extent = source.worker.archiver.extent()
    assert extent is not None
    return extent


def _time(extent: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(str(extent["time"]))


def _pitr(source: Source, when: datetime, extent: dict[str, Any] | None) -> dict[str, Any]:
    pitr: dict[str, Any] = {"archive": source.target.to_request(), "restore_time": when.isoformat()}
    if extent is not None:
        pitr["extent"] = {"segment": extent["segment"], "time": extent["time"]}
    return pitr


def _insert_offset(source: Source) -> int:
    """How far into its current WAL segment the server's insert position is."""
    with admin(source.datastore) as conn:
        row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    assert row is not None
    return parse_lsn(str(row[0])) % SEGMENT_SIZE


def _wait_idle_extent(source: Source, past: datetime, timeout: float = 150) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while _time(_extent(source)) < past:
        assert time.monotonic() < deadline, f"the extent never passed {past}: {_extent(source)}"
        time.sleep(0.5)
    return _extent(source)


def test_an_idle_window_reaches_the_present(engine_user: str, storage_dir: Path) -> None:
    storage = {"driver": "file", "file_directory": str(storage_dir)}
    with instances(engine_user) as made:
        source = make_source(made, storage)
        source.worker.archiver.idle_every = IDLE_EVERY
        source.worker.archiver.interval = 1.0
        write(source.datastore, [("INSERT INTO items VALUES (%s, %s)", (0, "before-backup"))])
        source.backup("b-full")
        last = commit_at(source.datastore, 1, "row-1")
        source.archive_covers(last)
        archived = _extent(source)

        # Idle. The background writer logs a standby snapshot after the last WAL switch, so the
        # insert position leaves the next segment's page header although nothing is committed.
        deadline = time.monotonic() + 60
        while _insert_offset(source) <= 40:
            assert time.monotonic() < deadline, "no standby snapshot was logged"
            time.sleep(0.5)
        snapshot_seen = datetime.now(UTC)
        idle = _wait_idle_extent(source, snapshot_seen + timedelta(seconds=1))
        # The extent reaches nearly now, by the idle path (the same newest file, a later time),
        # and it was reported.
        assert _time(idle) > datetime.now(UTC) - timedelta(seconds=IDLE_EVERY + 5)
        assert _time(idle) > _time(archived) + timedelta(seconds=1)
        # The archiver sets its extent, then reports it: give the report a moment to arrive.
        reported_by = time.monotonic() + 5
        while idle not in source.extents and time.monotonic() < reported_by:
            time.sleep(0.05)
        assert idle in source.extents
        assert any(
            a["segment"] == b["segment"] and _time(a) < _time(b)
            for a, b in zip(source.extents, source.extents[1:], strict=False)
        ), source.extents

        def expected(upto: int) -> list[tuple[int, str]]:
            return [(0, "before-backup")] + [(i, f"row-{i}") for i in range(1, upto + 1)]

        # A time in the idle period, after the newest archived file was last written: the
        # restore lands on the last commit and holds every row.
        when = _time(idle)
        restored, status = restore(
            made, "r-idle", [source.link("b-full")], storage, _pitr(source, when, idle)
        )
        assert status["state"] == "done", status
        restored.prepare([], [])
        assert read(restored) == expected(1)

        # The restored server was promoted to a new timeline: its own archive, once a backup
        # enables it, reaches the present too when it idles.
        extents: list[dict[str, Any]] = []
        second = Source(
            restored,
            made.worker(restored, extents),
            storage,
            ArchiveTarget(
                "restored-1", storage, "demo/archive/restored-1", secrets.token_bytes(32)
            ),
            extents,
        )
        second.worker.archiver.idle_every = IDLE_EVERY
        second.worker.archiver.interval = 1.0
        second.backup("b-restored")
        second.archive_covers(commit_at(restored, 10, "row-10"))
        promoted = _wait_idle_extent(second, datetime.now(UTC) + timedelta(seconds=2))
        assert int(promoted["segment"][:8], 16) > int(idle["segment"][:8], 16), promoted

        # Past the extent, or without the extent to check against: refused, nothing installed.
        for name, point in (
            ("r-late", _pitr(source, when + timedelta(minutes=5), idle)),
            ("r-blind", _pitr(source, when, None)),
        ):
            refused, status = restore(made, name, [source.link("b-full")], storage, point)
            assert status["state"] == "failed", status
            assert "does not reach the requested time" in status["reason"], status
            assert not refused.is_initialized()

        # A write, its WAL file closed, then a commit in a fresh file that archive_timeout (60 s)
        # does not close for a while: the extent stays before that commit...
        write(source.datastore, [("INSERT INTO items VALUES (%s, %s)", (2, "row-2"))])
        with admin(source.datastore) as conn:
            conn.execute("SELECT pg_switch_wal()")
        held = commit_at(source.datastore, 3, "row-3")
        with admin(source.datastore) as conn:
            row = conn.execute("SELECT pg_walfile_name(pg_current_wal_insert_lsn())").fetchone()
        assert row is not None
        holding = str(row[0])  # the WAL file the commit is in
        asked = source.worker.archiver._idle_asked
        watch = time.monotonic() + 4 * IDLE_EVERY + 2
        while time.monotonic() < watch:
            extent = _extent(source)
            assert extent["segment"] < holding, "the commit's WAL file was closed meanwhile"
            assert _time(extent) < held, (extent, held)
            time.sleep(0.2)
        assert source.worker.archiver._idle_asked > asked  # the server was asked meanwhile
        assert all(_time(e) < held for e in source.extents if e["segment"] < holding)
        # ...until that file is archived; then the window reaches the present again.
        source.archive_covers(held)
        after_write = _wait_idle_extent(source, datetime.now(UTC) + timedelta(seconds=2))
        restored, status = restore(
            made,
            "r-after",
            [source.link("b-full")],
            storage,
            _pitr(source, _time(after_write), after_write),
        )
        assert status["state"] == "done", status
        restored.prepare([], [])
        assert read(restored) == expected(3)


def _archive_row(coffer: Coffer, instance_id: str) -> tuple[str | None, datetime | None]:
    with sqlite3.connect(coffer.state_dir / "coffer.db") as conn:
        row = conn.execute(
            "SELECT newest_segment, newest_time FROM instance_archives WHERE instance_id = ?",
            (instance_id,),
        ).fetchone()
    if not row or not row[1]:
        return None, None
    return row[0], datetime.fromisoformat(row[1])


def _idle_extent_time(coffer: Coffer, instance_id: str) -> datetime:
    """Wait until the archive's newest file stays the same while its extent moves 10 s on."""
    deadline = time.monotonic() + 180
    first: tuple[str | None, datetime | None] = (None, None)
    while True:
        segment, when = _archive_row(coffer, instance_id)
        if segment is not None and when is not None:
            if segment != first[0]:
                first = (segment, when)
            elif first[1] is not None and when >= first[1] + timedelta(seconds=10):
                assert when > datetime.now(UTC).replace(tzinfo=None) - timedelta(seconds=15)
                return when
        assert time.monotonic() < deadline, f"the extent never moved while idle: {first}"
        time.sleep(1)


def test_restore_to_an_idle_time_through_the_api(coffer_fast_archive: Coffer) -> None:
    """``coffer up`` with a 5 s archive timeout: the idle extent moves within seconds, and a
    restore to it holds every commit (PostgreSQL, then MariaDB)."""
    coffer = coffer_fast_archive
    api = TenantApi(coffer)
    made: list[str] = []
    try:
        source = _ready(api, _body("idle-src"))
        made.append(source["id"])
        with _connect(source) as conn:
            conn.execute("CREATE TABLE items (id INT PRIMARY KEY, v TEXT)")
        _commit(source, 0)
        full = _back_up(api, source["id"], "full")
        _commit(source, 1)
        when = _idle_extent_time(coffer, source["id"])
        point = {"backupRef": full["id"], "restore_time": when.isoformat() + "Z"}
        body = _body("idle-pitr", restorePoint=point)
        del body["datastore"], body["users"], body["databases"]
        restored = _ready(api, body)
        made.append(restored["id"])
        assert _rows(restored) == [0, 1]

        my_source = _ready(api, _body("idle-my-src", datastore={"type": "mariadb"}))
        made.append(my_source["id"])
        _my_run(my_source, "CREATE TABLE items (id INT PRIMARY KEY, v TEXT) ENGINE=InnoDB")
        _my_run(my_source, "INSERT INTO items VALUES (0, 'row-0')")
        my_full = _back_up(api, my_source["id"], "my-full")
        _my_run(my_source, "INSERT INTO items VALUES (1, 'row-1')")
        when = _idle_extent_time(coffer, my_source["id"])
        point = {"backupRef": my_full["id"], "restore_time": when.isoformat() + "Z"}
        body = _body("idle-my-pitr", restorePoint=point)
        del body["datastore"], body["users"], body["databases"]
        my_restored = _ready(api, body)
        made.append(my_restored["id"])
        assert [int(r[0]) for r in _my_run(my_restored, "SELECT id FROM items ORDER BY id")] == [
            0,
            1,
        ]
    finally:
        for instance_id in made:
            api.request("DELETE", f"/instances/{instance_id}")
