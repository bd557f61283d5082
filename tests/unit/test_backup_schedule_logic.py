"""Backup schedules: what a schedule may say (checked before anything is recorded, over the real
API app), and the scheduler's due/claim/retention logic on a real control DB, SQLite and the
machine's PostgreSQL: a missed slot runs once, two taskmanagers never run one slot, a run that
cannot start is recorded with its reason, retention deletes only what the schedule made and
nothing a kept backup needs, and a deleted instance takes its schedules with it.

No guest runs here: a backup "completes" the way the conductor records it
(``apply_backup_report``); tests/integration/test_backup_schedules.py takes real backups.
"""

from __future__ import annotations

import os
import threading
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from coffer import catalog, quotas
from coffer.api.app import Services, create_app
from coffer.config import Settings, load_settings
from coffer.datastores import registry
from coffer.db import migrate
from coffer.db.models import Instance, Operation, ServiceStatusRow
from coffer.db.models_backups import Backup, BackupState
from coffer.db.models_schedules import BackupSchedule, BackupScheduleRun, RunState
from coffer.db.session import make_engine, make_session_factory, transaction
from coffer.errors import BadRequest
from coffer.identity import IdentityService
from coffer.identity.passwords import ScryptCost
from coffer.status import ServerStatus, ServiceStatus, Task
from coffer.taskmanager.backups import CREATE_BACKUP, DELETE_BACKUP, apply_backup_report
from coffer.taskmanager.schedules import (
    Retention,
    Scheduler,
    check_pattern,
    expired,
    next_slot,
)

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*httpx2.*")
    from fastapi.testclient import TestClient

PG_ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
T0 = datetime(2026, 3, 1, 12, 0, 0)


# --- validation ----------------------------------------------------------------------------------


def test_patterns_are_five_cron_fields_that_fire() -> None:
    assert check_pattern("  */5   *  * * * ") == "*/5 * * * *"
    assert check_pattern("30 2 * * mon-fri") == "30 2 * * mon-fri"
    for bad, phrase in (
        ("* * * *", "5 fields"),
        ("0 * * * * *", "5 fields"),  # croniter would take seconds; a schedule may not
        ("@daily", "5 fields"),
        ("61 * * * *", "not a valid cron"),
        ("0 0 31 2 *", "never fires"),
        ("0 0 * * ; rm", "5 fields"),
    ):
        with pytest.raises(BadRequest) as caught:
            check_pattern(bad)
        assert phrase in caught.value.message, (bad, caught.value.message)
    assert next_slot("*/5 * * * *", T0 + timedelta(minutes=3)) == T0 + timedelta(minutes=5)


def test_retention_takes_a_count_and_or_an_age_within_bounds() -> None:
    assert Retention.parse({"count": 3}) == Retention(3, None)
    assert Retention.parse({"max_age": "30d"}) == Retention(None, 30)
    assert Retention.parse({"max_age": "7", "count": 2}) == Retention(2, 7)
    assert Retention.parse({"max_age": 14}).view() == {"count": None, "max_age": "14d"}
    for bad, phrase in (
        ({}, "what to keep"),
        ([], "what to keep"),
        ({"count": 0}, "from 1 to 1000"),
        ({"count": 1001}, "from 1 to 1000"),
        ({"count": "3"}, "whole number"),
        ({"count": True}, "whole number"),
        ({"max_age": "0"}, "from 1 to 3650"),
        ({"max_age": "3651d"}, "from 1 to 3650"),
        ({"max_age": "a week"}, "number of days"),
        ({"keep": 3}, "count and max_age only"),
        ({"count": None}, "a count, a max_age, or both"),
    ):
        with pytest.raises(BadRequest) as caught:
            Retention.parse(bad)
        assert phrase in caught.value.message, (bad, caught.value.message)


# --- a control DB with instances ----------------------------------------------------------------


@dataclass
class Db:
    settings: Settings
    factory: sessionmaker[Session]
    project: str
    ids: dict[str, str]

    def schedule(self, instance: str = "maria", **fields: Any) -> str:
        with transaction(self.factory) as session:
            row = BackupSchedule(
                tenant_id=self.project,
                instance_id=self.ids[instance],
                name=fields.pop("name", "nightly"),
                pattern=fields.pop("pattern", "*/5 * * * *"),
                incremental=fields.pop("incremental", False),
                enabled=True,
                next_run=fields.pop("next_run", T0),
                **fields,
            )
            session.add(row)
            session.flush()
            return row.id

    def get(self, schedule_id: str) -> BackupSchedule:
        with self.factory() as session:
            row = session.get(BackupSchedule, schedule_id)
            assert row is not None
            return row

    def runs(self, schedule_id: str) -> list[BackupScheduleRun]:
        with self.factory() as session:
            return list(
                session.scalars(
                    select(BackupScheduleRun)
                    .where(BackupScheduleRun.schedule_id == schedule_id)
                    .order_by(BackupScheduleRun.slot)
                )
            )

    def backup(self, backup_id: str) -> Backup:
        with self.factory() as session:
            row = session.get(Backup, backup_id)
            assert row is not None
            return row

    def complete(self, backup_id: str) -> None:
        """What the conductor records when the guest reports the backup done."""
        report = {
            "state": "completed",
            "checksum": "c" * 64,
            "wrapped_key": "wrapped",
            "size": 100,
            "raw_size": 400,
            "engine_position": {},
        }
        with transaction(self.factory) as session:
            row = session.get(Backup, backup_id)
            assert row is not None and row.instance_id is not None
            apply_backup_report(session, row.instance_id, backup_id, report)

    def operations(self, kind: str) -> list[Operation]:
        with self.factory() as session:
            return list(
                session.scalars(
                    select(Operation).where(Operation.kind == kind).order_by(Operation.created)
                )
            )

    def backups_in_use(self) -> int:
        with self.factory() as session:
            return quotas.get_usage(session, self.project)["backups"]


def _populate(settings: Settings, factory: sessionmaker[Session]) -> Db:
    project = uuid.uuid4().hex
    ids: dict[str, str] = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            registry,
            "_detected",
            [
                registry.InstalledEngine("mariadb", "10.11.6"),
                registry.InstalledEngine("redis", "7"),
            ],
        )
        with transaction(factory) as session:
            maria = catalog.register_datastore_version(
                session, "mariadb", "10.11", "mariadb", version="10.11.6", default=True
            )
            redis = catalog.register_datastore_version(
                session, "redis", "7", "redis", version="7.0.15", default=True
            )
            catalog.create_flavor(session, "6", "d1.micro", 256, 1, 1)
            for name, version in (("maria", maria.id), ("other", maria.id), ("redis", redis.id)):
                inst = Instance(
                    tenant_id=project,
                    name=name,
                    flavor_id="6",
                    volume_size=1,
                    datastore_version_id=version,
                    task=Task.NONE,
                    server_status=ServerStatus.ACTIVE,
                    encrypted_key="",
                    compute_ref={},
                )
                session.add(inst)
                session.flush()
                session.add(ServiceStatusRow(instance_id=inst.id, status=ServiceStatus.RUNNING))
                ids[name] = inst.id
    return Db(settings, factory, project, ids)


def _settings(tmp: Path, url: str) -> Settings:
    return load_settings(
        environ={},
        overrides={"DEFAULT": {"state_dir": str(tmp)}, "database": {"connection": url}},
    )


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)],
)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Db]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'coffer.db'}"
        engine = make_engine(url)
        try:
            migrate.upgrade(engine)
            yield _populate(_settings(tmp_path, url), make_session_factory(engine))
        finally:
            engine.dispose()
        return
    name = f"coffer_sched_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    engine = make_engine(url, pool_size=10)
    try:
        migrate.upgrade(engine)
        yield _populate(_settings(tmp_path, url), make_session_factory(engine))
    finally:
        engine.dispose()
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _scheduler(db: Db, now: datetime, woken: list[str] | None = None) -> Scheduler:
    sink = woken if woken is not None else []
    return Scheduler(db.factory, db.settings, wake=sink.append, clock=lambda: now)


# --- due and claim ------------------------------------------------------------------------------


def test_a_due_slot_runs_once_through_the_backup_create_path(db: Db) -> None:
    schedule_id = db.schedule(name="every five")
    woken: list[str] = []
    # Not due yet: nothing happens.
    assert _scheduler(db, T0 - timedelta(seconds=1), woken).run_due() == []
    assert db.runs(schedule_id) == [] and woken == []

    # The taskmanager was down for an hour: twelve slots passed, one run is made.
    later = T0 + timedelta(hours=1, seconds=7)
    scheduler = _scheduler(db, later, woken)
    assert len(scheduler.run_due()) == 1
    assert scheduler.run_due() == []
    (run,) = db.runs(schedule_id)
    assert run.slot == T0 and run.state is RunState.STARTED and run.backup_id
    shown = db.get(schedule_id)
    assert shown.next_run == T0 + timedelta(hours=1, minutes=5)
    assert shown.last_run == later and shown.last_result == "started"
    assert shown.last_backup_id == run.backup_id
    # The backup is what POST /backups records: NEW, quota charged, create_backup enqueued.
    backup = db.backup(run.backup_id)
    assert backup.state is BackupState.NEW and backup.instance_id == db.ids["maria"]
    assert backup.name == "every five 2026-03-01 12:00" and backup.parent_id is None
    assert schedule_id in (backup.description or "")
    (op,) = db.operations(CREATE_BACKUP)
    assert op.payload == {"backup_id": backup.id} and woken == [op.id]
    assert db.backups_in_use() == 1


def test_a_run_that_cannot_start_is_recorded_with_its_reason(db: Db) -> None:
    schedule_id = db.schedule()
    first = _scheduler(db, T0 + timedelta(seconds=1))
    first.run_due()
    (started,) = db.runs(schedule_id)
    # The next slot comes while that backup still runs: refused, and the slot is spent.
    at = T0 + timedelta(minutes=5, seconds=1)
    assert len(_scheduler(db, at).run_due()) == 1
    refused = db.runs(schedule_id)[1]
    assert refused.state is RunState.REFUSED and refused.backup_id is None
    assert "already being backed up" in (refused.reason or "")
    shown = db.get(schedule_id)
    assert shown.last_result == "refused" and "already being backed up" in (shown.last_reason or "")
    assert shown.next_run == T0 + timedelta(minutes=10)
    assert shown.last_backup_id == started.backup_id
    assert len(db.operations(CREATE_BACKUP)) == 1 and db.backups_in_use() == 1

    # Over quota: refused with the quota's sentence, nothing charged.
    assert started.backup_id is not None
    db.complete(started.backup_id)
    with transaction(db.factory) as session:
        quotas.set_limits(session, db.settings, db.project, {"backups": 1})
    _scheduler(db, T0 + timedelta(minutes=10, seconds=1)).run_due()
    over = db.runs(schedule_id)[2]
    assert over.state is RunState.REFUSED and "Quota exceeded" in (over.reason or "")
    with db.factory() as session:
        assert session.scalar(select(func.count()).select_from(Backup)) == 1


def test_two_taskmanagers_never_run_the_same_slot(db: Db) -> None:
    schedule_ids = [db.schedule(instance=name) for name in ("maria", "other", "redis")]
    at = T0 + timedelta(minutes=1)
    made: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(6)

    def contender() -> None:
        scheduler = _scheduler(db, at)
        barrier.wait()
        runs = scheduler.run_due()
        with lock:
            made.extend(runs)

    threads = [threading.Thread(target=contender) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    # One run per schedule, whoever made it, and one backup each.
    assert len(made) == 3 == len(set(made))
    for schedule_id in schedule_ids:
        (run,) = db.runs(schedule_id)
        assert run.state is RunState.STARTED, run.reason
    assert len(db.operations(CREATE_BACKUP)) == 3

    # A slot that already had its run (next_run put back to it) is not run again; next_run
    # moves on. A second claimer racing for one slot fails on the unique (schedule, slot).
    with transaction(db.factory) as session:
        row = session.get(BackupSchedule, schedule_ids[0])
        assert row is not None
        row.next_run = T0
    assert _scheduler(db, at).run_one(schedule_ids[0]) is None
    assert len(db.runs(schedule_ids[0])) == 1
    assert db.get(schedule_ids[0]).next_run == T0 + timedelta(minutes=5)
    with pytest.raises(IntegrityError), transaction(db.factory) as session:
        session.add(BackupScheduleRun(schedule_id=schedule_ids[0], slot=T0))


def test_a_disabled_schedule_does_not_run(db: Db) -> None:
    schedule_id = db.schedule()
    with transaction(db.factory) as session:
        row = session.get(BackupSchedule, schedule_id)
        assert row is not None
        row.enabled = False
    assert _scheduler(db, T0 + timedelta(days=1)).run_due() == []
    assert db.runs(schedule_id) == []


# --- finishing runs and retention ----------------------------------------------------------------


def _run_and_complete(db: Db, schedule_id: str, at: datetime, woken: list[str]) -> str:
    scheduler = _scheduler(db, at, woken)
    assert len(scheduler.run_due()) == 1, db.runs(schedule_id)[-1].reason
    backup_id = db.runs(schedule_id)[-1].backup_id
    assert backup_id is not None
    db.complete(backup_id)
    scheduler.finish_runs()
    return backup_id


def test_retention_by_count_deletes_only_the_schedules_oldest_backups(db: Db) -> None:
    schedule_id = db.schedule(retention_count=2)
    woken: list[str] = []
    # A manual backup of the same instance, older than everything: never the schedule's to delete.
    manual = _manual_backup(db, "maria", T0 - timedelta(days=1))
    made = [
        _run_and_complete(db, schedule_id, T0 + timedelta(minutes=5 * i, seconds=1), woken)
        for i in range(4)
    ]
    assert [r.state for r in db.runs(schedule_id)] == [RunState.COMPLETED] * 4
    assert db.get(schedule_id).last_result == "completed"
    deletes = db.operations(DELETE_BACKUP)
    # Retention ran after the third and the fourth run; each time the oldest beyond two.
    assert [op.payload["backup_ids"] for op in deletes] == [[made[0]], [made[1]]]
    assert {op.id for op in deletes} <= set(woken)
    assert manual not in str([op.payload for op in deletes])


def test_retention_by_age_keeps_the_newest_and_what_an_incremental_needs(db: Db) -> None:
    # Incremental, a new full every 3 links: full, inc, inc, full, inc.
    schedule_id = db.schedule(retention_days=2, retention_count=3, incremental=True)
    woken: list[str] = []
    made = []
    for day in range(5):
        made.append(_run_and_complete(db, schedule_id, T0 + timedelta(days=day, seconds=1), woken))
    types = [db.backup(b).parent_id for b in made]
    assert types == [None, made[0], made[1], None, made[3]]
    with db.factory() as session:
        schedule = session.get(BackupSchedule, schedule_id)
        assert schedule is not None
        # Completed "now" in the DB's clock: age them by their slot for this check.
        for index, backup_id in enumerate(made):
            row = session.get(Backup, backup_id)
            assert row is not None
            row.completed = T0 + timedelta(days=index)
        now = T0 + timedelta(days=4, hours=1)
        doomed = [b.id for b in expired(session, schedule, now)]
        session.rollback()
    # Older than two days: the first chain (days 0-2) goes whole, since nothing kept needs it;
    # day 3's full stays because day 4's incremental (kept, the newest) needs it.
    assert doomed == made[:3]

    # An incremental someone made by hand on the schedule's full keeps that full.
    with transaction(db.factory) as session:
        for index, backup_id in enumerate(made):
            row = session.get(Backup, backup_id)
            assert row is not None
            row.completed = T0 + timedelta(days=index)
    _manual_backup(db, "maria", T0 + timedelta(days=1), parent_id=made[0])
    with db.factory() as session:
        schedule = session.get(BackupSchedule, schedule_id)
        assert schedule is not None
        doomed = [b.id for b in expired(session, schedule, T0 + timedelta(days=4, hours=1))]
    assert doomed == made[1:3]


def test_a_failed_backup_fails_its_run_and_changes_no_retention(db: Db) -> None:
    schedule_id = db.schedule(retention_count=1)
    scheduler = _scheduler(db, T0 + timedelta(seconds=1))
    scheduler.run_due()
    (run,) = db.runs(schedule_id)
    assert run.backup_id is not None
    with transaction(db.factory) as session:
        apply_backup_report(
            session, db.ids["maria"], run.backup_id, {"state": "failed", "reason": "disk full"}
        )
    scheduler.finish_runs()
    (run,) = db.runs(schedule_id)
    assert run.state is RunState.FAILED and run.reason == "disk full"
    shown = db.get(schedule_id)
    assert shown.last_result == "failed" and shown.last_reason == "disk full"
    assert db.operations(DELETE_BACKUP) == [] and db.backups_in_use() == 0


def test_deleting_the_instance_deletes_its_schedules_not_its_backups(db: Db) -> None:
    schedule_id = db.schedule()
    kept = db.schedule(instance="other", next_run=T0 + timedelta(days=1))
    backup_id = _run_and_complete(db, schedule_id, T0 + timedelta(seconds=1), [])
    with transaction(db.factory) as session:
        inst = session.get(Instance, db.ids["maria"])
        assert inst is not None
        inst.deleted = True
    _scheduler(db, T0 + timedelta(minutes=1)).tick()
    with db.factory() as session:
        assert session.get(BackupSchedule, schedule_id) is None
        assert session.get(BackupSchedule, kept) is not None
        assert db.runs(schedule_id) == []
    assert db.backup(backup_id).deleted is False


def _manual_backup(db: Db, instance: str, created: datetime, parent_id: str | None = None) -> str:
    with transaction(db.factory) as session:
        inst = session.get(Instance, db.ids[instance])
        assert inst is not None
        row = Backup(
            tenant_id=inst.tenant_id,
            name="by hand",
            instance_id=inst.id,
            datastore_version_id=inst.datastore_version_id,
            parent_id=parent_id,
            backup_type="incremental" if parent_id else "full",
            state=BackupState.COMPLETED,
            storage_driver="file",
            storage_key="x",
            checksum="d" * 64,
            wrapped_key="w",
            size=1,
            raw_size=1,
            engine_position={},
            created=created,
            completed=created,
        )
        session.add(row)
        session.flush()
        return row.id


# --- the API -------------------------------------------------------------------------------------

PASSWORDS = {"admin": "admin-pw-1", "demo": "demo-pw-1", "eve": "eve-pw-1"}


@dataclass
class Api:
    client: TestClient
    db: Db
    tokens: dict[str, tuple[str, str]]

    def request(self, method: str, user: str, path: str, **kw: Any) -> Any:
        token, project = self.tokens[user]
        url = f"/v1.0/{project}/{path.lstrip('/')}"
        return self.client.request(method, url, headers={"X-Auth-Token": token}, **kw)

    def schedules(self) -> int:
        with self.db.factory() as session:
            return session.scalar(select(func.count()).select_from(BackupSchedule)) or 0


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    url = f"sqlite:///{tmp_path / 'coffer.db'}"
    settings = _settings(tmp_path, url)
    engine = make_engine(url)
    try:
        migrate.upgrade(engine)
        factory = make_session_factory(engine)
        identity = IdentityService(
            factory, os.urandom(32), settings, scrypt_cost=ScryptCost(2**4, 8, 1)
        )
        identity.bootstrap(PASSWORDS["admin"], PASSWORDS["demo"])
        identity.create_project("other")
        identity.create_user("eve", PASSWORDS["eve"], "other", ["member"])
        db = _populate(settings, factory)
        demo = identity.create_project("demo").id
        with transaction(factory) as session:
            for inst in session.scalars(select(Instance)):
                inst.tenant_id = demo
        db.project = demo
        app = create_app(Services(settings, factory, identity))
        with TestClient(app, raise_server_exceptions=False) as client:
            tokens = {}
            for user, project in (("demo", "demo"), ("eve", "other")):
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
            yield Api(client, db, tokens)
    finally:
        engine.dispose()


def _body(api: Api, **fields: Any) -> dict[str, Any]:
    spec = {
        "instance": api.db.ids["maria"],
        "name": "nightly",
        "pattern": "30 2 * * *",
        "retention": {"count": 7},
        **fields,
    }
    return {"backup_schedule": {k: v for k, v in spec.items() if v is not None}}


def test_api_create_show_update_list_delete(api: Api) -> None:
    resp = api.request("POST", "demo", "/backup_schedules", json=_body(api, description="d"))
    assert resp.status_code == 200, resp.text
    created = resp.json()["backup_schedule"]
    assert created["instance_id"] == api.db.ids["maria"] and created["enabled"] is True
    assert created["retention"] == {"count": 7, "max_age": None}
    assert created["pattern"] == "30 2 * * *" and created["next_run"].endswith("02:30:00")
    assert created["last_result"] is None and created["incremental"] is False
    path = f"/backup_schedules/{created['id']}"
    assert api.request("GET", "demo", path).json()["backup_schedule"] == created

    change = {"backup_schedule": {"pattern": "0 * * * *", "retention": {"max_age": "30d"}}}
    resp = api.request("PUT", "demo", path, json=change)
    assert resp.status_code == 200, resp.text
    changed = resp.json()["backup_schedule"]
    assert changed["pattern"] == "0 * * * *" and changed["next_run"].endswith(":00:00")
    assert changed["retention"] == {"count": None, "max_age": "30d"}
    assert changed["description"] == "d" and changed["name"] == "nightly"
    off = api.request("PUT", "demo", path, json={"backup_schedule": {"enabled": False}})
    assert off.json()["backup_schedule"]["next_run"] is None

    listed = api.request("GET", "demo", "/backup_schedules").json()["backup_schedules"]
    assert [s["id"] for s in listed] == [created["id"]]
    only = api.request(
        "GET", "demo", "/backup_schedules", params={"instance_id": api.db.ids["redis"]}
    )
    assert only.json() == {"backup_schedules": []}
    # Another project sees nothing of it.
    assert api.request("GET", "eve", path).status_code == 404
    assert api.request("GET", "eve", "/backup_schedules").json() == {"backup_schedules": []}

    assert api.request("DELETE", "demo", path).status_code == 202
    assert api.request("GET", "demo", path).status_code == 404
    assert api.schedules() == 0


@pytest.mark.parametrize(
    ("fields", "status", "phrase"),
    [
        ({"pattern": "every day"}, 400, "5 fields"),
        ({"pattern": "0 0 31 2 *"}, 400, "never fires"),
        ({"retention": {"count": 0}}, 400, "from 1 to 1000"),
        ({"retention": {"max_age": "forever"}}, 400, "number of days"),
        ({"retention": {}}, 400, "what to keep"),
        ({"name": "---"}, 400, "letter or digit"),
        ({"instance": "no-such-instance"}, 404, "could not be found"),
        ({"hourly": True}, 400, "hourly"),
    ],
)
def test_api_refuses_bad_schedules_before_recording_anything(
    api: Api, fields: dict[str, Any], status: int, phrase: str
) -> None:
    resp = api.request("POST", "demo", "/backup_schedules", json=_body(api, **fields))
    assert resp.status_code == status, resp.text
    assert phrase in resp.text
    assert api.schedules() == 0


def test_api_refuses_another_projects_instance_and_bad_updates(api: Api) -> None:
    resp = api.request("POST", "eve", "/backup_schedules", json=_body(api))
    assert resp.status_code == 404, resp.text
    created = api.request("POST", "demo", "/backup_schedules", json=_body(api)).json()
    path = f"/backup_schedules/{created['backup_schedule']['id']}"
    for change, phrase in (
        ({}, "Say what to change"),
        ({"pattern": "61 * * * *"}, "not a valid cron"),
        ({"enabled": None}, "cannot be null"),
        ({"instance": api.db.ids["other"]}, "instance"),
    ):
        resp = api.request("PUT", "demo", path, json={"backup_schedule": change})
        assert resp.status_code == 400, (change, resp.text)
        assert phrase in resp.text
    assert (
        api.request("PUT", "eve", path, json={"backup_schedule": {"enabled": False}}).status_code
        == 404
    )
    assert api.request("GET", "demo", path).json() == created
