"""Helpers for the WAL archive, incremental and point-in-time tests on real PostgreSQL servers:
datastores made and stopped by PID, a guest's ``BackupWorker`` with archiving, rows over psycopg.
"""

from __future__ import annotations

import base64
import contextlib
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import postgresql_fixtures

from coffer.guest.backup.archive import ArchiveTarget
from coffer.guest.backup.worker import BackupWorker
from coffer.guest.datastores.postgresql import PostgreSQLDatastore

Rows = list[tuple[int, str]]


class Instances:
    """PostgreSQL datastores made by one test, each stopped and then killed by PID at the end."""

    def __init__(self, run_as: str) -> None:
        self.run_as = run_as
        self.base = Path(tempfile.mkdtemp(prefix="coffer-pitr-", dir="/tmp"))
        self.base.chmod(0o711)
        self.made: list[PostgreSQLDatastore] = []
        self.workers: list[BackupWorker] = []

    def new(self, name: str) -> PostgreSQLDatastore:
        address = postgresql_fixtures.free_loopback_address("127.33.5")
        spec = postgresql_fixtures.make_spec(self.base / name, [address], self.run_as)
        datastore = PostgreSQLDatastore(spec)
        self.made.append(datastore)
        return datastore

    def worker(
        self, datastore: PostgreSQLDatastore, extents: list[dict[str, Any]] | None = None
    ) -> BackupWorker:
        state = datastore.layout.root / "state"
        state.mkdir(parents=True, exist_ok=True)
        worker = BackupWorker(
            lambda: datastore,
            state,
            lambda backup_id, fields: None,
            prepared=lambda: datastore.is_initialized(),
            archive_report=(extents.append if extents is not None else None),
        )
        self.workers.append(worker)
        return worker

    def close(self) -> None:
        try:
            for worker in self.workers:
                worker.stop_archiving()
            for datastore in self.made:
                with contextlib.suppress(Exception):
                    datastore.stop(timeout=20)
                postgresql_fixtures.kill_engines(f"--config-file={datastore.config_file}")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


@contextlib.contextmanager
def instances(run_as: str) -> Iterator[Instances]:
    made = Instances(run_as)
    try:
        yield made
    finally:
        made.close()


@dataclass
class Source:
    """A source instance whose backups archive its WAL into ``storage``."""

    datastore: PostgreSQLDatastore
    worker: BackupWorker
    storage: dict[str, Any]
    target: ArchiveTarget
    extents: list[dict[str, Any]] = field(default_factory=list)
    results: dict[str, tuple[bytes, dict[str, Any]]] = field(default_factory=dict)

    def backup(self, backup_id: str, parent: str | None = None) -> dict[str, Any]:
        key = secrets.token_bytes(32)
        self.worker.start_backup(
            backup_id,
            self.storage,
            f"demo/{backup_id}",
            base64.b64encode(key).decode(),
            parent=self.results[parent][1]["engine_position"] if parent else None,
            archive=self.target.to_request(),
        )
        result: dict[str, Any] = wait_for(
            lambda: self.worker.backup_status(backup_id), {"completed", "failed"}
        )
        assert result["state"] == "completed", result
        self.results[backup_id] = (key, result)
        return result

    def link(self, backup_id: str) -> dict[str, Any]:
        key, result = self.results[backup_id]
        return {
            "backup_id": backup_id,
            "storage_key": f"demo/{backup_id}",
            "backup_key": base64.b64encode(key).decode(),
            "wrapped_key": result["wrapped_key"],
            "checksum": result["checksum"],
        }

    def archive_covers(self, when: datetime, timeout: float = 120) -> None:
        """Close the current WAL file until the archive's extent reaches ``when``."""
        deadline = time.monotonic() + timeout
        while True:
            extent = self.worker.archiver.extent()
            if extent is not None and datetime.fromisoformat(extent["time"]) >= when:
                return
            assert time.monotonic() < deadline, f"the archive never reached {when}: {extent}"
            with admin(self.datastore) as conn:
                conn.execute("SELECT pg_switch_wal()")
            self.worker.archiver.poke()
            time.sleep(0.5)


def make_source(made: Instances, storage: dict[str, Any]) -> Source:
    datastore = made.new("source")
    datastore.prepare([], [])
    extents: list[dict[str, Any]] = []
    worker = made.worker(datastore, extents)
    target = ArchiveTarget(
        instance_id="source-1",
        storage=storage,
        prefix="demo/archive/source-1",
        key=secrets.token_bytes(32),
        timeout=60,
    )
    return Source(datastore, worker, storage, target, extents)


def restore(
    made: Instances,
    name: str,
    chain: list[dict[str, Any]],
    storage: dict[str, Any],
    pitr: dict[str, Any] | None = None,
) -> tuple[PostgreSQLDatastore, dict[str, Any]]:
    datastore = made.new(name)
    worker = made.worker(datastore)
    worker.start_restore(chain, storage, pitr)
    status = wait_for(worker.restore_status, {"done", "failed"}, timeout=300)
    return datastore, status


def wait_for(check: Callable[[], dict[str, Any]], done: set[str], timeout: float = 180) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        status = check()
        if status["state"] in done or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


def admin(datastore: PostgreSQLDatastore) -> Any:
    return postgresql_fixtures.admin_connection(datastore)


def write(datastore: PostgreSQLDatastore, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
    with admin(datastore) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS items (id INT PRIMARY KEY, v TEXT)")
        for statement, args in statements:
            conn.execute(statement, args)


def commit_at(datastore: PostgreSQLDatastore, row_id: int, value: str) -> datetime:
    """Commit one row in its own transaction; the server's clock just after the commit."""
    with admin(datastore) as conn:
        conn.execute("INSERT INTO items VALUES (%s, %s)", (row_id, value))
        row = conn.execute("SELECT clock_timestamp()").fetchone()
    assert row is not None
    when: datetime = row[0]
    return when


def read(datastore: PostgreSQLDatastore) -> Rows:
    with admin(datastore) as conn:
        rows = conn.execute("SELECT id, v FROM items ORDER BY id").fetchall()
    return [(int(r[0]), str(r[1])) for r in rows]
