"""What guests report about backups, as the conductor records it; the chains a restore needs and
a delete takes; what a guest is told about storage. A real control DB (SQLite), no engines."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from coffer import catalog, quotas
from coffer.conductor import service as conductor_service
from coffer.config import Settings, load_settings
from coffer.controlplane import ControlPlane
from coffer.db.models import Instance, QuotaCharge
from coffer.db.models_backups import Backup, BackupState
from coffer.db.session import transaction
from coffer.errors import SealError, ValidationError
from coffer.status import ServerStatus, Task
from coffer.taskmanager.backups import (
    apply_backup_report,
    backup_holder,
    backup_key,
    descendants,
    restore_chain,
    storage_spec,
)

CHECKSUM = "ab" * 32


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


def _instance(factory: sessionmaker[Session]) -> tuple[str, str]:
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
            task=Task.NONE,
            server_status=ServerStatus.ACTIVE,
            encrypted_key="",
        )
        session.add(inst)
        session.flush()
        return inst.id, version.id


def _backup(
    settings: Settings, factory: sessionmaker[Session], instance_id: str, version_id: str, **kw: Any
) -> str:
    with transaction(factory) as session:
        row = Backup(
            tenant_id="proj",
            name="b",
            instance_id=instance_id,
            datastore_version_id=version_id,
            storage_driver="file",
            storage_key="proj/x",
            engine_position={},
            **kw,
        )
        session.add(row)
        session.flush()
        quotas.reserve(session, settings, "proj", backup_holder(row.id), {"backups": 1})
        return row.id


def _row(factory: sessionmaker[Session], backup_id: str) -> Backup:
    with factory() as session:
        row = session.get(Backup, backup_id)
        assert row is not None
        return row


def _charged(factory: sessionmaker[Session], backup_id: str) -> bool:
    with factory() as session:
        return session.get(QuotaCharge, (backup_holder(backup_id), "backups")) is not None


def _report(cp: ControlPlane, instance_id: str, backup_id: str, **report: Any) -> Any:
    with transaction(cp.session_factory) as session:
        return apply_backup_report(session, instance_id, backup_id, report)


def test_progress_then_completion_then_nothing_changes_it(cp: ControlPlane) -> None:
    instance_id, version_id = _instance(cp.session_factory)
    backup_id = _backup(cp.settings, cp.session_factory, instance_id, version_id)
    assert _report(cp, instance_id, backup_id, state="building") is BackupState.BUILDING
    _report(cp, instance_id, backup_id, state="building", size=100, raw_size=400)
    assert (
        _row(cp.session_factory, backup_id).size,
        _row(cp.session_factory, backup_id).raw_size,
    ) == (
        100,
        400,
    )
    done = _report(
        cp,
        instance_id,
        backup_id,
        state="completed",
        size=120,
        raw_size=500,
        checksum=CHECKSUM.upper(),
        wrapped_key="cfk1.wrapped",
        engine_position={"to_lsn": "42"},
    )
    assert done is BackupState.COMPLETED
    row = _row(cp.session_factory, backup_id)
    assert (row.size, row.raw_size, row.checksum) == (120, 500, CHECKSUM)
    assert row.wrapped_key == "cfk1.wrapped" and row.engine_position == {"to_lsn": "42"}
    assert row.completed is not None
    # A late failure report (or a replayed progress report) cannot undo a completed backup.
    assert _report(cp, instance_id, backup_id, state="failed", reason="x") is BackupState.COMPLETED
    _report(cp, instance_id, backup_id, state="building", size=1)
    assert _row(cp.session_factory, backup_id).size == 120
    assert _charged(cp.session_factory, backup_id)


def test_failure_and_incomplete_completion_free_the_quota(cp: ControlPlane) -> None:
    instance_id, version_id = _instance(cp.session_factory)
    failed = _backup(cp.settings, cp.session_factory, instance_id, version_id)
    _report(cp, instance_id, failed, state="failed", reason="mariabackup failed with exit code 1")
    row = _row(cp.session_factory, failed)
    assert row.state is BackupState.FAILED
    assert row.fail_reason == "mariabackup failed with exit code 1"
    assert not _charged(cp.session_factory, failed)
    # "Completed" without a checksum could never be restored: recorded as a failure.
    odd = _backup(cp.settings, cp.session_factory, instance_id, version_id)
    state = _report(cp, instance_id, odd, state="completed", size=10, raw_size=10)
    assert state is BackupState.FAILED
    assert "without its checksum" in (_row(cp.session_factory, odd).fail_reason or "")
    assert not _charged(cp.session_factory, odd)


def test_a_guest_reports_only_on_its_own_instances_backups(cp: ControlPlane) -> None:
    instance_id, version_id = _instance(cp.session_factory)
    other_id, _ = _instance(cp.session_factory)
    backup_id = _backup(cp.settings, cp.session_factory, instance_id, version_id)
    with pytest.raises(SealError, match="only report on its own"):
        _report(cp, other_id, backup_id, state="failed", reason="forged")
    assert _row(cp.session_factory, backup_id).state is BackupState.NEW
    assert _report(cp, instance_id, "no-such-backup", state="building") is None


def test_the_conductor_checks_the_sealed_sender(cp: ControlPlane) -> None:
    instance_id, version_id = _instance(cp.session_factory)
    backup_id = _backup(cp.settings, cp.session_factory, instance_id, version_id)
    endpoint = conductor_service._SenderBound(conductor_service.Conductor(cp))
    conductor_service._CURRENT.sender = "another-instance"
    with pytest.raises(SealError):
        endpoint.update_backup(
            instance_id=instance_id, backup_id=backup_id, state="failed", sent_at=0.0
        )
    conductor_service._CURRENT.sender = instance_id
    endpoint.update_backup(
        instance_id=instance_id, backup_id=backup_id, state="building", sent_at=0.0, size=7
    )
    assert _row(cp.session_factory, backup_id).state is BackupState.BUILDING


def test_restore_chains_and_what_a_delete_takes(cp: ControlPlane) -> None:
    instance_id, version_id = _instance(cp.session_factory)
    done = {"state": BackupState.COMPLETED, "checksum": CHECKSUM, "wrapped_key": "w"}
    full = _backup(cp.settings, cp.session_factory, instance_id, version_id, **done)
    inc1 = _backup(
        cp.settings,
        cp.session_factory,
        instance_id,
        version_id,
        parent_id=full,
        backup_type="incremental",
        **done,
    )
    inc2 = _backup(
        cp.settings,
        cp.session_factory,
        instance_id,
        version_id,
        parent_id=inc1,
        backup_type="incremental",
        **done,
    )
    side = _backup(
        cp.settings,
        cp.session_factory,
        instance_id,
        version_id,
        parent_id=full,
        backup_type="incremental",
        state=BackupState.FAILED,
    )
    with cp.session_factory() as session:
        assert [b.id for b in restore_chain(session, inc2)] == [full, inc1, inc2]
        assert [b.id for b in restore_chain(session, full)] == [full]
        with pytest.raises(ValidationError, match="FAILED"):
            restore_chain(session, side)
        taken = [b.id for b in descendants(session, full)]
    # Deepest first, and everything built on the full backup.
    assert taken.index(inc2) < taken.index(inc1)
    assert sorted(taken) == sorted([inc1, inc2, side])
    with transaction(cp.session_factory) as session:
        session.get(Backup, inc1).deleted = True  # type: ignore[union-attr]
    with cp.session_factory() as session, pytest.raises(ValidationError, match="deleted"):
        restore_chain(session, inc2)


def test_what_a_guest_is_told_about_storage(cp: ControlPlane, tmp_path: Path) -> None:
    spec = storage_spec(cp.settings)
    assert spec["driver"] == "file"
    assert spec["file_directory"] == str(tmp_path / "backups")
    settings = load_settings(
        environ={},
        overrides={
            "DEFAULT": {"state_dir": str(tmp_path)},
            "storage": {
                "driver": "s3",
                "s3_bucket": "b",
                "s3_access_key_id": "AKIA",
                "s3_secret_access_key": "the-secret",
            },
        },
    )
    spec = storage_spec(settings)
    # The guest needs the secret itself (it travels only inside sealed messages).
    assert spec["s3_secret_access_key"] == "the-secret"
    assert "file_directory" not in spec
    assert "the-secret" not in repr(settings.storage)


def test_each_backup_has_its_own_key_encryption_key(cp: ControlPlane) -> None:
    one, two = backup_key(cp, "b-1"), backup_key(cp, "b-2")
    assert len(one) == 32 and one != two
    assert backup_key(cp, "b-1") == one
    assert one != cp.master_key
