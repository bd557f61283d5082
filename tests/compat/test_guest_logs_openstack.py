"""Guest logs through the real ``openstack`` CLI (python-troveclient's ``database log``
commands) against ``coffer up``: list, show, enable and publish on a MariaDB instance, and the
published text read back with ``coffer log tail``. (``openstack database log tail/save`` talk to
Swift directly; Coffer's published logs are read through its own extension route instead.)"""

from __future__ import annotations

import subprocess
import time
import uuid

import pymysql
import pytest
from coffer_harness import VENV_BIN, Coffer

pytestmark = [pytest.mark.compat, pytest.mark.integration]

PASSWORD = "log-compat-pass-1"


def _wait_active(coffer: Coffer, name: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    shown: dict = {}
    while time.monotonic() < deadline:
        shown = coffer.openstack("database", "instance", "show", name, "-f", "json")
        assert shown["status"] != "ERROR", shown
        if (shown["status"], shown["operating_status"]) == ("ACTIVE", "HEALTHY"):
            return shown
        time.sleep(0.5)
    raise AssertionError(f"{name} not ACTIVE/HEALTHY in {timeout}s: {shown}")


def test_openstack_database_log_commands(coffer_up: Coffer) -> None:
    coffer = coffer_up
    versions = coffer.openstack("datastore", "version", "list", "mariadb", "-f", "json")
    coffer.openstack(
        "database",
        "instance",
        "create",
        "log_maria",
        "--flavor",
        "d1.micro",
        "--size",
        "1",
        "--datastore",
        "mariadb",
        "--datastore-version",
        versions[0]["Name"],
        "--databases",
        "ldb",
        "--users",
        f"lu:{PASSWORD}",
    )
    shown = _wait_active(coffer, "log_maria")

    listed = coffer.openstack("database", "log", "list", "log_maria", "-f", "json")
    assert {log["Name"]: log["Type"] for log in listed} == {
        "guest": "SYS",
        "error": "SYS",
        "general": "USER",
        "slow_query": "USER",
    }
    assert {log["Status"] for log in listed if log["Type"] == "USER"} == {"Disabled"}
    assert all(log["Container"] == "database_logs" for log in listed)

    one = coffer.openstack("database", "log", "show", "log_maria", "general", "-f", "json")
    assert one["name"] == "general" and one["status"] == "Disabled"
    assert one["prefix"] == f"{shown['id']}/mariadb-general/"

    enabled = coffer.openstack(
        "database", "log", "set", "log_maria", "general", "--enable", "-f", "json"
    )
    assert enabled["status"] in ("Enabled", "Ready"), enabled

    address = next(a["address"] for a in shown["addresses"] if a["type"] == "private")
    marker = f"osc_{uuid.uuid4().hex[:10]}"
    conn = pymysql.connect(host=address, user="lu", password=PASSWORD, database="ldb")
    with conn, conn.cursor() as cur:
        cur.execute(f"SELECT '{marker}'")

    published = coffer.openstack(
        "database", "log", "set", "log_maria", "general", "--publish", "-f", "json"
    )
    assert published["status"] in ("Published", "Partial"), published
    assert published["published"] > 0

    tail = subprocess.run(
        [str(VENV_BIN / "coffer"), "log", "tail", "log_maria", "general", "--lines", "200"],
        env=coffer.cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert tail.returncode == 0, tail.stderr
    assert marker in tail.stdout and PASSWORD not in tail.stdout

    bad = coffer.openstack(
        "database", "log", "set", "log_maria", "general", "--enable", "--disable", check=False
    )
    assert bad.returncode != 0 and "either enable or disable" in bad.stderr

    coffer.openstack("database", "instance", "delete", "log_maria")
