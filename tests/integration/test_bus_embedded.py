"""The embedded broker: a real redis-server on a unix socket, started and stopped by pid."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from bus_fixtures import (  # noqa: F401 - fixtures are found by name
    _process_alive,
    embedded_broker,
    unix_connect_fails_without_password,
    wait_for,
)
from redis.backoff import NoBackoff
from redis.retry import Retry

from coffer.bus.transport import EmbeddedBroker, connection, resolve_url

pytestmark = pytest.mark.integration


@pytest.fixture
def state_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="cbus", dir="/tmp"))
    try:
        yield path
    finally:
        # Stop anything a test left running in this state dir, by its pidfile.
        EmbeddedBroker(path).stop()
        shutil.rmtree(path, ignore_errors=True)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_password_is_not_in_argv_environment_or_log(
    embedded_broker: EmbeddedBroker,  # noqa: F811
) -> None:
    pid = embedded_broker.pid
    assert pid is not None
    password = embedded_broker.password_path.read_text().strip()
    assert len(password) >= 32
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    assert b"redis-server" in cmdline
    assert password.encode() not in cmdline
    assert password.encode() not in Path(f"/proc/{pid}/environ").read_bytes()
    assert password not in embedded_broker.log_path.read_text()
    assert password not in repr(embedded_broker)
    # It is only in the 0600 files, and in the URL a client is handed.
    assert password in embedded_broker.config_path.read_text()
    assert password in embedded_broker.url
    assert _mode(embedded_broker.password_path) == 0o600
    assert _mode(embedded_broker.config_path) == 0o600
    assert _mode(embedded_broker.bus_dir) == 0o711
    assert stat.S_IMODE(os.stat(embedded_broker.socket_path).st_mode) == 0o777


def test_socket_refuses_clients_without_the_password(
    embedded_broker: EmbeddedBroker,  # noqa: F811
) -> None:
    assert unix_connect_fails_without_password(embedded_broker.socket_path)
    wrong = redis.Redis(
        unix_socket_path=str(embedded_broker.socket_path),
        password="wrong",
        retry=Retry(NoBackoff(), 0),
    )
    try:
        with pytest.raises(redis.AuthenticationError):
            wrong.ping()
    finally:
        wrong.close()
    # With the password, commands that could reconfigure or stop the broker are disabled.
    right = redis.Redis(
        unix_socket_path=str(embedded_broker.socket_path),
        password=embedded_broker.password_path.read_text().strip(),
    )
    try:
        assert right.ping()
        with pytest.raises(redis.ResponseError, match="unknown command"):
            right.execute_command("CONFIG", "GET", "requirepass")
        # No TCP listener: the socket is the only way in.
        assert right.info("server")["tcp_port"] == 0
    finally:
        right.close()


def test_start_is_idempotent_and_a_new_object_adopts_the_running_broker(
    state_dir: Path,
) -> None:
    first = EmbeddedBroker(state_dir)
    first.start()
    pid = first.pid
    assert pid is not None and first.is_running()
    first.start()
    assert first.pid == pid

    # What a restarted `coffer up` does: a fresh object finds the broker by its pidfile.
    second = EmbeddedBroker(state_dir)
    assert second.is_running()
    second.start()
    assert second.pid == pid
    assert second.url == first.url

    with connection(resolve_url("embedded://", state_dir)) as conn:
        queue = conn.SimpleQueue("adopt-check")
        queue.put({"ok": 1})
        assert queue.get(timeout=2).payload == {"ok": 1}
        queue.close()

    second.stop()
    assert wait_for(lambda: not _process_alive(pid))
    assert not first.is_running()
    assert not first.pid_path.exists()
    assert not first.socket_path.exists()
    second.stop()  # stopping twice is fine


def test_stale_pidfile_of_an_unrelated_process_is_never_signalled(state_dir: Path) -> None:
    broker = EmbeddedBroker(state_dir)
    broker.bus_dir.mkdir(parents=True)
    # The pidfile names this very test process: alive, but not our redis-server.
    broker.pid_path.write_text(f"{os.getpid()}\n")
    assert broker.pid is None
    broker.stop()  # must not signal us
    broker.bus_dir.mkdir(parents=True, exist_ok=True)
    broker.pid_path.write_text(f"{os.getpid()}\n")
    broker.start()
    pid = broker.pid
    assert pid is not None and pid != os.getpid()
    broker.stop()
    assert wait_for(lambda: not _process_alive(pid))


def test_password_survives_restarts(state_dir: Path) -> None:
    broker = EmbeddedBroker(state_dir)
    url = broker.url
    broker.start()
    first_pid = broker.pid
    broker.stop()
    broker.start()
    try:
        assert broker.pid != first_pid
        assert broker.url == url
        assert broker.is_running()
    finally:
        broker.stop()
