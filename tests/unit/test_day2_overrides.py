"""The engine-independent part of configuration overrides (``coffer.guest.config``): what
changed, what is persisted, what waits for a restart, and how a refusal is undone.

``DictEngine`` is a small real implementation of the handler's engine hooks over a dict of
"live" settings (style: a local implementation, not a mock of a vendor client); the real
engines run under tests/integration/test_day2_*.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest

from coffer.errors import ValidationError
from coffer.guest.config.mariadb import MariaDBOverrides, option_value
from coffer.guest.config.overrides import (
    ABSENT,
    AppliedState,
    OverrideRefused,
    OverridesHandler,
    parse_size,
    plain_number,
    settings_of,
)
from coffer.guest.config.postgresql import literal
from coffer.guest.config.redis import RedisOverrides, config_value
from coffer.guest.layout import InstanceLayout

DEFAULTS = {"max_connections": 42, "sort_buffer_size": 262144, "log_buffer": 4}


class DictEngine(OverridesHandler):
    """Live settings in a dict; ``read_only`` names change only at a restart; ``refuses``
    names are refused whatever their value."""

    name_pattern: ClassVar[re.Pattern[str]] = re.compile(r"[a-z][a-z0-9_]*")
    engine_file: ClassVar[str | None] = "overrides.test"
    include_directive: ClassVar[str] = "include {path}"

    def __init__(self, layout: InstanceLayout) -> None:
        self.pid = 100
        super().__init__(layout, None, lambda: self.pid)
        self.live: dict[str, Any] = dict(DEFAULTS)
        self.read_only: set[str] = set()
        self.refuses: set[str] = set()

    def render_file(self, values: Mapping[str, Any]) -> str:
        return json.dumps(dict(values), sort_keys=True)

    @property
    def file(self) -> Path:
        path = self.file_path
        assert path is not None
        return path

    def restart(self) -> None:
        """What a restart does: a new pid, and the file's values live."""
        self.pid += 1
        self.live = {**DEFAULTS, **json.loads(self.file.read_text())}

    def _change_live(
        self, changes: Mapping[str, Any], restart: set[str], state: AppliedState
    ) -> set[str]:
        later = set()
        for name, value in changes.items():
            if name in restart or name in self.read_only:
                later.add(name)
                continue
            if name in self.refuses:
                raise OverrideRefused(name, f"refused {name}")
            self.live[name] = DEFAULTS.get(name) if value is ABSENT else value
        return later


@pytest.fixture
def engine(tmp_path: Path) -> DictEngine:
    layout = InstanceLayout(tmp_path / "instance")
    layout.etc_dir.mkdir(parents=True)
    return DictEngine(layout)


def test_dynamic_values_apply_live_and_are_persisted(engine: DictEngine) -> None:
    assert engine.include_lines() == []  # nothing applied yet: the config includes nothing
    result = engine.apply({"max_connections": 555}, [])
    assert result == {
        "changed": ["max_connections"],
        "applied_live": ["max_connections"],
        "pending_restart": [],
    }
    assert engine.live["max_connections"] == 555
    assert json.loads(engine.file.read_text()) == {"max_connections": 555}
    assert engine.include_lines() == [f"include {engine.file_path}"]
    assert engine.applied() == {"max_connections": 555}
    # Idempotent: the same values change nothing.
    assert engine.apply({"max_connections": 555}, [])["changed"] == []


def test_removed_values_go_back_to_the_default(engine: DictEngine) -> None:
    engine.apply({"max_connections": 555, "sort_buffer_size": 1024}, [])
    result = engine.apply({"sort_buffer_size": 1024}, [])
    assert result["changed"] == ["max_connections"]
    assert engine.live["max_connections"] == 42
    assert engine.apply({}, [])["changed"] == ["sort_buffer_size"]
    assert engine.live == DEFAULTS
    assert json.loads(engine.file.read_text()) == {}


def test_restart_required_values_wait_until_the_engine_restarts(engine: DictEngine) -> None:
    result = engine.apply({"log_buffer": 8, "max_connections": 300}, ["log_buffer"])
    assert result["pending_restart"] == ["log_buffer"]
    assert engine.live["log_buffer"] == 4 and engine.live["max_connections"] == 300
    # Still pending for the same engine process, even with nothing new to apply...
    assert engine.apply({"log_buffer": 8, "max_connections": 300}, ["log_buffer"])[
        "pending_restart"
    ] == ["log_buffer"]
    # ...and not once it restarted: it read the file at its start.
    engine.restart()
    assert engine.live["log_buffer"] == 8
    result = engine.apply({"log_buffer": 8, "max_connections": 300}, ["log_buffer"])
    assert result == {"changed": [], "applied_live": [], "pending_restart": []}


def test_a_read_only_parameter_is_pending_too(engine: DictEngine) -> None:
    engine.read_only.add("sort_buffer_size")
    result = engine.apply({"sort_buffer_size": 1024}, [])
    assert result["pending_restart"] == ["sort_buffer_size"]
    assert result["applied_live"] == []


def test_a_refused_value_puts_everything_back(engine: DictEngine) -> None:
    engine.apply({"max_connections": 555}, [])
    engine.refuses.add("sort_buffer_size")
    with pytest.raises(OverrideRefused):
        engine.apply({"max_connections": 666, "sort_buffer_size": 1}, [])
    assert engine.live["max_connections"] == 555
    assert engine.applied() == {"max_connections": 555}
    assert json.loads(engine.file.read_text()) == {"max_connections": 555}


@pytest.mark.parametrize(
    ("values", "phrase"),
    [
        ({"Max-Connections": 1}, "not a parameter name"),
        ({"x; DROP TABLE t": 1}, "not a parameter name"),
        ({"max_connections": [1]}, "number, a boolean or a string"),
        ({"max_connections": float("nan")}, "finite"),
        ({"sql_mode": "a\nb"}, "printable"),
        ({"sql_mode": "x" * 1025}, "1024"),
        ([("max_connections", 1)], "object"),
    ],
)
def test_bad_values_are_refused_before_anything_changes(
    engine: DictEngine, values: Any, phrase: str
) -> None:
    with pytest.raises(ValidationError, match=phrase):
        engine.apply(values, [])
    assert not engine.state_path.exists() and not engine.file.exists()
    assert engine.live == DEFAULTS


def test_a_damaged_record_is_rebuilt(engine: DictEngine) -> None:
    engine.state_path.write_text("{not json")
    assert engine.applied() == {}
    engine.apply({"max_connections": 7}, [])
    assert engine.applied() == {"max_connections": 7}


# -- engine formats -------------------------------------------------------------------------------


def test_mariadb_option_file_and_include(tmp_path: Path) -> None:
    layout = InstanceLayout(tmp_path / "i")
    layout.etc_dir.mkdir(parents=True)
    no_engine: Any = None
    handler = MariaDBOverrides(layout, None, lambda: None, no_engine, lambda: "")
    values = {
        "max_connections": 555,
        "autocommit": False,
        "sql_mode": 'A"B\\C',
        "long_query_time": 1e-5,
    }
    assert handler.render_file(values).splitlines()[1:] == [
        "[mariadbd]",
        "autocommit = OFF",
        "long_query_time = 0.00001",
        "max_connections = 555",
        'sql_mode = "A\\"B\\\\C"',
    ]
    assert option_value(True) == "ON"
    # A change that waits for a restart needs no running engine: it only goes to the file,
    # which my.cnf then includes.
    result = handler.apply({"innodb_log_buffer_size": 8388608}, ["innodb_log_buffer_size"])
    assert result["pending_restart"] == ["innodb_log_buffer_size"]
    assert handler.include_lines() == [f"!include {layout.etc_dir / 'overrides.cnf'}"]
    assert "innodb_log_buffer_size = 8388608" in (layout.etc_dir / "overrides.cnf").read_text()


def test_rendered_config_defaults_are_parsed() -> None:
    mycnf = "# c\n[mariadbd]\nmax_connections = 42\ntable-open-cache = 400\n!include /x\n"
    assert settings_of(mycnf, "=") == {"max_connections": "42", "table_open_cache": "400"}
    redis_conf = "# c\nmaxmemory 192mb\nsave 3600 1 300 100\ninclude /x\n"
    assert settings_of(redis_conf, None) == {"maxmemory": "192mb", "save": "3600 1 300 100"}
    assert parse_size("64M") == 64 * 1024**2
    assert parse_size("1G") == 1024**3
    assert parse_size("300") == 300
    assert parse_size("OFF") == "OFF"
    assert plain_number(2.5) == "2.5" and plain_number(7) == "7"


def test_redis_and_postgresql_values() -> None:
    assert config_value(True) == "yes" and config_value(False) == "no"
    assert config_value(16) == "16"
    no_engine: Any = None
    layout = InstanceLayout(Path("/nonexistent"))
    handler = RedisOverrides(layout, None, lambda: None, no_engine, str)
    assert handler.render_file({"notify-keyspace-events": "", "hz": 20}).splitlines()[1:] == [
        'hz "20"',
        'notify-keyspace-events ""',
    ]
    assert literal(True).as_string(None) == "on"
    assert literal(8192).as_string(None) == "8192"
