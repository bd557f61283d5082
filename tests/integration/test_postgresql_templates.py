"""PostgreSQL template data directories with a real postgres: built once, copied, each copy a
cluster of its own (identifier, nonce, admin password, users, data).

Every engine runs as the engine user on its own loopback addresses and is stopped by PID in a
``finally`` even when a test fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from postgresql_fixtures import (
    admin_connection,
    free_loopback_address,
    instance_root,
    kill_engines,
    login,
    login_error,
    make_spec,
)

from coffer.guest.datastores import pg_control
from coffer.guest.datastores.postgresql import (
    PostgreSQLDatastore,
    bin_dir,
    template_variant,
)
from coffer.guest.datastores.template import MARKER, TREE, TemplateStore
from coffer.status import ServiceStatus

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(PostgreSQLDatastore.detect_version() is None, reason="postgres missing"),
]

TEMPLATE_LOGGER = "coffer.guest.datastores"


@contextlib.contextmanager
def template_dir() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="coffer-pgtpl-", dir="/tmp"))
    try:
        base.chmod(0o711)
        yield base / "templates"
    finally:
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def prepared(
    templates: Path | None,
    engine_user: str,
    databases: list[dict[str, Any]] | None = None,
    users: list[dict[str, Any]] | None = None,
    network: str = "127.10.231",
) -> Iterator[PostgreSQLDatastore]:
    """An instance prepared (from the store when given), stopped by PID afterwards."""
    with instance_root() as root:
        address = free_loopback_address(network)
        spec = dataclasses.replace(make_spec(root, [address], engine_user), template_dir=templates)
        datastore = PostgreSQLDatastore(spec)
        try:
            datastore.prepare(databases or [], users or [])
            yield datastore
        finally:
            try:
                datastore.stop(timeout=20)
            finally:
                kill_engines(f"--config-file={datastore.config_file}")


def template_path(store_root: Path) -> Path:
    version = PostgreSQLDatastore.detect_version()
    assert version is not None
    return TemplateStore(store_root).path_for("postgresql", version, template_variant())


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


def controldata(data_dir: Path) -> dict[str, str]:
    """``pg_controldata``'s view of a stopped cluster (the real tool, not our parser)."""
    directory = bin_dir()
    assert directory is not None
    output = subprocess.run(
        [str(directory / "pg_controldata"), str(data_dir)],
        capture_output=True,
        text=True,
        check=True,
        env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"},
    ).stdout
    return {
        key.strip(): value.strip()
        for key, _, value in (line.partition(":") for line in output.splitlines())
    }


def test_control_file_parser_agrees_with_pg_controldata(engine_user: str) -> None:
    with template_dir() as store, prepared(store, engine_user) as datastore:
        datastore.stop(timeout=20)
        system_id, nonce = pg_control.read_identity(datastore.layout.data_dir)
        seen = controldata(datastore.layout.data_dir)
        assert seen["Database system identifier"] == str(system_id)
        assert seen["Mock authentication nonce"] == nonce.hex()
        assert seen["Database cluster state"] == "shut down"
        # Corrupt the checksummed part: the parser refuses instead of guessing.
        broken = datastore.layout.root / "broken"
        (broken / "global").mkdir(parents=True)
        control = bytearray((datastore.layout.data_dir / pg_control.CONTROL_FILE).read_bytes())
        control[20] ^= 0xFF
        (broken / pg_control.CONTROL_FILE).write_bytes(bytes(control))
        with pytest.raises(pg_control.EngineError, match="no valid checksum"):
            pg_control.read_identity(broken)


def test_copies_of_one_template_are_clusters_of_their_own(
    engine_user: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=TEMPLATE_LOGGER)
    name, password = "t" + os.urandom(6).hex(), "P-" + os.urandom(12).hex()
    tenant = {"name": name, "password": password, "databases": [{"name": "a_db"}]}
    with template_dir() as store:
        with prepared(store, engine_user, [{"name": "a_db"}], [tenant]) as first:
            template = template_path(store)
            assert (template / MARKER).is_file()
            tree = template / TREE
            fingerprint = tree_fingerprint(tree)
            # The template ships no WAL, no configuration and no password anyone knows.
            assert [p.name for p in (tree / "pg_wal").iterdir() if p.is_file()] == []
            for conf in ("postgresql.conf", "pg_hba.conf", "pg_ident.conf"):
                assert not (tree / conf).exists()
            first_password = first.password_file.read_text().strip()
            for needle in (name.encode(), password.encode(), first_password.encode()):
                assert files_containing(tree, needle) == []
            assert files_containing(tree, str(first.layout.root).encode()) == []
            assert first.status() is ServiceStatus.HEALTHY
            secret_row = "only-in-A-" + os.urandom(8).hex()
            address = first.spec.bind_addresses[0]
            with login(address, name, password, "a_db") as conn:
                conn.execute("CREATE TABLE t (v text)")
                conn.execute("INSERT INTO t VALUES (%s)", (secret_row,))
            first.stop(timeout=20)  # a shutdown checkpoint writes the row to A's files
            assert files_containing(first.layout.data_dir, secret_row.encode())
            first_identity = pg_control.read_identity(first.layout.data_dir)

            with prepared(store, engine_user, [], [], network="127.10.232") as second:
                copied = [r.getMessage() for r in caplog.records]
                assert sum("copied from template" in m for m in copied) == 2
                assert sum(m.startswith("built template") for m in copied) == 1
                assert second.status() is ServiceStatus.HEALTHY
                second_password = second.password_file.read_text().strip()
                assert second_password != first_password
                # A's admin password does not open B, and A's tenant does not exist there.
                with pytest.raises(psycopg.OperationalError):
                    psycopg.connect(
                        host=str(second.layout.run_dir),
                        port=second.spec.port,
                        user="os_admin",
                        password=first_password,
                        dbname="postgres",
                        connect_timeout=5,
                    ).close()
                assert second.list_users() == ([], None)
                assert second.list_databases() == ([], None)
                b_address = second.spec.bind_addresses[0]
                assert "password authentication failed" in login_error(b_address, name, password)
                with admin_connection(second) as conn:
                    row = conn.execute("SELECT system_identifier FROM pg_control_system()")
                    live_id = row.fetchone()
                second.stop(timeout=20)
                second_identity = pg_control.read_identity(second.layout.data_dir)
                assert live_id == (second_identity[0],)
                assert files_containing(second.layout.data_dir, secret_row.encode()) == []

        template_identity = pg_control.read_identity(tree)
        # Identifier and mock-authentication nonce: one per cluster, never the template's.
        identities = {template_identity, first_identity, second_identity}
        assert len({i[0] for i in identities}) == 3
        assert len({i[1] for i in identities}) == 3
        assert files_containing(tree, secret_row.encode()) == []
        assert tree_fingerprint(tree) == fingerprint


def test_without_a_store_prepare_runs_initdb(engine_user: str) -> None:
    with prepared(None, engine_user, [{"name": "db"}]) as datastore:
        assert datastore.status() is ServiceStatus.HEALTHY
        assert [d["name"] for d in datastore.list_databases()[0]] == ["db"]
        # initdb ran here with the instance's own password: no template was built or used.
        assert not datastore.layout.root.parent.joinpath("templates").exists()
