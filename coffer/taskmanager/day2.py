"""Day-2 operations on a running instance as durable flows (see ``operations``): restart,
resize (flavor, volume), access changes and configuration groups, and their instance events.

The API side (``coffer.taskmanager.day2_requests``) checks a request and, in one transaction,
records the desired state, the operation (``begin_operation``) and an instance event. The flows
(``Day2Flows``) then make the world match, step by idempotent step:

* restart: the guest restarts the engine (which reads its overrides file again), then Coffer
  re-sends the configuration values so the guest's record matches the control DB;
* resize: the compute driver rewrites the server's guest config (new flavor or volume size; the
  memory cgroup follows the RAM), then the guest re-reads it and restarts the engine when its
  sizing changed (once), or reloads it when only the volume did;
* access: a public address is allocated before the engine listens on it and released only
  after it stopped, so no other instance can be given an address this engine still holds;
* configuration: the guest is sent the group's values (or none, after a detach) and the
  restart-required parameter names; it applies what it can live and names what waits for a
  restart, which puts the instance's task in RESTART_REQUIRED until a restart.

A flow that fails gives back what it charged to the quota, puts the server's config back, leaves
the instance's task as it found it and records the reason in the instance's fault and event.

A group changed by PUT/PATCH ``/configurations/{id}`` reaches its instances at once: the API
records an ``apply_configuration`` operation for every attached instance that is ACTIVE in the
same transaction as the new values (``reapply_configuration``) and wakes the taskmanager.
``converge_configurations`` (run by the taskmanager every few seconds) is the net for the
instances that were busy then (another operation, a backup, a stopped engine, a silent agent):
it applies the group once they are ACTIVE again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from coffer import quotas
from coffer.compute.base import ComputeDriver, ServerSpec
from coffer.configuration import groups
from coffer.configuration.parameter_rules import rules_for_version
from coffer.controlplane import ControlPlane
from coffer.db.models import Instance, Operation, ServiceStatusRow, utcnow
from coffer.db.models_day2 import Configuration, InstanceEvent
from coffer.db.session import transaction
from coffer.errors import RemoteError, RpcTimeout
from coffer.status import ServerStatus, ServiceStatus, Task, trove_status
from coffer.taskmanager.backups import running_backup
from coffer.taskmanager.instances import CREATE, record_fault
from coffer.taskmanager.operations import (
    DONE,
    FAILED,
    NEXT,
    Context,
    Flow,
    OperationFailed,
    StepResult,
    enqueue,
)

LOG = logging.getLogger(__name__)

RESTART = "restart_instance"
RESIZE_FLAVOR = "resize_flavor"
RESIZE_VOLUME = "resize_volume"
UPDATE_ACCESS = "update_access"
APPLY_CONFIGURATION = "apply_configuration"

#: Tasks of an instance no operation holds (a day-2 operation may start).
IDLE_TASKS = (Task.NONE, Task.RESTART_REQUIRED)
#: Engine statuses in which an instance takes a day-2 operation; a restart also takes an engine
#: that is stopped, crashed or stuck (Trove's "action allowed" statuses).
ACTIONABLE_SERVICE = frozenset({ServiceStatus.RUNNING, ServiceStatus.HEALTHY})
RESTARTABLE_SERVICE = ACTIONABLE_SERVICE | {
    ServiceStatus.SHUTDOWN,
    ServiceStatus.CRASHED,
    ServiceStatus.BLOCKED,
}
#: How often the taskmanager looks for configuration groups changed since they were applied.
CONVERGE_SECONDS = 2.0
GIB = 1024**3


@dataclass(frozen=True)
class Caller:
    """Who asks: the project in the URL, the user (for the event), and admin or not."""

    project_id: str
    user_id: str | None
    is_admin: bool = False


# -- instance events ------------------------------------------------------------------------------


def record_event(
    session: Session,
    instance_id: str,
    action: str,
    user_id: str | None,
    details: dict[str, Any],
    operation_id: str | None = None,
    state: str = "running",
) -> InstanceEvent:
    """Add an event to the caller's transaction; ``state`` "succeeded" for immediate changes."""
    event = InstanceEvent(
        instance_id=instance_id,
        action=action,
        user_id=user_id,
        details=details,
        operation_id=operation_id,
        state=state,
        finished=utcnow() if state != "running" else None,
    )
    session.add(event)
    session.flush()
    return event


def finish_event(session: Session, operation_id: str, fault: str | None = None) -> None:
    """Mark the event of ``operation_id`` succeeded, or failed with ``fault`` as the reason."""
    event = session.scalars(
        select(InstanceEvent).where(InstanceEvent.operation_id == operation_id)
    ).first()
    if event is None or event.state != "running":
        return
    event.state = "failed" if fault else "succeeded"
    event.fault_message = fault[:255] if fault else None
    event.finished = utcnow()


def _iso(value: Any) -> str | None:
    return value.strftime("%Y-%m-%dT%H:%M:%S") if value else None


def event_view(event: InstanceEvent) -> dict[str, Any]:
    return {
        "id": event.id,
        "action": event.action,
        "user_id": event.user_id,
        "state": event.state,
        "created": _iso(event.created),
        "finished": _iso(event.finished),
        "details": dict(event.details or {}),
        "fault": {"message": event.fault_message} if event.fault_message else None,
    }


def list_events(session: Session, instance_id: str, limit: int = 200) -> list[dict[str, Any]]:
    """The instance's events, newest first (at most ``limit``). An event whose operation ended
    without saying so (cancelled by ``reset_status``) shows the operation's outcome."""
    rows = session.scalars(
        select(InstanceEvent)
        .where(InstanceEvent.instance_id == instance_id)
        .order_by(InstanceEvent.created.desc(), InstanceEvent.id)
        .limit(limit)
    ).all()
    views = []
    for row in rows:
        view = event_view(row)
        op = session.get(Operation, row.operation_id) if row.state == "running" else None
        if op is not None and op.state in (DONE, FAILED):
            view["state"] = "succeeded" if op.state == DONE else "failed"
            if op.state == FAILED:
                view["fault"] = {"message": (op.error or "The operation failed.")[:255]}
        views.append(view)
    return views


# -- shared by the API side and the taskmanager ---------------------------------------------------


def begin_operation(
    cp: ControlPlane,
    session: Session,
    caller: Caller,
    inst: Instance,
    kind: str,
    task: Task,
    description: str,
    payload: dict[str, Any],
    event: tuple[str, dict[str, Any]],
) -> str:
    """In the caller's transaction: put ``inst`` in ``task``, enqueue a ``kind`` operation
    carrying ``payload`` (plus the task to go back to), and record the ``(action, details)``
    event; returns the operation id to wake the taskmanager with."""
    payload["prior_task"] = inst.task.value
    inst.task = task
    inst.task_description = description
    deadline = utcnow() + timedelta(seconds=cp.settings.default.usage_timeout)
    op = enqueue(session, kind, inst.id, payload, deadline=deadline)
    record_event(session, inst.id, event[0], caller.user_id, event[1], op.id)
    return op.id


def not_actionable(
    cp: ControlPlane,
    session: Session,
    inst: Instance,
    restart: bool = False,
    configuration: bool = False,
) -> str | None:
    """Why ``inst`` cannot take a day-2 operation now (a sentence for the refusal), or None
    when it is ACTIVE: its server runs, no operation holds it (task NONE, or RESTART_REQUIRED
    except for attaching or detaching a group, where Trove wants NONE), no backup of it is being
    taken, and its guest reported a running engine within ``agent_heartbeat_expiry``. A
    ``restart`` also takes a stopped, crashed or stuck engine (Trove's rule)."""
    row = session.get(ServiceStatusRow, inst.id)
    service = row.status if row is not None else ServiceStatus.NEW
    allowed = RESTARTABLE_SERVICE if restart else ACTIONABLE_SERVICE
    idle = (Task.NONE,) if configuration else IDLE_TASKS
    backup = running_backup(session, inst.id)
    shown = trove_status(inst.task, inst.server_status, service, backup_running=backup is not None)
    if inst.deleted or inst.task is Task.DELETING:
        return "it is being deleted"
    if inst.task not in idle or inst.server_status is not ServerStatus.ACTIVE:
        if shown == "ACTIVE":  # a task Trove shows as ACTIVE (UPDATING: access, groups)
            return f"another operation is under way ({inst.task.value})"
        return f"its status is {shown}"
    if backup is not None:
        return f"its status is BACKUP (backup {backup.id} is being taken)"
    if service not in allowed:
        return f"its status is {shown}"
    expiry = timedelta(seconds=cp.settings.default.agent_heartbeat_expiry)
    if row is None or row.updated_at < utcnow() - expiry:
        return "its guest agent is silent"
    return None


def reapply_configuration(
    cp: ControlPlane, session: Session, caller: Caller, inst: Instance
) -> str | None:
    """In the caller's transaction: enqueue an apply of ``inst``'s (changed) group if it is
    ACTIVE; returns the operation id, or None when it is busy (``converge_configurations``
    applies the group once it is ACTIVE again). ``inst`` must be locked by the caller."""
    if inst.configuration_id is None or not_actionable(cp, session, inst) is not None:
        return None
    payload = {
        "configuration_id": inst.configuration_id,
        "previous_configuration_id": inst.configuration_id,
    }
    return begin_operation(
        cp,
        session,
        caller,
        inst,
        APPLY_CONFIGURATION,
        Task.UPDATING,
        "Applying changed configuration group values.",
        payload,
        ("apply_configuration", {"configuration_id": inst.configuration_id}),
    )


def restart_required_parameters(session: Session, version_id: str) -> list[str]:
    """The version's parameters whose rules say a change needs an engine restart."""
    return sorted(r.name for r in rules_for_version(session, version_id) if r.restart_required)


# -- the flows ------------------------------------------------------------------------------------


class Day2Flows:
    """Builds the day-2 flows bound to one control plane and compute driver."""

    def __init__(self, cp: ControlPlane, compute: ComputeDriver) -> None:
        self.cp = cp
        self.compute = compute
        self._next_converge = 0.0

    def flows(self) -> dict[str, Flow]:
        return {
            RESTART: Flow(
                RESTART,
                [
                    ("restart_engine", self.restart_engine),
                    ("resync_overrides", self.resync_overrides),
                    ("finish", self.finish),
                ],
                fail=self.failed,
            ),
            RESIZE_FLAVOR: Flow(
                RESIZE_FLAVOR,
                [
                    ("rewrite_server", self.rewrite_server),
                    ("reconfigure_guest", self.reconfigure_guest),
                    ("resync_overrides", self.resync_overrides),
                    ("finish", self.finish),
                ],
                fail=self.failed,
            ),
            RESIZE_VOLUME: Flow(
                RESIZE_VOLUME,
                [
                    ("rewrite_server", self.rewrite_server),
                    ("reconfigure_guest", self.reconfigure_guest),
                    ("finish", self.finish),
                ],
                fail=self.failed,
            ),
            UPDATE_ACCESS: Flow(
                UPDATE_ACCESS,
                [
                    ("allocate_public", self.allocate_public),
                    ("rewrite_server", self.rewrite_server),
                    ("reconfigure_guest", self.reconfigure_guest),
                    ("release_public", self.release_public),
                    ("finish", self.finish),
                ],
                fail=self.failed,
            ),
            APPLY_CONFIGURATION: Flow(
                APPLY_CONFIGURATION,
                [("apply_values", self.apply_values), ("finish", self.finish)],
                fail=self.failed,
            ),
        }

    # -- helpers --------------------------------------------------------------------------------

    def _instance(self, ctx: Context) -> Instance:
        assert ctx.instance_id is not None
        with self.cp.session_factory() as session:
            inst = session.get(Instance, ctx.instance_id)
        if inst is None or inst.deleted or inst.task in IDLE_TASKS or inst.task.is_error:
            raise OperationFailed(f"Instance {ctx.instance_id} is no longer being changed.")
        if inst.task is Task.DELETING:
            raise OperationFailed(f"Instance {ctx.instance_id} is being deleted.")
        return inst

    def _call(self, instance_id: str, method: str, **kwargs: Any) -> Any:
        """A guest call; a refusal is final, silence and unavailability are retried."""
        timeout = self.cp.settings.default.agent_call_high_timeout
        try:
            return self.cp.guest(instance_id).call(method, timeout=timeout, **kwargs)
        except RemoteError as exc:
            if exc.status == 503:
                raise RuntimeError(f"the guest could not {method} yet: {exc.message}") from exc
            raise OperationFailed(exc.message, f"{exc.kind}: {exc.message}") from exc
        except RpcTimeout as exc:
            raise RuntimeError(f"the guest agent did not answer {method} in time") from exc

    def _target(self, ctx: Context) -> dict[str, Any]:
        """What the server's guest config must say once this operation has finished."""
        target: dict[str, Any] = {}
        payload = ctx.payload
        if "new_flavor" in payload:
            target["flavor_id"] = payload["new_flavor"]
        if "new_size" in payload:
            target["volume_size"] = payload["new_size"]
        if "access" in payload:
            target["access"] = payload["access"]
            target["addresses"] = payload.get("addresses")
        return target

    def _previous(self, ctx: Context) -> dict[str, Any]:
        payload = ctx.payload
        previous: dict[str, Any] = {}
        if "old_flavor" in payload:
            previous["flavor_id"] = payload["old_flavor"]
        if "old_size" in payload:
            previous["volume_size"] = payload["old_size"]
        if "previous_access" in payload:
            previous["access"] = payload["previous_access"]
            previous["addresses"] = payload["previous_addresses"]
        return previous

    def _write_server(self, instance_id: str, change: dict[str, Any]) -> None:
        """Rewrite the server's guest config with ``change`` applied to the instance's row
        (the row itself changes only when the flow finishes)."""
        with self.cp.session_factory() as session:
            row = session.get(Instance, instance_id)
            assert row is not None
            ref = dict(row.compute_ref or {})
            shadow = Instance(
                id=row.id,
                tenant_id=row.tenant_id,
                name=row.name,
                flavor_id=change.get("flavor_id", row.flavor_id),
                volume_size=change.get("volume_size", row.volume_size),
                datastore_version_id=row.datastore_version_id,
                access=dict(change.get("access", row.access or {})),
                encrypted_key=row.encrypted_key,
            )
        addresses = change.get("addresses") or {
            "private": ref.get("private"),
            "public": ref.get("public"),
        }
        spec = ServerSpec(
            instance_id=instance_id,
            guest_config=self.cp.guest_config(shadow, addresses),
            is_public=addresses.get("public") is not None,
        )
        self.compute.create_server(spec)

    # -- steps ----------------------------------------------------------------------------------

    def restart_engine(self, ctx: Context) -> StepResult:
        inst = self._instance(ctx)
        self._call(inst.id, "restart")
        return NEXT

    def allocate_public(self, ctx: Context) -> StepResult:
        inst = self._instance(ctx)
        previous = ctx.payload["previous_addresses"]
        public = None
        if ctx.payload["access"]["is_public"]:
            with transaction(self.cp.session_factory) as session:
                _, public = self.compute.allocate_addresses(session, inst.id, True)
            ctx.payload["allocated_public"] = previous.get("public") is None
        ctx.payload["addresses"] = {"private": previous.get("private"), "public": public}
        return NEXT

    def rewrite_server(self, ctx: Context) -> StepResult:
        inst = self._instance(ctx)
        self._write_server(inst.id, self._target(ctx))
        return NEXT

    def reconfigure_guest(self, ctx: Context) -> StepResult:
        inst = self._instance(ctx)
        result = self._call(inst.id, "reconfigure") or {}
        status = result.get("status")
        if status not in (ServiceStatus.HEALTHY.value, ServiceStatus.RUNNING.value):
            raise RuntimeError(f"the engine is {status} after reconfiguring; waiting for it")
        ctx.payload["restarted"] = bool(result.get("restarted"))
        return NEXT

    def release_public(self, ctx: Context) -> StepResult:
        inst = self._instance(ctx)
        if not ctx.payload["access"]["is_public"]:
            # Only now: the engine no longer listens on the address.
            with transaction(self.cp.session_factory) as session:
                self.compute.allocate_addresses(session, inst.id, False)
        return NEXT

    def _values_and_restart_names(self, instance_id: str) -> tuple[dict[str, Any], list[str]]:
        with self.cp.session_factory() as session:
            inst = session.get(Instance, instance_id)
            assert inst is not None
            values = groups.configuration_values_for_instance(session, instance_id)
            return values, restart_required_parameters(session, inst.datastore_version_id)

    def apply_values(self, ctx: Context) -> StepResult:
        inst = self._instance(ctx)
        values, restart = self._values_and_restart_names(inst.id)
        result = self._call(inst.id, "apply_overrides", values=values, restart_required=restart)
        ctx.payload["pending_restart"] = list(result.get("pending_restart") or [])
        return NEXT

    def resync_overrides(self, ctx: Context) -> StepResult:
        """After the engine restarted: re-send the values (the guest's record then matches the
        control DB) and learn what, if anything, still waits for a restart."""
        inst = self._instance(ctx)
        values, restart = self._values_and_restart_names(inst.id)
        try:
            result = self._call(inst.id, "apply_overrides", values=values, restart_required=restart)
        except OperationFailed:
            if values:
                raise
            result = {}  # an engine without configuration support, and nothing to apply
        ctx.payload["pending_restart"] = list(result.get("pending_restart") or [])
        return NEXT

    def finish(self, ctx: Context) -> StepResult:
        payload = ctx.payload
        with transaction(self.cp.session_factory) as session:
            event = session.scalars(
                select(InstanceEvent).where(InstanceEvent.operation_id == ctx.op_id)
            ).first()
            if event is not None and event.state == "succeeded":
                return NEXT  # finished before a crash; the instance is not ours any more
            row = session.get(Instance, ctx.instance_id)
            if row is None or row.deleted or row.task in IDLE_TASKS or row.task.is_error:
                raise OperationFailed(f"Instance {ctx.instance_id} is no longer being changed.")
            if "new_flavor" in payload:
                row.flavor_id = payload["new_flavor"]
                if payload["ram_delta"] < 0:
                    ram = {"ram": payload["ram_delta"]}
                    quotas.reserve(session, self.cp.settings, row.tenant_id, row.id, ram)
            if "new_size" in payload:
                row.volume_size = payload["new_size"]
                row.volume_total_bytes = payload["new_size"] * GIB
            if "access" in payload:
                row.access = dict(payload["access"])
                addresses = payload["addresses"]
                row.compute_ref = {**dict(row.compute_ref or {}), **addresses}
            if "pending_restart" in payload:
                pending = bool(payload["pending_restart"])
            else:
                # Nothing was applied and the engine kept running: what waited still waits.
                pending = payload.get("prior_task") == Task.RESTART_REQUIRED.value
            row.task = Task.RESTART_REQUIRED if pending else Task.NONE
            row.task_description = (
                "Restart the instance to apply: " + ", ".join(payload["pending_restart"])
                if pending and payload.get("pending_restart")
                else ""
            )[:255]
            if event is not None and pending and payload.get("pending_restart"):
                # What the owner must restart for, next to what they asked.
                event.details = {**event.details, "pending_restart": payload["pending_restart"]}
            finish_event(session, ctx.op_id)
        LOG.info("instance %s: operation %s finished", ctx.instance_id, ctx.op_id)
        return NEXT

    # -- failure --------------------------------------------------------------------------------

    def failed(self, ctx: Context, failure: OperationFailed) -> None:
        """Give back the quota, put the server's config back, restore the task, say why."""
        assert ctx.instance_id is not None
        payload = ctx.payload
        previous = self._previous(ctx)
        if previous:
            try:
                self._write_server(ctx.instance_id, previous)
                self._call(ctx.instance_id, "reconfigure")
            except Exception as exc:
                LOG.warning("instance %s: could not put its config back: %s", ctx.instance_id, exc)
        with transaction(self.cp.session_factory) as session:
            row = session.get(Instance, ctx.instance_id)
            finish_event(session, ctx.op_id, failure.message or "The operation failed.")
            if row is None:
                return
            # Only growth was charged up front (negative amounts are never refused).
            refund = {
                "ram": -max(0, int(payload.get("ram_delta", 0))),
                "volumes": -max(0, int(payload.get("delta", 0))),
            }
            quotas.reserve(session, self.cp.settings, row.tenant_id, row.id, refund)
            if payload.get("allocated_public"):
                self.compute.allocate_addresses(session, row.id, False)
            if (
                "previous_configuration_id" in payload
                and row.configuration_id == payload.get("configuration_id")
                and not row.deleted
            ):
                row.configuration_id = payload["previous_configuration_id"]
            record_fault(session, row.id, failure.message, failure.details)
            if not row.deleted and row.task not in (*IDLE_TASKS, Task.DELETING):
                row.task = Task(payload.get("prior_task", Task.NONE.value))
                row.task_description = ""

    # -- configuration groups changed after they were applied -----------------------------------

    def converge_if_due(self) -> list[str]:
        """``converge_configurations`` at most every ``CONVERGE_SECONDS``."""
        now = time.monotonic()
        if now < self._next_converge:
            return []
        self._next_converge = now + CONVERGE_SECONDS
        return self.converge_configurations()

    def converge_configurations(self) -> list[str]:
        """Enqueue an apply for every ACTIVE instance whose group changed since its values were
        last sent (an apply, or the create that started it with them); returns the new
        operations' ids. Busy instances are picked up once they are ACTIVE again."""
        last_sent = (
            select(Operation.instance_id, func.max(Operation.created).label("at"))
            .where(Operation.kind.in_((APPLY_CONFIGURATION, CREATE)))
            .group_by(Operation.instance_id)
            .subquery()
        )
        query = (
            select(Instance)
            .join(Configuration, Configuration.id == Instance.configuration_id)
            .outerjoin(last_sent, last_sent.c.instance_id == Instance.id)
            .where(
                Instance.deleted.is_(False),
                Instance.server_status == ServerStatus.ACTIVE,
                Instance.task.in_(IDLE_TASKS),
                or_(last_sent.c.at.is_(None), last_sent.c.at < Configuration.updated),
            )
        )
        with self.cp.session_factory() as session:
            stale = [
                inst.id
                for inst in session.scalars(query)
                if not_actionable(self.cp, session, inst) is None
            ]
        if not stale:
            return []  # the usual case: no write transaction, no write lock
        started = []
        with transaction(self.cp.session_factory) as session:
            for instance_id in stale:
                inst = session.get(Instance, instance_id, with_for_update=True)
                if inst is None:
                    continue
                op_id = reapply_configuration(self.cp, session, Caller(inst.tenant_id, None), inst)
                if op_id is not None:
                    started.append(op_id)
        if started:
            LOG.info("re-applying changed configuration groups (%d operations)", len(started))
        return started
