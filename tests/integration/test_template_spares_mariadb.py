"""MariaDB creates take ready copies of the host's template (made by the host's zygote after a
create); each is still a server of its own: its admin password, its users, its data.

Every engine runs as the engine user on its own loopback address and is stopped by PID in a
``finally`` even when a test fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest
from mariadb_fixtures import (
    free_loopback_address,
    instance_root,
    kill_engines,
    login,
    make_spec,
)

from coffer.guest.datastores.mariadb import MariaDBDatastore, template_variant
from coffer.guest.datastores.template import SPARES, TemplateStore
from coffer.status import ServiceStatus

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(MariaDBDatastore.detect_version() is None, reason="mariadbd not installed"),
]


@contextlib.contextmanager
def template_dir() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="coffer-myspare-", dir="/tmp"))
    try:
        base.chmod(0o711)
        yield base / "templates"
    finally:
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def prepared(
    templates: Path,
    engine_user: str,
    network: str,
    databases: list[dict[str, Any]] | None = None,
    users: list[dict[str, Any]] | None = None,
) -> Iterator[MariaDBDatastore]:
    with instance_root() as root:
        spec = dataclasses.replace(
            make_spec(root, [free_loopback_address(network)], engine_user), template_dir=templates
        )
        datastore = MariaDBDatastore(spec)
        try:
            datastore.prepare(databases or [], users or [])
            yield datastore
        finally:
            try:
                datastore.stop(timeout=20)
            finally:
                kill_engines(f"--defaults-file={datastore.config_file}")


def test_a_create_takes_a_ready_copy_which_is_a_server_of_its_own(
    engine_user: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="coffer.guest.datastores")
    name, password = "u" + os.urandom(5).hex(), "P-" + os.urandom(12).hex()
    tenant = {"name": name, "password": password, "host": "%", "databases": [{"name": "b_db"}]}
    with (
        template_dir() as root,
        prepared(root, engine_user, "127.10.238", [{"name": "a_db"}]) as first,
    ):
        version = MariaDBDatastore.detect_version()
        assert version is not None
        store = TemplateStore(root)
        template = store.path_for("mariadb", version, template_variant())
        # What the host's zygote does after a create (see LocalCompute).
        assert store.make_spares(template) == SPARES
        first_password = first.password_file.read_text().strip()
        caplog.clear()
        with prepared(root, engine_user, "127.10.239", [{"name": "b_db"}], [tenant]) as second:
            messages = [r.getMessage() for r in caplog.records]
            assert any(m.startswith("took a ready copy of template") for m in messages)
            assert second.status() is ServiceStatus.HEALTHY
            assert second.password_file.read_text().strip() != first_password
            # The first instance's admin password does not open the second.
            with pytest.raises(pymysql.err.OperationalError):
                pymysql.connect(
                    unix_socket=str(second.socket),
                    user="os_admin",
                    password=first_password,
                    connect_timeout=5,
                ).close()
            conn = login(second.spec.bind_addresses[0], name, password, "b_db")
            with conn, conn.cursor() as cur:
                cur.execute("SHOW DATABASES")
                names = {row[0] for row in cur.fetchall()}
            assert "b_db" in names and "a_db" not in names
        assert len(list(store.spares_dir(template).glob("ready-*"))) == SPARES - 1
