"""Engines and sessions for the control DB (SQLite by default, PostgreSQL or MariaDB by URL)."""

from __future__ import annotations

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


def make_engine(url: str, **kwargs: Any) -> Engine:
    """Create an engine with the settings each backend needs to be safe under concurrency."""
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
                driver.execute("BEGIN IMMEDIATE")
            else:
                driver.execute("BEGIN")

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
