"""The guest's datastore interface: one object runs and manages one engine server.

A guest agent owns exactly one ``Datastore`` for its instance. Implementations live beside this
module (``mariadb.py``, ...) and are found by manager short name through
``coffer.datastores.registry``. Engines that lack a feature (Redis has no databases) simply do not
override its methods: the defaults here raise ``NotImplementedByDatastore``, which the API turns
into a clear 501, and ``capabilities`` says up front what is supported.
"""

from __future__ import annotations

import ipaddress
import os
import stat
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar

from coffer.errors import EngineError, NotImplementedByDatastore, ValidationError
from coffer.guest.layout import InstanceLayout
from coffer.status import ServiceStatus

GIB = 1024**3


class Capability(StrEnum):
    """Features a datastore may support; extend by adding members (values are stable names)."""

    DATABASES = "databases"
    USERS = "users"
    ROOT = "root"
    BACKUP = "backup"
    REPLICATION = "replication"
    CONFIGURATION = "configuration"
    LOGS = "logs"


class EngineUnavailable(EngineError):
    """The engine is not running or not answering; retrying after it starts may succeed."""

    status = 503
    fault = "serviceUnavailable"
    transient = True


@dataclass(frozen=True)
class EngineSpec:
    """Everything a datastore needs to know to run its engine for one instance.

    ``bind_addresses`` are the instance's own IP addresses (private, then public if any); the
    engine listens on ``port`` on each of them and nowhere else. ``memory_mb``, ``vcpus`` and
    ``volume_size_gb`` come from the flavor and the volume and size the engine's settings.
    ``run_as`` is the unprivileged OS user to run the engine as when the agent itself is root.
    ``allowed_cidrs`` are the networks clients may connect from (empty: anywhere); engines that
    can enforce them (PostgreSQL's pg_hba) do. ``template_dir`` is a directory shared by the
    instances of one host where a datastore may keep pre-initialised data directories to copy.
    """

    layout: InstanceLayout
    bind_addresses: list[str]
    port: int
    memory_mb: int
    vcpus: int
    volume_size_gb: int
    run_as: str | None = None
    allowed_cidrs: tuple[str, ...] = ()
    template_dir: Path | None = None

    def __post_init__(self) -> None:
        if not self.bind_addresses:
            raise ValidationError("The engine needs at least one bind address.")
        for address in self.bind_addresses:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise ValidationError(
                    f"The bind address {address!r} is not an IP address."
                ) from None
        if not 1 <= self.port <= 65535:
            raise ValidationError(f"The port {self.port} is outside 1-65535.")
        if self.memory_mb < 128:
            raise ValidationError(
                f"The flavor has {self.memory_mb} MB of RAM; engines need at least 128 MB."
            )
        if self.vcpus < 1:
            raise ValidationError("The flavor must have at least one vCPU.")
        if self.volume_size_gb < 1:
            raise ValidationError("The volume must be at least 1 GB.")
        for cidr in self.allowed_cidrs:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValidationError(f"The allowed CIDR {cidr!r} is not a network.") from None


def paginate(
    items: Sequence[dict[str, Any]],
    key: Callable[[dict[str, Any]], str],
    limit: int | None,
    marker: str | None,
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of ``items`` in ``key`` order, after ``marker``; Trove's paging contract.

    Returns the items whose key sorts after ``marker`` (all when it is None), at most ``limit``
    of them, and the key of the last one returned when more remain (else None) to pass as the
    next marker. Raises ValidationError for a limit below 1.
    """
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValidationError(f"The limit must be a positive whole number, not {limit!r}.")
    ordered = sorted(items, key=key)
    if marker is not None:
        ordered = [item for item in ordered if key(item) > marker]
    if limit is None or len(ordered) <= limit:
        return list(ordered), None
    page = list(ordered[:limit])
    return page, key(page[-1])


def disk_usage(root: os.PathLike[str] | str) -> int:
    """Bytes of disk used by the files under ``root`` (allocated blocks, hard links once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    stack = [os.fspath(root)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue  # removed while we walked, or unreadable: not ours to count
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if (info.st_dev, info.st_ino) in seen:
                continue
            seen.add((info.st_dev, info.st_ino))
            total += info.st_blocks * 512
            if stat.S_ISDIR(info.st_mode):
                stack.append(entry.path)
    return total


class Datastore(ABC):
    """Runs and manages one engine server for one instance. The contract every engine keeps:

    * **Idempotent.** ``prepare``, ``start`` and ``stop`` may be repeated (an agent retrying
      after a crash): ``prepare`` initialises only an empty data directory and creates only what
      is missing; ``start`` adopts an engine that already runs (found by its pid file) instead of
      starting a second; ``stop`` of a stopped engine does nothing.
    * **Blocking.** Every method blocks until done. ``start``/``stop`` wait at most ``timeout``
      seconds; ``prepare`` may take as long as initialising a data directory takes (seconds);
      database, user and root calls take milliseconds unless the engine is busy. Call them from
      one worker thread or serialise ``prepare``/``start``/``stop``; the SQL calls are safe to
      run concurrently with each other.
    * **Validated first.** Every argument is checked before anything changes; bad input raises
      ``ValidationError`` (a 400) and leaves the engine untouched. Names of the engine's own
      databases and accounts are refused the same way.
    * **Errors are Coffer errors.** ``DatabaseAlreadyExists``/``UserAlreadyExists`` (400),
      ``DatabaseNotFound``/``UserNotFound`` (404), ``EngineUnavailable`` (503, transient: the
      engine is not running or not answering), ``EngineError`` (500: the engine refused or
      failed; the message says what to do) and ``NotImplementedByDatastore`` (501) for a feature
      outside ``capabilities``. No driver exception escapes, and no message carries a secret.
    * **Never as root.** The engine runs as ``spec.run_as`` when the agent is root and refuses
      to run as root; files the datastore creates belong to the engine's user.

    Trove dict shapes: a database is ``{"name", "character_set"?, "collate"?}``; a user is
    ``{"name", "password", "host"? = "%", "databases"?: [{"name"}]}`` on input and
    ``{"name", "host", "databases": [{"name"}]}`` on output. Lists page with ``limit`` and
    ``marker`` and return ``(items, next_marker)``; see ``paginate``.
    """

    manager: ClassVar[str]
    capabilities: ClassVar[frozenset[Capability]] = frozenset()
    #: Why a capability is missing, shown to users who ask for it (e.g. Redis databases).
    capability_notes: ClassVar[dict[Capability, str]] = {}

    def __init__(self, spec: EngineSpec) -> None:
        self.spec = spec
        self.layout = spec.layout

    # -- lifecycle: every engine implements these ---------------------------------------------

    @classmethod
    @abstractmethod
    def detect_version(cls) -> str | None:
        """The installed engine's version (e.g. ``"10.11.6"``), or None if it is not installed."""

    @abstractmethod
    def prepare(self, databases: list[dict[str, Any]], users: list[dict[str, Any]]) -> None:
        """Make the instance ready: create the layout, initialise an empty data directory, write
        the configuration, start the engine, and create the databases and users not there yet.
        """

    @abstractmethod
    def start(self, timeout: float = 60) -> None:
        """Start the engine and wait until it answers; adopt it if it already runs.

        Raises EngineError if it exits during start, EngineUnavailable if it does not answer
        within ``timeout`` (it is left running: it may be recovering).
        """

    @abstractmethod
    def stop(self, timeout: float = 60) -> None:
        """Shut the engine down cleanly; no-op if stopped.

        If it does not stop within ``timeout`` it is killed and EngineError is raised.
        """

    @abstractmethod
    def is_running(self) -> bool:
        """True if the engine process is alive (whether or not it answers yet)."""

    @abstractmethod
    def status(self) -> ServiceStatus:
        """HEALTHY when the engine answers a trivial query, SHUTDOWN when it is not running,
        CRASHED when its process ended without being asked, BLOCKED when it runs but does not
        answer. Never raises for an engine problem: that is what the status reports.
        """

    def restart(self, timeout: float = 60) -> None:
        """Stop then start, each within ``timeout``."""
        self.stop(timeout)
        self.start(timeout)

    def volume_stats(self) -> dict[str, int]:
        """``{"used": bytes used under the layout root, "total": volume size in bytes}``."""
        return {"used": disk_usage(self.layout.root), "total": self.spec.volume_size_gb * GIB}

    # -- features: engines override what they support ------------------------------------------

    def _unsupported(self, capability: Capability) -> NotImplementedByDatastore:
        return NotImplementedByDatastore(
            f"The {self.manager} datastore does not support {capability.value} operations."
        )

    def create_databases(self, databases: list[dict[str, Any]]) -> None:
        """Create each database; DatabaseAlreadyExists if one exists (none is created then)."""
        raise self._unsupported(Capability.DATABASES)

    def list_databases(
        self, limit: int | None = None, marker: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Tenant databases (the engine's own are hidden), paged by name."""
        raise self._unsupported(Capability.DATABASES)

    def delete_database(self, name: str) -> None:
        """Drop a database; DatabaseNotFound if absent."""
        raise self._unsupported(Capability.DATABASES)

    def create_users(self, users: list[dict[str, Any]]) -> None:
        """Create each user and grant it its databases; UserAlreadyExists if one exists,
        DatabaseNotFound if a granted database is absent (nothing is created then)."""
        raise self._unsupported(Capability.USERS)

    def list_users(
        self, limit: int | None = None, marker: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Tenant users with their databases (internal accounts hidden), paged."""
        raise self._unsupported(Capability.USERS)

    def get_user(self, name: str, host: str = "%") -> dict[str, Any]:
        """One user as ``{"name", "host", "databases"}``; UserNotFound if absent."""
        raise self._unsupported(Capability.USERS)

    def update_user(self, name: str, host: str, attrs: dict[str, Any]) -> None:
        """Change a user's name, password and/or host; its grants follow it."""
        raise self._unsupported(Capability.USERS)

    def change_passwords(self, users: list[dict[str, Any]]) -> None:
        """Set each ``{"name", "host"?, "password"}`` user's password; UserNotFound first."""
        raise self._unsupported(Capability.USERS)

    def delete_user(self, name: str, host: str = "%") -> None:
        """Drop a user; UserNotFound if absent."""
        raise self._unsupported(Capability.USERS)

    def grant_access(self, name: str, host: str, databases: list[str]) -> None:
        """Give the user full access to each database."""
        raise self._unsupported(Capability.USERS)

    def list_access(self, name: str, host: str = "%") -> list[dict[str, Any]]:
        """The databases the user may use, as ``[{"name"}]``."""
        raise self._unsupported(Capability.USERS)

    def revoke_access(self, name: str, host: str, database: str) -> None:
        """Take away the user's access to one database."""
        raise self._unsupported(Capability.USERS)

    def enable_root(self, password: str | None = None) -> dict[str, Any]:
        """Create or reset the superuser; returns ``{"name", "password"}`` (generated if None)."""
        raise self._unsupported(Capability.ROOT)

    def disable_root(self) -> None:
        """Remove the superuser enabled by ``enable_root``."""
        raise self._unsupported(Capability.ROOT)

    def is_root_enabled(self) -> bool:
        """True if ``enable_root`` has been used and not undone."""
        raise self._unsupported(Capability.ROOT)
