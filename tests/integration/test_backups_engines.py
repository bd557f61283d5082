"""The guest side of backups against real engines: mariabackup, pg_basebackup and Redis RDB
snapshots streamed through the sealed pipeline into each storage driver (``file``, S3 on a real
Swift, native Swift), and restored into new data directories that hold exactly the rows of each
backup's moment; incremental backups where the engine has them (MariaDB: mariabackup's changed
pages; PostgreSQL: the WAL since the parent, read back from the log archive).

These drive ``BackupWorker`` (what the guest agent runs) directly on real datastores; the API and
taskmanager path is covered by ``test_backups_api.py``. As the taskmanager does, every backup of an
engine with a log archive carries the instance's archive settings, so the worker's archiver runs
for the source the way it runs in a guest, into the same store as the backups.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import secrets
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mariadb_fixtures
import postgresql_fixtures
import pytest
import redis_fixtures
from swift_harness import Swift, running_swift

from coffer.guest.backup import supports_point_in_time
from coffer.guest.backup.archive import ArchiveTarget
from coffer.guest.backup.worker import BackupWorker, open_storage
from coffer.guest.datastores.base import Datastore
from coffer.guest.datastores.mariadb import MariaDBDatastore
from coffer.guest.datastores.postgresql import PostgreSQLDatastore
from coffer.guest.datastores.redis import RedisDatastore
from coffer.storage.s3 import S3Storage

pytestmark = pytest.mark.integration

Rows = list[tuple[int, str]]


# --- each engine: how to make one, write rows and read them back over its client -----------------


def _mariadb_write(ds: Datastore, sql: list[tuple[str, tuple[Any, ...]]]) -> None:
    assert isinstance(ds, MariaDBDatastore)
    conn = mariadb_fixtures.admin_connection(ds)
    try:
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE IF NOT EXISTS shop")
            cur.execute(
                "CREATE TABLE IF NOT EXISTS shop.items (id INT PRIMARY KEY, v TEXT) ENGINE=InnoDB"
            )
            for statement, args in sql:
                cur.execute(statement.replace("{t}", "shop.items"), args)
    finally:
        conn.close()


def _mariadb_read(ds: Datastore) -> Rows:
    assert isinstance(ds, MariaDBDatastore)
    conn = mariadb_fixtures.admin_connection(ds)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT id, v FROM shop.items ORDER BY id")
            return [(int(r[0]), str(r[1])) for r in cur.fetchall()]
    finally:
        conn.close()


def _pg_write(ds: Datastore, sql: list[tuple[str, tuple[Any, ...]]]) -> None:
    assert isinstance(ds, PostgreSQLDatastore)
    with postgresql_fixtures.admin_connection(ds) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS items (id INT PRIMARY KEY, v TEXT)")
        for statement, args in sql:
            conn.execute(statement.replace("{t}", "items").replace("%s", "%s"), args)


def _pg_read(ds: Datastore) -> Rows:
    assert isinstance(ds, PostgreSQLDatastore)
    with postgresql_fixtures.admin_connection(ds) as conn:
        rows = conn.execute("SELECT id, v FROM items ORDER BY id").fetchall()
    return [(int(r[0]), str(r[1])) for r in rows]


def _redis_write(ds: Datastore, sql: list[tuple[str, tuple[Any, ...]]]) -> None:
    # The same row operations as keys: INSERT/UPDATE set item:<id>, DELETE removes it.
    assert isinstance(ds, RedisDatastore)
    with redis_fixtures.admin_client(ds) as client:
        for statement, args in sql:
            if statement.startswith("DELETE"):
                client.delete(f"item:{args[0]}")
            elif statement.startswith("UPDATE"):
                client.set(f"item:{args[1]}", args[0])
            else:
                client.set(f"item:{args[0]}", args[1])


def _redis_read(ds: Datastore) -> Rows:
    assert isinstance(ds, RedisDatastore)
    with redis_fixtures.admin_client(ds) as client:
        keys = sorted(client.keys("item:*"), key=lambda k: int(k.split(":")[1]))
        return [(int(k.split(":")[1]), str(client.get(k))) for k in keys]


@dataclass(frozen=True)
class Engine:
    name: str
    cls: type[Datastore]
    fixtures: Any
    prefix: str
    marker: Callable[[Any], str]
    write: Callable[[Datastore, list[tuple[str, tuple[Any, ...]]]], None]
    read: Callable[[Datastore], Rows]
    #: Whether the second backup of the round trip is an incremental built on the first.
    incremental: bool

    @property
    def archives(self) -> bool:
        """Whether the guest archives this engine's log from its first backup on (and a
        PostgreSQL incremental is read back from that archive)."""
        return supports_point_in_time(self.name)


ENGINES = [
    Engine(
        "mariadb",
        MariaDBDatastore,
        mariadb_fixtures,
        "127.31.5",
        lambda ds: f"--defaults-file={ds.config_file}",
        _mariadb_write,
        _mariadb_read,
        incremental=True,
    ),
    Engine(
        "postgresql",
        PostgreSQLDatastore,
        postgresql_fixtures,
        "127.32.5",
        lambda ds: f"--config-file={ds.config_file}",
        _pg_write,
        _pg_read,
        incremental=True,
    ),
    Engine(
        "redis",
        RedisDatastore,
        redis_fixtures,
        "127.33.5",
        lambda ds: str(ds.config_file),
        _redis_write,
        _redis_read,
        incremental=True,
    ),
]
INCREMENTAL = [e for e in ENGINES if e.incremental]

#: Where the source's log archive goes in the store, as ``<project>/archive/<instance id>``.
ARCHIVE_PREFIX = "demo/archive/source-1"


class Instances:
    """Datastores made by one test, each stopped and then killed by PID at the end."""

    def __init__(self, engine: Engine, run_as: str) -> None:
        self.engine = engine
        self.run_as = run_as
        self.base = Path(tempfile.mkdtemp(prefix=f"coffer-bk-{engine.name}-", dir="/tmp"))
        self.base.chmod(0o711)
        self.made: list[Datastore] = []
        self.workers: list[BackupWorker] = []

    def new(self, name: str) -> Datastore:
        address = self.engine.fixtures.free_loopback_address(self.engine.prefix)
        spec = self.engine.fixtures.make_spec(self.base / name, [address], self.run_as)
        datastore = self.engine.cls(spec)
        self.made.append(datastore)
        return datastore

    def close(self) -> None:
        try:
            for worker in self.workers:
                worker.stop_archiving()
            for datastore in self.made:
                with contextlib.suppress(Exception):
                    datastore.stop(timeout=20)
                self.engine.fixtures.kill_engines(self.engine.marker(datastore))
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def storage_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="coffer-bk-store-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _wait(check: Callable[[], dict[str, Any]], done: set[str], timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        status = check()
        if status["state"] in done or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


class Reports:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, backup_id: str, fields: dict[str, Any]) -> None:
        self.sent.append((backup_id, fields))


def _backup(
    worker: BackupWorker,
    storage: dict[str, Any],
    backup_id: str,
    key: bytes,
    parent: dict[str, Any] | None = None,
    archive: ArchiveTarget | None = None,
) -> dict[str, Any]:
    worker.start_backup(
        backup_id,
        storage,
        f"demo/{backup_id}",
        base64.b64encode(key).decode(),
        parent=parent,
        metadata={"backup-id": backup_id},
        archive=archive.to_request() if archive is not None else None,
    )
    result: dict[str, Any] = _wait(lambda: worker.backup_status(backup_id), {"completed", "failed"})
    assert result["state"] == "completed", result
    return result


def _link(backup_id: str, key: bytes, result: dict[str, Any]) -> dict[str, Any]:
    return {
        "backup_id": backup_id,
        "storage_key": f"demo/{backup_id}",
        "backup_key": base64.b64encode(key).decode(),
        "wrapped_key": result["wrapped_key"],
        "checksum": result["checksum"],
    }


def _restore(
    instances: Instances,
    name: str,
    chain: list[dict[str, Any]],
    storage: dict[str, Any],
    progress: list[dict[str, Any]] | None = None,
) -> tuple[Datastore, dict[str, Any]]:
    """Restore ``chain`` into a new datastore; its progress reports go to ``progress``."""
    datastore = instances.new(name)
    state = instances.base / f"{name}-state"
    state.mkdir()
    worker = BackupWorker(
        lambda: datastore,
        state,
        Reports(),
        prepared=lambda: False,
        restore_report=progress.append if progress is not None else None,
    )
    worker.start_restore(chain, storage)
    status = _wait(worker.restore_status, {"done", "failed"})
    return datastore, status


def _check_progress(progress: list[dict[str, Any]], engine_bytes: int) -> None:
    """A restore reported each pass from its start, only ever growing, never past the total,
    and ended with every engine byte of its chain verified and restored."""
    phases = [r["phase"] for r in progress]
    assert phases[0] == "verifying" and phases[-1] == "restored", phases
    assert "restoring" in phases, phases
    for field in ("verified_bytes", "restored_bytes"):
        values = [r[field] for r in progress]
        assert values == sorted(values), (field, values)
    assert all(r["restored_bytes"] <= r["total_bytes"] for r in progress if r["total_bytes"])
    last = progress[-1]
    assert last["verified_bytes"] == last["restored_bytes"] == last["total_bytes"] == engine_bytes
    assert last["rate"] > 0


def _round_trip(engine: Engine, instances: Instances, storage: dict[str, Any]) -> None:
    """Rows, a backup, changed rows, a second backup (incremental where the engine has them),
    each restored into a new data directory with exactly its rows; then a damaged copy of the
    first is refused before anything is written."""
    source = instances.new("source")
    source.prepare([], [])
    engine.write(
        source,
        [("INSERT INTO {t} VALUES (%s, %s)", (i, f"first-{i}")) for i in range(1, 6)],
    )
    first_rows = engine.read(source)
    assert first_rows == [(i, f"first-{i}") for i in range(1, 6)]

    state = instances.base / "source-state"
    state.mkdir()
    reports = Reports()
    extents: list[dict[str, Any]] = []
    worker = BackupWorker(
        lambda: source, state, reports, prepared=lambda: True, archive_report=extents.append
    )
    instances.workers.append(worker)
    archive = None
    if engine.archives:
        archive = ArchiveTarget(
            instance_id="source-1",
            storage=storage,
            prefix=ARCHIVE_PREFIX,
            key=secrets.token_bytes(32),
            timeout=60,
        )
    key_one, key_two = secrets.token_bytes(32), secrets.token_bytes(32)
    one = _backup(worker, storage, "b-one", key_one, archive=archive)
    assert one["size"] > 0 and one["raw_size"] > 0 and len(one["checksum"]) == 64
    if engine.name == "mariadb":
        assert int(one["engine_position"]["to_lsn"]) > 0
    if engine.name == "postgresql":
        assert "/" in one["engine_position"]["start_wal_location"]
    # The conductor heard the start and the result, and never a key.
    assert reports.sent[0] == ("b-one", {"state": "building"})
    assert reports.sent[-1][1]["state"] == "completed"
    assert base64.b64encode(key_one).decode() not in repr(reports.sent)

    engine.write(
        source,
        [
            ("INSERT INTO {t} VALUES (%s, %s)", (6, "second-6")),
            ("UPDATE {t} SET v = %s WHERE id = %s", ("changed-2", 2)),
            ("DELETE FROM {t} WHERE id = %s", (3,)),
        ],
    )
    second_rows = engine.read(source)
    parent = one["engine_position"] if engine.incremental else None
    two = _backup(worker, storage, "b-two", key_two, parent=parent, archive=archive)
    if engine.incremental:
        # Only the changes since the first backup: far smaller than a full one.
        assert two["raw_size"] < one["raw_size"]
    if engine.name == "postgresql" and engine.incremental:
        # The WAL since the full backup, read back from the archive in this same store.
        assert two["engine_position"]["backup_type"] == "incremental"
        assert two["engine_position"]["wal_from"] == one["engine_position"]["start_wal_file"]
        assert extents, "the archiver never reported an extent"
        assert archive is not None and base64.b64encode(archive.key).decode() not in repr(extents)
    engine.write(source, [("INSERT INTO {t} VALUES (%s, %s)", (7, "after-both"))])

    # The store holds two opaque objects, exactly the sealed bytes that were checksummed, and
    # (engines with a log archive) the archived log files, sealed as well.
    with open_storage(storage) as store:
        keys = [o.key for o in store.list("demo/")]
        archived = [k for k in keys if k.startswith(f"{ARCHIVE_PREFIX}/")]
        assert [k for k in keys if k not in archived] == ["demo/b-one", "demo/b-two"]
        first_bytes = b"".join(store.get_stream("demo/b-one"))
        if engine.name == "postgresql" and engine.incremental:
            assert archived, keys
            assert all(b"second-6" not in b"".join(store.get_stream(k)) for k in archived)
    assert hashlib.sha256(first_bytes).hexdigest() == one["checksum"]
    assert b"first-1" not in first_bytes

    progress: list[dict[str, Any]] = []
    restored_one, status = _restore(
        instances, "r-one", [_link("b-one", key_one, one)], storage, progress
    )
    assert status == {"state": "done", "backups": ["b-one"]}
    _check_progress(progress, one["raw_size"])
    restored_one.prepare([], [])
    assert engine.read(restored_one) == first_rows

    chain = [_link("b-two", key_two, two)]
    if engine.incremental:
        chain.insert(0, _link("b-one", key_one, one))
    progress = []
    restored_two, status = _restore(instances, "r-two", chain, storage, progress)
    assert status["state"] == "done", status
    _check_progress(progress, two["raw_size"] + (one["raw_size"] if engine.incremental else 0))
    restored_two.prepare([], [])
    assert engine.read(restored_two) == second_rows
    assert (7, "after-both") not in engine.read(restored_two)

    # One flipped bit in the middle of the stored object: refused before anything is written.
    damaged = bytearray(first_bytes)
    damaged[len(damaged) // 2] ^= 0x01
    with open_storage(storage) as store:
        store.put_stream("demo/b-one", [bytes(damaged)])
    progress = []
    refused, status = _restore(
        instances, "r-bad", [_link("b-one", key_one, one)], storage, progress
    )
    assert status["state"] == "failed"
    assert "tampered or corrupted" in status["reason"], status
    # It never got past verifying.
    assert {r["phase"] for r in progress} == {"verifying"}
    assert all(r["restored_bytes"] == 0 for r in progress)
    assert not refused.layout.data_dir.exists() or not any(refused.layout.data_dir.iterdir())


@pytest.mark.parametrize("engine", ENGINES, ids=[e.name for e in ENGINES])
def test_backups_restore_exactly_their_moment(
    engine: Engine, engine_user: str, storage_dir: Path
) -> None:
    instances = Instances(engine, engine_user)
    try:
        _round_trip(engine, instances, {"driver": "file", "file_directory": str(storage_dir)})
        # Nothing of a backup lies around unsealed beside the objects (nor a temporary file).
        names = sorted(p.name for p in storage_dir.iterdir())
        archive = ARCHIVE_PREFIX.replace("/", "%2F") + "%2F"
        assert [n for n in names if not n.startswith(archive)] == ["demo%2Fb-one", "demo%2Fb-two"]
    finally:
        instances.close()


@pytest.fixture(scope="module")
def swift(engine_user: str) -> Iterator[Swift]:
    with running_swift(engine_user) as running:
        yield running


@pytest.mark.parametrize("engine", ENGINES, ids=[e.name for e in ENGINES])
def test_backups_through_s3_on_a_real_swift(engine: Engine, engine_user: str, swift: Swift) -> None:
    bucket = f"coffer-{uuid.uuid4().hex[:12]}"
    storage = {
        "driver": "s3",
        "s3_endpoint_url": swift.proxy_url,
        "s3_region_name": swift.region,
        "s3_bucket": bucket,
        "s3_access_key_id": swift.user,
        "s3_secret_access_key": swift.key,
        # Small parts, so even these backups are multipart uploads.
        "s3_multipart_threshold": 5 * 1024 * 1024,
        "s3_multipart_chunksize": 5 * 1024 * 1024,
    }
    with open_storage(storage) as store:
        assert isinstance(store, S3Storage)
        store.client.create_bucket(Bucket=bucket)
    instances = Instances(engine, engine_user)
    try:
        _round_trip(engine, instances, storage)
    finally:
        instances.close()


@pytest.mark.parametrize("engine", INCREMENTAL, ids=[e.name for e in INCREMENTAL])
def test_an_incremental_chain_through_native_swift(
    engine: Engine, engine_user: str, swift: Swift
) -> None:
    storage = {
        "driver": "swift",
        "swift_auth_url": swift.auth_url,
        "swift_auth_version": "1",
        "swift_user": swift.user,
        "swift_key": swift.key,
        "swift_container": f"coffer-{uuid.uuid4().hex[:12]}",
        "swift_segment_size": 1024 * 1024,
    }
    instances = Instances(engine, engine_user)
    try:
        _round_trip(engine, instances, storage)
    finally:
        instances.close()


def test_a_failing_engine_tool_fails_the_backup_and_stores_nothing(
    engine_user: str, storage_dir: Path
) -> None:
    """pg_basebackup refused (the server is stopped mid-way): the backup fails with the tool's
    words and no object is left under its key."""
    engine = ENGINES[1]
    instances = Instances(engine, engine_user)
    storage = {"driver": "file", "file_directory": str(storage_dir)}
    try:
        source = instances.new("source")
        source.prepare([], [])
        source.stop()
        state = instances.base / "state"
        state.mkdir()
        worker = BackupWorker(lambda: source, state, Reports(), prepared=lambda: True)
        worker.start_backup(
            "b-fail",
            storage,
            "demo/b-fail",
            base64.b64encode(secrets.token_bytes(32)).decode(),
        )
        result = _wait(lambda: worker.backup_status("b-fail"), {"completed", "failed"})
        assert result["state"] == "failed"
        assert "pg_basebackup failed" in result["reason"], result
        assert source.password_file.read_text().strip() not in result["reason"]
        assert [p for p in storage_dir.iterdir() if not p.name.startswith(".")] == []
    finally:
        instances.close()
