"""Authorization over every route of the API: anonymous, wrong-project, reader, member and admin
callers each get exactly the documented outcome, and a route without an entry here fails.

The app is the real one (``create_app``) on a real control plane (SQLite control DB, kombu's
in-process memory bus). Where a route calls the instance's guest, a stand-in guest agent answers
on that bus: this file tests who may call what, not engines (tests/integration/test_isolation.py
runs the allowed path against a real MariaDB). Every refusal is also checked to have reached
neither the guest nor the control DB.

Identities (``/v1.0/<project>`` is the project in the URL):

* ``anonymous`` - no token, demo's URL;
* ``foreign`` - a member of project ``other`` on demo's URL (403: the URL is not its project);
* ``other`` - the same member on its own URL, naming demo's instance (404: it cannot learn the
  instance exists; its own collections answer normally);
* ``reader`` - the reader role on demo; ``member`` - demo's member;
* ``admin`` - the admin on the admin project's own URL, acting on demo's instance.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from coffer import catalog
from coffer.api.app import Services, create_app
from coffer.api.audit import AuditedRoute
from coffer.api.policy import Authorize
from coffer.bus.envelope import StaticKeyRing
from coffer.bus.rpc import RpcServer
from coffer.config import load_settings
from coffer.configuration import parameter_rules
from coffer.controlplane import ControlPlane, guest_topic
from coffer.datastores import registry
from coffer.db.models import (
    DatastoreVersion,
    Instance,
    Operation,
    QuotaCharge,
    RootEnabledHistory,
    ServiceStatusRow,
    utcnow,
)
from coffer.db.models_backups import Backup, BackupState, BackupStrategy
from coffer.db.models_day2 import Configuration, ConfigurationParameterRule, ConfigurationValue
from coffer.db.models_schedules import BackupSchedule
from coffer.db.session import transaction
from coffer.identity import IdentityService
from coffer.identity.passwords import ScryptCost
from coffer.status import ServerStatus, ServiceStatus, Task

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*httpx2.*")
    from fastapi.routing import APIRoute, iter_route_contexts
    from fastapi.testclient import TestClient

FAST_COST = ScryptCost(n=2**4, r=8, p=1)
PASSWORDS = {
    "admin": "admin-matrix-pw",
    "demo": "demo-matrix-pw",
    "reader": "reader-matrix-pw",
    "eve": "eve-matrix-pw",
}
IDENTITIES = ("anonymous", "foreign", "other", "reader", "member", "admin")
#: Demo's configuration group, put back by ``World.reset`` after a test deletes or changes it.
CONFIGURATION_ID = "c0ff1e00-0000-4000-8000-00000000c0f1"
#: Demo's completed backup of the matrix instance, put back by ``World.reset``.
BACKUP_ID = "bac0b000-0000-4000-8000-00000000bac0"
#: Demo's backup schedule of the matrix instance, put back by ``World.reset``.
SCHEDULE_ID = "5c4ed000-0000-4000-8000-000000005c4e"


# --- the world: a control plane, the app, a demo instance and its stand-in guest ----------------


class StandInGuest:
    """Answers the guest calls the API makes, and records them (refusals must record none)."""

    rpc_methods = frozenset(
        {
            "list_databases",
            "create_databases",
            "delete_database",
            "list_users",
            "create_users",
            "change_passwords",
            "get_user",
            "update_user",
            "delete_user",
            "list_access",
            "grant_access",
            "revoke_access",
            "enable_root",
            "disable_root",
            "stop_db",
            "restart",
            "guest_log_list",
            "guest_log_action",
        }
    )

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._lock = threading.Lock()

    def _record(self, name: str) -> None:
        with self._lock:
            self.calls.append(name)

    def list_databases(self, limit: int, marker: str | None) -> Any:
        self._record("list_databases")
        return [{"name": "appdb"}], None

    def create_databases(self, databases: list[Any]) -> None:
        self._record("create_databases")

    def delete_database(self, name: str) -> None:
        self._record("delete_database")

    def list_users(self, limit: int, marker: str | None) -> Any:
        self._record("list_users")
        return [{"name": "app", "host": "%", "databases": [{"name": "appdb"}]}], None

    def create_users(self, users: list[Any]) -> None:
        self._record("create_users")

    def change_passwords(self, users: list[Any]) -> None:
        self._record("change_passwords")

    def get_user(self, name: str, host: str) -> Any:
        self._record("get_user")
        return {"name": name, "host": host, "databases": [{"name": "appdb"}]}

    def update_user(self, name: str, host: str, attrs: dict[str, Any]) -> None:
        self._record("update_user")

    def delete_user(self, name: str, host: str) -> None:
        self._record("delete_user")

    def list_access(self, name: str, host: str) -> Any:
        self._record("list_access")
        return [{"name": "appdb"}]

    def grant_access(self, name: str, host: str, databases: list[str]) -> None:
        self._record("grant_access")

    def revoke_access(self, name: str, host: str, database: str) -> None:
        self._record("revoke_access")

    def enable_root(self, password: str | None) -> Any:
        self._record("enable_root")
        return {"name": "root", "password": password or "generated-root-pw"}

    def disable_root(self) -> None:
        self._record("disable_root")

    def stop_db(self) -> None:
        self._record("stop_db")

    def restart(self) -> None:
        self._record("restart")

    def guest_log_list(self, **options: Any) -> Any:
        self._record("guest_log_list")
        return [self._log("guest", "SYS", options)]

    def guest_log_action(self, name: str, **request: Any) -> Any:
        self._record("guest_log_action")
        return self._log(name, "USER", request)

    @staticmethod
    def _log(name: str, kind: str, options: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": name,
            "type": kind,
            "status": "Disabled",
            "published": 0,
            "pending": 0,
            "container": options.get("container"),
            "prefix": f"matrix/mariadb-{name}/",
            "metafile": f"matrix/mariadb-{name}_metafile",
        }


@dataclass
class World:
    """A real API app with the demo project's instance, tokens for every identity, and ids."""

    cp: ControlPlane
    client: TestClient
    guest: StandInGuest
    instance_id: str
    projects: dict[str, str]
    tokens: dict[str, str]
    version_id: str
    spare_version_id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def caller(self, identity: str) -> tuple[str | None, str]:
        """(token, URL project) of ``identity``."""
        demo = self.projects["demo"]
        return {
            "anonymous": (None, demo),
            "foreign": (self.tokens["eve"], demo),
            "other": (self.tokens["eve"], self.projects["other"]),
            "reader": (self.tokens["reader"], demo),
            "member": (self.tokens["demo"], demo),
            "admin": (self.tokens["admin"], self.projects["admin"]),
        }[identity]

    def request(
        self,
        method: str,
        identity: str,
        path: str,
        headers: dict[str, str] | None = None,
        **kw: Any,
    ) -> Any:
        """``method`` on ``path`` (``{tenant_id}`` is filled in for ``identity``)."""
        token, project = self.caller(identity)
        sent = dict(headers or {})
        if token is not None:
            sent["X-Auth-Token"] = token
        return self.client.request(method, path.replace("{tenant_id}", project), headers=sent, **kw)

    def reset(self) -> None:
        """Put demo's instance back to ACTIVE with root enabled, and the spare version back."""
        with transaction(self.cp.session_factory) as session:
            inst = session.get(Instance, self.instance_id)
            assert inst is not None
            inst.task, inst.task_description = Task.NONE, ""
            inst.server_status, inst.deleted, inst.name = ServerStatus.ACTIVE, False, "matrix"
            row = session.get(ServiceStatusRow, self.instance_id)
            assert row is not None
            row.status, row.updated_at = ServiceStatus.RUNNING, utcnow()
            if session.get(RootEnabledHistory, self.instance_id) is None:
                session.add(RootEnabledHistory(instance_id=self.instance_id, user="someone"))
            for op in session.scalars(select(Operation).where(Operation.state == "pending")):
                op.state = "failed"
            spare = catalog.register_datastore_version(
                session, "mariadb", "spare", "mariadb", version="10.11.6"
            )
            self.spare_version_id = spare.id
            self._reset_configuration(session)
            self._reset_backups(session)
            self._reset_schedules(session)
        self.guest.calls.clear()

    def _reset_schedules(self, session: Any) -> None:
        for row in session.scalars(select(BackupSchedule).where(BackupSchedule.id != SCHEDULE_ID)):
            session.delete(row)
        row = session.get(BackupSchedule, SCHEDULE_ID)
        if row is None:
            row = BackupSchedule(id=SCHEDULE_ID)
            session.add(row)
        row.tenant_id, row.instance_id = self.projects["demo"], self.instance_id
        row.name, row.pattern, row.retention_count = "matrix-schedule", "0 3 * * *", 7
        row.enabled, row.incremental, row.next_run = True, False, None

    def _reset_backups(self, session: Any) -> None:
        # Only demo's completed backup and its quota charge stay; what a request added goes.
        for row in session.scalars(select(Backup).where(Backup.id != BACKUP_ID)):
            session.delete(row)
        for charge in session.scalars(
            select(QuotaCharge).where(
                QuotaCharge.holder_id.like("backup:%"),
                QuotaCharge.holder_id != f"backup:{BACKUP_ID}",
            )
        ):
            session.delete(charge)
        for strategy in session.scalars(select(BackupStrategy)):
            session.delete(strategy)
        session.flush()
        session.add(BackupStrategy(tenant_id=self.projects["demo"], swift_container="matrix"))
        if session.get(Backup, BACKUP_ID) is None:
            session.add(
                Backup(
                    id=BACKUP_ID,
                    tenant_id=self.projects["demo"],
                    name="matrix-backup",
                    instance_id=self.instance_id,
                    datastore_version_id=self.version_id,
                    state=BackupState.COMPLETED,
                    storage_driver="file",
                    storage_key=f"{self.projects['demo']}/{BACKUP_ID}",
                    checksum="0" * 64,
                    wrapped_key="wrapped",
                    size=1024,
                    raw_size=4096,
                    engine_position={},
                )
            )

    def _reset_configuration(self, session: Any) -> None:
        # Only the rules the mgmt routes of the matrix add, change or delete are restored:
        # reloading all of them before every request would slow the matrix down.
        added = session.get(ConfigurationParameterRule, (self.version_id, "thread_stack"))
        if added is not None:
            session.delete(added)
        shipped = {rule.name: rule for rule in parameter_rules.shipped_rules("mariadb")}
        parameter_rules.load_rules(session, self.version_id, [shipped["max_connections"]])
        group = session.get(Configuration, CONFIGURATION_ID)
        if group is None:
            group = Configuration(
                id=CONFIGURATION_ID,
                tenant_id=self.projects["demo"],
                name="matrix-config",
                datastore_version_id=self.version_id,
            )
            session.add(group)
            session.flush()
        group.name = "matrix-config"
        for row in session.scalars(
            select(ConfigurationValue).where(ConfigurationValue.configuration_id == group.id)
        ):
            session.delete(row)
        session.flush()
        session.add(
            ConfigurationValue(configuration_id=group.id, name="max_connections", value=200)
        )

    def fingerprint(self) -> tuple[Any, ...]:
        """What a refused request must leave unchanged."""
        with self.cp.session_factory() as session:
            inst = session.get(Instance, self.instance_id)
            assert inst is not None
            count = session.scalar(select(func.count()).select_from(Instance))
            ops = session.scalar(select(func.count()).select_from(Operation))
            charges = session.scalar(select(func.count()).select_from(QuotaCharge))
            versions = session.scalar(select(func.count()).select_from(DatastoreVersion))
            root = session.get(RootEnabledHistory, self.instance_id) is not None
            backups = tuple(
                session.execute(select(Backup.id, Backup.state).order_by(Backup.id)).all()
            )
            strategies = session.scalar(select(func.count()).select_from(BackupStrategy))
            schedules = tuple(
                session.execute(
                    select(BackupSchedule.id, BackupSchedule.enabled).order_by(BackupSchedule.id)
                ).all()
            )
            return (
                count,
                ops,
                charges,
                versions,
                inst.name,
                inst.task,
                root,
                *self._configs(),
                backups,
                strategies,
                schedules,
            )

    def _configs(self) -> tuple[Any, ...]:
        with self.cp.session_factory() as session:
            groups = session.scalar(select(func.count()).select_from(Configuration))
            values = session.scalars(
                select(ConfigurationValue.value).order_by(ConfigurationValue.name)
            )
            rule = session.get(ConfigurationParameterRule, (self.version_id, "max_connections"))
            rules = session.scalar(select(func.count()).select_from(ConfigurationParameterRule))
            group = session.get(Configuration, CONFIGURATION_ID)
            return (
                groups,
                tuple(values),
                rules,
                (rule.max_size, rule.restart_required) if rule else None,
                group.name if group else None,
            )


def build_world(tmp: Path, **default: Any) -> Iterator[World]:
    """A ``World`` on a fresh state dir; ``default`` overrides ``[DEFAULT]`` options."""
    settings = load_settings(
        environ={},
        overrides={
            "DEFAULT": {"state_dir": str(tmp), "transport_url": "memory://", **default},
            "database": {"connection": f"sqlite:///{tmp / 'coffer.db'}"},
        },
    )
    cp = ControlPlane(settings)
    server: RpcServer | None = None
    # The API asks the host which engines it can run; pretend MariaDB 10.11.6 is installed
    # rather than run mariadbd from a unit test.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(registry, "_detected", [registry.InstalledEngine("mariadb", "10.11.6")])
        try:
            identity = IdentityService(
                cp.session_factory, os.urandom(32), settings, scrypt_cost=FAST_COST
            )
            identity.bootstrap(PASSWORDS["admin"], PASSWORDS["demo"])
            identity.create_user("reader", PASSWORDS["reader"], "demo", ["reader"])
            identity.create_project("other")
            identity.create_user("eve", PASSWORDS["eve"], "other", ["member"])
            projects = {n: identity.create_project(n).id for n in ("admin", "demo", "other")}
            with transaction(cp.session_factory) as session:
                version = catalog.register_datastore_version(
                    session, "mariadb", "10.11", "mariadb", version="10.11.6", default=True
                )
                version_id = version.id
                catalog.create_flavor(session, "6", "d1.micro", 256, 1, 1)
                parameter_rules.register_shipped_rules(session)
                inst = Instance(
                    tenant_id=projects["demo"],
                    name="matrix",
                    flavor_id="6",
                    volume_size=1,
                    datastore_version_id=version_id,
                    task=Task.NONE,
                    server_status=ServerStatus.ACTIVE,
                    encrypted_key="",
                    compute_ref={"private": "127.10.0.9"},
                )
                session.add(inst)
                session.flush()
                key, inst.encrypted_key = cp.new_instance_key(inst.id)
                session.add(ServiceStatusRow(instance_id=inst.id, status=ServiceStatus.RUNNING))
                instance_id = inst.id
            guest = StandInGuest()
            server = RpcServer(
                "memory://", guest_topic(instance_id), guest, StaticKeyRing({instance_id: key})
            )
            server.start()
            assert server.wait_ready(5)
            app = create_app(Services(settings, cp.session_factory, identity, rpc=cp))
            with TestClient(app, raise_server_exceptions=False) as client:
                tokens = {}
                for user, project in (
                    ("admin", "admin"),
                    ("demo", "demo"),
                    ("reader", "demo"),
                    ("eve", "other"),
                ):
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
                    tokens[user] = resp.headers["X-Subject-Token"]
                world = World(cp, client, guest, instance_id, projects, tokens, version_id)
                world.reset()
                yield world
        finally:
            if server is not None:
                server.stop()
            cp.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    # Rate limits off: the matrix sends hundreds of requests from one project in seconds.
    yield from build_world(
        tmp_path_factory.mktemp("matrix"),
        http_get_rate=0,
        http_post_rate=0,
        http_put_rate=0,
        http_delete_rate=0,
        http_mgmt_post_rate=0,
    )


# --- the documented outcomes --------------------------------------------------------------------


def _outcomes(**by_identity: int) -> dict[str, int]:
    assert set(by_identity) == set(IDENTITIES), by_identity
    return by_identity


def reads(ok: int = 200, other: int = 404) -> dict[str, int]:
    """A project's own resource: readers and members of the project, and admins."""
    return _outcomes(anonymous=401, foreign=403, other=other, reader=ok, member=ok, admin=ok)


def writes(ok: int = 202, other: int = 404) -> dict[str, int]:
    """A change to a project's resource: members of the project, and admins."""
    return _outcomes(anonymous=401, foreign=403, other=other, reader=403, member=ok, admin=ok)


def admins(ok: int = 200) -> dict[str, int]:
    return _outcomes(anonymous=401, foreign=403, other=403, reader=403, member=403, admin=ok)


def everyone_authenticated(ok: int = 200) -> dict[str, int]:
    """The catalogue: any token, on its own project's URL."""
    return _outcomes(anonymous=401, foreign=403, other=ok, reader=ok, member=ok, admin=ok)


def public(status: int, anonymous: int | None = None) -> dict[str, int]:
    return {i: status for i in IDENTITIES} | {"anonymous": anonymous or status}


@dataclass(frozen=True)
class Case:
    expect: dict[str, int]
    body: Any = None
    #: The rule a deferred route must name when it refuses a caller with a token (403).
    denied_rule: str | None = None
    headers: Callable[[World, str], dict[str, str]] | None = None
    query: str = ""


_I = "/v1.0/{tenant_id}/instances/{instance_id}"
_CREATE = {
    "instance": {
        "name": "m",
        "flavorRef": "6",
        "volume": {"size": 1},
        "datastore": {"type": "mariadb"},
    }
}
_USERS = {"users": [{"name": "bob", "password": "bob-secret-pw"}]}
_GRANT = {"databases": [{"name": "appdb"}]}
_CONFIGURATION = {
    "configuration": {
        "name": "tuned",
        "values": {"max_connections": 300},
        "datastore": {"type": "mariadb", "version": "10.11"},
    }
}
_SET_MAX_CONNECTIONS = {"configuration": {"values": {"max_connections": 300}}}
_RULE = {
    "configuration-parameter": {
        "name": "thread_stack",
        "restart_required": 1,
        "data_type": "integer",
        "min_size": 131072,
        "max_size": 1073741824,
    }
}
_CHANGED_RULE = {
    "configuration-parameter": {
        "name": "max_connections",
        "restart_required": 0,
        "data_type": "integer",
        "min_size": 10,
        "max_size": 5000,
    }
}
_C = "/v1.0/{tenant_id}/configurations/{configuration_id}"
#: The instance id is filled in by ``test_matrix`` (see ``_fill_body``).
_BACKUP = {"backup": {"name": "matrix-b", "instance": "{instance_id}"}}
_SCHEDULE = {
    "backup_schedule": {
        "instance": "{instance_id}",
        "name": "nightly",
        "pattern": "30 2 * * *",
        "retention": {"count": 3},
    }
}
_P = "/v1.0/{tenant_id}/datastores/{datastore}/versions/{version}/parameters"
_PV = "/v1.0/{tenant_id}/datastores/versions/{version_id}/parameters"
_MP = "/v1.0/{tenant_id}/mgmt/datastores/versions/{version_id}/parameters"
_NEW_VERSION = {
    "version": {
        "name": "spare",
        "datastore_name": "mariadb",
        "datastore_manager": "mariadb",
        "version": "10.11.6",
    }
}


def _subject(world: World, identity: str) -> dict[str, str]:
    token, _ = world.caller(identity)
    return {"X-Subject-Token": token or world.tokens["demo"]}


MATRIX: dict[tuple[str, str], list[Case]] = {
    # -- public ------------------------------------------------------------------------------
    ("GET", "/"): [Case(public(200))],
    ("GET", "/v1.0"): [Case(public(200))],
    ("GET", "/v1.0/"): [Case(public(200))],
    ("GET", "/openapi.json"): [Case(public(200))],
    ("GET", "/identity"): [Case(public(300))],
    ("GET", "/identity/"): [Case(public(300))],
    ("GET", "/identity/v3"): [Case(public(200))],
    ("GET", "/identity/v3/"): [Case(public(200))],
    # Authenticating needs credentials in the body, not a token: an empty body is refused.
    ("POST", "/identity/v3/auth/tokens"): [Case(public(400), body={})],
    ("GET", "/identity/v3/auth/tokens"): [Case(public(200, anonymous=401), headers=_subject)],
    ("HEAD", "/identity/v3/auth/tokens"): [Case(public(200, anonymous=401), headers=_subject)],
    # -- catalogue ---------------------------------------------------------------------------
    ("GET", "/v1.0/{tenant_id}/flavors"): [Case(everyone_authenticated())],
    ("GET", "/v1.0/{tenant_id}/flavors/{flavor_id}"): [Case(everyone_authenticated())],
    ("GET", "/v1.0/{tenant_id}/datastores"): [Case(everyone_authenticated())],
    ("GET", "/v1.0/{tenant_id}/datastores/versions/{version_id}"): [Case(everyone_authenticated())],
    ("GET", "/v1.0/{tenant_id}/datastores/{datastore}"): [Case(everyone_authenticated())],
    ("GET", "/v1.0/{tenant_id}/datastores/{datastore}/versions"): [Case(everyone_authenticated())],
    ("GET", "/v1.0/{tenant_id}/datastores/{datastore}/versions/{version}"): [
        Case(everyone_authenticated())
    ],
    ("GET", "/v1.0/{tenant_id}/datastores/{datastore}/versions/{version}/flavors"): [
        Case(everyone_authenticated())
    ],
    ("GET", "/v1.0/{tenant_id}/mgmt/datastore-versions"): [Case(admins())],
    ("POST", "/v1.0/{tenant_id}/mgmt/datastore-versions"): [Case(admins(202), body=_NEW_VERSION)],
    ("GET", "/v1.0/{tenant_id}/mgmt/datastore-versions/{version_id}"): [Case(admins())],
    ("PATCH", "/v1.0/{tenant_id}/mgmt/datastore-versions/{version_id}"): [
        Case(admins(202), body={"active": True})
    ],
    ("DELETE", "/v1.0/{tenant_id}/mgmt/datastore-versions/{version_id}"): [Case(admins(202))],
    # -- instances ---------------------------------------------------------------------------
    ("GET", "/v1.0/{tenant_id}/instances"): [Case(reads(other=200))],
    ("GET", "/v1.0/{tenant_id}/instances/detail"): [Case(reads(other=200))],
    # Another project's member creates in its own project: allowed, and nothing of demo's shows.
    ("POST", "/v1.0/{tenant_id}/instances"): [Case(writes(200, other=200), body=_CREATE)],
    ("GET", _I): [Case(reads())],
    ("PUT", _I): [
        Case(writes(), body={"instance": {"name": "renamed"}}),
        # Day-2 changes: detaching when nothing is attached changes nothing (202, as Trove);
        # an access change is recorded and handed to the taskmanager.
        Case(writes(), body={"instance": {"configuration": None}}),
        Case(writes(), body={"instance": {"access": {"is_public": True}}}),
        # The host runs one MariaDB, so there is nothing to upgrade to.
        Case(writes(400), body={"instance": {"datastore_version": "spare"}}),
    ],
    ("GET", f"{_I}/events"): [Case(reads())],
    ("PATCH", _I): [Case(writes(), body={"instance": {"name": "renamed"}})],
    ("DELETE", _I): [Case(writes())],
    ("POST", f"{_I}/action"): [
        Case(
            admins(202),
            body={"reset_status": {}},
            denied_rule="instance:reset_status",
        ),
        Case(
            writes(),
            body={"reset_status": {"force_delete": True}},
            denied_rule="instance:force_delete",
        ),
        Case(writes(), body={"restart": {}}, denied_rule="instance:restart"),
        Case(
            writes(),
            body={"resize": {"volume": {"size": 2}}},
            denied_rule="instance:resize_volume",
        ),
        # Allowed, then refused for the body: the instance has that flavor already.
        Case(
            writes(400),
            body={"resize": {"flavorRef": "6"}},
            denied_rule="instance:resize_flavor",
        ),
    ],
    # -- databases, users, access, root --------------------------------------------------------
    ("GET", f"{_I}/databases"): [Case(reads())],
    ("POST", f"{_I}/databases"): [Case(writes(), body={"databases": [{"name": "newdb"}]})],
    ("GET", f"{_I}/databases/{{name}}"): [Case(reads(501))],
    ("DELETE", f"{_I}/databases/{{name}}"): [Case(writes())],
    ("GET", f"{_I}/users"): [Case(reads())],
    ("POST", f"{_I}/users"): [Case(writes(), body=_USERS)],
    ("PUT", f"{_I}/users"): [Case(writes(), body=_USERS)],
    ("GET", f"{_I}/users/{{user}}"): [Case(reads())],
    ("PUT", f"{_I}/users/{{user}}"): [Case(writes(), body={"user": {"password": "new-secret-pw"}})],
    ("DELETE", f"{_I}/users/{{user}}"): [Case(writes())],
    ("GET", f"{_I}/users/{{user}}/databases"): [Case(reads())],
    ("PUT", f"{_I}/users/{{user}}/databases"): [Case(writes(), body=_GRANT)],
    ("DELETE", f"{_I}/users/{{user}}/databases/{{database}}"): [Case(writes())],
    ("GET", f"{_I}/root"): [Case(reads())],
    ("POST", f"{_I}/root"): [Case(writes(200))],
    ("DELETE", f"{_I}/root"): [Case(writes(204))],
    # -- guest logs ------------------------------------------------------------------------------
    ("GET", f"{_I}/log"): [Case(reads())],
    # Showing is a POST, so the reader is refused by the read-only backstop too.
    ("POST", f"{_I}/log"): [
        Case(writes(200), body={"name": "general"}),
        Case(writes(200), body={"name": "general", "enable": 1}),
    ],
    # Allowed, then 404: the matrix fills {name} with "appdb", which is no log of MariaDB's.
    ("GET", f"{_I}/log/{{name}}"): [Case(reads(404))],
    # -- limits and quotas ---------------------------------------------------------------------
    ("GET", "/v1.0/{tenant_id}/limits"): [Case(reads(other=200))],
    # The target is the project in the path (demo's): its reader and member see it.
    ("GET", "/v1.0/{tenant_id}/mgmt/quotas/{project_id}"): [
        Case(reads() | {"other": 403}, denied_rule="quota:show")
    ],
    ("PUT", "/v1.0/{tenant_id}/mgmt/quotas/{project_id}"): [
        Case(admins(), body={"quotas": {"backups": 50}}, denied_rule="quota:update")
    ],
    # -- configuration groups and parameters ----------------------------------------------------
    ("GET", "/v1.0/{tenant_id}/configurations"): [Case(reads(other=200))],
    ("POST", "/v1.0/{tenant_id}/configurations"): [
        Case(writes(200, other=200), body=_CONFIGURATION)
    ],
    ("GET", _C): [Case(reads())],
    ("GET", f"{_C}/instances"): [Case(reads())],
    ("PUT", _C): [Case(writes(), body=_SET_MAX_CONNECTIONS)],
    ("PATCH", _C): [Case(writes(200), body=_SET_MAX_CONNECTIONS)],
    ("DELETE", _C): [Case(writes())],
    ("GET", _P): [Case(everyone_authenticated())],
    ("GET", f"{_P}/{{parameter_name}}"): [Case(everyone_authenticated())],
    ("GET", _PV): [Case(everyone_authenticated())],
    ("GET", f"{_PV}/{{parameter_name}}"): [Case(everyone_authenticated())],
    ("GET", _MP): [Case(admins())],
    ("POST", _MP): [Case(admins(), body=_RULE)],
    ("GET", f"{_MP}/{{parameter_name}}"): [Case(admins())],
    ("PUT", f"{_MP}/{{parameter_name}}"): [Case(admins(), body=_CHANGED_RULE)],
    ("DELETE", f"{_MP}/{{parameter_name}}"): [Case(admins(204))],
    # -- backups and backup strategies ----------------------------------------------------------
    ("GET", "/v1.0/{tenant_id}/backups"): [Case(reads(other=200))],
    ("POST", "/v1.0/{tenant_id}/backups"): [Case(writes(), body=_BACKUP)],
    ("GET", "/v1.0/{tenant_id}/backups/{backup_id}"): [Case(reads())],
    ("DELETE", "/v1.0/{tenant_id}/backups/{backup_id}"): [Case(writes())],
    ("GET", f"{_I}/backups"): [Case(reads())],
    ("GET", f"{_I}/restore"): [Case(reads())],
    ("GET", "/v1.0/{tenant_id}/backup_strategies"): [Case(reads(other=200))],
    ("POST", "/v1.0/{tenant_id}/backup_strategies"): [
        Case(writes(other=202), body={"backup_strategy": {"swift_container": "nightly"}})
    ],
    ("DELETE", "/v1.0/{tenant_id}/backup_strategies"): [Case(writes(other=202))],
    # -- backup schedules (Coffer's extension) ---------------------------------------------------
    ("GET", "/v1.0/{tenant_id}/backup_schedules"): [Case(reads(other=200))],
    ("POST", "/v1.0/{tenant_id}/backup_schedules"): [Case(writes(200), body=_SCHEDULE)],
    ("GET", "/v1.0/{tenant_id}/backup_schedules/{schedule_id}"): [Case(reads())],
    ("PUT", "/v1.0/{tenant_id}/backup_schedules/{schedule_id}"): [
        Case(writes(200), body={"backup_schedule": {"enabled": False}})
    ],
    ("DELETE", "/v1.0/{tenant_id}/backup_schedules/{schedule_id}"): [Case(writes())],
    # -- management ----------------------------------------------------------------------------
    ("GET", "/v1.0/{tenant_id}/mgmt/instances"): [Case(admins())],
    ("GET", "/v1.0/{tenant_id}/mgmt/instances/{instance_id}"): [Case(admins())],
    ("POST", "/v1.0/{tenant_id}/mgmt/instances/{instance_id}/action"): [
        Case(admins(202), body={"reboot": {}})
    ],
}


# --- the tests ----------------------------------------------------------------------------------


def _app_routes(world: World) -> dict[tuple[str, str], Any]:
    found: dict[tuple[str, str], Any] = {}
    for context in iter_route_contexts(world.client.app.routes):  # type: ignore[attr-defined]
        route = context.original_route
        methods = set(getattr(route, "methods", None) or ())
        if not isinstance(route, APIRoute) and "GET" in methods:
            methods.discard("HEAD")  # Starlette adds HEAD to its own GET routes
        for method in methods:
            found[(method, context.path or "")] = route
    return found


def test_every_route_has_an_entry(world: World) -> None:
    routes = _app_routes(world)
    missing = sorted(set(routes) - set(MATRIX))
    assert not missing, f"routes without an authorization matrix entry: {missing}"
    stale = sorted(set(MATRIX) - set(routes))
    assert not stale, f"matrix entries for routes that no longer exist: {stale}"


def test_every_tenant_route_is_authorized_and_audited(world: World) -> None:
    for (method, path), route in _app_routes(world).items():
        if not path.startswith("/v1.0/{tenant_id}"):
            continue
        assert isinstance(route, AuditedRoute), f"{method} {path} is not an AuditedRoute"
        guards = [d.call for d in route.dependant.dependencies if isinstance(d.call, Authorize)]
        assert len(guards) == 1, f"{method} {path} must depend on exactly one authorize(...)"
        guard = guards[0]
        deferred_cases = [c for c in MATRIX[(method, path)] if c.denied_rule]
        if guard.rule is None:
            assert deferred_cases, f"{method} {path} enforces in its handler: name the rule"
            for case in deferred_cases:
                assert case.denied_rule in guard.deferred


def _guard(route: Any) -> Authorize | None:
    if not isinstance(route, APIRoute):
        return None
    found = [d.call for d in route.dependant.dependencies if isinstance(d.call, Authorize)]
    return found[0] if found else None


def _fill(world: World, path: str) -> str:
    values = {
        "instance_id": world.instance_id,
        "user": "app",
        "name": "appdb",
        "database": "appdb",
        "flavor_id": "6",
        "datastore": "mariadb",
        "version": "10.11",
        "project_id": world.projects["demo"],
        "configuration_id": CONFIGURATION_ID,
        "parameter_name": "max_connections",
        "backup_id": BACKUP_ID,
        "schedule_id": SCHEDULE_ID,
    }
    filled = path
    if "/mgmt/datastore-versions/{version_id}" in path:
        filled = filled.replace("{version_id}", world.spare_version_id)
    filled = filled.replace("{version_id}", world.version_id)
    for key, value in values.items():
        filled = filled.replace("{" + key + "}", value)
    return filled


def _fill_body(world: World, body: Any) -> Any:
    """``body`` with ``{instance_id}`` in its strings replaced by the demo instance's id."""
    if isinstance(body, dict):
        return {key: _fill_body(world, value) for key, value in body.items()}
    if isinstance(body, list):
        return [_fill_body(world, value) for value in body]
    if isinstance(body, str):
        return body.replace("{instance_id}", world.instance_id)
    return body


CASES = [
    pytest.param(method, path, index, id=f"{method} {path} #{index}")
    for (method, path), cases in MATRIX.items()
    for index in range(len(cases))
]


@pytest.mark.parametrize(("method", "path", "index"), CASES)
def test_matrix(world: World, method: str, path: str, index: int) -> None:
    case = MATRIX[(method, path)][index]
    route = _app_routes(world)[(method, path)]
    guard = _guard(route)
    problems = []
    for identity in IDENTITIES:
        world.reset()
        before = world.fingerprint()
        headers = case.headers(world, identity) if case.headers else {}
        kwargs: dict[str, Any] = {"headers": headers}
        if case.body is not None:
            kwargs["json"] = _fill_body(world, case.body)
        resp = world.request(method, identity, _fill(world, path) + case.query, **kwargs)
        expected = case.expect[identity]
        if resp.status_code != expected:
            problems.append(
                f"{identity}: {resp.status_code} (expected {expected}) {resp.text[:200]}"
            )
            continue
        assert resp.headers.get("X-Openstack-Request-Id", "").startswith("req-")
        if expected >= 400:
            assert world.guest.calls == [], f"{identity}: a refusal reached the guest"
            assert world.fingerprint() == before, f"{identity}: a refusal changed the control DB"
        if expected == 403 and identity in ("other", "reader", "member") and guard is not None:
            rule = guard.rule or case.denied_rule
            message = resp.json()["forbidden"]["message"]
            assert f"Policy rule {rule!r}" in message, (identity, message)
    assert not problems, "\n".join(problems)
