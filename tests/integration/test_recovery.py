"""A taskmanager killed in the middle of a create is replaced and the instance ends ACTIVE (or
ERROR with a fault), never stuck in BUILD; delete then leaves nothing behind."""

from __future__ import annotations

import signal
import sqlite3
import time
from collections.abc import Iterator

import httpx
import pymysql
import pytest
from coffer_harness import Coffer, coffer_environment, processes_under

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def services(engine_user: str) -> Iterator[Coffer]:
    with coffer_environment() as coffer:
        coffer.start("api", "api")
        coffer.wait_api()
        coffer.start("conductor", "conductor")
        coffer.start("taskmanager", "taskmanager")
        yield coffer


def _step(coffer: Coffer, instance_id: str) -> tuple[str, str] | None:
    with sqlite3.connect(coffer.state_dir / "coffer.db") as conn:
        row = conn.execute(
            "select state, step from operations where instance_id = ? and kind = ?",
            (instance_id, "create_instance"),
        ).fetchone()
    return (row[0], row[1]) if row else None


def _wait_for_step(coffer: Coffer, instance_id: str, steps: set[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = _step(coffer, instance_id)
        if current and current[1] in steps:
            return
        time.sleep(0.01)
    raise AssertionError(f"operation never reached {steps}: {_step(coffer, instance_id)}")


@pytest.mark.parametrize("kill_at", ["create_server", "prepare"])
def test_taskmanager_killed_during_create(services: Coffer, kill_at: str) -> None:
    coffer = services
    token, project = coffer.token()
    api = f"{coffer.base_url}/v1.0/{project}"
    headers = {"X-Auth-Token": token}
    body = {
        "instance": {
            "name": "survivor",
            "flavorRef": "6",
            "volume": {"size": 1},
            "datastore": {"type": "mariadb"},
            "databases": [{"name": "keep"}],
            "users": [{"name": "u1", "password": "p1-secret", "databases": [{"name": "keep"}]}],
        }
    }
    resp = httpx.post(f"{api}/instances", json=body, headers=headers, timeout=30)
    assert resp.status_code == 200, resp.text
    instance_id = resp.json()["instance"]["id"]

    _wait_for_step(coffer, instance_id, {kill_at})
    coffer.stop("taskmanager", sig=signal.SIGKILL)
    shown = httpx.get(f"{api}/instances/{instance_id}", headers=headers).json()["instance"]
    assert shown["status"] == "BUILD"

    coffer.start("taskmanager", "taskmanager")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        shown = httpx.get(f"{api}/instances/{instance_id}", headers=headers).json()["instance"]
        if shown["status"] != "BUILD":
            break
        time.sleep(0.2)
    assert shown["status"] in ("ACTIVE", "ERROR"), shown
    if shown["status"] == "ERROR":
        assert shown["fault"]["message"], "an ERROR instance must say why"
    else:
        assert shown["operating_status"] == "HEALTHY"
        address = shown["addresses"][0]["address"]
        conn = pymysql.connect(host=address, user="u1", password="p1-secret", database="keep")
        conn.close()
    assert _step(coffer, instance_id) == ("done", "done") or shown["status"] == "ERROR"
    assert "p1-secret" not in coffer.log("taskmanager") + coffer.log("api")

    # Exactly one supervisor and one engine for this instance, whatever the crash did.
    volume = coffer.state_dir / "instances" / instance_id
    engines = [p for p in processes_under(volume) if "mariadbd" in _cmd(p)]
    assert len(engines) == 1

    assert httpx.delete(f"{api}/instances/{instance_id}", headers=headers).status_code == 202
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if httpx.get(f"{api}/instances/{instance_id}", headers=headers).status_code == 404:
            break
        time.sleep(0.2)
    assert httpx.get(f"{api}/instances/{instance_id}", headers=headers).status_code == 404
    assert not volume.exists()
    assert processes_under(volume) == []
    with sqlite3.connect(coffer.state_dir / "coffer.db") as conn:
        assert conn.execute("select count(*) from address_allocations").fetchone()[0] == 0
        deleted = conn.execute(
            "select deleted from instances where id = ?", (instance_id,)
        ).fetchone()
    assert deleted == (1,)


def _cmd(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_a_create_that_cannot_succeed_ends_in_error_with_a_fault(services: Coffer) -> None:
    """An instance whose engine cannot start goes to ERROR with the reason, not BUILD forever."""
    coffer = services
    token, project = coffer.token()
    api = f"{coffer.base_url}/v1.0/{project}"
    headers = {"X-Auth-Token": token}
    # Occupy the address the next instance will get, so its engine cannot bind.
    import socket

    with sqlite3.connect(coffer.state_dir / "coffer.db") as conn:
        used = {r[0] for r in conn.execute("select address from address_allocations")}
    pool = coffer.env["COFFER_COMPUTE__PRIVATE_POOL"].rsplit(".", 1)[0]
    address = next(f"{pool}.{n}" for n in range(1, 255) if f"{pool}.{n}" not in used)
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind((address, 3306))
    blocker.listen()
    try:
        body = {
            "instance": {
                "name": "doomed",
                "flavorRef": "6",
                "volume": {"size": 1},
                "datastore": {"type": "mariadb"},
            }
        }
        resp = httpx.post(f"{api}/instances", json=body, headers=headers, timeout=30)
        instance_id = resp.json()["instance"]["id"]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            shown = httpx.get(f"{api}/instances/{instance_id}", headers=headers).json()["instance"]
            if shown["status"] != "BUILD":
                break
            time.sleep(0.2)
        assert shown["status"] == "ERROR", shown
        assert shown["fault"]["message"]
    finally:
        blocker.close()
    assert httpx.delete(f"{api}/instances/{instance_id}", headers=headers).status_code == 202


def test_instances_survive_coffer_up_restart(engine_user: str) -> None:
    """Ctrl-C stops Coffer cleanly; the instance keeps serving; the next `coffer up` finds it."""
    with coffer_environment() as coffer:
        coffer.start("up", "up")
        coffer.wait_api()
        token, project = coffer.token()
        api = f"{coffer.base_url}/v1.0/{project}"
        headers = {"X-Auth-Token": token}
        body = {
            "instance": {
                "name": "durable",
                "flavorRef": "6",
                "volume": {"size": 1},
                "datastore": {"type": "mariadb"},
                "databases": [{"name": "dd"}],
                "users": [{"name": "u", "password": "pw-durable", "databases": [{"name": "dd"}]}],
            }
        }
        resp = httpx.post(f"{api}/instances", json=body, headers=headers)
        assert resp.status_code == 200, resp.text
        instance_id = resp.json()["instance"]["id"]
        shown = _wait_not_build(api, headers, instance_id)
        assert shown["status"] == "ACTIVE"
        address = shown["addresses"][0]["address"]

        coffer.stop("up", sig=signal.SIGINT)
        assert "Coffer stopped" in coffer.log("up")
        # The instance kept running without the control plane.
        conn = pymysql.connect(host=address, user="u", password="pw-durable", database="dd")
        with conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE t (v INT)")
            cur.execute("INSERT INTO t VALUES (42)")
            conn.commit()

        coffer.start("up", "up")
        coffer.wait_api()
        token, _ = coffer.token()
        headers = {"X-Auth-Token": token}
        shown = httpx.get(f"{api}/instances/{instance_id}", headers=headers).json()["instance"]
        assert shown["status"] == "ACTIVE"
        # Its guest reconnects to the new bus and answers calls again.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            resp = httpx.get(f"{api}/instances/{instance_id}/users", headers=headers, timeout=30)
            if resp.status_code == 200:
                break
            time.sleep(0.5)
        assert resp.status_code == 200, resp.text
        assert [u["name"] for u in resp.json()["users"]] == ["u"]
        conn = pymysql.connect(host=address, user="u", password="pw-durable", database="dd")
        with conn, conn.cursor() as cur:
            cur.execute("SELECT v FROM t")
            assert cur.fetchall() == ((42,),)

        # reset_status is for admins; it un-sticks the task and keeps the instance.
        resp = httpx.post(
            f"{api}/instances/{instance_id}/action", json={"reset_status": {}}, headers=headers
        )
        assert resp.status_code == 403
        admin_token, admin_project = coffer.token("admin", "admin")
        resp = httpx.post(
            f"{coffer.base_url}/v1.0/{admin_project}/instances/{instance_id}/action",
            json={"reset_status": {}},
            headers={"X-Auth-Token": admin_token},
        )
        assert resp.status_code == 202, resp.text
        assert _wait_not_build(api, headers, instance_id)["status"] == "ACTIVE"


def _wait_not_build(api: str, headers: dict[str, str], instance_id: str) -> dict:
    deadline = time.monotonic() + 120
    shown: dict = {}
    while time.monotonic() < deadline:
        shown = httpx.get(f"{api}/instances/{instance_id}", headers=headers).json()["instance"]
        if shown["status"] != "BUILD":
            return shown
        time.sleep(0.2)
    return shown
