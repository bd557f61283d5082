"""Every rule in coffer.datastores.mysql_rules, accepted and refused."""

from __future__ import annotations

import pytest

from coffer.datastores import mysql_rules as rules
from coffer.errors import ValidationError
from coffer.guest.datastores.mariadb import memory_settings

# -- database names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["ab", "app_db", "App-1", "a" * 64, "my db", "a?b", "a#b", "a@b", "a \t?#@b", "9_-x"],
)
def test_database_name_accepted(name: str) -> None:
    assert rules.validate_database_name(name) == name


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("", "must not be empty"),
        ("a" * 65, "65 characters long; the limit is 64"),
        ("a", "at least two"),
        ("a\\b", "backslash"),
        ("a;b", "invalid"),
        ("a'b", "invalid"),
        ("a`b", "invalid"),
        ("a.b", "invalid"),
        ("a/b", "invalid"),
        (" ab", "invalid"),
        ("ab ", "invalid"),
        ("ab\n", "invalid"),
        ("?ab", "invalid"),
        ("déjà", "invalid"),
        ("mysql", "reserved"),
        ("MySQL", "reserved"),
        ("information_schema", "reserved"),
        ("performance_schema", "reserved"),
        ("sys", "reserved"),
    ],
)
def test_database_name_refused(name: str, fragment: str) -> None:
    with pytest.raises(ValidationError, match="database name") as info:
        rules.validate_database_name(name)
    assert fragment in info.value.message


@pytest.mark.parametrize("value", [None, 12, ["ab"]])
def test_database_name_must_be_a_string(value: object) -> None:
    with pytest.raises(ValidationError, match="database name"):
        rules.validate_database_name(value)


def test_long_name_is_cut_short_in_the_message() -> None:
    with pytest.raises(ValidationError) as info:
        rules.validate_database_name("x" * 5000)
    assert len(info.value.message) < 200


# -- user names --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bob", "b", "a" * 80, "bob smith", "bob@corp", "app.user", "Ünï"])
def test_user_name_accepted(name: str) -> None:
    assert rules.validate_user_name(name) == name


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("", "must not be empty"),
        ("a" * 81, "81 characters long; the limit is 80"),
        (" bob", "whitespace"),
        ("bob\t", "whitespace"),
        ("bo'b", "must not contain"),
        ('bo"b', "must not contain"),
        ("bo;b", "must not contain"),
        ("bo`b", "must not contain"),
        ("bo,b", "must not contain"),
        ("bo/b", "must not contain"),
        ("bo\\b", "must not contain"),
        ("bo\nb", "control characters"),
        ("bo\x00b", "control characters"),
        ("root", "reserved"),
        ("ROOT", "reserved"),
        ("os_admin", "reserved"),
        ("mariadb.sys", "reserved"),
    ],
)
def test_user_name_refused(name: str, fragment: str) -> None:
    with pytest.raises(ValidationError, match="user name") as info:
        rules.validate_user_name(name)
    assert fragment in info.value.message


def test_user_name_extra_reserved() -> None:
    assert rules.validate_user_name("coffer") == "coffer"
    with pytest.raises(ValidationError, match="reserved"):
        rules.validate_user_name("Coffer", extra_reserved=["coffer"])


def test_user_name_must_be_a_string() -> None:
    with pytest.raises(ValidationError, match="must be a string"):
        rules.validate_user_name(5)


# -- passwords -----------------------------------------------------------------------------------


@pytest.mark.parametrize("password", ["x", "pa ss word", "Zz9!@#$%^&*()-_=+[]{}<>?.~", "ü" * 512])
def test_password_accepted(password: str) -> None:
    assert rules.validate_password(password) == password


@pytest.mark.parametrize(
    ("password", "fragment"),
    [
        ("", "must not be empty"),
        ("x" * 513, "longer than 512"),
        (" secretvalue", "whitespace"),
        ("secretvalue ", "whitespace"),
        ("secret'value", "must not contain"),
        ('secret"value', "must not contain"),
        ("secret;value", "must not contain"),
        ("secret`value", "must not contain"),
        ("secret,value", "must not contain"),
        ("secret/value", "must not contain"),
        ("secret\\value", "must not contain"),
        ("secret\nvalue", "control characters"),
    ],
)
def test_password_refused_without_echoing_it(password: str, fragment: str) -> None:
    with pytest.raises(ValidationError, match="password") as info:
        rules.validate_password(password)
    assert fragment in info.value.message
    if password:
        assert "secret" not in info.value.message


def test_password_field_name_is_used() -> None:
    with pytest.raises(ValidationError, match="root password"):
        rules.validate_password("", "root password")
    with pytest.raises(ValidationError, match="required"):
        rules.validate_password(None)


# -- hosts -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "stored"),
    [
        (None, "%"),
        ("%", "%"),
        ("10.0.%", "10.0.%"),
        ("%.example", "%.example"),
        ("192.168.1._", "192.168.1._"),
        ("192.0.2.10", "192.0.2.10"),
        ("::1", "::1"),
        ("2001:db8::1", "2001:db8::1"),
        ("10.0.0.0/24", "10.0.0.0/255.255.255.0"),
        ("10.0.0.0/255.255.0.0", "10.0.0.0/255.255.0.0"),
        ("0.0.0.0/0", "0.0.0.0/0.0.0.0"),
    ],
)
def test_host_accepted(host: str | None, stored: str) -> None:
    assert rules.normalize_host(host) == stored


@pytest.mark.parametrize(
    ("host", "fragment"),
    [
        ("", "must not be empty"),
        ("localhost", "not an IP address"),
        ("db.example.com", "not an IP address"),
        ("10.0.0.256", "not an IP address"),
        ("10.%.0.1", "not a valid pattern"),
        ("%%%", "not a valid pattern"),
        ("10.0.%;drop", "not a valid pattern"),
        ("10.0.0.1/24", "not a valid network"),
        ("10.0.0.0/33", "not a valid network"),
        ("2001:db8::/32", "IPv6 network"),
        ("1" * 256, "the limit is 255"),
        ("'%'", "not a valid pattern"),
    ],
)
def test_host_refused(host: str, fragment: str) -> None:
    with pytest.raises(ValidationError, match="host") as info:
        rules.normalize_host(host)
    assert fragment in info.value.message


# -- character sets ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("charset", "collate", "expected"),
    [
        (None, None, ("utf8mb4", None)),
        ("latin1", None, ("latin1", None)),
        ("UTF8MB4", "utf8mb4_unicode_ci", ("utf8mb4", "utf8mb4_unicode_ci")),
        (None, "utf8mb4_bin", ("utf8mb4", "utf8mb4_bin")),
        ("utf8", None, ("utf8mb3", None)),
        ("utf8", "utf8_general_ci", ("utf8mb3", "utf8mb3_general_ci")),
        (None, "utf16le_bin", ("utf16le", "utf16le_bin")),
        ("binary", "binary", ("binary", "binary")),
    ],
)
def test_character_set_accepted(
    charset: str | None, collate: str | None, expected: tuple[str, str | None]
) -> None:
    assert rules.normalize_character_set(charset, collate) == expected


@pytest.mark.parametrize(
    ("charset", "collate", "fragment"),
    [
        ("klingon", None, "not supported"),
        ("utf8mb4; DROP", None, "invalid"),
        ("utf8mb4", "latin1_swedish_ci", "belongs to character set 'latin1'"),
        (None, "nosuch_ci", "does not belong"),
        (None, "utf8mb4_bin`", "invalid"),
        (7, None, "must be a string"),
    ],
)
def test_character_set_refused(charset: object, collate: object, fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        rules.normalize_character_set(charset, collate)
    assert fragment in info.value.message


# -- whole objects -------------------------------------------------------------------------------


def test_validate_database_fills_defaults() -> None:
    assert rules.validate_database({"name": "shop"}) == {
        "name": "shop",
        "character_set": "utf8mb4",
        "collate": None,
    }
    with pytest.raises(ValidationError, match="object"):
        rules.validate_database("shop")


def test_validate_user_normalises() -> None:
    user = rules.validate_user(
        {"name": "bob", "password": "pw", "host": "10.1.0.0/16", "databases": [{"name": "shop"}]}
    )
    assert user == {
        "name": "bob",
        "host": "10.1.0.0/255.255.0.0",
        "password": "pw",
        "databases": ["shop"],
    }


def test_validate_user_requires_a_password_unless_told_not_to() -> None:
    with pytest.raises(ValidationError, match="password is required"):
        rules.validate_user({"name": "bob"})
    assert rules.validate_user({"name": "bob"}, require_password=False)["password"] is None


def test_validate_user_checks_its_databases_and_reserved_names() -> None:
    with pytest.raises(ValidationError, match="database name"):
        rules.validate_user({"name": "bob", "password": "pw", "databases": [{"name": "x;y"}]})
    with pytest.raises(ValidationError, match="reserved"):
        rules.validate_user({"name": "agent", "password": "pw"}, extra_reserved=["agent"])


def test_database_names_accepts_strings_and_objects_once_each() -> None:
    assert rules.database_names([{"name": "ab"}, "cd", {"name": "ab"}]) == ["ab", "cd"]
    assert rules.database_names(None) == []
    with pytest.raises(ValidationError, match="list"):
        rules.database_names("ab")


def test_validate_user_update() -> None:
    assert rules.validate_user_update({"name": "alice", "host": "10.0.0.0/8"}) == {
        "name": "alice",
        "host": "10.0.0.0/255.0.0.0",
    }
    assert rules.validate_user_update({"password": "new"}) == {"password": "new"}
    with pytest.raises(ValidationError, match="at least one"):
        rules.validate_user_update({})
    with pytest.raises(ValidationError, match="unknown attributes: databases"):
        rules.validate_user_update({"databases": []})
    with pytest.raises(ValidationError, match="reserved"):
        rules.validate_user_update({"name": "root"})


# -- names in SQL ------------------------------------------------------------------------------


def test_quote_identifier_doubles_backquotes() -> None:
    assert rules.quote_identifier("shop") == "`shop`"
    assert rules.quote_identifier("a`b") == "`a``b`"


@pytest.mark.parametrize(
    ("name", "pattern"),
    [("shop", "shop"), ("my_db", "my\\_db"), ("a%b", "a\\%b"), ("a\\b", "a\\\\b")],
)
def test_grant_patterns_are_exact_and_reversible(name: str, pattern: str) -> None:
    assert rules.grant_pattern(name) == pattern
    assert rules.grant_target(name) == f"`{pattern}`.*"
    assert rules.grant_name(pattern) == name


# -- engine sizing (MariaDB option values derived from the flavor) -----------------------------


@pytest.mark.parametrize(
    ("memory_mb", "vcpus", "pool", "connections", "redo", "io"),
    [
        (128, 1, "32M", "30", "16M", ("1", "2")),
        (256, 1, "64M", "42", "16M", ("1", "2")),
        (1024, 2, "512M", "170", "128M", ("2", "2")),
        (4096, 8, "2048M", "682", "512M", ("4", "4")),
        (65536, 16, "32768M", "1000", "1024M", ("4", "4")),
    ],
)
def test_memory_settings(
    memory_mb: int, vcpus: int, pool: str, connections: str, redo: str, io: tuple[str, str]
) -> None:
    settings = memory_settings(memory_mb, vcpus)
    assert settings["innodb_buffer_pool_size"] == pool
    assert settings["max_connections"] == connections
    assert settings["innodb_log_file_size"] == redo
    assert (settings["innodb_read_io_threads"], settings["innodb_write_io_threads"]) == io
