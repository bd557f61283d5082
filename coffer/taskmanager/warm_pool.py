"""The warm pool: instances built and started ahead of creates, with no tenant and no users.

A Redis server starts in milliseconds, so a Redis create's time is nearly all Coffer's own
work: the rows, the address, the volume, a guest agent's start and its bus connection. With
``[compute] redis_warm_pool = N`` the taskmanager keeps N Redis instances built and running
under the internal project ``WARM_PROJECT``, which no token can hold. A create that a warm
instance fits (same datastore version, flavor and volume size; default access; no
configuration group, no backup) takes one over in the create's own transaction (``claim``):
the row is handed to the project and its quota charged, and the create operation starts at its
``prepare`` step, where the running agent adds the users and databases
(``GuestAgent.prepare``). The instance keeps the warm instance's id.

A warm instance is an ordinary instance, so the rules that keep instances safe keep it safe
too: it survives a restart of Coffer and is found again, a crash while one is built resumes or
fails its create operation, and a failed one is deleted like any instance. The pool is topped
up (``WarmPool.maintain``) only once no tenant create has come in for ``QUIET_SECONDS``, so
refills never compete with the creates they are for; warm instances beyond the configured
count (after a lower setting) are deleted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, exists, or_, select, update
from sqlalchemy.orm import Session

from coffer.catalog import resolve_datastore_version
from coffer.controlplane import ControlPlane
from coffer.db.models import Flavor, Instance, Operation, ServiceStatusRow, utcnow
from coffer.db.session import transaction
from coffer.errors import CofferError
from coffer.status import ServerStatus, ServiceStatus, Task
from coffer.taskmanager.operations import PENDING, RUNNING, enqueue

LOG = logging.getLogger(__name__)

#: The project that owns the warm instances. Project ids are hex UUIDs (Keystone's and the
#: embedded identity's), so no tenant's token carries this one.
WARM_PROJECT = "coffer-warm-pool"
#: The create operation's payload key that marks a warm instance's own build.
WARM_KEY = "warm"
#: Seconds between two looks at the pool.
CHECK_SECONDS = 1.0
#: Refills start once no tenant create has come in for this long.
QUIET_SECONDS = 2.0
#: After a warm instance failed to build, no new one is started for this long.
FAILURE_PAUSE = 60.0

_CREATE = "create_instance"
_DELETE = "delete_instance"
_READY = (ServiceStatus.RUNNING, ServiceStatus.HEALTHY)
_GONE = (Task.DELETING, Task.DELETING_ERROR)


def wanted(settings: Any) -> dict[str, int]:
    """Warm instances to keep, by datastore manager. Only managers whose prepare can run
    again on a started engine to add its users have a setting: Redis."""
    count = settings.compute.redis_warm_pool
    return {"redis": count} if count > 0 else {}


def fits(settings: Any, manager: str, flavor_id: str, size: int, access: dict[str, Any]) -> bool:
    """Whether a create of this shape can take a warm instance (before any row is read)."""
    return (
        manager in wanted(settings)
        and flavor_id == settings.compute.warm_pool_flavor
        and size == settings.compute.warm_pool_volume_size
        and not access.get("is_public")
        and not access.get("allowed_cidrs")
    )


def claim(
    session: Session,
    *,
    version_id: str,
    flavor_id: str,
    size: int,
    tenant_id: str,
    user_id: str | None,
    name: str,
    region_id: str,
) -> Instance | None:
    """Hand a ready warm instance of this shape to ``tenant_id`` in the caller's transaction;
    None when there is none. The hand-over is one guarded UPDATE (still an idle warm
    instance), so two creates never take the same one, on any control DB."""
    candidates = session.scalars(
        select(Instance.id)
        .join(ServiceStatusRow, ServiceStatusRow.instance_id == Instance.id)
        .where(
            Instance.tenant_id == WARM_PROJECT,
            Instance.deleted.is_(False),
            Instance.task == Task.NONE,
            Instance.server_status == ServerStatus.ACTIVE,
            Instance.datastore_version_id == version_id,
            Instance.flavor_id == flavor_id,
            Instance.volume_size == size,
            ServiceStatusRow.status.in_(_READY),
        )
        .order_by(Instance.created)
        .limit(4)
    ).all()
    now = utcnow()
    for instance_id in candidates:
        taken = session.execute(
            update(Instance)
            .where(
                Instance.id == instance_id,
                Instance.tenant_id == WARM_PROJECT,
                Instance.deleted.is_(False),
                Instance.task == Task.NONE,
            )
            .values(
                tenant_id=tenant_id,
                user_id=user_id,
                name=name,
                region_id=region_id,
                task=Task.BUILDING,
                task_description="",
                server_status=ServerStatus.BUILD,
                created=now,
                updated=now,
            )
            .execution_options(synchronize_session=False)
        )
        if taken.rowcount == 1:  # type: ignore[attr-defined]
            inst = session.get(Instance, instance_id)
            assert inst is not None
            LOG.info("instance %s: taken from the warm pool by project %s", inst.id, tenant_id)
            return inst
    return None


class WarmPool:
    """Keeps the configured number of warm instances (``maintain``), from the taskmanager's
    loop."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self._next_check = 0.0
        self._paused_until = 0.0
        # With no pool wanted, the control DB is looked at once (a lower setting than the last
        # run's leaves warm instances to delete), and no more while none are found.
        self._may_exist = True

    def maintain_if_due(self) -> bool:
        """``maintain`` at most every CHECK_SECONDS; True when it enqueued operations."""
        now = time.monotonic()
        if now < self._next_check:
            return False
        self._next_check = now + CHECK_SECONDS
        return self.maintain()

    def maintain(self) -> bool:
        """Delete failed and surplus warm instances and start the missing ones; True when it
        enqueued operations. Looks without the write lock first; writes only on a change."""
        targets = wanted(self.cp.settings)
        if not targets and not self._may_exist:
            return False
        with self.cp.session_factory() as session:
            if not self._changes(session, targets, dry_run=True):
                return False
        with transaction(self.cp.session_factory) as session:
            return self._changes(session, targets, dry_run=False)

    def _changes(self, session: Session, targets: dict[str, int], *, dry_run: bool) -> bool:
        pool = session.scalars(
            select(Instance).where(Instance.tenant_id == WARM_PROJECT, Instance.deleted.is_(False))
        ).all()
        self._may_exist = bool(pool or targets)
        failed = [s for s in pool if s.server_status is ServerStatus.ERROR and s.task not in _GONE]
        live = [
            s for s in pool if s.task not in _GONE and s.server_status is not ServerStatus.ERROR
        ]
        if failed:
            if dry_run:
                return True
            for inst in failed:
                LOG.warning("warm instance %s failed to build; deleting it", inst.id)
                self._delete(session, inst)
            self._paused_until = time.monotonic() + FAILURE_PAUSE
        changed = bool(failed)
        managers = {*targets, *self._managers(session, live)}
        for manager in sorted(managers):
            changed |= self._balance(session, manager, targets.get(manager, 0), live, dry_run)
            if changed and dry_run:
                return True
        return changed

    @staticmethod
    def _managers(session: Session, live: Sequence[Instance]) -> set[str]:
        from coffer.db.models import DatastoreVersion

        ids = {s.datastore_version_id for s in live}
        if not ids:
            return set()
        return set(
            session.scalars(
                select(DatastoreVersion.manager).where(DatastoreVersion.id.in_(ids))
            ).all()
        )

    @staticmethod
    def _delete(session: Session, inst: Instance) -> None:
        inst.task = Task.DELETING
        inst.task_description = "Deleting a warm instance no longer wanted."
        enqueue(session, _DELETE, inst.id, {})

    def _balance(
        self,
        session: Session,
        manager: str,
        target: int,
        live: Sequence[Instance],
        dry_run: bool,
    ) -> bool:
        try:
            version = resolve_datastore_version(session, manager, None)
        except CofferError as exc:
            LOG.warning("no %s warm pool: %s", manager, exc.message)
            return False
        mine = [s for s in live if s.datastore_version_id == version.id]
        if len(mine) > target:
            surplus = [s for s in mine if s.task is Task.NONE][: len(mine) - target]
            if not dry_run:
                for inst in surplus:
                    self._delete(session, inst)
            return bool(surplus)
        missing = target - len(mine)
        if missing <= 0 or time.monotonic() < self._paused_until or _tenant_creates(session):
            return False
        flavor_id = self.cp.settings.compute.warm_pool_flavor
        if session.get(Flavor, flavor_id) is None:
            LOG.warning(
                "no %s warm pool: [compute] warm_pool_flavor %r is not a flavor; set it to an id "
                "from 'openstack database flavor list'",
                manager,
                flavor_id,
            )
            return False
        if dry_run:
            return True
        deadline = utcnow() + timedelta(seconds=self.cp.settings.default.usage_timeout)
        for _ in range(missing):
            inst = Instance(
                tenant_id=WARM_PROJECT,
                user_id=None,
                name=f"warm-{manager}",
                flavor_id=flavor_id,
                volume_size=self.cp.settings.compute.warm_pool_volume_size,
                datastore_version_id=version.id,
                task=Task.BUILDING,
                server_status=ServerStatus.BUILD,
                access={"is_public": False},
                region_id=self.cp.settings.default.region_name,
                encrypted_key="",
            )
            session.add(inst)
            session.flush()
            _key, inst.encrypted_key = self.cp.new_instance_key(inst.id)
            session.add(ServiceStatusRow(instance_id=inst.id, status=ServiceStatus.NEW))
            enqueue(session, _CREATE, inst.id, {"databases": [], WARM_KEY: True}, deadline)
        LOG.info("building %d warm %s instance(s)", missing, manager)
        return True


def _tenant_creates(session: Session) -> bool:
    """Whether a tenant's create is waiting or running, or came in during the last
    QUIET_SECONDS: refills wait for a burst of creates to end, not just for a gap in it.
    (Both looks go by an index: operations by state, instances by creation time, which a
    warm instance's hand-over sets too.)"""
    recent = utcnow() - timedelta(seconds=QUIET_SECONDS)
    running = exists().where(
        Operation.state.in_((PENDING, RUNNING)),
        Operation.kind == _CREATE,
        exists().where(
            and_(Instance.id == Operation.instance_id, Instance.tenant_id != WARM_PROJECT)
        ),
    )
    new = exists().where(Instance.created > recent, Instance.tenant_id != WARM_PROJECT)
    return bool(session.scalar(select(or_(running, new))))
