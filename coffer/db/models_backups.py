"""Control-DB tables for backups (issue 5): backups and backup strategies.

Imported at the bottom of ``coffer.db.models`` so every table shares one metadata. Schema changes
here go into the Alembic revision ``0003_backups``.

``BackupState`` values are stored and are a compatibility contract like ``coffer.status``: unique,
never renamed or reused, new members go at the end. The API shows them upper-cased, which gives
Trove's strings (``NEW``, ``BUILDING``, ``COMPLETED``...).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum, unique
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from coffer.db.models import Base, _enum, new_id, utcnow


@unique
class BackupState(StrEnum):
    """Where a backup is in its life (Trove's ``trove/backup/state.py``)."""

    NEW = "new"
    BUILDING = "building"
    #: Defined by Trove but never set there either; kept so the Trove strings map one to one.
    SAVING = "saving"
    COMPLETED = "completed"
    FAILED = "failed"
    DELETE_FAILED = "delete_failed"
    #: Imported from elsewhere rather than taken here; usable for restore like COMPLETED.
    RESTORED = "restored"

    @property
    def running(self) -> bool:
        """NEW, BUILDING or SAVING: the backup is still being taken."""
        return self in RUNNING_STATES

    @property
    def restorable(self) -> bool:
        return self in (BackupState.COMPLETED, BackupState.RESTORED)


RUNNING_STATES = frozenset({BackupState.NEW, BackupState.BUILDING, BackupState.SAVING})

FULL = "full"
INCREMENTAL = "incremental"


class Backup(Base):
    """One backup of one instance, stored as one sealed object (see ``coffer.backup``).

    ``storage_key`` is ``<project>/<backup id>`` in the ``[storage]`` driver named by
    ``storage_driver``. The object is usable only together with ``checksum`` (SHA-256 of the
    stored bytes) and ``wrapped_key`` (the backup's data key, wrapped under a key derived from the
    operator's master key for this backup id), both recorded when the backup completes: a partial
    upload never gets them, so it can never be restored. ``engine_position`` is what the engine
    said about the point the backup stands for (MariaDB LSNs and GTID, PostgreSQL WAL positions),
    which an incremental child starts from. ``volume_size`` is the source's volume (GB) at backup
    time: a restore needs at least that much. Rows are soft-deleted (``deleted``), as in Trove.
    """

    __tablename__ = "backups"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(255))
    description: Mapped[str | None] = mapped_column(String(255), nullable=True)
    instance_id: Mapped[str | None] = mapped_column(String(36), index=True, nullable=True)
    datastore_version_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("datastore_versions.id")
    )
    parent_id: Mapped[str | None] = mapped_column(String(36), index=True, nullable=True)
    #: ``full`` or ``incremental``.
    backup_type: Mapped[str] = mapped_column(String(16), default=FULL)
    state: Mapped[BackupState] = mapped_column(_enum(BackupState), default=BackupState.NEW)
    #: Why the backup failed (a sentence for the user), when it did.
    fail_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    storage_driver: Mapped[str] = mapped_column(String(32))
    storage_key: Mapped[str] = mapped_column(String(255))
    #: Bytes stored (compressed and encrypted) and bytes the engine produced.
    size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    raw_size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    checksum: Mapped[str | None] = mapped_column(String(64), nullable=True)
    wrapped_key: Mapped[str | None] = mapped_column(Text, nullable=True)
    engine_position: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    volume_size: Mapped[int] = mapped_column(Integer, default=1)
    created: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    updated: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
    completed: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class BackupStrategy(Base):
    """Trove's backup strategy: a project's (``instance_id`` "") or one instance's default
    container for new backups. Coffer records it and shows it; the container applies when the
    ``swift`` storage driver is in use."""

    __tablename__ = "backup_strategies"

    tenant_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    instance_id: Mapped[str] = mapped_column(String(36), primary_key=True, default="")
    backend: Mapped[str] = mapped_column(String(32), default="swift")
    swift_container: Mapped[str] = mapped_column(String(255))
    created: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
