"""The runner's short polls, claims and leases, on a real SQLite control DB.

A step that polls (``Wait`` of at most ``INLINE_WAIT_MAX``) is run again by the same worker
instead of going back through ``claim``; the operation is still read between runs, so a
cancelled one stops, and a changed payload is written.
"""

from __future__ import annotations

import itertools
import logging
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from coffer.db import migrate
from coffer.db.models import Operation, utcnow
from coffer.db.session import make_engine, make_session_factory, transaction
from coffer.taskmanager.operations import (
    DONE,
    FAILED,
    INLINE_WAIT_BUDGET,
    LEASE_SECONDS,
    NEXT,
    RUNNING,
    Context,
    Flow,
    Runner,
    Wait,
    enqueue,
)


@pytest.fixture
def factory(tmp_path: Path) -> sessionmaker[Session]:
    engine = make_engine(f"sqlite:///{tmp_path / 'ops.db'}")
    migrate.upgrade(engine)
    return make_session_factory(engine)


def _op(factory: sessionmaker[Session], op_id: str) -> Operation:
    with factory() as session:
        op = session.get(Operation, op_id)
        assert op is not None
        return op


def _enqueue(factory: sessionmaker[Session], kind: str = "demo") -> str:
    with transaction(factory) as session:
        return enqueue(session, kind, None, {}).id


def test_a_short_poll_is_run_again_by_the_same_worker(
    factory: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[float] = []

    def poll(ctx: Context) -> Any:
        calls.append(time.monotonic())
        ctx.payload["polls"] = len(calls)
        return NEXT if len(calls) >= 4 else Wait(0.02)

    flow = Flow("demo", [("poll", poll), ("after", lambda ctx: NEXT)], fail=lambda c, f: None)
    op_id = _enqueue(factory)
    runner = Runner(factory, {"demo": flow})
    assert runner.claim() == [op_id]
    caplog.set_level(logging.INFO, logger="coffer.taskmanager.operations")
    # One call: no trip back through claim between the polls.
    assert runner.run_until_blocked(op_id) is None
    assert len(calls) == 4
    assert all(b - a >= 0.02 for a, b in itertools.pairwise(calls))
    op = _op(factory, op_id)
    assert op.state == DONE
    assert op.payload == {"polls": 4}
    done = [r.getMessage() for r in caplog.records if "done:" in r.getMessage()]
    assert len(done) == 1
    assert "demo in" in done[0] and "poll" in done[0] and "after" in done[0]


def test_a_long_wait_goes_back_to_the_queue(factory: sessionmaker[Session]) -> None:
    flow = Flow("demo", [("slow", lambda ctx: Wait(30))], fail=lambda c, f: None)
    op_id = _enqueue(factory)
    runner = Runner(factory, {"demo": flow})
    assert runner.claim() == [op_id]
    assert runner.run_until_blocked(op_id) == 30
    runner.defer(op_id, 30)
    assert 29 < runner.next_due(60) <= 30
    assert runner.claim() == []  # deferred
    runner.forget(op_id)
    assert runner.claim() == [op_id]


def test_polling_stops_within_its_budget(factory: sessionmaker[Session]) -> None:
    calls = {"n": 0}

    def forever(ctx: Context) -> Any:
        calls["n"] += 1
        return Wait(0)

    flow = Flow("demo", [("forever", forever)], fail=lambda c, f: None)
    op_id = _enqueue(factory)
    runner = Runner(factory, {"demo": flow})
    runner.claim()
    started = time.monotonic()
    assert runner.run_until_blocked(op_id) == 0
    assert time.monotonic() - started <= INLINE_WAIT_BUDGET + 2
    assert calls["n"] > 1
    assert _op(factory, op_id).state == RUNNING


def test_a_cancelled_operation_stops_polling(factory: sessionmaker[Session]) -> None:
    calls = {"n": 0}

    def poll(ctx: Context) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            # What reset_status does to an operation holding the instance.
            with transaction(factory) as session:
                op = session.get(Operation, ctx.op_id)
                assert op is not None
                op.state, op.lease_owner = FAILED, None
        return Wait(0.01)

    flow = Flow("demo", [("poll", poll)], fail=lambda c, f: None)
    op_id = _enqueue(factory)
    runner = Runner(factory, {"demo": flow})
    runner.claim()
    assert runner.run_until_blocked(op_id) is None
    assert calls["n"] == 2
    assert _op(factory, op_id).state == FAILED


def test_stopping_cuts_a_poll_short(factory: sessionmaker[Session]) -> None:
    flow = Flow("demo", [("poll", lambda ctx: Wait(0.4))], fail=lambda c, f: None)
    op_id = _enqueue(factory)
    runner = Runner(factory, {"demo": flow})
    runner.claim()
    runner.stopping.set()
    started = time.monotonic()
    assert runner.run_until_blocked(op_id) == 0.4
    assert time.monotonic() - started < 0.4


def test_claim_skips_what_runs_here_and_leases_are_renewed(
    factory: sessionmaker[Session],
) -> None:
    flow = Flow("demo", [("only", lambda ctx: NEXT)], fail=lambda c, f: None)
    first, second = _enqueue(factory), _enqueue(factory)
    runner = Runner(factory, {"demo": flow})
    assert runner.claim(exclude={first}) == [second]
    assert runner.claim(exclude={first, second}) == []
    assert runner.claim(limit=1) == [first]
    # An operation leased by another live taskmanager is neither claimed nor renewed here.
    with transaction(factory) as session:
        op = session.get(Operation, second)
        assert op is not None
        op.lease_owner = "elsewhere:1:x"
        op.lease_until = utcnow() + timedelta(seconds=5)
        mine = session.get(Operation, first)
        assert mine is not None
        mine.lease_until = utcnow() + timedelta(seconds=1)
    runner.renew_leases([first, second])
    left = (_op(factory, first).lease_until - utcnow()).total_seconds()  # type: ignore[operator]
    assert LEASE_SECONDS - 5 < left <= LEASE_SECONDS
    assert _op(factory, second).lease_owner == "elsewhere:1:x"
    assert (_op(factory, second).lease_until - utcnow()).total_seconds() < 6  # type: ignore[operator]
    assert runner.claim(exclude={first}) == []
