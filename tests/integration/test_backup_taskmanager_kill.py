"""The taskmanager killed (SIGKILL) while a real MariaDB backup streams, then started again.

What Coffer guarantees (docs/backups.md, "Crashes during a backup"): the guest agent keeps
streaming while no taskmanager runs, and the restarted taskmanager takes over the backup's
operation at once (its lease names a dead process on this host) and follows it to its end. So
the backup ends either COMPLETED with an object that is whole (its size and SHA-256 are what the
control DB recorded, and it decrypts and authenticates end to end under its key), or FAILED with
nothing left under its key; never stuck in BUILDING, never a partial object listed as a
completed backup; and the instance reads ACTIVE again.
"""

from __future__ import annotations

import hashlib
import signal
import sqlite3
import time
from collections.abc import Iterator
from typing import Any

import pymysql
import pytest
from coffer_harness import Coffer, TenantApi, coffer_environment, mariadb_instance

from coffer.backup import verify_stream
from coffer.bus import keys
from coffer.storage.file import FileStorage

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def services(engine_user: str) -> Iterator[Coffer]:
    with coffer_environment() as coffer:
        coffer.start("api", "api")
        coffer.wait_api()
        coffer.start("conductor", "conductor")
        coffer.start("taskmanager", "taskmanager")
        yield coffer


def _db(coffer: Coffer, sql: str, *args: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(coffer.state_dir / "coffer.db", timeout=30) as conn:
        return conn.execute(sql, args).fetchall()


def _backup(api: TenantApi, backup_id: str) -> dict[str, Any]:
    resp = api.request("GET", f"/backups/{backup_id}")
    assert resp.status_code == 200, resp.text
    backup: dict[str, Any] = resp.json()["backup"]
    return backup


def test_taskmanager_killed_mid_backup(services: Coffer) -> None:
    coffer = services
    api = TenantApi(coffer)
    instance_id = api.create(**mariadb_instance("tm-kill", "shop", "app", "app-Secret-pw-1"))
    shown = api.wait_settled(instance_id, timeout=180)
    assert shown["status"] == "ACTIVE", shown
    # ~300 MB of incompressible rows, made server-side: the backup streams for seconds.
    conn = pymysql.connect(
        host=shown["ip"][0], user="app", password="app-Secret-pw-1", database="shop"
    )
    try:
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE big (id INT PRIMARY KEY, b BLOB)")
            cur.execute("INSERT INTO big SELECT seq, RANDOM_BYTES(1024) FROM seq_1_to_300000")
        conn.commit()
    finally:
        conn.close()

    resp = api.request(
        "POST", "/backups", json={"backup": {"name": "doomed?", "instance": instance_id}}
    )
    assert resp.status_code == 202, resp.text
    backup_id = resp.json()["backup"]["id"]
    # Kill as soon as the operation waits for the guest's stream (the guest then streams for
    # seconds); the guest's progress reports come every 2 s, so they are not waited for.
    deadline = time.monotonic() + 120
    while True:
        backup = _backup(api, backup_id)
        assert backup["status"] in ("NEW", "BUILDING"), backup
        steps = _db(
            coffer, "SELECT state, step FROM operations WHERE payload LIKE ?", f"%{backup_id}%"
        )
        if steps == [("running", "wait_backup")]:
            break
        assert time.monotonic() < deadline, (backup, steps)
        time.sleep(0.02)
    coffer.stop("taskmanager", sig=signal.SIGKILL)
    at_kill = _backup(api, backup_id)
    assert at_kill["status"] in ("NEW", "BUILDING"), (
        "the backup ended before the kill; make it bigger"
    )
    assert api.show(instance_id)["status"] == "BACKUP"
    ((state, step),) = _db(
        coffer, "SELECT state, step FROM operations WHERE payload LIKE ?", f"%{backup_id}%"
    )
    assert (state, step) == ("running", "wait_backup")

    coffer.start("taskmanager", "taskmanager")
    deadline = time.monotonic() + 300
    while (backup := _backup(api, backup_id))["status"] not in ("COMPLETED", "FAILED"):
        assert time.monotonic() < deadline, backup
        time.sleep(0.2)
    # The restarted taskmanager took the operation over and ends it too.
    deadline = time.monotonic() + 60
    while _db(
        coffer, "SELECT state FROM operations WHERE payload LIKE ?", f"%{backup_id}%"
    ) not in ([("done",)], [("failed",)]):
        assert time.monotonic() < deadline, "the backup's operation was not taken over"
        time.sleep(0.2)
    deadline = time.monotonic() + 60
    while api.show(instance_id)["status"] != "ACTIVE":
        assert time.monotonic() < deadline, api.show(instance_id)
        time.sleep(0.2)

    stored = coffer.state_dir / "backups" / f"{backup['project_id']}%2F{backup_id}"
    listed = api.request("GET", "/backups", params={"instance_id": instance_id}).json()["backups"]
    assert [b["status"] for b in listed if b["id"] == backup_id] == [backup["status"]]
    if backup["status"] == "FAILED":
        assert backup["fail_reason"]
        assert not stored.exists()
        return
    # COMPLETED: the object is whole and is exactly what was recorded, read through the
    # storage driver (the file driver keeps its own trailer after the object's bytes).
    ((checksum, wrapped_key, size),) = _db(
        coffer, "SELECT checksum, wrapped_key, size FROM backups WHERE id = ?", backup_id
    )
    store = FileStorage(coffer.state_dir / "backups")
    key = f"{backup['project_id']}/{backup_id}"
    found = store.stat(key)
    assert found is not None and found.size == size == backup["size_bytes"]
    digest = hashlib.sha256()
    for block in store.get_stream(key):
        digest.update(block)
    assert digest.hexdigest() == checksum
    master = keys.load_or_create_master_key(coffer.state_dir / "master.key")
    backup_key = keys.derive_key(master, f"backup:{backup_id}")
    raw = verify_stream(store.get_stream(key), backup_key, backup_id, wrapped_key, checksum)
    assert raw == backup["raw_size_bytes"] > 300_000_000
    api.delete_and_wait_gone(instance_id, timeout=120)
