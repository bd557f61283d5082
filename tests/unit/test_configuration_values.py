"""Checking configuration values against parameter rules: types, ranges, allowed values, names.

Each refusal must be a 422 whose message names the parameter and states its rule."""

from __future__ import annotations

from typing import Any

import pytest

from coffer.configuration.parameter_rules import make_rule, shipped_rules
from coffer.configuration.values import (
    MAX_STRING,
    MAX_VALUES,
    ConfigurationNotSupported,
    InvalidConfigurationValue,
    check_values,
)
from coffer.errors import UnprocessableEntity

RULES = [
    make_rule("max_connections", "integer", False, 10, 100000),
    make_rule("long_query_time", "float", False, 0, 3600),
    make_rule("slow_query_log", "boolean", False),
    make_rule("performance_schema", "boolean", True),
    make_rule("sql_mode", "string", False),
    make_rule(
        "tx_isolation", "string", False, allowed_values=["READ-COMMITTED", "REPEATABLE-READ"]
    ),
    make_rule("unbounded", "integer", False),
]
LABEL = "mariadb 10.11"


def _refusal(values: dict[str, Any]) -> InvalidConfigurationValue:
    with pytest.raises(InvalidConfigurationValue) as caught:
        check_values(RULES, values, LABEL)
    assert caught.value.status == 422
    return caught.value


def test_good_values_come_back_canonical() -> None:
    checked = check_values(
        RULES,
        {
            "MAX_CONNECTIONS": 555,
            "long_query_time": 2,
            "Slow_Query_Log": True,
            "sql_mode": "STRICT_TRANS_TABLES,NO_ZERO_DATE",
            "tx_isolation": "read-committed",
        },
        LABEL,
    )
    assert checked == {
        "max_connections": 555,
        "long_query_time": 2,
        "slow_query_log": True,
        "sql_mode": "STRICT_TRANS_TABLES,NO_ZERO_DATE",
        "tx_isolation": "READ-COMMITTED",
    }
    assert check_values(RULES, {}, LABEL) == {}
    # The range is inclusive at both ends.
    assert check_values(RULES, {"max_connections": 10}, LABEL) == {"max_connections": 10}
    assert check_values(RULES, {"max_connections": 100000}, LABEL) == {"max_connections": 100000}


@pytest.mark.parametrize(
    ("values", "fragments"),
    [
        ({"max_connections": 9}, ["9 is less than the minimum 10", "integer, 10 to 100000"]),
        ({"max_connections": 100001}, ["greater than the maximum 100000"]),
        ({"max_connections": "555"}, ["must be a whole number, not a string"]),
        # Trove lets true pass as an integer (bool is an int in Python); Coffer does not.
        ({"max_connections": True}, ["must be a whole number, not a boolean"]),
        ({"max_connections": 55.5}, ["must be a whole number, not a number"]),
        ({"max_connections": None}, ["must be a whole number, not null"]),
        ({"long_query_time": float("nan")}, ["finite"]),
        ({"long_query_time": float("inf")}, ["finite"]),
        ({"long_query_time": -0.5}, ["less than the minimum 0", "float, 0 to 3600"]),
        ({"long_query_time": False}, ["must be a number, not a boolean"]),
        ({"slow_query_log": 1}, ["must be true or false, not a number"]),
        ({"slow_query_log": "ON"}, ["must be true or false, not a string"]),
        ({"sql_mode": ["A"]}, ["must be a string, not a list"]),
        ({"sql_mode": "A\nplugin_load=evil.so"}, ["line break or another control character"]),
        ({"sql_mode": "x" * (MAX_STRING + 1)}, [f"longer than {MAX_STRING}"]),
        ({"tx_isolation": "chaos"}, ["'chaos' is not one of the allowed values", "one of READ-"]),
        ({"unbounded": 2**64}, ["does not fit a 64-bit integer"]),
        ({"performance_schema": "yes"}, ["needs a restart"]),
    ],
)
def test_bad_values_name_the_parameter_and_the_rule(
    values: dict[str, Any], fragments: list[str]
) -> None:
    error = _refusal(values)
    key = next(iter(values))
    assert error.parameter == key.lower()
    assert error.message.startswith(f"Configuration parameter {key!r}: ")
    assert "(its rule: " in error.message
    for fragment in fragments:
        assert fragment in error.message


def test_a_refused_type_does_not_quote_the_value() -> None:
    error = _refusal({"max_connections": "hunter2-secret"})
    assert "hunter2" not in error.message


def test_unknown_parameters_get_a_did_you_mean() -> None:
    error = _refusal({"max_conections": 50})
    assert "'max_conections' is not supported for datastore mariadb 10.11" in error.message
    assert "did you mean 'max_connections'?" in error.message
    error = _refusal({"datadir": "/etc"})
    assert "'datadir' is not supported" in error.message


def test_a_parameter_given_twice_in_two_cases_is_refused() -> None:
    error = _refusal({"max_connections": 100, "MAX_CONNECTIONS": 200})
    assert "given twice" in error.message


def test_a_version_without_rules_does_not_support_groups() -> None:
    with pytest.raises(ConfigurationNotSupported, match="not supported for datastore redis 7"):
        check_values([], {}, "redis 7")


def test_values_must_be_an_object_of_bounded_size() -> None:
    with pytest.raises(UnprocessableEntity, match="JSON object"):
        check_values(RULES, ["max_connections"], LABEL)
    many = {f"p{i}": i for i in range(MAX_VALUES + 1)}
    with pytest.raises(UnprocessableEntity, match=f"at most {MAX_VALUES}"):
        check_values([make_rule(f"p{i}", "integer", False) for i in range(2)], many, LABEL)


def test_shipped_rules_accept_the_issue_examples_and_refuse_nonsense() -> None:
    maria = list(shipped_rules("mariadb"))
    assert check_values(maria, {"max_connections": 555}, LABEL) == {"max_connections": 555}
    assert check_values(maria, {"max_connections": 666}, LABEL) == {"max_connections": 666}
    with pytest.raises(InvalidConfigurationValue, match="max_connections"):
        check_values(maria, {"max_connections": 0}, LABEL)
    pg = list(shipped_rules("postgresql"))
    assert check_values(pg, {"shared_buffers": 16384, "work_mem": 8192}, "postgresql 15") == {
        "shared_buffers": 16384,
        "work_mem": 8192,
    }
    redis = list(shipped_rules("redis"))
    assert check_values(redis, {"maxmemory-policy": "ALLKEYS-LRU"}, "redis 7.0") == {
        "maxmemory-policy": "allkeys-lru"
    }
    with pytest.raises(InvalidConfigurationValue, match="not one of the allowed values"):
        check_values(redis, {"maxmemory-policy": "lru-please"}, "redis 7.0")
