"""The compute seam's registry and the local driver's input checks (no processes started)."""

from __future__ import annotations

from pathlib import Path

import pytest

from coffer.compute.base import ServerNotFound, ServerSpec, get_driver
from coffer.compute.local import LocalCompute
from coffer.config import Settings, load_settings
from coffer.db.models import Base
from coffer.db.session import make_engine
from coffer.errors import ComputeError, ConfigError, ValidationError

SECRET = "pw-9f2c41d7e8"


def _settings(state: Path) -> Settings:
    return load_settings(environ={}, overrides={"DEFAULT": {"state_dir": str(state)}})


def _with_control_db(state: Path) -> Settings:
    state.mkdir()
    settings = _settings(state)
    engine = make_engine(settings.database_url)
    Base.metadata.create_all(engine)
    engine.dispose()
    return settings


def test_get_driver_builds_the_local_driver_by_short_name(tmp_path: Path) -> None:
    driver = get_driver("local", _settings(tmp_path))
    assert isinstance(driver, LocalCompute)
    assert driver.instances_dir == tmp_path / "instances"


def test_get_driver_suggests_the_closest_name_on_a_typo(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        get_driver("lcoal", _settings(tmp_path))
    assert "did you mean 'local'" in caught.value.message
    assert "known drivers: local" in caught.value.message


def test_server_spec_repr_hides_the_guest_config() -> None:
    spec = ServerSpec("inst-a", {"password": SECRET}, is_public=False)
    assert SECRET not in repr(spec)
    assert "inst-a" in repr(spec)


def test_agent_argv_must_be_a_list_of_strings(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="agent_argv"):
        LocalCompute(_settings(tmp_path), agent_argv=[])


@pytest.mark.parametrize(
    ("spec", "error", "words"),
    [
        (ServerSpec("bad/id", {}, False), ValidationError, "instance id"),
        (ServerSpec("inst-a", {"key": b"raw"}, False), ValidationError, "JSON"),
        (ServerSpec("inst-a", {"volume_size_gb": "5"}, False), ValidationError, "volume_size_gb"),
        (ServerSpec("inst-a", {"flavor": {"ram": -1}}, False), ValidationError, "ram"),
        (ServerSpec("inst-a", {"password": SECRET}, False), ComputeError, "no private address"),
    ],
)
def test_create_server_rejects_bad_input_before_any_side_effect(
    tmp_path: Path, spec: ServerSpec, error: type[Exception], words: str
) -> None:
    state = tmp_path / "state"
    driver = LocalCompute(_with_control_db(state))
    with pytest.raises(error, match=words) as caught:
        driver.create_server(spec)
    assert SECRET not in str(caught.value)
    assert not (state / "instances").exists()


def test_unknown_servers_are_reported_as_absent(tmp_path: Path) -> None:
    driver = LocalCompute(_settings(tmp_path / "state"))
    assert driver.get_server("inst-a") is None
    assert driver.list_servers() == []
    driver.delete_server("inst-a")  # nothing to delete: a no-op
    with pytest.raises(ServerNotFound, match="create it first") as caught:
        driver.ensure_running("inst-a")
    assert caught.value.status == 404
    with pytest.raises(ServerNotFound):
        driver.volume_usage("inst-a")


def test_list_servers_ignores_stray_entries(tmp_path: Path) -> None:
    instances = tmp_path / "instances"
    (instances / "inst-b").mkdir(parents=True)
    (instances / "inst-a").mkdir()
    (instances / ".tmp-x").mkdir()
    (instances / "notes.txt").write_text("not an instance")
    (instances / "link").symlink_to(instances / "inst-a")
    assert LocalCompute(_settings(tmp_path)).list_servers() == ["inst-a", "inst-b"]
