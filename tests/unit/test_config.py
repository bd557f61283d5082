from pathlib import Path

import pytest

from coffer.config import describe_options, load_settings
from coffer.errors import ConfigError


def test_defaults_need_no_file(tmp_path: Path) -> None:
    settings = load_settings(environ={"COFFER_STATE_DIR": str(tmp_path)})
    assert settings.state_dir == tmp_path
    assert settings.database_url == f"sqlite:///{tmp_path / 'coffer.db'}"
    assert settings.default.bind_port == 8779
    assert settings.default.transport_url == "embedded://"


def test_file_and_environment_override(tmp_path: Path) -> None:
    conf = tmp_path / "coffer.conf"
    conf.write_text(
        "[DEFAULT]\nbind_port = 9001\nmax_instances_per_tenant = 3\n"
        "[database]\nconnection = postgresql+psycopg://u@h/db\n"
    )
    settings = load_settings(conf, environ={"COFFER_DEFAULT__BIND_PORT": "9002"})
    assert settings.default.bind_port == 9002
    assert settings.default.max_instances_per_tenant == 3
    assert settings.database_url == "postgresql+psycopg://u@h/db"


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    conf = tmp_path / "coffer.conf"
    conf.write_text(
        "[DEFAULT]\nbind_prot = 1\nbind_port = 70000\n[nosuch]\nx = 1\n[compute]\ndriver = local\n"
    )
    with pytest.raises(ConfigError) as err:
        load_settings(conf, environ={})
    problems = err.value.problems
    assert any("bind_prot" in p and "did you mean 'bind_port'" in p for p in problems)
    assert any("bind_port" in p and "less than or equal" in p for p in problems)
    assert any("[nosuch]" in p for p in problems)
    assert len(problems) == 3


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.conf", environ={})


def test_unknown_environment_section_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown section"):
        load_settings(environ={"COFFER_BOGUS__X": "1"})


def test_configuration_doc_lists_every_option() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    for section, name, _default, _help in describe_options():
        assert f"`{name}`" in doc, f"docs/configuration.md misses [{section}] {name}"
