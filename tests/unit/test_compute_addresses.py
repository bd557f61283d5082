"""Loopback address allocation of the local compute driver, on a real SQLite control DB."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from coffer.compute import addresses
from coffer.compute.addresses import AddressPool, parse_pools
from coffer.compute.local import LocalCompute
from coffer.config import Settings, load_settings
from coffer.db.models import AddressAllocation, Base
from coffer.db.session import make_engine, make_session_factory, transaction
from coffer.errors import AddressPoolExhausted, ConfigError, ValidationError


def _settings(
    tmp_path: Path, private: str = "127.10.0.0/16", public: str = "127.20.0.0/16"
) -> Settings:
    return load_settings(
        environ={},
        overrides={
            "DEFAULT": {"state_dir": str(tmp_path / "state")},
            "compute": {"private_pool": private, "public_pool": public},
        },
    )


@pytest.fixture
def factory(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(f"sqlite:///{tmp_path / 'control.db'}")
    Base.metadata.create_all(engine)
    try:
        yield make_session_factory(engine)
    finally:
        engine.dispose()


@pytest.fixture
def driver(tmp_path: Path) -> LocalCompute:
    return LocalCompute(_settings(tmp_path))


def _rows(factory: sessionmaker[Session]) -> dict[str, tuple[str, str]]:
    with factory() as session:
        return {
            row.address: (row.pool, row.instance_id)
            for row in session.scalars(select(AddressAllocation))
        }


def test_first_instance_gets_the_lowest_private_address_and_no_public_one(
    driver: LocalCompute, factory: sessionmaker[Session]
) -> None:
    with transaction(factory) as session:
        assert driver.allocate_addresses(session, "inst-a", False) == ("127.10.0.1", None)
    assert _rows(factory) == {"127.10.0.1": ("private", "inst-a")}


def test_public_instance_also_gets_an_address_from_the_public_pool(
    driver: LocalCompute, factory: sessionmaker[Session]
) -> None:
    with transaction(factory) as session:
        driver.allocate_addresses(session, "inst-a", False)
        assert driver.allocate_addresses(session, "inst-b", True) == ("127.10.0.2", "127.20.0.1")
    assert _rows(factory)["127.20.0.1"] == ("public", "inst-b")


def test_retry_returns_the_addresses_already_held(
    driver: LocalCompute, factory: sessionmaker[Session]
) -> None:
    with transaction(factory) as session:
        first = driver.allocate_addresses(session, "inst-a", True)
    with transaction(factory) as session:
        driver.allocate_addresses(session, "inst-b", True)
    with transaction(factory) as session:
        assert driver.allocate_addresses(session, "inst-a", True) == first
    assert len(_rows(factory)) == 4


def test_turning_public_access_off_releases_only_the_public_address(
    driver: LocalCompute, factory: sessionmaker[Session]
) -> None:
    with transaction(factory) as session:
        private, _public = driver.allocate_addresses(session, "inst-a", True)
    with transaction(factory) as session:
        assert driver.allocate_addresses(session, "inst-a", False) == (private, None)
    assert _rows(factory) == {private: ("private", "inst-a")}


def test_release_frees_the_addresses_for_the_next_instance(
    driver: LocalCompute, factory: sessionmaker[Session]
) -> None:
    with transaction(factory) as session:
        driver.allocate_addresses(session, "inst-a", True)
        driver.allocate_addresses(session, "inst-b", False)
    with transaction(factory) as session:
        driver.release_addresses(session, "inst-a")
        driver.release_addresses(session, "inst-a")  # twice: still fine
        driver.release_addresses(session, "never-allocated")
    assert set(_rows(factory)) == {"127.10.0.2"}
    with transaction(factory) as session:
        assert driver.allocate_addresses(session, "inst-c", True) == ("127.10.0.1", "127.20.0.1")


def test_pool_hands_out_host_addresses_without_dot0_dot255_network_or_broadcast() -> None:
    pool = AddressPool("private", addresses.ipaddress.IPv4Network("127.10.0.0/23"))
    listed = list(pool.addresses())
    assert listed[0] == "127.10.0.1"
    assert listed[-1] == "127.10.1.254"
    assert "127.10.0.255" not in listed and "127.10.1.0" not in listed
    assert len(listed) == 2 * 254 == pool.size
    tiny = AddressPool("public", addresses.ipaddress.IPv4Network("127.20.0.0/30"))
    assert list(tiny.addresses()) == ["127.20.0.1", "127.20.0.2"]


def test_exhausted_pool_raises_a_clear_error_and_allocates_nothing(
    tmp_path: Path, factory: sessionmaker[Session]
) -> None:
    driver = LocalCompute(_settings(tmp_path, private="127.10.0.0/29", public="127.20.0.0/30"))
    with transaction(factory) as session:
        for index in range(4):
            driver.allocate_addresses(session, f"inst-{index}", False)
        driver.allocate_addresses(session, "pub-0", True)
        driver.allocate_addresses(session, "pub-1", True)
    with factory() as session:
        with pytest.raises(AddressPoolExhausted) as caught:
            driver.allocate_addresses(session, "inst-9", False)
        message = caught.value.message
        assert "127.10.0.0/29" in message and "all 6 addresses" in message
        assert "[compute] private_pool" in message
        assert caught.value.status == 503
        driver.release_addresses(session, "inst-0")
        # A full public pool must not leave behind the private address taken just before.
        with pytest.raises(AddressPoolExhausted, match="public_pool"):
            driver.allocate_addresses(session, "pub-2", True)
        session.commit()
    allocated = _rows(factory)
    assert len(allocated) == 7
    assert "127.10.0.1" not in allocated
    assert not any(owner in ("inst-9", "pub-2") for _, owner in allocated.values())


def test_racing_sessions_never_share_an_address(
    driver: LocalCompute, factory: sessionmaker[Session]
) -> None:
    count = 8
    barrier = threading.Barrier(count)
    results: dict[int, tuple[str, str | None]] = {}
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            barrier.wait(timeout=10)
            with transaction(factory) as session:
                results[index] = driver.allocate_addresses(session, f"inst-{index}", index % 2 == 0)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    privates = [private for private, _ in results.values()]
    publics = [public for _, public in results.values() if public]
    assert len(set(privates)) == count
    assert len(set(publics)) == count // 2
    assert sorted(privates) == sorted(f"127.10.0.{i}" for i in range(1, count + 1))


def test_address_taken_after_our_read_is_skipped(
    driver: LocalCompute, factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another taskmanager commits our candidate between our read and our insert."""
    with transaction(factory) as session:
        driver.allocate_addresses(session, "other", False)
    # Our view of the used addresses predates the other transaction's commit.
    monkeypatch.setattr(addresses, "_used", lambda session, pool: set())
    with transaction(factory) as session:
        assert driver.allocate_addresses(session, "mine", False) == ("127.10.0.2", None)
    assert _rows(factory) == {
        "127.10.0.1": ("private", "other"),
        "127.10.0.2": ("private", "mine"),
    }


def test_malformed_instance_id_is_rejected_before_anything_is_written(
    driver: LocalCompute, factory: sessionmaker[Session]
) -> None:
    with transaction(factory) as session, pytest.raises(ValidationError, match="instance id"):
        driver.allocate_addresses(session, "../etc", False)
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(AddressAllocation)) == 0


def test_bad_pool_settings_are_all_reported_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_pools("10.0.0.0/8", "not-a-cidr")
    assert len(caught.value.problems) == 2
    assert "outside 127.0.0.0/8" in caught.value.problems[0]
    assert "not a CIDR" in caught.value.problems[1]
    with pytest.raises(ConfigError, match="overlap"):
        parse_pools("127.10.0.0/16", "127.10.5.0/24")
    with pytest.raises(ConfigError, match="no usable host address"):
        parse_pools("127.10.0.255/32", "127.20.0.0/16")


def test_driver_refuses_pools_outside_loopback(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="public_pool"):
        LocalCompute(_settings(tmp_path, public="192.168.0.0/24"))
