"""The durable operation runner, on a real SQLite control DB."""

from __future__ import annotations

import socket
import subprocess
import sys
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
    NEXT,
    Context,
    Flow,
    OperationFailed,
    Runner,
    Wait,
    enqueue,
)


@pytest.fixture
def factory(tmp_path: Path) -> sessionmaker[Session]:
    engine = make_engine(f"sqlite:///{tmp_path / 'ops.db'}")
    migrate.upgrade(engine)
    return make_session_factory(engine)


def _run_all(runner: Runner, rounds: int = 50) -> None:
    for _ in range(rounds):
        ids = runner.claim()
        if not ids:
            return
        for op_id in ids:
            runner.run_until_blocked(op_id)


def _op(factory: sessionmaker[Session], op_id: str) -> Operation:
    with factory() as session:
        op = session.get(Operation, op_id)
        assert op is not None
        return op


def test_steps_run_in_order_and_payload_persists(factory: sessionmaker[Session]) -> None:
    seen: list[str] = []

    def first(ctx: Context) -> Any:
        seen.append("first")
        ctx.payload["x"] = 1
        return NEXT

    def second(ctx: Context) -> Any:
        seen.append(f"second x={ctx.payload['x']}")
        return NEXT

    flow = Flow("demo", [("first", first), ("second", second)], fail=lambda c, f: None)
    with transaction(factory) as session:
        op_id = enqueue(session, "demo", None, {}).id
    _run_all(Runner(factory, {"demo": flow}))
    assert seen == ["first", "second x=1"]
    op = _op(factory, op_id)
    assert op.state == DONE
    assert op.payload == {"x": 1}


def test_transient_errors_retry_then_fail_with_hook(factory: sessionmaker[Session]) -> None:
    failures: list[str] = []

    def flaky(ctx: Context) -> Any:
        raise RuntimeError("broker unreachable")

    flow = Flow(
        "demo", [("flaky", flaky)], fail=lambda c, f: failures.append(f.message), max_attempts=3
    )
    with transaction(factory) as session:
        op_id = enqueue(session, "demo", None, {}).id
    runner = Runner(factory, {"demo": flow})
    for _ in range(3):
        assert runner.claim() == [op_id]
        runner.run_until_blocked(op_id)
    op = _op(factory, op_id)
    assert op.state == FAILED
    assert failures and "broker unreachable" in failures[0]


def test_final_failure_runs_hook_once(factory: sessionmaker[Session]) -> None:
    failures: list[str] = []

    def bad(ctx: Context) -> Any:
        raise OperationFailed("engine refused to start")

    flow = Flow("demo", [("bad", bad)], fail=lambda c, f: failures.append(f.message))
    with transaction(factory) as session:
        enqueue(session, "demo", None, {})
    _run_all(Runner(factory, {"demo": flow}))
    assert failures == ["engine refused to start"]


def test_wait_reruns_the_same_step(factory: sessionmaker[Session]) -> None:
    calls = {"n": 0}

    def poll(ctx: Context) -> Any:
        calls["n"] += 1
        return NEXT if calls["n"] >= 3 else Wait(0)

    flow = Flow("demo", [("poll", poll)], fail=lambda c, f: None)
    with transaction(factory) as session:
        op_id = enqueue(session, "demo", None, {}).id
    _run_all(Runner(factory, {"demo": flow}))
    assert calls["n"] == 3
    assert _op(factory, op_id).state == DONE


def test_deadline_fails_the_operation(factory: sessionmaker[Session]) -> None:
    failures: list[str] = []
    flow = Flow(
        "demo",
        [("poll", lambda ctx: Wait(0)), ("last", lambda ctx: NEXT)],
        fail=lambda c, f: failures.append(f.message),
    )
    with transaction(factory) as session:
        op_id = enqueue(session, "demo", None, {}, deadline=utcnow() - timedelta(seconds=1)).id
    _run_all(Runner(factory, {"demo": flow}))
    assert _op(factory, op_id).state == FAILED
    assert failures and "did not finish in time" in failures[0]


def test_lease_of_a_dead_process_is_taken_over_at_once(factory: sessionmaker[Session]) -> None:
    # A real process that has exited: its pid is free, so its lease means nothing.
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    dead_owner = f"{socket.gethostname()}:{proc.stdout.strip()}:0"
    flow = Flow("demo", [("only", lambda ctx: NEXT)], fail=lambda c, f: None)
    with transaction(factory) as session:
        op = enqueue(session, "demo", None, {})
        op.state = "running"
        op.lease_owner = dead_owner
        op.lease_until = utcnow() + timedelta(hours=1)
        op_id = op.id
    runner = Runner(factory, {"demo": flow})
    assert runner.claim() == [op_id]
    runner.run_until_blocked(op_id)
    assert _op(factory, op_id).state == DONE


def test_live_lease_of_another_owner_is_respected(factory: sessionmaker[Session]) -> None:
    flow = Flow("demo", [("only", lambda ctx: NEXT)], fail=lambda c, f: None)
    with transaction(factory) as session:
        op = enqueue(session, "demo", None, {})
        op.state = "running"
        op.lease_owner = "another-host:1:0"
        op.lease_until = utcnow() + timedelta(hours=1)
    assert Runner(factory, {"demo": flow}).claim() == []
