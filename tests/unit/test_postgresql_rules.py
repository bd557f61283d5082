"""Every rule in coffer.datastores.postgresql_rules, accepted and refused, plus the pure parts of
the PostgreSQL datastore's configuration (sizing, pg_hba.conf)."""

from __future__ import annotations

import inspect

import pytest

from coffer.datastores import mysql_rules
from coffer.datastores import postgresql_rules as rules
from coffer.errors import ValidationError
from coffer.guest.datastores.postgresql import client_networks, memory_settings, render_hba

# -- the same interface as mysql_rules -------------------------------------------------------------


@pytest.mark.parametrize(
    "function",
    [
        "validate_database",
        "validate_database_name",
        "validate_user",
        "validate_user_name",
        "validate_password",
        "validate_user_update",
        "normalize_host",
        "database_names",
    ],
)
def test_same_functions_as_mysql_rules(function: str) -> None:
    mine = inspect.signature(getattr(rules, function))
    theirs = inspect.signature(getattr(mysql_rules, function))
    assert list(mine.parameters) == list(theirs.parameters)
    for name, parameter in mine.parameters.items():
        assert parameter.kind == theirs.parameters[name].kind


# -- database names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "a",
        "app_db",
        "App-1",
        "Mixed Case DB",
        "select",
        "a.b@c?d#e%f",
        "pg_things",  # pg_ is reserved for roles only
        "x" * 63,
        "ж" * 31,  # 62 bytes
        "dé-jà vu",
        "Postgres2",
    ],
)
def test_database_name_accepted(name: str) -> None:
    assert rules.validate_database_name(name) == name


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("", "must not be empty"),
        ("x" * 64, "64 bytes long in UTF-8; PostgreSQL's limit is 63 bytes"),
        ("é" * 32, "64 bytes long"),
        ('a"b', "must not contain"),
        ("a'b", "must not contain"),
        ("a\\b", "must not contain"),
        ("a;b", "must not contain"),
        ("a`b", "must not contain"),
        ("a/b", "must not contain"),
        (" ab", "whitespace"),
        ("ab ", "whitespace"),
        ("ab\n", "control characters"),
        ("a\x00b", "control characters"),
        ("a\x85b", "control characters"),
        ("a\ud800b", "not valid Unicode"),
        ("postgres", "reserved"),
        ("POSTGRES", "reserved"),
        ("template0", "reserved"),
        ("Template1", "reserved"),
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
    assert len(info.value.message) < 250


# -- user names ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["bob", "b", "Bob Smith", "app.user-1", "Ünï", "u" * 63, "select", "postgresql"]
)
def test_user_name_accepted(name: str) -> None:
    assert rules.validate_user_name(name) == name


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("", "must not be empty"),
        ("u" * 64, "64 bytes long"),
        ("bob@corp", "must not contain"),
        ("o'brien", "must not contain"),
        ('x"; DROP ROLE app; --', "must not contain"),
        ("semi;colon", "must not contain"),
        ("back\\slash", "must not contain"),
        (" bob", "whitespace"),
        ("tab\tname", "control characters"),
        ("postgres", "reserved"),
        ("Postgres", "reserved"),
        ("os_admin", "reserved"),
        ("pg_monitor", "reserved"),
        ("PG_anything", "reserved"),
        ("public", "reserved"),
        ("NONE", "reserved"),
        ("current_user", "reserved"),
        ("session_user", "reserved"),
        ("current_role", "reserved"),
    ],
)
def test_user_name_refused(name: str, fragment: str) -> None:
    with pytest.raises(ValidationError, match="user name") as info:
        rules.validate_user_name(name)
    assert fragment in info.value.message


def test_extra_reserved_user_names_are_case_insensitive() -> None:
    with pytest.raises(ValidationError, match="reserved"):
        rules.validate_user_name("Coffer", extra_reserved=["coffer"])
    assert rules.validate_user_name("coffer2", extra_reserved=["coffer"]) == "coffer2"


# -- passwords -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "password", ["p", "pw'; DROP ROLE app; --", 'with "quotes" and \\', "ünïcode pass", "x" * 512]
)
def test_password_accepted(password: str) -> None:
    assert rules.validate_password(password) == password


@pytest.mark.parametrize(
    ("password", "fragment"),
    [
        ("", "must not be empty"),
        ("x" * 513, "longer than 512"),
        (" secret", "whitespace"),
        ("secret\n", "whitespace"),
        ("sec\x00ret", "control characters"),
        ("sec\nret", "control characters"),
    ],
)
def test_password_refused_without_echoing_it(password: str, fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        rules.validate_password(password)
    assert fragment in info.value.message
    if password.strip():
        assert password.strip() not in info.value.message


def test_password_field_name_is_used() -> None:
    with pytest.raises(ValidationError, match="The root password must not be empty"):
        rules.validate_password("", "root password")


# -- hosts ---------------------------------------------------------------------------------------


def test_host_is_only_a_wildcard() -> None:
    assert rules.normalize_host(None) == "%"
    assert rules.normalize_host("%") == "%"
    for host in ("localhost", "10.0.0.1", "10.0.%", "::1", ""):
        with pytest.raises(ValidationError, match="not tied to a client host") as info:
            rules.normalize_host(host)
        assert "allowed_cidrs" in info.value.message
    with pytest.raises(ValidationError, match="host must be a string"):
        rules.normalize_host(5)


# -- encodings and collations --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        (None, "UTF8"),
        ("utf8", "UTF8"),
        ("UTF-8", "UTF8"),
        ("unicode", "UTF8"),
        ("latin1", "LATIN1"),
        ("ISO-8859-1", "LATIN1"),
        ("iso_8859_15", "LATIN9"),
        ("sql_ascii", "SQL_ASCII"),
        ("win1252", "WIN1252"),
        ("Windows-1251", "WIN1251"),
        ("euc_jp", "EUC_JP"),
        ("koi8", "KOI8R"),
    ],
)
def test_encodings_are_normalised(given: str | None, stored: str) -> None:
    assert rules.normalize_encoding(given) == stored


@pytest.mark.parametrize(
    ("given", "fragment"),
    [
        ("utf8mb4", "not a PostgreSQL server encoding"),
        ("klingon", "not a PostgreSQL server encoding"),
        ("SJIS", "client-only encoding"),
        ("big5", "client-only encoding"),
        ("", "not a PostgreSQL server encoding"),
    ],
)
def test_encodings_refused(given: str, fragment: str) -> None:
    with pytest.raises(ValidationError, match="character set") as info:
        rules.normalize_encoding(given)
    assert fragment in info.value.message


@pytest.mark.parametrize("collate", ["C", "POSIX", "C.UTF-8", "en_US.UTF-8", "de_DE@euro"])
def test_collation_names_accepted(collate: str) -> None:
    assert rules.validate_collation(collate) == collate


@pytest.mark.parametrize("collate", ["", "C'; DROP", "en US", "-C", "a" * 64, "C.UTF-8\n"])
def test_collation_names_refused(collate: str) -> None:
    with pytest.raises(ValidationError, match="collation"):
        rules.validate_collation(collate)


def test_validate_database() -> None:
    assert rules.validate_database({"name": "shop"}) == {
        "name": "shop",
        "character_set": "UTF8",
        "collate": None,
    }
    assert rules.validate_database({"name": "shop", "character_set": "latin1", "collate": "C"}) == {
        "name": "shop",
        "character_set": "LATIN1",
        "collate": "C",
    }
    with pytest.raises(ValidationError, match="object"):
        rules.validate_database("shop")


# -- users as a whole ----------------------------------------------------------------------------


def test_validate_user() -> None:
    assert rules.validate_user(
        {"name": "bob", "password": "pw", "databases": [{"name": "a"}, "b", {"name": "a"}]}
    ) == {"name": "bob", "host": "%", "password": "pw", "databases": ["a", "b"]}
    assert rules.validate_user({"name": "bob"}, require_password=False)["password"] is None
    with pytest.raises(ValidationError, match="password is required"):
        rules.validate_user({"name": "bob"})
    with pytest.raises(ValidationError, match="reserved"):
        rules.validate_user({"name": "coffer", "password": "pw"}, extra_reserved=["coffer"])
    with pytest.raises(ValidationError, match="database name"):
        rules.validate_user({"name": "bob", "password": "pw", "databases": [{"name": "a;b"}]})
    with pytest.raises(ValidationError, match="not tied to a client host"):
        rules.validate_user({"name": "bob", "password": "pw", "host": "10.0.0.1"})


def test_validate_user_update() -> None:
    assert rules.validate_user_update({"name": "new", "password": "pw", "host": "%"}) == {
        "name": "new",
        "password": "pw",
        "host": "%",
    }
    assert rules.validate_user_update({"password": "pw", "name": None}) == {"password": "pw"}
    with pytest.raises(ValidationError, match="at least one"):
        rules.validate_user_update({})
    with pytest.raises(ValidationError, match="unknown attributes: databases"):
        rules.validate_user_update({"databases": []})
    with pytest.raises(ValidationError, match="reserved"):
        rules.validate_user_update({"name": "pg_read_all_data"})
    with pytest.raises(ValidationError, match="not tied to a client host"):
        rules.validate_user_update({"host": "10.0.0.1"})


# -- configuration from the flavor and the spec -------------------------------------------------


def test_memory_settings_for_small_and_large_flavors() -> None:
    small = memory_settings(256, 1, 1)
    assert small["shared_buffers"] == "64MB"
    assert small["effective_cache_size"] == "192MB"
    assert small["max_connections"] == "32"
    assert small["work_mem"] == "4MB"
    assert small["max_wal_size"] == "128MB"
    assert small["max_parallel_workers_per_gather"] == "0"
    large = memory_settings(16384, 8, 100)
    assert large["shared_buffers"] == "4096MB"
    assert large["max_connections"] == "500"
    assert large["work_mem"] == "64MB"
    assert large["max_wal_size"] == "4096MB"
    assert large["max_parallel_workers_per_gather"] == "4"
    assert memory_settings(128, 1, 1)["max_connections"] == "25"


def test_pg_hba_rejects_the_agent_over_tcp_before_any_tenant_line() -> None:
    rows = [line.split() for line in render_hba(["10.1.0.0/16"]).splitlines() if line[:1] != "#"]
    assert rows == [
        # Base backups are replication connections, over the socket only.
        ["local", "replication", "os_admin", "scram-sha-256"],
        ["local", "all", "os_admin", "scram-sha-256"],
        ["host", "all", "os_admin", "0.0.0.0/0", "reject"],
        ["host", "all", "os_admin", "::/0", "reject"],
        ["host", "all", "all", "10.1.0.0/16", "scram-sha-256"],
    ]
    assert not any(row[-1] in ("trust", "peer", "ident", "md5", "password") for row in rows)


def test_client_networks() -> None:
    assert client_networks([]) == ["0.0.0.0/0", "::/0"]
    assert client_networks(["10.1.2.3/16", "10.1.0.0/16", "2001:db8::1/64"]) == [
        "10.1.0.0/16",
        "2001:db8::/64",
    ]
