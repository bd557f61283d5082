"""The compute seam: where an instance's server (guest agent + engine) runs, and its addresses.

A driver is picked by short name with :func:`get_driver` (``[compute] driver``). The taskmanager
calls drivers from durable, resumable steps, so every method is idempotent: calling it again
after a crash, a timeout or a success is safe and converges on the same result.
"""

from __future__ import annotations

import difflib
import importlib
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from coffer.errors import ComputeError, ConfigError, ValidationError

if TYPE_CHECKING:
    from coffer.config import Settings

#: Third-party drivers register a ``ComputeDriver`` subclass under this entry-point group.
ENTRY_POINT_GROUP = "coffer.compute_drivers"

#: Built-in drivers: short name -> "module:Class" (imported only when chosen).
DRIVERS: dict[str, str] = {
    "local": "coffer.compute.local:LocalCompute",
}

_INSTANCE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class ServerNotFound(ComputeError):
    """The instance has no server (no directory / no VM) to act on."""

    status = 404
    fault = "itemNotFound"


class ServerStillRunning(ComputeError):
    """Processes of the instance survived a delete; the server was kept. Retrying may succeed."""

    transient = True


@dataclass(frozen=True)
class ServerSpec:
    """What the taskmanager asks for when it creates an instance's server."""

    instance_id: str
    #: Written to the guest's config file; holds secrets, so it is kept out of ``repr()``.
    guest_config: dict[str, Any] = field(repr=False)
    is_public: bool


@dataclass(frozen=True)
class ServerInfo:
    """What a driver observed of an instance's server."""

    instance_id: str
    #: Empty when the instance holds no address (e.g. an orphan whose addresses were released).
    private_address: str
    public_address: str | None
    volume_dir: Path
    #: True while the server's supervising process is alive.
    running: bool
    supervisor_pid: int | None
    #: The cgroup limiting the server's memory, or None where the host offers none.
    cgroup: Path | None = None


def check_instance_id(instance_id: str) -> str:
    """Return ``instance_id`` if it is safe as a directory and process name, else raise."""
    if not isinstance(instance_id, str) or not _INSTANCE_ID.match(instance_id):
        raise ValidationError(
            f"instance id {instance_id!r} is not valid: use 1-64 letters, digits, '-' or '_', "
            "starting with a letter or digit (a UUID works)"
        )
    return instance_id


class ComputeDriver(ABC):
    """Runs instances' servers and hands out their network addresses.

    Contract, for every implementation:

    * **Idempotent.** Each method may be called again after a crash, a timeout or a success of
      an earlier call and converges: ``create_server`` on a running server returns it,
      ``delete_server`` on a deleted one returns, ``allocate_addresses`` returns the addresses
      already held.
    * **Errors.** Failures raise :class:`coffer.errors.ComputeError` (or a subclass: see
      ``transient`` to decide whether to retry later); an exhausted address pool raises
      :class:`coffer.errors.AddressPoolExhausted`; a malformed argument raises
      :class:`coffer.errors.ValidationError` before anything is changed. Messages never contain
      secrets, and nothing from ``ServerSpec.guest_config`` is ever logged.
    * **Blocking.** Methods block the calling thread: ``create_server``/``ensure_running`` until
      the server's supervisor is up (seconds), ``delete_server`` up to its ``timeout`` plus a few
      seconds. Call them from a worker thread, never from an event loop.
    * **Transactions.** The address methods work inside the caller's ``session`` (in a
      savepoint) and leave committing to the caller; allocations are only final on commit.
    """

    #: Short name in the registry (``[compute] driver``).
    name: str = ""

    def __init__(self, settings: Settings) -> None:
        """Drivers are built from the process's settings alone (see :func:`get_driver`)."""
        self.settings = settings

    @abstractmethod
    def allocate_addresses(
        self, session: Session, instance_id: str, is_public: bool
    ) -> tuple[str, str | None]:
        """Allocate (or return the already held) ``(private, public-or-None)`` addresses.

        No two instances ever hold one address, even when allocating from two processes. A
        public address is held only while ``is_public``; one held from an earlier call with
        ``is_public`` true is released. Raises ``AddressPoolExhausted`` when a pool is full.
        """

    @abstractmethod
    def release_addresses(self, session: Session, instance_id: str) -> None:
        """Free every address of ``instance_id``; nothing held is fine."""

    @abstractmethod
    def create_server(self, spec: ServerSpec) -> ServerInfo:
        """Make the server exist and run: storage, the guest config, the supervised agent.

        The instance's private address must already be allocated. A server that exists is
        updated (guest config rewritten) and started if it is not running.
        """

    @abstractmethod
    def ensure_running(self, instance_id: str) -> ServerInfo:
        """Start the server's supervisor if it is gone; ``ServerNotFound`` if never created."""

    @abstractmethod
    def get_server(self, instance_id: str) -> ServerInfo | None:
        """The server as it is now, or None if it does not exist. Changes nothing."""

    @abstractmethod
    def delete_server(self, instance_id: str, timeout: float = 30) -> None:
        """Stop every process of the server, verify none remains, then remove its storage.

        Processes get ``timeout`` seconds to stop cleanly before they are killed. If any process
        survives, ``ServerStillRunning`` is raised and the storage is kept. Deleting a server
        that does not exist is a no-op. Addresses are released separately.
        """

    @abstractmethod
    def list_servers(self) -> list[str]:
        """Ids of every instance that has a server (storage), to find orphans."""

    @abstractmethod
    def volume_usage(self, instance_id: str) -> tuple[int, int]:
        """``(used bytes, total bytes)`` of the instance's volume; total 0 when unknown."""

    def close(self) -> None:  # noqa: B027 - optional hook, deliberately empty by default
        """Release resources the driver holds (connections); servers keep running."""


def _load(target: str) -> type[ComputeDriver]:
    module_name, _, class_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, ComputeDriver)):
        raise ComputeError(f"{target} is not a compute driver class")
    return cls


def available_drivers() -> dict[str, str]:
    """Short name -> "module:Class" of every built-in and installed compute driver."""
    found = dict(DRIVERS)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(entry.name, entry.value)
    return found


def get_driver(name: str, settings: Settings) -> ComputeDriver:
    """Build the compute driver called ``name`` (e.g. ``"local"``) from ``settings``.

    Raises ``ConfigError`` naming the known drivers (and the closest one) on an unknown name.
    """
    drivers = available_drivers()
    if name not in drivers:
        close = difflib.get_close_matches(name, list(drivers), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            [
                f"[compute] driver: unknown compute driver {name!r}{hint}; "
                f"known drivers: {', '.join(sorted(drivers))}"
            ]
        )
    driver_class = _load(drivers[name])
    return driver_class(settings)
