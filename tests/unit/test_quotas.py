"""Quotas on the SQLite control DB: limits, atomic reservations, release on delete and on failed
creates, the quota admin API, and charging instances that existed before the upgrade.

The same reservation race on a real PostgreSQL is in tests/integration/test_quotas_postgres.py;
20 concurrent creates through a real ``coffer up`` are in tests/integration/test_quotas_api.py.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from api_fixtures import ApiHarness, make_settings
from click.testing import CliRunner
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session, sessionmaker
from test_policy_matrix import World, build_world

from coffer import quotas
from coffer.cli.main import main as cli
from coffer.config import Settings
from coffer.db import migrate
from coffer.db.models import Instance, QuotaCharge, QuotaUsage
from coffer.db.session import make_engine, make_session_factory, transaction
from coffer.errors import BadRequest
from coffer.status import Task
from coffer.taskmanager.instances import InstanceFlows
from coffer.taskmanager.operations import Context, OperationFailed


@pytest.fixture
def db(tmp_path: Path) -> Iterator[tuple[Settings, sessionmaker[Session], Engine]]:
    settings = make_settings(tmp_path, max_instances_per_tenant=2, max_ram_per_tenant=1024)
    engine = make_engine(settings.database_url)
    migrate.upgrade(engine)
    try:
        yield settings, make_session_factory(engine), engine
    finally:
        engine.dispose()


def _usage(factory: sessionmaker[Session], project: str) -> dict[str, int]:
    with factory() as session:
        return quotas.get_usage(session, project)


def test_reserve_within_limits_then_refuse(db: tuple[Settings, Any, Engine]) -> None:
    settings, factory, _ = db
    with transaction(factory) as session:
        quotas.reserve(session, settings, "p1", "i1", {"instances": 1, "ram": 512, "volumes": 5})
        quotas.reserve(session, settings, "p1", "i2", {"instances": 1, "ram": 512, "volumes": 5})
    assert _usage(factory, "p1") == {"instances": 2, "ram": 1024, "volumes": 10, "backups": 0}
    with pytest.raises(quotas.QuotaExceeded) as caught, transaction(factory) as session:
        quotas.reserve(session, settings, "p1", "i3", {"instances": 1, "ram": 256, "volumes": 1})
    message = caught.value.message
    assert caught.value.status == 413 and caught.value.fault == "overLimit"
    assert message.startswith("Quota exceeded for resources: ['instances', 'ram'].")
    assert "instances 2 of 2" in message and "ram 1024 of 1024" in message
    # Nothing was charged by the refused reservation, and another project is untouched.
    assert _usage(factory, "p1")["volumes"] == 10
    with factory() as session:
        assert quotas.charges_of(session, "i3") == {}
    with transaction(factory) as session:
        quotas.reserve(session, settings, "p2", "j1", {"instances": 2})


def test_release_gives_back_once(db: tuple[Settings, Any, Engine]) -> None:
    settings, factory, _ = db
    with transaction(factory) as session:
        quotas.reserve(session, settings, "p1", "i1", {"instances": 1, "ram": 512})
        quotas.reserve(session, settings, "p1", "i1", {"ram": 256})  # a resize adds
    with factory() as session:
        assert quotas.charges_of(session, "i1") == {"instances": 1, "ram": 768}
    with transaction(factory) as session:
        assert quotas.release(session, "i1") == {"instances": 1, "ram": 768}
    with transaction(factory) as session:
        assert quotas.release(session, "i1") == {}
    assert _usage(factory, "p1") == {"instances": 0, "ram": 0, "volumes": 0, "backups": 0}


def test_unlimited_and_project_limits(db: tuple[Settings, Any, Engine]) -> None:
    settings, factory, _ = db
    with transaction(factory) as session:
        quotas.set_limits(session, settings, "p1", {"instances": -1, "ram": None})
        for n in range(5):
            quotas.reserve(session, settings, "p1", f"i{n}", {"instances": 1})
        limits = quotas.get_limits(session, settings, "p1")
    assert limits == {"instances": -1, "ram": 1024, "volumes": 40, "backups": 50}
    with transaction(factory) as session:
        quotas.set_limits(session, settings, "p1", {"instances": "3"})
    # A limit below usage is accepted; it refuses new reservations until usage falls.
    with pytest.raises(quotas.QuotaExceeded), transaction(factory) as session:
        quotas.reserve(session, settings, "p1", "more", {"instances": 1})
    with transaction(factory) as session:
        for n in range(3):
            quotas.release(session, f"i{n}")
        quotas.reserve(session, settings, "p1", "more", {"instances": 1})


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"instance": 3}, quotas.QuotaResourceUnknown, "Did you mean 'instances'"),
        ({"instances": -2}, BadRequest, "use -1 for unlimited"),
        ({"instances": 1.5}, BadRequest, "whole number"),
        ({"instances": True}, BadRequest, "whole number"),
        ({"instances": "ten"}, BadRequest, "whole number"),
        ({}, BadRequest, "Give the limits to set"),
    ],
)
def test_set_limits_validates_everything_first(
    db: tuple[Settings, Any, Engine], changes: dict[str, Any], error: type, message: str
) -> None:
    settings, factory, _ = db
    with pytest.raises(error, match=message), transaction(factory) as session:
        quotas.set_limits(session, settings, "p1", {"ram": 1, **changes} if changes else {})
    with factory() as session:
        assert quotas.get_limits(session, settings, "p1")["ram"] == 1024  # nothing was written


def test_concurrent_reservations_never_share_the_last_unit(
    db: tuple[Settings, Any, Engine],
) -> None:
    settings, factory, _ = db
    with transaction(factory) as session:
        quotas.set_limits(session, settings, "race", {"instances": 10, "ram": -1})
    start = threading.Barrier(20)
    results: list[str] = []

    def create(n: int) -> None:
        start.wait()
        try:
            with transaction(factory) as session:
                quotas.reserve(session, settings, "race", f"r{n}", {"instances": 1, "ram": 256})
            results.append("ok")
        except quotas.QuotaExceeded:
            results.append("over")

    threads = [threading.Thread(target=create, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(results) == ["ok"] * 10 + ["over"] * 10
    assert _usage(factory, "race")["instances"] == 10
    assert _usage(factory, "race")["ram"] == 2560
    with factory() as session:
        holders = set(
            session.scalars(select(QuotaCharge.holder_id).where(QuotaCharge.project_id == "race"))
        )
    assert len(holders) == 10


# --- the API and the taskmanager ------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    yield from build_world(tmp_path_factory.mktemp("quotas"), http_post_rate=0, http_get_rate=0)


_CREATE = {"instance": {"name": "q", "flavorRef": "6", "volume": {"size": 2}}}


def _demo_usage(world: World) -> dict[str, int]:
    with world.cp.session_factory() as session:
        return quotas.get_usage(session, world.projects["demo"])


def test_create_charges_and_over_quota_is_413(world: World) -> None:
    demo = world.projects["demo"]
    put = world.request(
        "PUT", "admin", f"/v1.0/{{tenant_id}}/mgmt/quotas/{demo}", json={"quotas": {"instances": 1}}
    )
    assert put.status_code == 200
    before = _demo_usage(world)
    first = world.request("POST", "member", "/v1.0/{tenant_id}/instances", json=_CREATE)
    assert first.status_code == 200, first.text
    assert _demo_usage(world) == {
        **before,
        "instances": 1,
        "ram": before["ram"] + 256,
        "volumes": before["volumes"] + 2,
    }
    with world.cp.session_factory() as session:
        count = len(session.scalars(select(Instance.id).where(Instance.tenant_id == demo)).all())
    second = world.request("POST", "member", "/v1.0/{tenant_id}/instances", json=_CREATE)
    assert second.status_code == 413
    assert second.json()["overLimit"]["message"].startswith(
        "Quota exceeded for resources: ['instances']."
    )
    with world.cp.session_factory() as session:
        assert (
            len(session.scalars(select(Instance.id).where(Instance.tenant_id == demo)).all())
            == count
        )
    shown = world.request("GET", "member", f"/v1.0/{{tenant_id}}/mgmt/quotas/{demo}").json()
    assert {"resource": "instances", "in_use": 1, "reserved": 0, "limit": 1} in shown["quotas"]
    assert [row["resource"] for row in shown["quotas"]] == list(quotas.RESOURCES)

    # Deleting (the taskmanager's release step) and failing a create both give quota back, once.
    new_id = first.json()["instance"]["id"]
    flows = InstanceFlows(world.cp, _NoAddresses())  # type: ignore[arg-type]
    flows.release(Context("op", new_id, {}, 0))
    flows.release(Context("op", new_id, {}, 0))
    assert _demo_usage(world) == before
    again = world.request("POST", "member", "/v1.0/{tenant_id}/instances", json=_CREATE)
    assert again.status_code == 200
    failed_id = again.json()["instance"]["id"]
    flows.create_failed(
        Context("op", failed_id, {}, 0), OperationFailed("The engine did not start.")
    )
    assert _demo_usage(world) == before
    with world.cp.session_factory() as session:
        failed = session.get(Instance, failed_id)
        assert failed is not None and failed.task is Task.BUILDING_ERROR_GUEST
    flows.release(Context("op", failed_id, {}, 0))  # deleting the failed instance later
    assert _demo_usage(world) == before
    world.request(
        "PUT",
        "admin",
        f"/v1.0/{{tenant_id}}/mgmt/quotas/{demo}",
        json={"quotas": {"instances": 10}},
    )


class _NoAddresses:
    """The release step's compute call; these instances never had a server or addresses."""

    def release_addresses(self, session: Session, instance_id: str) -> None:
        return None


def test_volume_over_the_accepted_size_is_413_and_charges_nothing(world: World) -> None:
    before = _demo_usage(world)
    body = {"instance": {**_CREATE["instance"], "volume": {"size": 11}}}
    resp = world.request("POST", "member", "/v1.0/{tenant_id}/instances", json=body)
    assert resp.status_code == 413
    assert "largest accepted size" in resp.json()["overLimit"]["message"]
    assert _demo_usage(world) == before


@pytest.fixture
def api(tmp_path: Path) -> Iterator[ApiHarness]:
    with ApiHarness.start(tmp_path) as harness:
        yield harness


def test_quota_admin_api_errors(api: ApiHarness) -> None:
    _, demo = api.login("demo")
    path = f"mgmt/quotas/{demo}"
    cases = [
        ({"quotas": {"instancez": 3}}, 404, "itemNotFound", "Did you mean 'instances'"),
        ({"quotas": {"instances": -5}}, 400, "badRequest", "use -1 for unlimited"),
        ({"quota": {"instances": 5}}, 400, "badRequest", 'The body must be {"quotas"'),
        ([1, 2], 400, "badRequest", 'The body must be {"quotas"'),
    ]
    for body, status, fault, message in cases:
        resp = api.request("PUT", "admin", path, json=body)
        assert resp.status_code == status, resp.text
        assert message in resp.json()[fault]["message"]
    resp = api.request(
        "PUT", "admin", path, json={"quotas": {"instances": 20, "ram": None, "volumes": 100}}
    )
    assert resp.json() == {"quotas": {"instances": 20, "volumes": 100}}
    rows = {r["resource"]: r for r in api.request("GET", "demo", path).json()["quotas"]}
    assert rows["instances"] == {"resource": "instances", "in_use": 0, "reserved": 0, "limit": 20}
    assert rows["ram"]["limit"] == -1 and rows["backups"]["limit"] == 50


def test_upgrade_charges_instances_that_already_exist(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'c.db'}")
    try:
        migrate.upgrade(engine, "2d3e073f3ba2")
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO datastores (id, name) VALUES ('d', 'mariadb')"))
            conn.execute(
                text(
                    "INSERT INTO datastore_versions (id, datastore_id, name, version, manager, "
                    "image_tags, packages, active, created, updated) VALUES ('v', 'd', '10.11', "
                    "'10.11', 'mariadb', '[]', '[]', 1, '2026-01-01', '2026-01-01')"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO flavors (id, name, ram, vcpus, disk, ephemeral) "
                    "VALUES ('6', 'd1.micro', 256, 1, 1, 0)"
                )
            )
            for iid, task, deleted in (
                ("a", "none", 0),
                ("b", "building", 0),
                ("c", "none", 1),
                ("e", "building_error_guest", 0),
            ):
                conn.execute(
                    text(
                        "INSERT INTO instances (id, tenant_id, name, flavor_id, volume_size, "
                        "datastore_version_id, task, task_description, server_status, access, "
                        "region_id, encrypted_key, compute_ref, created, updated, deleted) VALUES "
                        f"('{iid}', 'p', 'n', '6', 3, 'v', '{task}', '', 'active', '{{}}', 'r', "
                        f"'', '{{}}', '2026-01-01', '2026-01-01', {deleted})"
                    )
                )
        migrate.upgrade(engine)
        factory = make_session_factory(engine)
        with factory() as session:
            assert quotas.get_usage(session, "p") == {
                "instances": 2,
                "ram": 512,
                "volumes": 6,
                "backups": 0,
            }
            assert quotas.charges_of(session, "a") == {"instances": 1, "ram": 256, "volumes": 3}
            assert quotas.charges_of(session, "e") == {}
            rows = session.scalars(select(QuotaUsage).where(QuotaUsage.project_id == "p")).all()
            assert len(rows) == 3
    finally:
        engine.dispose()


def test_manage_quota_set_and_show(tmp_path: Path) -> None:
    runner = CliRunner()
    env = {"COFFER_STATE_DIR": str(tmp_path)}
    created = runner.invoke(cli, ["manage", "project-create", "acme"], env=env)
    assert created.exit_code == 0, created.output
    project_id = created.output.strip()
    done = runner.invoke(cli, ["manage", "quota-set", "acme", "ram", "4096"], env=env)
    assert done.exit_code == 0, done.output
    assert f"project {project_id}: ram limit is now 4096" in done.output
    shown = runner.invoke(cli, ["manage", "quota-show", project_id], env=env)
    assert shown.exit_code == 0, shown.output
    rows = {line.split()[0]: line.split()[1:] for line in shown.output.splitlines()[2:]}
    assert rows["ram"] == ["0", "4096"] and rows["instances"] == ["0", "10"]
    bad = runner.invoke(cli, ["manage", "quota-set", "acme", "rams", "1"], env=env)
    assert bad.exit_code != 0 and "Did you mean 'ram'" in bad.output
