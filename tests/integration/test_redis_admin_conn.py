"""The Redis agent's kept admin connection on a real redis-server: readiness polls and status
checks share one connection instead of opening one each, a connection the server closed is
replaced at once, and a dead, stopped or locked-out server is still reported at the next check."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
from redis_fixtures import (
    RunningRedis,
    admin_client,
    engine_pids,
    free_loopback_address,
    instance_root,
    kill_engines,
    make_spec,
)

from coffer.guest.datastores.redis import RedisDatastore
from coffer.status import ServiceStatus

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        RedisDatastore.detect_version() is None, reason="redis-server not installed"
    ),
]


@pytest.fixture
def redis_engine(engine_user: str) -> Iterator[RunningRedis]:
    with instance_root() as root:
        address = free_loopback_address("127.10.251")
        datastore = RedisDatastore(make_spec(root, [address], engine_user))
        try:
            started = time.monotonic()
            datastore.prepare([], [])
            yield RunningRedis(datastore, address, address, time.monotonic() - started)
        finally:
            try:
                datastore.stop(timeout=20)
            finally:
                kill_engines(str(datastore.config_file))


def _stats(datastore: RedisDatastore) -> dict[str, Any]:
    with admin_client(datastore) as admin:
        stats: dict[str, Any] = admin.info("stats")
        commands: dict[str, Any] = admin.info("commandstats")
    return {**stats, **commands}


def _agent_clients(datastore: RedisDatastore) -> list[dict[str, Any]]:
    """The os_admin connections other than the one asking."""
    with admin_client(datastore) as admin:
        me = admin.client_id()
        return [c for c in admin.client_list() if c["user"] == "os_admin" and int(c["id"]) != me]


def test_status_checks_share_one_connection(redis_engine: RunningRedis) -> None:
    datastore = redis_engine.datastore
    # The readiness poll of prepare left its connection open for the status checks.
    assert len(_agent_clients(datastore)) == 1
    before = _stats(datastore)
    for _ in range(25):
        assert datastore.status() is ServiceStatus.HEALTHY
    after = _stats(datastore)
    # Only the two connections _stats itself opened.
    assert after["total_connections_received"] - before["total_connections_received"] == 1
    assert after["cmdstat_ping"]["calls"] - before["cmdstat_ping"]["calls"] == 25
    # The kept connection does not announce itself (no CLIENT SETINFO round trips).
    assert "cmdstat_client|setinfo" not in after
    assert len(_agent_clients(datastore)) == 1


def test_a_closed_connection_is_replaced_at_the_next_check(redis_engine: RunningRedis) -> None:
    datastore = redis_engine.datastore
    assert datastore.status() is ServiceStatus.HEALTHY
    (kept,) = _agent_clients(datastore)
    with admin_client(datastore) as admin:
        admin.execute_command("CLIENT", "KILL", "ID", kept["id"])
    # The killed connection fails; a fresh one answers in the same check.
    assert datastore.status() is ServiceStatus.HEALTHY
    (fresh,) = _agent_clients(datastore)
    assert fresh["id"] != kept["id"]


def test_a_restarted_server_is_checked_on_a_new_connection(redis_engine: RunningRedis) -> None:
    datastore = redis_engine.datastore
    assert datastore.status() is ServiceStatus.HEALTHY
    datastore.stop()
    assert datastore.status() is ServiceStatus.SHUTDOWN
    datastore.start()
    assert datastore.status() is ServiceStatus.HEALTHY
    assert len(_agent_clients(datastore)) == 1


def test_a_dead_or_frozen_server_is_reported_at_once(redis_engine: RunningRedis) -> None:
    datastore = redis_engine.datastore
    assert datastore.status() is ServiceStatus.HEALTHY
    (pid,) = engine_pids(redis_engine.marker)
    # Frozen: the process lives, the kept connection and a fresh one both time out.
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        assert datastore.status() is ServiceStatus.BLOCKED
        assert time.monotonic() - started < 10
    finally:
        os.kill(pid, signal.SIGCONT)
    assert datastore.status() is ServiceStatus.HEALTHY
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while datastore.is_running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert datastore.status() is ServiceStatus.CRASHED
    assert datastore._answers() is False


def test_a_changed_admin_password_blocks_the_kept_connection_too(
    redis_engine: RunningRedis,
) -> None:
    """Redis keeps a logged-in connection when its user's password changes; the check must
    not keep saying HEALTHY on it."""
    datastore = redis_engine.datastore
    assert datastore.status() is ServiceStatus.HEALTHY
    with admin_client(datastore) as admin:
        admin.execute_command("ACL", "SETUSER", "os_admin", "resetpass", ">someone-else")
    assert datastore.status() is ServiceStatus.BLOCKED
    datastore.restart()
    assert datastore.status() is ServiceStatus.HEALTHY
