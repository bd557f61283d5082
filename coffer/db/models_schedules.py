"""Control-DB tables for backup schedules (issue 5 item 5): schedules and their runs.

Imported at the bottom of ``coffer.db.models`` so every table shares one metadata. Schema changes
here go into the Alembic revision ``0005_schedules``.

``RunState`` values are stored and are a compatibility contract like ``coffer.status``: unique,
never renamed or reused, new members go at the end.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum, unique

from sqlalchemy import (
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from coffer.db.models import Base, _enum, new_id, utcnow


@unique
class RunState(StrEnum):
    """What became of one run of a schedule."""

    #: The backup was recorded and its operation enqueued; it is being taken.
    STARTED = "started"
    #: The run could not start a backup (instance busy, over quota...); ``reason`` says why.
    REFUSED = "refused"
    #: Its backup COMPLETED and the schedule's retention was applied after it.
    COMPLETED = "completed"
    #: Its backup FAILED (``reason`` is the backup's), or was deleted before it ended.
    FAILED = "failed"


class BackupSchedule(Base):
    """A project's schedule of backups of one instance: a 5-field cron ``pattern`` (UTC), what
    to keep (``retention_count`` newest and/or those younger than ``retention_days``; None for
    no limit of that kind), full or incremental backups, and whether it is ``enabled``.

    ``next_run`` is persisted: it is the slot the taskmanager runs next, set from the pattern
    after each run *from the time of that run*, so slots missed while no taskmanager ran give
    one run, not one per slot. ``last_run``/``last_result``/``last_backup_id`` tell the owner
    what the latest run did. A schedule lives as long as its instance: the taskmanager removes
    the schedules of deleted instances (their backups stay)."""

    __tablename__ = "backup_schedules"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True)
    instance_id: Mapped[str] = mapped_column(String(36), index=True)
    name: Mapped[str] = mapped_column(String(255))
    description: Mapped[str | None] = mapped_column(String(255), nullable=True)
    pattern: Mapped[str] = mapped_column(String(128))
    retention_count: Mapped[int | None] = mapped_column(Integer, nullable=True)
    retention_days: Mapped[int | None] = mapped_column(Integer, nullable=True)
    incremental: Mapped[bool] = mapped_column(Boolean, default=False)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    next_run: Mapped[datetime | None] = mapped_column(DateTime, nullable=True, index=True)
    last_run: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    #: ``started``, ``refused``, ``completed`` or ``failed`` (the latest run's ``RunState``).
    last_result: Mapped[str | None] = mapped_column(String(16), nullable=True)
    last_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    last_backup_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    created: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class BackupScheduleRun(Base):
    """One run of a schedule: the slot it ran for, and the backup it made (None when refused).

    The unique (schedule, slot) pair is the claim: two taskmanagers that both see a slot due can
    both try to insert its run, and only one commits. Which backups a schedule made (the only
    ones its retention may delete) is read from here. Runs go with their schedule."""

    __tablename__ = "backup_schedule_runs"
    __table_args__ = (UniqueConstraint("schedule_id", "slot"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    schedule_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("backup_schedules.id", ondelete="CASCADE"), index=True
    )
    slot: Mapped[datetime] = mapped_column(DateTime)
    backup_id: Mapped[str | None] = mapped_column(String(36), nullable=True, index=True)
    state: Mapped[RunState] = mapped_column(_enum(RunState), default=RunState.STARTED)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    created: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    finished: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
