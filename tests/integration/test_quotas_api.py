"""Quotas through a real ``coffer up`` and real MariaDB instances: 20 concurrent creates against a
quota of 10 leave exactly 10 instances and 10 x the flavor's RAM in usage; deleted instances and
a create that fails give their quota back."""

from __future__ import annotations

import socket
import sqlite3
import threading
import time
from typing import Any

import httpx
import pytest
from coffer_harness import Coffer, TenantApi

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FLAVOR = "6"  # d1.micro


def _usage(admin: TenantApi, project: str) -> dict[str, dict[str, Any]]:
    resp = admin.request("GET", f"/mgmt/quotas/{project}")
    assert resp.status_code == 200, resp.text
    return {row["resource"]: row for row in resp.json()["quotas"]}


def _instances(api: TenantApi) -> list[dict[str, Any]]:
    resp = api.request("GET", "/instances", params={"limit": 100})
    assert resp.status_code == 200, resp.text
    instances: list[dict[str, Any]] = resp.json()["instances"]
    return instances


def _wait(predicate: Any, timeout: float, what: str, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


def test_concurrent_creates_respect_the_quota_and_deletes_give_it_back(
    coffer_up: Coffer,
) -> None:
    api = TenantApi(coffer_up)
    admin = TenantApi(coffer_up, "admin", "admin")
    ram = api.request("GET", f"/flavors/{FLAVOR}").json()["flavor"]["ram"]
    put = admin.request(
        "PUT",
        f"/mgmt/quotas/{api.project}",
        json={"quotas": {"instances": 10, "ram": -1, "volumes": 40}},
    )
    assert put.status_code == 200, put.text
    assert _usage(admin, api.project)["instances"]["in_use"] == 0

    start = threading.Barrier(20)
    answers: list[httpx.Response] = []
    lock = threading.Lock()

    def create(n: int) -> None:
        body = {
            "instance": {
                "name": f"race-{n}",
                "flavorRef": FLAVOR,
                "volume": {"size": 1},
                "datastore": {"type": "mariadb"},
            }
        }
        start.wait()
        resp = api.request("POST", "/instances", json=body)
        with lock:
            answers.append(resp)

    threads = [threading.Thread(target=create, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    statuses = sorted(resp.status_code for resp in answers)
    assert statuses == [200] * 10 + [413] * 10, [r.text for r in answers if r.status_code >= 500]
    for resp in answers:
        if resp.status_code == 413:
            message = resp.json()["overLimit"]["message"]
            assert message.startswith("Quota exceeded for resources: ['instances'].")
    created = {r.json()["instance"]["id"] for r in answers if r.status_code == 200}

    # Exactly the winners exist and are charged, before any of them could fail or finish.
    assert {i["id"] for i in _instances(api)} == created
    usage = _usage(admin, api.project)
    assert usage["instances"]["in_use"] == 10
    assert usage["ram"]["in_use"] == 10 * ram
    assert usage["volumes"]["in_use"] == 10

    def all_settled() -> bool:
        return all(i["status"] != "BUILD" for i in _instances(api))

    _wait(all_settled, 240, "the 10 instances to finish building", interval=1.0)
    assert {i["status"] for i in _instances(api)} == {"ACTIVE"}
    assert _usage(admin, api.project)["ram"]["in_use"] == 10 * ram

    for instance_id in created:
        assert api.request("DELETE", f"/instances/{instance_id}").status_code == 202
    _wait(lambda: _instances(api) == [], 120, "the deletes", interval=1.0)
    usage = _usage(admin, api.project)
    assert {r: row["in_use"] for r, row in usage.items()} == dict.fromkeys(usage, 0)


def test_a_failed_create_gives_its_quota_back(coffer_up: Coffer) -> None:
    api = TenantApi(coffer_up)
    admin = TenantApi(coffer_up, "admin", "admin")
    before = _usage(admin, api.project)["instances"]["in_use"]
    # Occupy the address the next instance gets, so its engine cannot listen and the create fails.
    with sqlite3.connect(coffer_up.state_dir / "coffer.db") as conn:
        used = {row[0] for row in conn.execute("select address from address_allocations")}
    pool = coffer_up.env["COFFER_COMPUTE__PRIVATE_POOL"].rsplit(".", 1)[0]
    address = next(f"{pool}.{n}" for n in range(1, 255) if f"{pool}.{n}" not in used)
    with socket.socket() as blocker:
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind((address, 3306))
        blocker.listen()
        instance_id = api.create(
            name="doomed", flavorRef=FLAVOR, volume={"size": 1}, datastore={"type": "mariadb"}
        )
        assert _usage(admin, api.project)["instances"]["in_use"] == before + 1
        shown = api.wait_settled(instance_id, timeout=180)
    assert shown["status"] == "ERROR", shown
    # The instance is still there to be looked at, but holds no quota any more.
    usage = _usage(admin, api.project)
    assert usage["instances"]["in_use"] == before
    assert usage["ram"]["in_use"] == 0
    detail = admin.request("GET", f"/mgmt/instances/{instance_id}").json()["instance"]
    assert detail["quota_charges"] == {}
    assert detail["task"].startswith("building_error")
    api.delete_and_wait_gone(instance_id)
    assert _usage(admin, api.project)["instances"]["in_use"] == before
