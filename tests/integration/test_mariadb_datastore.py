"""MariaDBDatastore against a real mariadbd, checked with real logins over TCP.

One engine serves the whole module (prepared once); later tests stop, crash and restart it, and
one copies its data directory to a second instance. Tests run in file order.
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

import pymysql
import pytest
from mariadb_fixtures import (
    PORT,
    RunningMariaDB,
    admin_connection,
    engine_pids,
    free_loopback_address,
    instance_root,
    kill_engines,
    login,
    login_error,
    make_spec,
)

from coffer.errors import (
    DatabaseAlreadyExists,
    DatabaseNotFound,
    EngineError,
    UserAlreadyExists,
    UserNotFound,
    ValidationError,
)
from coffer.guest.datastores.mariadb import MariaDBDatastore
from coffer.guest.datastores.process import UnsafeEngineUser
from coffer.status import ServiceStatus

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(MariaDBDatastore.detect_version() is None, reason="mariadbd not installed"),
]

APP_PASSWORD = "app-Pass-1"
# MariaDB reports a refused login as 1045 or, depending on the account the name matched, 1698.
ACCESS_DENIED = frozenset({1045, 1698})
DB_ACCESS_DENIED = 1044
TABLE_ACCESS_DENIED = 1142


@pytest.fixture(scope="module")
def mariadb(engine_user: str) -> Iterator[RunningMariaDB]:
    with instance_root() as root:
        private = free_loopback_address("127.10.250")
        public = free_loopback_address("127.20.250")
        datastore = MariaDBDatastore(make_spec(root, [private, public], engine_user))
        marker = f"--defaults-file={datastore.config_file}"
        try:
            started = time.monotonic()
            datastore.prepare(
                [{"name": "app_db"}, {"name": "other_db"}],
                [{"name": "app", "password": APP_PASSWORD, "databases": [{"name": "app_db"}]}],
            )
            yield RunningMariaDB(datastore, private, public, time.monotonic() - started)
        finally:
            try:
                datastore.stop(timeout=20)
            finally:
                kill_engines(marker)


def statement_counters(running: RunningMariaDB) -> dict[str, int]:
    """How many DDL/DCL statements the server has executed, by kind."""
    with admin_connection(running.datastore) as conn, conn.cursor() as cur:
        cur.execute(
            "SHOW GLOBAL STATUS WHERE Variable_name IN ('Com_create_db', 'Com_drop_db', "
            "'Com_create_user', 'Com_drop_user', 'Com_grant', 'Com_revoke', 'Com_alter_user', "
            "'Com_rename_user', 'Com_create_table', 'Com_drop_table')"
        )
        return {str(name): int(value) for name, value in cur.fetchall()}


def create_table(address: str, user: str, password: str, database: str, table: str) -> None:
    with login(address, user, password, database) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE TABLE `{table}` (id INT PRIMARY KEY)")


# -- prepare, addresses and the engine's shape ---------------------------------------------------


def test_prepared_user_reaches_only_its_database(mariadb: RunningMariaDB) -> None:
    create_table(mariadb.private, "app", APP_PASSWORD, "app_db", "t_private")
    # The public address serves the same server.
    create_table(mariadb.public, "app", APP_PASSWORD, "app_db", "t_public")
    with login(mariadb.private, "app", APP_PASSWORD) as conn, conn.cursor() as cur:
        with pytest.raises(pymysql.err.OperationalError) as info:
            cur.execute("CREATE TABLE other_db.t (id INT)")
        assert info.value.args[0] == TABLE_ACCESS_DENIED
    assert login_error(mariadb.private, "app", APP_PASSWORD, "other_db") == DB_ACCESS_DENIED
    assert login_error(mariadb.private, "app", "wrong-password") in ACCESS_DENIED


def test_listens_only_on_its_bind_addresses(mariadb: RunningMariaDB) -> None:
    elsewhere = free_loopback_address("127.10.251")
    with pytest.raises(pymysql.err.OperationalError) as info:
        pymysql.connect(host=elsewhere, port=PORT, user="app", password="x", connect_timeout=2)
    assert info.value.args[0] == 2003  # refused: nothing listens on other addresses


def test_engine_runs_unprivileged_with_flavor_settings(mariadb: RunningMariaDB) -> None:
    datastore = mariadb.datastore
    assert datastore.status() is ServiceStatus.HEALTHY
    (pid,) = engine_pids(mariadb.marker)
    uid = os.stat(f"/proc/{pid}").st_uid
    assert uid != 0
    assert pwd.getpwuid(uid).pw_name == datastore.os_user
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
    password = datastore.password_file.read_text().strip()
    assert password not in argv
    assert not (datastore.layout.secrets_dir / "init.sql").exists()
    assert stat.S_IMODE(datastore.password_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(datastore.layout.secrets_dir.stat().st_mode) == 0o700
    with admin_connection(datastore) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT @@innodb_buffer_pool_size, @@max_connections, @@performance_schema, "
            "@@skip_name_resolve, @@character_set_server, @@local_infile, @@secure_file_priv"
        )
        pool, connections, perf, skip_resolve, charset, local_infile, file_priv = cur.fetchone()
    assert pool == 64 * 1024 * 1024  # 256 MB flavor: max(32, min(128, 64))
    assert connections == 42
    assert (perf, skip_resolve, charset, local_infile) == (0, 1, "utf8mb4", 0)
    assert file_priv.rstrip("/") == str(datastore.layout.run_dir / "files")


def test_volume_stats(mariadb: RunningMariaDB) -> None:
    stats = mariadb.datastore.volume_stats()
    assert stats["total"] == 1024**3
    assert 10 * 1024**2 < stats["used"] < stats["total"]


# -- databases ---------------------------------------------------------------------------------


def test_databases_create_list_delete(mariadb: RunningMariaDB) -> None:
    datastore = mariadb.datastore
    datastore.create_databases(
        [
            {"name": "shop_1", "character_set": "latin1"},
            {"name": "shop 2", "collate": "utf8mb4_bin"},
        ]
    )
    listed = {db["name"]: db for db in datastore.list_databases()[0]}
    assert {"app_db", "other_db", "shop_1", "shop 2"} <= set(listed)
    assert not {"mysql", "sys", "information_schema", "performance_schema"} & set(listed)
    assert listed["shop_1"]["character_set"] == "latin1"
    assert listed["shop 2"]["collate"] == "utf8mb4_bin"
    assert listed["app_db"]["character_set"] == "utf8mb4"

    with pytest.raises(DatabaseAlreadyExists):
        datastore.create_databases([{"name": "fresh_db"}, {"name": "shop_1"}])
    assert "fresh_db" not in {db["name"] for db in datastore.list_databases()[0]}
    with pytest.raises(ValidationError, match="not a collation of character set"):
        datastore.create_databases([{"name": "odd_db", "collate": "utf8mb4_no_such_ci"}])

    page, marker = datastore.list_databases(limit=2)
    seen = [db["name"] for db in page]
    while marker is not None:
        page, marker = datastore.list_databases(limit=2, marker=marker)
        seen += [db["name"] for db in page]
    assert seen == sorted(listed)

    datastore.delete_database("shop_1")
    datastore.delete_database("shop 2")
    assert not {"shop_1", "shop 2"} & {db["name"] for db in datastore.list_databases()[0]}
    with pytest.raises(DatabaseNotFound):
        datastore.delete_database("shop_1")


# -- users -------------------------------------------------------------------------------------


def test_users_create_show_update_delete(mariadb: RunningMariaDB) -> None:
    datastore, address = mariadb.datastore, mariadb.private
    datastore.create_users(
        [{"name": "carol", "password": "carol-pw-1", "databases": [{"name": "app_db"}]}]
    )
    create_table(address, "carol", "carol-pw-1", "app_db", "t_carol")
    assert datastore.get_user("carol") == {
        "name": "carol",
        "host": "%",
        "databases": [{"name": "app_db"}],
    }
    names = {(u["name"], u["host"]) for u in datastore.list_users()[0]}
    assert {("app", "%"), ("carol", "%")} <= names
    assert not {n for n, _ in names} & {"root", "os_admin", "mariadb.sys", datastore.os_user}
    with pytest.raises(UserAlreadyExists):
        datastore.create_users(
            [{"name": "dave", "password": "pw"}, {"name": "carol", "password": "x"}]
        )
    with pytest.raises(UserNotFound):
        datastore.get_user("dave")
    with pytest.raises(DatabaseNotFound):
        datastore.create_users([{"name": "dave", "password": "pw", "databases": ["no_such_db"]}])

    datastore.update_user("carol", "%", {"password": "carol-pw-2"})
    assert login_error(address, "carol", "carol-pw-1") in ACCESS_DENIED
    create_table(address, "carol", "carol-pw-2", "app_db", "t_carol_2")

    datastore.update_user("carol", "%", {"name": "caroline"})
    assert login_error(address, "carol", "carol-pw-2") in ACCESS_DENIED
    # The grants followed the rename.
    create_table(address, "caroline", "carol-pw-2", "app_db", "t_caroline")

    datastore.update_user("caroline", "%", {"host": "10.9.9.9"})
    assert login_error(address, "caroline", "carol-pw-2") in ACCESS_DENIED
    datastore.update_user("caroline", "10.9.9.9", {"host": "127.0.0.0/8", "password": "c-pw-3"})
    assert datastore.get_user("caroline", "127.0.0.0/8")["host"] == "127.0.0.0/255.0.0.0"
    create_table(address, "caroline", "c-pw-3", "app_db", "t_caroline_2")

    datastore.create_users([{"name": "erin", "password": "erin-pw"}])
    with pytest.raises(UserAlreadyExists):
        datastore.update_user("erin", "%", {"name": "app"})
    datastore.change_passwords([{"name": "erin", "password": "erin-pw-2"}])
    assert login_error(address, "erin", "erin-pw") in ACCESS_DENIED
    login(address, "erin", "erin-pw-2").close()

    datastore.delete_user("erin")
    datastore.delete_user("caroline", "127.0.0.0/8")
    assert login_error(address, "erin", "erin-pw-2") in ACCESS_DENIED
    assert login_error(address, "caroline", "c-pw-3") in ACCESS_DENIED
    with pytest.raises(UserNotFound):
        datastore.delete_user("erin")
    with pytest.raises(UserNotFound):
        datastore.change_passwords([{"name": "erin", "password": "x"}])


def test_users_page_in_order(mariadb: RunningMariaDB) -> None:
    datastore = mariadb.datastore
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
    for i in range(5):
        datastore.delete_user(f"pager{i}")


# -- access ------------------------------------------------------------------------------------


def test_grant_list_revoke_access(mariadb: RunningMariaDB) -> None:
    datastore, address = mariadb.datastore, mariadb.private
    datastore.create_databases([{"name": "wild_card"}, {"name": "wildXcard"}])
    datastore.create_users([{"name": "frank", "password": "frank-pw"}])
    assert datastore.list_access("frank") == []

    datastore.grant_access("frank", "%", ["app_db", "wild_card"])
    assert datastore.list_access("frank") == [{"name": "app_db"}, {"name": "wild_card"}]
    create_table(address, "frank", "frank-pw", "app_db", "t_frank")
    create_table(address, "frank", "frank-pw", "wild_card", "t_frank")
    # '_' is a wildcard in grants; Coffer's grant on wild_card must not open wildXcard.
    assert login_error(address, "frank", "frank-pw", "wildXcard") == DB_ACCESS_DENIED

    held = login(address, "frank", "frank-pw")
    datastore.revoke_access("frank", "%", "app_db")
    assert datastore.list_access("frank") == [{"name": "wild_card"}]
    assert login_error(address, "frank", "frank-pw", "app_db") == DB_ACCESS_DENIED
    with held.cursor() as cur, pytest.raises(pymysql.err.OperationalError):
        cur.execute("CREATE TABLE app_db.t_after_revoke (id INT)")
    held.close()
    datastore.revoke_access("frank", "%", "app_db")  # already revoked: nothing to do

    # Dropping a database drops its grants: a new database of that name is not frank's.
    datastore.delete_database("wild_card")
    assert datastore.list_access("frank") == []
    datastore.create_databases([{"name": "wild_card"}])
    assert login_error(address, "frank", "frank-pw", "wild_card") == DB_ACCESS_DENIED

    with pytest.raises(DatabaseNotFound):
        datastore.grant_access("frank", "%", ["no_such_db"])
    with pytest.raises(UserNotFound):
        datastore.grant_access("nobody", "%", ["app_db"])
    datastore.delete_user("frank")
    datastore.delete_database("wild_card")
    datastore.delete_database("wildXcard")


# -- root --------------------------------------------------------------------------------------


def test_enable_and_disable_root(mariadb: RunningMariaDB) -> None:
    datastore, address = mariadb.datastore, mariadb.private
    assert datastore.is_root_enabled() is False
    assert login_error(address, "root", "root-pw-1") in ACCESS_DENIED

    assert datastore.enable_root("root-pw-1") == {"name": "root", "password": "root-pw-1"}
    assert datastore.is_root_enabled() is True
    with login(address, "root", "root-pw-1") as conn, conn.cursor() as cur:
        cur.execute("CREATE DATABASE root_made")
        cur.execute("DROP DATABASE root_made")

    generated = datastore.enable_root()
    assert generated["name"] == "root" and len(generated["password"]) >= 20
    assert login_error(address, "root", "root-pw-1") in ACCESS_DENIED
    login(address, "root", generated["password"]).close()
    assert "root" not in {u["name"] for u in datastore.list_users()[0]}

    datastore.disable_root()
    assert datastore.is_root_enabled() is False
    assert login_error(address, "root", generated["password"]) in ACCESS_DENIED
    datastore.disable_root()  # idempotent


# -- hostile input -----------------------------------------------------------------------------


def test_hostile_input_is_refused_before_reaching_the_engine(mariadb: RunningMariaDB) -> None:
    datastore = mariadb.datastore
    before = (statement_counters(mariadb), datastore.list_databases(), datastore.list_users())
    bad_db_names = [
        "x`; DROP DATABASE app_db; --",
        "a'b",
        "a\\b",
        "a;b",
        "a" * 65,
        "",
        "mysql",
        "information_schema",
        "performance_schema",
        "sys",
    ]
    bad_user_names = [
        "bob'; DROP USER app; --",
        'bob"',
        "bob\\",
        "bob;",
        "a" * 81,
        "",
        " bob",
        "root",
        "os_admin",
        "mariadb.sys",
        datastore.os_user,
    ]
    calls: list[Callable[[], Any]] = []
    for name in bad_db_names:
        calls += [
            lambda n=name: datastore.create_databases([{"name": n}]),
            lambda n=name: datastore.delete_database(n),
            lambda n=name: datastore.grant_access("app", "%", [n]),
            lambda n=name: datastore.revoke_access("app", "%", n),
            lambda n=name: datastore.create_users(
                [{"name": "ok_user", "password": "pw", "databases": [{"name": n}]}]
            ),
        ]
    for name in bad_user_names:
        calls += [
            lambda n=name: datastore.create_users([{"name": n, "password": "pw"}]),
            lambda n=name: datastore.delete_user(n),
            lambda n=name: datastore.get_user(n),
            lambda n=name: datastore.update_user("app", "%", {"name": n}),
            lambda n=name: datastore.change_passwords([{"name": n, "password": "pw"}]),
            lambda n=name: datastore.grant_access(n, "%", ["app_db"]),
        ]
    calls += [
        lambda: datastore.create_users([{"name": "ok_user", "password": "pw'; DROP USER app"}]),
        lambda: datastore.create_users([{"name": "ok_user", "password": ""}]),
        lambda: datastore.create_users([{"name": "ok_user", "password": "pw", "host": "%'--"}]),
        lambda: datastore.create_users(
            [{"name": "ok_user", "password": "pw", "host": "localhost"}]
        ),
        lambda: datastore.update_user("app", "%", {"password": "x`y"}),
        lambda: datastore.enable_root("pw; DROP DATABASE app_db"),
        lambda: datastore.create_databases([{"name": "ok_db", "character_set": "utf8; DROP"}]),
        # A good entry before a bad one must not be created either.
        lambda: datastore.create_databases([{"name": "ok_db"}, {"name": "bad;db"}]),
        lambda: datastore.create_users(
            [{"name": "ok_user", "password": "pw"}, {"name": "bad'user", "password": "pw"}]
        ),
    ]
    for call in calls:
        with pytest.raises(ValidationError):
            call()
    after = (statement_counters(mariadb), datastore.list_databases(), datastore.list_users())
    assert after == before
    login(mariadb.private, "app", APP_PASSWORD, "app_db").close()


# -- lifecycle: adoption, stop, crash, copies ----------------------------------------------------


def test_second_datastore_adopts_the_running_engine(mariadb: RunningMariaDB) -> None:
    (pid,) = engine_pids(mariadb.marker)
    again = MariaDBDatastore(mariadb.datastore.spec)
    assert again.is_running()
    again.start()
    again.prepare([{"name": "app_db"}], [])  # idempotent: nothing new, no second engine
    assert engine_pids(mariadb.marker) == [pid]
    assert again.status() is ServiceStatus.HEALTHY
    assert "app_db" in {db["name"] for db in again.list_databases()[0]}


def test_refuses_to_run_the_engine_as_root(mariadb: RunningMariaDB) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root could start an engine as root")
    spec = mariadb.datastore.spec
    for run_as in (None, "root"):
        with pytest.raises(UnsafeEngineUser, match="root"):
            MariaDBDatastore(make_spec(spec.layout.root, spec.bind_addresses, run_as))


def test_stop_crash_and_restart(mariadb: RunningMariaDB) -> None:
    datastore = mariadb.datastore
    password = datastore.password_file.read_text()
    datastore.stop()
    assert datastore.status() is ServiceStatus.SHUTDOWN
    assert not datastore.is_running()
    assert engine_pids(mariadb.marker) == []
    with pytest.raises(pymysql.err.OperationalError):
        login(mariadb.private, "app", APP_PASSWORD)
    datastore.stop()  # stopping a stopped engine is a no-op
    # A fresh object on a stopped instance sees it stopped, not crashed.
    assert MariaDBDatastore(datastore.spec).status() is ServiceStatus.SHUTDOWN

    datastore.start()
    assert datastore.status() is ServiceStatus.HEALTHY
    assert datastore.password_file.read_text() == password
    create_table(mariadb.private, "app", APP_PASSWORD, "app_db", "t_after_restart")

    (pid,) = engine_pids(mariadb.marker)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while datastore.is_running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert datastore.status() is ServiceStatus.CRASHED
    # An agent restarted after the crash sees the same thing through the pid file.
    assert MariaDBDatastore(datastore.spec).status() is ServiceStatus.CRASHED
    datastore.start()
    assert datastore.status() is ServiceStatus.HEALTHY
    create_table(mariadb.private, "app", APP_PASSWORD, "app_db", "t_after_crash")


def test_a_copied_data_dir_gets_its_own_admin_password(
    mariadb: RunningMariaDB, engine_user: str
) -> None:
    """The template optimisation: copy a stopped data directory, start it, new credentials."""
    source = mariadb.datastore
    source.stop()
    try:
        with instance_root() as root:
            address = free_loopback_address("127.10.252")
            spec = make_spec(root, [address], engine_user)
            spec.layout.create(engine_user)
            spec.layout.data_dir.rmdir()
            shutil.copytree(source.layout.data_dir, spec.layout.data_dir)
            owner = pwd.getpwnam(engine_user)
            for path in [spec.layout.data_dir, *spec.layout.data_dir.rglob("*")]:
                os.chown(path, owner.pw_uid, owner.pw_gid)
            copy = MariaDBDatastore(spec)
            try:
                copy.prepare([], [])
                assert copy.status() is ServiceStatus.HEALTHY
                assert copy.password_file.read_text() != source.password_file.read_text()
                # The copy carries the template's data, reachable on the copy's own address.
                create_table(address, "app", APP_PASSWORD, "app_db", "t_in_copy")
            finally:
                try:
                    copy.stop(timeout=20)
                finally:
                    kill_engines(f"--defaults-file={copy.config_file}")
    finally:
        source.start()
    assert source.status() is ServiceStatus.HEALTHY


def test_an_engine_that_dies_at_start_is_reported(engine_user: str) -> None:
    """Port taken on the bind address: mariadbd exits, start says why, nothing is left over."""
    with instance_root() as root, socket.socket() as squatter:
        address = free_loopback_address("127.10.253")
        squatter.bind((address, PORT))
        squatter.listen()
        datastore = MariaDBDatastore(make_spec(root, [address], engine_user))
        try:
            with pytest.raises(EngineError, match="exited during start") as info:
                datastore.prepare([], [])
            assert "already in use" in info.value.message
            assert datastore.password_file.read_text().strip() not in info.value.message
            assert datastore.status() is ServiceStatus.CRASHED
            assert not (datastore.layout.secrets_dir / "init.sql").exists()
            assert engine_pids(f"--defaults-file={datastore.config_file}") == []
        finally:
            kill_engines(f"--defaults-file={datastore.config_file}")
