"""Day-2 operations on a real MariaDB instance, through the HTTP API of a real ``coffer up``:
configuration groups applied live and on restart, restart, resize of flavor and volume with live
data, access changes checked by real connects, refusals that change nothing, and the events an
owner lists afterwards. One instance serves the module; tests run in file order and each leaves
it ACTIVE.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pymysql
import pytest
from coffer_harness import Coffer, TenantApi, mariadb_instance, quota_in_use

pytestmark = pytest.mark.integration

PASSWORD = "app-Pass-1"
GIB = 1024**3
#: max_connections my.cnf gives a 256 MB flavor (ram / 6).
DEFAULT_MAX_CONNECTIONS = 42
#: innodb_log_buffer_size my.cnf gives flavors under 1 GB (4M).
DEFAULT_LOG_BUFFER = 4 * 1024 * 1024
SETTLE_SECONDS = 30


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (pymysql.MySQLError, OSError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen within {timeout:g} s (last: {last!r})")


@dataclass
class Maria:
    coffer: Coffer
    api: TenantApi
    id: str

    @property
    def directory(self) -> Path:
        return self.coffer.state_dir / "instances" / self.id

    def show(self) -> dict[str, Any]:
        return self.api.show(self.id)

    def address(self, kind: str = "private") -> str | None:
        found = [a["address"] for a in self.show()["addresses"] if a["type"] == kind]
        return found[0] if found else None

    def connect(self, address: str | None = None) -> pymysql.connections.Connection:
        return pymysql.connect(
            host=address or self.address(),
            user="app",
            password=PASSWORD,
            database="appdb",
            connect_timeout=5,
            autocommit=True,
        )

    def variable(self, name: str) -> Any:
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(f"SELECT @@GLOBAL.{name}")
                row = cur.fetchone()
        finally:
            conn.close()
        assert row is not None
        return row[0]

    def engine_pid(self) -> int:
        return int((self.directory / "run" / "mariadbd.pid").read_text())

    def agent_pid(self) -> int:
        # "<pid> <start time>": the supervisor's record of the agent it runs.
        return int((self.directory / "run" / "agent.pid").read_text().split()[0])

    def settled(self, status: str = "ACTIVE") -> dict[str, Any]:
        """Wait until the instance is ``status`` (ACTIVE: with a HEALTHY engine)."""

        def check() -> dict[str, Any] | None:
            shown = self.show()
            healthy = status != "ACTIVE" or shown["operating_status"] == "HEALTHY"
            return shown if shown["status"] == status and healthy else None

        result: dict[str, Any] = wait_for(f"instance {status}", check, SETTLE_SECONDS)
        return result

    def act(self, body: dict[str, Any]) -> Any:
        return self.api.request("POST", f"/instances/{self.id}/action", json=body)

    def update(self, **instance: Any) -> Any:
        return self.api.request("PUT", f"/instances/{self.id}", json={"instance": instance})

    def events(self) -> list[dict[str, Any]]:
        resp = self.api.request("GET", f"/instances/{self.id}/events")
        assert resp.status_code == 200, resp.text
        events: list[dict[str, Any]] = resp.json()["events"]
        return events


@pytest.fixture(scope="module")
def maria(coffer_up: Coffer) -> Iterator[Maria]:
    api = TenantApi(coffer_up)
    instance_id = api.create(**mariadb_instance("day2", "appdb", "app", PASSWORD))
    instance = Maria(coffer_up, api, instance_id)
    instance.settled()
    yield instance
    api.delete_and_wait_gone(instance_id)


def _group(api: TenantApi, name: str, values: dict[str, Any], datastore: str = "mariadb") -> str:
    body = {"configuration": {"name": name, "values": values, "datastore": {"type": datastore}}}
    resp = api.request("POST", "/configurations", json=body)
    assert resp.status_code == 200, resp.text
    group_id: str = resp.json()["configuration"]["id"]
    return group_id


def test_configuration_group_applies_live_and_detach_restores_the_default(maria: Maria) -> None:
    pid = maria.engine_pid()
    assert maria.variable("max_connections") == DEFAULT_MAX_CONNECTIONS
    group = _group(maria.api, "conns", {"max_connections": 555})

    assert maria.update(configuration=group).status_code == 202
    wait_for("max_connections 555", lambda: maria.variable("max_connections") == 555)
    shown = maria.settled()
    assert shown["configuration"]["id"] == group
    assert shown["configuration"]["name"] == "conns"

    # A changed group reaches the instance it is attached to at once: the PATCH itself records
    # the apply (the owner's event), the taskmanager's poll is not what carries it.
    patch = {"configuration": {"values": {"max_connections": 666}}}
    resp = maria.api.request("PATCH", f"/configurations/{group}", json=patch)
    assert resp.status_code == 200, resp.text
    applied = maria.events()[0]
    assert applied["action"] == "apply_configuration" and applied["user_id"] is not None
    wait_for("max_connections 666", lambda: maria.variable("max_connections") == 666)
    maria.settled()

    assert maria.update(configuration=None).status_code == 202
    wait_for(
        "the default max_connections",
        lambda: maria.variable("max_connections") == DEFAULT_MAX_CONNECTIONS,
    )
    assert "configuration" not in maria.settled()
    assert maria.engine_pid() == pid, "the engine was restarted for dynamic values"

    events = maria.events()[:3]
    assert [(e["action"], e["state"]) for e in events] == [
        ("detach_configuration", "succeeded"),
        ("apply_configuration", "succeeded"),
        ("attach_configuration", "succeeded"),
    ]
    # The owner attached, changed the group and detached.
    assert events[0]["user_id"] == events[1]["user_id"] == events[2]["user_id"] is not None
    assert events[1]["details"] == {"configuration_id": group}
    assert all(e["finished"] >= e["created"] and e["fault"] is None for e in events)
    assert maria.api.request("DELETE", f"/configurations/{group}").status_code == 202


def test_restart_required_values_wait_for_a_restart_and_survive_restarts(maria: Maria) -> None:
    group = _group(
        maria.api,
        "needs-restart",
        {"max_connections": 300, "innodb_log_buffer_size": 8 * 1024 * 1024},
    )
    pid = maria.engine_pid()
    assert maria.update(configuration=group).status_code == 202
    maria.settled("RESTART_REQUIRED")
    assert maria.variable("max_connections") == 300  # dynamic: already live
    assert maria.variable("innodb_log_buffer_size") == DEFAULT_LOG_BUFFER
    assert maria.engine_pid() == pid
    # As in Trove, a group is detached (or attached) only with nothing pending (task NONE).
    resp = maria.update(configuration=None)
    assert resp.status_code == 422, resp.text
    assert "RESTART_REQUIRED" in resp.json()["unprocessableEntity"]["message"]
    assert maria.show()["configuration"]["id"] == group

    assert maria.act({"restart": {}}).status_code == 202
    maria.settled()
    assert maria.engine_pid() != pid
    assert maria.variable("innodb_log_buffer_size") == 8 * 1024 * 1024
    assert maria.variable("max_connections") == 300

    # The guest agent dies and its supervisor starts a new one; the values are still the
    # engine's after the next restart.
    agent_pid = maria.agent_pid()
    os.kill(agent_pid, signal.SIGKILL)
    wait_for("a new guest agent", lambda: maria.agent_pid() != agent_pid)
    pid = maria.engine_pid()
    assert maria.act({"restart": {}}).status_code == 202
    wait_for("the engine restarted", lambda: maria.engine_pid() != pid)
    maria.settled()
    assert maria.variable("innodb_log_buffer_size") == 8 * 1024 * 1024
    assert maria.variable("max_connections") == 300

    # The engine crashes; the agent starts it again, with the values.
    pid = maria.engine_pid()
    os.kill(pid, signal.SIGKILL)
    wait_for("the engine started again", lambda: maria.engine_pid() != pid)
    maria.settled()
    wait_for(
        "the values after the crash",
        lambda: maria.variable("innodb_log_buffer_size") == 8 * 1024 * 1024,
    )
    assert maria.variable("max_connections") == 300

    # Detaching takes max_connections back live; the log buffer waits for a restart again.
    assert maria.update(configuration=None).status_code == 202
    maria.settled("RESTART_REQUIRED")
    assert maria.variable("max_connections") == DEFAULT_MAX_CONNECTIONS
    assert maria.act({"restart": {}}).status_code == 202
    maria.settled()
    assert maria.variable("innodb_log_buffer_size") == DEFAULT_LOG_BUFFER
    assert maria.api.request("DELETE", f"/configurations/{group}").status_code == 202


def test_a_value_the_engine_refuses_fails_cleanly_and_says_why(maria: Maria) -> None:
    # The rules take any time_zone string; the server knows no such zone.
    group = _group(maria.api, "bad-zone", {"time_zone": "Nowhere/Land", "max_connections": 99})
    assert maria.update(configuration=group).status_code == 202

    def failed() -> dict[str, Any] | None:
        event = maria.events()[0]
        return event if event["state"] == "failed" else None

    event = wait_for("the attach to fail", failed)
    assert event["action"] == "attach_configuration"
    assert "time_zone" in event["fault"]["message"], event
    shown = maria.settled()
    assert "configuration" not in shown  # the attach was undone...
    assert maria.variable("max_connections") == DEFAULT_MAX_CONNECTIONS  # ...in the engine too
    assert maria.api.request("DELETE", f"/configurations/{group}").status_code == 202


def test_resize_volume_then_flavor_keeps_every_row(maria: Maria) -> None:
    conn = maria.connect()
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE kept (id INT PRIMARY KEY, note VARCHAR(40))")
        cur.executemany(
            "INSERT INTO kept VALUES (%s, %s)", [(i, f"row {i}") for i in range(1, 501)]
        )
    volumes, ram = (
        quota_in_use(maria.api, maria.api.project, "volumes"),
        quota_in_use(maria.api, maria.api.project, "ram"),
    )
    pid = maria.engine_pid()

    assert maria.act({"resize": {"volume": {"size": 2}}}).status_code == 202
    shown = maria.settled()
    assert shown["volume"]["size"] == 2
    admin = TenantApi(maria.coffer, "admin", "admin")
    mgmt = admin.request("GET", f"/mgmt/instances/{maria.id}").json()["instance"]
    assert mgmt["volume"]["total_bytes"] == 2 * GIB
    assert quota_in_use(maria.api, maria.api.project, "volumes") == volumes + 1
    # Online: the same engine, and a session opened before the resize still works.
    assert maria.engine_pid() == pid
    with conn.cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM kept")
        assert cur.fetchone() == (500,)
    conn.close()

    assert maria.variable("innodb_buffer_pool_size") == 64 * 1024 * 1024
    assert maria.act({"resize": {"flavorRef": "1"}}).status_code == 202
    assert maria.show()["status"] in ("RESIZE", "ACTIVE")
    shown = maria.settled()
    assert shown["flavor"]["id"] == "1"
    # 512 MB: half for the buffer pool, ram / 6 connections.
    assert maria.variable("innodb_buffer_pool_size") == 256 * 1024 * 1024
    assert maria.variable("max_connections") == 85
    assert quota_in_use(maria.api, maria.api.project, "ram") == ram + 256
    with maria.connect() as again, again.cursor() as cur:
        cur.execute("SELECT COUNT(*), SUM(id) FROM kept")
        assert cur.fetchone() == (500, 500 * 501 // 2)

    # And back down: the quota gives the RAM back once the resize is done.
    assert maria.act({"resize": {"flavorRef": "6"}}).status_code == 202
    assert maria.settled()["flavor"]["id"] == "6"
    assert maria.variable("innodb_buffer_pool_size") == 64 * 1024 * 1024
    assert quota_in_use(maria.api, maria.api.project, "ram") == ram
    events = [(e["action"], e["state"], e["details"]) for e in maria.events()[:3]]
    assert events == [
        ("resize_flavor", "succeeded", {"old_flavor": "1", "new_flavor": "6"}),
        ("resize_flavor", "succeeded", {"old_flavor": "6", "new_flavor": "1"}),
        ("resize_volume", "succeeded", {"old_size": 1, "new_size": 2}),
    ]


def _refused(address: str) -> bool:
    try:
        conn = pymysql.connect(
            host=address, user="app", password=PASSWORD, database="appdb", connect_timeout=3
        )
    except pymysql.err.OperationalError as exc:
        return exc.args[0] in (2003, 2013)
    conn.close()
    return False


def test_access_public_private_public_settles_within_30_seconds(maria: Maria) -> None:
    private = maria.address()
    assert private is not None and maria.address("public") is None

    started = time.monotonic()
    assert maria.update(access={"is_public": True}).status_code == 202
    shown = maria.settled()
    public = maria.address("public")
    assert public is not None and shown["access"]["is_public"] is True
    with maria.connect(public) as conn, conn.cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM kept")
        assert cur.fetchone() == (500,)
    assert time.monotonic() - started < SETTLE_SECONDS

    started = time.monotonic()
    assert maria.update(access={"is_public": False}).status_code == 202
    shown = maria.settled()
    assert maria.address("public") is None and shown["access"]["is_public"] is False
    assert _refused(public), f"the engine still answers on the released address {public}"
    with maria.connect(private) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1")
    assert time.monotonic() - started < SETTLE_SECONDS

    started = time.monotonic()
    assert maria.update(access={"is_public": True}).status_code == 202
    maria.settled()
    public = maria.address("public")
    assert public is not None
    with maria.connect(public) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1")
    assert time.monotonic() - started < SETTLE_SECONDS
    assert [e["action"] for e in maria.events()[:3]] == ["update_access"] * 3


def _fingerprint(maria: Maria) -> tuple[Any, ...]:
    shown = maria.show()
    return (
        shown["flavor"]["id"],
        shown["volume"]["size"],
        shown["access"],
        shown.get("configuration"),
        [a["address"] for a in shown["addresses"]],
        len(maria.events()),
        quota_in_use(maria.api, maria.api.project, "ram"),
        quota_in_use(maria.api, maria.api.project, "volumes"),
    )


def test_bad_requests_are_refused_and_change_nothing(maria: Maria) -> None:
    postgres_group = _group(maria.api, "pg", {"work_mem": 8192}, datastore="postgresql")
    before = _fingerprint(maria)
    cases: list[tuple[str, dict[str, Any], int, str]] = [
        ("action", {"resize": {"volume": {"size": 1}}}, 400, "larger than the current"),
        ("action", {"resize": {"volume": {"size": 500}}}, 413, "largest accepted"),
        ("action", {"resize": {"volume": {"size": "two"}}}, 400, "whole number"),
        ("action", {"resize": {"flavorRef": "no-such"}}, 404, "not found"),
        ("action", {"resize": {"flavorRef": "6"}}, 400, "already has flavor"),
        ("action", {"resize": {}}, 400, "flavorRef"),
        ("action", {"restart": {"now": True}}, 400, "no arguments"),
        ("update", {"configuration": "no-such-group"}, 404, "could not be found"),
        ("update", {"configuration": postgres_group}, 400, "another datastore version"),
        ("update", {"access": {"allowed_cidrs": ["not-a-cidr"]}}, 400, "not-a-cidr"),
        ("update", {"datastore_version": "no-such"}, 404, "no version"),
    ]
    for kind, body, status, phrase in cases:
        resp = maria.act(body) if kind == "action" else maria.update(**body)
        assert resp.status_code == status, (body, resp.text)
        (fault,) = resp.json().values()
        assert phrase.lower() in fault["message"].lower(), (body, fault["message"])
    # The host has one MariaDB: upgrading to the version it runs is refused clearly.
    version = maria.show()["datastore"]["version"]
    resp = maria.update(datastore_version=version)
    assert resp.status_code == 400 and "already runs" in resp.text
    assert _fingerprint(maria) == before
    assert maria.api.request("DELETE", f"/configurations/{postgres_group}").status_code == 202


def _start_backup(api: TenantApi, instance_id: str, name: str) -> str:
    body = {"backup": {"name": name, "instance": instance_id}}
    resp = api.request("POST", "/backups", json=body)
    assert resp.status_code == 202, resp.text
    backup_id: str = resp.json()["backup"]["id"]
    return backup_id


def _ended_backup(api: TenantApi, backup_id: str) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        resp = api.request("GET", f"/backups/{backup_id}")
        assert resp.status_code == 200, resp.text
        backup: dict[str, Any] = resp.json()["backup"]
        return backup if backup["status"] in ("COMPLETED", "FAILED") else None

    result: dict[str, Any] = wait_for(f"backup {backup_id} to end", ended, 180)
    return result


def test_operations_on_an_instance_that_is_not_active_are_refused(maria: Maria) -> None:
    group = _group(maria.api, "later", {"max_connections": 123})
    version = maria.show()["datastore"]["version"]
    attempts: list[tuple[str, dict[str, Any]]] = [
        ("action", {"restart": {}}),
        ("action", {"resize": {"flavorRef": "1"}}),
        ("action", {"resize": {"volume": {"size": 3}}}),
        ("update", {"configuration": group}),
        ("update", {"access": {"is_public": False}}),
        ("update", {"datastore_version": version}),
    ]

    def refuse_all(skip_restart: bool = False, phrase: str = "ACTIVE") -> None:
        for kind, body in attempts:
            if skip_restart and "restart" in body:
                continue
            resp = maria.act(body) if kind == "action" else maria.update(**body)
            assert resp.status_code == 422, (body, resp.text)
            message = resp.json()["unprocessableEntity"]["message"]
            assert "ACTIVE" in message and phrase in message, (body, message)

    # A backup is being taken: the instance reads BACKUP and takes nothing, not even a restart
    # (Trove's rule). The guest agent is paused meanwhile, so the backup cannot end before
    # every refusal has been seen.
    before = _fingerprint(maria)
    agent = maria.agent_pid()
    os.kill(agent, signal.SIGSTOP)
    try:
        backup_id = _start_backup(maria.api, maria.id, "while refusing")
        assert maria.show()["status"] == "BACKUP"
        refuse_all(phrase="BACKUP")
        # A rename alone touches no engine: Trove takes it in any state.
        assert maria.update(name="day2").status_code == 202
    finally:
        os.kill(agent, signal.SIGCONT)
    assert _ended_backup(maria.api, backup_id)["status"] == "COMPLETED"
    maria.settled()
    assert _fingerprint(maria) == before
    resp = maria.api.request("DELETE", f"/backups/{backup_id}")
    assert resp.status_code == 202, resp.text

    # Busy: a restart holds the instance (REBOOT) until it is done. The guest agent is paused
    # meanwhile, so the restart cannot finish before every refusal has been seen.
    before = _fingerprint(maria)
    agent = maria.agent_pid()
    os.kill(agent, signal.SIGSTOP)
    try:
        assert maria.act({"restart": {}}).status_code == 202
        assert maria.show()["status"] == "REBOOT"
        refuse_all()
    finally:
        os.kill(agent, signal.SIGCONT)
    maria.settled()
    events = maria.events()
    assert events[0]["action"] == "restart" and events[0]["state"] == "succeeded"
    assert _fingerprint(maria)[:5] == before[:5]
    assert _fingerprint(maria)[5] == before[5] + 1  # the one restart, nothing else

    # Stopped by an operator: SHUTDOWN refuses everything but a restart (Trove's rule).
    admin = TenantApi(maria.coffer, "admin", "admin")
    resp = admin.request("POST", f"/mgmt/instances/{maria.id}/action", json={"stop": {}})
    assert resp.status_code == 202, resp.text
    maria.settled("SHUTDOWN")
    before = _fingerprint(maria)
    refuse_all(skip_restart=True)
    assert _fingerprint(maria) == before
    assert maria.act({"restart": {}}).status_code == 202
    maria.settled()
    assert maria.api.request("DELETE", f"/configurations/{group}").status_code == 202


def _signal_pending(pid: int, signum: int) -> bool:
    """True when ``signum`` waits for ``pid`` to take it (a stopped process takes none)."""
    pending = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("SigPnd:", "ShdPnd:")):
            pending |= int(line.split()[1], 16)
    return bool(pending & (1 << (signum - 1)))


def _backups_in_use(coffer: Coffer, project: str) -> int:
    return quota_in_use(TenantApi(coffer, "admin", "admin"), project, "backups")


def test_delete_during_a_backup_is_taken_and_the_backup_fails(maria: Maria) -> None:
    """As in Trove, only BUILD refuses a delete: a backup being taken does not. The backup
    ends FAILED, says why, leaves no object and gives its quota back."""
    api = maria.api
    doomed = Maria(maria.coffer, api, api.create(**mariadb_instance("doomed", "db", "u", PASSWORD)))
    deleted = False
    try:
        doomed.settled()
        in_use = _backups_in_use(maria.coffer, api.project)
        agent = doomed.agent_pid()
        # Paused, the agent cannot start (let alone finish) the backup before the delete.
        os.kill(agent, signal.SIGSTOP)
        try:
            backup_id = _start_backup(api, doomed.id, "cut short")
            assert doomed.show()["status"] == "BACKUP"
            resp = api.request("DELETE", f"/instances/{doomed.id}")
            assert resp.status_code == 202, resp.text
            deleted = True
            # The delete has reached the server: its supervisor told the agent to stop.
            wait_for("the agent told to stop", lambda: _signal_pending(agent, signal.SIGTERM))
        finally:
            os.kill(agent, signal.SIGCONT)
        wait_for(
            "the instance gone",
            lambda: api.request("GET", f"/instances/{doomed.id}").status_code == 404,
            90,
        )
        backup = _ended_backup(api, backup_id)
        assert backup["status"] == "FAILED", backup
        assert "deleted" in backup["fail_reason"], backup
        stored = maria.coffer.state_dir / "backups"
        objects = [p.name for p in stored.iterdir()] if stored.is_dir() else []
        assert not [name for name in objects if backup_id in name], objects
        assert _backups_in_use(maria.coffer, api.project) == in_use
        resp = api.request("DELETE", f"/backups/{backup_id}")
        assert resp.status_code == 202, resp.text
    finally:
        if not deleted:
            api.request("DELETE", f"/instances/{doomed.id}")


def test_an_instance_created_with_a_group_is_active_with_its_values(maria: Maria) -> None:
    """Dynamic and restart-required values alike are the engine's when the instance is
    ACTIVE: no RESTART_REQUIRED, no restart afterwards, and the group is shown."""
    api = maria.api
    group = _group(
        api, "from-birth", {"max_connections": 555, "innodb_log_buffer_size": 8 * 1024 * 1024}
    )
    body = {**mariadb_instance("born-tuned", "appdb", "app", PASSWORD), "configuration": group}
    resp = api.request("POST", "/instances", json={"instance": body})
    assert resp.status_code == 200, resp.text
    created = resp.json()["instance"]
    assert created["configuration"]["id"] == group
    tuned = Maria(maria.coffer, api, created["id"])
    try:
        shown = tuned.settled()
        assert shown["configuration"] == created["configuration"]
        pid = tuned.engine_pid()
        assert tuned.variable("max_connections") == 555
        assert tuned.variable("innodb_log_buffer_size") == 8 * 1024 * 1024
        assert tuned.show()["status"] == "ACTIVE"
        assert tuned.engine_pid() == pid, "the engine was restarted after it was ACTIVE"
        # Nothing was applied again after the create: no operation other than the create's.
        assert tuned.events() == []
    finally:
        api.delete_and_wait_gone(tuned.id)
    assert api.request("DELETE", f"/configurations/{group}").status_code == 202
