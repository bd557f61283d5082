"""PostgreSQLDatastore against a real postgres, checked with real psycopg logins over TCP.

One engine serves the whole module (prepared once); later tests narrow its allowed networks,
stop, crash and restart it, and copy its data directory to a second instance. Tests run in file
order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pwd
import shutil
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from postgresql_fixtures import (
    PORT,
    RunningPostgres,
    SourceRelay,
    admin_connection,
    engine_pids,
    engine_tree,
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
from coffer.guest.datastores.postgresql import PostgreSQLDatastore
from coffer.guest.datastores.process import UnsafeEngineUser
from coffer.status import ServiceStatus

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(PostgreSQLDatastore.detect_version() is None, reason="postgres missing"),
]

APP_PASSWORD = "app-Pass-1"
# Client addresses for the allowed-CIDR test; the server never takes them.
INSIDE, OUTSIDE = "127.10.251.77", "127.10.251.78"
BAD_PASSWORD = "password authentication failed"
NO_CONNECT = "permission denied for database"


@pytest.fixture(scope="module")
def postgres(engine_user: str) -> Iterator[RunningPostgres]:
    with instance_root() as root:
        private = free_loopback_address("127.10.251", avoid=(77, 78))
        public = free_loopback_address("127.20.251")
        datastore = PostgreSQLDatastore(make_spec(root, [private, public], engine_user))
        marker = f"--config-file={datastore.config_file}"
        try:
            started = time.monotonic()
            datastore.prepare(
                [{"name": "app_db"}, {"name": "other_db"}],
                [{"name": "app", "password": APP_PASSWORD, "databases": [{"name": "app_db"}]}],
            )
            yield RunningPostgres(datastore, private, public, time.monotonic() - started)
        finally:
            try:
                datastore.stop(timeout=20)
            finally:
                kill_engines(marker)


def create_table(
    address: str, user: str, password: str, database: str, table: str, port: int = PORT
) -> None:
    with login(address, user, password, database, port) as conn:
        conn.execute(
            psycopg.sql.SQL("CREATE TABLE {} (id int)").format(psycopg.sql.Identifier(table))
        )


def catalog_snapshot(datastore: PostgreSQLDatastore) -> tuple[list[Any], list[Any]]:
    """Every role (with its password verifier) and every database (with its ACL)."""
    with admin_connection(datastore) as conn:
        roles = conn.execute(
            "SELECT rolname, rolcanlogin, rolsuper, rolpassword FROM pg_authid ORDER BY 1"
        ).fetchall()
        databases = conn.execute(
            "SELECT datname, datacl::text, datdba FROM pg_database ORDER BY 1"
        ).fetchall()
    return roles, databases


# -- prepare, addresses and the engine's shape ---------------------------------------------------


def test_prepared_user_reaches_only_its_database(postgres: RunningPostgres) -> None:
    create_table(postgres.private, "app", APP_PASSWORD, "app_db", "t_private")
    # The public address serves the same server.
    create_table(postgres.public, "app", APP_PASSWORD, "app_db", "t_public")
    assert NO_CONNECT in login_error(postgres.private, "app", APP_PASSWORD, "other_db")
    assert NO_CONNECT in login_error(postgres.private, "app", APP_PASSWORD, "postgres")
    assert BAD_PASSWORD in login_error(postgres.private, "app", "wrong-password", "app_db")


def test_listens_only_on_its_bind_addresses(postgres: RunningPostgres) -> None:
    elsewhere = free_loopback_address("127.10.251", avoid=(77, 78))
    message = login_error(elsewhere, "app", APP_PASSWORD, "app_db")
    assert "Connection refused" in message


def test_the_agent_account_cannot_log_in_over_tcp(postgres: RunningPostgres) -> None:
    password = postgres.datastore.password_file.read_text().strip()
    for address in (postgres.private, postgres.public):
        message = login_error(address, "os_admin", password)
        assert "pg_hba.conf rejects connection" in message
        assert password not in message


def test_engine_runs_unprivileged_with_flavor_settings(postgres: RunningPostgres) -> None:
    datastore = postgres.datastore
    assert datastore.status() is ServiceStatus.HEALTHY
    (pid,) = engine_pids(postgres.marker)
    uid = os.stat(f"/proc/{pid}").st_uid
    assert uid != 0
    assert pwd.getpwuid(uid).pw_name == datastore.os_user
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
    password = datastore.password_file.read_text().strip()
    assert password not in argv
    assert password not in datastore.log_file.read_text()
    assert not (datastore.layout.secrets_dir / "initdb.pwfile").exists()
    assert stat.S_IMODE(datastore.password_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(datastore.layout.secrets_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(datastore.socket.stat().st_mode) == 0o700
    names = (
        "shared_buffers",
        "effective_cache_size",
        "max_connections",
        "work_mem",
        "max_wal_size",
        "listen_addresses",
        "password_encryption",
        "logging_collector",
        "server_encoding",
        "lc_collate",
    )
    with admin_connection(datastore) as conn:
        settings = {name: conn.execute(f"SHOW {name}").fetchone()[0] for name in names}
        hba_errors = conn.execute(
            "SELECT count(*) FROM pg_hba_file_rules WHERE error IS NOT NULL"
        ).fetchone()[0]
    assert settings == {
        "shared_buffers": "64MB",  # 256 MB flavor: a quarter
        "effective_cache_size": "192MB",
        "max_connections": "32",
        "work_mem": "4MB",
        "max_wal_size": "128MB",  # 1 GB volume: an eighth
        "listen_addresses": f"{postgres.private},{postgres.public}",
        "password_encryption": "scram-sha-256",
        "logging_collector": "off",
        "server_encoding": "UTF8",
        "lc_collate": "C.UTF-8",
    }
    assert hba_errors == 0
    # A small idle footprint: the background processes PostgreSQL needs and no logger or
    # logical replication launcher. (Client backends still exiting and autovacuum workers come
    # and go, so the processes are not simply counted.)
    titles = {
        Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace").strip("\0 ")
        for p in engine_tree(postgres.marker)
    }
    assert {
        "postgres: checkpointer",
        "postgres: background writer",
        "postgres: walwriter",
        "postgres: autovacuum launcher",
    } <= titles, titles
    assert not any("logger" in t or "logical replication" in t for t in titles), titles


def test_volume_stats(postgres: RunningPostgres) -> None:
    stats = postgres.datastore.volume_stats()
    assert stats["total"] == 1024**3
    assert 10 * 1024**2 < stats["used"] < stats["total"]


# -- databases ---------------------------------------------------------------------------------


def test_databases_create_list_delete(postgres: RunningPostgres) -> None:
    datastore = postgres.datastore
    datastore.create_databases(
        [
            {"name": "shop_1", "character_set": "latin1"},
            {"name": "Shop 2", "collate": "C"},
            {"name": "shop_3", "character_set": "utf-8", "collate": "C.utf8"},
        ]
    )
    listed = {db["name"]: db for db in datastore.list_databases()[0]}
    assert {"app_db", "other_db", "shop_1", "Shop 2", "shop_3"} <= set(listed)
    assert not {"postgres", "template0", "template1"} & set(listed)
    assert listed["shop_1"] == {"name": "shop_1", "character_set": "LATIN1", "collate": "C"}
    assert listed["Shop 2"] == {"name": "Shop 2", "character_set": "UTF8", "collate": "C"}
    assert listed["shop_3"]["character_set"] == "UTF8"
    assert listed["app_db"] == {"name": "app_db", "character_set": "UTF8", "collate": "C.UTF-8"}
    # New databases are closed to users without a grant.
    assert NO_CONNECT in login_error(postgres.private, "app", APP_PASSWORD, "shop_1")

    with pytest.raises(DatabaseAlreadyExists):
        datastore.create_databases([{"name": "fresh_db"}, {"name": "shop_1"}])
    with pytest.raises(ValidationError, match="not a locale this server has"):
        datastore.create_databases([{"name": "fresh_db"}, {"name": "odd", "collate": "xx_YY"}])
    with pytest.raises(ValidationError, match="needs character set UTF8, not LATIN1"):
        datastore.create_databases(
            [{"name": "odd", "character_set": "LATIN1", "collate": "C.UTF-8"}]
        )
    assert "fresh_db" not in {db["name"] for db in datastore.list_databases()[0]}

    page, marker = datastore.list_databases(limit=2)
    seen = [db["name"] for db in page]
    while marker is not None:
        page, marker = datastore.list_databases(limit=2, marker=marker)
        seen += [db["name"] for db in page]
    assert seen == sorted(listed)

    with login(postgres.private, "app", APP_PASSWORD, "app_db") as conn:
        # Dropping a database ends the sessions on it rather than waiting for them.
        datastore.grant_access("app", "%", ["shop_1"])
        session = login(postgres.private, "app", APP_PASSWORD, "shop_1")
        for name in ("shop_1", "Shop 2", "shop_3"):
            datastore.delete_database(name)
        with pytest.raises(psycopg.OperationalError):
            session.execute("SELECT 1")
        session.close()
        conn.execute("SELECT 1")  # sessions elsewhere are untouched
    assert not {"shop_1", "Shop 2", "shop_3"} & {db["name"] for db in datastore.list_databases()[0]}
    with pytest.raises(DatabaseNotFound):
        datastore.delete_database("shop_1")
    # A new database of the same name does not inherit the old grant.
    datastore.create_databases([{"name": "shop_1"}])
    assert datastore.list_access("app") == [{"name": "app_db"}]
    assert NO_CONNECT in login_error(postgres.private, "app", APP_PASSWORD, "shop_1")
    datastore.delete_database("shop_1")


# -- users -------------------------------------------------------------------------------------


def test_users_create_show_rename_password_delete(postgres: RunningPostgres) -> None:
    datastore, address = postgres.datastore, postgres.private
    datastore.create_users(
        [{"name": "carol", "password": "carol-pw-1", "databases": [{"name": "app_db"}]}]
    )
    create_table(address, "carol", "carol-pw-1", "app_db", "t_carol")
    assert datastore.get_user("carol") == {
        "name": "carol",
        "host": "%",
        "databases": [{"name": "app_db"}],
    }
    names = {u["name"] for u in datastore.list_users()[0]}
    assert {"app", "carol"} <= names
    assert not names & {"postgres", "os_admin", datastore.os_user}
    assert not any(n.startswith("pg_") for n in names)
    with pytest.raises(UserAlreadyExists):
        datastore.create_users(
            [{"name": "dave", "password": "pw"}, {"name": "carol", "password": "x"}]
        )
    with pytest.raises(UserNotFound):
        datastore.get_user("dave")
    with pytest.raises(DatabaseNotFound):
        datastore.create_users([{"name": "dave", "password": "pw", "databases": ["no_such_db"]}])
    with pytest.raises(ValidationError, match="not tied to a client host"):
        datastore.update_user("carol", "%", {"host": "10.0.0.1"})
    with pytest.raises(ValidationError, match="not tied to a client host"):
        datastore.get_user("carol", "localhost")

    datastore.update_user("carol", "%", {"password": "carol-pw-2"})
    assert BAD_PASSWORD in login_error(address, "carol", "carol-pw-1", "app_db")
    create_table(address, "carol", "carol-pw-2", "app_db", "t_carol_2")

    # A SCRAM password survives a rename; the grants follow the role.
    datastore.update_user("carol", "%", {"name": "caroline"})
    assert BAD_PASSWORD in login_error(address, "carol", "carol-pw-2", "app_db")
    create_table(address, "caroline", "carol-pw-2", "app_db", "t_caroline")
    datastore.update_user("caroline", "%", {"name": "Caroline K", "password": "c-pw-3"})
    create_table(address, "Caroline K", "c-pw-3", "app_db", "t_caroline_k")
    assert datastore.list_access("Caroline K") == [{"name": "app_db"}]

    datastore.create_users([{"name": "erin", "password": "erin-pw"}])
    with pytest.raises(UserAlreadyExists):
        datastore.update_user("erin", "%", {"name": "app"})
    datastore.change_passwords([{"name": "erin", "password": "erin-pw-2"}])
    assert BAD_PASSWORD in login_error(address, "erin", "erin-pw")
    assert NO_CONNECT in login_error(address, "erin", "erin-pw-2", "app_db")

    # Deleting a user who owns tables keeps the tables (os_admin owns them now).
    session = login(address, "Caroline K", "c-pw-3", "app_db")
    datastore.delete_user("Caroline K")
    with pytest.raises(psycopg.OperationalError):
        session.execute("SELECT 1")  # its sessions were ended
    session.close()
    datastore.delete_user("erin")
    assert BAD_PASSWORD in login_error(address, "erin", "erin-pw-2")
    assert BAD_PASSWORD in login_error(address, "Caroline K", "c-pw-3", "app_db")
    with admin_connection(datastore, "app_db") as conn:
        owners = dict(
            conn.execute(
                "SELECT tablename, tableowner FROM pg_tables WHERE tablename LIKE 't_carol%'"
            ).fetchall()
        )
    assert owners == {t: "os_admin" for t in ("t_carol", "t_carol_2", "t_caroline", "t_caroline_k")}
    with pytest.raises(UserNotFound):
        datastore.delete_user("erin")
    with pytest.raises(UserNotFound):
        datastore.change_passwords([{"name": "erin", "password": "x"}])


def test_users_page_in_order(postgres: RunningPostgres) -> None:
    datastore = postgres.datastore
    datastore.create_users([{"name": f"pager{i}", "password": "pw"} for i in range(5)])
    everyone = [u["name"] for u in datastore.list_users()[0]]
    seen: list[str] = []
    page, marker = datastore.list_users(limit=2)
    seen += [u["name"] for u in page]
    while marker is not None:
        page, marker = datastore.list_users(limit=2, marker=marker)
        seen += [u["name"] for u in page]
    assert seen == sorted(everyone)
    for i in range(5):
        datastore.delete_user(f"pager{i}")


# -- access ------------------------------------------------------------------------------------


def test_grant_and_revoke_access(postgres: RunningPostgres) -> None:
    datastore, address = postgres.datastore, postgres.private
    datastore.create_databases([{"name": "Odd-DB.1"}])
    datastore.create_users([{"name": "dave", "password": "dave-pw"}])
    assert datastore.list_access("dave") == []
    assert NO_CONNECT in login_error(address, "dave", "dave-pw", "app_db")

    datastore.grant_access("dave", "%", ["app_db", "Odd-DB.1"])
    create_table(address, "dave", "dave-pw", "app_db", "t_dave")
    create_table(address, "dave", "dave-pw", "Odd-DB.1", "t_dave")
    assert datastore.list_access("dave") == [{"name": "Odd-DB.1"}, {"name": "app_db"}]
    assert {"name": "app_db"} in datastore.get_user("dave")["databases"]

    session = login(address, "dave", "dave-pw", "app_db")
    other = login(address, "dave", "dave-pw", "Odd-DB.1")
    datastore.revoke_access("dave", "%", "app_db")
    # Its open session on that database is ended, and it cannot come back.
    with pytest.raises(psycopg.OperationalError):
        session.execute("SELECT 1")
    session.close()
    assert NO_CONNECT in login_error(address, "dave", "dave-pw", "app_db")
    other.execute("SELECT 1")  # the session on the other database goes on
    other.close()
    assert datastore.list_access("dave") == [{"name": "Odd-DB.1"}]

    datastore.revoke_access("dave", "%", "app_db")  # no grant left: a no-op
    with pytest.raises(DatabaseNotFound):
        datastore.revoke_access("dave", "%", "no_such_db")
    with pytest.raises(DatabaseNotFound):
        datastore.grant_access("dave", "%", ["no_such_db"])
    with pytest.raises(UserNotFound):
        datastore.grant_access("nobody", "%", ["app_db"])
    with pytest.raises(UserNotFound):
        datastore.list_access("nobody")
    datastore.delete_user("dave")
    datastore.delete_database("Odd-DB.1")


# -- root --------------------------------------------------------------------------------------


def test_root_enable_show_disable(postgres: RunningPostgres) -> None:
    datastore, address = postgres.datastore, postgres.private
    assert datastore.is_root_enabled() is False
    assert "postgres" in login_error(address, "postgres", "anything")

    assert datastore.enable_root("Root-pw'1") == {"name": "postgres", "password": "Root-pw'1"}
    assert datastore.is_root_enabled() is True
    with login(address, "postgres", "Root-pw'1") as conn:
        row = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        assert row.fetchone() == (True,)
        # Root sees every tenant database.
        conn.execute("SELECT 1 FROM pg_database WHERE datname = 'app_db'").fetchone()
    with login(postgres.public, "postgres", "Root-pw'1", "app_db") as conn:
        assert conn.execute("SELECT count(*) FROM t_private").fetchone() == (0,)

    generated = datastore.enable_root()
    assert generated["name"] == "postgres" and len(generated["password"]) >= 24
    assert BAD_PASSWORD in login_error(address, "postgres", "Root-pw'1")
    session = login(address, "postgres", generated["password"])
    assert "postgres" not in {u["name"] for u in datastore.list_users()[0]}

    datastore.disable_root()
    assert datastore.is_root_enabled() is False
    with pytest.raises(psycopg.OperationalError):
        session.execute("SELECT 1")  # root's sessions end with it
    session.close()
    assert "postgres" in login_error(address, "postgres", generated["password"])
    datastore.disable_root()  # again: a no-op
    with pytest.raises(ValidationError):
        datastore.enable_root("")


# -- who may connect from where ------------------------------------------------------------------


def test_allowed_cidrs_are_enforced_by_the_server(postgres: RunningPostgres) -> None:
    """With allowed_cidrs = [127.10.251.77/32] only a client from that address gets in.

    A second datastore object with the narrowed spec adopts the running engine; its start
    rewrites pg_hba.conf and reloads the server, so no restart is involved.
    """
    datastore = postgres.datastore
    (pid,) = engine_pids(postgres.marker)
    narrowed = PostgreSQLDatastore(
        dataclasses.replace(datastore.spec, allowed_cidrs=(f"{INSIDE}/32",))
    )
    target = (postgres.private, PORT)
    try:
        narrowed.start()
        assert engine_pids(postgres.marker) == [pid]
        with SourceRelay(INSIDE, target) as inside, SourceRelay(OUTSIDE, target) as outside:
            with login("127.0.0.1", "app", APP_PASSWORD, "app_db", port=inside.port) as conn:
                row = conn.execute("SELECT host(inet_client_addr())").fetchone()
                assert row == (INSIDE,)
            message = login_error("127.0.0.1", "app", APP_PASSWORD, "app_db", port=outside.port)
            assert f'no pg_hba.conf entry for host "{OUTSIDE}"' in message
            # The right password does not help from outside, and neither does being root.
            message = login_error("127.0.0.1", "app", "wrong", "app_db", port=outside.port)
            assert "no pg_hba.conf entry" in message
        # An ordinary local client (source 127.0.0.1) is outside the allowed network too.
        message = login_error(postgres.private, "app", APP_PASSWORD, "app_db")
        assert 'no pg_hba.conf entry for host "127.0.0.1"' in message
        assert datastore.status() is ServiceStatus.HEALTHY  # the agent's socket still works
    finally:
        PostgreSQLDatastore(datastore.spec).start()  # back to "from anywhere"
    login(postgres.private, "app", APP_PASSWORD, "app_db").close()


# -- hostile input -------------------------------------------------------------------------------


def test_hostile_names_are_refused_before_anything_runs(
    postgres: RunningPostgres, engine_user: str
) -> None:
    datastore = postgres.datastore
    before = catalog_snapshot(datastore)
    log_size = datastore.log_file.stat().st_size
    bad_db_names: list[Any] = [
        "",
        "a" * 64,
        "é" * 32,  # 64 bytes in UTF-8
        'x"; DROP DATABASE app_db; --',
        "x'y",
        "a\\b",
        "a;b",
        "a/b",
        " ab",
        "ab\n",
        "postgres",
        "Template0",
        "TEMPLATE1",
        None,
        12,
    ]
    bad_user_names: list[Any] = [
        "",
        "u" * 64,
        'x"; DROP ROLE app; --',
        "o'brien",
        "a\\b",
        "semi;colon",
        "postgres",
        "POSTGRES",
        "os_admin",
        "pg_monitor",
        "Pg_anything",
        "public",
        "current_user",
        engine_user,
        "bob@corp",
        "tab\tname",
        None,
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
            lambda n=name: datastore.list_access(n),
        ]
    calls += [
        lambda: datastore.create_users([{"name": "ok_user", "password": ""}]),
        lambda: datastore.create_users([{"name": "ok_user", "password": "pw\nx"}]),
        lambda: datastore.create_users([{"name": "ok_user", "password": "pw", "host": "%'--"}]),
        lambda: datastore.create_users([{"name": "ok_user", "password": "pw", "host": "::1"}]),
        lambda: datastore.enable_root("pw\x00; DROP DATABASE app_db"),
        lambda: datastore.create_databases([{"name": "ok_db", "character_set": "utf8mb4"}]),
        lambda: datastore.create_databases([{"name": "ok_db", "character_set": "SJIS"}]),
        lambda: datastore.create_databases([{"name": "ok_db", "collate": "C'; DROP"}]),
        # A good entry before a bad one must not be created either.
        lambda: datastore.create_databases([{"name": "ok_db"}, {"name": "bad;db"}]),
        lambda: datastore.create_databases([{"name": "ok_db"}, {"name": "ok_db"}]),
        lambda: datastore.create_users(
            [{"name": "ok_user", "password": "pw"}, {"name": "bad'user", "password": "pw"}]
        ),
    ]
    for call in calls:
        with pytest.raises(ValidationError):
            call()
    assert catalog_snapshot(datastore) == before
    with datastore.log_file.open("rb") as log:
        log.seek(log_size)
        assert b"ERROR" not in log.read()  # the server was not even asked
    login(postgres.private, "app", APP_PASSWORD, "app_db").close()


def test_unusual_but_valid_names_are_quoted_safely(postgres: RunningPostgres) -> None:
    """Names PostgreSQL allows and the rules accept work exactly as given."""
    datastore, address = postgres.datastore, postgres.private
    names = [("select", "Select"), ("Mixed Case-DB.1", "we ird-user.1"), ("ж" * 31, "ü" * 31)]
    password = "pw'; DROP ROLE app; --\\"
    for db, user in names:
        datastore.create_databases([{"name": db}])
        datastore.create_users([{"name": user, "password": password, "databases": [db]}])
        with login(address, user, password, db) as conn:
            assert conn.execute("SELECT current_user, current_database()").fetchone() == (
                user,
                db,
            )
    listed = {db["name"] for db in datastore.list_databases()[0]}
    assert {db for db, _ in names} <= listed
    assert {u for _, u in names} <= {u["name"] for u in datastore.list_users()[0]}
    for db, user in names:
        datastore.delete_user(user)
        datastore.delete_database(db)
    login(address, "app", APP_PASSWORD, "app_db").close()  # app survived the password above


# -- lifecycle: adoption, stop, crash, copies ----------------------------------------------------


def test_second_datastore_adopts_the_running_engine(postgres: RunningPostgres) -> None:
    (pid,) = engine_pids(postgres.marker)
    again = PostgreSQLDatastore(postgres.datastore.spec)
    assert again.is_running()
    again.start()
    again.prepare([{"name": "app_db"}], [])  # idempotent: nothing new, no second engine
    assert engine_pids(postgres.marker) == [pid]
    assert again.status() is ServiceStatus.HEALTHY
    assert "app_db" in {db["name"] for db in again.list_databases()[0]}


def test_a_wrong_admin_password_is_reported_at_once(postgres: RunningPostgres) -> None:
    datastore = postgres.datastore
    good = datastore.password_file.read_text()
    try:
        datastore.password_file.write_text("not-the-password\n")
        started = time.monotonic()
        with pytest.raises(EngineError, match="rejects Coffer's admin password") as info:
            PostgreSQLDatastore(datastore.spec).start(timeout=20)
        assert time.monotonic() - started < 5  # not a wait for the timeout
        assert "not-the-password" not in info.value.message
        assert datastore.status() is ServiceStatus.BLOCKED
    finally:
        datastore.password_file.write_text(good)
    assert datastore.status() is ServiceStatus.HEALTHY


def test_refuses_to_run_the_engine_as_root(postgres: RunningPostgres) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root could start an engine as root")
    spec = postgres.datastore.spec
    for run_as in (None, "root"):
        with pytest.raises(UnsafeEngineUser, match="root"):
            PostgreSQLDatastore(make_spec(spec.layout.root, spec.bind_addresses, run_as))


def test_stop_crash_and_restart(postgres: RunningPostgres) -> None:
    datastore = postgres.datastore
    password = datastore.password_file.read_text()
    with login(postgres.private, "app", APP_PASSWORD, "app_db"):
        datastore.stop(timeout=20)  # a connected client does not hold the shutdown up
    assert datastore.status() is ServiceStatus.SHUTDOWN
    assert not datastore.is_running()
    assert engine_tree(postgres.marker) == []
    assert "Connection refused" in login_error(postgres.private, "app", APP_PASSWORD)
    datastore.stop()  # stopping a stopped engine is a no-op
    # A fresh object on a stopped instance sees it stopped, not crashed.
    assert PostgreSQLDatastore(datastore.spec).status() is ServiceStatus.SHUTDOWN

    datastore.start()
    assert datastore.status() is ServiceStatus.HEALTHY
    assert datastore.password_file.read_text() == password
    create_table(postgres.private, "app", APP_PASSWORD, "app_db", "t_after_restart")

    # A backend busy with a long query outlives its killed postmaster for a while and keeps
    # the shared memory attached; start must wait it out rather than fail.
    busy = threading.Thread(target=run_long_query, args=(postgres.private,), daemon=True)
    busy.start()
    try:
        wait_for_active_query(datastore)
        log_size = datastore.log_file.stat().st_size
        (pid,) = engine_pids(postgres.marker)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while datastore.is_running() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert datastore.status() is ServiceStatus.CRASHED
        # An agent restarted after the crash sees the same thing through the pid file.
        assert PostgreSQLDatastore(datastore.spec).status() is ServiceStatus.CRASHED
        datastore.start()
        assert datastore.status() is ServiceStatus.HEALTHY
    finally:
        busy.join(30)
    with datastore.log_file.open("rb") as log:
        log.seek(log_size)
        assert b"pre-existing shared memory block" in log.read()
    create_table(postgres.private, "app", APP_PASSWORD, "app_db", "t_after_crash")


def run_long_query(address: str) -> None:
    """About two seconds of CPU in one backend (it does not notice its postmaster's death)."""
    with contextlib.suppress(psycopg.Error), login(address, "app", APP_PASSWORD, "app_db") as conn:
        conn.execute("SELECT count(*) FROM generate_series(1, 12000000)")


def wait_for_active_query(datastore: PostgreSQLDatastore) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with admin_connection(datastore) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE state = 'active' AND query LIKE '%generate_series%' "
                "AND pid <> pg_backend_pid()"
            ).fetchone()
        if row and row[0]:
            return
        time.sleep(0.02)
    raise AssertionError("the long query never started")


def test_a_copied_data_dir_gets_its_own_admin_password(
    postgres: RunningPostgres, engine_user: str
) -> None:
    """The template path: copy a stopped data directory, start it, new admin credentials."""
    source = postgres.datastore
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
            copy = PostgreSQLDatastore(spec)
            try:
                copy.prepare([], [])
                assert copy.status() is ServiceStatus.HEALTHY
                new_password = copy.password_file.read_text().strip()
                assert new_password != source.password_file.read_text().strip()
                assert new_password not in copy.log_file.read_text()
                # The copy carries the template's data, reachable on the copy's own address.
                create_table(address, "app", APP_PASSWORD, "app_db", "t_in_copy")
            finally:
                try:
                    copy.stop(timeout=20)
                finally:
                    kill_engines(f"--config-file={copy.config_file}")
    finally:
        source.start()
    assert source.status() is ServiceStatus.HEALTHY
    # The source's admin password still works: the copy's reset did not touch it.
    with admin_connection(source) as conn:
        conn.execute("SELECT 1")


def test_an_engine_that_dies_at_start_is_reported(engine_user: str) -> None:
    """Port taken on the bind address: postgres exits, start says why, nothing is left over."""
    with instance_root() as root, socket.socket() as squatter:
        address = free_loopback_address("127.10.253")
        squatter.bind((address, PORT))
        squatter.listen()
        datastore = PostgreSQLDatastore(make_spec(root, [address], engine_user))
        marker = f"--config-file={datastore.config_file}"
        try:
            with pytest.raises(EngineError, match="exited during start") as info:
                datastore.prepare([], [])
            assert "Address already in use" in info.value.message
            assert datastore.password_file.read_text().strip() not in info.value.message
            assert datastore.status() is ServiceStatus.CRASHED
            assert engine_tree(marker) == []
        finally:
            kill_engines(marker)
