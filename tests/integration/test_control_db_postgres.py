"""The control DB on the machine's real PostgreSQL: migrations, operations, and a whole instance
lifecycle through ``coffer up`` configured with a PostgreSQL URL."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pymysql
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from coffer_harness import TenantApi, coffer_environment, mariadb_instance

from coffer.db import migrate
from coffer.db.models import Base
from coffer.db.session import make_engine, make_session_factory, transaction
from coffer.taskmanager.operations import DONE, NEXT, Flow, Runner, enqueue

pytestmark = pytest.mark.integration

ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"


@pytest.fixture
def pg_url() -> Iterator[str]:
    name = f"coffer_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_migrations_and_operations_on_postgresql(pg_url: str) -> None:
    engine = make_engine(pg_url)
    try:
        migrate.upgrade(engine)
        assert migrate.current_revision(engine) == migrate.head_revision()
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        factory = make_session_factory(engine)
        seen: list[Any] = []
        flow = Flow(
            "demo",
            [("a", lambda ctx: seen.append(ctx.payload) or NEXT)],
            fail=lambda c, f: None,
        )
        with transaction(factory) as session:
            op_id = enqueue(session, "demo", None, {"n": 1}).id
        runner = Runner(factory, {"demo": flow})
        assert runner.claim() == [op_id]
        # A second runner (another taskmanager) cannot claim a live lease.
        assert Runner(factory, {"demo": flow}).claim() == []
        runner.run_until_blocked(op_id)
        assert seen == [{"n": 1}]
        with factory() as session:
            from coffer.db.models import Operation

            op = session.get(Operation, op_id)
            assert op is not None and op.state == DONE
    finally:
        engine.dispose()


@pytest.mark.slow
def test_instance_lifecycle_with_postgresql_control_db(pg_url: str, engine_user: str) -> None:
    with coffer_environment(COFFER_DATABASE__CONNECTION=pg_url) as coffer:
        coffer.start("up", "up")
        coffer.wait_api()
        assert not (coffer.state_dir / "coffer.db").exists(), "SQLite must not be used"
        api = TenantApi(coffer)
        instance_id = api.create(**mariadb_instance("on-pg", "d1", "u1", "pw-u1"))
        shown = api.wait_settled(instance_id)
        assert shown["status"] == "ACTIVE", shown
        pymysql.connect(
            host=shown["addresses"][0]["address"], user="u1", password="pw-u1", database="d1"
        ).close()
        with psycopg.connect(pg_url.replace("postgresql+psycopg", "postgresql")) as pg:
            row = pg.execute("select task from instances where id = %s", (instance_id,)).fetchone()
        assert row == ("none",)
        api.delete_and_wait_gone(instance_id)
