"""Helpers for tests that run a real redis-server through ``RedisDatastore``.

Every engine is started on its own loopback addresses (never 127.0.0.1:6379, where the system
server may listen) in a temporary directory the engine user can traverse, and is stopped by PID
in the fixture's finaliser even when a test fails.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import engine_fixtures
import redis
from engine_fixtures import engine_pids, kill_engines
from redis.backoff import NoBackoff
from redis.retry import Retry

from coffer.guest.datastores.base import EngineSpec
from coffer.guest.datastores.redis import RedisDatastore
from coffer.guest.layout import InstanceLayout

__all__ = ["engine_pids", "kill_engines"]

PORT = 6379
MIB = 1024 * 1024


def free_loopback_address(prefix: str) -> str:
    """An address ``<prefix>.N`` on which nothing listens on port 6379 yet."""
    return engine_fixtures.free_loopback_address(prefix, PORT)


def instance_root() -> contextlib.AbstractContextManager[Path]:
    """A fresh directory the engine user can reach, removed afterwards."""
    return engine_fixtures.instance_root("coffer-redis-")


def make_spec(
    root: Path, addresses: list[str], run_as: str | None, memory_mb: int = 256
) -> EngineSpec:
    return EngineSpec(
        layout=InstanceLayout(root),
        bind_addresses=addresses,
        port=PORT,
        memory_mb=memory_mb,
        vcpus=1,
        volume_size_gb=1,
        run_as=run_as,
    )


@contextlib.contextmanager
def running_datastore(spec: EngineSpec) -> Iterator[RedisDatastore]:
    """A prepared RedisDatastore on ``spec``, stopped (and killed by PID if need be) after."""
    datastore = RedisDatastore(spec)
    try:
        datastore.prepare([], [])
        yield datastore
    finally:
        try:
            datastore.stop(timeout=20)
        finally:
            kill_engines(str(datastore.config_file))


@dataclass
class RunningRedis:
    datastore: RedisDatastore
    private: str
    public: str
    #: Seconds from an empty directory to a prepared engine answering PING.
    prepare_seconds: float

    @property
    def marker(self) -> str:
        return str(self.datastore.config_file)


def login(address: str, user: str | None, password: str, db: int = 0) -> redis.Redis:
    """One authenticated TCP connection (AUTH user password; AUTH password when user is None).

    Raises redis.AuthenticationError when the login is refused.
    """
    return redis.Redis(
        host=address,
        port=PORT,
        username=user,
        password=password,
        db=db,
        decode_responses=True,
        socket_connect_timeout=5,
        socket_timeout=5,
        retry=Retry(NoBackoff(), 0),
        single_connection_client=True,
    )


def login_refused(address: str, user: str | None, password: str) -> bool:
    """True if Redis refuses this login (wrong password, unknown or disabled user)."""
    try:
        client = login(address, user, password)
    except redis.AuthenticationError:
        return True
    client.close()
    return False


def admin_client(datastore: RedisDatastore) -> redis.Redis:
    """The agent's own way in: os_admin over the unix socket."""
    return redis.Redis(
        unix_socket_path=str(datastore.socket),
        username="os_admin",
        password=datastore.password_file.read_text().strip(),
        decode_responses=True,
        retry=Retry(NoBackoff(), 0),
        single_connection_client=True,
    )
