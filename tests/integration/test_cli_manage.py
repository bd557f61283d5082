"""`coffer manage` against a fresh state directory: schema, engines, flavors, identity."""

from __future__ import annotations

import sqlite3
import subprocess

import pytest
from coffer_harness import VENV_BIN, coffer_environment

pytestmark = pytest.mark.integration


def _coffer(env: dict[str, str], *args: str, stdin: str | None = None) -> str:
    proc = subprocess.run(
        [str(VENV_BIN / "coffer"), *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_manage_commands() -> None:
    with coffer_environment() as coffer:
        out = _coffer(coffer.env, "manage", "db", "upgrade")
        assert "control DB at revision" in out
        engines = _coffer(coffer.env, "manage", "register-engines")
        assert engines.startswith("mariadb 10.")
        _coffer(
            coffer.env, "manage", "flavor-create", "x1", "x.tiny", "--ram", "300", "--vcpus", "1"
        )
        _coffer(
            coffer.env,
            "manage",
            "datastore-version-create",
            "mariadb",
            "lts",
            "mariadb",
            "--version",
            "10.11",
        )
        out = _coffer(
            coffer.env,
            "manage",
            "user-create",
            "ops",
            "--project",
            "ops",
            "--role",
            "admin",
            "--password-stdin",
            stdin="s3cret-ops\n",
        )
        assert "s3cret-ops" not in out
        with sqlite3.connect(coffer.state_dir / "coffer.db") as conn:
            assert conn.execute("select ram from flavors where id='x1'").fetchone() == (300,)
            names = {r[0] for r in conn.execute("select name from datastore_versions")}
            assert "lts" in names
            assert conn.execute("select count(*) from users where name='ops'").fetchone() == (1,)

        bad = subprocess.run(
            [
                str(VENV_BIN / "coffer"),
                "manage",
                "flavor-create",
                "y",
                "y",
                "--ram",
                "1",
                "--vcpus",
                "1",
            ],
            env=coffer.env,
            capture_output=True,
            text=True,
        )
        assert bad.returncode != 0 and "--ram" in bad.stderr
        bad = subprocess.run(
            [str(VENV_BIN / "coffer"), "manage", "datastore-version-create", "x", "1", "mariadbb"],
            env=coffer.env,
            capture_output=True,
            text=True,
        )
        assert bad.returncode != 0 and "mariadb" in bad.stderr


def test_bad_config_is_refused_with_every_problem() -> None:
    with coffer_environment() as coffer:
        conf = coffer.state_dir / "coffer.conf"
        conf.write_text("[DEFAULT]\nbind_prot = 1\n[compute]\ndriver = nosuch\nprivate_pool = x\n")
        proc = subprocess.run(
            [str(VENV_BIN / "coffer"), "up", "--config", str(conf)],
            env=coffer.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode != 0
        assert "bind_prot" in proc.stderr and "did you mean 'bind_port'" in proc.stderr
        assert not (coffer.state_dir / "coffer.db").exists(), "nothing may change on bad config"


def test_bad_policy_file_stops_coffer_up_at_start() -> None:
    with coffer_environment() as coffer:
        (coffer.state_dir / "policy.yaml").write_text('"instance:craete": "role:admin"\n')
        proc = subprocess.run(
            [str(VENV_BIN / "coffer"), "up"],
            env=coffer.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode != 0
        assert "instance:craete" in proc.stderr and "instance:create" in proc.stderr
        assert "Coffer is up" not in proc.stdout
