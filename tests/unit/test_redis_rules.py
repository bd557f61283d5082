"""Every rule in coffer.datastores.redis_rules, accepted and refused."""

from __future__ import annotations

from typing import Any

import pytest

from coffer.datastores import redis_rules as rules
from coffer.errors import NotImplementedByDatastore, ValidationError
from coffer.guest.datastores.redis import memory_settings, password_hash

# -- user names ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["app", "a", "App_1", "_svc", "9lives", "first.last", "me@example.org", "a-b", "x" * 64]
)
def test_user_name_accepted(name: str) -> None:
    assert rules.validate_user_name(name) == name


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("", "must not be empty"),
        ("x" * 65, "65 characters long; the limit is 64"),
        ("bob nopass", "invalid for Redis"),
        ("bob on >pw +@all", "invalid for Redis"),
        ("bob\n", "invalid for Redis"),
        ("bob\x00", "invalid for Redis"),
        (" bob", "invalid for Redis"),
        (">pw", "invalid for Redis"),
        ("<pw", "invalid for Redis"),
        ("#abc", "invalid for Redis"),
        ("~*", "invalid for Redis"),
        ("%RW~x", "invalid for Redis"),
        ("&chan", "invalid for Redis"),
        ("+@all", "invalid for Redis"),
        ("-@all", "invalid for Redis"),
        ("(~x)", "invalid for Redis"),
        ("!abc", "invalid for Redis"),
        ("@admin", "invalid for Redis"),
        ("-x", "invalid for Redis"),
        (".x", "invalid for Redis"),
        ('bob"', "invalid for Redis"),
        ("bob'", "invalid for Redis"),
        ("bob\\", "invalid for Redis"),
        ("bob;", "invalid for Redis"),
        ("bob:x", "invalid for Redis"),
        ("déjà", "invalid for Redis"),
        ("default", "reserved"),
        ("DEFAULT", "reserved"),
        ("os_admin", "reserved"),
        ("Root", "reserved"),
    ],
)
def test_user_name_refused(name: str, fragment: str) -> None:
    with pytest.raises(ValidationError, match="user name") as info:
        rules.validate_user_name(name)
    assert fragment in info.value.message


def test_extra_reserved_names_are_refused_case_insensitively() -> None:
    with pytest.raises(ValidationError, match="reserved"):
        rules.validate_user_name("Coffer", extra_reserved=["coffer"])
    assert rules.validate_user_name("coffer2", extra_reserved=["coffer"]) == "coffer2"


@pytest.mark.parametrize("value", [None, 12, ["app"]])
def test_user_name_must_be_a_string(value: object) -> None:
    with pytest.raises(ValidationError, match="user name"):
        rules.validate_user_name(value)


def test_long_name_is_cut_short_in_the_message() -> None:
    with pytest.raises(ValidationError) as info:
        rules.validate_user_name("x" * 5000)
    assert len(info.value.message) < 300


# -- passwords -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "password",
    ["pw", "nopass", ">x", "<x", "#abc", "~*", "+@all", "(x)", "p'\";\\`", "é€", "x" * 512],
)
def test_password_accepted(password: str) -> None:
    assert rules.validate_password(password) == password


@pytest.mark.parametrize(
    ("password", "fragment"),
    [
        ("", "must not be empty"),
        ("x" * 513, "longer than 512"),
        ("pw nopass", "whitespace"),
        (" pw", "whitespace"),
        ("pw\t", "whitespace"),
        ("pw\n", "whitespace"),
        ("pw\x00", "unprintable"),
        ("pw\x7f", "unprintable"),
        ("pw\u200b", "unprintable"),
    ],
)
def test_password_refused_without_echoing_it(password: str, fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        rules.validate_password(password, "root password")
    assert fragment in info.value.message
    assert info.value.message.startswith("The root password")
    if password.strip():
        assert password.strip() not in info.value.message


@pytest.mark.parametrize("value", [None, 5, b"pw"])
def test_password_must_be_a_string(value: object) -> None:
    with pytest.raises(ValidationError, match="password"):
        rules.validate_password(value)


# -- hosts, users and updates --------------------------------------------------------------------


def test_only_the_any_host_is_accepted() -> None:
    assert rules.normalize_host(None) == "%"
    assert rules.normalize_host("%") == "%"
    for host in ("10.0.0.1", "localhost", "10.0.%", "", "% "):
        with pytest.raises(ValidationError, match="no host-based access control"):
            rules.normalize_host(host)


def test_validate_user_returns_the_engine_form() -> None:
    assert rules.validate_user({"name": "app", "password": "pw", "databases": []}) == {
        "name": "app",
        "host": "%",
        "password": "pw",
        "databases": [],
    }
    assert rules.validate_user({"name": "app"}, require_password=False)["password"] is None


@pytest.mark.parametrize(
    "spec",
    [
        "app",
        {"name": "app"},
        {"name": "app", "password": "pw", "host": "10.0.0.1"},
        {"name": "default", "password": "pw"},
        {"name": "app", "password": "pw", "databases": "db"},
    ],
)
def test_validate_user_refuses(spec: Any) -> None:
    with pytest.raises(ValidationError):
        rules.validate_user(spec)


def test_a_user_given_databases_is_not_implemented() -> None:
    with pytest.raises(NotImplementedByDatastore, match="numbered keyspaces") as info:
        rules.validate_user({"name": "app", "password": "pw", "databases": [{"name": "0"}]})
    assert info.value.status == 501


def test_validate_user_update() -> None:
    assert rules.validate_user_update({"name": "new", "password": "pw", "host": "%"}) == {
        "name": "new",
        "password": "pw",
        "host": "%",
    }
    assert rules.validate_user_update({"password": "pw", "name": None}) == {"password": "pw"}
    for attrs, fragment in [
        ({}, "at least one"),
        ({"name": None}, "at least one"),
        ({"admin": True}, "unknown attributes: admin"),
        ({"name": "os_admin"}, "reserved"),
        ({"host": "10.0.0.1"}, "no host-based"),
        ({"password": "a b"}, "whitespace"),
        ("name", "must be an object"),
    ]:
        with pytest.raises(ValidationError) as info:
            rules.validate_user_update(attrs)
        assert fragment in info.value.message


# -- databases -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda: rules.validate_database({"name": "app_db"}),
        lambda: rules.validate_database_name("0"),
        lambda: rules.database_names([{"name": "0"}]),
    ],
)
def test_databases_are_not_implemented(call: Any) -> None:
    with pytest.raises(NotImplementedByDatastore) as info:
        call()
    assert info.value.status == 501
    assert "no per-database access control" in info.value.message


def test_no_databases_is_fine() -> None:
    assert rules.database_names(None) == []
    assert rules.database_names([]) == []
    with pytest.raises(ValidationError, match="list"):
        rules.database_names("0")


# -- sizing and hashes ---------------------------------------------------------------------------


@pytest.mark.parametrize(("ram", "maxmemory"), [(128, "96mb"), (256, "192mb"), (4096, "3072mb")])
def test_maxmemory_is_three_quarters_of_the_flavor(ram: int, maxmemory: str) -> None:
    assert memory_settings(ram) == {"maxmemory": maxmemory, "maxmemory-policy": "noeviction"}


def test_password_hash_is_the_redis_form() -> None:
    # sha256("foobar"), as in the Redis ACL documentation's example.
    assert password_hash("foobar") == (
        "#c3ab8ff13720e8ad9047dd39466b3c8974e592c2fa383d4a3960714caef0c4f2"
    )
