"""MariaDB point-in-time restore from the binary log, on real servers: commits more than a second
apart at known server times, a full and an incremental mariabackup, the archiver uploading the
closed binary logs (rotated with FLUSH BINARY LOGS when the current one grew), and restores to a
time between two commits holding exactly the commits before the start of that second.

Drives the guest's ``BackupWorker`` and archiver directly with the ``file`` storage driver.
"""

from __future__ import annotations

import base64
import contextlib
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import mariadb_fixtures
import pytest
from pitr_fixtures import wait_for

from coffer.guest.backup.archive import BINLOG, ArchiveReader, ArchiveTarget
from coffer.guest.backup.worker import BackupWorker, open_storage
from coffer.guest.datastores.mariadb import MariaDBDatastore

pytestmark = pytest.mark.integration


class Made:
    def __init__(self, run_as: str) -> None:
        self.run_as = run_as
        self.base = Path(tempfile.mkdtemp(prefix="coffer-pitr-my-", dir="/tmp"))
        self.base.chmod(0o711)
        self.datastores: list[MariaDBDatastore] = []
        self.workers: list[BackupWorker] = []

    def new(self, name: str) -> tuple[MariaDBDatastore, BackupWorker]:
        address = mariadb_fixtures.free_loopback_address("127.34.5")
        spec = mariadb_fixtures.make_spec(self.base / name, [address], self.run_as)
        datastore = MariaDBDatastore(spec)
        state = datastore.layout.root / "state"
        state.mkdir(parents=True)
        worker = BackupWorker(
            lambda: datastore,
            state,
            lambda backup_id, fields: None,
            prepared=datastore.is_initialized,
            archive_report=self.extents.append,
        )
        self.datastores.append(datastore)
        self.workers.append(worker)
        return datastore, worker

    extents: list[dict[str, Any]] = []

    def close(self) -> None:
        try:
            for worker in self.workers:
                worker.stop_archiving()
            for datastore in self.datastores:
                with contextlib.suppress(Exception):
                    datastore.stop(timeout=20)
                mariadb_fixtures.kill_engines(f"--defaults-file={datastore.config_file}")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def made(engine_user: str) -> Iterator[Made]:
    made = Made(engine_user)
    made.extents = []
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def storage_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="coffer-pitr-store-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _run(datastore: MariaDBDatastore, sql: str, args: tuple[Any, ...] = ()) -> Any:
    conn = mariadb_fixtures.admin_connection(datastore)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()
    finally:
        conn.close()


def _commit(datastore: MariaDBDatastore, row_id: int) -> datetime:
    """One row in its own transaction; the server's clock (UTC) just after it committed."""
    _run(datastore, "INSERT INTO shop.items VALUES (%s, %s)", (row_id, f"row-{row_id}"))
    ((now,),) = _run(datastore, "SELECT UTC_TIMESTAMP(6)")
    assert isinstance(now, datetime)
    return now


def _rows(datastore: MariaDBDatastore) -> list[int]:
    return [int(r[0]) for r in _run(datastore, "SELECT id FROM shop.items ORDER BY id")]


def _second_after(when: datetime) -> datetime:
    """The start of the second after ``when``: binary log times are whole seconds."""
    return when.replace(microsecond=0) + timedelta(seconds=1)


def test_binlog_replay_lands_on_the_last_commit_before_the_second(
    made: Made, storage_dir: Path
) -> None:
    storage = {"driver": "file", "file_directory": str(storage_dir)}
    source, worker = made.new("source")
    source.prepare([], [])
    _run(source, "CREATE DATABASE shop")
    _run(source, "CREATE TABLE shop.items (id INT PRIMARY KEY, v TEXT) ENGINE=InnoDB")
    _commit(source, 0)
    target = ArchiveTarget("source-1", storage, "demo/archive/source-1", secrets.token_bytes(32), 3)
    keys: dict[str, bytes] = {}
    results: dict[str, dict[str, Any]] = {}

    def back_up(backup_id: str, parent: str | None = None) -> dict[str, Any]:
        keys[backup_id] = secrets.token_bytes(32)
        worker.start_backup(
            backup_id,
            storage,
            f"demo/{backup_id}",
            base64.b64encode(keys[backup_id]).decode(),
            parent=results[parent]["engine_position"] if parent else None,
            archive=target.to_request(),
        )
        result: dict[str, Any] = wait_for(
            lambda: worker.backup_status(backup_id), {"completed", "failed"}
        )
        assert result["state"] == "completed", result
        results[backup_id] = result
        return result

    def link(backup_id: str) -> dict[str, Any]:
        return {
            "backup_id": backup_id,
            "storage_key": f"demo/{backup_id}",
            "backup_key": base64.b64encode(keys[backup_id]).decode(),
            "wrapped_key": results[backup_id]["wrapped_key"],
            "checksum": results[backup_id]["checksum"],
        }

    full = back_up("b-full")
    assert BINLOG.fullmatch(full["engine_position"].get("binlog_file", "")), full["engine_position"]
    assert full["engine_position"]["binlog_position"] > 0
    after: dict[int, datetime] = {}
    for i in range(1, 4):
        after[i] = _commit(source, i)
        time.sleep(1.5)
    back_up("b-incr", parent="b-full")
    for i in range(4, 6):
        after[i] = _commit(source, i)
        time.sleep(1.5)

    # The archiver rotates the grown binary log within its timeout and uploads the closed files;
    # the extent reaches past the last commit.
    deadline = time.monotonic() + 120
    while True:
        extent = worker.archiver.extent()
        if extent is not None and datetime.fromisoformat(extent["time"]).replace(
            tzinfo=None
        ) >= _second_after(after[5]):
            break
        assert time.monotonic() < deadline, f"the binary log archive never caught up: {extent}"
        time.sleep(0.5)
    assert made.extents and BINLOG.fullmatch(made.extents[-1]["segment"])
    with open_storage(storage) as store:
        names = ArchiveReader(store, target).names()
        assert full["engine_position"]["binlog_file"] in names
        raw = b"".join(store.get_stream(target.object_key(names[0])))
        assert b"row-1" not in raw
    # Archived files are purged from the server (right after their batch is uploaded).
    deadline = time.monotonic() + 30
    while full["engine_position"]["binlog_file"] in [
        p.name for p in (source.layout.root / "binlog").iterdir()
    ]:
        assert time.monotonic() < deadline, "the archived binary log was never purged"
        time.sleep(0.2)

    def restore(name: str, chain: list[str], when: datetime) -> MariaDBDatastore:
        restored, restored_worker = made.new(name)
        pitr = {"archive": target.to_request(), "restore_time": when.isoformat() + "Z"}
        restored_worker.start_restore([link(b) for b in chain], storage, pitr)
        status = wait_for(restored_worker.restore_status, {"done", "failed"}, timeout=300)
        assert status["state"] == "done", status
        restored.prepare([], [])
        return restored

    # Between commits 2 and 3 from the full backup; between 4 and 5 from the incremental.
    assert _rows(restore("r-2", ["b-full"], _second_after(after[2]))) == [0, 1, 2]
    assert _rows(restore("r-4", ["b-full", "b-incr"], _second_after(after[4]))) == [0, 1, 2, 3, 4]

    # Beyond the archive: refused, nothing installed.
    late, late_worker = made.new("r-late")
    pitr = {"archive": target.to_request(), "restore_time": "2999-01-01T00:00:00"}
    late_worker.start_restore([link("b-full")], storage, pitr)
    status = wait_for(late_worker.restore_status, {"done", "failed"}, timeout=300)
    assert status["state"] == "failed"
    assert "does not reach the requested time" in status["reason"], status
    assert not late.is_initialized()
