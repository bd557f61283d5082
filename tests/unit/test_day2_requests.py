"""The API side of day-2 operations (``coffer.taskmanager.day2_requests``) on a real control
DB: what is refused (and that a refusal leaves no operation, event, quota charge or state
behind), what an accepted request records, and how changed configuration groups are found.
No guest runs here: the flows themselves run against real engines in
tests/integration/test_day2_*.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from coffer import catalog, quotas
from coffer.config import load_settings
from coffer.configuration import groups
from coffer.configuration.parameter_rules import register_shipped_rules
from coffer.controlplane import ControlPlane
from coffer.datastores import registry
from coffer.db.models import Instance, Operation, ServiceStatusRow, utcnow
from coffer.db.models_backups import Backup, BackupState
from coffer.db.models_day2 import InstanceEvent
from coffer.db.session import transaction
from coffer.errors import BadRequest, CofferError, NotFound, NotImplementedByDatastore, OverLimit
from coffer.status import ServerStatus, ServiceStatus, Task
from coffer.taskmanager import day2
from coffer.taskmanager.day2_requests import (
    InstanceNotActionable,
    record_rename,
    request_action,
    request_group_applies,
    request_update,
)
from coffer.taskmanager.instances import CREATE
from coffer.taskmanager.operations import enqueue

PROJECT = "demo-project"
USER = "demo-user"
CALLER = day2.Caller(PROJECT, USER)


class World:
    def __init__(self, cp: ControlPlane, instance_id: str, version_id: str) -> None:
        self.cp = cp
        self.instance_id = instance_id
        self.version_id = version_id

    def action(self, action: str, args: Any) -> str:
        with transaction(self.cp.session_factory) as session:
            inst = session.get(Instance, self.instance_id)
            assert inst is not None
            return request_action(self.cp, session, CALLER, inst, action, args)

    def update(self, field: str, value: Any, caller: day2.Caller = CALLER) -> str | None:
        with transaction(self.cp.session_factory) as session:
            inst = session.get(Instance, self.instance_id)
            assert inst is not None
            return request_update(self.cp, session, caller, inst, field, value)

    def instance(self) -> Instance:
        with self.cp.session_factory() as session:
            inst = session.get(Instance, self.instance_id)
            assert inst is not None
            return inst

    def counts(self) -> tuple[Any, ...]:
        with self.cp.session_factory() as session:
            inst = session.get(Instance, self.instance_id)
            assert inst is not None
            return (
                session.scalar(select(func.count()).select_from(Operation)),
                session.scalar(select(func.count()).select_from(InstanceEvent)),
                tuple(quotas.charges_of(session, self.instance_id).items()),
                inst.task,
                inst.flavor_id,
                inst.volume_size,
                inst.configuration_id,
                dict(inst.access or {}),
            )

    def group(self, values: dict[str, Any], project: str = PROJECT, **where: Any) -> str:
        with transaction(self.cp.session_factory) as session:
            made = groups.create_group(session, groups.Owner(project), "g", values, **where)
            return made.id

    def set_state(
        self, task: Task = Task.NONE, service: ServiceStatus = ServiceStatus.HEALTHY, age: float = 0
    ) -> None:
        with transaction(self.cp.session_factory) as session:
            inst = session.get(Instance, self.instance_id)
            row = session.get(ServiceStatusRow, self.instance_id)
            assert inst is not None and row is not None
            inst.task = task
            row.status = service
            row.updated_at = utcnow() - timedelta(seconds=age)


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
    with pytest.MonkeyPatch.context() as patch:
        # Pretend one MariaDB and one PostgreSQL are installed rather than run their binaries.
        patch.setattr(
            registry,
            "_detected",
            [
                registry.InstalledEngine("mariadb", "10.11.6"),
                registry.InstalledEngine("postgresql", "15.4"),
            ],
        )
        with transaction(cp.session_factory) as session:
            version = catalog.register_datastore_version(
                session, "mariadb", "10.11", "mariadb", version="10.11.6", default=True
            )
            catalog.register_datastore_version(session, "mariadb", "spare", "mariadb", "10.11.6")
            catalog.register_datastore_version(
                session, "postgresql", "15", "postgresql", version="15.4", default=True
            )
            catalog.create_flavor(session, "6", "d1.micro", 256, 1, 1)
            catalog.create_flavor(session, "1", "m1.tiny", 512, 1, 1)
            catalog.create_flavor(session, "0", "too.small", 64, 1, 1)
            register_shipped_rules(session)
            inst = Instance(
                tenant_id=PROJECT,
                name="day2",
                flavor_id="6",
                volume_size=1,
                datastore_version_id=version.id,
                task=Task.NONE,
                server_status=ServerStatus.ACTIVE,
                encrypted_key="",
                compute_ref={"private": "127.10.0.9"},
                access={"is_public": False},
            )
            session.add(inst)
            session.flush()
            session.add(ServiceStatusRow(instance_id=inst.id, status=ServiceStatus.HEALTHY))
            quotas.reserve(session, settings, PROJECT, inst.id, {"ram": 256, "volumes": 1})
            instance_id, version_id = inst.id, version.id
        try:
            yield World(cp, instance_id, version_id)
        finally:
            cp.close()


def test_restart_is_recorded_then_the_busy_instance_refuses_everything(world: World) -> None:
    op_id = world.action("restart", {})
    with world.cp.session_factory() as session:
        op = session.get(Operation, op_id)
        assert op is not None and op.kind == day2.RESTART and op.payload["prior_task"] == "none"
        (event,) = day2.list_events(session, world.instance_id)
    assert (event["action"], event["user_id"], event["state"]) == ("restart", USER, "running")
    assert world.instance().task is Task.REBOOTING
    before = world.counts()
    group = world.group({"max_connections": 200}, datastore="mariadb")
    for call in (
        lambda: world.action("restart", {}),
        lambda: world.action("resize", {"flavorRef": "1"}),
        lambda: world.action("resize", {"volume": {"size": 2}}),
        lambda: world.update("configuration", group),
        lambda: world.update("access", {"is_public": True}),
    ):
        with pytest.raises(InstanceNotActionable, match="status is REBOOT") as refused:
            call()
        assert refused.value.status == 422
    assert world.counts() == before


@pytest.mark.parametrize(
    ("service", "age", "phrase"),
    [
        (ServiceStatus.SHUTDOWN, 0, "SHUTDOWN"),
        (ServiceStatus.BLOCKED, 0, "ACTIVE"),
        (ServiceStatus.HEALTHY, 3600, "silent"),
    ],
)
def test_an_engine_that_is_not_running_refuses_changes(
    world: World, service: ServiceStatus, age: float, phrase: str
) -> None:
    world.set_state(service=service, age=age)
    before = world.counts()
    with pytest.raises(InstanceNotActionable, match=phrase):
        world.action("resize", {"volume": {"size": 2}})
    with pytest.raises(InstanceNotActionable):
        world.update("access", {"is_public": True})
    assert world.counts() == before
    if age == 0:  # a stopped or stuck engine may still be restarted (Trove's rule)
        world.action("restart", {})


BAD_ACTIONS: list[tuple[str, Any, type[CofferError], str]] = [
    ("resize", {}, BadRequest, "flavorRef"),
    ("resize", None, BadRequest, "flavorRef"),
    ("resize", {"volume": {"size": 1}}, BadRequest, "larger than the current"),
    ("resize", {"volume": {"size": 0}}, BadRequest, "whole number"),
    ("resize", {"volume": {"size": True}}, BadRequest, "whole number"),
    ("resize", {"volume": 2}, BadRequest, "whole number"),
    ("resize", {"volume": {"size": 11}}, OverLimit, "largest accepted"),
    ("resize", {"flavorRef": "6"}, BadRequest, "already has flavor"),
    ("resize", {"flavorRef": "nope"}, NotFound, "not found"),
    ("resize", {"flavorRef": {"id": "1"}}, BadRequest, "flavor id or link"),
    ("resize", {"flavorRef": "0"}, BadRequest, "128 MB"),
    ("restart", {"soft": True}, BadRequest, "no arguments"),
]


@pytest.mark.parametrize(("action", "args", "error", "phrase"), BAD_ACTIONS)
def test_bad_actions_change_nothing(
    world: World, action: str, args: Any, error: type[CofferError], phrase: str
) -> None:
    before = world.counts()
    with pytest.raises(error, match=phrase):
        world.action(action, args)
    assert world.counts() == before


def test_resize_charges_growth_now_and_volumes_over_quota_are_refused(world: World) -> None:
    with transaction(world.cp.session_factory) as session:
        quotas.set_limits(session, world.cp.settings, PROJECT, {"volumes": 2})
    with pytest.raises(quotas.QuotaExceeded):
        world.action("resize", {"volume": {"size": 3}})
    world.action("resize", {"flavorRef": "http://coffer/v1.0/x/flavors/1"})
    inst = world.instance()
    assert (inst.task, inst.flavor_id) == (Task.RESIZING, "6")  # the flow changes the flavor
    with world.cp.session_factory() as session:
        assert quotas.charges_of(session, world.instance_id) == {"ram": 512, "volumes": 1}


def test_access_keeps_the_fields_left_out(world: World) -> None:
    op_id = world.update("access", {"allowed_cidrs": ["10.0.0.0/8"]})
    assert op_id is not None
    with world.cp.session_factory() as session:
        op = session.get(Operation, op_id)
        assert op is not None
        assert op.payload["access"] == {"is_public": False, "allowed_cidrs": ["10.0.0.0/8"]}
        assert op.payload["previous_addresses"] == {"private": "127.10.0.9", "public": None}
    world.set_state()
    # The same access again: nothing to do, nothing recorded.
    with transaction(world.cp.session_factory) as session:
        inst = session.get(Instance, world.instance_id)
        assert inst is not None
        inst.access = {"is_public": False, "allowed_cidrs": ["10.0.0.0/8"]}
    before = world.counts()
    assert world.update("access", {"is_public": False}) is None
    assert world.counts() == before


def test_attach_and_detach_configuration(world: World) -> None:
    mine = world.group({"max_connections": 300}, datastore="mariadb")
    postgres = world.group({"work_mem": 8192}, datastore="postgresql")
    others = world.group({"max_connections": 300}, project="other", datastore="mariadb")
    before = world.counts()
    assert world.update("configuration", None) is None  # nothing attached: nothing to do
    with pytest.raises(BadRequest, match="another datastore version"):
        world.update("configuration", postgres)
    with pytest.raises(NotFound):
        world.update("configuration", others)
    with pytest.raises(NotFound):
        world.update("configuration", "no-such-group")
    assert world.counts() == before

    op_id = world.update("configuration", mine)
    assert op_id is not None
    inst = world.instance()
    assert (inst.configuration_id, inst.task) == (mine, Task.UPDATING)
    world.set_state()
    with pytest.raises(BadRequest, match="already has configuration group"):
        world.update("configuration", mine)
    detach = world.update("configuration", None)
    assert detach is not None and world.instance().configuration_id is None
    with world.cp.session_factory() as session:
        actions = [e["action"] for e in day2.list_events(session, world.instance_id)]
        op = session.get(Operation, detach)
        assert op is not None and op.payload["previous_configuration_id"] == mine
    assert actions == ["detach_configuration", "attach_configuration"]


def test_upgrade_is_refused_when_one_engine_serves_both_versions(world: World) -> None:
    before = world.counts()
    with pytest.raises(BadRequest, match="single mariadb engine installed"):
        world.update("datastore_version", "spare")
    with pytest.raises(BadRequest, match="already runs"):
        world.update("datastore_version", "10.11")
    with pytest.raises(NotFound):
        world.update("datastore_version", "12.0")
    with pytest.raises(NotImplementedByDatastore):
        world.update("replica_of", None)
    assert world.counts() == before


def test_rename_is_an_event_of_its_own(world: World) -> None:
    with transaction(world.cp.session_factory) as session:
        inst = session.get(Instance, world.instance_id)
        assert inst is not None
        record_rename(session, CALLER, inst, "renamed")
        record_rename(session, CALLER, inst, "renamed")  # unchanged: no second event
    with world.cp.session_factory() as session:
        (event,) = day2.list_events(session, world.instance_id)
    assert event["state"] == "succeeded" and event["details"]["new_name"] == "renamed"
    assert world.instance().name == "renamed"


def test_changed_groups_are_applied_again(world: World) -> None:
    no_compute: Any = None  # finding changed groups needs no compute driver
    flows = day2.Day2Flows(world.cp, no_compute)
    group = world.group({"max_connections": 300}, datastore="mariadb")
    world.update("configuration", group)
    world.set_state()
    assert flows.converge_configurations() == []  # applied since the group last changed

    with transaction(world.cp.session_factory) as session:
        groups.merge_values(session, groups.Owner(PROJECT), group, {"max_connections": 400})
    world.set_state(task=Task.RESIZING)
    assert flows.converge_configurations() == []  # busy: later
    world.set_state(task=Task.RESTART_REQUIRED)
    (op_id,) = flows.converge_configurations()
    inst = world.instance()
    assert inst.task is Task.UPDATING
    with world.cp.session_factory() as session:
        op = session.get(Operation, op_id)
        assert op is not None and op.payload["prior_task"] == "restart_required"
        latest = day2.list_events(session, world.instance_id)[0]
    assert (latest["action"], latest["user_id"]) == ("apply_configuration", None)
    world.set_state()
    assert flows.converge_configurations() == []


def test_an_event_whose_operation_was_cancelled_shows_the_outcome(world: World) -> None:
    op_id = world.action("restart", {})
    with transaction(world.cp.session_factory) as session:
        op = session.get(Operation, op_id)
        assert op is not None
        op.state, op.error = "failed", "cancelled by reset_status"
    with world.cp.session_factory() as session:
        (event,) = day2.list_events(session, world.instance_id)
    assert event["state"] == "failed"
    assert event["fault"] == {"message": "cancelled by reset_status"}


def _add_backup(world: World, state: BackupState = BackupState.NEW) -> str:
    with transaction(world.cp.session_factory) as session:
        row = Backup(
            tenant_id=PROJECT,
            name="nightly",
            instance_id=world.instance_id,
            datastore_version_id=world.version_id,
            state=state,
            storage_driver="file",
            storage_key=f"{PROJECT}/x",
            volume_size=1,
            engine_position={},
        )
        session.add(row)
        session.flush()
        return row.id


def _set_backup_state(world: World, backup_id: str, state: BackupState) -> None:
    with transaction(world.cp.session_factory) as session:
        row = session.get(Backup, backup_id)
        assert row is not None
        row.state = state


def _every_operation(world: World, group: str) -> list[Any]:
    return [
        lambda: world.action("restart", {}),
        lambda: world.action("resize", {"flavorRef": "1"}),
        lambda: world.action("resize", {"volume": {"size": 2}}),
        lambda: world.update("configuration", group),
        lambda: world.update("access", {"is_public": True}),
        lambda: world.update("datastore_version", "spare"),
    ]


@pytest.mark.parametrize("state", [BackupState.NEW, BackupState.BUILDING, BackupState.SAVING])
def test_a_running_backup_refuses_every_operation(world: World, state: BackupState) -> None:
    group = world.group({"max_connections": 200}, datastore="mariadb")
    backup = _add_backup(world, state)
    before = world.counts()
    for call in _every_operation(world, group):
        with pytest.raises(InstanceNotActionable, match=f"status is BACKUP \\(backup {backup}"):
            call()
    assert world.counts() == before
    # Detaching is an operation too.
    with transaction(world.cp.session_factory) as session:
        inst = session.get(Instance, world.instance_id)
        assert inst is not None
        inst.configuration_id = group
    with pytest.raises(InstanceNotActionable, match="BACKUP"):
        world.update("configuration", None)
    assert world.instance().configuration_id == group
    # Once the backup has ended the instance is ACTIVE again.
    _set_backup_state(world, backup, BackupState.COMPLETED)
    assert world.action("restart", {})


@pytest.mark.parametrize(
    ("task", "server", "shown"),
    [
        (Task.BUILDING, ServerStatus.BUILD, "BUILD"),
        (Task.BUILDING_ERROR_GUEST, ServerStatus.ERROR, "ERROR"),
        (Task.RESIZING, ServerStatus.ACTIVE, "RESIZE"),
        (Task.UPDATING, ServerStatus.ACTIVE, "another operation is under way"),
        (Task.DELETING, ServerStatus.ACTIVE, "being deleted"),
    ],
)
def test_building_busy_failed_or_deleting_instances_refuse_everything(
    world: World, task: Task, server: ServerStatus, shown: str
) -> None:
    group = world.group({"max_connections": 200}, datastore="mariadb")
    world.set_state(task=task)
    with transaction(world.cp.session_factory) as session:
        inst = session.get(Instance, world.instance_id)
        assert inst is not None
        inst.server_status = server
    before = world.counts()
    for call in _every_operation(world, group):
        with pytest.raises(InstanceNotActionable, match=shown) as refused:
            call()
        assert refused.value.status == 422
    assert world.counts() == before


def test_restart_required_takes_restart_and_resize_but_not_group_changes(world: World) -> None:
    group = world.group({"max_connections": 200}, datastore="mariadb")
    world.set_state(task=Task.RESTART_REQUIRED)
    before = world.counts()
    # As in Trove: attaching and detaching need task NONE.
    with pytest.raises(InstanceNotActionable, match="status is RESTART_REQUIRED"):
        world.update("configuration", group)
    with transaction(world.cp.session_factory) as session:
        inst = session.get(Instance, world.instance_id)
        assert inst is not None
        inst.configuration_id = group
    with pytest.raises(InstanceNotActionable, match="status is RESTART_REQUIRED"):
        world.update("configuration", None)
    assert world.counts()[:2] == before[:2]
    # What Trove's action guard allows: a restart (which clears it), and a resize.
    op_id = world.action("resize", {"volume": {"size": 2}})
    with world.cp.session_factory() as session:
        op = session.get(Operation, op_id)
        assert op is not None and op.payload["prior_task"] == "restart_required"
    world.set_state(task=Task.RESTART_REQUIRED)
    assert world.action("restart", {})


def test_a_changed_group_is_handed_to_active_instances_at_once(world: World) -> None:
    no_compute: Any = None  # finding changed groups needs no compute driver
    flows = day2.Day2Flows(world.cp, no_compute)
    group = world.group({"max_connections": 300}, datastore="mariadb")
    world.update("configuration", group)
    world.set_state()

    def patch(values: dict[str, Any]) -> list[str]:
        with transaction(world.cp.session_factory) as session:
            _, attached = groups.merge_values(session, groups.Owner(PROJECT), group, values)
            return request_group_applies(world.cp, session, CALLER, attached)

    (op_id,) = patch({"max_connections": 400})
    assert world.instance().task is Task.UPDATING
    with world.cp.session_factory() as session:
        op = session.get(Operation, op_id)
        assert op is not None and op.kind == day2.APPLY_CONFIGURATION
        latest = day2.list_events(session, world.instance_id)[0]
    # The owner's change, applied by the API's own operation: the poll has nothing left to do.
    assert (latest["action"], latest["user_id"]) == ("apply_configuration", USER)
    world.set_state()
    assert flows.converge_configurations() == []

    # While a backup runs the instance is not ACTIVE: the change waits for it to end.
    backup = _add_backup(world)
    before = world.counts()
    assert patch({"max_connections": 500}) == []
    assert flows.converge_configurations() == []
    assert world.counts()[:2] == before[:2]
    _set_backup_state(world, backup, BackupState.COMPLETED)
    (later,) = flows.converge_configurations()
    with world.cp.session_factory() as session:
        latest = day2.list_events(session, world.instance_id)[0]
    assert (latest["action"], latest["user_id"]) == ("apply_configuration", None)
    assert later != op_id


def test_an_instance_created_with_a_group_is_not_applied_again(world: World) -> None:
    no_compute: Any = None
    flows = day2.Day2Flows(world.cp, no_compute)
    group = world.group({"max_connections": 300}, datastore="mariadb")
    with transaction(world.cp.session_factory) as session:
        inst = session.get(Instance, world.instance_id)
        assert inst is not None
        inst.configuration_id = group
        # The create that gave the engine the group's values.
        enqueue(session, CREATE, inst.id, {})
    assert flows.converge_configurations() == []
    with transaction(world.cp.session_factory) as session:
        groups.merge_values(session, groups.Owner(PROJECT), group, {"max_connections": 301})
    assert len(flows.converge_configurations()) == 1
