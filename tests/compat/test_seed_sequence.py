"""The seed command sequence (clients.md §3) with the real openstack and trove CLIs against
``coffer up``, then a real MySQL client at the instance's own address, then delete."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pymysql
import pytest
from coffer_harness import VENV_BIN, Coffer, processes_under

pytestmark = [pytest.mark.compat, pytest.mark.integration]


def _wait_status(coffer: Coffer, name: str, want: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    shown: dict = {}
    while time.monotonic() < deadline:
        shown = coffer.openstack("database", "instance", "show", name, "-f", "json")
        if shown["status"] == want:
            return shown
        assert shown["status"] != "ERROR", f"instance went to ERROR: {shown}"
        time.sleep(0.5)
    raise AssertionError(f"instance {name} not {want} in {timeout}s: {shown}")


def _connect(host: str, user: str, password: str, db: str | None = None) -> pymysql.Connection:
    return pymysql.connect(
        host=host, port=3306, user=user, password=password, database=db, connect_timeout=5
    )


def _can_use(host: str, user: str, password: str, db: str) -> bool:
    try:
        conn = _connect(host, user, password, db)
    except pymysql.err.OperationalError:
        return False
    with conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS t (id INT PRIMARY KEY)")
        cur.execute("REPLACE INTO t VALUES (1)")
        conn.commit()
        cur.execute("SELECT COUNT(*) FROM t")
        row = cur.fetchone()
        return row is not None and row[0] == 1


def test_seed_sequence(coffer_up: Coffer) -> None:
    coffer = coffer_up
    versions = coffer.openstack("datastore", "version", "list", "mariadb", "-f", "json")
    assert versions, "coffer up registers the host's MariaDB"
    host_version = versions[0]["Name"]

    # 1. An operator registers another name for the same engine (admin, empty 202 body).
    major_minor = ".".join(host_version.split(".")[:2])
    coffer.openstack(
        "datastore",
        "version",
        "create",
        major_minor,
        "mariadb",
        "mariadb",
        "",
        "--image-tags",
        "trove,mariadb",
        "--active",
        "--version-number",
        major_minor,
        cloud="coffer-admin",
    )
    # ... and the seeds' mysql 5.7.29, which this host cannot run.
    coffer.openstack(
        "datastore",
        "version",
        "create",
        "5.7.29",
        "mysql",
        "mysql",
        "",
        "--image-tags",
        "trove,mysql",
        "--active",
        "--default",
        "--version-number",
        "5.7.29",
        cloud="coffer-admin",
    )
    # 2. version list
    names = {
        v["Name"] for v in coffer.openstack("datastore", "version", "list", "mariadb", "-f", "json")
    }
    assert {host_version, major_minor} <= names
    assert [
        v["Name"] for v in coffer.openstack("datastore", "version", "list", "mysql", "-f", "json")
    ] == ["5.7.29"]

    refused = coffer.openstack(
        "database",
        "instance",
        "create",
        "nope",
        "--flavor",
        "m1.small",
        "--size",
        "1",
        "--datastore",
        "mysql",
        "--datastore-version",
        "5.7.29",
        check=False,
    )
    assert refused.returncode != 0
    assert "cannot run on this deployment" in refused.stderr
    assert f"mariadb {host_version}" in refused.stderr

    # 3. instance create, exactly as the seeds do it (on the version the host runs)
    created = coffer.openstack(
        "database",
        "instance",
        "create",
        "my_db",
        "--flavor",
        "m1.medium",
        "--size",
        "1",
        "--nic",
        f"net-id={uuid.uuid4()}",
        "--database",
        "testdb",
        "--users",
        "spatel:mypassword",
        "--datastore",
        "mariadb",
        "--datastore-version",
        major_minor,
        "--is-public",
        "--allowed-cidr",
        "0.0.0.0/0",
        "-f",
        "json",
    )
    assert created["name"] == "my_db"
    assert created["status"] == "BUILD"
    shown = _wait_status(coffer, "my_db", "ACTIVE")
    assert shown["operating_status"] == "HEALTHY"
    assert shown["datastore"] == "mariadb"
    private = next(a["address"] for a in shown["addresses"] if a["type"] == "private")
    public = next(a["address"] for a in shown["addresses"] if a["type"] == "public")
    assert private != public

    # 4. instance list
    listed = coffer.openstack("database", "instance", "list", "-f", "json")
    assert [(i["Name"], i["Status"]) for i in listed] == [("my_db", "ACTIVE")]

    # 5-10. users and databases
    users = coffer.openstack("database", "user", "list", "my_db", "-f", "json")
    assert [(u["Name"], u["Databases"]) for u in users] == [("spatel", "testdb")]
    coffer.openstack(
        "database", "user", "create", "my_db", "newuser", "userpass", "--databases", "testdb"
    )
    coffer.openstack("database", "db", "create", "my_db", "newdb")
    dbs = {d["Name"] for d in coffer.openstack("database", "db", "list", "my_db", "-f", "json")}
    assert {"testdb", "newdb"} <= dbs
    coffer.openstack("database", "user", "grant", "access", "my_db", "newuser", "newdb")
    access = coffer.openstack(
        "database", "user", "show", "access", "my_db", "newuser", "-f", "json"
    )
    assert {a["Name"] for a in access} == {"testdb", "newdb"}

    # 11-13. the legacy trove CLI
    out = coffer.trove("list")
    assert out.returncode == 0, out.stderr
    assert "my_db" in out.stdout and "ACTIVE" in out.stdout
    out = coffer.trove("datastore-list")
    assert out.returncode == 0, out.stderr
    assert "mariadb" in out.stdout and "mysql" in out.stdout
    out = coffer.trove("flavor-list")
    assert out.returncode == 0, out.stderr
    assert "m1.medium" in out.stdout

    # A real MySQL client at the instance's own addresses on 3306: exactly the granted databases.
    for address in (private, public):
        assert _can_use(address, "spatel", "mypassword", "testdb")
    assert not _can_use(private, "spatel", "mypassword", "newdb")
    assert _can_use(private, "newuser", "userpass", "newdb")
    with pytest.raises(pymysql.err.OperationalError):
        _connect(private, "spatel", "wrong-password", "testdb")

    # A revoked grant is really revoked.
    coffer.openstack("database", "user", "revoke", "access", "my_db", "newuser", "newdb")
    assert not _can_use(private, "newuser", "userpass", "newdb")
    assert _can_use(private, "newuser", "userpass", "testdb")

    # Delete: the instance disappears and nothing of it is left.
    instance_id = shown["id"]
    volume = coffer.state_dir / "instances" / instance_id
    assert volume.is_dir()
    coffer.openstack("database", "instance", "delete", "my_db")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        gone = coffer.openstack("database", "instance", "show", instance_id, check=False)
        if gone.returncode != 0:
            break
        time.sleep(0.5)
    assert gone.returncode != 0 and "no instance with a name or id" in gone.stderr.lower()
    token, project = coffer.token()
    resp = httpx.get(
        f"{coffer.base_url}/v1.0/{project}/instances/{instance_id}",
        headers={"X-Auth-Token": token},
    )
    assert resp.status_code == 404
    assert resp.json()["itemNotFound"]["code"] == 404
    assert not volume.exists()
    assert processes_under(volume) == []
    with pytest.raises(pymysql.err.OperationalError):
        _connect(private, "spatel", "mypassword", "testdb")
    rows = json.loads(
        subprocess.run(
            [str(VENV_BIN / "python"), "-c", _ADDRESSES_SQL, str(coffer.state_dir / "coffer.db")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert rows == [], f"addresses still allocated: {rows}"


_ADDRESSES_SQL = """
import json, sqlite3, sys
conn = sqlite3.connect(sys.argv[1])
print(json.dumps(conn.execute('select address from address_allocations').fetchall()))
"""


def test_volume_is_a_directory_of_the_state_dir(coffer_up: Coffer) -> None:
    # The state dir exists and holds no world-readable secrets.
    for name in ("master.key", "credentials.json", "clouds.yaml"):
        mode = (coffer_up.state_dir / name).stat().st_mode & 0o777
        assert mode == 0o600, f"{name} is {oct(mode)}"
    assert Path(coffer_up.state_dir / "coffer.db").exists()
