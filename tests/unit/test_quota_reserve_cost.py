"""What ``quotas.reserve`` costs the API's create on the SQLite control DB: the statements it
sends (one locking read of the usage rows once they exist, one read of the limits and one of
the holder's charges, one write of each kind), with the same results as before."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from api_fixtures import make_settings
from sqlalchemy import Engine, delete, event, select
from sqlalchemy.orm import Session, sessionmaker

from coffer import quotas
from coffer.config import Settings
from coffer.db import migrate
from coffer.db.models import QuotaCharge, QuotaUsage
from coffer.db.session import make_engine, make_session_factory, transaction

CREATE = {"instances": 1, "ram": 512, "volumes": 5}


@pytest.fixture
def db(tmp_path: Path) -> Iterator[tuple[Settings, sessionmaker[Session], Engine]]:
    settings = make_settings(tmp_path, max_instances_per_tenant=3, max_ram_per_tenant=-1)
    engine = make_engine(settings.database_url)
    migrate.upgrade(engine)
    try:
        yield settings, make_session_factory(engine), engine
    finally:
        engine.dispose()


class Statements:
    """The SQL statements an engine sends while counting (BEGIN/COMMIT are not statements)."""

    def __init__(self, engine: Engine) -> None:
        self.seen: list[str] = []
        self.counting = False
        event.listen(engine, "before_cursor_execute", self._record)

    def _record(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if self.counting:
            self.seen.append(" ".join(statement.split()[:3]))

    def during_reserve(
        self, factory: sessionmaker[Session], settings: Settings, holder: str
    ) -> list[str]:
        with transaction(factory) as session:
            self.seen.clear()
            self.counting = True
            try:
                quotas.reserve(session, settings, "p1", holder, CREATE)
            finally:
                self.counting = False
        return list(self.seen)


def test_a_create_in_a_known_project_costs_five_statements(
    db: tuple[Settings, sessionmaker[Session], Engine],
) -> None:
    settings, factory, engine = db
    statements = Statements(engine)
    first = statements.during_reserve(factory, settings, "i1")
    # A project's first reservation creates its usage rows, then reads them again locked.
    assert len(first) == 7 and first[0].startswith("SELECT") and first[1].startswith("INSERT")
    second = statements.during_reserve(factory, settings, "i2")
    # Usage (locked), limits, the holder's charges; the new charges in one INSERT and the
    # usage in one UPDATE (executemany), instead of a read and a flush per resource.
    assert [s.split()[0] for s in second] == ["SELECT", "SELECT", "SELECT", "INSERT", "UPDATE"]
    with factory() as session:
        assert quotas.get_usage(session, "p1") == {
            "instances": 2,
            "ram": 1024,
            "volumes": 10,
            "backups": 0,
        }
        assert quotas.charges_of(session, "i2") == CREATE


def test_charging_a_holder_again_adds_and_a_refusal_charges_nothing(
    db: tuple[Settings, sessionmaker[Session], Engine],
) -> None:
    settings, factory, _ = db
    with transaction(factory) as session:
        quotas.reserve(session, settings, "p1", "i1", CREATE)
    with transaction(factory) as session:
        quotas.reserve(session, settings, "p1", "i1", {"ram": 256, "volumes": -2})
    with factory() as session:
        assert quotas.charges_of(session, "i1") == {"instances": 1, "ram": 768, "volumes": 3}
        assert quotas.get_usage(session, "p1")["ram"] == 768
    with transaction(factory) as session:
        quotas.reserve(session, settings, "p1", "i2", CREATE)
        quotas.reserve(session, settings, "p1", "i3", CREATE)
    with pytest.raises(quotas.QuotaExceeded), transaction(factory) as session:
        quotas.reserve(session, settings, "p1", "i4", CREATE)
    with factory() as session:
        assert quotas.get_usage(session, "p1")["instances"] == 3
        assert quotas.charges_of(session, "i4") == {}
    with transaction(factory) as session:
        assert quotas.release(session, "i1") == {"instances": 1, "ram": 768, "volumes": 3}
    with factory() as session:
        assert quotas.get_usage(session, "p1") == {
            "instances": 2,
            "ram": 1024,
            "volumes": 10,
            "backups": 0,
        }


def test_a_missing_usage_row_is_created_again(
    db: tuple[Settings, sessionmaker[Session], Engine],
) -> None:
    """A project with some usage rows (e.g. counted before a resource existed) gets the rest."""
    settings, factory, _ = db
    with transaction(factory) as session:
        quotas.reserve(session, settings, "p1", "i1", CREATE)
        session.execute(
            delete(QuotaUsage).where(
                QuotaUsage.project_id == "p1", QuotaUsage.resource == "backups"
            )
        )
    with transaction(factory) as session:
        quotas.reserve(session, settings, "p1", "b1", {"backups": 1})
    with factory() as session:
        assert quotas.get_usage(session, "p1")["backups"] == 1
        rows = session.scalars(select(QuotaCharge).where(QuotaCharge.holder_id == "b1")).all()
        assert [(r.resource, r.amount) for r in rows] == [("backups", 1)]
