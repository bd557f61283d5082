"""Backup schedules on a real ``coffer up`` with a real Redis instance (file storage): the
taskmanager runs due slots as real backups, a slot missed for a long time runs once, a manual
backup is never retention's, retention deletes the schedule's oldest backup (row and stored
object), and deleting the instance deletes its schedules but not its backups.

The clock is advanced the way a long wait would: the schedule's persisted ``next_run`` is moved
into the past in the control DB (a yearly pattern keeps it from coming due by itself).
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

import pytest
import redis
from coffer_harness import Coffer, TenantApi

pytestmark = pytest.mark.integration

PASSWORD = "sched-Secret-pw-1"


@pytest.fixture(scope="module")
def api(coffer_up: Coffer) -> TenantApi:
    return TenantApi(coffer_up)


def _make_due(coffer: Coffer, schedule_id: str, when: str) -> None:
    with sqlite3.connect(coffer.state_dir / "coffer.db", timeout=30) as conn:
        conn.execute("UPDATE backup_schedules SET next_run = ? WHERE id = ?", (when, schedule_id))


def _runs(coffer: Coffer, schedule_id: str) -> int:
    with sqlite3.connect(coffer.state_dir / "coffer.db", timeout=30) as conn:
        (count,) = conn.execute(
            "SELECT count(*) FROM backup_schedule_runs WHERE schedule_id = ?", (schedule_id,)
        ).fetchone()
    return int(count)


def _schedule(api: TenantApi, schedule_id: str) -> dict[str, Any]:
    resp = api.request("GET", f"/backup_schedules/{schedule_id}")
    assert resp.status_code == 200, resp.text
    shown: dict[str, Any] = resp.json()["backup_schedule"]
    return shown


def _wait_run(api: TenantApi, coffer: Coffer, schedule_id: str, runs: int) -> dict[str, Any]:
    """Wait until the schedule has made ``runs`` runs and the latest one has ended."""
    deadline = time.monotonic() + 180
    while True:
        shown = _schedule(api, schedule_id)
        if _runs(coffer, schedule_id) >= runs and shown["last_result"] in (
            "completed",
            "failed",
            "refused",
        ):
            return shown
        assert time.monotonic() < deadline, shown
        time.sleep(0.2)


def _backups(api: TenantApi, instance_id: str) -> list[dict[str, Any]]:
    resp = api.request("GET", f"/instances/{instance_id}/backups")
    assert resp.status_code == 200, resp.text
    found: list[dict[str, Any]] = resp.json()["backups"]
    return found


def _wait_backup(api: TenantApi, backup_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while True:
        backup: dict[str, Any] = api.request("GET", f"/backups/{backup_id}").json()["backup"]
        if backup["status"] in ("COMPLETED", "FAILED"):
            return backup
        assert time.monotonic() < deadline, backup
        time.sleep(0.2)


def _stored(coffer: Coffer, backup_id: str) -> bool:
    directory = coffer.state_dir / "backups"
    return directory.is_dir() and any(backup_id in p.name for p in directory.iterdir())


def test_a_schedule_takes_backups_and_retention_deletes_the_oldest(
    coffer_up: Coffer, api: TenantApi
) -> None:
    coffer = coffer_up
    body = {
        "name": "scheduled-redis",
        "flavorRef": "6",
        "volume": {"size": 1},
        "datastore": {"type": "redis"},
        "users": [{"name": "app", "password": PASSWORD}],
    }
    instance_id = api.create(**body)
    shown = api.wait_settled(instance_id, timeout=180)
    assert shown["status"] == "ACTIVE", shown
    client = redis.Redis(host=shown["ip"][0], username="app", password=PASSWORD)
    client.set("counter", 0)

    spec = {
        "instance": instance_id,
        "name": "yearly",
        "pattern": "0 0 1 1 *",
        "retention": {"count": 2},
    }
    resp = api.request("POST", "/backup_schedules", json={"backup_schedule": spec})
    assert resp.status_code == 200, resp.text
    schedule = resp.json()["backup_schedule"]
    schedule_id = schedule["id"]
    assert schedule["next_run"].endswith("-01-01T00:00:00") and schedule["last_run"] is None

    # First slot: missed for decades, run once.
    _make_due(coffer, schedule_id, "2000-01-01 00:00:00.000000")
    shown_schedule = _wait_run(api, coffer, schedule_id, 1)
    assert shown_schedule["last_result"] == "completed", shown_schedule
    time.sleep(2.5)  # a few scheduler ticks: nothing else runs for the missed slots
    assert _runs(coffer, schedule_id) == 1
    assert _schedule(api, schedule_id)["next_run"].endswith("-01-01T00:00:00")
    first = _wait_backup(api, shown_schedule["last_backup_id"])
    assert first["status"] == "COMPLETED" and first["instance_id"] == instance_id
    assert first["name"].startswith("yearly ") and first["size_bytes"] > 0

    # A manual backup in between: the schedule's retention never touches it.
    resp = api.request(
        "POST", "/backups", json={"backup": {"name": "by hand", "instance": instance_id}}
    )
    assert resp.status_code == 202, resp.text
    manual = _wait_backup(api, resp.json()["backup"]["id"])
    assert manual["status"] == "COMPLETED"

    made = [first["id"]]
    for run in (2, 3):
        client.incr("counter")
        _make_due(coffer, schedule_id, f"200{run}-01-01 00:00:00.000000")
        shown_schedule = _wait_run(api, coffer, schedule_id, run)
        assert shown_schedule["last_result"] == "completed", shown_schedule
        made.append(shown_schedule["last_backup_id"])
    client.close()

    # Three scheduled backups with a count of two: the oldest goes, row and object.
    deadline = time.monotonic() + 60
    while api.request("GET", f"/backups/{made[0]}").status_code != 404:
        assert time.monotonic() < deadline, "retention did not delete the oldest backup"
        time.sleep(0.2)
    assert not _stored(coffer, made[0])
    listed = {b["id"]: b["status"] for b in _backups(api, instance_id)}
    assert listed == {made[1]: "COMPLETED", made[2]: "COMPLETED", manual["id"]: "COMPLETED"}
    assert all(_stored(coffer, b) for b in listed)

    # Deleting the instance deletes its schedule, not its backups.
    api.delete_and_wait_gone(instance_id, timeout=120)
    deadline = time.monotonic() + 30
    while api.request("GET", f"/backup_schedules/{schedule_id}").status_code != 404:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    with sqlite3.connect(coffer.state_dir / "coffer.db", timeout=30) as conn:
        deadline = time.monotonic() + 30
        while conn.execute(
            "SELECT count(*) FROM backup_schedules WHERE id = ?", (schedule_id,)
        ).fetchone() != (0,):
            assert time.monotonic() < deadline, "the taskmanager kept a deleted instance's schedule"
            time.sleep(0.2)
    for backup_id in listed:
        assert api.request("GET", f"/backups/{backup_id}").json()["backup"]["status"] == "COMPLETED"
        assert api.request("DELETE", f"/backups/{backup_id}").status_code == 202
