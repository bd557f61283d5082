"""Which engines this host can run, and which installed engine serves a datastore version.

Guest plugins are registered by short name (the datastore version's ``manager``). A datastore
version is served by the installed engine whose manager matches and whose version number equals
the version's number or extends it at a dot (``10.11`` is served by ``10.11.6``). Operators may
register any number of names for one engine; a version no installed engine matches may be
registered, but instances on it are refused with a clear 400.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

from coffer.errors import BadRequest, NotImplementedByDatastore, ValidationError

if TYPE_CHECKING:
    from coffer.guest.datastores.base import Capability, Datastore

LOG = logging.getLogger(__name__)

#: manager short name -> "module:Class" of its guest plugin.
PLUGINS: dict[str, str] = {
    "mariadb": "coffer.guest.datastores.mariadb:MariaDBDatastore",
    "postgresql": "coffer.guest.datastores.postgresql:PostgreSQLDatastore",
    "redis": "coffer.guest.datastores.redis:RedisDatastore",
}

#: manager short name -> module of the name rules the API applies before calling a guest.
RULES: dict[str, str] = {
    "mariadb": "coffer.datastores.mysql_rules",
    "mysql": "coffer.datastores.mysql_rules",
    "postgresql": "coffer.datastores.postgresql_rules",
    "redis": "coffer.datastores.redis_rules",
}

#: Managers an operator may register even though no plugin exists here yet.
KNOWN_MANAGERS = ("mariadb", "mysql", "postgresql", "redis")

#: The port each manager's engine listens on.
DEFAULT_PORTS = {"mariadb": 3306, "mysql": 3306, "postgresql": 5432, "redis": 6379}


@dataclass(frozen=True)
class InstalledEngine:
    manager: str
    version: str


def plugin_class(manager: str) -> type[Datastore]:
    """The guest plugin class for ``manager``; ValidationError (with did-you-mean) if unknown."""
    target = PLUGINS.get(manager)
    if target is None:
        close = difflib.get_close_matches(manager, list(PLUGINS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValidationError(
            f"No guest plugin for datastore manager {manager!r}.{hint} "
            f"Known managers: {', '.join(sorted(PLUGINS))}."
        )
    module_name, _, cls_name = target.partition(":")
    cls: type[Datastore] = getattr(importlib.import_module(module_name), cls_name)
    return cls


_detected: list[InstalledEngine] | None = None
_detect_lock = threading.Lock()


def installed_engines(refresh: bool = False) -> list[InstalledEngine]:
    """Engines whose binaries are present on this host, with their real version numbers."""
    global _detected
    with _detect_lock:
        if _detected is None or refresh:
            found = []
            for manager in PLUGINS:
                try:
                    cls = plugin_class(manager)
                except ImportError:
                    LOG.warning("the %s guest plugin cannot be loaded; skipping it", manager)
                    continue
                version = cls.detect_version()
                if version:
                    found.append(InstalledEngine(manager, version))
            _detected = found
        return list(_detected)


def version_matches(registered: str, installed: str) -> bool:
    return installed == registered or installed.startswith(registered + ".")


def serving_engine(manager: str, version_number: str) -> InstalledEngine:
    """The installed engine that serves (manager, version_number), or a clear 400."""
    engines = installed_engines()
    for engine in engines:
        if engine.manager == manager and version_matches(version_number, engine.version):
            return engine
    runnable = ", ".join(f"{e.manager} {e.version}" for e in engines) or "none"
    raise BadRequest(
        f"Datastore version {manager} {version_number} cannot run on this deployment: no "
        f"installed engine matches it. This deployment can run: {runnable}. Register a version "
        f"whose manager and version number match one of those."
    )


def rules_for(manager: str) -> ModuleType:
    """The name-rule module the API applies for ``manager`` (same functions for every engine)."""
    target = RULES.get(manager)
    if target is None:
        raise ValidationError(f"No naming rules for datastore manager {manager!r}.")
    return importlib.import_module(target)


_FEATURE_NAMES = {
    "databases": "databases",
    "users": "users",
    "root": "root access",
}


def require_capability(manager: str, capability: Capability) -> None:
    """Refuse (501) an operation the engine does not have, before anything is sent to a guest."""
    cls = plugin_class(manager)
    if capability not in cls.capabilities:
        feature = _FEATURE_NAMES.get(capability.value, capability.value)
        raise NotImplementedByDatastore(
            f"{manager} instances do not support {feature}."
            + (f" {cls.capability_notes[capability]}" if capability in cls.capability_notes else "")
        )
