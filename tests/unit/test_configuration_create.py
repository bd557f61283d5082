"""Instances created with a configuration group (``POST /instances`` with ``configuration``), on a
real API app and control DB (in-memory bus, no guests): the group is checked before anything is
recorded (the caller's, the same datastore version, values its rules take), an accepted create
records the instance with its group and shows it, and the create's values are not applied a
second time. The engine side runs in tests/integration/test_day2_*.py.
"""

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
from coffer.configuration.parameter_rules import register_shipped_rules
from coffer.controlplane import ControlPlane
from coffer.datastores import registry
from coffer.db.models import Instance, Operation, QuotaCharge
from coffer.db.models_day2 import ConfigurationValue
from coffer.db.session import transaction
from coffer.identity import IdentityService
from coffer.identity.passwords import ScryptCost
from coffer.taskmanager.instances import CREATE

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*httpx2.*")
    from fastapi.testclient import TestClient

PASSWORDS = {"admin": "admin-pw-1", "demo": "demo-pw-1", "eve": "eve-pw-1"}


@dataclass
class World:
    cp: ControlPlane
    client: TestClient
    tokens: dict[str, tuple[str, str]]

    def request(self, method: str, user: str, path: str, **kw: Any) -> Any:
        token, project = self.tokens[user]
        url = f"/v1.0/{project}/{path.lstrip('/')}"
        return self.client.request(method, url, headers={"X-Auth-Token": token}, **kw)

    def group(self, user: str, datastore: str, values: dict[str, Any]) -> str:
        body = {"configuration": {"name": "g", "values": values, "datastore": {"type": datastore}}}
        resp = self.request("POST", user, "/configurations", json=body)
        assert resp.status_code == 200, resp.text
        group_id: str = resp.json()["configuration"]["id"]
        return group_id

    def create(self, configuration: str, datastore: str = "mariadb", user: str = "demo") -> Any:
        body = {
            "instance": {
                "name": "tuned",
                "flavorRef": "6",
                "volume": {"size": 1},
                "datastore": {"type": datastore},
                "configuration": configuration,
            }
        }
        return self.request("POST", user, "/instances", json=body)

    def counts(self) -> tuple[int, ...]:
        with self.cp.session_factory() as session:
            return tuple(
                session.scalar(select(func.count()).select_from(table)) or 0
                for table in (Instance, Operation, QuotaCharge)
            )


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
        registry.InstalledEngine("postgresql", "15.4"),
    ]
    with pytest.MonkeyPatch.context() as patch:
        # Pretend the engines are installed rather than run their binaries.
        patch.setattr(registry, "_detected", engines)
        try:
            identity = IdentityService(
                cp.session_factory, os.urandom(32), settings, scrypt_cost=ScryptCost(2**4, 8, 1)
            )
            identity.bootstrap(PASSWORDS["admin"], PASSWORDS["demo"])
            identity.create_project("other")
            identity.create_user("eve", PASSWORDS["eve"], "other", ["member"])
            with transaction(cp.session_factory) as session:
                catalog.register_datastore_version(
                    session, "mariadb", "10.11", "mariadb", version="10.11.6", default=True
                )
                catalog.register_datastore_version(
                    session, "postgresql", "15", "postgresql", version="15.4", default=True
                )
                catalog.create_flavor(session, "6", "d1.micro", 256, 1, 1)
                register_shipped_rules(session)
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
                yield World(cp, client, tokens)
        finally:
            cp.close()


def test_create_with_a_group_records_and_shows_it(world: World) -> None:
    group = world.group("demo", "mariadb", {"max_connections": 555})
    resp = world.create(group)
    assert resp.status_code == 200, resp.text
    shown = resp.json()["instance"]
    assert shown["configuration"]["id"] == group
    assert shown["configuration"]["links"][0]["href"].endswith(f"/configurations/{group}")
    with world.cp.session_factory() as session:
        inst = session.get(Instance, shown["id"])
        assert inst is not None and inst.configuration_id == group
        (op,) = session.scalars(select(Operation).where(Operation.instance_id == inst.id))
        assert op.kind == CREATE
    listed = world.request("GET", "demo", f"/configurations/{group}/instances").json()
    assert [i["id"] for i in listed["instances"]] == [shown["id"]]
    # The group now holds an instance: it cannot be deleted.
    assert world.request("DELETE", "demo", f"/configurations/{group}").status_code == 400


@pytest.mark.parametrize(
    ("case", "status", "phrase"),
    [
        ("unknown", 404, "could not be found"),
        ("other_project", 404, "could not be found"),
        ("admin_other_project", 400, "belongs to another project"),
        ("other_datastore", 400, "another datastore version"),
        ("rule_tightened", 422, "max_connections"),
    ],
)
def test_bad_groups_refuse_the_create_and_record_nothing(
    world: World, case: str, status: int, phrase: str
) -> None:
    mine = world.group("demo", "mariadb", {"max_connections": 555})
    user, ref, datastore = "demo", mine, "mariadb"
    if case == "unknown":
        ref = "no-such-group"
    elif case == "other_project":
        ref = world.group("eve", "mariadb", {"max_connections": 555})
    elif case == "admin_other_project":
        user = "admin"  # an admin sees the group, but it is not the new instance's project's
    elif case == "other_datastore":
        datastore = "postgresql"
    elif case == "rule_tightened":
        # The group was valid when written; the value is out of range for the rules now.
        with transaction(world.cp.session_factory) as session:
            row = session.get(ConfigurationValue, (mine, "max_connections"))
            assert row is not None
            row.value = 10**9
    before = world.counts()
    resp = world.create(ref, datastore=datastore, user=user)
    assert resp.status_code == status, resp.text
    (fault,) = resp.json().values()
    assert phrase in fault["message"], fault
    assert world.counts() == before
