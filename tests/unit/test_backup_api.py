"""The backup routes and the restore point of instance creates, on a real API app and control DB
(in-memory bus, no guests): what is refused, with which status and sentence, and that a refusal
records nothing; what an accepted request records (row, quota charge, operation)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from coffer import catalog
from coffer.api.app import Services, create_app
from coffer.config import load_settings
from coffer.controlplane import ControlPlane
from coffer.datastores import registry
from coffer.db.models import Instance, Operation, QuotaCharge, ServiceStatusRow
from coffer.db.models_backups import Backup, BackupState, BackupStrategy
from coffer.db.session import transaction
from coffer.identity import IdentityService
from coffer.identity.passwords import ScryptCost
from coffer.status import ServerStatus, ServiceStatus, Task
from coffer.storage.file import FileStorage
from coffer.taskmanager.backups import CREATE_BACKUP, DELETE_BACKUP

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*httpx2.*")
    from fastapi.testclient import TestClient

PASSWORDS = {"admin": "admin-pw-1", "demo": "demo-pw-1", "eve": "eve-pw-1"}


@dataclass
class World:
    cp: ControlPlane
    client: TestClient
    tokens: dict[str, tuple[str, str]]
    ids: dict[str, str]

    def request(self, method: str, user: str, path: str, **kw: Any) -> Any:
        token, project = self.tokens[user]
        url = f"/v1.0/{project}/{path.lstrip('/')}"
        return self.client.request(method, url, headers={"X-Auth-Token": token}, **kw)

    def counts(self) -> tuple[int, ...]:
        with self.cp.session_factory() as session:
            return tuple(
                session.scalar(select(func.count()).select_from(table)) or 0
                for table in (Backup, Operation, QuotaCharge, Instance, BackupStrategy)
            )

    def add_backup(self, instance: str, state: BackupState, **fields: Any) -> str:
        inst_id = self.ids[instance]
        with transaction(self.cp.session_factory) as session:
            inst = session.get(Instance, inst_id)
            assert inst is not None
            row = Backup(
                tenant_id=inst.tenant_id,
                name=fields.pop("name", "b"),
                instance_id=inst_id,
                datastore_version_id=inst.datastore_version_id,
                state=state,
                storage_driver="file",
                storage_key="",
                volume_size=inst.volume_size,
                engine_position={},
                **fields,
            )
            if state is BackupState.COMPLETED:
                row.checksum, row.wrapped_key, row.size, row.raw_size = "a" * 64, "w", 10, 20
            session.add(row)
            session.flush()
            row.storage_key = f"{inst.tenant_id}/{row.id}"
            return row.id

    def store(self, backup_id: str) -> None:
        """Put an object under the backup's key (its content does not matter to the API)."""
        with self.cp.session_factory() as session:
            row = session.get(Backup, backup_id)
            assert row is not None
            key = row.storage_key
        FileStorage(self.cp.settings.state_dir / "backups").put_stream(key, [b"sealed bytes"])

    def fault(self, resp: Any) -> dict[str, Any]:
        (fault,) = resp.json().values()
        assert isinstance(fault, dict)
        return fault


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    settings = load_settings(
        environ={},
        overrides={
            "DEFAULT": {"state_dir": str(tmp_path), "transport_url": "memory://"},
            "database": {"connection": f"sqlite:///{tmp_path / 'coffer.db'}"},
        },
    )
    cp = ControlPlane(settings)
    engines = [
        registry.InstalledEngine("mariadb", "10.11.6"),
        registry.InstalledEngine("mariadb", "10.6.1"),
        registry.InstalledEngine("postgresql", "15.4"),
        registry.InstalledEngine("redis", "7.0.15"),
    ]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(registry, "_detected", engines)
        try:
            identity = IdentityService(
                cp.session_factory, os.urandom(32), settings, scrypt_cost=ScryptCost(2**4, 8, 1)
            )
            identity.bootstrap(PASSWORDS["admin"], PASSWORDS["demo"])
            identity.create_project("other")
            identity.create_user("eve", PASSWORDS["eve"], "other", ["member"])
            ids: dict[str, str] = {}
            with transaction(cp.session_factory) as session:
                maria = catalog.register_datastore_version(
                    session, "mariadb", "10.11", "mariadb", version="10.11.6", default=True
                )
                older = catalog.register_datastore_version(
                    session, "mariadb", "10.6", "mariadb", version="10.6.1"
                )
                pg = catalog.register_datastore_version(
                    session, "postgresql", "15", "postgresql", version="15.4"
                )
                catalog.create_flavor(session, "6", "d1.micro", 256, 1, 1)
                ids["older_version"] = older.id
            projects = {n: identity.create_project(n).id for n in ("admin", "demo", "other")}
            with transaction(cp.session_factory) as session:
                for name, version, task, size in (
                    ("maria", maria.id, Task.NONE, 2),
                    ("pg", pg.id, Task.NONE, 1),
                    ("building", maria.id, Task.BUILDING, 1),
                ):
                    inst = Instance(
                        tenant_id=projects["demo"],
                        name=name,
                        flavor_id="6",
                        volume_size=size,
                        datastore_version_id=version,
                        task=task,
                        server_status=ServerStatus.ACTIVE,
                        encrypted_key="",
                        compute_ref={"private": "127.10.0.9"},
                    )
                    session.add(inst)
                    session.flush()
                    _key, inst.encrypted_key = cp.new_instance_key(inst.id)
                    session.add(ServiceStatusRow(instance_id=inst.id, status=ServiceStatus.RUNNING))
                    ids[name] = inst.id
            app = create_app(Services(settings, cp.session_factory, identity, rpc=cp))
            with TestClient(app, raise_server_exceptions=False) as client:
                tokens = {}
                for user, project in (("admin", "admin"), ("demo", "demo"), ("eve", "other")):
                    body = {
                        "auth": {
                            "identity": {
                                "methods": ["password"],
                                "password": {
                                    "user": {
                                        "name": user,
                                        "domain": {"id": "default"},
                                        "password": PASSWORDS[user],
                                    }
                                },
                            },
                            "scope": {"project": {"name": project, "domain": {"id": "default"}}},
                        }
                    }
                    resp = client.post("/identity/v3/auth/tokens", json=body)
                    assert resp.status_code == 201, resp.text
                    tokens[user] = (
                        resp.headers["X-Subject-Token"],
                        resp.json()["token"]["project"]["id"],
                    )
                yield World(cp, client, tokens, ids)
        finally:
            cp.close()


def _create(world: World, user: str = "demo", **backup: Any) -> Any:
    body = {"backup": {"name": "nightly", "instance": world.ids["maria"], **backup}}
    return world.request("POST", user, "/backups", json=body)


# --- POST /backups -------------------------------------------------------------------------------


def test_create_records_the_backup_charges_quota_and_enqueues(world: World) -> None:
    resp = _create(world, description="before the upgrade")
    assert resp.status_code == 202, resp.text
    backup = resp.json()["backup"]
    assert backup["status"] == "NEW" and backup["parent_id"] is None
    assert backup["description"] == "before the upgrade"
    assert backup["datastore"] == {
        "type": "mariadb",
        "version": "10.11",
        "version_id": backup["datastore"]["version_id"],
    }
    assert backup["locationRef"] == f"file://{backup['project_id']}/{backup['id']}"
    with world.cp.session_factory() as session:
        op = session.scalars(select(Operation).where(Operation.kind == CREATE_BACKUP)).one()
        assert op.payload == {"backup_id": backup["id"]}
        assert op.instance_id == world.ids["maria"]
        charge = session.get(QuotaCharge, (f"backup:{backup['id']}", "backups"))
        assert charge is not None and charge.amount == 1
    # While it runs the instance reads BACKUP, in its own view and in lists.
    shown = world.request("GET", "demo", f"/instances/{world.ids['maria']}").json()["instance"]
    assert shown["status"] == "BACKUP"
    listed = world.request("GET", "demo", "/instances").json()["instances"]
    assert {i["name"]: i["status"] for i in listed}["maria"] == "BACKUP"
    assert {i["name"]: i["status"] for i in listed}["pg"] == "ACTIVE"
    # ...and a second backup of it is refused until the first ends.
    before = world.counts()
    again = _create(world)
    assert again.status_code == 422
    assert "already being backed up" in world.fault(again)["message"]
    assert world.counts() == before


@pytest.mark.parametrize(
    ("backup", "status", "phrase"),
    [
        ({"instance": None}, 400, "instance is required"),
        ({"instance": "no-such-instance"}, 404, "could not be found"),
        ({"name": "!!!"}, 400, "Validation error"),
        ({"name": ""}, 400, "Validation error"),
        ({"incremental": 2}, 400, "Validation error"),
        ({"colour": "blue"}, 400, "Validation error"),
        ({"restore_from": {"remote_location": "x"}}, 501, "restore_from"),
        ({"storage_driver": "cinder"}, 400, "'file' driver"),
        ({"parent_id": "no-such-backup"}, 404, "Parent backup"),
    ],
)
def test_bad_creates_change_nothing(
    world: World, backup: dict[str, Any], status: int, phrase: str
) -> None:
    before = world.counts()
    resp = _create(world, **backup)
    assert resp.status_code == status, resp.text
    assert phrase in world.fault(resp)["message"]
    assert world.counts() == before


def test_instances_that_cannot_be_backed_up(world: World) -> None:
    before = world.counts()
    resp = _create(world, instance=world.ids["building"])
    assert resp.status_code == 422 and "busy" in world.fault(resp)["message"]
    # Another project's instance does not exist as far as eve can tell.
    resp = _create(world, user="eve")
    assert resp.status_code == 404
    with transaction(world.cp.session_factory) as session:
        row = session.get(ServiceStatusRow, world.ids["maria"])
        assert row is not None
        row.status = ServiceStatus.SHUTDOWN
    resp = _create(world)
    assert resp.status_code == 422 and "shutdown" in world.fault(resp)["message"]
    assert world.counts() == before


def test_parents_and_incrementals(world: World) -> None:
    failed = world.add_backup("maria", BackupState.FAILED)
    resp = _create(world, parent_id=failed)
    assert resp.status_code == 400 and "COMPLETED parent" in world.fault(resp)["message"]
    other = world.add_backup("pg", BackupState.COMPLETED)
    resp = _create(world, parent_id=other)
    assert resp.status_code == 400 and "another instance" in world.fault(resp)["message"]
    # incremental=1 with nothing completed yet: a full backup.
    resp = _create(world, incremental=1)
    assert resp.status_code == 202 and resp.json()["backup"]["parent_id"] is None
    with transaction(world.cp.session_factory) as session:
        session.get(Backup, resp.json()["backup"]["id"]).state = BackupState.COMPLETED  # type: ignore[union-attr]
    latest = resp.json()["backup"]["id"]
    resp = _create(world, incremental=1)
    assert resp.status_code == 202, resp.text
    assert resp.json()["backup"]["parent_id"] == latest
    with world.cp.session_factory() as session:
        assert session.get(Backup, resp.json()["backup"]["id"]).backup_type == "incremental"  # type: ignore[union-attr]
    # PostgreSQL incrementals are the WAL since their parent (archived by the guest).
    pg_full = world.add_backup("pg", BackupState.COMPLETED)
    resp = _create(world, instance=world.ids["pg"], incremental=1)
    assert resp.status_code == 202, resp.text
    assert resp.json()["backup"]["parent_id"] in (pg_full, other)


def test_the_quota_refuses_a_backup_over_it(world: World) -> None:
    admin_project = world.tokens["admin"][1]
    demo = world.tokens["demo"][1]
    token = world.tokens["admin"][0]
    resp = world.client.put(
        f"/v1.0/{admin_project}/mgmt/quotas/{demo}",
        headers={"X-Auth-Token": token},
        json={"quotas": {"backups": 0}},
    )
    assert resp.status_code == 200, resp.text
    before = world.counts()
    resp = _create(world)
    assert resp.status_code == 413
    assert "backups" in world.fault(resp)["message"]
    assert world.counts() == before


# --- lists, show, delete -------------------------------------------------------------------------


def test_lists_page_by_offset_and_filter(world: World) -> None:
    made = [world.add_backup("maria", BackupState.COMPLETED, name=f"m{i}") for i in range(3)]
    made.append(world.add_backup("pg", BackupState.FAILED, name="p0", fail_reason="disk full"))
    page = world.request("GET", "demo", "/backups", params={"limit": 2}).json()
    assert len(page["backups"]) == 2
    (link,) = page["links"]
    assert "marker=2" in link["href"] and "limit=2" in link["href"]
    rest = world.request("GET", "demo", "/backups", params={"limit": 2, "marker": "2"}).json()
    assert "links" not in rest
    seen = [b["id"] for b in page["backups"] + rest["backups"]]
    assert sorted(seen) == sorted(made)
    bad = world.request("GET", "demo", "/backups", params={"marker": "abc"})
    assert bad.status_code == 400
    only_pg = world.request("GET", "demo", "/backups", params={"datastore": "postgresql"}).json()
    assert [b["name"] for b in only_pg["backups"]] == ["p0"]
    assert only_pg["backups"][0]["fail_reason"] == "disk full"
    assert only_pg["backups"][0]["status"] == "FAILED"
    mine = world.request("GET", "demo", f"/instances/{world.ids['pg']}/backups").json()
    assert [b["name"] for b in mine["backups"]] == ["p0"]
    # Other projects see none of it; listing every project is the admin's.
    assert world.request("GET", "eve", "/backups").json()["backups"] == []
    resp = world.request("GET", "eve", f"/backups/{made[0]}")
    assert resp.status_code == 404
    resp = world.request("GET", "demo", "/backups", params={"all_projects": "1"})
    assert resp.status_code == 403
    assert "backup:index:all_projects" in world.fault(resp)["message"]
    everything = world.request("GET", "admin", "/backups", params={"all_projects": "1"}).json()
    assert len(everything["backups"]) == 4


def test_delete_takes_the_incrementals_built_on_a_backup(world: World) -> None:
    full = world.add_backup("maria", BackupState.COMPLETED)
    child = world.add_backup("maria", BackupState.COMPLETED, parent_id=full)
    grandchild = world.add_backup("maria", BackupState.COMPLETED, parent_id=child)
    unrelated = world.add_backup("maria", BackupState.COMPLETED)
    resp = world.request("DELETE", "demo", f"/backups/{full}")
    assert resp.status_code == 202, resp.text
    with world.cp.session_factory() as session:
        op = session.scalars(select(Operation).where(Operation.kind == DELETE_BACKUP)).one()
    # Children first, the backup itself last; the unrelated one stays.
    assert op.payload["backup_ids"] == [grandchild, child, full]
    assert unrelated not in op.payload["backup_ids"]


def test_a_running_backup_cannot_be_deleted(world: World) -> None:
    full = world.add_backup("maria", BackupState.COMPLETED)
    world.add_backup("maria", BackupState.BUILDING, parent_id=full)
    before = world.counts()
    resp = world.request("DELETE", "demo", f"/backups/{full}")
    assert resp.status_code == 422 and "still being taken" in world.fault(resp)["message"]
    assert world.counts() == before


# --- restore points ------------------------------------------------------------------------------


def _restore(world: World, backup_id: str, **instance: Any) -> Any:
    body: dict[str, Any] = {
        "name": "restored",
        "flavorRef": "6",
        "volume": {"size": 2},
        "restorePoint": {"backupRef": backup_id},
        **instance,
    }
    return world.request("POST", "demo", "/instances", json={"instance": body})


def test_restore_takes_the_backups_datastore_and_records_the_restore(world: World) -> None:
    backup = world.add_backup("pg", BackupState.COMPLETED)
    world.store(backup)
    resp = _restore(world, backup)
    assert resp.status_code == 200, resp.text
    instance = resp.json()["instance"]
    # No datastore given: the backup's (PostgreSQL, not the default MariaDB).
    assert instance["datastore"]["type"] == "postgresql"
    with world.cp.session_factory() as session:
        op = session.scalars(select(Operation).where(Operation.instance_id == instance["id"])).one()
    assert op.payload["restore"] == {"backup_id": backup}


@pytest.mark.parametrize(
    ("case", "status", "phrase"),
    [
        ("running", 409, "only a COMPLETED backup"),
        ("failed", 409, "FAILED"),
        ("missing_object", 400, "missing from backup storage"),
        ("other_datastore", 400, "restore it into a postgresql instance"),
        ("other_version", 400, "restores only into that version's release series"),
        ("small_volume", 400, "at least 2 GB"),
        ("point_in_time", 400, "log archive"),
        ("point_in_time_maria", 400, "log archive"),
        ("bad_time", 400, "not an ISO 8601 time"),
        ("no_ref", 400, "backupRef"),
        ("unknown", 404, "could not be found"),
        ("parent_deleted", 400, "has been deleted"),
    ],
)
def test_bad_restore_points_change_nothing(
    world: World, case: str, status: int, phrase: str
) -> None:
    completed_pg = world.add_backup("pg", BackupState.COMPLETED)
    world.store(completed_pg)
    completed_maria = world.add_backup("maria", BackupState.COMPLETED)
    world.store(completed_maria)
    ref = completed_pg
    extra: dict[str, Any] = {}
    point: dict[str, Any] | None = None
    if case == "running":
        ref = world.add_backup("pg", BackupState.BUILDING)
    elif case == "failed":
        ref = world.add_backup("pg", BackupState.FAILED)
    elif case == "missing_object":
        ref = world.add_backup("pg", BackupState.COMPLETED)
    elif case == "other_datastore":
        extra = {"datastore": {"type": "mariadb"}}
    elif case == "other_version":
        ref = completed_maria
        extra = {"datastore": {"type": "mariadb", "version": "10.6"}}
    elif case == "small_volume":
        ref = completed_maria
        extra = {"volume": {"size": 1}}
    elif case == "point_in_time":
        point = {"backupRef": ref, "restore_time": "2024-01-01T00:00:00"}
    elif case == "point_in_time_maria":
        point = {"backupRef": completed_maria, "restore_time": "2024-01-01T00:00:00"}
    elif case == "bad_time":
        point = {"backupRef": ref, "restore_time": "yesterday"}
    elif case == "no_ref":
        point = {"backup": ref}
    elif case == "unknown":
        ref = "no-such-backup"
    elif case == "parent_deleted":
        ref = world.add_backup("maria", BackupState.COMPLETED, parent_id=completed_maria)
        world.store(ref)
        with transaction(world.cp.session_factory) as session:
            session.get(Backup, completed_maria).deleted = True  # type: ignore[union-attr]
    before = world.counts()
    if point is not None:
        extra["restorePoint"] = point
    resp = _restore(world, ref, **extra)
    assert resp.status_code == status, resp.text
    assert phrase in world.fault(resp)["message"], world.fault(resp)
    assert world.counts() == before


# --- strategies ----------------------------------------------------------------------------------


def test_backup_strategies(world: World) -> None:
    body = {"backup_strategy": {"swift_container": "nightly"}}
    resp = world.request("POST", "demo", "/backup_strategies", json=body)
    assert resp.status_code == 202, resp.text
    body = {"backup_strategy": {"instance_id": world.ids["maria"], "swift_container": "maria-c"}}
    assert world.request("POST", "demo", "/backup_strategies", json=body).status_code == 202
    # An upsert: the project-wide one changes, no second row.
    body = {"backup_strategy": {"swift_container": "weekly"}}
    assert world.request("POST", "demo", "/backup_strategies", json=body).status_code == 202
    listed = world.request("GET", "demo", "/backup_strategies").json()["backup_strategies"]
    assert [(s["instance_id"], s["swift_container"]) for s in listed] == [
        ("", "weekly"),
        (world.ids["maria"], "maria-c"),
    ]
    assert all(s["backend"] == "swift" for s in listed)
    # Someone else's instance, or another project's list: refused.
    body = {"backup_strategy": {"instance_id": world.ids["maria"], "swift_container": "x"}}
    assert world.request("POST", "eve", "/backup_strategies", json=body).status_code == 404
    demo = world.tokens["demo"][1]
    resp = world.request("GET", "eve", "/backup_strategies", params={"project_id": demo})
    assert resp.status_code == 403
    resp = world.request(
        "DELETE", "demo", "/backup_strategies", params={"instance_id": world.ids["maria"]}
    )
    assert resp.status_code == 202
    listed = world.request("GET", "demo", "/backup_strategies").json()["backup_strategies"]
    assert [s["swift_container"] for s in listed] == ["weekly"]


def test_reset_status_fails_the_backups_it_stops(world: World) -> None:
    resp = _create(world)
    assert resp.status_code == 202, resp.text
    backup_id = resp.json()["backup"]["id"]
    admin_token, admin_project = world.tokens["admin"]
    resp = world.client.post(
        f"/v1.0/{admin_project}/instances/{world.ids['maria']}/action",
        headers={"X-Auth-Token": admin_token},
        json={"reset_status": {}},
    )
    assert resp.status_code == 202, resp.text
    shown = world.request("GET", "demo", f"/backups/{backup_id}").json()["backup"]
    assert shown["status"] == "FAILED"
    assert "reset_status" in shown["fail_reason"]
    with world.cp.session_factory() as session:
        assert session.get(QuotaCharge, (f"backup:{backup_id}", "backups")) is None
    instance = world.request("GET", "demo", f"/instances/{world.ids['maria']}").json()
    assert instance["instance"]["status"] != "BACKUP"
