"""Configuration overrides for Redis: ``CONFIG SET`` live, ``etc/overrides.conf`` for restarts.

``redis.conf`` ends with ``include <etc>/overrides.conf`` once a value was ever applied, so the
included values win over the flavor's. The live values change in one ``CONFIG SET`` (Redis 7
applies several parameters all or none). Immutable parameters (``databases``, ``io-threads``:
their rules need a restart) are only written to the file. ``CONFIG REWRITE`` is not used:
Coffer writes ``redis.conf`` itself at every start.

Redis has no "set to default": a parameter taken out of the set goes back to what
``redis.conf`` gives it (the flavor's ``maxmemory``...), else to the live value Coffer found
before it first changed the parameter (the server's default unless root had changed it).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import redis

from coffer.guest.config.overrides import (
    ABSENT,
    AppliedState,
    OverrideRefused,
    OverridesHandler,
    plain_number,
    quoted,
    settings_of,
)
from coffer.guest.layout import InstanceLayout

AdminClient = Callable[[], contextlib.AbstractContextManager[redis.Redis]]


def config_value(value: Any) -> str:
    """A value as ``CONFIG SET`` and redis.conf take it (booleans as yes/no)."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        return plain_number(value)
    return str(value)


class RedisOverrides(OverridesHandler):
    """See the module docstring and ``OverridesHandler``. ``admin`` opens a client as the
    agent's admin user; ``rendered_config`` returns ``redis.conf`` as Coffer renders it now."""

    name_pattern: ClassVar[re.Pattern[str]] = re.compile(r"[a-z][a-z0-9-]{0,127}")
    engine_file: ClassVar[str | None] = "overrides.conf"
    include_directive: ClassVar[str] = "include {path}"

    def __init__(
        self,
        layout: InstanceLayout,
        owner: str | None,
        engine_pid: Callable[[], int | None],
        admin: AdminClient,
        rendered_config: Callable[[], str],
    ) -> None:
        super().__init__(layout, owner, engine_pid)
        self._admin = admin
        self._rendered_config = rendered_config

    def render_file(self, values: Mapping[str, Any]) -> str:
        lines = ["# Configuration group values, written by Coffer's guest agent; edits are lost."]
        lines += [f"{name} {quoted(config_value(value))}" for name, value in sorted(values.items())]
        return "\n".join(lines) + "\n"

    def _change_live(
        self, changes: Mapping[str, Any], restart: set[str], state: AppliedState
    ) -> set[str]:
        later = {name for name in changes if name in restart}
        live = {name: value for name, value in changes.items() if name not in restart}
        if not live:
            return later
        rendered = settings_of(self._rendered_config(), None)
        pairs: list[str] = []
        with self._admin() as client:
            for name, value in live.items():
                if value is not ABSENT:
                    if name not in rendered and name not in state.baseline:
                        found = client.config_get(name)
                        if name in found:
                            state.baseline[name] = found[name]
                    pairs += [name, config_value(value)]
                elif name in rendered:
                    pairs += [name, rendered[name]]
                elif name in state.baseline:
                    pairs += [name, str(state.baseline[name])]
                # else: never changed live by Coffer, so nothing to put back.
            if not pairs:
                return later
            try:
                client.execute_command("CONFIG", "SET", *pairs)
            except redis.ResponseError as exc:
                names = ", ".join(pairs[::2])
                raise OverrideRefused(
                    pairs[0] if len(pairs) == 2 else names,
                    f"Redis refused the values of {names}: {exc}.",
                ) from None
        return later
