"""What a burst of creates leans on in the control plane, on a real SQLite control DB: steps
whose writes commit with their outcome (``Context.record``), steps that record nothing
(``SKIPPED``), the process's write gate, and the ready-copies check that spares a zygote fork
per create."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from coffer.compute.local import LocalCompute
from coffer.config import load_settings
from coffer.db import migrate
from coffer.db.models import Operation
from coffer.db.session import WriteGate, make_engine, make_session_factory, transaction
from coffer.guest.datastores.template import MARKER, SPARES, SPARES_DIR
from coffer.taskmanager.operations import (
    DONE,
    FAILED,
    NEXT,
    Context,
    Flow,
    OperationFailed,
    Runner,
    enqueue,
)


@pytest.fixture
def factory(tmp_path: Path) -> sessionmaker[Session]:
    engine = make_engine(f"sqlite:///{tmp_path / 'ops.db'}")
    migrate.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE notes (op TEXT, note TEXT)"))
    return make_session_factory(engine)


def _note(op_id: str, note: str) -> Any:
    def write(session: Session) -> None:
        session.execute(
            text("INSERT INTO notes (op, note) VALUES (:op, :note)"), {"op": op_id, "note": note}
        )

    return write


def _notes(factory: sessionmaker[Session]) -> list[str]:
    with factory() as session:
        return [row[0] for row in session.execute(text("SELECT note FROM notes ORDER BY note"))]


def _op(factory: sessionmaker[Session], op_id: str) -> Operation:
    with factory() as session:
        op = session.get(Operation, op_id)
        assert op is not None
        return op


def _enqueue(factory: sessionmaker[Session], kind: str) -> str:
    with transaction(factory) as session:
        return enqueue(session, kind, None, {}).id


def _run(runner: Runner) -> None:
    for _ in range(20):
        ids = runner.claim()
        if not ids:
            return
        for op_id in ids:
            runner.run_until_blocked(op_id)


def test_recorded_writes_commit_with_the_step(factory: sessionmaker[Session]) -> None:
    seen: list[Any] = []

    def first(ctx: Context) -> Any:
        def write(session: Session) -> None:
            _note(ctx.op_id, "first")(session)
            ctx.payload["from_write"] = True  # a write may still shape the payload

        ctx.record(write)
        return NEXT

    def second(ctx: Context) -> Any:
        seen.append((_notes(factory), ctx.payload.get("from_write")))
        return NEXT

    flow = Flow("demo", [("first", first), ("second", second)], fail=lambda c, f: None)
    op_id = _enqueue(factory, "demo")
    _run(Runner(factory, {"demo": flow}))
    # The next step saw the write committed, and the payload the write changed.
    assert seen == [(["first"], True)]
    op = _op(factory, op_id)
    assert op.state == DONE
    assert op.payload == {"from_write": True}


def test_a_write_that_fails_the_operation_keeps_nothing(factory: sessionmaker[Session]) -> None:
    failed: list[str] = []

    def only(ctx: Context) -> Any:
        ctx.record(_note(ctx.op_id, "kept?"))

        def refuse(session: Session) -> None:
            raise OperationFailed("the instance was deleted meanwhile")

        ctx.record(refuse)
        return NEXT

    flow = Flow("demo", [("only", only)], fail=lambda c, f: failed.append(f.message))
    op_id = _enqueue(factory, "demo")
    _run(Runner(factory, {"demo": flow}))
    assert failed == ["the instance was deleted meanwhile"]
    assert _op(factory, op_id).state == FAILED
    assert _notes(factory) == []


def test_a_write_that_errors_is_retried_like_the_step(factory: sessionmaker[Session]) -> None:
    attempts: list[int] = []

    def only(ctx: Context) -> Any:
        attempts.append(ctx.attempts)
        ctx.record(_note(ctx.op_id, f"try {ctx.attempts}"))
        if ctx.attempts == 0:

            def boom(session: Session) -> None:
                raise RuntimeError("the address pool is used up")

            ctx.record(boom)
        return NEXT

    flow = Flow("demo", [("only", only)], fail=lambda c, f: None)
    op_id = _enqueue(factory, "demo")
    runner = Runner(factory, {"demo": flow})
    assert runner.claim() == [op_id]
    assert runner.run_until_blocked(op_id) is not None  # a backoff, as for a failed step
    op = _op(factory, op_id)
    assert op.attempts == 1 and "address pool" in (op.error or "")
    assert _notes(factory) == []
    _run(runner)
    assert attempts == [0, 1]
    assert _notes(factory) == ["try 1"]
    assert _op(factory, op_id).state == DONE


def test_writes_are_dropped_when_the_operation_is_no_longer_ours(
    factory: sessionmaker[Session],
) -> None:
    def only(ctx: Context) -> Any:
        # Another taskmanager took the operation over while this step ran.
        with transaction(factory) as session:
            op = session.get(Operation, ctx.op_id)
            assert op is not None
            op.lease_owner = "elsewhere:1:x"
        ctx.record(_note(ctx.op_id, "stale"))
        return NEXT

    flow = Flow("demo", [("only", only)], fail=lambda c, f: None)
    op_id = _enqueue(factory, "demo")
    _run(Runner(factory, {"demo": flow}))
    assert _notes(factory) == []
    op = _op(factory, op_id)
    # Nothing of the step was recorded: its new owner runs it (from the start) again.
    assert op.lease_owner == "elsewhere:1:x" and op.step in ("start", "only")


def test_steps_with_nothing_to_do_are_passed_over(factory: sessionmaker[Session]) -> None:
    statements: list[str] = []
    ran: list[str] = []
    engine = factory.kw["bind"]

    @event.listens_for(engine, "before_cursor_execute")
    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE OPERATIONS"):
            statements.append(statement)

    class Optional:
        def __init__(self, name: str) -> None:
            self.name = name

        def __call__(self, ctx: Context) -> Any:
            ran.append(self.name)
            return NEXT

        def skip(self, ctx: Context) -> bool:
            return not ctx.payload.get(self.name)

    def work(ctx: Context) -> Any:
        ran.append("work")
        return NEXT

    def last(ctx: Context) -> Any:
        ran.append("last")
        return NEXT

    steps = [("work", work), ("a", Optional("a")), ("b", Optional("b")), ("last", last)]
    flow = Flow("demo", steps, fail=lambda c, f: None)
    op_id = _enqueue(factory, "demo")
    _run(Runner(factory, {"demo": flow}))
    assert ran == ["work", "last"]
    assert _op(factory, op_id).state == DONE
    # The claim, the end of "work" (recording "last" as the next step), the end.
    assert len(statements) == 3, statements

    ran.clear()
    with transaction(factory) as session:
        op_id = enqueue(session, "demo", None, {"b": True}).id
    _run(Runner(factory, {"demo": flow}))
    assert ran == ["work", "b", "last"]


def test_write_gate_queues_writers_and_lets_nested_writes_through(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'gate.db'}", write_gate=WriteGate())
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (who TEXT, at REAL)"))
    factory = make_session_factory(engine)
    order: list[tuple[str, str]] = []

    def writer(name: str) -> None:
        with transaction(factory) as session:
            order.append((name, "in"))
            session.execute(text("INSERT INTO t VALUES (:w, :a)"), {"w": name, "a": time.time()})
            time.sleep(0.05)
            order.append((name, "out"))

    threads = [threading.Thread(target=writer, args=(f"w{i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    # One at a time: every writer's "in" is followed by its own "out".
    assert len(order) == 12
    for index in range(0, 12, 2):
        assert order[index][0] == order[index + 1][0]
        assert (order[index][1], order[index + 1][1]) == ("in", "out")

    # A failed write gives the gate back; a read inside a write does not take it.
    with pytest.raises(RuntimeError), transaction(factory) as session:
        session.execute(text("INSERT INTO t VALUES ('x', 0)"))
        with factory() as reader:
            reader.execute(text("SELECT count(*) FROM t")).scalar()
        raise RuntimeError("rolled back")
    done = threading.Event()
    threading.Thread(target=lambda: (writer("after"), done.set())).start()
    assert done.wait(10), "the gate was not given back after a rollback"
    with factory() as session:
        assert session.execute(text("SELECT count(*) FROM t WHERE who = 'x'")).scalar() == 0
    engine.dispose()


def _hammer(engine: Any, writers: int, rounds: int) -> list[str]:
    """``writers`` threads each making ``rounds`` short write transactions on ``engine``, whose
    connections give up at once on SQLite's lock (busy timeout 0); returns their errors."""
    event.listen(engine, "connect", lambda conn, _record: conn.execute("PRAGMA busy_timeout=0"))
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS h (n INTEGER)"))
    factory = make_session_factory(engine)
    errors: list[str] = []
    start = threading.Barrier(writers)

    def writer() -> None:
        start.wait()
        for _ in range(rounds):
            try:
                with transaction(factory) as session:
                    session.execute(text("INSERT INTO h VALUES (1)"))
                    time.sleep(0.001)
            except OperationalError as exc:
                errors.append(str(exc.orig))
            except sqlite3.OperationalError as exc:  # from the BEGIN the listener sends
                errors.append(str(exc))

    threads = [threading.Thread(target=writer) for _ in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    engine.dispose()
    return errors


def test_the_write_gate_keeps_writers_off_sqlites_lock(tmp_path: Path) -> None:
    """With the gate, a writer's BEGIN IMMEDIATE never finds SQLite's lock taken by a writer
    of the same process (so never sleeps in SQLite's busy handler): with a busy timeout of 0,
    not one of 8 x 25 concurrent writes fails. Without the gate the same load does fail,
    so the check can tell the two apart."""
    gated = make_engine(f"sqlite:///{tmp_path / 'gated.db'}", write_gate=WriteGate())
    assert _hammer(gated, writers=8, rounds=25) == []
    bare = make_engine(f"sqlite:///{tmp_path / 'bare.db'}")
    errors = _hammer(bare, writers=8, rounds=25)
    assert errors and all("locked" in error for error in errors), errors[:3]


def test_write_gate_is_reentrant_for_its_thread() -> None:
    gate = WriteGate()
    assert gate.acquire(timeout=1)
    assert gate.acquire(timeout=1) is False  # the holder goes on (SQLite decides, as before)
    other: list[bool] = []
    thread = threading.Thread(target=lambda: other.append(gate.acquire(timeout=0.2)))
    thread.start()
    thread.join()
    assert other == [False]  # waited its time, then went on without the gate
    gate.release()
    thread = threading.Thread(target=lambda: other.append(gate.acquire(timeout=1)))
    thread.start()
    thread.join()
    assert other == [False, True]
    gate.release()


def _compute(tmp_path: Path) -> LocalCompute:
    settings = load_settings(
        environ={}, overrides={"DEFAULT": {"state_dir": str(tmp_path / "state")}}
    )
    return LocalCompute(settings)


def test_spares_are_asked_for_only_when_a_template_lacks_them(tmp_path: Path) -> None:
    compute = _compute(tmp_path)
    templates = compute.templates_dir
    assert compute._spares_missing() is False  # no templates directory yet
    templates.mkdir(parents=True)
    assert compute._spares_missing() is False  # no template (a host that ran only Redis)
    template = templates / "mariadb-10.11-abc"
    template.mkdir()
    (templates / ".building-x").mkdir()  # work in progress is not a template
    assert compute._spares_missing() is False  # no marker: not complete
    (template / MARKER).write_text(json.dumps({"format": 1}))
    assert compute._spares_missing() is True  # complete, no ready copies
    spares = templates / SPARES_DIR / template.name
    spares.mkdir(parents=True)
    for index in range(SPARES - 1):
        (spares / f"ready-{index}").mkdir()
    (spares / "making-z").mkdir()  # being made: not ready yet
    assert compute._spares_missing() is True
    (spares / "ready-last").mkdir()
    assert compute._spares_missing() is False
