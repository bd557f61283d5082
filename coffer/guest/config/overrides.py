"""What every engine's configuration overrides share: checking values, working out what changed,
keeping the applied values across restarts, and knowing which changes wait for a restart.

The control plane sends the *whole* set of values an instance must run with (its configuration
group's, or none after a detach) together with the names whose rules say a change needs a
restart. ``OverridesHandler.apply`` compares that with what it applied last and

1. writes the engine's own overrides file (MariaDB ``etc/overrides.cnf``, Redis
   ``etc/overrides.conf``; PostgreSQL keeps its overrides itself in ``postgresql.auto.conf``),
   so the engine runs with the values after any restart;
2. changes what can change live (``SET GLOBAL``, ``ALTER SYSTEM`` + reload, ``CONFIG SET``); a
   value removed from the set goes back to the instance's default (what its rendered config
   file says, else the engine's built-in default);
3. records, in ``etc/overrides.json``, the values, the changes that wait for a restart, and the
   engine's pid at the time. A change is pending only until the engine restarts: once the pid
   differs, the engine has read the file again.

If a live change fails, the file and the changes made so far are put back and the error is
raised, so a refused value leaves the engine as it was.
"""

from __future__ import annotations

import json
import logging
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar

from coffer.errors import UnprocessableEntity, ValidationError
from coffer.guest.layout import InstanceLayout, write_private_file

LOG = logging.getLogger(__name__)

STATE_FILE = "overrides.json"
#: Most values one apply may carry (a configuration group holds at most 256).
MAX_VALUES = 256
#: Longest string value (the control plane refuses longer ones too).
MAX_STRING = 1024


class _Absent:
    """Marks a parameter that is no longer overridden (its value goes back to the default)."""

    def __repr__(self) -> str:
        return "ABSENT"


ABSENT: Any = _Absent()


class OverrideRefused(UnprocessableEntity):
    """The engine refused a value (wrong for this server, though it passed the rules)."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(message)
        self.parameter = parameter


@dataclass
class AppliedState:
    """What ``etc/overrides.json`` holds (no secrets: values of tuning parameters only)."""

    values: dict[str, Any] = field(default_factory=dict)
    #: Changed parameters the running engine has not taken yet.
    pending: list[str] = field(default_factory=list)
    #: The engine's pid when ``pending`` was recorded; another pid means it has restarted.
    engine_pid: int | None = None
    #: Live values found before Coffer first changed a parameter that has no value in the
    #: rendered config, to go back to (engines without a "set to default" statement).
    baseline: dict[str, Any] = field(default_factory=dict)


def same_value(left: Any, right: Any) -> bool:
    """Equal as JSON (so ``True`` and ``1`` differ, as they do for the engines)."""
    if left is ABSENT or right is ABSENT:
        return left is right
    return json.dumps(left, sort_keys=True) == json.dumps(right, sort_keys=True)


def plain_number(value: int | float) -> str:
    """A number as config files take it: no exponent (``1e-05`` becomes ``0.00001``)."""
    if isinstance(value, int):
        return str(value)
    return format(Decimal(repr(value)), "f")


def quoted(value: str) -> str:
    """A string in double quotes with backslashes and quotes escaped (MariaDB option files
    and redis.conf both read this form)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_size(text: str) -> int | str:
    """``64M``-style sizes of a rendered config as bytes; other numbers as ints; else text."""
    match = re.fullmatch(r"(\d+)\s*([kmgKMG][bB]?)?", text.strip())
    if match is None:
        return text.strip()
    number = int(match.group(1))
    unit = (match.group(2) or "").lower()[:1]
    return number * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[unit]


class OverridesHandler(ABC):
    """Applies configuration values to one engine and keeps them across restarts.

    Contract:

    * ``apply(values, restart_required)`` makes the engine run with exactly ``values`` (a
      parameter absent from them goes back to the instance's default) and returns
      ``{"changed", "applied_live", "pending_restart"}`` (sorted parameter names). It is
      idempotent: applying the same values again changes nothing and reports what is still
      pending. It blocks for milliseconds (PostgreSQL: until the server has reloaded).
    * Bad input (names this engine cannot have, values that are not numbers, booleans or short
      printable strings) raises ``ValidationError`` before anything changes; a value the engine
      refuses raises ``OverrideRefused`` (422) with everything put back; an engine that is not
      running raises ``EngineUnavailable`` (transient) unless every change waits for a restart.
    * ``include_lines()`` is what the engine's rendered config file must end with, so a restart
      keeps the values. Callers serialise ``apply`` with starting and stopping the engine.

    Engines fill in ``name_pattern``, ``engine_file`` with ``render_file``, ``_change_live``
    and, where the server can tell, ``_engine_pending``.
    """

    #: Parameter names this engine can have (checked before anything reaches it).
    name_pattern: ClassVar[re.Pattern[str]]
    #: The overrides file in ``etc/`` the engine's config includes, or None (the engine keeps
    #: its overrides itself).
    engine_file: ClassVar[str | None] = None
    #: How the engine's config includes the file; ``{path}`` is its absolute path.
    include_directive: ClassVar[str] = ""

    def __init__(
        self,
        layout: InstanceLayout,
        owner: str | None,
        engine_pid: Callable[[], int | None],
    ) -> None:
        self.layout = layout
        self.owner = owner
        self._engine_pid = engine_pid
        self.state_path = layout.etc_dir / STATE_FILE

    # -- public -----------------------------------------------------------------------------------

    @property
    def file_path(self) -> Path | None:
        return None if self.engine_file is None else self.layout.etc_dir / self.engine_file

    def include_lines(self) -> list[str]:
        """Lines to end the engine's rendered config with; none until a value was applied."""
        path = self.file_path
        if path is None or not path.is_file():
            return []
        return [self.include_directive.format(path=path)]

    def applied(self) -> dict[str, Any]:
        """The values last applied (empty when none ever were)."""
        return dict(self._load().values)

    def check_values(self, values: object) -> dict[str, Any]:
        """``values`` if every name and value can be handed to this engine; ValidationError
        naming the first one that cannot."""
        if not isinstance(values, Mapping):
            raise ValidationError("The configuration values must be an object of name: value.")
        if len(values) > MAX_VALUES:
            raise ValidationError(f"At most {MAX_VALUES} configuration values can be applied.")
        checked: dict[str, Any] = {}
        for name, value in values.items():
            if not isinstance(name, str) or not self.name_pattern.fullmatch(name):
                raise ValidationError(
                    f"{str(name)[:128]!r} is not a parameter name this engine can have."
                )
            if isinstance(value, bool | int):
                pass
            elif isinstance(value, float):
                if not math.isfinite(value):
                    raise ValidationError(f"The value of {name} must be a finite number.")
            elif isinstance(value, str):
                if len(value) > MAX_STRING or not value.isprintable():
                    raise ValidationError(
                        f"The value of {name} must be printable and at most {MAX_STRING} "
                        "characters long."
                    )
            else:
                raise ValidationError(
                    f"The value of {name} must be a number, a boolean or a string."
                )
            checked[name] = value
        return checked

    def apply(self, values: Mapping[str, Any], restart_required: Iterable[str]) -> dict[str, Any]:
        """See the class docstring."""
        wanted = self.check_values(values)
        if isinstance(restart_required, str | bytes):
            raise ValidationError("restart_required must be a list of parameter names.")
        restart = {str(name).lower() for name in restart_required}
        state = self._load()
        old = state.values
        changes = {
            name: wanted.get(name, ABSENT)
            for name in sorted(set(old) | set(wanted))
            if not same_value(old.get(name, ABSENT), wanted.get(name, ABSENT))
        }
        pid = self._engine_pid()
        pending = set(state.pending) if pid is not None and pid == state.engine_pid else set()
        self._write_file(wanted)
        try:
            not_live = self._change_live(changes, restart, state)
        except Exception:
            self._write_file(old)
            undo = {name: old.get(name, ABSENT) for name in changes}
            try:
                self._change_live(undo, restart, state)
            except Exception as exc:  # the original error is the one to report
                LOG.warning("could not put back the previous configuration values: %s", exc)
            raise
        pending |= not_live
        told = self._engine_pending()
        if told is not None:
            pending = told
        self._save(AppliedState(wanted, sorted(pending), pid, state.baseline))
        live = sorted(set(changes) - not_live)
        if changes:
            LOG.info(
                "configuration values changed: %s (live: %s; waiting for a restart: %s)",
                ", ".join(changes),
                ", ".join(live) or "none",
                ", ".join(sorted(pending)) or "none",
            )
        return {
            "changed": sorted(changes),
            "applied_live": live,
            "pending_restart": sorted(pending),
        }

    # -- engine hooks -----------------------------------------------------------------------------

    def render_file(self, values: Mapping[str, Any]) -> str:
        """The overrides file for ``values`` (engines with an ``engine_file``)."""
        raise NotImplementedError

    @abstractmethod
    def _change_live(
        self, changes: Mapping[str, Any], restart: set[str], state: AppliedState
    ) -> set[str]:
        """Make the running engine take ``changes`` (``ABSENT``: back to the default); return
        the names that take effect only at the next start. ``restart`` names the parameters
        whose rules say so. May record live values in ``state.baseline`` before changing them."""

    def _engine_pending(self) -> set[str] | None:
        """Changed parameters the server itself says wait for a restart, or None when the
        server cannot tell (then Coffer's own record is used)."""
        return None

    # -- files ------------------------------------------------------------------------------------

    def _write_file(self, values: Mapping[str, Any]) -> None:
        path = self.file_path
        if path is not None:
            write_private_file(path, self.render_file(values), self.owner, mode=0o640)

    def _load(self) -> AppliedState:
        try:
            data = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return AppliedState()
        except (OSError, ValueError) as exc:
            # A damaged record is rebuilt by the next apply; say so rather than fail.
            LOG.warning("ignoring unreadable %s: %s", self.state_path, exc)
            return AppliedState()
        if not isinstance(data, dict):
            return AppliedState()
        pid = data.get("engine_pid")
        return AppliedState(
            values=dict(data.get("values") or {}),
            pending=[str(name) for name in data.get("pending") or []],
            engine_pid=pid if isinstance(pid, int) else None,
            baseline=dict(data.get("baseline") or {}),
        )

    def _save(self, state: AppliedState) -> None:
        document = {
            "values": state.values,
            "pending": state.pending,
            "engine_pid": state.engine_pid,
            "baseline": state.baseline,
        }
        text = json.dumps(document, indent=2, sort_keys=True) + "\n"
        write_private_file(self.state_path, text, self.owner, mode=0o640)


def settings_of(rendered: str, separator: str | None) -> dict[str, str]:
    """``name -> value`` of a rendered config file (``name = value`` lines when ``separator``
    is ``"="``, ``name value`` lines when None); sections, comments and includes are skipped,
    and ``-`` in names becomes ``_`` for ``"="`` files (MariaDB spells options both ways)."""
    found: dict[str, str] = {}
    for raw in rendered.splitlines():
        line = raw.strip()
        if not line or line[0] in "#[!;":
            continue
        if separator is None:
            name, _, value = line.partition(" ")
        else:
            name, sep, value = line.partition(separator)
            if not sep:
                continue
            name = name.strip().replace("-", "_")
        if name.strip().lower() == "include":
            continue
        found[name.strip().lower()] = value.strip()
    return found
