"""Instances through the HTTP API of a real ``coffer up``: bad input gets the documented 4xx with
a clear message and changes nothing; tenants cannot see each other's instances."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pymysql
import pytest
from coffer_harness import VENV_BIN, Coffer, TenantApi, processes_under

pytestmark = pytest.mark.integration


def _counts(coffer: Coffer) -> tuple[int, int]:
    with sqlite3.connect(coffer.state_dir / "coffer.db") as conn:
        instances = conn.execute("select count(*) from instances").fetchone()[0]
        operations = conn.execute("select count(*) from operations").fetchone()[0]
    return instances, operations


def _create_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "api-test",
        "flavorRef": "6",
        "volume": {"size": 1},
        "datastore": {"type": "mariadb"},
        "databases": [{"name": "appdb"}],
        "users": [{"name": "app", "password": "app-pass", "databases": [{"name": "appdb"}]}],
    }
    body.update(overrides)
    return {"instance": body}


@pytest.fixture(scope="module")
def ready(coffer_up: Coffer) -> Iterator[tuple[TenantApi, str]]:
    api = TenantApi(coffer_up)
    resp = api.request("POST", "/instances", json=_create_body())
    assert resp.status_code == 200, resp.text
    instance_id = resp.json()["instance"]["id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        shown = api.request("GET", f"/instances/{instance_id}").json()["instance"]
        if shown["status"] == "ACTIVE":
            break
        assert shown["status"] == "BUILD", shown
        time.sleep(0.3)
    yield api, instance_id
    api.request("DELETE", f"/instances/{instance_id}")


BAD_CREATES = [
    ({"flavorRef": "no-such-flavor"}, 404, "flavor"),
    ({"datastore": {"type": "nosuchdb"}}, 404, "nosuchdb"),
    ({"datastore": {"type": "mariadb", "version": "0.0.1"}}, 404, "0.0.1"),
    ({"volume": {"size": 0}}, 400, "volume"),
    ({"volume": {"size": 500}}, 413, "largest accepted size"),
    ({"volume": None}, 400, "volume is required"),
    ({"databases": [{"name": "bad;db"}]}, 400, "bad;db"),
    ({"databases": [{"name": "mysql"}]}, 400, "reserved"),
    ({"databases": [{"name": "x" * 65}]}, 400, "64"),
    ({"users": [{"name": "root", "password": "pw"}]}, 400, "reserved"),
    ({"users": [{"name": "o'brien", "password": "pw"}]}, 400, "must not contain"),
    ({"users": [{"name": "app", "password": " padded"}]}, 400, "password"),
    (
        {"users": [{"name": "app", "password": "pw", "databases": [{"name": "other"}]}]},
        400,
        "not in the instance's databases",
    ),
    ({"name": ""}, 400, "Validation error"),
    ({"restorePoint": {"backupRef": "x"}}, 404, "could not be found"),
    ({"replica_of": "x"}, 501, "not supported"),
]


@pytest.mark.parametrize(("override", "status", "phrase"), BAD_CREATES)
def test_bad_create_is_refused_and_changes_nothing(
    coffer_up: Coffer, override: dict[str, Any], status: int, phrase: str
) -> None:
    api = TenantApi(coffer_up)
    before = _counts(coffer_up)
    resp = api.request("POST", "/instances", json=_create_body(**override))
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    (fault,) = resp.json().values()
    assert fault["code"] == status
    assert phrase.lower() in fault["message"].lower(), fault["message"]
    assert "pw" not in fault["message"].split() and "app-pass" not in fault["message"]
    assert _counts(coffer_up) == before


def test_malformed_bodies(coffer_up: Coffer) -> None:
    api = TenantApi(coffer_up)
    before = _counts(coffer_up)
    resp = api.request(
        "POST", "/instances", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert resp.status_code == 400
    assert "badRequest" in resp.json()
    resp = api.request("POST", "/instances", json={"instances": {}})
    assert resp.status_code == 400
    assert resp.json()["badRequest"]["message"].startswith("Validation error")
    assert _counts(coffer_up) == before


def test_authentication_and_project_scope(coffer_up: Coffer) -> None:
    api = TenantApi(coffer_up)
    admin = TenantApi(coffer_up, "admin", "admin")
    resp = api.request("GET", "/instances", token=None)
    assert resp.status_code == 401
    assert resp.json()["unauthorized"]["code"] == 401
    resp = api.request("GET", "/instances", token="not-a-token")
    assert resp.status_code == 401
    # demo's token on admin's project path
    before = _counts(coffer_up)
    resp = api.request("POST", "/instances", project=admin.project, json=_create_body())
    assert resp.status_code == 403
    assert "forbidden" in resp.json()
    assert _counts(coffer_up) == before


def test_duplicate_user_and_foreign_instance(
    ready: tuple[TenantApi, str], coffer_up: Coffer
) -> None:
    api, instance_id = ready
    resp = api.request(
        "POST",
        f"/instances/{instance_id}/users",
        json={"users": [{"name": "app", "password": "x"}]},
    )
    assert resp.status_code == 400
    assert "already exists" in resp.json()["badRequest"]["message"]
    # The original password still works: the duplicate changed nothing.
    shown = api.request("GET", f"/instances/{instance_id}").json()["instance"]
    address = shown["addresses"][0]["address"]
    conn = pymysql.connect(host=address, user="app", password="app-pass", database="appdb")
    conn.close()

    # Admins may look across projects...
    admin = TenantApi(coffer_up, "admin", "admin")
    resp = httpx.get(
        f"{coffer_up.base_url}/v1.0/{admin.project}/instances/{instance_id}",
        headers={"X-Auth-Token": admin.token},
    )
    assert resp.status_code == 200

    # ...another tenant cannot, and learns nothing: 404 (not 403), and an empty list.
    subprocess.run(
        [
            str(VENV_BIN / "coffer"),
            "manage",
            "user-create",
            "eve",
            "--project",
            "other",
            "--password-stdin",
        ],
        input="eve-password\n",
        env=coffer_up.env,
        check=True,
        capture_output=True,
        text=True,
    )
    body = {
        "auth": {
            "identity": {
                "methods": ["password"],
                "password": {
                    "user": {"name": "eve", "domain": {"id": "default"}, "password": "eve-password"}
                },
            },
            "scope": {"project": {"name": "other", "domain": {"id": "default"}}},
        }
    }
    token_resp = httpx.post(f"{coffer_up.base_url}/identity/v3/auth/tokens", json=body)
    assert token_resp.status_code == 201, token_resp.text
    eve_token = token_resp.headers["X-Subject-Token"]
    eve_project = token_resp.json()["token"]["project"]["id"]
    for method, path in [
        ("GET", f"/instances/{instance_id}"),
        ("DELETE", f"/instances/{instance_id}"),
        ("GET", f"/instances/{instance_id}/users"),
        ("POST", f"/instances/{instance_id}/root"),
    ]:
        resp = httpx.request(
            method,
            f"{coffer_up.base_url}/v1.0/{eve_project}{path}",
            headers={"X-Auth-Token": eve_token},
        )
        assert resp.status_code == 404, (method, path, resp.text)
    resp = httpx.get(
        f"{coffer_up.base_url}/v1.0/{eve_project}/instances", headers={"X-Auth-Token": eve_token}
    )
    assert resp.json() == {"instances": []}
    assert api.request("GET", f"/instances/{instance_id}").json()["instance"]["status"] == "ACTIVE"


def test_database_calls_on_a_building_instance_are_422(ready: tuple[TenantApi, str]) -> None:
    api, _ = ready
    resp = api.request("POST", "/instances", json=_create_body(name="still-building"))
    assert resp.status_code == 200
    new_id = resp.json()["instance"]["id"]
    try:
        resp = api.request("GET", f"/instances/{new_id}/databases")
        assert resp.status_code == 422
        assert "not ready" in resp.json()["unprocessableEntity"]["message"]
    finally:
        assert api.request("DELETE", f"/instances/{new_id}").status_code == 202


def test_engine_stop_shows_shutdown_and_reboot_recovers(
    ready: tuple[TenantApi, str], coffer_up: Coffer
) -> None:
    api, instance_id = ready
    admin = TenantApi(coffer_up, "admin", "admin")

    def shown() -> dict[str, Any]:
        resp = api.request("GET", f"/instances/{instance_id}")
        instance: dict[str, Any] = resp.json()["instance"]
        return instance

    before = shown()
    address = before["addresses"][0]["address"]
    assert before["volume"]["used"] > 0, "the guest reports the volume's used size"
    assert before["volume"]["size"] == 1

    # Non-admins may not stop engines.
    resp = api.request("POST", f"/mgmt/instances/{instance_id}/action", json={"stop": {}})
    assert resp.status_code == 403
    resp = admin.request("POST", f"/mgmt/instances/{instance_id}/action", json={"stop": {}})
    assert resp.status_code == 202, resp.text
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and shown()["operating_status"] != "SHUTDOWN":
        time.sleep(0.2)
    assert (shown()["status"], shown()["operating_status"]) == ("SHUTDOWN", "SHUTDOWN")
    with pytest.raises(pymysql.err.OperationalError):
        pymysql.connect(host=address, user="app", password="app-pass", connect_timeout=3)
    resp = api.request("GET", f"/instances/{instance_id}/users")
    assert resp.status_code == 422
    # The agent leaves a deliberately stopped engine alone across its own cycles.
    time.sleep(3)
    assert shown()["operating_status"] == "SHUTDOWN"

    resp = admin.request("POST", f"/mgmt/instances/{instance_id}/action", json={"reboot": {}})
    assert resp.status_code == 202, resp.text
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and shown()["operating_status"] != "HEALTHY":
        time.sleep(0.2)
    assert (shown()["status"], shown()["operating_status"]) == ("ACTIVE", "HEALTHY")
    pymysql.connect(host=address, user="app", password="app-pass", database="appdb").close()


def test_a_crashed_engine_is_restarted_by_its_agent(
    ready: tuple[TenantApi, str], coffer_up: Coffer
) -> None:
    api, instance_id = ready
    volume = coffer_up.state_dir / "instances" / instance_id
    engines = [p for p in processes_under(volume) if b"mariadbd" in _cmdline(p)]
    assert len(engines) == 1
    os.kill(engines[0], signal.SIGKILL)
    address = api.request("GET", f"/instances/{instance_id}").json()["instance"]["addresses"][0]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            pymysql.connect(
                host=address["address"], user="app", password="app-pass", database="appdb"
            ).close()
            break
        except pymysql.err.OperationalError:
            time.sleep(0.2)
    else:
        raise AssertionError("the engine was not restarted within 30 s")
    new = [p for p in processes_under(volume) if b"mariadbd" in _cmdline(p)]
    assert len(new) == 1 and new != engines


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read()
    except OSError:
        return b""
