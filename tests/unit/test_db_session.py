"""SQLite control-DB sessions: reads run beside writes; writes serialise without deadlock."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from sqlalchemy import select

from coffer.db import migrate
from coffer.db.models import Flavor
from coffer.db.session import make_engine, make_session_factory, transaction


def test_an_open_read_does_not_block_a_writer(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'c.db'}")
    migrate.upgrade(engine)
    factory = make_session_factory(engine)
    with transaction(factory) as session:
        session.add(Flavor(id="1", name="one", ram=256, vcpus=1))

    with factory() as reader:
        assert reader.scalars(select(Flavor.name)).all() == ["one"]  # read txn now open
        started = time.monotonic()
        with transaction(factory) as writer:
            writer.add(Flavor(id="2", name="two", ram=256, vcpus=1))
        assert time.monotonic() - started < 2, "the writer waited for a reader"
        # The reader keeps its snapshot until its transaction ends.
        assert reader.scalars(select(Flavor.name)).all() == ["one"]
    with factory() as fresh:
        assert sorted(fresh.scalars(select(Flavor.name)).all()) == ["one", "two"]


def test_concurrent_read_modify_write_transactions_do_not_lose_updates(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'c.db'}")
    migrate.upgrade(engine)
    factory = make_session_factory(engine)
    with transaction(factory) as session:
        session.add(Flavor(id="1", name="counter", ram=0, vcpus=1))

    def bump() -> None:
        for _ in range(20):
            with transaction(factory) as session:
                row = session.get(Flavor, "1")
                assert row is not None
                row.ram = row.ram + 1

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with factory() as session:
        row = session.get(Flavor, "1")
        assert row is not None and row.ram == 80
