"""PostgreSQL creates take ready copies of the host's template (made by the host's zygote after a
create), and each is still a cluster of its own: identifier, nonce, admin password, users.

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

import pytest
from postgresql_fixtures import (
    free_loopback_address,
    instance_root,
    kill_engines,
    login,
    login_error,
    make_spec,
)

from coffer.guest.datastores import pg_control
from coffer.guest.datastores.postgresql import PostgreSQLDatastore, template_variant
from coffer.guest.datastores.template import SPARES, TREE, TemplateStore
from coffer.status import ServiceStatus

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(PostgreSQLDatastore.detect_version() is None, reason="postgres missing"),
]


@contextlib.contextmanager
def template_dir() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="coffer-pgspare-", dir="/tmp"))
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
) -> Iterator[PostgreSQLDatastore]:
    with instance_root() as root:
        spec = dataclasses.replace(
            make_spec(root, [free_loopback_address(network)], engine_user), template_dir=templates
        )
        datastore = PostgreSQLDatastore(spec)
        try:
            datastore.prepare(databases or [], users or [])
            yield datastore
        finally:
            try:
                datastore.stop(timeout=20)
            finally:
                kill_engines(f"--config-file={datastore.config_file}")


def test_a_create_takes_a_ready_copy_which_is_a_cluster_of_its_own(
    engine_user: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="coffer.guest.datastores")
    name, password = "t" + os.urandom(6).hex(), "P-" + os.urandom(12).hex()
    with template_dir() as root, prepared(root, engine_user, "127.10.236") as first:
        version = PostgreSQLDatastore.detect_version()
        assert version is not None
        store = TemplateStore(root)
        template = store.path_for("postgresql", version, template_variant())
        # What the host's zygote does after a create (see LocalCompute).
        assert store.make_spares(template) == SPARES
        spares = sorted(store.spares_dir(template).glob("ready-*"))
        spare_identities = {pg_control.read_identity(spare) for spare in spares}
        first_password = first.password_file.read_text().strip()
        first.stop(timeout=20)
        first_identity = pg_control.read_identity(first.layout.data_dir)
        caplog.clear()
        tenant = {"name": name, "password": password, "databases": [{"name": "b_db"}]}
        with prepared(root, engine_user, "127.10.237", [{"name": "b_db"}], [tenant]) as second:
            messages = [r.getMessage() for r in caplog.records]
            assert any(m.startswith("took a ready copy of template") for m in messages)
            assert second.status() is ServiceStatus.HEALTHY
            address = second.spec.bind_addresses[0]
            with login(address, name, password, "b_db") as conn:
                assert conn.execute("SELECT current_user").fetchone() == (name,)
            assert "password authentication failed" in login_error(
                address, name, password + "x", "b_db"
            )
            assert second.password_file.read_text().strip() != first_password
            second.stop(timeout=20)
            second_identity = pg_control.read_identity(second.layout.data_dir)
        # The taken copy got an identity of its own, like a plain copy does.
        template_identity = pg_control.read_identity(template / TREE)
        identities = {template_identity, first_identity, second_identity}
        assert len({i[0] for i in identities}) == 3
        assert len({i[1] for i in identities}) == 3
        assert second_identity not in spare_identities
        assert len(list(store.spares_dir(template).glob("ready-*"))) == SPARES - 1
