"""Helpers for tests that run a real mariadbd through ``MariaDBDatastore``.

Every engine is started on its own loopback addresses (never 127.0.0.1:3306, where the system
server may listen) in a temporary directory the engine user can traverse, and is stopped by PID
in the fixture's finaliser even when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pymysql

from coffer.guest.datastores.base import EngineSpec
from coffer.guest.datastores.mariadb import MariaDBDatastore
from coffer.guest.layout import InstanceLayout

PORT = 3306


def free_loopback_address(prefix: str) -> str:
    """An address ``<prefix>.N`` on which nothing listens on port 3306 yet."""
    for _ in range(50):
        address = f"{prefix}.{random.randint(2, 254)}"
        with socket.socket() as probe:
            try:
                probe.bind((address, PORT))
            except OSError:
                continue
            return address
    raise RuntimeError(f"no free address in {prefix}.0/24 for port {PORT}")


@contextlib.contextmanager
def instance_root() -> Iterator[Path]:
    """A fresh directory the engine user can reach (pytest's own tmp dirs are root-only)."""
    base = Path(tempfile.mkdtemp(prefix="coffer-mariadb-", dir="/tmp"))
    try:
        base.chmod(0o711)
        yield base / "instance"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def engine_pids(marker: str) -> list[int]:
    """PIDs of live processes whose argv contains ``marker`` (an instance's config path)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X") and marker.encode() in args:
            found.append(int(entry.name))
    return found


def kill_engines(marker: str) -> None:
    """SIGKILL whatever engine of this instance survived its ``stop()``, and wait for it."""
    for pid in engine_pids(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while engine_pids(marker) and time.monotonic() < deadline:
        time.sleep(0.05)


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
