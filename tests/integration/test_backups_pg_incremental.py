"""PostgreSQL incremental backups on real servers: rows, a full backup, more rows, an incremental
backup (the WAL since the full one, read back from the archive), more rows; each backup restored
into a new instance holds exactly the rows of its moment, checked row by row over psycopg.

Drives the guest's ``BackupWorker`` and archiver directly, with the ``file`` storage driver.
"""

from __future__ import annotations

import base64
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from pitr_fixtures import instances, make_source, read, restore, write

from coffer.guest.backup.archive import SEGMENT, ArchiveReader
from coffer.guest.backup.worker import open_storage

pytestmark = pytest.mark.integration


@pytest.fixture
def storage_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="coffer-pitr-store-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_full_then_incremental_restore_exactly_their_moments(
    engine_user: str, storage_dir: Path
) -> None:
    storage = {"driver": "file", "file_directory": str(storage_dir)}
    with instances(engine_user) as made:
        source = make_source(made, storage)
        write(
            source.datastore,
            [("INSERT INTO items VALUES (%s, %s)", (i, f"first-{i}")) for i in range(1, 6)],
        )
        first_rows = read(source.datastore)
        full = source.backup("b-full")
        assert full["engine_position"]["backup_type"] == "full"
        assert SEGMENT.fullmatch(full["engine_position"]["start_wal_file"])

        write(
            source.datastore,
            [
                ("INSERT INTO items VALUES (%s, %s)", (6, "second-6")),
                ("UPDATE items SET v = %s WHERE id = %s", ("changed-2", 2)),
                ("DELETE FROM items WHERE id = %s", (3,)),
            ],
        )
        second_rows = read(source.datastore)
        incremental = source.backup("b-incr", parent="b-full")
        position = incremental["engine_position"]
        assert position["backup_type"] == "incremental"
        assert position["wal_from"] == full["engine_position"]["start_wal_file"]
        assert "/" in position["end_lsn"]
        # Only WAL since the full backup: far smaller than the full backup.
        assert incremental["raw_size"] < full["raw_size"]

        write(
            source.datastore,
            [("INSERT INTO items VALUES (%s, %s)", (7, "third-7")), ("DELETE FROM items", ())],
        )
        write(source.datastore, [("INSERT INTO items VALUES (%s, %s)", (8, "third-8"))])
        third_rows = read(source.datastore)
        second = source.backup("b-incr-2", parent="b-incr")
        assert second["engine_position"]["wal_from"] > position["wal_to"]

        # The archive holds the WAL sealed: nothing readable in the store, and the extent was
        # reported to the "conductor".
        with open_storage(storage) as store:
            reader = ArchiveReader(store, source.target)
            names = reader.names()
            assert position["wal_to"] in names
            raw = b"".join(store.get_stream(source.target.object_key(names[0])))
            assert b"second-6" not in raw
        assert source.extents and SEGMENT.fullmatch(source.extents[-1]["segment"])
        assert base64.b64encode(source.target.key).decode() not in repr(source.extents)

        restored, status = restore(made, "r-full", [source.link("b-full")], storage)
        assert status["state"] == "done", status
        restored.prepare([], [])
        assert read(restored) == first_rows

        chain = [source.link("b-full"), source.link("b-incr")]
        restored, status = restore(made, "r-incr", chain, storage)
        assert status["state"] == "done", status
        restored.prepare([], [])
        assert read(restored) == second_rows

        chain.append(source.link("b-incr-2"))
        restored, status = restore(made, "r-incr-2", chain, storage)
        assert status["state"] == "done", status
        restored.prepare([], [])
        assert read(restored) == third_rows == [(8, "third-8")]
        # The restored server is a normal primary: it takes writes.
        write(restored, [("INSERT INTO items VALUES (%s, %s)", (9, "after-restore"))])
        assert read(restored)[-1] == (9, "after-restore")
