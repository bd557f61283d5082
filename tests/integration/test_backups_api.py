"""Backups and restores end to end through the Trove API of a real ``coffer up`` (file storage):
for each engine, rows written, backed up, more rows, backed up again, and each backup restored
into a new instance holding exactly the rows of its moment (read back over the engine's own
client, as the tenant); a guest agent killed mid-backup; a tampered backup refused; the quota.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pymysql
import pytest
import redis
from coffer_harness import Coffer, TenantApi

from coffer.compute.procfs import read_pidfile

pytestmark = pytest.mark.integration

PASSWORD = "app-Secret-pw-1"
Rows = list[tuple[int, str]]


# --- each engine over its own client, as the tenant's user ---------------------------------------


def _mariadb(address: str) -> Any:
    return pymysql.connect(
        host=address,
        port=3306,
        user="app",
        password=PASSWORD,
        database="shop",
        connect_timeout=5,
        autocommit=True,
    )


def _mariadb_run(address: str, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
    conn = _mariadb(address)
    try:
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE IF NOT EXISTS items (id INT PRIMARY KEY, v TEXT)")
            for sql, args in statements:
                cur.execute(sql, args)
    finally:
        conn.close()


def _mariadb_rows(address: str) -> Rows:
    conn = _mariadb(address)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT id, v FROM items ORDER BY id")
            return [(int(a), str(b)) for a, b in cur.fetchall()]
    finally:
        conn.close()


def _pg(address: str) -> Any:
    return psycopg.connect(
        host=address,
        port=5432,
        user="app",
        password=PASSWORD,
        dbname="shop",
        connect_timeout=5,
        sslmode="disable",
        autocommit=True,
    )


def _pg_run(address: str, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
    with _pg(address) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS items (id INT PRIMARY KEY, v TEXT)")
        for sql, args in statements:
            conn.execute(sql, args)


def _pg_rows(address: str) -> Rows:
    with _pg(address) as conn:
        return [(int(a), str(b)) for a, b in conn.execute("SELECT id, v FROM items ORDER BY id")]


def _redis(address: str) -> redis.Redis:
    return redis.Redis(
        host=address,
        port=6379,
        username="app",
        password=PASSWORD,
        decode_responses=True,
        socket_timeout=5,
    )


def _redis_run(address: str, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
    with _redis(address) as client:
        for sql, args in statements:
            if sql.startswith("DELETE"):
                client.delete(f"item:{args[0]}")
            elif sql.startswith("UPDATE"):
                client.set(f"item:{args[1]}", args[0])
            else:
                client.set(f"item:{args[0]}", args[1])


def _redis_rows(address: str) -> Rows:
    with _redis(address) as client:
        keys = sorted(client.keys("item:*"), key=lambda k: int(k.split(":")[1]))
        return [(int(k.split(":")[1]), str(client.get(k))) for k in keys]


@dataclass(frozen=True)
class Engine:
    name: str
    run: Callable[[str, list[tuple[str, tuple[Any, ...]]]], None]
    rows: Callable[[str], Rows]
    incremental: bool
    #: Whether a restore brings the tenant's users back (Redis ACL users are not in an RDB).
    users_in_backup: bool

    def body(self, name: str, **extra: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "name": name,
            "flavorRef": "6",
            "volume": {"size": 1},
            "datastore": {"type": self.name},
            "users": [{"name": "app", "password": PASSWORD}],
        }
        if self.name != "redis":
            body["databases"] = [{"name": "shop"}]
            body["users"][0]["databases"] = [{"name": "shop"}]
        body.update(extra)
        return body


ENGINES = [
    Engine("mariadb", _mariadb_run, _mariadb_rows, incremental=True, users_in_backup=True),
    Engine("postgresql", _pg_run, _pg_rows, incremental=True, users_in_backup=True),
    Engine("redis", _redis_run, _redis_rows, incremental=True, users_in_backup=False),
]


# --- helpers -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(coffer_up: Coffer) -> TenantApi:
    return TenantApi(coffer_up)


def _ready(api: TenantApi, body: dict[str, Any]) -> dict[str, Any]:
    instance_id = api.create(**body)
    shown = api.wait_settled(instance_id, timeout=180)
    assert shown["status"] == "ACTIVE", shown
    return shown


def _address(view: dict[str, Any]) -> str:
    address: str = view["ip"][0]
    return address


def _wait_backup(api: TenantApi, backup_id: str, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        resp = api.request("GET", f"/backups/{backup_id}")
        assert resp.status_code == 200, resp.text
        backup: dict[str, Any] = resp.json()["backup"]
        if backup["status"] in ("COMPLETED", "FAILED") or time.monotonic() > deadline:
            return backup
        time.sleep(0.1)


def _back_up(api: TenantApi, instance_id: str, name: str, **extra: Any) -> dict[str, Any]:
    resp = api.request(
        "POST", "/backups", json={"backup": {"name": name, "instance": instance_id, **extra}}
    )
    assert resp.status_code == 202, resp.text
    created = resp.json()["backup"]
    assert created["status"] == "NEW" and created["instance_id"] == instance_id
    backup = _wait_backup(api, created["id"])
    assert backup["status"] == "COMPLETED", backup
    assert api.show(instance_id)["status"] == "ACTIVE"
    return backup


def _backups_in_use(coffer: Coffer, project: str) -> int:
    admin = TenantApi(coffer, "admin", "admin")
    resp = admin.request("GET", f"/mgmt/quotas/{project}")
    assert resp.status_code == 200, resp.text
    (row,) = [q for q in resp.json()["quotas"] if q["resource"] == "backups"]
    in_use: int = row["in_use"]
    return in_use


def _delete_backup(api: TenantApi, backup_id: str, timeout: float = 60) -> None:
    resp = api.request("DELETE", f"/backups/{backup_id}")
    assert resp.status_code == 202, resp.text
    deadline = time.monotonic() + timeout
    while api.request("GET", f"/backups/{backup_id}").status_code != 404:
        assert time.monotonic() < deadline, f"backup {backup_id} still shown after delete"
        time.sleep(0.1)


def _counts(coffer: Coffer) -> tuple[int, int, int]:
    """Rows of instances, operations and quota charges: what a refused request must not add."""
    with sqlite3.connect(coffer.state_dir / "coffer.db") as conn:
        return tuple(  # type: ignore[return-value]
            conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("instances", "operations", "quota_charges")
        )


def _stored_objects(coffer: Coffer) -> list[str]:
    directory = coffer.state_dir / "backups"
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def _object_path(coffer: Coffer, backup: dict[str, Any]) -> Path:
    return coffer.state_dir / "backups" / f"{backup['project_id']}%2F{backup['id']}"


@contextlib.contextmanager
def _instances(api: TenantApi) -> Iterator[list[str]]:
    made: list[str] = []
    try:
        yield made
    finally:
        for instance_id in made:
            api.request("DELETE", f"/instances/{instance_id}")


# --- the tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES, ids=[e.name for e in ENGINES])
def test_each_backup_restores_exactly_its_rows(
    coffer_up: Coffer, api: TenantApi, engine: Engine
) -> None:
    with _instances(api) as made:
        source = _ready(api, engine.body(f"{engine.name}-src"))
        made.append(source["id"])
        address = _address(source)
        engine.run(address, [("INSERT INTO items VALUES (%s, %s)", (i, f"v{i}")) for i in range(5)])
        first_rows = engine.rows(address)
        assert len(first_rows) == 5

        first = _back_up(api, source["id"], "first", description="five rows")
        assert first["size"] > 0 and first["parent_id"] is None
        assert first["datastore"]["type"] == engine.name
        assert first["locationRef"] == f"file://{first['project_id']}/{first['id']}"

        engine.run(
            address,
            [
                ("INSERT INTO items VALUES (%s, %s)", (5, "later")),
                ("UPDATE items SET v = %s WHERE id = %s", ("changed", 1)),
                ("DELETE FROM items WHERE id = %s", (2,)),
            ],
        )
        second_rows = engine.rows(address)
        if engine.incremental:
            second = _back_up(api, source["id"], "second", incremental=1)
            assert second["parent_id"] == first["id"]
        else:
            resp = api.request(
                "POST",
                "/backups",
                json={"backup": {"name": "x", "instance": source["id"], "incremental": 1}},
            )
            assert resp.status_code == 501, resp.text
            assert "always full" in resp.json()["notImplemented"]["message"]
            second = _back_up(api, source["id"], "second")
            assert second["parent_id"] is None
        engine.run(address, [("INSERT INTO items VALUES (%s, %s)", (6, "after both"))])

        listed = api.request("GET", f"/instances/{source['id']}/backups").json()["backups"]
        assert [b["id"] for b in listed] == [second["id"], first["id"]]

        restores = {}
        for backup, rows in ((first, first_rows), (second, second_rows)):
            extra: dict[str, Any] = {"restorePoint": {"backupRef": backup["id"]}}
            body = engine.body(f"{engine.name}-from-{backup['name']}", **extra)
            del body["datastore"]  # a restore takes the backup's datastore and version
            if engine.users_in_backup:
                del body["users"]  # the tenant's user comes back with the data
                body.pop("databases", None)
            restored = _ready(api, body)
            made.append(restored["id"])
            assert restored["datastore"]["type"] == engine.name
            restores[backup["id"]] = restored
            assert engine.rows(_address(restored)) == rows
        assert (6, "after both") not in engine.rows(_address(restores[second["id"]]))

        # Deleting the first backup deletes the incremental built on it too, and frees the quota.
        before = _backups_in_use(coffer_up, api.project)
        _delete_backup(api, first["id"])
        if engine.incremental:
            assert api.request("GET", f"/backups/{second['id']}").status_code == 404
            assert _backups_in_use(coffer_up, api.project) == before - 2
        else:
            assert _backups_in_use(coffer_up, api.project) == before - 1
            _delete_backup(api, second["id"])
        assert not [
            name
            for name in _stored_objects(coffer_up)
            if first["id"] in name or second["id"] in name
        ]


def test_killing_the_guest_agent_fails_the_backup_and_the_instance_recovers(
    coffer_up: Coffer, api: TenantApi
) -> None:
    engine = ENGINES[0]
    with _instances(api) as made:
        source = _ready(api, engine.body("killed-mid-backup"))
        made.append(source["id"])
        # ~100 MB of incompressible rows: the backup streams for long enough to be caught.
        _mariadb_run(_address(source), [])
        conn = _mariadb(_address(source))
        try:
            with conn.cursor() as cur:
                cur.execute("CREATE TABLE big (id INT PRIMARY KEY, b BLOB)")
                cur.execute("INSERT INTO big SELECT seq, RANDOM_BYTES(1024) FROM seq_1_to_100000")
        finally:
            conn.close()
        in_use = _backups_in_use(coffer_up, api.project)
        agent_pidfile = coffer_up.state_dir / "instances" / source["id"] / "run" / "agent.pid"
        for _attempt in range(3):
            resp = api.request(
                "POST", "/backups", json={"backup": {"name": "doomed", "instance": source["id"]}}
            )
            assert resp.status_code == 202, resp.text
            backup_id = resp.json()["backup"]["id"]
            deadline = time.monotonic() + 60
            status = "NEW"
            while status == "NEW" and time.monotonic() < deadline:
                status = api.request("GET", f"/backups/{backup_id}").json()["backup"]["status"]
            # While its backup runs the instance reads BACKUP.
            seen = api.show(source["id"])["status"]
            record = read_pidfile(agent_pidfile)
            assert record is not None
            os.kill(record[0], signal.SIGKILL)
            backup = _wait_backup(api, backup_id, timeout=120)
            if status == "BUILDING" and backup["status"] == "FAILED":
                assert seen == "BACKUP"
                break
            # The backup finished before the kill landed; try again.
            _wait_active(api, source["id"])
            _delete_backup(api, backup_id)
        else:
            pytest.fail("could not kill the guest agent while a backup was running")
        assert "guest agent" in backup["fail_reason"], backup
        assert backup["size"] is None or backup["status"] != "COMPLETED"
        # No object under the failed backup's key, and no completed backup that is partial.
        assert not [name for name in _stored_objects(coffer_up) if backup_id in name]
        listed = api.request("GET", "/backups", params={"instance_id": source["id"]}).json()
        assert [b["status"] for b in listed["backups"] if b["id"] == backup_id] == ["FAILED"]
        # A failed backup gives its quota back.
        assert _backups_in_use(coffer_up, api.project) == in_use
        _wait_active(api, source["id"])
        # The restarted agent takes the next backup normally.
        again = _back_up(api, source["id"], "after the kill")
        _delete_backup(api, again["id"])
        _delete_backup(api, backup_id)


def _wait_active(api: TenantApi, instance_id: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while api.show(instance_id)["status"] != "ACTIVE":
        assert time.monotonic() < deadline, api.show(instance_id)
        time.sleep(0.2)


def test_a_tampered_backup_is_refused_and_bad_restores_change_nothing(
    coffer_up: Coffer, api: TenantApi
) -> None:
    engine = ENGINES[2]
    with _instances(api) as made:
        source = _ready(api, engine.body("tamper-src", volume={"size": 2}))
        made.append(source["id"])
        engine.run(_address(source), [("INSERT", (1, "one"))])
        backup = _back_up(api, source["id"], "to-tamper")

        def refused(body: dict[str, Any], status: int, phrase: str) -> None:
            before = _counts(coffer_up)
            resp = api.request("POST", "/instances", json={"instance": body})
            assert resp.status_code == status, resp.text
            (fault,) = resp.json().values()
            assert phrase in fault["message"], fault
            assert _counts(coffer_up) == before

        restore = {"restorePoint": {"backupRef": backup["id"]}}
        refused(engine.body("small", **restore), 400, "at least 2 GB")
        refused(
            {**engine.body("wrong", **restore), "datastore": {"type": "mariadb"}},
            400,
            "restore it into a redis instance",
        )
        refused(
            engine.body("nope", volume={"size": 2}, restorePoint={"backupRef": "no-such"}),
            404,
            "could not be found",
        )
        refused(
            engine.body(
                "pitr",
                volume={"size": 2},
                restorePoint={"backupRef": backup["id"], "restore_time": "2020-01-01T00:00:00"},
            ),
            501,
            "restore_time",
        )

        path = _object_path(coffer_up, backup)
        data = bytearray(path.read_bytes())
        data[40] ^= 0x40  # inside the first sealed chunk (the stream header is 24 bytes)
        path.write_bytes(bytes(data))
        instance_id = api.create(**engine.body("from-tampered", volume={"size": 2}, **restore))
        made.append(instance_id)
        shown = api.wait_settled(instance_id, timeout=120)
        assert shown["status"] == "ERROR", shown
        assert "tampered or corrupted" in shown["fault"]["message"], shown["fault"]
        # Nothing was written: the verification failed before the restore began.
        data_dir = coffer_up.state_dir / "instances" / instance_id / "data"
        assert not data_dir.exists() or not any(data_dir.iterdir())
        _delete_backup(api, backup["id"])


def test_backups_count_against_the_quota(coffer_up: Coffer, api: TenantApi) -> None:
    engine = ENGINES[2]
    admin = TenantApi(coffer_up, "admin", "admin")
    in_use = _backups_in_use(coffer_up, api.project)
    resp = admin.request(
        "PUT", f"/mgmt/quotas/{api.project}", json={"quotas": {"backups": in_use + 1}}
    )
    assert resp.status_code == 200, resp.text
    try:
        with _instances(api) as made:
            source = _ready(api, engine.body("quota-src"))
            made.append(source["id"])
            one = _back_up(api, source["id"], "fits")
            assert _backups_in_use(coffer_up, api.project) == in_use + 1
            body = {"backup": {"name": "too many", "instance": source["id"]}}
            resp = api.request("POST", "/backups", json=body)
            assert resp.status_code == 413, resp.text
            assert "backups" in resp.json()["overLimit"]["message"]
            _delete_backup(api, one["id"])
            assert _backups_in_use(coffer_up, api.project) == in_use
            two = _back_up(api, source["id"], "fits again")
            _delete_backup(api, two["id"])
    finally:
        admin.request("PUT", f"/mgmt/quotas/{api.project}", json={"quotas": {"backups": 50}})


def test_the_openstack_cli_backs_up_and_restores(coffer_up: Coffer, api: TenantApi) -> None:
    engine = ENGINES[2]
    with _instances(api) as made:
        source = _ready(api, engine.body("cli-src"))
        made.append(source["id"])
        engine.run(_address(source), [("INSERT", (1, "from the cli"))])
        created = coffer_up.openstack(
            "database", "backup", "create", "-i", source["id"], "cli-backup", "-f", "json"
        )
        assert created["status"] == "NEW" and created["datastore"] == "redis"
        assert _wait_backup(api, created["id"])["status"] == "COMPLETED"
        listed = coffer_up.openstack(
            "database", "backup", "list", "--instance-id", source["id"], "-f", "json"
        )
        assert [(b["ID"], b["Status"]) for b in listed] == [(created["id"], "COMPLETED")]
        restored = coffer_up.openstack(
            "database", "instance", "create", "cli-restored", "--flavor", "6", "--size", "1",
            "--datastore", "redis", "--datastore-version", source["datastore"]["version"],
            "--backup", created["id"], "-f", "json",
        )  # fmt: skip
        made.append(restored["id"])
        shown = api.wait_settled(restored["id"], timeout=120)
        assert shown["status"] == "ACTIVE", shown
        # The restore was asked for without users (Redis ACL users are not part of an RDB):
        # root, enabled through the API, reads the restored keys.
        root = api.request("POST", f"/instances/{restored['id']}/root")
        assert root.status_code == 200, root.text
        password = root.json()["user"]["password"]
        with redis.Redis(
            host=_address(shown), port=6379, password=password, decode_responses=True
        ) as client:
            assert client.get("item:1") == "from the cli"
        coffer_up.openstack("database", "backup", "delete", created["id"])
        deadline = time.monotonic() + 30
        while api.request("GET", f"/backups/{created['id']}").status_code != 404:
            assert time.monotonic() < deadline
            time.sleep(0.1)
