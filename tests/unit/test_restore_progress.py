"""The progress of a restore: what the guest counts and reports (``RestoreMeter``), how the
conductor records the reports, and what the instance view shows of them. A real control DB
(SQLite), no engines (``tests/integration/test_backups_engines.py`` and
``test_cli_backups.py`` run restores on real ones)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from coffer import catalog
from coffer.api.restore_views import show_restores
from coffer.backup.progress import RESTORE_PHASES, RestoreMeter
from coffer.conductor.service import Conductor
from coffer.config import load_settings
from coffer.controlplane import ControlPlane
from coffer.db.models import Instance, Operation
from coffer.db.models_backups import FULL, INCREMENTAL, Backup, BackupState
from coffer.db.models_restore import RestoreProgress
from coffer.db.session import transaction
from coffer.errors import ValidationError
from coffer.status import ServerStatus, Task


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _meter(interval: float = 1.0) -> tuple[RestoreMeter, list[dict[str, Any]], Clock]:
    sent: list[dict[str, Any]] = []
    clock = Clock()
    return RestoreMeter(sent.append, interval=interval, window=5.0, clock=clock), sent, clock


# --- what the guest counts and reports ----------------------------------------------------------


def test_both_passes_are_counted_and_reported_at_each_phase_and_every_interval() -> None:
    meter, sent, clock = _meter()
    meter.begin("verifying")
    assert sent == [
        {
            "phase": "verifying",
            "verified_bytes": 0,
            "restored_bytes": 0,
            "total_bytes": None,
            "rate": 0,
        }
    ]
    # 10 MB per second for three seconds, a piece every 0.25 s: one report a second.
    for _ in range(12):
        clock.now += 0.25
        meter.add(2_500_000)
    assert [r["verified_bytes"] for r in sent] == [0, 10_000_000, 20_000_000, 30_000_000]
    assert all(r["total_bytes"] is None for r in sent)
    assert sent[-1]["rate"] == 10_000_000

    # Restoring takes what was verified as the total, and counts from zero.
    meter.begin("restoring")
    assert sent[-1] == {
        "phase": "restoring",
        "verified_bytes": 30_000_000,
        "restored_bytes": 0,
        "total_bytes": 30_000_000,
        "rate": 0,
    }
    # Faster: 20 MB per second.
    for _ in range(6):
        clock.now += 0.25
        meter.add(5_000_000)
    assert sent[-1]["restored_bytes"] == 20_000_000 and sent[-1]["rate"] == 20_000_000
    meter.finish()
    assert sent[-1]["phase"] == "restored"
    assert sent[-1]["restored_bytes"] == sent[-1]["total_bytes"] == 30_000_000
    # The last report's rate is the restoring pass's average (30 MB in 1.5 s).
    assert sent[-1]["rate"] == 20_000_000

    # Each figure only grows and never passes the total; phases come in order.
    for field in ("verified_bytes", "restored_bytes"):
        values = [r[field] for r in sent]
        assert values == sorted(values)
    assert all(r["restored_bytes"] <= (r["total_bytes"] or 0) for r in sent)
    phases = [r["phase"] for r in sent]
    assert sorted(phases, key=RESTORE_PHASES.index) == phases


def test_no_report_between_intervals_and_with_interval_zero_every_piece() -> None:
    meter, sent, clock = _meter(interval=1.0)
    meter.begin("verifying")
    for _ in range(7):
        clock.now += 0.125
        meter.add(1)
    assert len(sent) == 1  # only the phase's start
    clock.now += 0.125
    meter.add(1)
    assert len(sent) == 2 and sent[-1]["verified_bytes"] == 8

    every, every_sent, _clock = _meter(interval=0)
    every.begin("verifying")
    for _ in range(3):
        every.add(7)
    assert [r["verified_bytes"] for r in every_sent] == [0, 7, 14, 21]


def test_wrap_counts_the_current_pass_and_closes_its_source() -> None:
    meter, _sent, _clock = _meter(interval=0)
    closed: list[bool] = []

    def source() -> Iterator[bytes]:
        try:
            yield b"abc"
            yield b"defgh"
            yield b"ij"
        finally:
            closed.append(True)

    meter.begin("verifying")
    assert b"".join(meter.wrap(source())) == b"abcdefghij"
    assert meter.verified_bytes == 10 and closed == [True]
    meter.begin("restoring")
    pieces = meter.wrap(source())
    assert next(pieces) == b"abc"
    pieces.close()  # a consumer that gives up early still closes the stream
    assert closed == [True, True]
    assert (meter.verified_bytes, meter.restored_bytes, meter.total_bytes) == (10, 3, 10)


def test_a_backup_opened_again_is_counted_once() -> None:
    """A handler may read a backup's first bytes, then open it again for the whole: restored
    bytes count each backup up to the furthest any opening got, so they end at the total."""
    meter, sent, _clock = _meter(interval=0)
    meter.begin("verifying")
    for part, data in (("full", b"x" * 300), ("incr", b"y" * 100)):
        assert b"".join(meter.wrap([data[:150], data[150:]], part=part)) == data
    meter.begin("restoring")
    header = meter.wrap([b"x" * 64, b"x" * 236], part="full")
    assert next(header) == b"x" * 64
    header.close()
    assert meter.restored_bytes == 64
    for part, size in (("full", 300), ("incr", 100)):
        b"".join(meter.wrap([b"z" * 50] * (size // 50), part=part))
    meter.finish()
    assert meter.restored_bytes == meter.total_bytes == 400
    restored = [r["restored_bytes"] for r in sent if r["phase"] != "verifying"]
    assert restored == sorted(restored) and max(restored) == 400


@pytest.mark.parametrize(
    "steps",
    [
        ["restoring"],
        ["verifying", "verifying"],
        ["verifying", "restoring", "verifying"],
        ["verifying", "restoring", "restoring"],
    ],
)
def test_phases_only_go_forward(steps: list[str]) -> None:
    meter, _sent, _clock = _meter()
    *ok, bad = steps
    for phase in ok:
        meter.begin(phase)
    with pytest.raises(ValueError):
        meter.begin(bad)


def test_counting_outside_a_pass_and_finishing_early_are_refused() -> None:
    meter, _sent, _clock = _meter()
    with pytest.raises(ValueError):
        meter.add(1)
    meter.begin("verifying")
    with pytest.raises(ValueError):
        meter.finish()
    with pytest.raises(ValueError):
        meter.add(-1)
    meter.begin("restoring")
    meter.finish()
    with pytest.raises(ValueError):
        meter.add(1)


# --- what the conductor records and the API shows ------------------------------------------------


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[ControlPlane]:
    settings = load_settings(
        environ={},
        overrides={
            "DEFAULT": {"state_dir": str(tmp_path), "transport_url": "memory://"},
            "database": {"connection": f"sqlite:///{tmp_path / 'coffer.db'}"},
        },
    )
    plane = ControlPlane(settings)
    try:
        yield plane
    finally:
        plane.close()


def _instance(factory: sessionmaker[Session], task: Task = Task.BUILDING) -> tuple[str, str]:
    with transaction(factory) as session:
        version = catalog.register_datastore_version(
            session, "mariadb", "10.11", "mariadb", version="10.11.6"
        )
        inst = Instance(
            tenant_id="proj",
            name="i",
            flavor_id="6",
            volume_size=1,
            datastore_version_id=version.id,
            task=task,
            server_status=ServerStatus.BUILD,
            encrypted_key="",
        )
        session.add(inst)
        session.flush()
        return inst.id, version.id


def _progress(factory: sessionmaker[Session], instance_id: str) -> RestoreProgress | None:
    with factory() as session:
        return session.get(RestoreProgress, instance_id)


def _report(conductor: Conductor, instance_id: str, sent_at: float, **fields: Any) -> None:
    report = {"phase": "restoring", "verified_bytes": 100, "restored_bytes": 0, **fields}
    conductor.update_restore(instance_id=instance_id, sent_at=sent_at, **report)


def test_the_conductor_keeps_the_latest_report_of_each_restore(cp: ControlPlane) -> None:
    instance_id, _version = _instance(cp.session_factory)
    conductor = Conductor(cp)
    now = time.time()
    _report(conductor, instance_id, now, phase="verifying", verified_bytes=40)
    row = _progress(cp.session_factory, instance_id)
    assert row is not None
    assert (row.phase, row.verified_bytes, row.restored_bytes, row.total_bytes) == (
        "verifying",
        40,
        0,
        None,
    )
    _report(conductor, instance_id, now + 1, restored_bytes=60, total_bytes=100, rate=55)
    row = _progress(cp.session_factory, instance_id)
    assert row is not None
    assert (row.phase, row.verified_bytes, row.restored_bytes, row.total_bytes, row.rate) == (
        "restoring",
        100,
        60,
        100,
        55,
    )
    # A report sent before the one recorded (taken late by a second consumer) changes nothing.
    _report(conductor, instance_id, now + 0.5, phase="verifying", verified_bytes=70)
    row = _progress(cp.session_factory, instance_id)
    assert row is not None and (row.phase, row.restored_bytes) == ("restoring", 60)


@pytest.mark.parametrize(
    "bad",
    [
        {"phase": "exploding"},
        {"verified_bytes": -1},
        {"restored_bytes": "10"},
        {"total_bytes": 1.5},
        {"rate": True},
    ],
)
def test_the_conductor_refuses_reports_that_are_not_counts(cp: ControlPlane, bad: Any) -> None:
    instance_id, _version = _instance(cp.session_factory)
    with pytest.raises(ValidationError):
        _report(Conductor(cp), instance_id, time.time(), **bad)
    assert _progress(cp.session_factory, instance_id) is None


def test_reports_of_deleted_or_unknown_instances_are_ignored(cp: ControlPlane) -> None:
    instance_id, _version = _instance(cp.session_factory)
    with transaction(cp.session_factory) as session:
        inst = session.get(Instance, instance_id)
        assert inst is not None
        inst.deleted = True
    conductor = Conductor(cp)
    _report(conductor, instance_id, time.time())
    _report(conductor, "no-such-instance", time.time())
    assert _progress(cp.session_factory, instance_id) is None
    assert _progress(cp.session_factory, "no-such-instance") is None


def _restoring(cp: ControlPlane, step: str) -> tuple[str, str]:
    """An instance being built from an incremental backup (a chain of 300 + 100 engine bytes)
    whose create operation is at ``step``; its id and the backup's."""
    instance_id, version_id = _instance(cp.session_factory)
    with transaction(cp.session_factory) as session:
        ids = []
        for kind, raw, parent in ((FULL, 300, None), (INCREMENTAL, 100, "x")):
            row = Backup(
                tenant_id="proj",
                name="b",
                instance_id=None,
                datastore_version_id=version_id,
                storage_driver="file",
                storage_key=f"proj/{kind}",
                engine_position={},
                state=BackupState.COMPLETED,
                backup_type=kind,
                parent_id=ids[-1] if parent else None,
                raw_size=raw,
                checksum="ab" * 32,
                wrapped_key="cfk1.w",
            )
            session.add(row)
            session.flush()
            ids.append(row.id)
        session.add(
            Operation(
                kind="create_instance",
                instance_id=instance_id,
                state="running",
                step=step,
                payload={"restore": {"backup_id": ids[-1], "started": True}},
            )
        )
    return instance_id, ids[-1]


def _view(cp: ControlPlane, instance_id: str) -> dict[str, Any]:
    """The view's ``restore`` additions, read through an ORM session and through a bare
    connection (as instance pages are): the same."""
    with cp.session_factory() as session:
        inst = session.get(Instance, instance_id)
        assert inst is not None
        view: dict[str, Any] = {}
        show_restores(session, [(inst, view)])
    with cp.engine.connect() as conn:
        row = conn.execute(select(Instance.id, Instance.task).where(Instance.id == instance_id))
        plain: dict[str, Any] = {}
        show_restores(conn, [(row.one(), plain)])
    assert plain == view
    return view


def test_the_instance_view_shows_the_bytes_of_each_pass_and_the_rate(cp: ControlPlane) -> None:
    instance_id, backup_id = _restoring(cp, "restore")
    # Before the guest's first report: what a restore does first, no bytes yet.
    assert _view(cp, instance_id)["restore"] == {
        "backup_id": backup_id,
        "phase": "verifying",
        "total_bytes": 400,
        "verified_bytes": 0,
        "restored_bytes": 0,
        "rate": 0,
    }
    conductor = Conductor(cp)
    now = time.time()
    _report(conductor, instance_id, now, phase="verifying", verified_bytes=150, rate=75)
    shown = _view(cp, instance_id)["restore"]
    assert (shown["phase"], shown["verified_bytes"], shown["rate"]) == ("verifying", 150, 75)
    _report(conductor, instance_id, now + 1, verified_bytes=400, restored_bytes=250, rate=90)
    shown = _view(cp, instance_id)["restore"]
    assert (shown["phase"], shown["restored_bytes"], shown["total_bytes"]) == (
        "restoring",
        250,
        400,
    )


def test_after_the_restore_step_the_view_keeps_the_last_figures(cp: ControlPlane) -> None:
    instance_id, _backup = _restoring(cp, "wait_ready")
    report = {"verified_bytes": 400, "restored_bytes": 400, "total_bytes": 400}
    _report(Conductor(cp), instance_id, time.time(), phase="restored", **report)
    shown = _view(cp, instance_id)["restore"]
    assert shown["phase"] == "starting"
    assert (shown["verified_bytes"], shown["restored_bytes"]) == (400, 400)
