"""One behaviour suite for the datastore contract (``coffer.guest.datastores.base.Datastore``).

Each engine subclasses ``DatastoreContract`` and says only how a real client logs in to it; the
tests then exercise every capability the engine declares over real connections, and show that
every capability it does not declare fails cleanly with ``NotImplementedByDatastore`` and changes
nothing. The engine runs as the unprivileged engine user on its own loopback address and is
stopped by PID at the end of the class, even when a test fails.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from coffer_harness import kill_all_under, processes_under

from coffer.errors import CofferError, NotImplementedByDatastore
from coffer.guest.datastores.base import Capability, Datastore, EngineSpec
from coffer.guest.layout import InstanceLayout
from coffer.status import ServiceStatus

#: The capabilities this suite knows how to exercise.
EXERCISED = (Capability.DATABASES, Capability.USERS, Capability.ROOT)


def _free_address(prefix: str, port: int) -> str:
    for _ in range(50):
        address = f"{prefix}.{random.randint(2, 254)}"
        with socket.socket() as probe:
            try:
                probe.bind((address, port))
            except OSError:
                continue
            return address
    raise RuntimeError(f"no free address in {prefix}.0/24 for port {port}")


class DatastoreContract:
    """Subclass with ``plugin``, ``port``, ``address_prefix`` and ``can_login``."""

    plugin: ClassVar[type[Datastore]]
    port: ClassVar[int]
    address_prefix: ClassVar[str]
    #: The database a root login uses, if the engine needs one.
    root_database: ClassVar[str | None] = None

    def can_login(
        self, address: str, user: str | None, password: str, database: str | None
    ) -> bool:
        """True when a real client logs in (and, given ``database``, can use it)."""
        raise NotImplementedError

    # -- the engine under test ------------------------------------------------------------------

    @pytest.fixture(scope="class")
    @classmethod
    def engine(cls, engine_user: str) -> Iterator[tuple[Datastore, str]]:
        base = Path(tempfile.mkdtemp(prefix="coffer-contract-", dir="/tmp"))
        base.chmod(0o711)
        address = _free_address(cls.address_prefix, cls.port)
        spec = EngineSpec(
            layout=InstanceLayout(base / "instance"),
            bind_addresses=[address],
            port=cls.port,
            memory_mb=256,
            vcpus=1,
            volume_size_gb=1,
            run_as=engine_user,
        )
        datastore = cls.plugin(spec)
        try:
            datastore.prepare([], [])
            yield datastore, address
        finally:
            with contextlib.suppress(Exception):
                datastore.stop(timeout=20)
            kill_all_under(base)
            leftover = processes_under(base)
            shutil.rmtree(base, ignore_errors=True)
            assert not leftover, f"engine processes left running: {leftover}"

    def _has(self, capability: Capability) -> bool:
        return capability in self.plugin.capabilities

    def _require(self, capability: Capability) -> None:
        if not self._has(capability):
            pytest.skip(f"{self.plugin.manager} does not declare {capability.value}")

    # -- always -------------------------------------------------------------------------------

    def test_prepared_engine_is_healthy(self, engine: tuple[Datastore, str]) -> None:
        datastore, _ = engine
        assert datastore.is_running()
        assert datastore.status() is ServiceStatus.HEALTHY
        stats = datastore.volume_stats()
        assert stats["used"] > 0
        assert stats["total"] == 1024**3

    def test_version_is_detected(self) -> None:
        version = self.plugin.detect_version()
        assert version and version[0].isdigit()

    # -- declared capabilities, over real connections ----------------------------------------

    def test_users(self, engine: tuple[Datastore, str]) -> None:
        self._require(Capability.USERS)
        datastore, address = engine
        database = None
        if self._has(Capability.DATABASES):
            database = "contract_users"
            datastore.create_databases([{"name": database}])
        grants = [{"name": database}] if database else []
        datastore.create_users([{"name": "cu1", "password": "first-pass", "databases": grants}])
        assert self.can_login(address, "cu1", "first-pass", database)
        assert not self.can_login(address, "cu1", "wrong-pass", database)
        names = {u["name"] for u in datastore.list_users()[0]}
        assert "cu1" in names
        assert datastore.get_user("cu1", "%")["name"] == "cu1"

        datastore.update_user("cu1", "%", {"password": "second-pass"})
        assert not self.can_login(address, "cu1", "first-pass", database)
        assert self.can_login(address, "cu1", "second-pass", database)

        datastore.update_user("cu1", "%", {"name": "cu2"})
        assert self.can_login(address, "cu2", "second-pass", database)
        assert not self.can_login(address, "cu1", "second-pass", database)

        datastore.change_passwords([{"name": "cu2", "password": "third-pass"}])
        assert self.can_login(address, "cu2", "third-pass", database)

        datastore.delete_user("cu2", "%")
        assert not self.can_login(address, "cu2", "third-pass", database)
        assert "cu2" not in {u["name"] for u in datastore.list_users()[0]}

    def test_duplicate_user_is_refused(self, engine: tuple[Datastore, str]) -> None:
        self._require(Capability.USERS)
        datastore, _ = engine
        datastore.create_users([{"name": "dup", "password": "dup-pass-1"}])
        with pytest.raises(CofferError) as err:
            datastore.create_users([{"name": "dup", "password": "dup-pass-2"}])
        assert err.value.status == 400
        assert "exist" in err.value.message
        datastore.delete_user("dup", "%")

    def test_databases_and_access(self, engine: tuple[Datastore, str]) -> None:
        self._require(Capability.DATABASES)
        datastore, address = engine
        datastore.create_databases([{"name": "contract_a"}, {"name": "contract_b"}])
        listed = {d["name"] for d in datastore.list_databases()[0]}
        assert {"contract_a", "contract_b"} <= listed

        datastore.create_users(
            [{"name": "ca", "password": "ca-pass", "databases": [{"name": "contract_a"}]}]
        )
        assert self.can_login(address, "ca", "ca-pass", "contract_a")
        assert not self.can_login(address, "ca", "ca-pass", "contract_b")
        datastore.grant_access("ca", "%", ["contract_b"])
        assert {d["name"] for d in datastore.list_access("ca", "%")} == {
            "contract_a",
            "contract_b",
        }
        assert self.can_login(address, "ca", "ca-pass", "contract_b")
        datastore.revoke_access("ca", "%", "contract_b")
        assert not self.can_login(address, "ca", "ca-pass", "contract_b")
        assert self.can_login(address, "ca", "ca-pass", "contract_a")

        datastore.delete_database("contract_b")
        assert "contract_b" not in {d["name"] for d in datastore.list_databases()[0]}
        datastore.delete_user("ca", "%")

    def test_root(self, engine: tuple[Datastore, str]) -> None:
        self._require(Capability.ROOT)
        datastore, address = engine
        assert not datastore.is_root_enabled()
        given = datastore.enable_root("Given-Root-Pass-1")
        assert given["password"] == "Given-Root-Pass-1"
        assert datastore.is_root_enabled()
        assert self.can_login(address, given["name"], given["password"], self.root_database)
        generated = datastore.enable_root(None)
        assert len(generated["password"]) >= 16
        assert self.can_login(address, generated["name"], generated["password"], self.root_database)
        assert not self.can_login(address, given["name"], given["password"], self.root_database)
        datastore.disable_root()
        assert not datastore.is_root_enabled()
        assert not self.can_login(
            address, generated["name"], generated["password"], self.root_database
        )

    # -- undeclared capabilities fail cleanly ----------------------------------------------------

    _CALLS: ClassVar[dict[Capability, list[tuple[str, tuple[Any, ...]]]]] = {
        Capability.DATABASES: [
            ("create_databases", ([{"name": "nope_db"}],)),
            ("list_databases", ()),
            ("delete_database", ("nope_db",)),
            ("grant_access", ("nobody", "%", ["nope_db"])),
            ("list_access", ("nobody", "%")),
            ("revoke_access", ("nobody", "%", "nope_db")),
        ],
        Capability.USERS: [
            ("create_users", ([{"name": "nope_user", "password": "x-pass"}],)),
            ("list_users", ()),
        ],
        Capability.ROOT: [("enable_root", (None,)), ("disable_root", ())],
    }

    def test_undeclared_capabilities_fail_cleanly(self, engine: tuple[Datastore, str]) -> None:
        datastore, _ = engine
        missing = [c for c in EXERCISED if not self._has(c)]
        if not missing:
            pytest.skip(f"{self.plugin.manager} declares every exercised capability")
        for capability in missing:
            for method, args in self._CALLS[capability]:
                with pytest.raises(NotImplementedByDatastore) as err:
                    getattr(datastore, method)(*args)
                assert err.value.status == 501
                assert err.value.message
        assert datastore.status() is ServiceStatus.HEALTHY

    # -- lifecycle (last: it stops the engine) ---------------------------------------------------

    def test_zz_stop_then_start(self, engine: tuple[Datastore, str]) -> None:
        datastore, _ = engine
        datastore.stop(timeout=30)
        assert datastore.status() is ServiceStatus.SHUTDOWN
        datastore.stop(timeout=30)  # idempotent
        datastore.start()
        assert datastore.status() is ServiceStatus.HEALTHY
        # A second object on the same volume adopts the running engine.
        again = self.plugin(datastore.spec)
        again.start()
        assert again.status() is ServiceStatus.HEALTHY
