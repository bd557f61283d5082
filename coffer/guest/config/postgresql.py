"""Configuration overrides for PostgreSQL: ``ALTER SYSTEM`` and a reload.

The server keeps ``ALTER SYSTEM`` values in ``postgresql.auto.conf`` inside its data directory,
read after Coffer's ``postgresql.conf`` at every start and reload, so no file of Coffer's is
needed. The server checks each value as it takes it (a refused one raises ``OverrideRefused``
and nothing is kept), and after the reload it says itself which changes wait for a restart
(``pg_settings.pending_restart``). ``ALTER SYSTEM RESET`` takes a parameter out again: it goes
back to what ``postgresql.conf`` says (the flavor's sizing) or the built-in default.

Only the parameters Coffer set are reset on detach: what a tenant's superuser set with
``ALTER SYSTEM`` itself is left alone.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import psycopg
from psycopg import sql

from coffer.guest.config.overrides import (
    ABSENT,
    AppliedState,
    OverrideRefused,
    OverridesHandler,
    plain_number,
)
from coffer.guest.layout import InstanceLayout

AdminConnection = Callable[[], contextlib.AbstractContextManager[psycopg.Connection[Any]]]


def literal(value: Any) -> sql.Composable:
    """A value for ``ALTER SYSTEM SET`` (numbers bare, strings quoted by psycopg)."""
    if isinstance(value, bool):
        return sql.SQL("on" if value else "off")
    if isinstance(value, int | float):
        return sql.SQL(plain_number(value))
    return sql.Literal(str(value))


class PostgreSQLOverrides(OverridesHandler):
    """See the module docstring and ``OverridesHandler``. ``admin`` opens an autocommit
    connection as the agent's admin role; ``reload`` makes the server read its configuration
    again and returns once it has."""

    # Extensions' parameters carry a dot (``auto_explain.log_min_duration``).
    name_pattern: ClassVar[re.Pattern[str]] = re.compile(r"[a-z][a-z0-9_.]{0,62}")

    def __init__(
        self,
        layout: InstanceLayout,
        owner: str | None,
        engine_pid: Callable[[], int | None],
        admin: AdminConnection,
        reload: Callable[[], None],
    ) -> None:
        super().__init__(layout, owner, engine_pid)
        self._admin = admin
        self._reload = reload

    def _change_live(
        self, changes: Mapping[str, Any], restart: set[str], state: AppliedState
    ) -> set[str]:
        if not changes:
            return set()
        with self._admin() as conn:
            for name, value in changes.items():
                if value is ABSENT:
                    statement = sql.SQL("ALTER SYSTEM RESET {}").format(sql.Identifier(name))
                else:
                    statement = sql.SQL("ALTER SYSTEM SET {} = {}").format(
                        sql.Identifier(name), literal(value)
                    )
                try:
                    conn.execute(statement)
                except psycopg.OperationalError:
                    raise  # the server went away: the connection's owner reports it
                except psycopg.Error as exc:
                    diag = getattr(exc, "diag", None)
                    reason = (diag.message_primary if diag is not None else None) or "refused"
                    raise OverrideRefused(
                        name, f"PostgreSQL refused the value of {name}: {reason}."
                    ) from None
        self._reload()
        # The server decides what waits for a restart (_engine_pending).
        return set()

    def _engine_pending(self) -> set[str] | None:
        with self._admin() as conn:
            rows = conn.execute("SELECT name FROM pg_settings WHERE pending_restart").fetchall()
        return {str(row[0]).lower() for row in rows}
