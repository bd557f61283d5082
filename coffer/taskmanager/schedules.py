"""Backup schedules: validation of what a schedule may say, and the taskmanager's scheduler.

A schedule (``coffer.db.models_schedules``) names an instance, a 5-field cron pattern read in
UTC, a retention (the ``count`` newest backups and/or those younger than ``max_age`` days), and
whether its backups are incremental. The API (``coffer.api.routes.backup_schedules``) checks a
schedule completely with the functions here before recording it.

The scheduler runs inside every taskmanager (``Scheduler.tick``, about once a second):

* **Claim and run.** A schedule whose persisted ``next_run`` has passed is claimed in one write
  transaction: the row is locked (``FOR UPDATE SKIP LOCKED`` on PostgreSQL/MariaDB, ``BEGIN
  IMMEDIATE`` on SQLite) and re-checked, its next slot is computed *from now* (slots missed
  while no taskmanager ran collapse into this one run), and a run row unique per (schedule,
  slot) is inserted, so two taskmanagers never both run one slot. In the same transaction the
  backup is recorded through the API's own create path (``record_backup``: instance ready, no
  other backup running, quota); a refusal is recorded on the run and the schedule
  (``last_result`` ``refused`` with the reason) instead, and the slot is spent either way.
* **Finish runs.** A started run whose backup has ended is marked ``completed`` or ``failed``;
  after a completed one the schedule's retention is applied to the backups that schedule made
  (never manual ones), and the expired ones are deleted through the API's delete operation.
  A backup that a retained backup's chain still needs (a full under a retained incremental, or
  any backup a manual incremental was built on) is kept, and so is the schedule's newest
  completed backup, whatever its age.
* **Follow instances.** Schedules of deleted instances are removed (their backups stay).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from croniter import CroniterBadCronError, CroniterBadDateError, croniter
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from coffer.config import Settings
from coffer.db.models import Instance, Operation, utcnow
from coffer.db.models_backups import RUNNING_STATES, Backup, BackupState
from coffer.db.models_schedules import BackupSchedule, BackupScheduleRun, RunState
from coffer.db.session import transaction
from coffer.errors import BadRequest, CofferError, NotFound
from coffer.status import Task
from coffer.taskmanager.backups import DELETE_BACKUP, descendants
from coffer.taskmanager.operations import PENDING, RUNNING, enqueue

LOG = logging.getLogger(__name__)

#: Bounds of a retention: at most this many backups kept by count, this many days by age.
MAX_RETENTION_COUNT = 1000
MAX_RETENTION_DAYS = 3650
#: At most this many schedules per instance.
MAX_SCHEDULES_PER_INSTANCE = 10
#: An incremental schedule starts a new full backup when its chain has this many links and no
#: retention count says otherwise.
DEFAULT_CHAIN_LENGTH = 7
#: Seconds between two looks at the schedules.
TICK_SECONDS = 1.0
_FIELD = re.compile(r"[0-9A-Za-z*/,\-]+")
_MAX_AGE = re.compile(r"([0-9]{1,6})\s*d?")


# --- validation ----------------------------------------------------------------------------------


def check_pattern(pattern: str) -> str:
    """``pattern`` normalised (single spaces) when it is a 5-field cron expression that fires;
    BadRequest saying what is wrong otherwise."""
    fields = pattern.split()
    if len(fields) != 5 or not all(_FIELD.fullmatch(f) for f in fields):
        raise BadRequest(
            f"pattern {pattern!r} is not a cron expression of 5 fields (minute hour "
            "day-of-month month day-of-week, in UTC), e.g. '30 2 * * *' for 02:30 every day."
        )
    normalised = " ".join(fields)
    try:
        next_slot(normalised, utcnow())
    except CroniterBadDateError:
        raise BadRequest(f"pattern {normalised!r} never fires (no such date).") from None
    except (CroniterBadCronError, ValueError) as exc:
        raise BadRequest(f"pattern {normalised!r} is not a valid cron expression: {exc}") from None
    return normalised


def next_slot(pattern: str, after: datetime) -> datetime:
    """The first time after ``after`` (naive UTC) that ``pattern`` names."""
    slot: datetime = croniter(pattern, after).get_next(datetime)
    return slot


def parse_max_age(value: object) -> int:
    """Days from ``max_age``: a whole number of days, or a string like ``"30"`` or ``"30d"``."""
    days: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        days = value
    elif isinstance(value, str):
        match = _MAX_AGE.fullmatch(value.strip())
        days = int(match.group(1)) if match else None
    if days is None or not 1 <= days <= MAX_RETENTION_DAYS:
        raise BadRequest(
            f"retention max_age {value!r} must be a number of days from 1 to "
            f'{MAX_RETENTION_DAYS}, e.g. "30" or "30d".'
        )
    return days


def check_count(value: object) -> int:
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or not 1 <= value <= MAX_RETENTION_COUNT
    ):
        raise BadRequest(
            f"retention count {value!r} must be a whole number from 1 to {MAX_RETENTION_COUNT}."
        )
    return value


@dataclass(frozen=True)
class Retention:
    """Keep the ``count`` newest backups and/or those younger than ``days`` (None: no limit of
    that kind; at least one of the two is set)."""

    count: int | None
    days: int | None

    @classmethod
    def parse(cls, value: object) -> Retention:
        if not isinstance(value, dict) or not value:
            raise BadRequest(
                'retention must say what to keep: {"count": N} and/or {"max_age": "<days>"}.'
            )
        unknown = sorted(set(value) - {"count", "max_age"})
        if unknown:
            raise BadRequest(f"retention accepts count and max_age only, not {', '.join(unknown)}.")
        count = check_count(value["count"]) if value.get("count") is not None else None
        days = parse_max_age(value["max_age"]) if value.get("max_age") is not None else None
        if count is None and days is None:
            raise BadRequest("retention needs a count, a max_age, or both.")
        return cls(count, days)

    def view(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "max_age": f"{self.days}d" if self.days is not None else None,
        }


# --- retention -----------------------------------------------------------------------------------


def made_by(session: Session, schedule_id: str) -> list[Backup]:
    """The live backups a schedule made, newest first."""
    return list(
        session.scalars(
            select(Backup)
            .join(BackupScheduleRun, BackupScheduleRun.backup_id == Backup.id)
            .where(BackupScheduleRun.schedule_id == schedule_id, Backup.deleted.is_(False))
            .order_by(Backup.created.desc(), Backup.id.desc())
        )
    )


def expired(session: Session, schedule: BackupSchedule, now: datetime) -> list[Backup]:
    """The completed backups of ``schedule`` its retention no longer keeps and nothing needs.

    Out: beyond the ``count`` newest completed ones, or completed before ``now - max_age``;
    but never the newest completed one, and never one that a backup which stays (a retained
    one, a running one, a manual one) was built on.
    """
    completed = [b for b in made_by(session, schedule.id) if b.state is BackupState.COMPLETED]
    doomed: dict[str, Backup] = {}
    oldest = now - timedelta(days=schedule.retention_days) if schedule.retention_days else None
    for index, backup in enumerate(completed):
        if index == 0:
            continue
        too_many = schedule.retention_count is not None and index >= schedule.retention_count
        too_old = oldest is not None and (backup.completed or backup.created) < oldest
        if too_many or too_old:
            doomed[backup.id] = backup
    # Keep whatever a backup that stays still needs: repeat until nothing more is spared.
    changed = True
    while changed:
        changed = False
        for backup_id in list(doomed):
            if any(child.id not in doomed for child in descendants(session, backup_id)):
                del doomed[backup_id]
                changed = True
    return sorted(doomed.values(), key=lambda b: (b.created, b.id))


def chain_length(session: Session, backup: Backup) -> int:
    """How many backups a restore of ``backup`` needs (1 for a full one)."""
    length, current = 1, backup.parent_id
    while current is not None and length <= 10_000:
        parent = session.get(Backup, current)
        if parent is None:
            break
        length, current = length + 1, parent.parent_id
    return length


# --- the scheduler -------------------------------------------------------------------------------


class Scheduler:
    """Runs due schedules, finishes their runs and applies retention (see the module doc).

    ``clock`` returns naive UTC; tests replace it. ``wake`` is called with the id of every
    operation the scheduler enqueues (the taskmanager's own runner picks it up).
    """

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        settings: Settings,
        wake: Callable[[str], None] = lambda _op_id: None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.session_factory = session_factory
        self.settings = settings
        self.wake = wake
        self.clock = clock
        self._last_tick = 0.0

    def tick_if_due(self) -> None:
        """``tick`` at most once per ``TICK_SECONDS`` (the taskmanager loop spins faster)."""
        now = time.monotonic()
        if now - self._last_tick < TICK_SECONDS:
            return
        self._last_tick = now
        self.tick()

    def tick(self) -> None:
        self.forget_deleted_instances()
        self.finish_runs()
        self.run_due()

    # -- runs --------------------------------------------------------------------------------------

    def run_due(self) -> list[str]:
        """Claim and run every due schedule; the ids of the runs this call made."""
        now = self.clock()
        with self.session_factory() as session:
            due = list(
                session.scalars(
                    select(BackupSchedule.id)
                    .where(
                        BackupSchedule.enabled.is_(True),
                        BackupSchedule.next_run.is_not(None),
                        BackupSchedule.next_run <= now,
                    )
                    .order_by(BackupSchedule.next_run)
                )
            )
        made = []
        for schedule_id in due:
            run_id = self.run_one(schedule_id)
            if run_id is not None:
                made.append(run_id)
        return made

    def run_one(self, schedule_id: str) -> str | None:
        """Claim ``schedule_id``'s due slot and run it; the run's id, or None when the slot is
        not due (any more) or another taskmanager holds or took it."""
        now = self.clock()
        op_id = None
        try:
            with transaction(self.session_factory) as session:
                schedule = session.scalars(
                    select(BackupSchedule)
                    .where(
                        BackupSchedule.id == schedule_id,
                        BackupSchedule.enabled.is_(True),
                        BackupSchedule.next_run <= now,
                    )
                    .with_for_update(skip_locked=True)
                ).first()
                if schedule is None or schedule.next_run is None:
                    return None
                slot = schedule.next_run
                # From now, not from the slot: slots missed while no taskmanager ran give one
                # run, this one.
                schedule.next_run = next_slot(schedule.pattern, now)
                ran = session.scalar(
                    select(BackupScheduleRun.id).where(
                        BackupScheduleRun.schedule_id == schedule.id,
                        BackupScheduleRun.slot == slot,
                    )
                )
                if ran is not None:
                    return None  # that slot has had its run; only next_run moves on
                schedule.last_run = now
                run = BackupScheduleRun(schedule_id=schedule.id, slot=slot)
                session.add(run)
                session.flush()  # the (schedule, slot) claim: a second claimer fails here
                try:
                    with session.begin_nested():
                        backup, op_id = self._start_backup(session, schedule, slot)
                except CofferError as exc:
                    op_id = None
                    run.state, run.reason, run.finished = RunState.REFUSED, exc.message, now
                    schedule.last_result, schedule.last_reason = RunState.REFUSED.value, exc.message
                    LOG.info("schedule %s: slot %s refused: %s", schedule.id, slot, exc.message)
                else:
                    run.backup_id, run.state = backup.id, RunState.STARTED
                    schedule.last_result, schedule.last_reason = RunState.STARTED.value, None
                    schedule.last_backup_id = backup.id
                    LOG.info("schedule %s: slot %s started backup %s", schedule.id, slot, backup.id)
                run_id = run.id
        except IntegrityError:
            LOG.info("schedule %s: its slot was run by another taskmanager", schedule_id)
            return None
        if op_id is not None:
            self.wake(op_id)
        return run_id

    def _start_backup(
        self, session: Session, schedule: BackupSchedule, slot: datetime
    ) -> tuple[Backup, str]:
        # The API's own create path: every check a POST /backups gets, the quota included.
        from coffer.api.routes.backups import BackupIn, record_backup

        inst = session.get(Instance, schedule.instance_id)
        if inst is None or inst.deleted or inst.task is Task.DELETING:
            raise NotFound(f"Instance {schedule.instance_id} no longer exists.")
        parent_id = None
        if schedule.incremental:
            latest = session.scalars(
                select(Backup)
                .where(
                    Backup.instance_id == inst.id,
                    Backup.deleted.is_(False),
                    Backup.state == BackupState.COMPLETED,
                )
                .order_by(Backup.created.desc(), Backup.id.desc())
                .limit(1)
            ).first()
            links = schedule.retention_count or DEFAULT_CHAIN_LENGTH
            if latest is not None and chain_length(session, latest) < max(links, 2):
                parent_id = latest.id
        spec = BackupIn(
            name=f"{schedule.name} {slot:%Y-%m-%d %H:%M}",
            instance=inst.id,
            description=f"Taken by backup schedule {schedule.id}.",
            parent_id=parent_id,
        )
        return record_backup(session, self.settings, inst, spec)

    def finish_runs(self) -> None:
        """Mark runs whose backup ended, and apply retention after each completed one."""
        now = self.clock()
        with self.session_factory() as session:
            started = list(
                session.scalars(
                    select(BackupScheduleRun.id).where(BackupScheduleRun.state == RunState.STARTED)
                )
            )
        for run_id in started:
            op_id = None
            with transaction(self.session_factory) as session:
                run = session.get(BackupScheduleRun, run_id)
                if run is None or run.state is not RunState.STARTED:
                    continue
                backup = session.get(Backup, run.backup_id) if run.backup_id else None
                if backup is not None and not backup.deleted and backup.state in RUNNING_STATES:
                    continue
                schedule = session.get(BackupSchedule, run.schedule_id)
                if backup is not None and backup.state is BackupState.COMPLETED:
                    run.state, run.finished = RunState.COMPLETED, now
                else:
                    run.state, run.finished = RunState.FAILED, now
                    run.reason = (
                        backup.fail_reason or "The backup failed."
                        if backup is not None and not backup.deleted
                        else "The backup was deleted before it ended."
                    )
                if schedule is None:
                    continue
                if schedule.last_backup_id == run.backup_id:
                    schedule.last_result, schedule.last_reason = run.state.value, run.reason
                if run.state is RunState.COMPLETED:
                    op_id = self._apply_retention(session, schedule, now)
            if op_id is not None:
                self.wake(op_id)

    def _apply_retention(
        self, session: Session, schedule: BackupSchedule, now: datetime
    ) -> str | None:
        # Backups an earlier retention (or the owner) already asked to delete are not asked again.
        pending: set[str] = set()
        for payload in session.scalars(
            select(Operation.payload).where(
                Operation.kind == DELETE_BACKUP, Operation.state.in_((PENDING, RUNNING))
            )
        ):
            pending.update((payload or {}).get("backup_ids", []))
        doomed = [b for b in expired(session, schedule, now) if b.id not in pending]
        if not doomed:
            return None
        LOG.info("schedule %s: retention deletes %s", schedule.id, ", ".join(b.id for b in doomed))
        # Children before parents, as the API's delete orders them.
        ids = [b.id for b in sorted(doomed, key=lambda b: (b.created, b.id), reverse=True)]
        return enqueue(session, DELETE_BACKUP, None, {"backup_ids": ids}).id

    def forget_deleted_instances(self) -> None:
        """Remove the schedules (and runs) of instances that are deleted or being deleted."""
        with self.session_factory() as session:
            rows = session.execute(
                select(BackupSchedule.id, Instance.deleted, Instance.task).join(
                    Instance, Instance.id == BackupSchedule.instance_id, isouter=True
                )
            ).all()
        gone = [
            schedule_id
            for schedule_id, deleted, task in rows
            if deleted is None or deleted or task is Task.DELETING
        ]
        if not gone:
            return
        with transaction(self.session_factory) as session:
            session.execute(
                delete(BackupScheduleRun).where(BackupScheduleRun.schedule_id.in_(gone))
            )
            session.execute(delete(BackupSchedule).where(BackupSchedule.id.in_(gone)))
        LOG.info("removed %d schedule(s) of deleted instances", len(gone))
