"""Template data directories with a real mariadbd: built once, copied, each copy its own server.

Every engine runs as the engine user on its own loopback addresses and is stopped by PID in a
``finally`` even when a test fails. The template store lives in a directory the engine user can
reach; the module's tests share one store where a test does not need a fresh one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest
from mariadb_fixtures import (
    admin_connection,
    free_loopback_address,
    instance_root,
    kill_engines,
    login,
    make_spec,
)

from coffer.guest.datastores import mariadb
from coffer.guest.datastores.mariadb import MariaDBDatastore, template_variant
from coffer.guest.datastores.template import MARKER, TREE, TemplateStore
from coffer.status import ServiceStatus

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(MariaDBDatastore.detect_version() is None, reason="mariadbd not installed"),
]

ACCESS_DENIED = frozenset({1045, 1698})
#: "Host is not allowed to connect": the server has no account at all for the client's host.
NO_ACCOUNT_FOR_HOST = 1130
TEMPLATE_LOGGER = "coffer.guest.datastores"


@contextlib.contextmanager
def template_dir() -> Iterator[Path]:
    """A fresh template store location the engine user can reach."""
    base = Path(tempfile.mkdtemp(prefix="coffer-templates-", dir="/tmp"))
    try:
        base.chmod(0o711)
        yield base / "templates"
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def shared_store() -> Iterator[Path]:
    with template_dir() as directory:
        yield directory


@contextlib.contextmanager
def prepared(
    templates: Path | None,
    engine_user: str,
    databases: list[dict[str, Any]] | None = None,
    users: list[dict[str, Any]] | None = None,
    network: str = "127.10.230",
) -> Iterator[MariaDBDatastore]:
    """An instance prepared (from the template store when given), stopped by PID afterwards.
    Instances started at the same time need different ``network`` prefixes, so that they never
    pick the same free address."""
    with instance_root() as root:
        address = free_loopback_address(network)
        spec = dataclasses.replace(make_spec(root, [address], engine_user), template_dir=templates)
        datastore = MariaDBDatastore(spec)
        try:
            datastore.prepare(databases or [], users or [])
            yield datastore
        finally:
            try:
                datastore.stop(timeout=20)
            finally:
                kill_engines(f"--defaults-file={datastore.config_file}")


def template_path(store_root: Path) -> Path:
    version = MariaDBDatastore.detect_version()
    assert version is not None
    return TemplateStore(store_root).path_for("mariadb", version, template_variant())


def tree_fingerprint(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def files_containing(root: Path, needle: bytes) -> list[str]:
    return [
        str(path.relative_to(root))
        for path in root.rglob("*")
        if path.is_file() and needle in path.read_bytes()
    ]


def socket_login_error(datastore: MariaDBDatastore, user: str, password: str) -> int:
    try:
        conn = pymysql.connect(
            unix_socket=str(datastore.socket), user=user, password=password, connect_timeout=5
        )
    except pymysql.err.OperationalError as exc:
        code: int = exc.args[0]
        return code
    conn.close()
    raise AssertionError(f"{user} logged in on {datastore.socket} but should not have")


def build_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("built template")]


def copy_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "copied from template" in r.getMessage()]


def test_copies_of_one_template_get_their_own_secrets_users_and_data(
    shared_store: Path, engine_user: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=TEMPLATE_LOGGER)
    # Names no help text or system table holds, so finding them anywhere means a leak.
    name, password = "t" + os.urandom(6).hex(), "P-" + os.urandom(12).hex()
    tenant = {"name": name, "password": password, "databases": [{"name": "a_db"}]}
    with prepared(shared_store, engine_user, [{"name": "a_db"}], [tenant]) as first:
        template = template_path(shared_store)
        assert (template / MARKER).is_file()
        fingerprint = tree_fingerprint(template / TREE)
        # Nothing secret or instance-specific went into the template.
        first_password = first.password_file.read_text().strip()
        for needle in (b"os_admin", name.encode(), password.encode(), first_password.encode()):
            assert files_containing(template / TREE, needle) == []
        assert files_containing(template / TREE, str(shared_store).encode()) == []  # no paths
        secret_row = "only-in-A-" + os.urandom(8).hex()
        address = first.spec.bind_addresses[0]
        with login(address, name, password, "a_db") as conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE t (v VARCHAR(64))")
            cur.execute("INSERT INTO t VALUES (%s)", (secret_row,))
        first.stop(timeout=20)  # flushes the row to A's files
        assert files_containing(first.layout.data_dir, secret_row.encode())

        with prepared(shared_store, engine_user, [], []) as second:
            assert second.status() is ServiceStatus.HEALTHY
            assert len(copy_messages(caplog)) == 2  # both instances, the first one included
            second_password = second.password_file.read_text().strip()
            assert second_password != first_password
            # A's admin password does not open B, and A's tenant does not exist there.
            assert socket_login_error(second, "os_admin", first_password) in ACCESS_DENIED
            assert second.list_users() == ([], None)
            with admin_connection(second) as conn, conn.cursor() as cur:
                cur.execute("SELECT DISTINCT Host FROM mysql.proxies_priv")
                assert cur.fetchall() == (("localhost",),)  # nothing names the build host
            assert second.list_databases() == ([], None)
            address = second.spec.bind_addresses[0]
            with pytest.raises(pymysql.err.OperationalError) as denied:
                login(address, name, password)
            assert denied.value.args[0] in ACCESS_DENIED | {NO_ACCOUNT_FOR_HOST}
            second.stop(timeout=20)
            assert files_containing(second.layout.data_dir, secret_row.encode()) == []
        # A's data never reached the template, which is byte for byte as it was built.
        assert files_containing(template / TREE, secret_row.encode()) == []
        assert tree_fingerprint(template / TREE) == fingerprint


def test_racing_first_prepares_build_the_template_once(
    engine_user: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=TEMPLATE_LOGGER)
    barrier = threading.Barrier(2)
    healthy: list[ServiceStatus] = []
    errors: list[BaseException] = []

    def first_instance(store: Path, network: str) -> None:
        try:
            barrier.wait(10)
            with prepared(store, engine_user, [{"name": "db"}], network=network) as datastore:
                healthy.append(datastore.status())
                barrier.wait(30)  # both running at once, each on its own copy
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    with template_dir() as store:
        threads = [
            threading.Thread(target=first_instance, args=(store, network))
            for network in ("127.10.231", "127.10.232")
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not errors
        assert healthy == [ServiceStatus.HEALTHY] * 2
        assert len(build_messages(caplog)) == 1
        assert len(copy_messages(caplog)) == 2
        assert [p.name for p in store.iterdir() if not p.name.startswith(".")] == [
            template_path(store).name
        ]


def _store_build_in_process(root: str, log: str) -> str:
    def builder(tree: Path, scratch: Path) -> None:
        with open(log, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        time.sleep(0.3)
        (tree / "PG_VERSION").write_text("15\n")

    return str(TemplateStore(Path(root)).get_or_build("pg", "15.4", "v1", builder))


def test_racing_processes_build_a_template_once(tmp_path: Path) -> None:
    root, log = tmp_path / "templates", tmp_path / "builds.log"
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        paths = pool.starmap(_store_build_in_process, [(str(root), str(log))] * 2)
    assert paths == [str(root / "pg-15.4-v1")] * 2
    assert len(log.read_text().splitlines()) == 1


def test_a_template_without_its_marker_is_ignored_and_rebuilt(
    engine_user: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=TEMPLATE_LOGGER)
    with template_dir() as store:
        partial = template_path(store)
        (partial / TREE / "poison_db").mkdir(parents=True)  # a torn copy: no mysql/, no marker
        (partial / TREE / "ibdata1").write_bytes(b"\0" * 4096)
        shutil.chown(store, engine_user, engine_user)
        with prepared(store, engine_user, [{"name": "db"}]) as datastore:
            assert datastore.status() is ServiceStatus.HEALTHY
            names = [db["name"] for db in datastore.list_databases()[0]]
            assert names == ["db"]
        assert len(build_messages(caplog)) == 1
        assert (partial / MARKER).is_file()
        assert (partial / TREE / "mysql").is_dir()
        assert not (partial / TREE / "poison_db").exists()


def test_a_template_of_another_version_or_variant_is_not_used(
    shared_store: Path, engine_user: str, caplog: pytest.LogCaptureFixture
) -> None:
    real = template_path(shared_store)
    if not (real / MARKER).is_file():
        with prepared(shared_store, engine_user):
            pass
    caplog.set_level(logging.INFO, logger=TEMPLATE_LOGGER)
    with template_dir() as store:
        # Complete, well-marked templates -- but of another version and another variant, each
        # carrying a database that would show if it were copied.
        store.mkdir(mode=0o700)
        shutil.chown(store, engine_user, engine_user)
        wanted = template_path(store)
        version, variant = wanted.name.split("-")[1], wanted.name.split("-")[2]
        decoys = (f"mariadb-10.5.0-{variant}", f"mariadb-{version}-000000000000")
        for name in decoys:
            shutil.copytree(real, store / name, symlinks=True)
            (store / name / MARKER).write_text((real / MARKER).read_text().replace(real.name, name))
            (store / name / TREE / "poison_db").mkdir()
            assert TemplateStore(store)._is_complete(store / name)
        with prepared(store, engine_user, []) as datastore:
            assert datastore.list_databases() == ([], None)
        assert len(build_messages(caplog)) == 1
        assert (wanted / MARKER).is_file()


def test_an_unusable_store_falls_back_to_initialising_by_hand(
    engine_user: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=TEMPLATE_LOGGER)
    with template_dir() as store:
        store.parent.joinpath("blocker").write_text("a file where a directory should be")
        with prepared(store.parent / "blocker" / "templates", engine_user, [{"name": "db"}]) as ds:
            assert ds.status() is ServiceStatus.HEALTHY
        assert copy_messages(caplog) == []
        assert any("initialising without a template" in r.getMessage() for r in caplog.records)


def test_the_engine_version_is_asked_once_per_binary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``mariadbd --version`` costs ~45 ms, so it is cached, but never past an upgrade: a
    template must not be paired with a binary of another version."""
    calls = tmp_path / "calls"
    binary = tmp_path / "mariadbd"
    binary.write_text(f"#!/bin/sh\necho x >> {calls}\necho 'mariadbd  Ver 10.11.7-MariaDB'\n")
    binary.chmod(0o755)
    monkeypatch.setattr(mariadb, "_find_binary", lambda name: str(binary))
    assert MariaDBDatastore.detect_version() == "10.11.7"
    assert MariaDBDatastore.detect_version() == "10.11.7"
    assert len(calls.read_text().splitlines()) == 1
    # An upgrade replaces the file: a new inode, size and mtime.
    upgraded = tmp_path / "mariadbd.new"
    upgraded.write_text(
        f"#!/bin/sh\necho x >> {calls}\necho 'mariadbd  Ver 10.11.8-MariaDB for linux'\n"
    )
    upgraded.chmod(0o755)
    upgraded.replace(binary)
    assert MariaDBDatastore.detect_version() == "10.11.8"
    assert len(calls.read_text().splitlines()) == 2
