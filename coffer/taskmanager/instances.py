"""The instance flows: create and delete, as idempotent steps (see ``operations``)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy import bindparam, select

from coffer import quotas
from coffer.bus import keys
from coffer.compute.base import ComputeDriver, ServerSpec
from coffer.configuration import groups
from coffer.controlplane import ControlPlane
from coffer.db.models import (
    Instance,
    InstanceFault,
    ServiceStatusRow,
    utcnow,
)
from coffer.db.session import transaction
from coffer.errors import CofferError, RemoteError, RpcTimeout
from coffer.status import ServerStatus, ServiceStatus, Task
from coffer.taskmanager.backups import RestoreStep, purge_unfinished_objects
from coffer.taskmanager.operations import (
    NEXT,
    Context,
    Flow,
    OperationFailed,
    StepResult,
    Wait,
)
from coffer.taskmanager.warm_pool import WARM_KEY

LOG = logging.getLogger(__name__)

CREATE = "create_instance"
DELETE = "delete_instance"
PREPARE_CALL_TIMEOUT = 180.0
#: A create's payload: it took a warm instance over (``warm_pool.claim``); prepare found it ready.
CLAIMED_KEY = "claimed"
READY_KEY = "ready"
_READY_VALUES = (ServiceStatus.RUNNING.value, ServiceStatus.HEALTHY.value)


def seal_secret(cp: ControlPlane, value: Any, purpose: str) -> str:
    """Encrypt a secret that must wait in the control DB for a later step (e.g. user passwords)."""
    return keys.wrap_key(cp.master_key, json.dumps(value).encode(), purpose)


def open_secret(cp: ControlPlane, sealed: str, purpose: str) -> Any:
    return json.loads(keys.unwrap_key(cp.master_key, sealed, purpose))


def record_fault(session: Any, instance_id: str, message: str, details: str = "") -> None:
    session.add(InstanceFault(instance_id=instance_id, message=message[:255], details=details))


#: What ``wait_ready`` polls: the instance's build state and its engine's reported status.
_WAIT_READY = (
    select(Instance.deleted, Instance.task, ServiceStatusRow.status)
    .outerjoin(ServiceStatusRow, ServiceStatusRow.instance_id == Instance.id)
    .where(Instance.id == bindparam("instance_id"))
)


class _RestoreWhenAsked:
    """The create's ``restore`` step (``RestoreStep``), passed over by the runner (``skip``)
    when the create names no backup: no transaction to run or record it."""

    def __init__(self, step: RestoreStep) -> None:
        self.step = step

    def __call__(self, ctx: Context) -> StepResult:
        return self.step(ctx)

    @staticmethod
    def skip(ctx: Context) -> bool:
        return not ctx.payload.get("restore")


class _WaitReady:
    """The create's ``wait_ready`` step, passed over when ``prepare`` found the instance
    ready already (a warm instance taken over)."""

    def __init__(self, step: Callable[[Context], StepResult]) -> None:
        self.step = step

    def __call__(self, ctx: Context) -> StepResult:
        return self.step(ctx)

    @staticmethod
    def skip(ctx: Context) -> bool:
        return bool(ctx.payload.get(READY_KEY))


class InstanceFlows:
    """Builds the create/delete flows bound to one control plane and compute driver."""

    def __init__(self, cp: ControlPlane, compute: ComputeDriver) -> None:
        self.cp = cp
        self.compute = compute
        self._restore = _RestoreWhenAsked(RestoreStep(cp))
        # A driver that can get ready for creates ahead (the local driver's zygote) does so in
        # the background, so the first create does not wait for it.
        warm = getattr(compute, "warm", None)
        if callable(warm):
            threading.Thread(target=warm, name="compute-warm", daemon=True).start()

    def flows(self) -> dict[str, Flow]:
        return {
            CREATE: Flow(
                CREATE,
                [
                    ("allocate", self.allocate),
                    ("create_server", self.create_server),
                    # A no-op unless the create restores a backup (restorePoint).
                    ("restore", self._restore),
                    ("prepare", self.prepare),
                    ("wait_ready", _WaitReady(self.wait_ready)),
                ],
                fail=self.create_failed,
            ),
            DELETE: Flow(
                DELETE,
                [("delete_server", self.delete_server), ("release", self.release)],
                fail=self.delete_failed,
                max_attempts=8,
            ),
        }

    # -- create ----------------------------------------------------------------------------------

    def _instance(self, ctx: Context) -> Instance:
        assert ctx.instance_id is not None
        with self.cp.session_factory() as session:
            inst = session.get(Instance, ctx.instance_id)
        if inst is None:
            raise OperationFailed(f"Instance {ctx.instance_id} no longer exists.")
        return inst

    def _ensure_still_building(self, inst: Instance) -> None:
        if inst.deleted or inst.task is not Task.BUILDING:
            raise OperationFailed(
                f"Instance {inst.id} is no longer being built (task {inst.task.value})."
            )

    def _building_row(self, session: Any, instance_id: str) -> Instance:
        """The instance's row in a step's recording transaction, checked to be still in BUILD
        (a delete may have come in since the step read it)."""
        row = session.get(Instance, instance_id)
        if row is None:
            raise OperationFailed(f"Instance {instance_id} no longer exists.")
        self._ensure_still_building(row)
        return row

    def allocate(self, ctx: Context) -> StepResult:
        inst = self._instance(ctx)
        self._ensure_still_building(inst)
        is_public = bool(inst.access.get("is_public"))

        # In the transaction that records the step: create_server (the next step) reads the
        # committed allocation.
        def write(session: Any) -> None:
            row = self._building_row(session, inst.id)
            private, public = self.compute.allocate_addresses(session, inst.id, is_public)
            row.compute_ref = {**row.compute_ref, "private": private, "public": public}
            ctx.payload["addresses"] = {"private": private, "public": public}

        ctx.record(write)
        return NEXT

    def create_server(self, ctx: Context) -> StepResult:
        assert ctx.instance_id is not None
        addresses = ctx.payload["addresses"]
        with self.cp.session_factory() as session:  # one read for the instance and its config
            inst = session.get(Instance, ctx.instance_id)
            if inst is None:
                raise OperationFailed(f"Instance {ctx.instance_id} no longer exists.")
            self._ensure_still_building(inst)
            guest_config = self.cp.guest_config(inst, addresses, session)
        spec = ServerSpec(
            instance_id=inst.id,
            guest_config=guest_config,
            is_public=addresses.get("public") is not None,
        )
        info = self.compute.create_server(spec)

        def write(session: Any) -> None:
            row = session.get(Instance, inst.id)
            if row is not None:
                row.compute_ref = {
                    **row.compute_ref,
                    "volume_dir": str(info.volume_dir),
                    "supervisor_pid": info.supervisor_pid,
                }

        ctx.record(write)
        return NEXT

    def prepare(self, ctx: Context) -> StepResult:
        inst = self._instance(ctx)
        self._ensure_still_building(inst)
        sealed = ctx.payload.get("sealed_users")
        users = open_secret(self.cp, sealed, f"users:{inst.id}") if sealed else []
        # A warm instance's own build starts its engine with no users; a create that took a
        # warm instance over (``warm_pool.claim``) starts here, and the agent adds the users then.
        warm = {"warm": True} if ctx.payload.get(WARM_KEY) else {}
        try:
            status = self.cp.guest(inst.id).call(
                "prepare",
                timeout=PREPARE_CALL_TIMEOUT,
                databases=ctx.payload.get("databases", []),
                users=users,
                **warm,
                **self._initial_overrides(inst),
            )
        except RemoteError as exc:
            raise OperationFailed(f"The database engine could not be prepared: {exc}") from exc
        except RpcTimeout as exc:
            # The guest may still be starting; the step is retried (prepare is idempotent) until
            # the operation's deadline.
            raise RuntimeError("the guest agent did not answer prepare in time") from exc
        # The users' passwords were only needed for this step.
        ctx.payload.pop("sealed_users", None)
        if ctx.payload.get(CLAIMED_KEY) and status in _READY_VALUES:
            # A warm instance taken over was running before its users were added: ready now, with
            # this step's record (``wait_ready`` is passed over).
            ctx.payload[READY_KEY] = True
            ctx.record(self._mark_ready(inst.id))
        # A driver that keeps ready copies of data directories (the local driver's templates)
        # replaces the one this create may have taken, in the background.
        refill = getattr(self.compute, "refill_templates", None)
        if callable(refill):
            refill()
        return NEXT

    def _initial_overrides(self, inst: Instance) -> dict[str, Any]:
        """For an instance created with a configuration group: its values and the names whose
        rules need a restart, so the engine is ACTIVE with them (``GuestAgent.prepare``)."""
        if inst.configuration_id is None:
            return {}
        with self.cp.session_factory() as session:
            values = groups.configuration_values_for_instance(session, inst.id)
            names = groups.restart_required_names(session, inst.datastore_version_id, list(values))
        return {"overrides": values, "restart_required": names}

    def wait_ready(self, ctx: Context) -> StepResult:
        assert ctx.instance_id is not None
        # A poll (the guest's report reaches the control DB through the conductor): one read
        # of the two rows' few columns; the outcome is written with the operation's end.
        with self.cp.session_factory() as session:
            building = session.execute(_WAIT_READY, {"instance_id": ctx.instance_id}).first()
        if building is None:
            raise OperationFailed(f"Instance {ctx.instance_id} no longer exists.")
        if building.deleted or building.task is not Task.BUILDING:
            raise OperationFailed(
                f"Instance {ctx.instance_id} is no longer being built (task {building.task.value})."
            )
        observed = building.status or ServiceStatus.NEW
        if observed in (ServiceStatus.FAILED, ServiceStatus.CRASHED):
            raise OperationFailed(f"The database engine reported {observed.value}.")
        if observed not in (ServiceStatus.RUNNING, ServiceStatus.HEALTHY):
            return Wait(0.05)
        # With the operation's end, in one transaction; still in BUILD is checked in it.
        ctx.record(self._mark_ready(ctx.instance_id))
        return NEXT

    def _mark_ready(self, instance_id: str) -> Callable[[Any], None]:
        def write(session: Any) -> None:
            row = self._building_row(session, instance_id)
            row.task = Task.NONE
            row.task_description = ""
            row.server_status = ServerStatus.ACTIVE
            LOG.info("instance %s is ready", instance_id)

        return write

    def create_failed(self, ctx: Context, failure: OperationFailed) -> None:
        if ctx.instance_id is None:
            return
        ctx.payload.pop("sealed_users", None)
        with transaction(self.cp.session_factory) as session:
            row = session.get(Instance, ctx.instance_id)
            if row is None or row.deleted or row.task is not Task.BUILDING:
                return
            timed_out = "in time" in failure.message
            row.task = Task.BUILDING_ERROR_TIMEOUT_GA if timed_out else Task.BUILDING_ERROR_GUEST
            row.task_description = failure.message[:255]
            row.server_status = ServerStatus.ERROR
            record_fault(session, row.id, failure.message, failure.details)
            # A create that failed gives its quota back with the state change, so a project is
            # not held to instances that never ran; deleting it later releases nothing twice.
            quotas.release(session, row.id)

    # -- delete ----------------------------------------------------------------------------------

    def delete_server(self, ctx: Context) -> StepResult:
        assert ctx.instance_id is not None
        self.compute.delete_server(ctx.instance_id)
        purge_unfinished_objects(self.cp, ctx.instance_id)
        return NEXT

    def release(self, ctx: Context) -> StepResult:
        assert ctx.instance_id is not None
        with transaction(self.cp.session_factory) as session:
            self.compute.release_addresses(session, ctx.instance_id)
            row = session.get(Instance, ctx.instance_id)
            if row is not None:
                row.deleted = True
                row.deleted_at = utcnow()
                row.server_status = ServerStatus.DELETED
                row.task = Task.NONE
            status = session.get(ServiceStatusRow, ctx.instance_id)
            if status is not None:
                status.status = ServiceStatus.DELETED
                status.updated_at = utcnow()
            quotas.release(session, ctx.instance_id)
        self.cp.forget_instance(ctx.instance_id)
        return NEXT

    def delete_failed(self, ctx: Context, failure: OperationFailed) -> None:
        if ctx.instance_id is None:
            return
        with transaction(self.cp.session_factory) as session:
            row = session.get(Instance, ctx.instance_id)
            if row is None:
                return
            row.task = Task.DELETING_ERROR
            row.task_description = failure.message[:255]
            record_fault(session, row.id, failure.message, failure.details)


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, CofferError):
        return exc.message
    return str(exc) or exc.__class__.__name__
