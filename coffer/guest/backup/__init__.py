"""The guest side of backups and restores.

* ``base`` - the contract of an engine's backup handler (``EngineBackup``) and the tool runners;
* ``mariadb``, ``postgresql``, ``redis`` - one handler per engine, composed into its datastore
  (``datastore.backups``);
* ``archive`` - continuous archiving of PostgreSQL's WAL to the backup store, and reading it back;
* ``worker`` - what the guest agent runs in the background: engine stream → seal → storage for a
  backup, verify → open → engine for a restore, with reports to the conductor.

``HANDLERS`` names each manager's handler, so the API can ask what an engine supports
(``supports_incremental``, ``supports_point_in_time``) without loading the engine's datastore.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from coffer.errors import NotImplementedByDatastore

if TYPE_CHECKING:
    from coffer.guest.backup.base import EngineBackup
    from coffer.guest.datastores.base import Datastore

#: manager short name -> "module:Class" of its backup handler.
HANDLERS: dict[str, str] = {
    "mariadb": "coffer.guest.backup.mariadb:MariaDBBackup",
    "mysql": "coffer.guest.backup.mariadb:MariaDBBackup",
    "postgresql": "coffer.guest.backup.postgresql:PostgreSQLBackup",
    "redis": "coffer.guest.backup.redis:RedisBackup",
}


def handler_class(manager: str) -> type[EngineBackup]:
    """The backup handler class of ``manager``; NotImplementedByDatastore if it has none."""
    target = HANDLERS.get(manager)
    if target is None:
        raise NotImplementedByDatastore(f"{manager} instances cannot be backed up.")
    module_name, _, cls_name = target.partition(":")
    cls: type[EngineBackup] = getattr(importlib.import_module(module_name), cls_name)
    return cls


def supports_incremental(manager: str) -> bool:
    return handler_class(manager).incremental


def supports_point_in_time(manager: str) -> bool:
    """True if ``manager``'s backups restore to a point in time from its archived log."""
    return handler_class(manager).point_in_time


def backups_of(datastore: Datastore) -> EngineBackup:
    """The backup handler a datastore owns (``datastore.backups``); 501 if it has none."""
    from coffer.guest.backup.base import EngineBackup

    handler = getattr(datastore, "backups", None)
    if not isinstance(handler, EngineBackup):
        raise NotImplementedByDatastore(
            f"The {getattr(datastore, 'manager', 'this')} datastore does not support backups."
        )
    return handler
