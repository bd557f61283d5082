"""PostgreSQL point-in-time restore on real servers: commits at known server times, then restores
to a time between two commits hold exactly the commits before it, none after; also from an
incremental chain, past the last commit, and refusals for times the archive does not reach and
for a damaged archived WAL file.

Drives the guest's ``BackupWorker`` and archiver directly with the ``file`` storage driver; the
API's checks of ``restore_time`` are in ``test_pitr_api.py``.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pitr_fixtures import Source, commit_at, instances, make_source, read, restore, write

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


def _pitr(source: Source, when: Any) -> dict[str, Any]:
    return {"archive": source.target.to_request(), "restore_time": when.isoformat()}


def test_restore_lands_on_the_last_commit_before_the_time(
    engine_user: str, storage_dir: Path
) -> None:
    storage = {"driver": "file", "file_directory": str(storage_dir)}
    with instances(engine_user) as made:
        source = make_source(made, storage)
        write(source.datastore, [("INSERT INTO items VALUES (%s, %s)", (0, "before-backup"))])
        source.backup("b-full")
        # Each commit in its own transaction; the server's clock read just after each one is a
        # time after that commit and before the next.
        after: dict[int, Any] = {}
        for i in range(1, 4):
            after[i] = commit_at(source.datastore, i, f"row-{i}")
            time.sleep(0.3)
        source.backup("b-incr", parent="b-full")
        for i in range(4, 7):
            after[i] = commit_at(source.datastore, i, f"row-{i}")
            time.sleep(0.3)
        time.sleep(1.2)  # the extent is a second behind the last archived write
        source.archive_covers(after[6])

        def expected(upto: int) -> list[tuple[int, str]]:
            return [(0, "before-backup")] + [(i, f"row-{i}") for i in range(1, upto + 1)]

        # From the full backup, to a time between commits 2 and 3.
        restored, status = restore(
            made, "r-2", [source.link("b-full")], storage, _pitr(source, after[2])
        )
        assert status["state"] == "done", status
        restored.prepare([], [])
        assert read(restored) == expected(2)

        # From the incremental chain, to a time between commits 4 and 5.
        chain = [source.link("b-full"), source.link("b-incr")]
        restored, status = restore(made, "r-4", chain, storage, _pitr(source, after[4]))
        assert status["state"] == "done", status
        restored.prepare([], [])
        assert read(restored) == expected(4)

        # After the last commit (nothing committed between it and the target): all of them.
        restored, status = restore(
            made, "r-6", [source.link("b-full")], storage, _pitr(source, after[6])
        )
        assert status["state"] == "done", status
        restored.prepare([], [])
        assert read(restored) == expected(6)

        # Beyond the archive: refused, nothing installed.
        far = after[6] + timedelta(hours=1)
        refused, status = restore(
            made, "r-late", [source.link("b-full")], storage, _pitr(source, far)
        )
        assert status["state"] == "failed"
        assert "does not reach the requested time" in status["reason"], status
        assert not refused.is_initialized()

        # One flipped bit in an archived WAL file the restore needs: refused.
        with open_storage(storage) as store:
            reader = ArchiveReader(store, source.target)
            names = [n for n in reader.names() if SEGMENT.fullmatch(n)]
            key = source.target.object_key(names[-1])
            meta = store.stat(key)
            assert meta is not None
            data = bytearray(b"".join(store.get_stream(key)))
            data[len(data) // 2] ^= 0x01
            store.put_stream(key, [bytes(data)], meta.metadata)
        refused, status = restore(
            made, "r-bad", [source.link("b-full")], storage, _pitr(source, after[6])
        )
        assert status["state"] == "failed"
        assert "tampered or corrupted" in status["reason"], status
        assert not refused.is_initialized()
