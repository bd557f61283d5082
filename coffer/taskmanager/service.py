"""``coffer taskmanager``: runs every long operation and keeps the world matching the control DB.

Work arrives two ways: a ``wake`` cast on the ``taskmanager`` topic after the API records an
operation (fast path), and a poll of the ``operations`` table (so a lost cast or a restarted
taskmanager loses nothing). At start it reconciles: servers of live instances are restarted if
they are gone, and servers, directories and addresses that belong to no live instance are removed.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from sqlalchemy import select

from coffer.bus.envelope import StaticKeyRing
from coffer.bus.rpc import RpcServer
from coffer.compute.base import ComputeDriver
from coffer.controlplane import CONTROL_KEY_ID, TASKMANAGER_TOPIC, ControlPlane
from coffer.db.models import AddressAllocation, Instance, Operation
from coffer.db.session import transaction
from coffer.status import ServerStatus, Task
from coffer.taskmanager.backups import BackupFlows
from coffer.taskmanager.day2 import Day2Flows
from coffer.taskmanager.instances import InstanceFlows
from coffer.taskmanager.operations import LEASE_SECONDS, PENDING, RUNNING, Runner
from coffer.taskmanager.schedules import Scheduler
from coffer.taskmanager.warm_pool import WarmPool

LOG = logging.getLogger(__name__)

POLL_SECONDS = 1.0
#: Seconds after start when the objects made so far (modules, the API's app, caches) are
#: moved out of the collector's way (``_freeze_heap``).
FREEZE_AFTER = 2.0
#: Operations run at once. A create holds its worker while its guest prepares (an RPC call),
#: so this bounds how many creates make progress together; threads mostly wait on I/O.
WORKERS = 32


def _freeze_heap() -> None:
    """Collect once, then keep what is left out of later collections (``gc.freeze``).

    A control-plane process holds a few hundred thousand long-lived objects (SQLAlchemy,
    pydantic, kombu, the API's app); each full collection walked them all, ~0.13 s of CPU
    that landed in the middle of whatever was running (measured: one in three bursts of ten
    creates had one). After the freeze a full collection walks only what was made since.
    Garbage made before the freeze is collected first; objects frozen are freed as usual
    when their last reference goes, only reference cycles among them are not looked for."""
    global _frozen
    with _freeze_lock:
        if _frozen:  # once per process (a test suite starts many taskmanagers)
            return
        _frozen = True
    gc.collect()
    gc.freeze()


_frozen = False
_freeze_lock = threading.Lock()


class TaskManager:
    """The taskmanager service. ``start()`` runs it in background threads; ``stop()`` ends it."""

    rpc_methods = frozenset({"wake"})

    def __init__(self, cp: ControlPlane, compute: ComputeDriver, workers: int = WORKERS) -> None:
        self.cp = cp
        self.compute = compute
        self.day2 = Day2Flows(cp, compute)
        self.warm_pool = WarmPool(cp)
        self.runner = Runner(
            cp.session_factory,
            {
                **InstanceFlows(cp, compute).flows(),
                **self.day2.flows(),
                **BackupFlows(cp).flows(),
            },
        )
        self.schedules = Scheduler(cp.session_factory, cp.settings, wake=self.wake)
        self._workers = workers
        self._renewed_at = 0.0
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tm-op")
        self._inflight: dict[str, Future[None]] = {}
        self._inflight_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._server: RpcServer | None = None

    # -- RPC endpoint ----------------------------------------------------------------------------

    def wake(self, op_id: str | None = None) -> None:
        """Something was enqueued: look at the operations table now instead of at the next poll."""
        if op_id:
            self.runner.forget(op_id)
        self._wake.set()

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self.reconcile()
        self._server = RpcServer(
            self.cp.bus_url,
            TASKMANAGER_TOPIC,
            self,
            StaticKeyRing({CONTROL_KEY_ID: self.cp.control_key}),
        )
        self._server.start()
        self._thread = threading.Thread(target=self._loop, name="taskmanager", daemon=True)
        self._thread.start()
        freeze = threading.Timer(FREEZE_AFTER, _freeze_heap)
        freeze.daemon = True
        freeze.start()
        LOG.info("taskmanager started (owner %s)", self.runner.owner)

    def stop(self) -> None:
        self._stop.set()
        self.runner.stopping.set()
        self._wake.set()
        if self._server is not None:
            self._server.stop()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- the loop --------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._dispatch()
            except Exception:
                LOG.exception("taskmanager loop error; continuing")
            try:
                # Configuration groups changed since they were applied get applied again.
                if self.day2.converge_if_due():
                    self._wake.set()
            except Exception:
                LOG.exception("could not check configuration groups; will try again")
            try:
                # Warm instances ([compute] redis_warm_pool) topped up while no tenant create waits.
                if self.warm_pool.maintain_if_due():
                    self._wake.set()
            except Exception:
                LOG.exception("could not look after the warm instances; will try again")
            try:
                # Backup schedules: due slots run, finished runs get their retention applied.
                self.schedules.tick_if_due()
            except Exception:
                LOG.exception("could not run backup schedules; will try again")
            self._wake.wait(timeout=self._next_wait())
            self._wake.clear()

    def _next_wait(self) -> float:
        # Workers keep their operations through short polls (see Runner), and wake the loop
        # when one ends or waits longer; the loop need only look again when a deferred
        # operation is due, or at the poll that catches what no wake announced.
        return max(0.01, self.runner.next_due(POLL_SECONDS))

    def _dispatch(self) -> None:
        with self._inflight_lock:
            done = [op_id for op_id, fut in self._inflight.items() if fut.done()]
            for op_id in done:
                self._inflight.pop(op_id)
            busy = set(self._inflight)
        now = time.monotonic()
        if busy and now - self._renewed_at >= LEASE_SECONDS / 3:
            self.runner.renew_leases(busy)
            self._renewed_at = now
        free = self._workers - len(busy)
        if free <= 0:
            return
        for op_id in self.runner.claim(limit=free, exclude=busy):
            if self._stop.is_set():
                continue
            with self._inflight_lock:
                self._inflight[op_id] = self._pool.submit(self._run, op_id)

    def _run(self, op_id: str) -> None:
        try:
            wait = self.runner.run_until_blocked(op_id)
        except Exception:
            LOG.exception("operation %s crashed its worker; it will be retried", op_id)
            wait = 1.0
        if wait is not None:
            self.runner.defer(op_id, wait)
        self._wake.set()

    # -- reconciliation ----------------------------------------------------------------------------

    def reconcile(self) -> None:
        """Make running servers match the control DB (run at start; safe to run any time)."""
        with self.cp.session_factory() as session:
            live = {
                row.id: row
                for row in session.scalars(select(Instance).where(Instance.deleted.is_(False)))
            }
            pending_ops = {
                op.instance_id
                for op in session.scalars(
                    select(Operation).where(Operation.state.in_((PENDING, RUNNING)))
                )
            }
        for instance_id in self.compute.list_servers():
            if instance_id not in live:
                LOG.warning("removing orphaned server %s (no live instance owns it)", instance_id)
                try:
                    self.compute.delete_server(instance_id)
                except Exception:
                    LOG.exception("could not remove orphaned server %s", instance_id)
        for instance_id, inst in live.items():
            if instance_id in pending_ops or inst.task not in (Task.NONE, Task.RESTART_REQUIRED):
                continue
            if inst.server_status is not ServerStatus.ACTIVE:
                continue
            try:
                self.compute.ensure_running(instance_id)
            except Exception:
                LOG.exception("could not restart the server of instance %s", instance_id)
        with transaction(self.cp.session_factory) as session:
            for alloc in session.scalars(select(AddressAllocation)).all():
                if alloc.instance_id not in live:
                    LOG.warning("releasing orphaned address %s", alloc.address)
                    session.delete(alloc)
