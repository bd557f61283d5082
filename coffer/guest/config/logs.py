"""Guest logs: which logs each engine exposes, and which of its USER logs are switched on.

Trove's model: a log is ``SYS`` (always written, can only be published) or ``USER`` (off until
its owner enables it). The names follow Trove's: ``guest`` (the guest agent's own log),
``error`` (the engine's server log), ``general`` and ``slow_query``.

Which USER logs are on is kept in ``etc/logs.json`` (``LogSwitches``), beside the engine's other
configuration. Each datastore renders it into the config file it writes at every start (so a
switched-on log stays on across restarts of the engine and of the agent) and applies it live
(``SET GLOBAL``, ``postgresql.conf`` + reload, ``CONFIG SET``). This module is light on
purpose (standard library only): datastores and the API import it; the RPC side, which talks
to the backup storage, is ``coffer.guest.logs``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from coffer.errors import NotFound
from coffer.guest.layout import InstanceLayout, write_private_file

LOG = logging.getLogger(__name__)

SWITCHES_FILE = "logs.json"
#: Statements slower than this many milliseconds go to a slow query log (Trove's
#: ``guest_log_long_query_time``); the control plane sends its own value with each enable.
DEFAULT_LONG_QUERY_MS = 1000


class LogType(StrEnum):
    """Trove's log types (the values are what the API shows)."""

    SYS = "SYS"
    USER = "USER"


@dataclass(frozen=True)
class LogSpec:
    """One log an engine exposes: its name, type and a sentence for people."""

    name: str
    type: LogType
    description: str


GUEST_LOG = LogSpec("guest", LogType.SYS, "The guest agent's own log.")

#: The logs of each datastore manager, in the order the API lists them.
CATALOGUE: dict[str, tuple[LogSpec, ...]] = {
    "mariadb": (
        GUEST_LOG,
        LogSpec("error", LogType.SYS, "The MariaDB error log."),
        LogSpec("general", LogType.USER, "Every statement the server receives."),
        LogSpec("slow_query", LogType.USER, "Statements slower than the long query time."),
    ),
    "postgresql": (
        GUEST_LOG,
        LogSpec("error", LogType.SYS, "The PostgreSQL server log."),
        LogSpec("general", LogType.USER, "Every statement (log_statement = all)."),
        LogSpec(
            "slow_query",
            LogType.USER,
            "Statements slower than the long query time (log_min_duration_statement).",
        ),
    ),
    "redis": (
        GUEST_LOG,
        LogSpec("error", LogType.SYS, "The Redis server log."),
        LogSpec(
            "slow_query",
            LogType.USER,
            "Commands slower than the long query time (the Redis slow log).",
        ),
    ),
}


@dataclass(frozen=True)
class LogSource:
    """Where a log's text comes from: a file in the instance's volume, read whole or, with
    ``view``, only the entries that view selects (PostgreSQL writes its statement and duration
    entries into its one server log)."""

    path: Path
    view: str | None = None


def log_specs(manager: str) -> tuple[LogSpec, ...]:
    """The logs of ``manager`` (only the guest's own log for an engine not listed)."""
    return CATALOGUE.get(manager, (GUEST_LOG,))


def find_log(manager: str, name: object) -> LogSpec:
    """The log called ``name``; NotFound naming the logs there are otherwise."""
    specs = log_specs(manager)
    for spec in specs:
        if spec.name == name:
            return spec
    shown = str(name)[:64] if isinstance(name, str) else repr(name)[:64]
    raise NotFound(
        f"There is no log {shown!r} on {manager} instances; the logs are: "
        + ", ".join(spec.name for spec in specs)
        + "."
    )


@dataclass(frozen=True)
class LogSwitches:
    """Which USER logs are on, and the slow query threshold they were switched on with."""

    enabled: frozenset[str] = field(default_factory=frozenset)
    long_query_ms: int = DEFAULT_LONG_QUERY_MS
    #: Logs switched on or off that the running engine takes only at its next start.
    pending_restart: frozenset[str] = field(default_factory=frozenset)

    def is_on(self, name: str) -> bool:
        return name in self.enabled


def switches_path(layout: InstanceLayout) -> Path:
    return layout.etc_dir / SWITCHES_FILE


def read_switches(layout: InstanceLayout) -> LogSwitches:
    """``etc/logs.json`` (every USER log off when it is missing or unreadable)."""
    path = switches_path(layout)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return LogSwitches()
    except (OSError, ValueError) as exc:
        LOG.warning("ignoring unreadable %s: %s", path, exc)
        return LogSwitches()
    if not isinstance(data, dict):
        return LogSwitches()
    long_query = data.get("long_query_ms")
    return LogSwitches(
        enabled=frozenset(str(name) for name in data.get("enabled") or ()),
        long_query_ms=long_query
        if isinstance(long_query, int) and long_query >= 0
        else DEFAULT_LONG_QUERY_MS,
        pending_restart=frozenset(str(name) for name in data.get("pending_restart") or ()),
    )


def write_switches(layout: InstanceLayout, switches: LogSwitches, owner: str | None) -> None:
    document = {
        "enabled": sorted(switches.enabled),
        "long_query_ms": switches.long_query_ms,
        "pending_restart": sorted(switches.pending_restart),
    }
    text = json.dumps(document, indent=2, sort_keys=True) + "\n"
    write_private_file(switches_path(layout), text, owner, mode=0o640)
