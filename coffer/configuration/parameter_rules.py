"""Parameter rules: which engine parameters a configuration group may set, with what type and
range, and whether changing one needs a restart.

Rules come in Trove's ``validation-rules.json`` format (``trove-api.md`` §6.3)::

    {"configuration-parameters": [
        {"name": "max_connections", "restart_required": false, "type": "integer",
         "min": 10, "max": 100000}, ...]}

``type`` is ``integer``, ``float``, ``string`` or ``boolean``; ``min``/``max`` bound numbers.
Coffer adds one optional key, ``allowed_values``: the only values a ``string`` parameter takes
(matched case-insensitively, as the engines do). Coffer ships a file per engine in
``coffer/configuration/rules/<manager>.json``; operators load their own with ``coffer manage
configuration-rules-load`` or through ``/mgmt/datastores/versions/{id}/parameters``.

Every function that writes takes an open session and leaves committing to the caller; it
validates everything before touching the session, so bad input changes nothing.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from functools import cache
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from coffer.db.models import DatastoreVersion
from coffer.db.models_day2 import ConfigurationParameterRule
from coffer.db.session import transaction
from coffer.errors import Conflict, NotFound, ValidationError

DATA_TYPES = ("integer", "float", "string", "boolean")
#: The key of the rule list in a validation-rules document.
RULES_KEY = "configuration-parameters"
#: Where the rules Coffer ships live, one ``<manager>.json`` per engine.
SHIPPED_DIR = Path(__file__).parent / "rules"
#: The engines Coffer ships rules for; a missing file for one of them is a broken installation.
SHIPPED_MANAGERS = ("mariadb", "postgresql", "redis")

# Engine parameter names: MariaDB and PostgreSQL use underscores (PostgreSQL extensions add a
# dot), Redis uses hyphens. Nothing else may reach an engine's configuration.
_NAME_RE = re.compile(r"^[a-z][a-z0-9_.-]{0,127}$")
_RULE_KEYS = frozenset({"name", "type", "restart_required", "min", "max", "allowed_values"})
_MAX_ALLOWED = 64
_MAX_ALLOWED_LEN = 64
#: Limits any integer value is held to, whatever its rule says (the engines' widest types).
INTEGER_FLOOR = -(2**63)
INTEGER_CEILING = 2**64 - 1

Number = int | float


class ParameterRuleNotFound(NotFound):
    pass


class ParameterRuleExists(Conflict):
    pass


class RulesFileError(ValidationError):
    """A rules document is invalid; ``problems`` lists every problem found."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        listed = "\n".join(f"  - {problem}" for problem in problems)
        super().__init__(f"{source} is not a valid rules file:\n{listed}")


@dataclass(frozen=True)
class ParameterRule:
    """One parameter a configuration group may set.

    ``minimum``/``maximum`` bound ``integer`` and ``float`` parameters (``None``: no bound
    beyond the type's); ``allowed_values`` lists the only values of a ``string`` parameter.
    """

    name: str
    data_type: str
    restart_required: bool
    minimum: Number | None = None
    maximum: Number | None = None
    allowed_values: tuple[str, ...] | None = None

    def describe(self) -> str:
        """The rule as a phrase for error messages, e.g. ``integer, 10 to 100000, dynamic``."""
        parts = [self.data_type]
        if self.minimum is not None and self.maximum is not None:
            parts.append(f"{self.minimum} to {self.maximum}")
        elif self.minimum is not None:
            parts.append(f"at least {self.minimum}")
        elif self.maximum is not None:
            parts.append(f"at most {self.maximum}")
        if self.allowed_values:
            parts.append("one of " + ", ".join(self.allowed_values))
        parts.append("needs a restart" if self.restart_required else "dynamic")
        return ", ".join(parts)

    def to_document(self) -> dict[str, Any]:
        """The rule in validation-rules.json form."""
        doc: dict[str, Any] = {
            "name": self.name,
            "restart_required": self.restart_required,
            "type": self.data_type,
        }
        if self.minimum is not None:
            doc["min"] = self.minimum
        if self.maximum is not None:
            doc["max"] = self.maximum
        if self.allowed_values:
            doc["allowed_values"] = list(self.allowed_values)
        return doc

    def public_view(self, version_id: str) -> dict[str, Any]:
        """Trove's parameter view: ``min``/``max`` when bounded, ``restart_required`` a bool."""
        view: dict[str, Any] = {
            "name": self.name,
            "datastore_version_id": version_id,
            "restart_required": self.restart_required,
            "type": self.data_type,
        }
        if self.minimum is not None:
            view["min"] = self.minimum
        if self.maximum is not None:
            view["max"] = self.maximum
        if self.allowed_values:
            view["allowed_values"] = list(self.allowed_values)
        return view

    def mgmt_view(self, version_id: str) -> dict[str, Any]:
        """Trove's management view: ``min_size``/``max_size`` instead of ``min``/``max``."""
        view = self.public_view(version_id)
        for short, long in (("min", "min_size"), ("max", "max_size")):
            if short in view:
                view[long] = view.pop(short)
        # Trove soft-deletes rules and shows these; Coffer deletes for real, so never deleted.
        view.update(deleted=False, deleted_at=None)
        return view


# -- parsing and checking ---------------------------------------------------------------------


def check_name(name: object) -> str:
    """``name`` lower-cased if it is a valid parameter name; ``ValidationError`` otherwise."""
    if not isinstance(name, str) or not _NAME_RE.match(name.lower()):
        shown = repr(name)[:80]
        raise ValidationError(
            f"{shown} is not a valid parameter name; use 1-128 letters, digits, '_', '-' or '.', "
            "starting with a letter."
        )
    return name.lower()


def _bound(value: object, data_type: str, what: str) -> Number | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} must be a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number")
    if data_type == "integer":
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"{what} of an integer parameter must be a whole number")
            value = int(value)
        if not INTEGER_FLOOR <= value <= INTEGER_CEILING:
            raise ValueError(f"{what} must lie between {INTEGER_FLOOR} and {INTEGER_CEILING}")
    return value


def make_rule(
    name: object,
    data_type: object,
    restart_required: object,
    minimum: object = None,
    maximum: object = None,
    allowed_values: object = None,
) -> ParameterRule:
    """A checked ``ParameterRule``; ``ValidationError`` naming the first problem otherwise.

    ``restart_required`` may be a bool or 0/1 (Trove's management API sends 0/1).
    """
    canonical = check_name(name)
    if data_type not in DATA_TYPES:
        raise ValidationError(
            f"Parameter {canonical!r}: type {data_type!r} is not one of {', '.join(DATA_TYPES)}."
        )
    assert isinstance(data_type, str)
    if isinstance(restart_required, int) and restart_required in (0, 1):
        restart = bool(restart_required)
    else:
        raise ValidationError(
            f"Parameter {canonical!r}: restart_required must be true or false (or 1 or 0)."
        )
    if data_type in ("string", "boolean") and (minimum is not None or maximum is not None):
        raise ValidationError(
            f"Parameter {canonical!r}: min and max apply to integer and float parameters only."
        )
    try:
        low = _bound(minimum, data_type, "min")
        high = _bound(maximum, data_type, "max")
    except ValueError as exc:
        raise ValidationError(f"Parameter {canonical!r}: {exc}.") from exc
    if low is not None and high is not None and low > high:
        raise ValidationError(f"Parameter {canonical!r}: min {low} is greater than max {high}.")
    allowed: tuple[str, ...] | None = None
    if allowed_values is not None:
        if data_type != "string":
            raise ValidationError(
                f"Parameter {canonical!r}: allowed_values applies to string parameters only."
            )
        if (
            not isinstance(allowed_values, list)
            or not 1 <= len(allowed_values) <= _MAX_ALLOWED
            or not all(
                isinstance(v, str) and 1 <= len(v) <= _MAX_ALLOWED_LEN and v.isprintable()
                for v in allowed_values
            )
            or len({v.lower() for v in allowed_values}) != len(allowed_values)
        ):
            raise ValidationError(
                f"Parameter {canonical!r}: allowed_values must be a list of 1-{_MAX_ALLOWED} "
                f"different, printable strings of 1-{_MAX_ALLOWED_LEN} characters."
            )
        allowed = tuple(allowed_values)
    return ParameterRule(canonical, data_type, restart, low, high, allowed)


def parse_rules(document: object, source: str = "the rules document") -> list[ParameterRule]:
    """The rules of a validation-rules document (already decoded from JSON).

    Raises ``RulesFileError`` listing every problem: a missing ``configuration-parameters``
    list, an entry that is not an object, unknown keys (a misspelt ``restart_required`` must
    not silently mean "dynamic"), missing ``name``/``type``/``restart_required``, bad values,
    and names given twice (compared case-insensitively).
    """
    if not isinstance(document, Mapping) or not isinstance(document.get(RULES_KEY), list):
        raise RulesFileError(source, [f'the top level must be an object with a "{RULES_KEY}" list'])
    problems: list[str] = []
    rules: list[ParameterRule] = []
    seen: set[str] = set()
    for index, entry in enumerate(document[RULES_KEY]):
        where = f"entry {index + 1}"
        if not isinstance(entry, Mapping):
            problems.append(f"{where} is not an object")
            continue
        if isinstance(entry.get("name"), str):
            where = f"{where} ({entry['name']!r})"
        unknown = sorted(set(entry) - _RULE_KEYS)
        if unknown:
            hints = "".join(_did_you_mean(str(key), _RULE_KEYS) for key in unknown)
            problems.append(f"{where} has unknown key(s) {', '.join(unknown)}{hints}")
            continue
        missing = [key for key in ("name", "type", "restart_required") if key not in entry]
        if missing:
            problems.append(f"{where} lacks {', '.join(missing)}")
            continue
        try:
            rule = make_rule(
                entry["name"],
                entry["type"],
                entry["restart_required"],
                entry.get("min"),
                entry.get("max"),
                entry.get("allowed_values"),
            )
        except ValidationError as exc:
            problems.append(f"{where}: {exc.message}")
            continue
        if rule.name in seen:
            problems.append(f"{where}: parameter {rule.name!r} is listed twice")
            continue
        seen.add(rule.name)
        rules.append(rule)
    if problems:
        raise RulesFileError(source, problems)
    return rules


def read_rules_file(path: str | Path) -> list[ParameterRule]:
    """Read and check a validation-rules.json file (``RulesFileError`` when invalid, also for
    a file that cannot be read or is not JSON)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RulesFileError(str(path), [f"it cannot be read ({exc})"]) from exc
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RulesFileError(str(path), [f"it is not JSON ({exc})"]) from exc
    return parse_rules(document, str(path))


def shipped_rules_path(manager: str) -> Path | None:
    """The rules file Coffer ships for ``manager``, or ``None`` when it ships none."""
    path = SHIPPED_DIR / f"{manager}.json"
    return path if path.is_file() else None


@cache
def shipped_rules(manager: str) -> tuple[ParameterRule, ...]:
    """The rules Coffer ships for ``manager`` (empty when it ships none). ``RulesFileError``
    when the file of an engine in ``SHIPPED_MANAGERS`` is missing or broken: an incomplete
    installation must fail loudly, not quietly turn configuration groups off."""
    path = shipped_rules_path(manager)
    if path is None:
        if manager in SHIPPED_MANAGERS:
            missing = SHIPPED_DIR / f"{manager}.json"
            raise RulesFileError(str(missing), ["it is missing from this installation"])
        return ()
    return tuple(read_rules_file(path))


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# -- the control DB ---------------------------------------------------------------------------


def _stored(value: Number | None) -> str | None:
    return None if value is None else str(value)


def _number(text: str | None, data_type: str) -> Number | None:
    if text is None:
        return None
    try:
        exact = Decimal(text)
    except InvalidOperation:
        return None  # not written by this module; treat as unbounded rather than fail reads
    if data_type == "integer" and exact == exact.to_integral_value():
        return int(exact)
    return float(exact)


def rule_from_row(row: ConfigurationParameterRule) -> ParameterRule:
    allowed = tuple(row.allowed_values) if row.allowed_values else None
    return ParameterRule(
        name=row.name,
        data_type=row.data_type,
        restart_required=row.restart_required,
        minimum=_number(row.min_size, row.data_type),
        maximum=_number(row.max_size, row.data_type),
        allowed_values=allowed,
    )


def _apply(row: ConfigurationParameterRule, rule: ParameterRule) -> None:
    row.data_type = rule.data_type
    row.restart_required = rule.restart_required
    row.min_size = _stored(rule.minimum)
    row.max_size = _stored(rule.maximum)
    row.allowed_values = list(rule.allowed_values) if rule.allowed_values else None


def rules_for_version(session: Session, version_id: str) -> list[ParameterRule]:
    """The version's rules ordered by name (empty: configuration groups are not supported)."""
    rows = session.scalars(
        select(ConfigurationParameterRule)
        .where(ConfigurationParameterRule.datastore_version_id == version_id)
        .order_by(ConfigurationParameterRule.name)
    )
    return [rule_from_row(row) for row in rows]


def count_rules(session: Session, version_id: str) -> int:
    return (
        session.scalar(
            select(func.count())
            .select_from(ConfigurationParameterRule)
            .where(ConfigurationParameterRule.datastore_version_id == version_id)
        )
        or 0
    )


def _row(session: Session, version_id: str, name: str) -> ConfigurationParameterRule | None:
    return session.get(ConfigurationParameterRule, (version_id, name.lower()))


def find_rule(session: Session, version: DatastoreVersion, name: str) -> ParameterRule:
    """The rule ``name`` (case-insensitive) of ``version``; ``ParameterRuleNotFound`` (404)."""
    row = _row(session, version.id, name) if isinstance(name, str) else None
    if row is None:
        names = [rule.name for rule in rules_for_version(session, version.id)]
        hint = _did_you_mean(name.lower(), names) if names else ""
        raise ParameterRuleNotFound(
            f"Datastore version {version.name!r} has no configuration parameter "
            f"{str(name)[:128]!r}{hint}; list them with GET "
            f"/datastores/versions/{version.id}/parameters."
        )
    return rule_from_row(row)


def load_rules(
    session: Session, version_id: str, rules: Sequence[ParameterRule], replace: bool = False
) -> tuple[int, int]:
    """Upsert ``rules`` for the version (Trove's ``db_load_datastore_config_parameters``).

    With ``replace`` the version's rules not in ``rules`` are deleted. Returns (rules written,
    rules deleted). Groups that already hold a value whose rule went away keep it; new values
    are checked against the new rules.
    """
    names = [rule.name for rule in rules]
    if len(set(names)) != len(names):
        raise ValidationError("The same parameter is given twice; give each rule once.")
    for rule in rules:
        row = _row(session, version_id, rule.name)
        if row is None:
            row = ConfigurationParameterRule(datastore_version_id=version_id, name=rule.name)
            session.add(row)
        _apply(row, rule)
    deleted = 0
    if replace:
        query = delete(ConfigurationParameterRule).where(
            ConfigurationParameterRule.datastore_version_id == version_id
        )
        if names:
            query = query.where(ConfigurationParameterRule.name.not_in(names))
        deleted = _rowcount(session.execute(query))
    session.flush()
    return len(rules), deleted


def remove_rules(session: Session, version_id: str) -> int:
    """Delete every rule of the version (``db_remove_datastore_config_parameters``); returns
    how many. Groups on the version keep their values but take no new ones."""
    result = session.execute(
        delete(ConfigurationParameterRule).where(
            ConfigurationParameterRule.datastore_version_id == version_id
        )
    )
    return _rowcount(result)


def _rowcount(result: Any) -> int:
    count: int = result.rowcount
    return max(count, 0)


def create_rule(session: Session, version_id: str, rule: ParameterRule) -> ParameterRule:
    """Add one rule; ``ParameterRuleExists`` (409) when the version already has it."""
    if _row(session, version_id, rule.name) is not None:
        raise ParameterRuleExists(
            f"Parameter {rule.name!r} already has a rule; change it with PUT .../parameters/"
            f"{rule.name}."
        )
    load_rules(session, version_id, [rule])
    return rule


def update_rule(session: Session, version: DatastoreVersion, rule: ParameterRule) -> ParameterRule:
    """Replace the existing rule ``rule.name``; ``ParameterRuleNotFound`` (404) when absent."""
    find_rule(session, version, rule.name)
    load_rules(session, version.id, [rule])
    return rule


def delete_rule(session: Session, version: DatastoreVersion, name: str) -> None:
    """Delete one rule; ``ParameterRuleNotFound`` (404) when absent."""
    rule = find_rule(session, version, name)
    row = _row(session, version.id, rule.name)
    session.delete(row)
    session.flush()


def register_shipped_rules(session: Session) -> dict[str, int]:
    """Give every datastore version that has no rules yet the rules Coffer ships for its
    manager; returns ``{version id: rules loaded}`` for the versions it filled.

    Versions that already have rules are left alone, so an operator's own rules (loaded from
    a file or through the management API) survive every ``coffer up``; reload the shipped
    ones explicitly with ``coffer manage configuration-rules-load``.
    """
    loaded: dict[str, int] = {}
    for version in session.scalars(select(DatastoreVersion)):
        rules = shipped_rules(version.manager)
        if rules and count_rules(session, version.id) == 0:
            loaded[version.id] = load_rules(session, version.id, rules)[0]
    return loaded


def install_shipped_rules(session_factory: sessionmaker[Session]) -> dict[str, int]:
    """``register_shipped_rules`` in its own transaction (what ``coffer up`` runs at start)."""
    with transaction(session_factory) as session:
        return register_shipped_rules(session)
