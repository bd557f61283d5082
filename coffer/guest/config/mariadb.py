"""Configuration overrides for MariaDB: ``SET GLOBAL`` live, ``etc/overrides.cnf`` for restarts.

``my.cnf`` ends with ``!include <etc>/overrides.cnf`` once a value was ever applied, so the
included ``[mariadbd]`` values win over the flavor's. A parameter whose rule needs a restart is
only written to the file; one the server reports read-only (error 1238) is too. A parameter
taken out of the set goes back live to the value ``my.cnf`` gives it (the flavor's sizing), or
to the server's built-in default (``SET GLOBAL x = DEFAULT``) when ``my.cnf`` does not name it.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import pymysql
from pymysql.cursors import Cursor

from coffer.guest.config.overrides import (
    ABSENT,
    AppliedState,
    OverrideRefused,
    OverridesHandler,
    parse_size,
    plain_number,
    quoted,
    settings_of,
)
from coffer.guest.layout import InstanceLayout

_READ_ONLY = 1238

AdminCursor = Callable[[], contextlib.AbstractContextManager[Cursor]]


def option_value(value: Any) -> str:
    """A value as an option file takes it."""
    if isinstance(value, bool):
        return "ON" if value else "OFF"
    if isinstance(value, int | float):
        return plain_number(value)
    return quoted(str(value))


def sql_value(value: Any) -> Any:
    """A value as a ``SET GLOBAL`` parameter (booleans as ON/OFF, which every switch takes)."""
    if isinstance(value, bool):
        return "ON" if value else "OFF"
    return value


class MariaDBOverrides(OverridesHandler):
    """See the module docstring and ``OverridesHandler``. ``admin`` opens a cursor as the
    agent's admin account; ``rendered_config`` returns ``my.cnf`` as Coffer renders it now."""

    name_pattern: ClassVar[re.Pattern[str]] = re.compile(r"[a-z][a-z0-9_]{0,127}")
    engine_file: ClassVar[str | None] = "overrides.cnf"
    include_directive: ClassVar[str] = "!include {path}"

    def __init__(
        self,
        layout: InstanceLayout,
        owner: str | None,
        engine_pid: Callable[[], int | None],
        admin: AdminCursor,
        rendered_config: Callable[[], str],
    ) -> None:
        super().__init__(layout, owner, engine_pid)
        self._admin = admin
        self._rendered_config = rendered_config

    def render_file(self, values: Mapping[str, Any]) -> str:
        lines = [
            "# Configuration group values, written by Coffer's guest agent; edits are lost.",
            "[mariadbd]",
        ]
        lines += [f"{name} = {option_value(value)}" for name, value in sorted(values.items())]
        return "\n".join(lines) + "\n"

    def _defaults(self) -> dict[str, int | str]:
        return {
            name: parse_size(value)
            for name, value in settings_of(self._rendered_config(), "=").items()
        }

    def _change_live(
        self, changes: Mapping[str, Any], restart: set[str], state: AppliedState
    ) -> set[str]:
        later = {name for name in changes if name in restart}
        live = {name: value for name, value in changes.items() if name not in restart}
        if not live:
            return later
        defaults = self._defaults()
        with self._admin() as cur:
            for name, value in live.items():
                # ``name`` matched name_pattern: letters, digits and underscores only.
                try:
                    if value is not ABSENT:
                        cur.execute(f"SET GLOBAL {name} = %s", (sql_value(value),))
                    elif name in defaults:
                        cur.execute(f"SET GLOBAL {name} = %s", (defaults[name],))
                    else:
                        cur.execute(f"SET GLOBAL {name} = DEFAULT")
                except pymysql.MySQLError as exc:
                    code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
                    if code == _READ_ONLY:
                        later.add(name)
                        continue
                    if code in (2002, 2003, 2006, 2013):
                        raise  # the engine went away: the cursor's owner reports it
                    reason = str(exc.args[1]) if len(exc.args) > 1 else type(exc).__name__
                    raise OverrideRefused(
                        name, f"MariaDB refused the value of {name} (error {code}): {reason}."
                    ) from None
        return later
