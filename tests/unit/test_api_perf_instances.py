"""Instance list and show: a constant number of control-DB queries whatever the page holds, and
Trove's ``configuration`` (``{id, name, links}``) in the detail views. Real app, real SQLite."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from api_fixtures import DEMO_PASSWORD, password_body
from sqlalchemy import event

from coffer.api.app import Services, create_app
from coffer.catalog import create_flavor, register_datastore_version
from coffer.cli.bootstrap import identity_service
from coffer.config import load_settings
from coffer.controlplane import ControlPlane
from coffer.db.models import Base, Instance, InstanceFault, ServiceStatusRow, utcnow
from coffer.db.models_day2 import Configuration
from coffer.db.session import transaction
from coffer.status import ServerStatus, ServiceStatus, Task

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient


@dataclass
class World:
    cp: ControlPlane
    client: TestClient
    project: str
    headers: dict[str, str]
    version_id: str
    statements: list[str]
    added: int = 0

    def get(self, path: str) -> Any:
        resp = self.client.get(f"/v1.0/{self.project}{path}", headers=self.headers)
        assert resp.status_code == 200, resp.text
        return resp.json()

    def queries(self, path: str) -> int:
        """How many SQL statements serving ``path`` costs."""
        self.get(path)  # the token is now validated (and cached)
        del self.statements[:]
        self.get(path)
        return len(self.statements)

    def add_instances(self, count: int, **fields: Any) -> list[str]:
        ids = []
        now = utcnow()
        self.added += count
        with transaction(self.cp.session_factory) as session:
            for n in range(count):
                inst = Instance(
                    tenant_id=self.project,
                    name=f"i{self.added:03d}-{n:03d}",
                    flavor_id="1",
                    volume_size=1,
                    datastore_version_id=self.version_id,
                    encrypted_key="x",
                    server_status=ServerStatus.ACTIVE,
                    created=now - timedelta(seconds=n),
                    **fields,
                )
                session.add(inst)
                session.flush()
                session.add(ServiceStatusRow(instance_id=inst.id, status=ServiceStatus.HEALTHY))
                ids.append(inst.id)
        return ids


_COUNTED = {"SELECT", "INSERT", "UPDATE", "DELETE", "WITH"}


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    settings = load_settings(
        environ={},
        overrides={"DEFAULT": {"state_dir": str(tmp_path), "instances_page_size": 20}},
    )
    cp = ControlPlane(settings, migrate_db=False)
    try:
        Base.metadata.create_all(cp.engine)
        identity = identity_service(cp)
        identity.bootstrap("admin-pass", DEMO_PASSWORD)
        with transaction(cp.session_factory) as session:
            version = register_datastore_version(session, "mariadb", "10.11", "mariadb")
            create_flavor(session, "1", "tiny", 256, 1)
            version_id = version.id
        services = Services(
            settings=settings, session_factory=cp.session_factory, identity=identity, rpc=cp
        )
        client = TestClient(create_app(services))
        resp = client.post(
            "/identity/v3/auth/tokens", json=password_body("demo", DEMO_PASSWORD, "demo")
        )
        assert resp.status_code == 201, resp.text
        statements: list[str] = []

        def trace(statement: str) -> None:
            # Every statement SQLite runs, those sent through the driver's own cursor included;
            # not the BEGIN and ROLLBACK around reads.
            if statement.lstrip().split(None, 1)[0].upper() in _COUNTED:
                statements.append(statement)

        event.listen(
            cp.engine.pool,
            "checkout",
            lambda dbapi_conn, *_rest: dbapi_conn.set_trace_callback(trace),
        )
        yield World(
            cp,
            client,
            resp.json()["token"]["project"]["id"],
            {"X-Auth-Token": resp.headers["X-Subject-Token"]},
            version_id,
            statements,
        )
    finally:
        cp.close()


def test_a_page_costs_the_same_queries_for_one_instance_or_twenty(world: World) -> None:
    world.add_instances(1)
    one = {path: world.queries(path) for path in ("/instances", "/instances/detail")}
    ids = world.add_instances(40)
    full = {path: world.queries(path) for path in ("/instances", "/instances/detail")}
    assert len(world.get("/instances")["instances"]) == 20
    assert full == one, world.statements
    # The page's ids, then the instances with everything their views need.
    assert full["/instances"] <= 2, world.statements
    assert world.queries(f"/instances/{ids[0]}") <= 1, world.statements


def test_a_settled_page_is_one_query_and_a_show_one(world: World) -> None:
    ids = world.add_instances(30, task=Task.NONE)
    # Instances, status rows, versions, datastores, groups and running backups: one statement.
    assert world.queries("/instances") == 1, world.statements
    assert world.queries("/instances/detail") == 1, world.statements
    assert world.queries(f"/instances/{ids[3]}") == 1, world.statements
    # A marker is looked up first.
    assert world.queries(f"/instances?marker={ids[3]}") == 2, world.statements


def test_only_a_detail_view_with_an_instance_in_error_looks_up_faults(world: World) -> None:
    world.add_instances(3)
    healthy = world.queries("/instances/detail")
    (broken,) = world.add_instances(1, task=Task.BUILDING_ERROR_GUEST)
    with transaction(world.cp.session_factory) as session:
        now = utcnow()
        session.add(InstanceFault(instance_id=broken, message="old", created=now - timedelta(1)))
        session.add(InstanceFault(instance_id=broken, message="prepare failed", created=now))
    assert world.queries("/instances/detail") == healthy + 1
    views = {i["id"]: i for i in world.get("/instances/detail")["instances"]}
    assert views[broken]["status"] == "ERROR"
    assert views[broken]["fault"]["message"] == "prepare failed"
    assert all("fault" not in v for i, v in views.items() if i != broken)
    assert world.get(f"/instances/{broken}")["instance"]["fault"]["message"] == "prepare failed"


def test_detail_views_name_the_attached_configuration_group(world: World) -> None:
    with transaction(world.cp.session_factory) as session:
        group = Configuration(
            tenant_id=world.project, name="tuned", datastore_version_id=world.version_id
        )
        session.add(group)
        session.flush()
        group_id = group.id
    attached, plain = world.add_instances(1, configuration_id=group_id) + world.add_instances(1)
    base = str(world.client.base_url).rstrip("/")
    expected = {
        "id": group_id,
        "name": "tuned",
        "links": [
            {
                "rel": "self",
                "href": f"{base}/v1.0/{world.project}/configurations/{group_id}",
            },
            {"rel": "bookmark", "href": f"{base}/configurations/{group_id}"},
        ],
    }
    detail = {i["id"]: i for i in world.get("/instances/detail")["instances"]}
    assert detail[attached]["configuration"] == expected
    assert "configuration" not in detail[plain]
    assert world.get(f"/instances/{attached}")["instance"]["configuration"] == expected
    assert "configuration" not in world.get(f"/instances/{plain}")["instance"]
    # The short list view has no configuration, as Trove's InstanceView has none.
    assert all("configuration" not in i for i in world.get("/instances")["instances"])
