"""RedisDatastore against a real redis-server, checked with real redis-py logins over TCP.

One engine serves the whole module (prepared once); later tests stop, crash and restart it, and
two start short-lived engines of their own. Tests run in file order.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis_fixtures import (
    MIB,
    PORT,
    RunningRedis,
    admin_client,
    engine_pids,
    free_loopback_address,
    instance_root,
    kill_engines,
    login,
    login_refused,
    make_spec,
    running_datastore,
)

from coffer.datastores import redis_rules
from coffer.errors import (
    EngineError,
    NotImplementedByDatastore,
    UserAlreadyExists,
    UserNotFound,
    ValidationError,
)
from coffer.guest.datastores.base import Capability
from coffer.guest.datastores.process import UnsafeEngineUser
from coffer.guest.datastores.redis import RedisDatastore
from coffer.status import ServiceStatus

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        RedisDatastore.detect_version() is None, reason="redis-server not installed"
    ),
]

APP_PASSWORD = "app-Pass-1"


@pytest.fixture(scope="module")
def redis_engine(engine_user: str) -> Iterator[RunningRedis]:
    with instance_root() as root:
        private = free_loopback_address("127.10.247")
        public = free_loopback_address("127.20.247")
        datastore = RedisDatastore(make_spec(root, [private, public], engine_user))
        try:
            started = time.monotonic()
            datastore.prepare([], [{"name": "app", "password": APP_PASSWORD}])
            yield RunningRedis(datastore, private, public, time.monotonic() - started)
        finally:
            try:
                datastore.stop(timeout=20)
            finally:
                kill_engines(str(datastore.config_file))


def acl_state(running: RunningRedis) -> tuple[list[str], str]:
    """The engine's ACL users with their rules, and the saved users.acl."""
    with admin_client(running.datastore) as admin:
        rules = sorted(str(line) for line in admin.execute_command("ACL", "LIST"))
    return rules, running.datastore.acl_file.read_text()


# -- prepare, addresses and the engine's shape ----------------------------------------------------


def test_prepared_user_logs_in_and_keeps_data(redis_engine: RunningRedis) -> None:
    assert redis_engine.prepare_seconds < 10
    with login(redis_engine.private, "app", APP_PASSWORD) as client:
        assert client.set("greeting", "hello") is True
        assert client.get("greeting") == "hello"
        assert client.execute_command("ACL", "WHOAMI") == "app"
    # The public address serves the same server; keyspaces are separate.
    with login(redis_engine.public, "app", APP_PASSWORD) as client:
        assert client.get("greeting") == "hello"
    with login(redis_engine.private, "app", APP_PASSWORD, db=3) as client:
        assert client.get("greeting") is None
    assert login_refused(redis_engine.private, "app", "wrong-password")
    assert login_refused(redis_engine.private, "nobody", APP_PASSWORD)


@pytest.mark.parametrize(
    "command",
    [
        ("CONFIG", "GET", "maxmemory"),
        ("CONFIG", "SET", "maxmemory", "0"),
        ("CONFIG", "REWRITE"),
        ("ACL", "LIST"),
        ("ACL", "SETUSER", "app", "nopass"),
        ("ACL", "SAVE"),
        ("SHUTDOWN", "NOSAVE"),
        ("DEBUG", "SLEEP", "0"),
        ("MODULE", "LIST"),
        ("MONITOR",),
        ("CLIENT", "LIST"),
        ("CLIENT", "KILL", "USER", "os_admin"),
        ("SAVE",),
        ("BGREWRITEAOF",),
        ("REPLICAOF", "127.0.0.1", "6380"),
        ("MIGRATE", "127.0.0.1", "6380", "greeting", "0", "1000"),
        ("RESTORE", "k", "0", "x"),
    ],
)
def test_tenant_user_cannot_administer_the_server(
    redis_engine: RunningRedis, command: tuple[str, ...]
) -> None:
    with login(redis_engine.private, "app", APP_PASSWORD) as client:
        # DEBUG and MODULE are refused by the config before the ACL is consulted.
        with pytest.raises(redis.ResponseError, match=r"no permissions|not allowed"):
            client.execute_command(*command)
        assert client.ping() is True  # still connected and served
    with admin_client(redis_engine.datastore) as admin:
        verdict = admin.execute_command("ACL", "DRYRUN", "app", *command)
    assert "no permissions" in verdict


def test_tenant_user_may_manage_its_own_data(redis_engine: RunningRedis) -> None:
    with login(redis_engine.private, "app", APP_PASSWORD, db=9) as client:
        client.mset({"a": "1", "b": "2"})
        assert sorted(client.keys("*")) == ["a", "b"]
        assert "redis_version" in client.info("server")
        client.eval("return redis.call('SET', KEYS[1], ARGV[1])", 1, "c", "3")
        assert client.flushdb() is True
        assert client.dbsize() == 0
    with login(redis_engine.private, "app", APP_PASSWORD) as client:
        assert client.get("greeting") == "hello"  # FLUSHDB touched keyspace 9 only


def test_listens_only_on_its_bind_addresses(redis_engine: RunningRedis) -> None:
    elsewhere = free_loopback_address("127.10.248")
    with pytest.raises(redis.ConnectionError):
        login(elsewhere, "app", APP_PASSWORD)


def test_engine_runs_unprivileged_with_flavor_settings(redis_engine: RunningRedis) -> None:
    datastore = redis_engine.datastore
    assert datastore.status() is ServiceStatus.HEALTHY
    (pid,) = engine_pids(redis_engine.marker)
    uid = os.stat(f"/proc/{pid}").st_uid
    assert uid != 0
    assert pwd.getpwuid(uid).pw_name == datastore.os_user
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
    password = datastore.password_file.read_text().strip()
    assert len(password) >= 32
    assert password not in argv
    assert password not in datastore.acl_file.read_text()  # only its SHA-256 is stored
    assert password not in datastore.log_file.read_text()
    for path in (datastore.config_file, datastore.password_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(datastore.layout.secrets_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(datastore.socket.stat().st_mode) == 0o700
    with admin_client(datastore) as admin:
        config = admin.config_get("*")
    assert int(config["maxmemory"]) == 192 * MIB  # 75% of the 256 MB flavor
    assert config["maxmemory-policy"] == "noeviction"
    assert (config["appendonly"], config["appendfsync"]) == ("yes", "everysec")
    assert config["save"] == "3600 1 300 100 60 10000"
    assert config["dir"] == str(datastore.layout.data_dir)
    assert config["bind"] == f"{redis_engine.private} {redis_engine.public}"
    assert (config["port"], config["protected-mode"]) == (str(PORT), "yes")
    assert config["aclfile"] == str(datastore.acl_file)
    assert config["enable-protected-configs"] == "no"
    assert (config["enable-debug-command"], config["enable-module-command"]) == ("no", "no")
    assert (datastore.layout.data_dir / "appendonlydir").is_dir()


def test_maxmemory_follows_the_flavor_and_nothing_is_evicted(engine_user: str) -> None:
    """A 128 MB flavor: maxmemory 96 MB; a full instance refuses writes and keeps its keys."""
    with instance_root() as root:
        address = free_loopback_address("127.10.249")
        with running_datastore(make_spec(root, [address], engine_user, memory_mb=128)) as small:
            small.create_users([{"name": "filler", "password": "fill-pw"}])
            with admin_client(small) as admin:
                assert int(admin.config_get("maxmemory")["maxmemory"]) == 96 * MIB
            value = "x" * (8 * MIB)
            written = 0
            with login(address, "filler", "fill-pw") as client:
                with pytest.raises(redis.exceptions.OutOfMemoryError):
                    for written in range(40):
                        client.set(f"block-{written}", value)
                assert written >= 8
                assert client.dbsize() == written  # every accepted write is still there
                assert client.strlen("block-0") == len(value)


def test_volume_stats(redis_engine: RunningRedis) -> None:
    stats = redis_engine.datastore.volume_stats()
    assert stats["total"] == 1024**3
    assert 0 < stats["used"] < stats["total"]


# -- users ----------------------------------------------------------------------------------------


def test_users_create_show_update_delete(redis_engine: RunningRedis) -> None:
    datastore, address = redis_engine.datastore, redis_engine.private
    datastore.create_users([{"name": "carol", "password": "carol-pw-1"}])
    with login(address, "carol", "carol-pw-1") as client:
        client.set("carol-key", "1")
    assert datastore.get_user("carol") == {"name": "carol", "host": "%", "databases": []}
    names = {u["name"] for u in datastore.list_users()[0]}
    assert {"app", "carol"} <= names
    assert not names & {"default", "os_admin", datastore.os_user}
    with pytest.raises(UserAlreadyExists):
        datastore.create_users(
            [{"name": "dave", "password": "dave-pw"}, {"name": "carol", "password": "x"}]
        )
    with pytest.raises(UserNotFound):
        datastore.get_user("dave")  # the good entry before the bad one was not created
    assert login_refused(address, "dave", "dave-pw")

    datastore.update_user("carol", "%", {"password": "carol-pw-2"})
    assert login_refused(address, "carol", "carol-pw-1")
    login(address, "carol", "carol-pw-2").close()

    held = login(address, "carol", "carol-pw-2")
    datastore.update_user("carol", "%", {"name": "caroline"})
    assert login_refused(address, "carol", "carol-pw-2")
    with login(address, "caroline", "carol-pw-2") as client:  # the password followed
        assert client.get("carol-key") == "1"
        assert client.execute_command("ACL", "WHOAMI") == "caroline"
    with pytest.raises(redis.ConnectionError):  # the old name's sessions were closed
        held.ping()
    held.close()

    datastore.update_user("caroline", "%", {"name": "carol", "password": "carol-pw-3"})
    assert login_refused(address, "caroline", "carol-pw-2")
    assert login_refused(address, "carol", "carol-pw-2")
    login(address, "carol", "carol-pw-3").close()
    datastore.update_user("carol", "%", {"host": "%"})  # the only host there is
    with pytest.raises(ValidationError, match="no host-based access control"):
        datastore.update_user("carol", "%", {"host": "10.0.0.1"})
    with pytest.raises(ValidationError, match="no host-based access control"):
        datastore.get_user("carol", "10.0.0.1")

    datastore.create_users([{"name": "erin", "password": "erin-pw"}])
    with pytest.raises(UserAlreadyExists):
        datastore.update_user("erin", "%", {"name": "app"})
    with pytest.raises(UserNotFound):
        datastore.change_passwords(
            [{"name": "erin", "password": "erin-pw-2"}, {"name": "nobody", "password": "x"}]
        )
    login(address, "erin", "erin-pw").close()  # nothing changed
    datastore.change_passwords([{"name": "erin", "password": "erin-pw-2"}])
    assert login_refused(address, "erin", "erin-pw")
    login(address, "erin", "erin-pw-2").close()

    datastore.delete_user("erin")
    datastore.delete_user("carol", "%")
    assert login_refused(address, "erin", "erin-pw-2")
    assert login_refused(address, "carol", "carol-pw-3")
    with pytest.raises(UserNotFound):
        datastore.delete_user("erin")
    with pytest.raises(UserNotFound):
        datastore.update_user("erin", "%", {"password": "x"})
    assert {u["name"] for u in datastore.list_users()[0]} == {"app"}
    # Every change was saved: the file Redis loads at start agrees with the engine.
    saved = datastore.acl_file.read_text()
    assert "user app " in saved and "carol" not in saved and "erin" not in saved


def test_users_page_in_order(redis_engine: RunningRedis) -> None:
    datastore = redis_engine.datastore
    datastore.create_users([{"name": f"pager{i}", "password": "pw"} for i in range(5)])
    everyone = [f"{u['name']}@{u['host']}" for u in datastore.list_users()[0]]
    seen: list[str] = []
    marker = None
    while True:
        page, marker = datastore.list_users(limit=2, marker=marker)
        seen += [f"{u['name']}@{u['host']}" for u in page]
        if marker is None:
            break
    assert seen == everyone == sorted(everyone)
    assert len(everyone) == 6
    for i in range(5):
        datastore.delete_user(f"pager{i}")


def test_passwords_that_look_like_acl_rules_are_only_passwords(
    redis_engine: RunningRedis,
) -> None:
    datastore, address = redis_engine.datastore, redis_engine.private
    for password in ("nopass", "<x", "~*", "+@all", "#abc", "(resetpass)", "on>x"):
        datastore.create_users([{"name": "quirky", "password": password}])
        try:
            with (
                login(address, "quirky", password) as client,
                pytest.raises(redis.exceptions.NoPermissionError),
            ):
                client.execute_command("ACL", "LIST")
            assert login_refused(address, "quirky", "something-else")
        finally:
            datastore.delete_user("quirky")


# -- root -----------------------------------------------------------------------------------------


def test_enable_and_disable_root(redis_engine: RunningRedis) -> None:
    datastore, address = redis_engine.datastore, redis_engine.private
    assert datastore.is_root_enabled() is False
    assert login_refused(address, "default", "root-pw-1")
    # A client that does not AUTH is the default user, which is off: it may do nothing.
    with socket.create_connection((address, PORT), timeout=5) as anonymous:
        anonymous.sendall(b"GET greeting\r\n")
        assert anonymous.recv(100).startswith(b"-NOAUTH")

    assert datastore.enable_root("root-pw-1") == {"name": "default", "password": "root-pw-1"}
    assert datastore.is_root_enabled() is True
    with login(address, "default", "root-pw-1") as root:
        assert int(root.config_get("maxmemory")["maxmemory"]) == 192 * MIB
        # Root still cannot point Redis at other instances' files.
        with pytest.raises(redis.ResponseError, match="protected"):
            root.config_set("dir", "/tmp")
    with login(address, None, "root-pw-1") as root:  # AUTH <password> means the default user
        assert root.get("greeting") == "hello"

    generated = datastore.enable_root()
    assert generated["name"] == "default" and len(generated["password"]) >= 20
    assert login_refused(address, "default", "root-pw-1")
    held = login(address, "default", generated["password"])
    assert "default" not in {u["name"] for u in datastore.list_users()[0]}

    datastore.disable_root()
    assert datastore.is_root_enabled() is False
    assert login_refused(address, "default", generated["password"])
    with pytest.raises(redis.ConnectionError):  # open root sessions were closed
        held.ping()
    held.close()
    datastore.disable_root()  # idempotent
    assert datastore.is_root_enabled() is False


# -- refused: hostile input and databases ---------------------------------------------------------


def test_hostile_input_is_refused_before_reaching_the_engine(redis_engine: RunningRedis) -> None:
    datastore = redis_engine.datastore
    before = acl_state(redis_engine)
    bad_names = [
        "bob nopass",
        "bob on nopass ~* +@all",
        "bob\n",
        ">pw",
        "<pw",
        "#abc",
        "~*",
        "%R~x",
        "&*",
        "+@all",
        "-@all",
        "(~x",
        "@x",
        "-x",
        ".x",
        'bob"',
        "bob'",
        "bob\\",
        "bob;",
        "a" * 65,
        "",
        "default",
        "Default",
        "os_admin",
        "root",
        datastore.os_user,
    ]
    calls: list[Callable[[], Any]] = []
    for name in bad_names:
        calls += [
            lambda n=name: datastore.create_users([{"name": n, "password": "pw"}]),
            lambda n=name: datastore.delete_user(n),
            lambda n=name: datastore.get_user(n),
            lambda n=name: datastore.update_user("app", "%", {"name": n}),
            lambda n=name: datastore.update_user(n, "%", {"password": "pw"}),
            lambda n=name: datastore.change_passwords([{"name": n, "password": "pw"}]),
            lambda n=name: datastore.prepare([], [{"name": n, "password": "pw"}]),
        ]
    for password in ["pw nopass", "pw\n", "pw\x00", "", " pw", "p" * 513]:
        calls += [
            lambda p=password: datastore.create_users([{"name": "ok_user", "password": p}]),
            lambda p=password: datastore.update_user("app", "%", {"password": p}),
            lambda p=password: datastore.change_passwords([{"name": "app", "password": p}]),
            lambda p=password: datastore.enable_root(p),
        ]
    calls += [
        lambda: datastore.create_users([{"name": "ok_user", "password": "pw", "host": "1.2.3.4"}]),
        lambda: datastore.create_users([{"name": "ok_user"}]),
        lambda: datastore.create_users([{"name": "ok_user", "password": 5}]),
        lambda: datastore.create_users("ok_user"),  # type: ignore[arg-type]
        lambda: datastore.update_user("app", "%", {"name": "x", "admin": True}),
        lambda: datastore.update_user("app", "%", {}),
        # A good entry before a bad one must not be created either.
        lambda: datastore.create_users(
            [{"name": "ok_user", "password": "pw"}, {"name": "bad user", "password": "pw"}]
        ),
        lambda: datastore.create_users(
            [{"name": "twin", "password": "pw"}, {"name": "twin", "password": "pw"}]
        ),
    ]
    for call in calls:
        with pytest.raises(ValidationError):
            call()
    assert acl_state(redis_engine) == before
    login(redis_engine.private, "app", APP_PASSWORD).close()


def test_database_operations_are_refused_clearly(redis_engine: RunningRedis) -> None:
    datastore = redis_engine.datastore
    assert Capability.DATABASES not in datastore.capabilities
    assert {Capability.USERS, Capability.ROOT, Capability.BACKUP, Capability.LOGS} == set(
        datastore.capabilities
    )
    before = acl_state(redis_engine)
    calls: list[Callable[[], Any]] = [
        lambda: datastore.create_databases([{"name": "app_db"}]),
        lambda: datastore.list_databases(),
        lambda: datastore.delete_database("0"),
        lambda: datastore.grant_access("app", "%", ["0"]),
        lambda: datastore.list_access("app"),
        lambda: datastore.revoke_access("app", "%", "0"),
        lambda: datastore.prepare([{"name": "app_db"}], []),
        lambda: datastore.create_users(
            [{"name": "ok_user", "password": "pw", "databases": [{"name": "app_db"}]}]
        ),
        lambda: redis_rules.validate_database({"name": "app_db"}),
    ]
    for call in calls:
        with pytest.raises(NotImplementedByDatastore) as info:
            call()
        assert info.value.status == 501
        assert "numbered keyspaces" in info.value.message
    assert acl_state(redis_engine) == before


# -- lifecycle: persistence, adoption, stop, crash, repair ----------------------------------------


def test_data_users_and_root_survive_stop_and_start(redis_engine: RunningRedis) -> None:
    datastore, address = redis_engine.datastore, redis_engine.private
    password = datastore.password_file.read_text()
    datastore.create_users([{"name": "keeper", "password": "keeper-pw"}])
    datastore.enable_root("root-pw-keep")
    with login(address, "app", APP_PASSWORD) as client:
        client.set("persisted", "yes")
        client.rpush("persisted-list", *range(100))

    datastore.stop()
    assert datastore.status() is ServiceStatus.SHUTDOWN
    assert not datastore.is_running()
    assert engine_pids(redis_engine.marker) == []
    with pytest.raises(redis.ConnectionError):
        login(address, "app", APP_PASSWORD)
    datastore.stop()  # stopping a stopped engine is a no-op
    # A fresh object on a stopped instance sees it stopped, not crashed.
    assert RedisDatastore(datastore.spec).status() is ServiceStatus.SHUTDOWN

    started = time.monotonic()
    datastore.start()
    assert time.monotonic() - started < 10
    assert datastore.status() is ServiceStatus.HEALTHY
    assert datastore.password_file.read_text() == password
    with login(address, "keeper", "keeper-pw") as client:
        assert client.get("persisted") == "yes"
        assert client.llen("persisted-list") == 100
    login(address, "default", "root-pw-keep").close()
    assert datastore.is_root_enabled() is True
    datastore.disable_root()
    datastore.delete_user("keeper")


def test_second_datastore_adopts_the_running_engine(redis_engine: RunningRedis) -> None:
    (pid,) = engine_pids(redis_engine.marker)
    again = RedisDatastore(redis_engine.datastore.spec)
    assert again.is_running()
    again.start()
    again.prepare([], [{"name": "app", "password": APP_PASSWORD}])  # idempotent
    assert engine_pids(redis_engine.marker) == [pid]
    assert again.status() is ServiceStatus.HEALTHY
    assert [u["name"] for u in again.list_users()[0]] == ["app"]
    login(redis_engine.private, "app", APP_PASSWORD).close()


def test_refuses_to_run_the_engine_as_root(redis_engine: RunningRedis) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root could start an engine as root")
    spec = redis_engine.datastore.spec
    for run_as in (None, "root"):
        with pytest.raises(UnsafeEngineUser, match="root"):
            RedisDatastore(make_spec(spec.layout.root, spec.bind_addresses, run_as))


def test_crash_is_reported_and_recovered(redis_engine: RunningRedis) -> None:
    datastore = redis_engine.datastore
    (pid,) = engine_pids(redis_engine.marker)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while datastore.is_running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert datastore.status() is ServiceStatus.CRASHED
    # An agent restarted after the crash sees the same thing through the pid file.
    assert RedisDatastore(datastore.spec).status() is ServiceStatus.CRASHED
    datastore.start()
    assert datastore.status() is ServiceStatus.HEALTHY
    with login(redis_engine.private, "app", APP_PASSWORD) as client:
        assert client.get("persisted") == "yes"


def test_a_broken_admin_account_is_blocked_then_repaired_by_a_restart(
    redis_engine: RunningRedis,
) -> None:
    datastore = redis_engine.datastore
    with admin_client(datastore) as admin:
        admin.execute_command("ACL", "SETUSER", "os_admin", "resetpass", ">someone-else")
        admin.execute_command("ACL", "SAVE")
    assert datastore.status() is ServiceStatus.BLOCKED
    with pytest.raises(EngineError, match="rejects Coffer's admin password"):
        datastore.list_users()
    datastore.restart()
    assert datastore.status() is ServiceStatus.HEALTHY
    assert [u["name"] for u in datastore.list_users()[0]] == ["app"]


def test_a_copied_volume_gets_its_own_admin_password(
    redis_engine: RunningRedis, engine_user: str
) -> None:
    """Copy a stopped instance's data and users: the copy starts with new admin credentials."""
    source = redis_engine.datastore
    source.stop()
    try:
        with instance_root() as root:
            address = free_loopback_address("127.10.249")
            spec = make_spec(root, [address], engine_user)
            spec.layout.create(engine_user)
            shutil.copy2(source.acl_file, spec.layout.etc_dir / "users.acl")
            spec.layout.data_dir.rmdir()
            shutil.copytree(source.layout.data_dir, spec.layout.data_dir)
            owner = pwd.getpwnam(engine_user)
            for path in spec.layout.root.rglob("*"):
                os.chown(path, owner.pw_uid, owner.pw_gid)
            with running_datastore(spec) as copy:
                assert copy.status() is ServiceStatus.HEALTHY
                assert copy.password_file.read_text() != source.password_file.read_text()
                with login(address, "app", APP_PASSWORD) as client:
                    assert client.get("persisted") == "yes"
                assert copy.is_root_enabled() is False
    finally:
        source.start()
    assert source.status() is ServiceStatus.HEALTHY


def test_an_engine_that_dies_at_start_is_reported(engine_user: str) -> None:
    """Port taken on the bind address: redis-server exits, start says why, nothing is left."""
    with instance_root() as root, socket.socket() as squatter:
        address = free_loopback_address("127.10.249")
        squatter.bind((address, PORT))
        squatter.listen()
        datastore = RedisDatastore(make_spec(root, [address], engine_user))
        try:
            with pytest.raises(EngineError, match="exited during start") as info:
                datastore.prepare([], [])
            assert "already in use" in info.value.message
            assert datastore.password_file.read_text().strip() not in info.value.message
            assert datastore.status() is ServiceStatus.CRASHED
            assert engine_pids(str(datastore.config_file)) == []
        finally:
            kill_engines(str(datastore.config_file))
