"""Point-in-time restore end to end through the Trove API of a real ``coffer up``: an instance's
first backup turns on log archiving (PostgreSQL's WAL, MariaDB's binary log; sealed into the file
store, the extent reported through the conductor), commits are made at known server times over
the engine's own client as the tenant, and ``restorePoint: {backupRef, restore_time}`` builds a
new instance holding exactly the commits before the given time. Times outside the window are
refused before anything is recorded.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pymysql
import pytest
from coffer_harness import Coffer, TenantApi, coffer_environment

pytestmark = pytest.mark.integration

PASSWORD = "app-Secret-pw-1"


@pytest.fixture(scope="module")
def coffer_fast_archive(engine_user: str) -> Iterator[Coffer]:
    """``coffer up`` whose PostgreSQL instances close a WAL file with changes every 5 s."""
    with coffer_environment(COFFER_DEFAULT__BACKUP_ARCHIVE_TIMEOUT="5") as coffer:
        coffer.start("up", "up")
        coffer.wait_api()
        yield coffer


def _body(name: str, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": name,
        "flavorRef": "6",
        "volume": {"size": 1},
        "datastore": {"type": "postgresql"},
        "databases": [{"name": "shop"}],
        "users": [{"name": "app", "password": PASSWORD, "databases": [{"name": "shop"}]}],
    }
    body.update(extra)
    return body


def _connect(view: dict[str, Any]) -> Any:
    return psycopg.connect(
        host=view["ip"][0],
        port=5432,
        user="app",
        password=PASSWORD,
        dbname="shop",
        connect_timeout=5,
        sslmode="disable",
        autocommit=True,
    )


def _commit(view: dict[str, Any], row_id: int) -> datetime:
    """One row in its own transaction; the server's clock just after it committed."""
    with _connect(view) as conn:
        conn.execute("INSERT INTO items VALUES (%s, %s)", (row_id, f"row-{row_id}"))
        row = conn.execute("SELECT clock_timestamp()").fetchone()
    when: datetime = row[0]
    return when


def _rows(view: dict[str, Any]) -> list[int]:
    with _connect(view) as conn:
        return [int(r[0]) for r in conn.execute("SELECT id FROM items ORDER BY id")]


def _ready(api: TenantApi, body: dict[str, Any]) -> dict[str, Any]:
    shown = api.wait_settled(api.create(**body), timeout=300)
    assert shown["status"] == "ACTIVE", shown
    return shown


def _back_up(api: TenantApi, instance_id: str, name: str, **extra: Any) -> dict[str, Any]:
    resp = api.request(
        "POST", "/backups", json={"backup": {"name": name, "instance": instance_id, **extra}}
    )
    assert resp.status_code == 202, resp.text
    backup_id = resp.json()["backup"]["id"]
    deadline = time.monotonic() + 300
    while True:
        backup: dict[str, Any] = api.request("GET", f"/backups/{backup_id}").json()["backup"]
        if backup["status"] in ("COMPLETED", "FAILED"):
            break
        assert time.monotonic() < deadline, backup
        time.sleep(0.2)
    assert backup["status"] == "COMPLETED", backup
    return backup


def _extent(coffer: Coffer, instance_id: str) -> datetime | None:
    with sqlite3.connect(coffer.state_dir / "coffer.db") as conn:
        row = conn.execute(
            "SELECT newest_time FROM instance_archives WHERE instance_id = ?", (instance_id,)
        ).fetchone()
    return datetime.fromisoformat(row[0]) if row and row[0] else None


def _counts(coffer: Coffer) -> tuple[int, ...]:
    with sqlite3.connect(coffer.state_dir / "coffer.db") as conn:
        return tuple(
            conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("instances", "operations", "quota_charges")
        )


def test_restore_to_a_time_between_two_commits(coffer_fast_archive: Coffer) -> None:
    coffer = coffer_fast_archive
    api = TenantApi(coffer)
    made: list[str] = []
    try:
        source = _ready(api, _body("pitr-src"))
        made.append(source["id"])
        with _connect(source) as conn:
            conn.execute("CREATE TABLE items (id INT PRIMARY KEY, v TEXT)")
        _commit(source, 0)
        full = _back_up(api, source["id"], "full")

        after: dict[int, datetime] = {}
        for i in range(1, 4):
            after[i] = _commit(source, i)
            time.sleep(0.3)
        incremental = _back_up(api, source["id"], "incr", incremental=1)
        assert incremental["parent_id"] == full["id"]
        for i in range(4, 7):
            after[i] = _commit(source, i)
            time.sleep(0.3)

        # The archive's extent reaches past the last commit within a few archive timeouts.
        target = after[5].astimezone(UTC).replace(tzinfo=None)
        deadline = time.monotonic() + 120
        while (_extent(coffer, source["id"]) or datetime.min) < target:
            assert time.monotonic() < deadline, "the archive's extent was never reported"
            time.sleep(1)

        # Outside the window: before the backup, after the extent. Nothing is recorded.
        before = _counts(coffer)
        for when in ("2000-01-01T00:00:00Z", (datetime.now() + timedelta(days=1)).isoformat()):
            body = _body("pitr-bad", restorePoint={"backupRef": full["id"], "restore_time": when})
            resp = api.request("POST", "/instances", json={"instance": body})
            assert resp.status_code == 400, resp.text
            assert "outside the window" in resp.json()["badRequest"]["message"]
        assert _counts(coffer) == before

        # Between commits 2 and 3, from the full backup; between 5 and 6, from the incremental.
        for backup, upto in ((full, 2), (incremental, 5)):
            point = {"backupRef": backup["id"], "restore_time": after[upto].isoformat()}
            body = _body(f"pitr-{upto}", restorePoint=point)
            del body["datastore"], body["users"], body["databases"]
            restored = _ready(api, body)
            made.append(restored["id"])
            assert _rows(restored) == list(range(upto + 1))
    finally:
        for instance_id in made:
            api.request("DELETE", f"/instances/{instance_id}")


def _my(view: dict[str, Any]) -> Any:
    return pymysql.connect(
        host=view["ip"][0],
        port=3306,
        user="app",
        password=PASSWORD,
        database="shop",
        connect_timeout=5,
        autocommit=True,
    )


def _my_run(view: dict[str, Any], sql: str, args: tuple[Any, ...] = ()) -> Any:
    conn = _my(view)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()
    finally:
        conn.close()


def test_mariadb_restore_from_the_binary_log(coffer_fast_archive: Coffer) -> None:
    """Commits 1.5 s apart; a restore to the start of the second after commit k holds exactly
    commits 0..k (binary log times are whole seconds)."""
    coffer = coffer_fast_archive
    api = TenantApi(coffer)
    made: list[str] = []
    try:
        source = _ready(api, _body("my-src", datastore={"type": "mariadb"}))
        made.append(source["id"])
        _my_run(source, "CREATE TABLE items (id INT PRIMARY KEY, v TEXT) ENGINE=InnoDB")

        def commit(row_id: int) -> datetime:
            _my_run(source, "INSERT INTO items VALUES (%s, %s)", (row_id, f"row-{row_id}"))
            ((now,),) = _my_run(source, "SELECT UTC_TIMESTAMP(6)")
            assert isinstance(now, datetime)
            return now.replace(microsecond=0) + timedelta(seconds=1)

        commit(0)
        full = _back_up(api, source["id"], "full")
        after = {}
        for i in range(1, 4):
            after[i] = commit(i)
            time.sleep(1.5)
        deadline = time.monotonic() + 120
        while (_extent(coffer, source["id"]) or datetime.min) < after[3]:
            assert time.monotonic() < deadline, "the binary log archive never caught up"
            time.sleep(1)

        point = {"backupRef": full["id"], "restore_time": after[2].isoformat() + "Z"}
        body = _body("my-pitr", restorePoint=point)
        del body["users"], body["databases"], body["datastore"]
        restored = _ready(api, body)
        made.append(restored["id"])
        rows = [int(r[0]) for r in _my_run(restored, "SELECT id FROM items ORDER BY id")]
        assert rows == [0, 1, 2]
    finally:
        for instance_id in made:
            api.request("DELETE", f"/instances/{instance_id}")
