"""Checking a configuration group's values against its datastore version's parameter rules.

A value passes when its parameter has a rule (names match case-insensitively, as in Trove), it
has the rule's JSON type, and it lies within the rule's range or set. Anything else is a 422
``unprocessableEntity`` whose message names the parameter and the rule. Unlike Trove, ``true``
is not an integer and ``NaN`` is not a number.

Checked values come back keyed by the rule's (lower-case) name, with ``allowed_values`` spelt as
the rule spells them, so the guest always receives canonical names and values.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy.orm import Session

from coffer.configuration.parameter_rules import (
    INTEGER_CEILING,
    INTEGER_FLOOR,
    ParameterRule,
    rules_for_version,
)
from coffer.db.models import Datastore, DatastoreVersion
from coffer.errors import UnprocessableEntity

#: Most values one group may hold (the shipped rules have fewer parameters than this).
MAX_VALUES = 256
#: Longest string value; engine settings are short, and a guest writes them into a file.
MAX_STRING = 1024


class ConfigurationNotSupported(UnprocessableEntity):
    """The datastore version has no parameter rules, so no group can be made for it."""


class InvalidConfigurationValue(UnprocessableEntity):
    """A value breaks its parameter's rule, or the parameter has none; ``parameter`` names it."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(message)
        self.parameter = parameter


def _label(version: DatastoreVersion, datastore: Datastore | None) -> str:
    return f"{datastore.name} {version.name}" if datastore is not None else version.name


def _type_name(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "a list"
    return "an object"


def check_value(rule: ParameterRule, key: str, value: object) -> Any:
    """``value`` in canonical form if it satisfies ``rule``; ``InvalidConfigurationValue``
    naming ``key`` (the name the caller used) and the rule otherwise. Values are never quoted
    when they are refused for their type, so a mistyped secret cannot reach a log."""

    def refuse(reason: str) -> InvalidConfigurationValue:
        return InvalidConfigurationValue(
            rule.name, f"Configuration parameter {key!r}: {reason} (its rule: {rule.describe()})."
        )

    if rule.data_type == "boolean":
        if not isinstance(value, bool):
            raise refuse(f"the value must be true or false, not {_type_name(value)}")
        return value
    if rule.data_type == "string":
        if not isinstance(value, str):
            raise refuse(f"the value must be a string, not {_type_name(value)}")
        if len(value) > MAX_STRING:
            raise refuse(f"the value is longer than {MAX_STRING} characters")
        if not value.isprintable():
            raise refuse("the value contains a line break or another control character")
        if rule.allowed_values:
            for allowed in rule.allowed_values:
                if allowed.lower() == value.lower():
                    return allowed
            raise refuse(f"{value[:80]!r} is not one of the allowed values")
        return value
    if rule.data_type == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            raise refuse(f"the value must be a whole number, not {_type_name(value)}")
        number: int | float = value
        if not INTEGER_FLOOR <= number <= INTEGER_CEILING:
            raise refuse(f"{number} does not fit a 64-bit integer")
    else:  # float
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise refuse(f"the value must be a number, not {_type_name(value)}")
        if not math.isfinite(value):
            raise refuse("the value must be a finite number")
        number = value
    if rule.minimum is not None and number < rule.minimum:
        raise refuse(f"{number} is less than the minimum {rule.minimum}")
    if rule.maximum is not None and number > rule.maximum:
        raise refuse(f"{number} is greater than the maximum {rule.maximum}")
    return number


def check_values(
    rules: Sequence[ParameterRule], values: object, version_label: str
) -> dict[str, Any]:
    """``values`` checked against ``rules`` and keyed by canonical parameter names.

    Raises ``ConfigurationNotSupported`` when ``rules`` is empty, and
    ``InvalidConfigurationValue`` (422) for the first bad entry: a parameter with no rule (with
    a did-you-mean), one named twice (in different cases), or a value its rule refuses.
    ``version_label`` names the datastore version in messages (``mariadb 10.11``).
    """
    if not rules:
        raise ConfigurationNotSupported(
            f"Configuration groups are not supported for datastore {version_label}: it has no "
            "configuration parameters (an operator loads them with 'coffer manage "
            "configuration-rules-load')."
        )
    if not isinstance(values, Mapping):
        raise UnprocessableEntity("The configuration values must be a JSON object.")
    if len(values) > MAX_VALUES:
        raise UnprocessableEntity(f"A configuration group holds at most {MAX_VALUES} values.")
    by_name = {rule.name: rule for rule in rules}
    checked: dict[str, Any] = {}
    for key, value in values.items():
        name = key.lower() if isinstance(key, str) else ""
        rule = by_name.get(name)
        if rule is None:
            close = difflib.get_close_matches(name, list(by_name), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InvalidConfigurationValue(
                str(key)[:128],
                f"The configuration parameter {str(key)[:128]!r} is not supported for datastore "
                f"{version_label}{hint}; list the supported ones with GET "
                "/datastores/<datastore>/versions/<version>/parameters.",
            )
        if name in checked:
            raise InvalidConfigurationValue(
                name, f"The configuration parameter {name!r} is given twice; give it once."
            )
        checked[name] = check_value(rule, key, value)
    return checked


def validate_values(session: Session, version_id: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` checked against the rules of datastore version ``version_id`` (see
    ``check_values``); reads only. What create, PUT, PATCH and attaching a group to an
    instance call before they change anything."""
    version = session.get(DatastoreVersion, version_id)
    if version is None:
        raise UnprocessableEntity(f"Datastore version {version_id} no longer exists.")
    datastore = session.get(Datastore, version.datastore_id)
    return check_values(rules_for_version(session, version_id), values, _label(version, datastore))
