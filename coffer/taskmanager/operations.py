"""Long operations as durable, resumable state machines.

An operation is a row in ``operations`` naming its kind and the next step to run. A flow is an
ordered list of named steps; each step is idempotent, so a taskmanager that dies in the middle of
one simply runs it again. A step returns ``NEXT`` (advance), ``Wait(seconds)`` (run this step
again later, for polling), or raises:

* ``OperationFailed`` - a final failure with a message for the user; the flow's ``fail`` hook
  records it (instance ``fault``, ERROR task) and the operation ends ``failed``;
* any other exception - a transient fault: the step is retried with backoff until
  ``max_attempts``, then treated as ``OperationFailed``.

Two taskmanagers never run one operation at once: an operation is *leased* (owner + expiry) in the
same transaction that reads it, and the lease is renewed before every step. A lease whose owner
died on this host (its pid is gone) is taken over at once; others expire after ``LEASE_SECONDS``.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from coffer.db.models import Operation, utcnow
from coffer.db.session import transaction

LOG = logging.getLogger(__name__)

LEASE_SECONDS = 30.0
PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"


class OperationFailed(Exception):
    """A final failure of an operation, with a message fit for the instance's ``fault``."""

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.details = details


@dataclass(frozen=True)
class Wait:
    """Run the same step again after ``seconds``."""

    seconds: float


NEXT = object()
StepResult = Any  # NEXT or Wait


@dataclass
class Context:
    """What a step sees: its operation's id, instance and payload (mutations are persisted)."""

    op_id: str
    instance_id: str | None
    payload: dict[str, Any]
    attempts: int


Step = Callable[[Context], StepResult]


@dataclass
class Flow:
    kind: str
    steps: list[tuple[str, Step]]
    fail: Callable[[Context, OperationFailed], None]
    max_attempts: int = 5

    def step_names(self) -> list[str]:
        return [name for name, _ in self.steps]


def owner_id() -> str:
    """``host:pid:random``: the pid lets a successor on the same host see the owner is dead."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def _owner_dead(owner: str) -> bool:
    """True when ``owner`` ran on this host and its process is gone."""
    host, _, rest = owner.partition(":")
    if host != socket.gethostname():
        return False
    pid_text = rest.split(":", 1)[0]
    if not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def enqueue(
    session: Session,
    kind: str,
    instance_id: str | None,
    payload: dict[str, Any],
    deadline: datetime | None = None,
) -> Operation:
    """Record a new operation in the caller's transaction (committed with the desired state)."""
    op = Operation(
        kind=kind, instance_id=instance_id, payload=payload, state=PENDING, deadline=deadline
    )
    op.step = "start"
    session.add(op)
    session.flush()
    return op


class Runner:
    """Claims runnable operations and drives them through their flows."""

    def __init__(self, session_factory: sessionmaker[Session], flows: dict[str, Flow]) -> None:
        self.session_factory = session_factory
        self.flows = flows
        self.owner = owner_id()
        self._not_before: dict[str, float] = {}

    # -- claiming --------------------------------------------------------------------------------

    def claim(self, limit: int = 8) -> list[str]:
        """Lease up to ``limit`` runnable operations; return their ids."""
        now = utcnow()
        claimed: list[str] = []
        with transaction(self.session_factory) as session:
            rows = session.scalars(
                select(Operation)
                .where(Operation.state.in_((PENDING, RUNNING)))
                .order_by(Operation.created)
                .limit(200)
                # Row locks keep two taskmanagers on PostgreSQL/MariaDB from claiming one
                # operation; SQLite is serialised by BEGIN IMMEDIATE instead.
                .with_for_update(skip_locked=True)
            ).all()
            for op in rows:
                if len(claimed) >= limit:
                    break
                if time.monotonic() < self._not_before.get(op.id, 0.0):
                    continue
                held_by_other = (
                    op.lease_owner not in (None, self.owner)
                    and op.lease_until is not None
                    and op.lease_until >= now
                )
                if held_by_other and not _owner_dead(op.lease_owner or ""):
                    continue
                if op.lease_owner not in (None, self.owner):
                    LOG.info(
                        "taking over operation %s (%s, step %s) from %s",
                        op.id,
                        op.kind,
                        op.step,
                        op.lease_owner,
                    )
                op.lease_owner = self.owner
                op.lease_until = now + timedelta(seconds=LEASE_SECONDS)
                op.state = RUNNING
                claimed.append(op.id)
        return claimed

    def _renew(self, session: Session, op: Operation) -> bool:
        if op.lease_owner != self.owner:
            return False
        op.lease_until = utcnow() + timedelta(seconds=LEASE_SECONDS)
        return True

    # -- running ---------------------------------------------------------------------------------

    def run_until_blocked(self, op_id: str) -> float | None:
        """Run steps of one claimed operation until it ends or waits; return the wait (seconds)."""
        while True:
            with transaction(self.session_factory) as session:
                op = session.get(Operation, op_id)
                if op is None or op.state not in (PENDING, RUNNING):
                    return None
                if not self._renew(session, op):
                    return None
                flow = self.flows.get(op.kind)
                if flow is None:
                    op.state = FAILED
                    op.error = f"unknown operation kind {op.kind!r}"
                    return None
                names = flow.step_names()
                if op.step == "start":
                    op.step = names[0]
                step_name = op.step
                ctx = Context(op.id, op.instance_id, dict(op.payload or {}), op.attempts)
                deadline = op.deadline
            step = dict(flow.steps)[step_name]
            try:
                if deadline is not None and utcnow() > deadline and step_name != names[-1]:
                    raise OperationFailed(
                        f"The operation did not finish in time (during step {step_name})."
                    )
                result = step(ctx)
            except OperationFailed as failure:
                self._finish_failed(op_id, flow, ctx, failure)
                return None
            except Exception as exc:  # transient: retry with backoff
                attempts = ctx.attempts + 1
                LOG.warning(
                    "operation %s step %s failed (attempt %d/%d): %s",
                    op_id,
                    step_name,
                    attempts,
                    flow.max_attempts,
                    exc,
                    exc_info=LOG.isEnabledFor(logging.DEBUG),
                )
                if attempts >= flow.max_attempts:
                    self._finish_failed(
                        op_id,
                        flow,
                        ctx,
                        OperationFailed(f"Step {step_name} kept failing: {exc}", repr(exc)),
                    )
                    return None
                with transaction(self.session_factory) as session:
                    op = session.get(Operation, op_id)
                    if op is not None:
                        op.attempts = attempts
                        op.payload = ctx.payload
                        op.error = str(exc)
                return min(0.5 * 2**attempts, 10.0)
            with transaction(self.session_factory) as session:
                op = session.get(Operation, op_id)
                if op is None:
                    return None
                op.payload = ctx.payload
                if isinstance(result, Wait):
                    return result.seconds
                idx = names.index(step_name)
                op.attempts = 0
                op.error = None
                if idx + 1 >= len(names):
                    op.state = DONE
                    op.step = "done"
                    op.lease_owner = None
                    return None
                op.step = names[idx + 1]

    def _finish_failed(
        self, op_id: str, flow: Flow, ctx: Context, failure: OperationFailed
    ) -> None:
        LOG.warning("operation %s (%s) failed: %s", op_id, flow.kind, failure.message)
        try:
            flow.fail(ctx, failure)
        finally:
            with transaction(self.session_factory) as session:
                op = session.get(Operation, op_id)
                if op is not None:
                    op.state = FAILED
                    op.error = failure.message
                    op.payload = ctx.payload
                    op.lease_owner = None

    def defer(self, op_id: str, seconds: float) -> None:
        self._not_before[op_id] = time.monotonic() + seconds

    def forget(self, op_id: str) -> None:
        self._not_before.pop(op_id, None)
