"""Quota reservations on the machine's real PostgreSQL: the row lock (``SELECT ... FOR UPDATE``)
keeps concurrent reservations from sharing the last unit, a project's first reservations race to
create its usage rows without failing, and concurrent releases give each charge back once."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy.orm import Session, sessionmaker

from coffer import quotas
from coffer.config import Settings, load_settings
from coffer.db import migrate
from coffer.db.session import make_engine, make_session_factory, transaction

pytestmark = pytest.mark.integration

ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"


@pytest.fixture
def pg(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Settings, sessionmaker[Session]]]:
    name = f"coffer_quota_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    engine = make_engine(url, pool_size=25, max_overflow=5)
    try:
        migrate.upgrade(engine)
        settings = load_settings(
            environ={},
            overrides={
                "DEFAULT": {"state_dir": str(tmp_path_factory.mktemp("pg"))},
                "database": {"connection": url},
            },
        )
        yield settings, make_session_factory(engine)
    finally:
        engine.dispose()
        with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _run_together(count: int, work: object) -> None:
    barrier = threading.Barrier(count)

    def run(n: int) -> None:
        barrier.wait()
        work(n)  # type: ignore[operator]

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)


def test_concurrent_reservations_and_releases(pg: tuple[Settings, sessionmaker[Session]]) -> None:
    settings, factory = pg
    with transaction(factory) as session:
        quotas.set_limits(session, settings, "race", {"instances": 10})
    outcomes: list[str] = []

    def reserve(n: int) -> None:
        try:
            with transaction(factory) as session:
                # The project has no usage rows yet: all 20 race to create them too.
                quotas.reserve(session, settings, "race", f"h{n}", {"instances": 1, "ram": 256})
            outcomes.append("ok")
        except quotas.QuotaExceeded:
            outcomes.append("over")

    _run_together(20, reserve)
    assert sorted(outcomes) == ["ok"] * 10 + ["over"] * 10
    with factory() as session:
        assert quotas.get_usage(session, "race") == {
            "instances": 10,
            "ram": 2560,
            "volumes": 0,
            "backups": 0,
        }

    # Two releasers per holder at once (a failed create meeting its delete): each gives back once.
    returned: list[int] = []

    def release(n: int) -> None:
        with transaction(factory) as session:
            returned.append(quotas.release(session, f"h{n % 20}").get("instances", 0))

    _run_together(40, release)
    assert sum(returned) == 10
    with factory() as session:
        assert quotas.get_usage(session, "race")["instances"] == 0
        assert quotas.get_usage(session, "race")["ram"] == 0
