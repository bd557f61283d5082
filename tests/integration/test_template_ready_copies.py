"""Creates take ready copies of the host's template (made by the host's zygote after a create);
each copy is still a server of its own: its admin password, its users, its data and, for
PostgreSQL, its cluster identity.

Every engine runs as the engine user on its own loopback address and is stopped by PID in a
``finally`` even when a test fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import mariadb_fixtures
import postgresql_fixtures
import pymysql
import pytest

from coffer.guest.datastores import pg_control
from coffer.guest.datastores.base import Datastore
from coffer.guest.datastores.mariadb import MariaDBDatastore
from coffer.guest.datastores.mariadb import template_variant as mariadb_variant
from coffer.guest.datastores.postgresql import PostgreSQLDatastore
from coffer.guest.datastores.postgresql import template_variant as postgresql_variant
from coffer.guest.datastores.template import SPARES, TREE, TemplateStore
from coffer.status import ServiceStatus

pytestmark = [pytest.mark.integration]

needs_mariadb = pytest.mark.skipif(
    MariaDBDatastore.detect_version() is None, reason="mariadbd not installed"
)
needs_postgres = pytest.mark.skipif(
    PostgreSQLDatastore.detect_version() is None, reason="postgres not installed"
)


@dataclasses.dataclass(frozen=True)
class Engine:
    manager: str
    cls: type[Datastore]
    fixtures: ModuleType
    variant: Callable[[], str]
    #: The command-line option that marks this instance's engine processes (for kill_engines).
    marker: Callable[[Any], str]


MARIADB = Engine(
    "mariadb",
    MariaDBDatastore,
    mariadb_fixtures,
    mariadb_variant,
    lambda ds: f"--defaults-file={ds.config_file}",
)
POSTGRESQL = Engine(
    "postgresql",
    PostgreSQLDatastore,
    postgresql_fixtures,
    postgresql_variant,
    lambda ds: f"--config-file={ds.config_file}",
)


@contextlib.contextmanager
def template_dir() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="coffer-spare-", dir="/tmp"))
    try:
        base.chmod(0o711)
        yield base / "templates"
    finally:
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def prepared(
    engine: Engine,
    templates: Path,
    engine_user: str,
    network: str,
    databases: list[dict[str, Any]] | None = None,
    users: list[dict[str, Any]] | None = None,
) -> Iterator[Any]:
    fixtures = engine.fixtures
    with fixtures.instance_root() as root:
        address = fixtures.free_loopback_address(network)
        spec = dataclasses.replace(
            fixtures.make_spec(root, [address], engine_user), template_dir=templates
        )
        datastore = engine.cls(spec)
        try:
            datastore.prepare(databases or [], users or [])
            yield datastore
        finally:
            try:
                datastore.stop(timeout=20)
            finally:
                fixtures.kill_engines(engine.marker(datastore))


def make_spares(engine: Engine, root: Path) -> tuple[TemplateStore, Path]:
    """What the host's zygote does after a create (see LocalCompute)."""
    version = engine.cls.detect_version()
    assert version is not None
    store = TemplateStore(root)
    template = store.path_for(engine.manager, version, engine.variant())
    assert store.make_spares(template) == SPARES
    return store, template


def took_a_ready_copy(caplog: pytest.LogCaptureFixture) -> bool:
    return any(r.getMessage().startswith("took a ready copy of template") for r in caplog.records)


def spares_left(store: TemplateStore, template: Path) -> int:
    return len(list(store.spares_dir(template).glob("ready-*")))


@needs_mariadb
def test_a_mariadb_create_takes_a_ready_copy_which_is_a_server_of_its_own(
    engine_user: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="coffer.guest.datastores")
    name, password = "u" + os.urandom(5).hex(), "P-" + os.urandom(12).hex()
    tenant = {"name": name, "password": password, "host": "%", "databases": [{"name": "b_db"}]}
    with (
        template_dir() as root,
        prepared(MARIADB, root, engine_user, "127.10.238", [{"name": "a_db"}]) as first,
    ):
        store, template = make_spares(MARIADB, root)
        first_password = first.password_file.read_text().strip()
        caplog.clear()
        with prepared(
            MARIADB, root, engine_user, "127.10.239", [{"name": "b_db"}], [tenant]
        ) as second:
            assert took_a_ready_copy(caplog)
            assert second.status() is ServiceStatus.HEALTHY
            assert second.password_file.read_text().strip() != first_password
            # The first instance's admin password does not open the second.
            with pytest.raises(pymysql.err.OperationalError):
                pymysql.connect(
                    unix_socket=str(second.socket),
                    user="os_admin",
                    password=first_password,
                    connect_timeout=5,
                ).close()
            conn = mariadb_fixtures.login(second.spec.bind_addresses[0], name, password, "b_db")
            with conn, conn.cursor() as cur:
                cur.execute("SHOW DATABASES")
                names = {row[0] for row in cur.fetchall()}
            assert "b_db" in names and "a_db" not in names
        assert spares_left(store, template) == SPARES - 1


@needs_postgres
def test_a_postgresql_create_takes_a_ready_copy_which_is_a_cluster_of_its_own(
    engine_user: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="coffer.guest.datastores")
    name, password = "t" + os.urandom(6).hex(), "P-" + os.urandom(12).hex()
    with (
        template_dir() as root,
        prepared(POSTGRESQL, root, engine_user, "127.10.236") as first,
    ):
        store, template = make_spares(POSTGRESQL, root)
        spares = sorted(store.spares_dir(template).glob("ready-*"))
        spare_identities = {pg_control.read_identity(spare) for spare in spares}
        first_password = first.password_file.read_text().strip()
        first.stop(timeout=20)
        first_identity = pg_control.read_identity(first.layout.data_dir)
        caplog.clear()
        tenant = {"name": name, "password": password, "databases": [{"name": "b_db"}]}
        with prepared(
            POSTGRESQL, root, engine_user, "127.10.237", [{"name": "b_db"}], [tenant]
        ) as second:
            assert took_a_ready_copy(caplog)
            assert second.status() is ServiceStatus.HEALTHY
            address = second.spec.bind_addresses[0]
            with postgresql_fixtures.login(address, name, password, "b_db") as conn:
                assert conn.execute("SELECT current_user").fetchone() == (name,)
            assert "password authentication failed" in postgresql_fixtures.login_error(
                address, name, password + "x", "b_db"
            )
            assert second.password_file.read_text().strip() != first_password
            second.stop(timeout=20)
            second_identity = pg_control.read_identity(second.layout.data_dir)
        # The taken copy got an identity of its own, like a plain copy does.
        template_identity = pg_control.read_identity(template / TREE)
        identities = {template_identity, first_identity, second_identity}
        assert len({i[0] for i in identities}) == 3
        assert len({i[1] for i in identities}) == 3
        assert second_identity not in spare_identities
        assert spares_left(store, template) == SPARES - 1
