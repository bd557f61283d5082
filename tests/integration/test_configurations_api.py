"""Configuration groups on a running ``coffer up``: the rules it ships for each engine, the
group lifecycle over HTTP and through the real ``openstack`` CLI, ``coffer manage`` loading rules
into the running deployment, and, for every rule the API lists, the real engine's own word that
the parameter exists, takes those values, and changes live exactly when the rule says so.

The engines are started through the guest plugins (as the datastore tests do), each on its own
loopback addresses, and stopped by PID afterwards.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import mariadb_fixtures
import postgresql_fixtures
import psycopg
import pymysql
import pytest
import redis
import redis_fixtures
from coffer_harness import VENV_BIN, Coffer, TenantApi
from psycopg import sql

from coffer.configuration.parameter_rules import shipped_rules
from coffer.guest.datastores.mariadb import MariaDBDatastore
from coffer.guest.datastores.postgresql import PostgreSQLDatastore

pytestmark = pytest.mark.integration

ENGINES = ("mariadb", "postgresql", "redis")


@pytest.fixture(scope="module")
def api(coffer_up: Coffer) -> TenantApi:
    return TenantApi(coffer_up)


@pytest.fixture(scope="module")
def admin(coffer_up: Coffer) -> TenantApi:
    return TenantApi(coffer_up, "admin", "admin")


@pytest.fixture(scope="module")
def versions(admin: TenantApi) -> dict[str, dict[str, Any]]:
    """The version ``coffer up`` registered for each engine, by manager."""
    resp = admin.request("GET", "/mgmt/datastore-versions")
    assert resp.status_code == 200, resp.text
    found = {v["datastore_manager"]: v for v in resp.json()["versions"]}
    assert set(ENGINES) <= set(found), found
    return found


def _parameters(api: TenantApi, version_id: str) -> list[dict[str, Any]]:
    resp = api.request("GET", f"/datastores/versions/{version_id}/parameters")
    assert resp.status_code == 200, resp.text
    params: list[dict[str, Any]] = resp.json()["configuration-parameters"]
    return params


def _coffer(coffer: Coffer, *args: str, stdin: str | None = None) -> str:
    proc = subprocess.run(
        [str(VENV_BIN / "coffer"), *args],
        env=coffer.env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# -- the API --------------------------------------------------------------------------------------


def test_coffer_up_ships_rules_for_every_engine(
    api: TenantApi, versions: dict[str, dict[str, Any]]
) -> None:
    for manager in ENGINES:
        version = versions[manager]
        listed = {p["name"]: p for p in _parameters(api, version["id"])}
        assert listed == {
            rule.name: rule.public_view(version["id"]) for rule in shipped_rules(manager)
        }, manager
        by_name = api.request(
            "GET", f"/datastores/{manager}/versions/{version['name']}/parameters"
        ).json()["configuration-parameters"]
        assert {p["name"] for p in by_name} == set(listed)
    pg = versions["postgresql"]
    one = api.request("GET", f"/datastores/postgresql/versions/{pg['name']}/parameters/work_mem")
    assert one.status_code == 200
    assert (one.json()["restart_required"], one.json()["type"]) == (False, "integer")


def test_group_lifecycle_over_http(
    api: TenantApi, admin: TenantApi, coffer_up: Coffer, versions: dict[str, dict[str, Any]]
) -> None:
    maria = versions["mariadb"]
    created = api.request(
        "POST",
        "/configurations",
        json={
            "configuration": {
                "name": "http-group",
                "description": "tuned for the app",
                "values": {"max_connections": 555, "tx_isolation": "read-committed"},
                "datastore": {"type": "mariadb", "version": maria["name"]},
            }
        },
    )
    assert created.status_code == 200, created.text
    group = created.json()["configuration"]
    path = f"/configurations/{group['id']}"
    assert group["values"] == {"max_connections": 555, "tx_isolation": "READ-COMMITTED"}
    assert (group["datastore_version_id"], group["instance_count"]) == (maria["id"], 0)

    listed = api.request("GET", "/configurations").json()["configurations"]
    assert group["id"] in {item["id"] for item in listed}

    patched = api.request(
        "PATCH", path, json={"configuration": {"values": {"max_connections": 666}}}
    )
    assert (patched.status_code, patched.content) == (200, b"")
    shown = api.request("GET", path).json()["configuration"]
    assert shown["values"] == {"max_connections": 666, "tx_isolation": "READ-COMMITTED"}

    replaced = api.request("PUT", path, json={"configuration": {"values": {"wait_timeout": 60}}})
    assert replaced.status_code == 202
    assert api.request("GET", path).json()["configuration"]["values"] == {"wait_timeout": 60}

    refused = api.request("PATCH", path, json={"configuration": {"values": {"max_connections": 5}}})
    assert refused.status_code == 422
    message = refused.json()["unprocessableEntity"]["message"]
    assert "'max_connections'" in message and "minimum 10" in message
    assert api.request("GET", f"{path}/instances").json() == {"instances": []}

    # Another project's member cannot see it, or learn that it exists.
    _coffer(
        coffer_up,
        "manage",
        "user-create",
        "eve",
        "--project",
        "other",
        "--password-stdin",
        stdin="eve-secret-pw\n",
    )
    body = {
        "auth": {
            "identity": {
                "methods": ["password"],
                "password": {
                    "user": {
                        "name": "eve",
                        "domain": {"id": "default"},
                        "password": "eve-secret-pw",
                    }
                },
            },
            "scope": {"project": {"name": "other", "domain": {"id": "default"}}},
        }
    }
    auth = httpx.post(f"{coffer_up.base_url}/identity/v3/auth/tokens", json=body, timeout=10)
    assert auth.status_code == 201
    eve_token, eve_project = auth.headers["X-Subject-Token"], auth.json()["token"]["project"]["id"]
    for method in ("GET", "DELETE"):
        resp = api.request(method, path, project=eve_project, token=eve_token)
        assert resp.status_code == 404, resp.text
    eve_list = api.request("GET", "/configurations", project=eve_project, token=eve_token)
    assert eve_list.json() == {"configurations": []}
    # The admin sees it (from the admin project's URL).
    assert admin.request("GET", path).status_code == 200

    assert api.request("DELETE", path).status_code == 202
    assert api.request("GET", path).status_code == 404


def test_openstack_cli_drives_configuration_groups(
    coffer_up: Coffer, versions: dict[str, dict[str, Any]]
) -> None:
    pg = versions["postgresql"]
    created = coffer_up.openstack(
        "database", "configuration", "create", "cli-group",
        json.dumps({"work_mem": 8192, "shared_buffers": 16384}),
        "--datastore", "postgresql", "--datastore-version", pg["name"], "-f", "json",
    )  # fmt: skip
    assert json.loads(created["values"]) == {"work_mem": 8192, "shared_buffers": 16384}
    assert created["datastore_version_name"] == pg["name"]

    # "configuration parameter set" merges (PATCH); "configuration set" replaces (PUT).
    coffer_up.openstack(
        "database", "configuration", "parameter", "set", created["id"],
        json.dumps({"work_mem": 4096}),
    )  # fmt: skip
    shown = coffer_up.openstack("database", "configuration", "show", "cli-group", "-f", "json")
    assert json.loads(shown["values"]) == {"work_mem": 4096, "shared_buffers": 16384}
    coffer_up.openstack(
        "database", "configuration", "set", created["id"], json.dumps({"work_mem": 2048})
    )
    shown = coffer_up.openstack("database", "configuration", "show", "cli-group", "-f", "json")
    assert json.loads(shown["values"]) == {"work_mem": 2048}
    listed = coffer_up.openstack("database", "configuration", "list", "-f", "json")
    assert "cli-group" in {row["Name"] for row in listed}

    params = coffer_up.openstack(
        "database", "configuration", "parameter", "list", pg["id"], "-f", "json"
    )
    by_name = {row["Name"]: row for row in params}
    assert by_name["shared_buffers"]["Restart Required"] is True
    assert by_name["work_mem"]["Min Size"] == 64

    bad = coffer_up.openstack(
        "database", "configuration", "set", created["id"], json.dumps({"work_mem": 1}),
        check=False,
    )  # fmt: skip
    assert bad.returncode != 0 and "work_mem" in bad.stderr and "minimum 64" in bad.stderr

    coffer_up.openstack("database", "configuration", "delete", "cli-group")
    listed = coffer_up.openstack("database", "configuration", "list", "-f", "json")
    assert "cli-group" not in {row["Name"] for row in listed}


def test_manage_loads_rules_into_the_running_coffer(
    api: TenantApi, coffer_up: Coffer, versions: dict[str, dict[str, Any]]
) -> None:
    redis_version = versions["redis"]
    rules_file = coffer_up.state_dir / "extra-rules.json"
    rules_file.write_text(
        json.dumps(
            {
                "configuration-parameters": [
                    {
                        "name": "timeout",
                        "restart_required": False,
                        "type": "integer",
                        "min": 0,
                        "max": 3600,
                    }
                ]
            }
        )
    )
    out = _coffer(
        coffer_up, "manage", "configuration-rules-load", "redis", redis_version["name"],
        str(rules_file),
    )  # fmt: skip
    assert "1 parameter rules loaded" in out
    shown = api.request("GET", f"/datastores/versions/{redis_version['id']}/parameters/timeout")
    assert shown.json()["max"] == 3600
    body = {
        "configuration": {
            "name": "redis-group",
            "values": {"timeout": 7200},
            "datastore": {"type": "redis"},
        }
    }
    assert api.request("POST", "/configurations", json=body).status_code == 422

    # Back to what Coffer ships.
    _coffer(coffer_up, "manage", "configuration-rules-load", "redis", redis_version["name"])
    shown = api.request("GET", f"/datastores/versions/{redis_version['id']}/parameters/timeout")
    assert shown.json()["max"] == 2147483647
    created = api.request("POST", "/configurations", json=body)
    assert created.status_code == 200, created.text
    assert (
        api.request(
            "DELETE", f"/configurations/{created.json()['configuration']['id']}"
        ).status_code
        == 202
    )


# -- the engines agree with the rules the API lists -----------------------------------------------


def _rules_listed(
    api: TenantApi, versions: dict[str, dict[str, Any]], manager: str
) -> list[dict[str, Any]]:
    params = _parameters(api, versions[manager]["id"])
    assert params, manager
    return params


@pytest.fixture
def mariadb_admin(engine_user: str) -> Iterator[pymysql.connections.Connection]:
    m = mariadb_fixtures
    with m.instance_root() as root:
        address = m.free_loopback_address("127.10.249")
        datastore = MariaDBDatastore(m.make_spec(root, [address], engine_user))
        try:
            datastore.prepare([], [])
            conn = m.admin_connection(datastore)
            try:
                yield conn
            finally:
                conn.close()
        finally:
            try:
                datastore.stop(timeout=20)
            finally:
                m.kill_engines(f"--defaults-file={datastore.config_file}")


def test_mariadb_agrees_with_the_listed_rules(
    api: TenantApi, versions: dict[str, dict[str, Any]], mariadb_admin: Any
) -> None:
    cur = mariadb_admin.cursor()
    problems = []
    for rule in _rules_listed(api, versions, "mariadb"):
        name = rule["name"]
        cur.execute(
            "SELECT VARIABLE_TYPE, NUMERIC_MIN_VALUE, NUMERIC_MAX_VALUE, READ_ONLY, "
            "ENUM_VALUE_LIST, GLOBAL_VALUE FROM information_schema.SYSTEM_VARIABLES "
            "WHERE VARIABLE_NAME = %s",
            (name.upper(),),
        )
        row = cur.fetchone()
        if row is None:
            problems.append(f"{name}: no such variable")
            continue
        kind, low, high, read_only, enum_list, current = row
        expected_kind = {
            "integer": "INT" in kind,
            "float": kind == "DOUBLE",
            "boolean": kind == "BOOLEAN",
            "string": kind in ("ENUM", "SET", "VARCHAR"),
        }[rule["type"]]
        if not expected_kind:
            problems.append(f"{name}: rule type {rule['type']} but the server says {kind}")
        if "min" in rule and low is not None and rule["min"] < float(low):
            problems.append(f"{name}: min {rule['min']} below the server's {low}")
        if "max" in rule and high is not None and rule["max"] > float(high):
            problems.append(f"{name}: max {rule['max']} above the server's {high}")
        for value in rule.get("allowed_values", []):
            if enum_list:
                known = {v.lower() for v in enum_list.split(",")}
            elif name == "character_set_server":
                cur.execute("SELECT character_set_name FROM information_schema.character_sets")
                known = {r[0].lower() for r in cur.fetchall()}
            else:
                cur.execute("SELECT collation_name FROM information_schema.collations")
                known = {r[0].lower() for r in cur.fetchall()} | {"binary"}
            if value.lower() not in known:
                problems.append(f"{name}: allowed value {value!r} unknown to the server")
        # Live or not is what SET GLOBAL of the current value says (read-only variables, and
        # max_user_connections when started at 0, refuse it).
        typed: Any = {"integer": int, "float": float}.get(rule["type"], str)(current)
        try:
            cur.execute(f"SET GLOBAL {name} = %s", (typed,))
            live = True
        except pymysql.err.MySQLError:
            live = False
        if live == rule["restart_required"] or (read_only == "YES" and live):
            problems.append(f"{name}: restart_required {rule['restart_required']}, live {live}")
        if live:
            for value in rule.get("allowed_values", []):
                try:
                    cur.execute(f"SET GLOBAL {name} = %s", (value,))
                except pymysql.err.MySQLError as exc:
                    problems.append(f"{name}: the server refuses {value!r} ({exc})")
            cur.execute(f"SET GLOBAL {name} = %s", (typed,))
    assert not problems, "\n".join(problems)


@pytest.fixture
def postgres_admin(engine_user: str) -> Iterator[Any]:
    p = postgresql_fixtures
    with p.instance_root() as root:
        address = p.free_loopback_address("127.10.249")
        datastore = PostgreSQLDatastore(p.make_spec(root, [address], engine_user))
        try:
            datastore.prepare([], [])
            conn = p.admin_connection(datastore)
            try:
                yield conn
            finally:
                conn.close()
        finally:
            try:
                datastore.stop(timeout=20)
            finally:
                p.kill_engines(f"--config-file={datastore.config_file}")


def _pg_literal(value: Any) -> sql.Composable:
    if isinstance(value, bool):
        return sql.SQL("on" if value else "off")
    if isinstance(value, int | float):
        return sql.SQL(repr(value))
    return sql.Literal(value)


def test_postgresql_agrees_with_the_listed_rules(
    api: TenantApi, versions: dict[str, dict[str, Any]], postgres_admin: Any
) -> None:
    problems = []
    for rule in _rules_listed(api, versions, "postgresql"):
        name = rule["name"]
        row = postgres_admin.execute(
            "SELECT context, vartype, min_val, max_val, enumvals, setting "
            "FROM pg_settings WHERE lower(name) = %s",
            (name,),
        ).fetchone()
        if row is None:
            problems.append(f"{name}: no such setting")
            continue
        context, vartype, low, high, enumvals, current = row
        if "min" in rule and rule["min"] < float(low):
            problems.append(f"{name}: min {rule['min']} below the server's {low}")
        if "max" in rule and rule["max"] > float(high):
            problems.append(f"{name}: max {rule['max']} above the server's {high}")
        if (context == "postmaster") != rule["restart_required"] or context == "internal":
            problems.append(f"{name}: restart_required {rule['restart_required']}, {context}")
        expected = {"integer": {"integer"}, "float": {"real"}, "boolean": {"bool"}}
        if vartype not in expected.get(rule["type"], {"string", "enum"}):
            problems.append(f"{name}: rule type {rule['type']} but the server says {vartype}")
        if enumvals is not None and set(rule.get("allowed_values", [])) != set(enumvals):
            problems.append(f"{name}: allowed {rule.get('allowed_values')} vs server {enumvals}")
        # ALTER SYSTEM checks a value as the server would at reload, without applying it.
        if rule["type"] in ("integer", "float"):
            tries: list[Any] = [rule["min"], rule["max"]]
        elif rule["type"] == "boolean":
            tries = [True, False]
        else:
            tries = rule.get("allowed_values") or [current]
        for value in tries:
            statement = sql.SQL("ALTER SYSTEM SET {} = {}").format(
                sql.Identifier(name), _pg_literal(value)
            )
            try:
                postgres_admin.execute(statement)
            except psycopg.Error as exc:
                problems.append(f"{name}: the server refuses {value!r} ({exc})")
    postgres_admin.execute("ALTER SYSTEM RESET ALL")
    assert not problems, "\n".join(problems)


@pytest.fixture
def redis_admin(engine_user: str) -> Iterator[redis.Redis]:
    r = redis_fixtures
    with r.instance_root() as root:
        spec = r.make_spec(root, [r.free_loopback_address("127.10.249")], engine_user)
        with r.running_datastore(spec) as datastore:
            client = r.admin_client(datastore)
            try:
                yield client
            finally:
                client.close()


def test_redis_agrees_with_the_listed_rules(
    api: TenantApi, versions: dict[str, dict[str, Any]], redis_admin: redis.Redis
) -> None:
    problems = []
    for rule in _rules_listed(api, versions, "redis"):
        name = rule["name"]
        found = redis_admin.config_get(name)
        if name not in found:
            problems.append(f"{name}: no such config")
            continue
        current = found[name]
        if rule["restart_required"]:
            try:
                redis_admin.config_set(name, current)
                problems.append(f"{name}: changes live but the rule says restart")
            except redis.ResponseError as exc:
                if "immutable" not in str(exc):
                    problems.append(f"{name}: {exc}")
            continue
        if rule["type"] == "integer":
            tries: list[Any] = [rule["min"], rule["max"]]
        elif rule["type"] == "boolean":
            tries = ["yes", "no"]
        else:
            tries = rule.get("allowed_values") or [current]
        for value in tries:
            try:
                redis_admin.config_set(name, value)
            except redis.ResponseError as exc:
                problems.append(f"{name}: the server refuses {value!r} ({exc})")
        redis_admin.config_set(name, current)
        if redis_admin.config_get(name)[name] != current:
            problems.append(f"{name}: could not be set back to {current!r}")
    assert not problems, "\n".join(problems)
