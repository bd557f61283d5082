"""One instance each of MariaDB, PostgreSQL and Redis, created with the real ``openstack`` CLI,
ACTIVE/HEALTHY at the same time, each at its own address on its standard port; a tenant user logs
in to each with a real client. PostgreSQL's users, grants and root are then driven through the
CLI and each change is checked by logging in (or failing to)."""

from __future__ import annotations

import time

import psycopg
import pymysql
import pytest
import redis
from coffer_harness import Coffer

pytestmark = [pytest.mark.compat, pytest.mark.integration]


def _version(coffer: Coffer, datastore: str) -> str:
    versions = coffer.openstack("datastore", "version", "list", datastore, "-f", "json")
    assert versions, f"coffer up registers the host's {datastore}"
    name: str = versions[0]["Name"]
    return name


def _wait_all_active(coffer: Coffer, names: list[str], timeout: float = 120) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    shown: dict[str, dict] = {}
    while time.monotonic() < deadline:
        shown = {
            n: coffer.openstack("database", "instance", "show", n, "-f", "json") for n in names
        }
        statuses = {n: (s["status"], s["operating_status"]) for n, s in shown.items()}
        assert "ERROR" not in {s for s, _ in statuses.values()}, statuses
        if all(v == ("ACTIVE", "HEALTHY") for v in statuses.values()):
            return shown
        time.sleep(0.5)
    raise AssertionError(f"not all ACTIVE/HEALTHY in {timeout}s: {shown}")


def _private(shown: dict) -> str:
    address: str = next(a["address"] for a in shown["addresses"] if a["type"] == "private")
    return address


def _pg_login(host: str, user: str, password: str, db: str) -> bool:
    try:
        conn = psycopg.connect(
            host=host, port=5432, user=user, password=password, dbname=db, connect_timeout=5
        )
    except psycopg.OperationalError:
        return False
    with conn:
        return conn.execute("SELECT 1").fetchone() == (1,)


def test_one_instance_of_each_engine_at_once(coffer_up: Coffer) -> None:
    coffer = coffer_up
    common = ["--flavor", "d1.micro", "--size", "1"]
    # The client connects from 127.0.0.1, so that is what PostgreSQL must allow.
    coffer.openstack(
        "database",
        "instance",
        "create",
        "e_maria",
        *common,
        "--datastore",
        "mariadb",
        "--datastore-version",
        _version(coffer, "mariadb"),
        "--databases",
        "mdb",
        "--users",
        "mu:maria-pass-1",
    )
    coffer.openstack(
        "database",
        "instance",
        "create",
        "e_pg",
        *common,
        "--datastore",
        "postgresql",
        "--datastore-version",
        _version(coffer, "postgresql"),
        "--databases",
        "pdb",
        "--users",
        "pu:pg-pass-1",
        "--allowed-cidr",
        "127.0.0.1/32",
    )
    coffer.openstack(
        "database",
        "instance",
        "create",
        "e_redis",
        *common,
        "--datastore",
        "redis",
        "--datastore-version",
        _version(coffer, "redis"),
        "--users",
        "ru:redis-pass-1",
    )
    shown = _wait_all_active(coffer, ["e_maria", "e_pg", "e_redis"])
    addresses = {name: _private(s) for name, s in shown.items()}
    assert len(set(addresses.values())) == 3, "each instance has its own address"

    conn = pymysql.connect(
        host=addresses["e_maria"], port=3306, user="mu", password="maria-pass-1", database="mdb"
    )
    with conn, conn.cursor() as cur:
        cur.execute("SELECT DATABASE()")
        assert cur.fetchone() == ("mdb",)
    assert _pg_login(addresses["e_pg"], "pu", "pg-pass-1", "pdb")
    client = redis.Redis(
        host=addresses["e_redis"], port=6379, username="ru", password="redis-pass-1"
    )
    try:
        assert client.set("k", "v") and client.get("k") == b"v"
    finally:
        client.close()

    # Redis has no named databases: refused up front with the reason.
    refused = coffer.openstack("database", "db", "list", "e_redis", check=False)
    assert refused.returncode != 0 and "numbered keyspaces" in refused.stderr

    # PostgreSQL users, grants and root through the CLI, each checked by logging in.
    pg = addresses["e_pg"]
    coffer.openstack("database", "db", "create", "e_pg", "pdb2")
    coffer.openstack("database", "user", "create", "e_pg", "pv", "pv-pass-1", "--databases", "pdb")
    assert _pg_login(pg, "pv", "pv-pass-1", "pdb")
    assert not _pg_login(pg, "pv", "pv-pass-1", "pdb2")
    coffer.openstack("database", "user", "grant", "access", "e_pg", "pv", "pdb2")
    assert _pg_login(pg, "pv", "pv-pass-1", "pdb2")
    coffer.openstack("database", "user", "revoke", "access", "e_pg", "pv", "pdb2")
    assert not _pg_login(pg, "pv", "pv-pass-1", "pdb2")
    coffer.openstack(
        "database", "user", "update", "attributes", "e_pg", "pv", "--new_password", "pv-pass-2"
    )
    assert not _pg_login(pg, "pv", "pv-pass-1", "pdb")
    assert _pg_login(pg, "pv", "pv-pass-2", "pdb")
    coffer.openstack("database", "user", "update", "attributes", "e_pg", "pv", "--new_name", "pw")
    assert _pg_login(pg, "pw", "pv-pass-2", "pdb")
    assert not _pg_login(pg, "pv", "pv-pass-2", "pdb")
    root = coffer.openstack("database", "root", "enable", "e_pg", "-f", "json")
    assert root["name"] == "postgres"
    assert _pg_login(pg, "postgres", root["password"], "postgres")
    coffer.openstack("database", "root", "disable", "e_pg")
    assert not _pg_login(pg, "postgres", root["password"], "postgres")

    for name in ("e_maria", "e_pg", "e_redis"):
        coffer.openstack("database", "instance", "delete", name)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if coffer.openstack("database", "instance", "list", "-f", "json") == []:
            break
        time.sleep(0.5)
    assert coffer.openstack("database", "instance", "list", "-f", "json") == []
