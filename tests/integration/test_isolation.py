"""Roles and tenant isolation against a real ``coffer up`` and a real MariaDB instance: the allowed
paths of the routes that reach the guest (the unit matrix stops those before the guest), the
operator's view of the instance, and the audit log of what changed."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import pymysql
import pytest
from coffer_harness import VENV_BIN, Coffer, TenantApi, mariadb_instance

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class TokenApi(TenantApi):
    """A ``TenantApi`` for a user created by the test (the harness knows only admin and demo)."""

    def __init__(self, coffer: Coffer, token: str, project: str) -> None:
        self.coffer, self.token, self.project = coffer, token, project


def _user(coffer: Coffer, name: str, project: str, role: str, password: str) -> TenantApi:
    subprocess.run(
        [
            str(VENV_BIN / "coffer"),
            "manage",
            "user-create",
            name,
            "--project",
            project,
            "--role",
            role,
            "--password-stdin",
        ],
        input=password + "\n",
        env=coffer.env,
        check=True,
        capture_output=True,
        text=True,
    )
    body = {
        "auth": {
            "identity": {
                "methods": ["password"],
                "password": {
                    "user": {"name": name, "domain": {"id": "default"}, "password": password}
                },
            },
            "scope": {"project": {"name": project, "domain": {"id": "default"}}},
        }
    }
    resp = httpx.post(f"{coffer.base_url}/identity/v3/auth/tokens", json=body, timeout=10)
    assert resp.status_code == 201, resp.text
    return TokenApi(coffer, resp.headers["X-Subject-Token"], resp.json()["token"]["project"]["id"])


@pytest.fixture(scope="module")
def ready(coffer_up: Coffer) -> Iterator[tuple[TenantApi, str]]:
    api = TenantApi(coffer_up)
    instance_id = api.create(**mariadb_instance("isolated", "appdb", "app", "app-secret-pw"))
    shown = api.wait_settled(instance_id)
    assert shown["status"] == "ACTIVE", shown
    yield api, instance_id
    api.delete_and_wait_gone(instance_id)


def test_roles_on_a_real_instance(ready: tuple[TenantApi, str], coffer_up: Coffer) -> None:
    member, instance_id = ready
    reader = _user(coffer_up, "rita", "demo", "reader", "rita-secret-pw")
    eve = _user(coffer_up, "eve", "other", "member", "eve-secret-pw")
    admin = TenantApi(coffer_up, "admin", "admin")
    base = f"/instances/{instance_id}"

    # A reader of demo looks through to the engine, and changes nothing.
    listed = reader.request("GET", f"{base}/databases")
    assert listed.status_code == 200, listed.text
    assert [d["name"] for d in listed.json()["databases"]] == ["appdb"]
    assert reader.request("GET", f"{base}/users").json()["users"][0]["name"] == "app"
    refused = reader.request("POST", f"{base}/databases", json={"databases": [{"name": "rdb"}]})
    assert refused.status_code == 403
    assert "'instance:extension:database:create'" in refused.json()["forbidden"]["message"]
    assert reader.request("DELETE", base).status_code == 403

    # The member changes it; the change is real in the engine.
    created = member.request("POST", f"{base}/databases", json={"databases": [{"name": "newdb"}]})
    assert created.status_code == 202, created.text
    names = [d["name"] for d in reader.request("GET", f"{base}/databases").json()["databases"]]
    assert names == ["appdb", "newdb"]
    address = member.show(instance_id)["addresses"][0]["address"]
    conn = pymysql.connect(host=address, user="app", password="app-secret-pw", database="appdb")
    conn.close()

    # Another project learns nothing: 404 on its own URL, 403 on demo's.
    for method, path in [
        ("GET", base),
        ("GET", f"{base}/databases"),
        ("GET", f"{base}/users/app"),
        ("DELETE", f"{base}/databases/newdb"),
        ("POST", f"{base}/root"),
    ]:
        assert eve.request(method, path).status_code == 404, (method, path)
        assert eve.request(method, path, project=member.project).status_code == 403
    assert eve.request("GET", "/instances").json() == {"instances": []}
    assert eve.request("GET", f"/mgmt/instances/{instance_id}").status_code == 403

    # The admin acts across projects through the admin project's own URL.
    users = admin.request("GET", f"{base}/users")
    assert users.status_code == 200, users.text
    assert admin.request("DELETE", f"{base}/databases/newdb").status_code == 202
    names = [d["name"] for d in member.request("GET", f"{base}/databases").json()["databases"]]
    assert names == ["appdb"]


def test_operator_view_of_an_instance(ready: tuple[TenantApi, str], coffer_up: Coffer) -> None:
    member, instance_id = ready
    admin = TenantApi(coffer_up, "admin", "admin")
    resp = admin.request("GET", f"/mgmt/instances/{instance_id}")
    assert resp.status_code == 200, resp.text
    shown = resp.json()["instance"]
    assert shown["tenant_id"] == member.project
    assert shown["task"] == "none" and shown["service_status"] in ("running", "healthy")
    assert shown["engine"]["manager"] == "mariadb"
    assert shown["agent"]["alive"] is True
    assert shown["agent"]["heartbeat_age_seconds"] < 30  # heartbeats every 2 s here
    assert shown["server"]["private"] == shown["addresses"][0]["address"]
    assert shown["server"]["supervisor_pid"] > 0
    assert shown["quota_charges"] == {"instances": 1, "ram": 256, "volumes": 1}
    assert shown["operations"][-1]["kind"] == "create_instance"
    assert shown["operations"][-1]["state"] == "done"
    assert member.request("GET", f"/mgmt/instances/{instance_id}").status_code == 403
    listed = admin.request("GET", "/mgmt/instances", params={"project_id": member.project})
    assert instance_id in {i["id"] for i in listed.json()["instances"]}


def test_changes_are_audited_without_secrets(
    ready: tuple[TenantApi, str], coffer_up: Coffer
) -> None:
    member, instance_id = ready
    body = {"users": [{"name": "audited", "password": "audited-secret-pw"}]}
    resp = member.request("POST", f"/instances/{instance_id}/users", json=body)
    assert resp.status_code == 202, resp.text
    request_id = resp.headers["X-Openstack-Request-Id"]
    lines = _audit_lines(coffer_up.log("up"))
    (line,) = [entry for entry in lines if entry["request_id"] == request_id]
    assert line["action"] == "instance:extension:user:create"
    assert line["outcome"] == 202
    assert line["user_name"] == "demo" and line["project_id"] == member.project
    assert line["target"] == {"project": member.project, "instance_id": instance_id}
    log = coffer_up.log("up")
    assert "audited-secret-pw" not in log and "app-secret-pw" not in log
    assert member.token not in log
    creates = [e for e in lines if e["action"] == "instance:create" and e["outcome"] == 200]
    assert creates and creates[0]["target"]["instance_id"] == instance_id


def _audit_lines(log: str) -> list[dict[str, Any]]:
    found = []
    for text in log.splitlines():
        _, marker, rest = text.partition(" coffer.audit: ")
        if marker:
            found.append(json.loads(rest))
    return found


def test_request_ids_on_every_answer(coffer_up: Coffer) -> None:
    api = TenantApi(coffer_up)
    answers = [
        httpx.get(f"{coffer_up.base_url}/"),
        api.request("GET", "/instances", token=None),
        api.request("GET", "/instances/no-such-id"),
        api.request("GET", "/mgmt/instances"),
        api.request("GET", "/limits"),
    ]
    assert [r.status_code for r in answers] == [200, 401, 404, 403, 200]
    ids = [r.headers["X-Openstack-Request-Id"] for r in answers]
    assert all(i.startswith("req-") for i in ids) and len(set(ids)) == len(ids)
