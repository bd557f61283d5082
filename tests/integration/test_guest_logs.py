"""Guest logs on real MariaDB, PostgreSQL and Redis instances, through the HTTP API of a real
``coffer up`` and the ``coffer log`` CLI: USER logs switched on live (and kept across a
restart), statements run by a tenant client found in the published text, passwords the agent
set never found there, publishing in pieces to the file backup storage with a metafile, discard,
and bad requests refused with nothing changed.

The module's Coffer runs with ``guest_log_long_query_time = 0`` (every statement is "slow", so
the slow query logs have something in them) and ``guest_log_limit = 4096`` (so a publish makes
several pieces).
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pymysql
import pytest
import redis
from coffer_harness import VENV_BIN, Coffer, TenantApi, coffer_environment, mariadb_instance

from coffer.config import StorageSection
from coffer.storage.base import get_storage

pytestmark = pytest.mark.integration

PASSWORD = "Initial-Pass-11"
NEW_USER_PASSWORD = "Second-Pass-22"
CHANGED_PASSWORD = "Changed-Pass-33"
ROOT_PASSWORD = "Root-Pass-44"
LIMIT = 4096
SETTLE_SECONDS = 120


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (pymysql.MySQLError, psycopg.Error, redis.RedisError, OSError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.3)
    raise AssertionError(f"{what} did not happen within {timeout:g} s (last: {last!r})")


@dataclass
class World:
    coffer: Coffer
    api: TenantApi
    ids: dict[str, str]

    def address(self, engine: str) -> str:
        shown = self.api.show(self.ids[engine])
        (found,) = [a["address"] for a in shown["addresses"] if a["type"] == "private"]
        return str(found)

    def logs(self, engine: str) -> dict[str, dict[str, Any]]:
        resp = self.api.request("GET", f"/instances/{self.ids[engine]}/log")
        assert resp.status_code == 200, resp.text
        return {log["name"]: log for log in resp.json()["logs"]}

    def action(self, engine: str, expect: int = 200, **body: Any) -> dict[str, Any]:
        resp = self.api.request("POST", f"/instances/{self.ids[engine]}/log", json=body)
        assert resp.status_code == expect, resp.text
        result: dict[str, Any] = resp.json()
        return result

    def text(self, engine: str, name: str, lines: int | None = None) -> str:
        params = {} if lines is None else {"lines": lines}
        resp = self.api.request("GET", f"/instances/{self.ids[engine]}/log/{name}", params=params)
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"].startswith("text/plain")
        return resp.text

    def storage_keys(self, prefix: str) -> list[str]:
        section = StorageSection(driver="file", file_directory=self.coffer.state_dir / "backups")
        with get_storage("file", section) as storage:
            return [obj.key for obj in storage.list(prefix)]

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(VENV_BIN / "coffer"), "log", *args],
            env=self.coffer.cli_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check:
            assert proc.returncode == 0, proc.stderr
        return proc

    def secrets_of(self, engine: str) -> list[str]:
        """The engine's admin password (the test runs as root, so it can read it)."""
        path = self.coffer.state_dir / "instances" / self.ids[engine] / "secrets"
        return [path.joinpath("os_admin.password").read_text().strip()]


def _settled(api: TenantApi, instance_id: str) -> None:
    def check() -> bool:
        shown = api.show(instance_id)
        assert shown["status"] != "ERROR", shown
        return bool(shown["status"] == "ACTIVE" and shown["operating_status"] == "HEALTHY")

    wait_for(f"{instance_id} ACTIVE/HEALTHY", check, SETTLE_SECONDS)


@pytest.fixture(scope="module")
def world(engine_user: str) -> Iterator[World]:
    with coffer_environment(
        COFFER_DEFAULT__GUEST_LOG_LONG_QUERY_TIME="0",
        COFFER_DEFAULT__GUEST_LOG_LIMIT=str(LIMIT),
    ) as coffer:
        coffer.start("up", "up")
        coffer.wait_api()
        api = TenantApi(coffer)
        user = {"name": "app", "password": PASSWORD, "databases": [{"name": "appdb"}]}
        ids = {
            "mariadb": api.create(**mariadb_instance("logs-maria", "appdb", "app", PASSWORD)),
            "postgresql": api.create(
                name="logs-pg",
                flavorRef="6",
                volume={"size": 1},
                datastore={"type": "postgresql"},
                databases=[{"name": "appdb"}],
                users=[user],
            ),
            "redis": api.create(
                name="logs-redis",
                flavorRef="6",
                volume={"size": 1},
                datastore={"type": "redis"},
                users=[{"name": "app", "password": PASSWORD}],
            ),
        }
        for instance_id in ids.values():
            _settled(api, instance_id)
        yield World(coffer, api, ids)
        for instance_id in ids.values():
            api.delete_and_wait_gone(instance_id)


def _api_sets_passwords(world: World, engine: str) -> str:
    """Have the agent set passwords while the logs are on: a new user, a changed password and
    root with a chosen password. Returns the new user's name."""
    instance = f"/instances/{world.ids[engine]}"
    name = "newbie"
    new_user: dict[str, Any] = {"name": name, "password": NEW_USER_PASSWORD}
    resp = world.api.request("POST", f"{instance}/users", json={"users": [new_user]})
    assert resp.status_code == 202, resp.text
    change = {"users": [{"name": name, "password": CHANGED_PASSWORD}]}
    resp = world.api.request("PUT", f"{instance}/users", json=change)
    assert resp.status_code == 202, resp.text
    resp = world.api.request("POST", f"{instance}/root", json={"password": ROOT_PASSWORD})
    assert resp.status_code == 200, resp.text
    return name


def _assert_no_secret(world: World, engine: str, text: str) -> None:
    for secret in (PASSWORD, NEW_USER_PASSWORD, CHANGED_PASSWORD, ROOT_PASSWORD):
        assert secret not in text, f"a password the agent set is in the {engine} log"
    for secret in world.secrets_of(engine):
        assert secret not in text, f"the {engine} admin password is in its log"


# --- listing ---------------------------------------------------------------------------------


def test_each_engine_lists_its_logs_with_trove_fields(world: World) -> None:
    expected = {
        "mariadb": {"guest": "SYS", "error": "SYS", "general": "USER", "slow_query": "USER"},
        "postgresql": {"guest": "SYS", "error": "SYS", "general": "USER", "slow_query": "USER"},
        "redis": {"guest": "SYS", "error": "SYS", "slow_query": "USER"},
    }
    for engine, names in expected.items():
        logs = world.logs(engine)
        assert {name: log["type"] for name, log in logs.items()} == names
        for name, log in logs.items():
            assert set(log) == {
                "name",
                "type",
                "status",
                "published",
                "pending",
                "container",
                "prefix",
                "metafile",
            }
            assert log["container"] == "database_logs"
            assert log["prefix"] == f"{world.ids[engine]}/{engine}-{name}/"
            assert log["metafile"] == f"{world.ids[engine]}/{engine}-{name}_metafile"
            if log["type"] == "USER":
                assert log["status"] == "Disabled", log
        # The engine's server log has been written since it started.
        assert logs["error"]["status"] == "Ready" and logs["error"]["pending"] > 0, logs


# --- MariaDB -----------------------------------------------------------------------------------


def _maria(world: World, user: str = "app", password: str = PASSWORD) -> Any:
    return pymysql.connect(
        host=world.address("mariadb"),
        user=user,
        password=password,
        database="appdb",
        autocommit=True,
        connect_timeout=5,
    )


def test_mariadb_general_log_enable_publish_read_disable_discard(world: World) -> None:
    instance_id = world.ids["mariadb"]
    shown = world.action("mariadb", name="general", enable=1)["log"]
    assert shown["status"] in ("Enabled", "Ready"), shown
    marker = f"marker_{uuid.uuid4().hex[:12]}"
    with _maria(world) as conn, conn.cursor() as cur:
        cur.execute("SELECT @@global.general_log, @@global.general_log_file")
        state, path = cur.fetchone()
        assert state == 1 and path.endswith("/log/general.log")
        for index in range(80):  # enough text for several 4 KB pieces
            cur.execute(f"SELECT '{marker}', {index}, REPEAT('x', 40)")
    _api_sets_passwords(world, "mariadb")

    published = world.action("mariadb", name="general", publish=1)["log"]
    assert published["status"] in ("Published", "Partial"), published
    assert published["published"] > LIMIT

    keys = world.storage_keys(f"database_logs/{instance_id}/mariadb-general/")
    assert len(keys) >= 2, keys
    assert keys == sorted(keys) and keys[0].endswith("/log-00000001")
    assert world.storage_keys(f"database_logs/{instance_id}/mariadb-general_metafile")

    text = world.text("mariadb", "general")
    assert marker in text and f"'{marker}', 79" in text
    _assert_no_secret(world, "mariadb", text)
    tail = world.text("mariadb", "general", lines=5)
    assert len(tail.splitlines()) == 5 and text.endswith(tail)

    # The same through `coffer log`, by instance name.
    proc = world.cli("tail", "logs-maria", "general", "--lines", "1000")
    assert marker in proc.stdout
    listed = json.loads(world.cli("list", "logs-maria", "-f", "json").stdout)
    assert {log["name"] for log in listed} == {"guest", "error", "general", "slow_query"}

    # A second publish sends only what is new.
    with _maria(world) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT 'second_{marker}'")
    before = len(world.storage_keys(f"database_logs/{instance_id}/mariadb-general/"))
    world.action("mariadb", name="general", publish=1)
    after = world.storage_keys(f"database_logs/{instance_id}/mariadb-general/")
    assert len(after) > before
    assert f"second_{marker}" in world.text("mariadb", "general", lines=50)

    disabled = world.action("mariadb", name="general", disable=1)["log"]
    assert disabled["status"] == "Disabled"
    with _maria(world) as conn, conn.cursor() as cur:
        cur.execute("SELECT @@global.general_log")
        assert cur.fetchone() == (0,)

    discarded = world.action("mariadb", name="general", discard=1)["log"]
    assert discarded["published"] == 0
    assert world.storage_keys(f"database_logs/{instance_id}/mariadb-general") == []
    resp = world.api.request("GET", f"/instances/{instance_id}/log/general")
    assert resp.status_code == 404 and "has not been published" in resp.text


def test_mariadb_slow_query_log_survives_a_restart(world: World) -> None:
    instance_id = world.ids["mariadb"]
    world.action("mariadb", name="slow_query", enable=1)
    resp = world.api.request("POST", f"/instances/{instance_id}/action", json={"restart": {}})
    assert resp.status_code == 202, resp.text
    wait_for("the restart to begin", lambda: world.api.show(instance_id)["status"] != "ACTIVE")
    _settled(world.api, instance_id)

    def slow_log_on() -> bool:
        with _maria(world) as conn, conn.cursor() as cur:
            cur.execute("SELECT @@global.slow_query_log, @@global.long_query_time")
            return bool(cur.fetchone() == (1, 0.0))

    assert wait_for("slow_query_log ON after the restart", slow_log_on)
    marker = f"slow_{uuid.uuid4().hex[:12]}"
    with _maria(world) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT '{marker}'")
    world.action("mariadb", name="slow_query", publish=1, disable=1)
    text = world.text("mariadb", "slow_query")
    assert marker in text and "Query_time" in text
    _assert_no_secret(world, "mariadb", text)
    assert world.logs("mariadb")["slow_query"]["status"] == "Disabled"


def test_sys_logs_publish_and_cli_saves_them(world: World, tmp_path: Path) -> None:
    published = world.action("mariadb", name="guest", publish=1)["log"]
    # The agent logs that it published, so its own log may already have a new line pending.
    assert published["type"] == "SYS", published
    assert published["status"] in ("Published", "Partial") and published["published"] > 0
    assert "guest agent" in world.text("mariadb", "guest")
    target = tmp_path / "error.log"
    world.cli("publish", "logs-maria", "error")
    world.cli("save", "logs-maria", "error", "--file", str(target))
    assert "mariadbd" in target.read_text() or "InnoDB" in target.read_text()


# --- PostgreSQL -----------------------------------------------------------------------------


def test_postgresql_general_and_slow_query_logs(world: World) -> None:
    instance_id = world.ids["postgresql"]
    world.action("postgresql", name="general", enable=1)
    world.action("postgresql", name="slow_query", enable=1)
    marker = f"pgmark_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(
        host=world.address("postgresql"),
        user="app",
        password=PASSWORD,
        dbname="appdb",
        connect_timeout=5,
        autocommit=True,
    ) as conn:
        assert conn.execute("SHOW log_statement").fetchone() == ("all",)
        conn.execute(f"SELECT '{marker}' AS mark")
    _api_sets_passwords(world, "postgresql")

    world.action("postgresql", name="general", publish=1)
    general = world.text("postgresql", "general")
    assert f"statement: SELECT '{marker}' AS mark" in general
    assert "duration:" not in general
    _assert_no_secret(world, "postgresql", general)

    world.action("postgresql", name="slow_query", publish=1)
    slow = world.text("postgresql", "slow_query")
    assert "duration:" in slow and marker in slow
    _assert_no_secret(world, "postgresql", slow)

    world.action("postgresql", name="error", publish=1)
    server = world.text("postgresql", "error")
    assert marker in server and "database system is ready" in server
    _assert_no_secret(world, "postgresql", server)

    for name in ("general", "slow_query"):
        assert world.action("postgresql", name=name, disable=1)["log"]["status"] == "Disabled"
    keys = world.storage_keys(f"database_logs/{instance_id}/postgresql-general/")
    assert keys, "the general log's objects stay after it is switched off"


# --- Redis --------------------------------------------------------------------------------------


def test_redis_slow_log_is_published(world: World) -> None:
    world.action("redis", name="slow_query", enable=1)
    client = redis.Redis(
        host=world.address("redis"),
        username="app",
        password=PASSWORD,
        socket_timeout=5,
        decode_responses=True,
    )
    marker = f"rmark_{uuid.uuid4().hex[:12]}"
    with client:
        client.set(marker, "value with spaces")
        assert client.get(marker) == "value with spaces"
    _api_sets_passwords(world, "redis")

    log = world.action("redis", name="slow_query", publish=1)["log"]
    assert log["status"] == "Published" and log["published"] > 0, log
    text = world.text("redis", "slow_query")
    assert f'command: SET {marker} "value with spaces"' in text
    _assert_no_secret(world, "redis", text)
    # Nothing new: a second publish adds nothing.
    again = world.action("redis", name="slow_query", publish=1, disable=1)["log"]
    assert again["published"] == log["published"] and again["status"] == "Disabled"


# --- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"name": "general", "enable": 1, "disable": 1}, 400, "either enable or disable"),
        ({"name": "error", "enable": 1}, 400, "SYS log"),
        ({"name": "guest", "disable": 1}, 400, "SYS log"),
        ({"name": "general", "enable": 2}, 400, "enable"),
        ({"name": "general", "rotate": 1}, 400, "rotate"),
        ({}, 400, "name"),
        ({"name": "binlog", "enable": 1}, 404, "There is no log 'binlog'"),
    ],
)
def test_bad_requests_are_refused_and_change_nothing(
    world: World, body: dict[str, Any], status: int, message: str
) -> None:
    before = world.logs("mariadb")
    resp = world.api.request("POST", f"/instances/{world.ids['mariadb']}/log", json=body)
    assert resp.status_code == status, resp.text
    assert message in resp.text, resp.text
    after = world.logs("mariadb")
    assert {n: log["status"] for n, log in after.items()} == {
        n: log["status"] for n, log in before.items()
    }


def test_reading_refusals(world: World) -> None:
    instance = f"/instances/{world.ids['redis']}"
    resp = world.api.request("GET", f"{instance}/log/general")
    assert resp.status_code == 404 and "There is no log 'general' on redis" in resp.text
    resp = world.api.request("GET", f"{instance}/log/error", params={"lines": -1})
    assert resp.status_code == 400, resp.text
    resp = world.api.request("GET", f"/instances/{uuid.uuid4()}/log")
    assert resp.status_code == 404, resp.text
    proc = world.cli("tail", "no-such-instance", "error", check=False)
    assert proc.returncode != 0 and "No instance" in proc.stderr
