"""Which creates the warm pool serves (``warm_pool.fits``) and how its settings are checked."""

from __future__ import annotations

import pytest

from coffer.config import ConfigError, load_settings
from coffer.taskmanager import warm_pool


def _settings(**compute: str) -> object:
    return load_settings(environ={}, overrides={"compute": compute})


def test_no_pool_by_default() -> None:
    settings = _settings()
    assert warm_pool.wanted(settings) == {}
    assert not warm_pool.fits(settings, "redis", "6", 1, {"is_public": False})


def test_only_creates_of_the_pools_shape_fit() -> None:
    settings = _settings(redis_warm_pool="3")
    assert warm_pool.wanted(settings) == {"redis": 3}
    private = {"is_public": False}
    assert warm_pool.fits(settings, "redis", "6", 1, private)
    assert not warm_pool.fits(settings, "mariadb", "6", 1, private)  # no pool for it
    assert not warm_pool.fits(settings, "redis", "1", 1, private)  # another flavor
    assert not warm_pool.fits(settings, "redis", "6", 2, private)  # another volume size
    assert not warm_pool.fits(settings, "redis", "6", 1, {"is_public": True})
    assert not warm_pool.fits(
        settings, "redis", "6", 1, {"is_public": False, "allowed_cidrs": ["10.0.0.0/8"]}
    )


def test_a_pool_of_another_shape() -> None:
    settings = _settings(redis_warm_pool="1", warm_pool_flavor="2", warm_pool_volume_size="5")
    assert warm_pool.fits(settings, "redis", "2", 5, {"is_public": False})
    assert not warm_pool.fits(settings, "redis", "6", 1, {"is_public": False})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("redis_warm_pool", "-1"),
        ("redis_warm_pool", "65"),
        ("redis_warm_pool", "many"),
        ("warm_pool_volume_size", "0"),
        ("warm_pool_flavor", ""),
    ],
)
def test_bad_settings_are_refused_with_their_name(key: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        _settings(**{key: value})
    assert key in str(err.value)
