"""Crashes never strand an instance: a taskmanager killed mid-create is replaced and the instance
ends ACTIVE (or ERROR with a fault), never stuck in BUILD; an engine that cannot start ends in
ERROR with the reason; a stopped ``coffer up`` leaves instances serving and finds them again."""

from __future__ import annotations

import signal
import socket
import sqlite3
import time
from collections.abc import Iterator

import pymysql
import pytest
from coffer_harness import (
    Coffer,
    TenantApi,
    coffer_environment,
    mariadb_instance,
    processes_under,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def services(engine_user: str) -> Iterator[Coffer]:
    with coffer_environment() as coffer:
        coffer.start("api", "api")
        coffer.wait_api()
        coffer.start("conductor", "conductor")
        coffer.start("taskmanager", "taskmanager")
        yield coffer


def _db(coffer: Coffer, sql: str, *args: str) -> list[tuple]:
    with sqlite3.connect(coffer.state_dir / "coffer.db") as conn:
        return conn.execute(sql, args).fetchall()


def _create_step(coffer: Coffer, instance_id: str) -> tuple[str, str] | None:
    rows = _db(
        coffer,
        "select state, step from operations where instance_id = ? and kind = 'create_instance'",
        instance_id,
    )
    return rows[0] if rows else None


def _engines(volume: object) -> list[int]:
    found = []
    for pid in processes_under(volume):  # type: ignore[arg-type]
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if b"mariadbd" in fh.read():
                    found.append(pid)
        except OSError:
            continue
    return found


@pytest.mark.parametrize("kill_at", ["create_server", "prepare"])
def test_taskmanager_killed_during_create(services: Coffer, kill_at: str) -> None:
    coffer = services
    api = TenantApi(coffer)
    instance_id = api.create(**mariadb_instance("survivor", "keep", "u1", "p1-secret"))

    deadline = time.monotonic() + 60
    while (_create_step(coffer, instance_id) or ("", ""))[1] != kill_at:
        assert time.monotonic() < deadline, _create_step(coffer, instance_id)
        time.sleep(0.01)
    coffer.stop("taskmanager", sig=signal.SIGKILL)
    assert api.show(instance_id)["status"] == "BUILD"

    coffer.start("taskmanager", "taskmanager")
    shown = api.wait_settled(instance_id)
    assert shown["status"] in ("ACTIVE", "ERROR"), shown
    if shown["status"] == "ERROR":
        assert shown["fault"]["message"], "an ERROR instance must say why"
    else:
        assert shown["operating_status"] == "HEALTHY"
        assert _create_step(coffer, instance_id) == ("done", "done")
        pymysql.connect(
            host=shown["addresses"][0]["address"], user="u1", password="p1-secret", database="keep"
        ).close()
    assert "p1-secret" not in coffer.log("taskmanager") + coffer.log("api")

    # Exactly one engine for this instance, whatever the crash did.
    volume = coffer.state_dir / "instances" / instance_id
    assert len(_engines(volume)) == 1

    api.delete_and_wait_gone(instance_id)
    assert not volume.exists()
    assert processes_under(volume) == []
    assert _db(coffer, "select count(*) from address_allocations") == [(0,)]
    assert _db(coffer, "select deleted from instances where id = ?", instance_id) == [(1,)]


def test_a_create_that_cannot_succeed_ends_in_error_with_a_fault(services: Coffer) -> None:
    """An instance whose engine cannot start goes to ERROR with the reason, not BUILD forever."""
    coffer = services
    api = TenantApi(coffer)
    # Occupy the address the next instance will get, so its engine cannot bind.
    used = {row[0] for row in _db(coffer, "select address from address_allocations")}
    pool = coffer.env["COFFER_COMPUTE__PRIVATE_POOL"].rsplit(".", 1)[0]
    address = next(f"{pool}.{n}" for n in range(1, 255) if f"{pool}.{n}" not in used)
    with socket.socket() as blocker:
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind((address, 3306))
        blocker.listen()
        instance_id = api.create(
            name="doomed", flavorRef="6", volume={"size": 1}, datastore={"type": "mariadb"}
        )
        shown = api.wait_settled(instance_id)
    assert shown["status"] == "ERROR", shown
    assert shown["fault"]["message"]
    api.delete_and_wait_gone(instance_id)


def test_instances_survive_coffer_up_restart(engine_user: str) -> None:
    """Ctrl-C stops Coffer cleanly; the instance keeps serving; the next `coffer up` finds it."""
    with coffer_environment() as coffer:
        coffer.start("up", "up")
        coffer.wait_api()
        api = TenantApi(coffer)
        instance_id = api.create(**mariadb_instance("durable", "dd", "u", "pw-durable"))
        shown = api.wait_settled(instance_id)
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
        api = TenantApi(coffer)
        assert api.show(instance_id)["status"] == "ACTIVE"
        # Its guest reconnects to the new bus and answers calls again.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            resp = api.request("GET", f"/instances/{instance_id}/users")
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
        reset = {"reset_status": {}}
        resp = api.request("POST", f"/instances/{instance_id}/action", json=reset)
        assert resp.status_code == 403
        admin = TenantApi(coffer, "admin", "admin")
        resp = admin.request("POST", f"/instances/{instance_id}/action", json=reset)
        assert resp.status_code == 202, resp.text
        assert api.wait_settled(instance_id)["status"] == "ACTIVE"
