"""Long operations as durable, resumable state machines.

An operation is a row in ``operations`` naming its kind and the next step to run. A flow is an
ordered list of named steps; each step is idempotent, so a taskmanager that dies in the middle of
one simply runs it again. A step returns ``NEXT`` (advance), ``Wait(seconds)`` (run this step
again later, for polling), or raises:

* ``OperationFailed`` - a final failure with a message for the user; the flow's ``fail`` hook
  records it (instance ``fault``, ERROR task) and the operation ends ``failed``;
* any other exception - a transient fault: the step is retried with backoff until
  ``max_attempts``, then treated as ``OperationFailed``.

A step hands the writes that complete it to ``Context.record``: they commit in the transaction
that records its outcome, or not at all. A step object with a ``skip(ctx)`` method that answers
true is passed over for that operation, with no transaction.

Two taskmanagers never run one operation at once: an operation is *leased* (owner + expiry) in the
same transaction that reads it, and the lease is renewed before every step. A lease whose owner
died on this host (its pid is gone) is taken over at once; others expire after ``LEASE_SECONDS``.
"""

from __future__ import annotations

import copy
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Row, Table, bindparam, select, update
from sqlalchemy.orm import Session, sessionmaker

from coffer.db.models import Operation, utcnow
from coffer.db.session import transaction

LOG = logging.getLogger(__name__)

LEASE_SECONDS = 30.0
#: A step asking to run again within this many seconds is re-run by the same worker ...
INLINE_WAIT_MAX = 0.5
#: ... for at most this long in all; then it goes back to the queue like a longer wait.
INLINE_WAIT_BUDGET = 5.0
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

#: A write a step leaves to the transaction that records its outcome (``Context.record``).
Write = Callable[[Session], None]


@dataclass
class Context:
    """What a step sees: its operation's id, instance and payload (mutations are persisted)."""

    op_id: str
    instance_id: str | None
    payload: dict[str, Any]
    attempts: int
    #: Writes to make in the transaction that records the step's outcome (see ``record``).
    writes: list[Write] = field(default_factory=list)

    def record(self, write: Write) -> None:
        """Have ``write(session)`` run in the transaction that records this step's outcome
        (and the payload), instead of a transaction of the step's own: the step's writes and
        its completion commit together, and a create takes the control DB's write lock once
        per step. ``write`` may raise ``OperationFailed`` (nothing of it is kept, the operation
        fails); if the operation is no longer this runner's, nothing is written and the step
        runs again wherever it is resumed, so what ``write`` does must be safe to do again."""
        self.writes.append(write)

    def take_writes(self) -> list[Write]:
        writes, self.writes = self.writes, []
        return writes


Step = Callable[[Context], StepResult]


@dataclass
class Flow:
    kind: str
    steps: list[tuple[str, Step]]
    fail: Callable[[Context, OperationFailed], None]
    max_attempts: int = 5

    def step_names(self) -> list[str]:
        return [name for name, _ in self.steps]

    def next_index(self, index: int, ctx: Context) -> int:
        """The index of the step to run after step ``index``: steps that say, by a ``skip``
        method of theirs, that they have nothing to do for this operation (a create's
        ``restore`` when no backup is named) are passed over, so neither running nor
        recording them costs a transaction. ``len(steps)`` when none is left."""
        following = index + 1
        while following < len(self.steps):
            skip = getattr(self.steps[following][1], "skip", None)
            if not callable(skip) or not skip(ctx):
                break
            following += 1
        return following


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


@dataclass
class OpTimings:
    """Where one operation's time went, for its log line: how long it waited to be picked up,
    then per step the time from its first attempt until it completed (retries and waits
    included)."""

    kind: str
    created: datetime
    queued: float | None = None
    steps: dict[str, float] = field(default_factory=dict)
    _first_attempt: dict[str, float] = field(default_factory=dict)

    def begin(self, step: str) -> None:
        if self.queued is None:
            self.queued = max(0.0, (utcnow() - self.created).total_seconds())
        self._first_attempt.setdefault(step, time.monotonic())

    def end(self, step: str) -> None:
        self.steps[step] = time.monotonic() - self._first_attempt.get(step, time.monotonic())

    def describe(self) -> str:
        total = (utcnow() - self.created).total_seconds()
        parts = ", ".join(f"{name} {seconds:.3f}" for name, seconds in self.steps.items())
        return (
            f"{self.kind} in {total:.3f} s since recorded "
            f"(picked up after {self.queued or 0.0:.3f} s; steps, s: {parts})"
        )


_OPERATIONS = cast(Table, Operation.__table__)
#: The guarded UPDATE that records a step's outcome (``Runner._record``).
_RECORD = update(_OPERATIONS).where(
    _OPERATIONS.c.id == bindparam("op_id"),
    _OPERATIONS.c.lease_owner == bindparam("owner"),
    _OPERATIONS.c.state.in_((PENDING, RUNNING)),
)


class _NotOurs(Exception):
    """The operation was taken over or ended elsewhere: roll the step's record back."""


@dataclass
class _Current:
    """The step a worker is about to run, its flow, context and the operation's deadline."""

    flow: Flow
    step_name: str
    ctx: Context
    deadline: datetime | None


class Runner:
    """Claims runnable operations and drives them through their flows.

    Each step boundary is one transaction: the step's own writes (``Context.record``), then
    one guarded UPDATE of the operation with its payload, the next step's name and a renewed
    lease; steps that have nothing to do (``Flow.next_index``) are passed over. A step that
    asks to run again soon (``Wait`` of at most ``INLINE_WAIT_MAX`` s, a poll) is run again by
    the same worker, up to ``INLINE_WAIT_BUDGET`` s in all, without going back through
    ``claim``; in between, the operation is only read (is it still ours?), and written only
    when the step changed its payload or recorded writes, or the lease is a third used up.
    ``stopping`` (set by the taskmanager) cuts those waits short.
    """

    def __init__(self, session_factory: sessionmaker[Session], flows: dict[str, Flow]) -> None:
        self.session_factory = session_factory
        self.flows = flows
        self.owner = owner_id()
        self.stopping = threading.Event()
        self._not_before: dict[str, float] = {}
        #: Per operation run here: when it was recorded and each step's time (for the log).
        self._timings: dict[str, OpTimings] = {}

    # -- claiming --------------------------------------------------------------------------------

    def claim(self, limit: int = 8, exclude: Collection[str] = ()) -> list[str]:
        """Lease up to ``limit`` runnable operations, not those in ``exclude`` (already being
        run here); return their ids."""
        query = (
            select(
                Operation.id,
                Operation.kind,
                Operation.step,
                Operation.lease_owner,
                Operation.lease_until,
            )
            .where(Operation.state.in_((PENDING, RUNNING)))
            .order_by(Operation.created)
            .limit(200)
        )
        # A look first, without the write lock (the dispatch loop asks after every step that
        # waits or ends, mostly to find nothing new); the claim itself reads again under it.
        with self.session_factory() as session:
            if not self._claimable(session.execute(query).all(), limit, exclude):
                return []
        claimed: list[str] = []
        with transaction(self.session_factory) as session:
            # Row locks keep two taskmanagers on PostgreSQL/MariaDB from claiming one
            # operation; SQLite is serialised by BEGIN IMMEDIATE instead.
            rows = session.execute(query.with_for_update(skip_locked=True)).all()
            now = utcnow()
            for op_id, kind, step, lease_owner in self._claimable(rows, limit, exclude):
                if lease_owner not in (None, self.owner):
                    LOG.info(
                        "taking over operation %s (%s, step %s) from %s",
                        op_id,
                        kind,
                        step,
                        lease_owner,
                    )
                claimed.append(op_id)
                self._not_before.pop(op_id, None)
            if claimed:
                session.execute(
                    update(Operation)
                    .where(Operation.id.in_(claimed))
                    .values(
                        lease_owner=self.owner,
                        lease_until=now + timedelta(seconds=LEASE_SECONDS),
                        state=RUNNING,
                    )
                    .execution_options(synchronize_session=False)
                )
        return claimed

    def _claimable(
        self,
        rows: Sequence[Row[str, str, str, str | None, datetime | None]],
        limit: int,
        exclude: Collection[str],
    ) -> list[tuple[str, str, str, str | None]]:
        """``(id, kind, step, lease owner)`` of the rows this runner may claim now."""
        now = utcnow()
        mono = time.monotonic()
        found: list[tuple[str, str, str, str | None]] = []
        for op_id, kind, step, lease_owner, lease_until in rows:
            if len(found) >= limit:
                break
            if op_id in exclude or mono < self._not_before.get(op_id, 0.0):
                continue
            held_by_other = (
                lease_owner not in (None, self.owner)
                and lease_until is not None
                and lease_until >= now
            )
            if held_by_other and not _owner_dead(lease_owner or ""):
                continue
            found.append((op_id, kind, step, lease_owner))
        return found

    def renew_leases(self, op_ids: Collection[str]) -> None:
        """Extend the leases of operations being run here (a step may take longer than a
        lease, e.g. a prepare call), so no other taskmanager takes them over meanwhile."""
        if not op_ids:
            return
        with transaction(self.session_factory) as session:
            session.execute(
                update(Operation)
                .where(
                    Operation.id.in_(list(op_ids)),
                    Operation.lease_owner == self.owner,
                    Operation.state.in_((PENDING, RUNNING)),
                )
                .values(lease_until=utcnow() + timedelta(seconds=LEASE_SECONDS))
                .execution_options(synchronize_session=False)
            )

    def _renew(self, session: Session, op: Operation) -> bool:
        if op.lease_owner != self.owner:
            return False
        op.lease_until = utcnow() + timedelta(seconds=LEASE_SECONDS)
        return True

    def _ours(self, op: Operation | None) -> bool:
        return op is not None and op.state in (PENDING, RUNNING) and op.lease_owner == self.owner

    def _current(self, session: Session, op: Operation) -> _Current | None:
        """The step ``op`` is at (its flow resolved); None when its kind is unknown (failed)."""
        flow = self.flows.get(op.kind)
        if flow is None:
            op.state = FAILED
            op.error = f"unknown operation kind {op.kind!r}"
            return None
        if op.step == "start":
            op.step = flow.step_names()[0]
        self._timings.setdefault(op.id, OpTimings(op.kind, op.created))
        ctx = Context(op.id, op.instance_id, dict(op.payload or {}), op.attempts)
        return _Current(flow, op.step, ctx, op.deadline)

    # -- running ---------------------------------------------------------------------------------

    def _begin(self, op_id: str) -> _Current | None:
        """The step a claimed operation is at. Just claimed (its lease mostly left), the
        operation is only read; otherwise its lease is renewed as it is read."""
        with self.session_factory() as session:
            op = session.get(Operation, op_id)
            if op is None or not self._ours(op):
                return None
            lease_left = (op.lease_until - utcnow()).total_seconds() if op.lease_until else 0.0
            if lease_left > LEASE_SECONDS * 2 / 3:
                return self._current(session, op)
        with transaction(self.session_factory) as session:
            op = session.get(Operation, op_id)
            if op is None or not self._ours(op):
                return None
            self._renew(session, op)
            return self._current(session, op)

    def run_until_blocked(self, op_id: str) -> float | None:
        """Run steps of one claimed operation until it ends or waits; return the wait (seconds)."""
        current = self._begin(op_id)
        if current is None:
            self._timings.pop(op_id, None)
            return None
        inline_until = time.monotonic() + INLINE_WAIT_BUDGET
        while current is not None:
            flow, step_name, ctx = current.flow, current.step_name, current.ctx
            names = flow.step_names()
            timings = self._timings.setdefault(op_id, OpTimings(flow.kind, utcnow()))
            step = dict(flow.steps)[step_name]
            timings.begin(step_name)
            payload_before = copy.deepcopy(ctx.payload)
            try:
                deadline = current.deadline
                if deadline is not None and utcnow() > deadline and step_name != names[-1]:
                    raise OperationFailed(
                        f"The operation did not finish in time (during step {step_name})."
                    )
                result = step(ctx)
            except OperationFailed as failure:
                ctx.writes.clear()
                self._finish_failed(op_id, flow, ctx, failure)
                return None
            except Exception as exc:  # transient: retry with backoff
                ctx.writes.clear()
                return self._step_error(op_id, flow, step_name, ctx, exc)
            if (
                isinstance(result, Wait)
                and result.seconds <= INLINE_WAIT_MAX
                and time.monotonic() + result.seconds <= inline_until
                and not self.stopping.is_set()
            ):
                try:
                    ours = self._checkpoint(op_id, ctx, ctx.payload != payload_before)
                except OperationFailed as failure:
                    self._finish_failed(op_id, flow, ctx, failure)
                    return None
                if not ours:
                    self._timings.pop(op_id, None)
                    return None
                if self.stopping.wait(result.seconds):
                    return result.seconds
                continue
            writes = ctx.take_writes()
            following = flow.next_index(names.index(step_name), ctx)
            last = following >= len(names)
            values: dict[str, Any] = {}
            if isinstance(result, Wait):
                pass
            elif last:
                values = {"state": DONE, "step": "done", "lease_owner": None}
            else:
                values = {
                    "step": names[following],
                    "lease_until": utcnow() + timedelta(seconds=LEASE_SECONDS),
                }
            if not isinstance(result, Wait):
                values.update(attempts=0, error=None)
            try:
                ours = self._record(op_id, ctx, writes, values)
            except OperationFailed as failure:
                self._finish_failed(op_id, flow, ctx, failure)
                return None
            except Exception as exc:
                if not writes:
                    raise
                # The step's writes failed (an address pool used up, say): nothing of the
                # step was recorded, so it is retried like a step that failed.
                return self._step_error(op_id, flow, step_name, ctx, exc)
            if not ours:
                self._timings.pop(op_id, None)
                return None
            if isinstance(result, Wait):
                return result.seconds
            timings.end(step_name)
            if last:
                current = None
            else:
                ctx = Context(op_id, ctx.instance_id, ctx.payload, 0)
                current = _Current(flow, names[following], ctx, current.deadline)
                inline_until = time.monotonic() + INLINE_WAIT_BUDGET
        self._log_done(op_id)
        return None

    def _checkpoint(self, op_id: str, ctx: Context, payload_changed: bool) -> bool:
        """Between two runs of a polling step in one worker: is the operation still ours?
        Writes (the payload, a renewed lease, what the step ``record``ed) only when there is
        something to write."""
        with self.session_factory() as session:
            op = session.get(Operation, op_id)
            if op is None or not self._ours(op):
                return False
            lease_left = (op.lease_until - utcnow()).total_seconds() if op.lease_until else 0.0
        if not payload_changed and not ctx.writes and lease_left > LEASE_SECONDS * 2 / 3:
            return True
        lease = utcnow() + timedelta(seconds=LEASE_SECONDS)
        return self._record(op_id, ctx, ctx.take_writes(), {"lease_until": lease})

    def _record(
        self, op_id: str, ctx: Context, writes: Sequence[Write], values: dict[str, Any]
    ) -> bool:
        """One transaction: the step's ``writes``, then the payload and ``values`` onto the
        operation, if it is still this runner's (one guarded UPDATE, no read); False, with
        nothing written, when it is not."""
        try:
            with transaction(self.session_factory) as session:
                for write in writes:
                    write(session)
                session.flush()  # the writes' ORM changes, before the operation's row
                # On the table, not the mapped class: no ORM bulk-update machinery for one row.
                changed = session.connection().execute(
                    _RECORD.values(payload=ctx.payload, **values),
                    {"op_id": op_id, "owner": self.owner},
                )
                if changed.rowcount != 1:
                    raise _NotOurs
        except _NotOurs:
            return False
        return True

    def _step_error(
        self, op_id: str, flow: Flow, step_name: str, ctx: Context, exc: Exception
    ) -> float | None:
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

    def _log_done(self, op_id: str) -> None:
        timings = self._timings.pop(op_id, None)
        if timings is not None:
            LOG.info("operation %s done: %s", op_id, timings.describe())

    def _finish_failed(
        self, op_id: str, flow: Flow, ctx: Context, failure: OperationFailed
    ) -> None:
        LOG.warning("operation %s (%s) failed: %s", op_id, flow.kind, failure.message)
        self._timings.pop(op_id, None)
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

    def next_due(self, longest: float) -> float:
        """Seconds until an operation deferred here may run again (at most ``longest``)."""
        now = time.monotonic()
        soonest = longest
        for op_id, at in list(self._not_before.items()):
            if at > now:
                soonest = min(soonest, at - now)
            elif at < now - LEASE_SECONDS:
                self._not_before.pop(op_id, None)  # ended elsewhere; nothing to wait for
        return soonest
