"""How the MariaDB datastore keys its templates (no engine started)."""

from __future__ import annotations

import os
import pwd
import re
from pathlib import Path

import pytest

from coffer.guest.datastores import mariadb
from coffer.guest.datastores.base import EngineSpec
from coffer.guest.datastores.mariadb import MariaDBDatastore, init_settings, template_variant
from coffer.guest.layout import InstanceLayout


def datastore(root: Path) -> MariaDBDatastore:
    run_as = "coffer" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
    spec = EngineSpec(
        layout=InstanceLayout(root),
        bind_addresses=["127.0.0.2"],
        port=3306,
        memory_mb=4096,
        vcpus=2,
        volume_size_gb=1,
        run_as=run_as,
        template_dir=root / "templates",
    )
    return MariaDBDatastore(spec)


def test_the_variant_is_a_stable_short_digest() -> None:
    variant = template_variant()
    assert re.fullmatch(r"[0-9a-f]{12}", variant)
    assert template_variant() == variant


def test_the_variant_changes_with_what_shapes_the_data_directory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base = template_variant()
    monkeypatch.setattr(
        mariadb,
        "init_settings",
        lambda: {"character-set-server": "latin1", "collation-server": "latin1_swedish_ci"},
    )
    latin1 = template_variant()
    monkeypatch.setattr(mariadb, "_INSTALL_DB_FLAGS", ("--skip-test-db",))
    fewer_flags = template_variant()
    assert len({base, latin1, fewer_flags}) == 3


def test_every_instance_runs_with_the_settings_its_template_was_built_with(
    tmp_path: Path,
) -> None:
    config = datastore(tmp_path / "i").render_config()
    for key, value in init_settings().items():
        assert f"\n{key} = {value}\n" in config
