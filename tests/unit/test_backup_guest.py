"""The guest side of backups without an engine: what the handlers read from the tools' own
metadata, and how the worker validates requests and answers after an agent restart."""

from __future__ import annotations

import base64
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from coffer.errors import EngineError, NotImplementedByDatastore, ValidationError
from coffer.guest.backup import backups_of, handler_class, supports_incremental
from coffer.guest.backup.base import BackupSource
from coffer.guest.backup.mariadb import MariaDBBackup
from coffer.guest.backup.postgresql import _LabelTap, parse_backup_label
from coffer.guest.backup.worker import BackupWorker, check_id, decode_key
from coffer.guest.datastores.base import EngineSpec
from coffer.guest.datastores.mariadb import MariaDBDatastore
from coffer.guest.layout import InstanceLayout

LABEL = (
    "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n"
    "CHECKPOINT LOCATION: 0/2000060\n"
    "BACKUP METHOD: streamed\n"
    "BACKUP FROM: primary\n"
    "START TIME: 2026-11-22 01:21:05 UTC\n"
    "LABEL: coffer backup b-1\n"
    "START TIMELINE: 1\n"
)


def test_the_backup_label_gives_the_position() -> None:
    assert parse_backup_label(LABEL) == {
        "start_wal_location": "0/2000028",
        "start_wal_file": "000000010000000000000002",
        "checkpoint_location": "0/2000060",
        "start_time": "2026-11-22 01:21:05 UTC",
        "timeline": "1",
    }
    assert parse_backup_label("") == {}


def _tar(first: str, content: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in ((first, content), ("PG_VERSION", b"15\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.mark.parametrize("piece", [1, 7, 512, 100_000])
def test_the_label_is_read_as_the_stream_passes(piece: int) -> None:
    stream = _tar("backup_label", LABEL.encode())
    tap = _LabelTap()
    for start in range(0, len(stream), piece):
        tap.feed(stream[start : start + piece])
    assert tap.done and tap.label == LABEL


def test_a_stream_not_starting_with_the_label_gives_no_position() -> None:
    tap = _LabelTap()
    tap.feed(_tar("global/1262", b"x" * 100))
    assert tap.done and tap.label == ""


def test_mariabackup_checkpoints_give_the_lsns(tmp_path: Path) -> None:
    (tmp_path / "xtrabackup_checkpoints").write_text(
        "backup_type = full-backuped\nfrom_lsn = 0\nto_lsn = 44744\nlast_lsn = 44760\n"
    )
    (tmp_path / "xtrabackup_info").write_text("binlog_pos = filename 'b.000001', gtid '0-1-9'\n")
    assert MariaDBBackup._position(tmp_path) == {
        "from_lsn": "0",
        "to_lsn": "44744",
        "last_lsn": "44760",
        "backup_type": "full-backuped",
        "binlog_pos": "filename 'b.000001', gtid '0-1-9'",
    }
    (tmp_path / "xtrabackup_checkpoints").write_text("backup_type = full-backuped\n")
    with pytest.raises(EngineError, match="recorded no LSNs"):
        MariaDBBackup._position(tmp_path)


def test_handlers_by_manager() -> None:
    assert supports_incremental("mariadb") is True
    assert supports_incremental("postgresql") is True
    assert handler_class("redis").manager == "redis"
    with pytest.raises(NotImplementedByDatastore):
        handler_class("cassandra")
    with pytest.raises(NotImplementedByDatastore):
        backups_of(object())  # type: ignore[arg-type]


def test_a_backup_position_is_known_only_at_the_end() -> None:
    source = BackupSource(iter([b"a", b"b"]), lambda: {"lsn": 1})
    with pytest.raises(RuntimeError):
        source.position()
    assert b"".join(source) == b"ab"
    assert source.position() == {"lsn": 1}


def test_requests_are_checked_without_echoing_keys() -> None:
    assert check_id("3f2a-b") == "3f2a-b"
    for bad in ("../etc", "", "a" * 65, 7):
        with pytest.raises(ValidationError):
            check_id(bad)
    key = base64.b64encode(b"k" * 32).decode()
    assert decode_key(key) == b"k" * 32
    for bad in ("not base64!", base64.b64encode(b"short").decode()):
        with pytest.raises(ValidationError) as caught:
            decode_key(bad)
        assert bad not in caught.value.message


def _worker(tmp_path: Path, engine_user: str, sent: list[Any]) -> BackupWorker:
    spec = EngineSpec(
        layout=InstanceLayout(tmp_path / "instance"),
        bind_addresses=["127.0.0.1"],
        port=3306,
        memory_mb=256,
        vcpus=1,
        volume_size_gb=1,
        run_as=engine_user,
    )
    datastore = MariaDBDatastore(spec)  # never started: the worker only validates here
    state = tmp_path / "state"
    state.mkdir()
    return BackupWorker(
        lambda: datastore, state, lambda b, f: sent.append((b, f)), prepared=lambda: True
    )


def test_a_backup_cut_off_by_an_agent_restart_reads_failed(
    tmp_path: Path, engine_user: str
) -> None:
    sent: list[Any] = []
    worker = _worker(tmp_path, engine_user, sent)
    assert worker.backup_status("b-1") == {"state": "unknown"}
    # What a killed agent leaves: the backup recorded as building, and no thread running it.
    (tmp_path / "state" / "backups").mkdir()
    (tmp_path / "state" / "backups" / "b-1.json").write_text(json.dumps({"state": "building"}))
    status = worker.backup_status("b-1")
    assert status["state"] == "failed" and "guest agent stopped" in status["reason"]
    assert sent == [("b-1", status)]
    # Asking again for the same backup answers from the record instead of starting it again.
    again = worker.start_backup(
        "b-1",
        {"driver": "file", "file_directory": str(tmp_path / "store")},
        "p/b-1",
        base64.b64encode(b"k" * 32).decode(),
    )
    assert again == status
    assert not (tmp_path / "store").exists()


def test_restore_requests_are_validated_first(tmp_path: Path, engine_user: str) -> None:
    worker = _worker(tmp_path, engine_user, [])
    assert worker.restore_status() == {"state": "idle"}
    with pytest.raises(ValidationError):
        worker.start_restore([], {"driver": "file"})
    link = {"backup_id": "b-1", "storage_key": "p/b-1", "backup_key": "bad", "checksum": "0"}
    with pytest.raises(ValidationError, match="backup key"):
        worker.start_restore([link], {"driver": "file"})
    assert worker.restore_status() == {"state": "idle"}
