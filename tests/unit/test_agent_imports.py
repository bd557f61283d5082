"""What a guest agent loads: one per instance, so every idle import is paid a hundred times.

Each check runs a fresh interpreter the way the compute driver starts an agent
(``python -P -m coffer.guest.agent``) and looks at ``sys.modules`` after importing the agent and
one engine's plugin.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from coffer.compute.local import CONFIG_PLACEHOLDER, LocalCompute
from coffer.config import load_settings

#: Control-plane or optional packages an idle agent must never carry.
FORBIDDEN = (
    "sqlalchemy",
    "alembic",
    "pydantic",
    "fastapi",
    "starlette",
    "uvicorn",
    "click",
    "boto3",
    "botocore",
    "keystonemiddleware",
    "coffer.config",
    "coffer.db",
    "coffer.api",
    "coffer.controlplane",
    "coffer.taskmanager",
    "coffer.conductor",
    "coffer.guest.backup.worker",
)

PROBE = """
import json, sys
import coffer.guest.agent
from coffer.datastores.registry import plugin_class
plugin_class(sys.argv[1])
print(json.dumps(sorted(sys.modules)))
"""


def loaded_modules(manager: str) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-P", "-c", PROBE, manager],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    modules: list[str] = json.loads(result.stdout)
    return set(modules)


@pytest.mark.parametrize("manager", ["mariadb", "postgresql", "redis"])
def test_an_idle_agent_loads_no_control_plane_or_backup_pipeline(manager: str) -> None:
    modules = loaded_modules(manager)
    assert f"coffer.guest.datastores.{manager}" in modules  # the probe did load the plugin
    found = sorted(
        name for name in modules for bad in FORBIDDEN if name == bad or name.startswith(bad + ".")
    )
    assert found == []
    # Only its own engine's driver.
    drivers = {"mariadb": "pymysql", "postgresql": "psycopg", "redis": "redis"}
    for other, driver in drivers.items():
        if other != manager and driver != "redis":  # redis-py also carries the embedded bus
            assert driver not in modules, f"a {manager} agent loaded {driver}"


def test_the_compute_driver_starts_the_agent_module_directly(tmp_path: Path) -> None:
    settings = load_settings(None, overrides={"default": {"state_dir": str(tmp_path)}})
    argv = LocalCompute(settings).agent_argv
    assert argv[1:] == ["-P", "-m", "coffer.guest.agent", "--config", CONFIG_PLACEHOLDER]


def test_the_agent_entry_point_refuses_bad_arguments_before_starting(tmp_path: Path) -> None:
    for args in ([], ["--config"], ["--conf", "x"], ["--config", str(tmp_path / "missing.json")]):
        result = subprocess.run(
            [sys.executable, "-P", "-m", "coffer.guest.agent", *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 2, args
        assert "usage: python -m coffer.guest.agent --config" in result.stderr
