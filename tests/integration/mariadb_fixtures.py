"""Helpers for tests that run a real mariadbd through ``MariaDBDatastore``.

Every engine is started on its own loopback addresses (never 127.0.0.1:3306, where the system
server may listen) in a temporary directory the engine user can traverse, and is stopped by PID
in the fixture's finaliser even when a test fails.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import engine_fixtures
import pymysql
from engine_fixtures import engine_pids, kill_engines

from coffer.guest.datastores.base import EngineSpec
from coffer.guest.datastores.mariadb import MariaDBDatastore
from coffer.guest.layout import InstanceLayout

__all__ = ["engine_pids", "kill_engines"]

PORT = 3306


def free_loopback_address(prefix: str) -> str:
    """An address ``<prefix>.N`` on which nothing listens on port 3306 yet."""
    return engine_fixtures.free_loopback_address(prefix, PORT)


def instance_root() -> contextlib.AbstractContextManager[Path]:
    """A fresh directory the engine user can reach, removed afterwards."""
    return engine_fixtures.instance_root("coffer-mariadb-")


@dataclass
class RunningMariaDB:
    datastore: MariaDBDatastore
    private: str
    public: str
    #: Seconds from an empty directory to a prepared, answering server.
    prepare_seconds: float

    @property
    def marker(self) -> str:
        return f"--defaults-file={self.datastore.config_file}"


def make_spec(root: Path, addresses: list[str], run_as: str | None) -> EngineSpec:
    return EngineSpec(
        layout=InstanceLayout(root),
        bind_addresses=addresses,
        port=PORT,
        memory_mb=256,
        vcpus=1,
        volume_size_gb=1,
        run_as=run_as,
    )


def login(
    address: str, user: str, password: str, database: str | None = None
) -> pymysql.connections.Connection:
    """A TCP login from 127.0.0.1, so host rules see a known client address."""
    return pymysql.connect(
        host=address,
        port=PORT,
        user=user,
        password=password,
        database=database,
        bind_address="127.0.0.1",
        connect_timeout=5,
        autocommit=True,
    )


def login_error(address: str, user: str, password: str, database: str | None = None) -> int:
    """The MariaDB error code of a login that must fail (1045 access denied, 1044 no db...)."""
    try:
        conn = login(address, user, password, database)
    except pymysql.err.OperationalError as exc:
        code: int = exc.args[0]
        return code
    conn.close()
    raise AssertionError(f"{user} logged in but should not have")


def admin_connection(
    datastore: MariaDBDatastore,
) -> pymysql.connections.Connection:
    """The agent's own way in: os_admin over the unix socket."""
    return pymysql.connect(
        unix_socket=str(datastore.socket),
        user="os_admin",
        password=datastore.password_file.read_text().strip(),
        autocommit=True,
    )
