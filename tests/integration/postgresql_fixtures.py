"""Helpers for tests that run a real postgres through ``PostgreSQLDatastore``.

Every engine is started on its own loopback addresses (never 127.0.0.1:5432, where the system
server listens) in a temporary directory the engine user can traverse, and is stopped by PID in
the fixture's finaliser even when a test fails.

libpq cannot choose a client's source address, so tests of ``allowed_cidrs`` connect through
``SourceRelay``: a small TCP relay in the test process that accepts on 127.0.0.1 and opens its
own connection to the server *from* a chosen loopback address (127.0.0.0/8 is all local on
Linux). The server sees that address as the client's, exactly as it would see a remote client,
and pg_hba.conf decides; the relay only copies bytes, so the login (SCRAM included) is the real
psycopg one.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import engine_fixtures
import psycopg
from engine_fixtures import engine_pids, engine_tree, kill_engines

from coffer.guest.datastores.base import EngineSpec
from coffer.guest.datastores.postgresql import PostgreSQLDatastore
from coffer.guest.layout import InstanceLayout

__all__ = ["engine_pids", "engine_tree", "kill_engines"]

PORT = 5432


def free_loopback_address(prefix: str, avoid: tuple[int, ...] = ()) -> str:
    """An address ``<prefix>.N`` on which nothing listens on port 5432 yet."""
    return engine_fixtures.free_loopback_address(prefix, PORT, avoid)


def instance_root() -> contextlib.AbstractContextManager[Path]:
    """A fresh directory the engine user can reach, removed afterwards."""
    return engine_fixtures.instance_root("coffer-pg-")


def wait_children_gone(pids: list[int], timeout: float = 10) -> None:
    """Wait until none of ``pids`` is alive (a crashed postmaster's children exit by themselves)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(Path(f"/proc/{pid}").exists() for pid in pids):
            return
        time.sleep(0.02)


@dataclass
class RunningPostgres:
    datastore: PostgreSQLDatastore
    private: str
    public: str
    #: Seconds from an empty directory to a prepared, answering server.
    prepare_seconds: float

    @property
    def marker(self) -> str:
        return f"--config-file={self.datastore.config_file}"


def make_spec(
    root: Path, addresses: list[str], run_as: str | None, allowed_cidrs: tuple[str, ...] = ()
) -> EngineSpec:
    return EngineSpec(
        layout=InstanceLayout(root),
        bind_addresses=addresses,
        port=PORT,
        memory_mb=256,
        vcpus=1,
        volume_size_gb=1,
        run_as=run_as,
        allowed_cidrs=allowed_cidrs,
    )


def login(
    address: str, user: str, password: str, dbname: str = "postgres", port: int = PORT
) -> psycopg.Connection[Any]:
    """A real psycopg login over TCP."""
    return psycopg.connect(
        host=address,
        port=port,
        user=user,
        password=password,
        dbname=dbname,
        connect_timeout=5,
        sslmode="disable",
        autocommit=True,
    )


def login_error(
    address: str, user: str, password: str, dbname: str = "postgres", port: int = PORT
) -> str:
    """The server's message for a login that must fail (AssertionError if it succeeds)."""
    try:
        conn = login(address, user, password, dbname, port)
    except psycopg.OperationalError as exc:
        return str(exc)
    conn.close()
    raise AssertionError(f"{user} logged in to {dbname} but should not have")


def admin_connection(datastore: PostgreSQLDatastore, dbname: str = "postgres") -> Any:
    """The agent's own way in: os_admin over the unix socket."""
    return psycopg.connect(
        host=str(datastore.layout.run_dir),
        port=PORT,
        user="os_admin",
        password=datastore.password_file.read_text().strip(),
        dbname=dbname,
        autocommit=True,
    )


class SourceRelay:
    """Relays TCP connections accepted on 127.0.0.1 to ``target``, from ``source`` (see the
    module docstring). Use as a context manager; ``port`` is where clients connect."""

    def __init__(self, source: str, target: tuple[str, int]) -> None:
        self.source = source
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> SourceRelay:
        self._acceptor.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._acceptor.join(5)
        self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(5)
        for sock in self._sockets:
            sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                upstream = socket.create_connection(
                    self.target, timeout=5, source_address=(self.source, 0)
                )
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            self._sockets += [client, upstream]
            for reader, writer in ((client, upstream), (upstream, client)):
                thread = threading.Thread(target=self._pump, args=(reader, writer), daemon=True)
                thread.start()
                self._threads.append(thread)

    @staticmethod
    def _pump(reader: socket.socket, writer: socket.socket) -> None:
        try:
            while data := reader.recv(65536):
                writer.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                writer.shutdown(socket.SHUT_WR)
