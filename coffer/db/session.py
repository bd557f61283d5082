"""Engines and sessions for the control DB (SQLite by default, PostgreSQL or MariaDB by URL)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

#: Execution option marking a session's transaction as one that writes (see ``transaction``).
WRITE_OPTION = "coffer_write"
#: SQLite connections kept open per engine. The API serves requests from a thread pool of 40;
#: with fewer pooled connections, busy moments open (and set up) a new connection per request
#: and close it again. An idle SQLite connection costs a file handle and a few hundred KB.
SQLITE_POOL_SIZE = 40


#: How long a writer waits for the process's SQLite write turn before it goes on to SQLite's
#: own lock anyway (which then waits up to its busy timeout, as without the gate).
WRITE_GATE_TIMEOUT = 10.0
_GATE_HELD = "coffer_write_gate"


class WriteGate:
    """Write transactions of one process on a SQLite control DB, one at a time, in arrival
    order.

    SQLite lets one writer in at a time; the others retry ``BEGIN IMMEDIATE`` from its busy
    handler, which sleeps 1, 2, 5, 10 ... up to 100 ms between tries whether or not the lock
    was freed meanwhile. With ten creates, their polls and the API's writes in one process,
    a write waited up to most of a second for a lock held a few milliseconds at a time. Here
    the process's writers queue on a condition instead and each is woken as the one before it
    commits; SQLite's lock (and its busy timeout) still orders this process against others.
    A thread that already holds the gate (a write inside a write) and a writer that waited
    ``WRITE_GATE_TIMEOUT`` go straight on to SQLite's lock, exactly as without the gate.

    ``make_engine(url, write_gate=...)`` takes the gate in the same listener that sends
    ``BEGIN IMMEDIATE``, just before it, and gives it back when the connection goes back to the
    pool, after the ``COMMIT`` (or rollback) has finished. (SQLAlchemy's ``commit`` event comes
    before the driver's commit, which may take long while SQLite checkpoints its log; the next
    writer would meet SQLite's lock and its sleeps again.) A separate ``begin`` listener
    cannot promise to run before the one that sends the ``BEGIN``; one did not, and every
    writer met SQLite's sleeps after all.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._owner: int | None = None

    def acquire(self, timeout: float = WRITE_GATE_TIMEOUT) -> bool:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                return False
            if not self._cond.wait_for(lambda: self._owner is None, timeout):
                return False
            self._owner = me
            return True

    def release(self) -> None:
        with self._cond:
            self._owner = None
            self._cond.notify()


def make_engine(url: str, write_gate: WriteGate | None = None, **kwargs: Any) -> Engine:
    """Create an engine with the settings each backend needs to be safe under concurrency.

    ``write_gate``: on a SQLite file, this process's write transactions take turns through it
    (``WriteGate``); ignored for other databases, which have row locks of their own."""
    if url.startswith("sqlite"):
        if ":memory:" not in url and url.rstrip("/") != "sqlite:":
            kwargs.setdefault("pool_size", SQLITE_POOL_SIZE)
            kwargs.setdefault("max_overflow", 10)
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # WAL lets readers proceed while one writer commits; several processes share the file.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            # A write transaction takes the write lock at BEGIN so read-then-write cannot
            # deadlock; reads begin deferred and run beside writers (WAL).
            # Straight to the driver: SQLAlchemy's statement machinery would cost more than
            # the BEGIN itself, on every request.
            driver = conn.connection.driver_connection
            if conn.get_execution_options().get(WRITE_OPTION):
                if write_gate is not None and write_gate.acquire():
                    conn.info[_GATE_HELD] = True
                driver.execute("BEGIN IMMEDIATE")
            else:
                driver.execute("BEGIN")

        if write_gate is not None:
            gate = write_gate

            def _give_back(_dbapi_conn: Any, record: Any) -> None:
                if record is not None and record.info.pop(_GATE_HELD, False):
                    gate.release()

            event.listen(engine.pool, "checkin", _give_back)
            # A connection the pool lets go of without a checkin (dropped after an error, or
            # collected unreturned) gives its turn back too.
            event.listen(engine.pool, "detach", _give_back)
        return engine
    return create_engine(url, pool_pre_ping=True, **kwargs)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session for writing: commits on success, rolls back on any exception.

    Plain ``factory()`` sessions are for reading; everything that writes goes through here.
    """
    session = factory()
    try:
        session.connection(execution_options={WRITE_OPTION: True})
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
