"""Parameter rules: the validation-rules.json format, the files Coffer ships, and rules in the
control DB (loading, replacing, removing, the shipped set at start, and ``coffer manage``)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from coffer import catalog
from coffer.cli.manage import manage
from coffer.configuration import parameter_rules as rules
from coffer.configuration.parameter_rules import ParameterRule, RulesFileError
from coffer.db.models import Base, DatastoreVersion
from coffer.db.models_day2 import ConfigurationParameterRule
from coffer.db.session import make_engine, make_session_factory, transaction
from coffer.errors import Conflict, NotFound, ValidationError


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    engine = make_engine(f"sqlite:///{tmp_path / 'c.db'}")
    Base.metadata.create_all(engine)
    try:
        with transaction(make_session_factory(engine)) as s:
            yield s
    finally:
        engine.dispose()


def _version(session: Session, ds: str = "mariadb", name: str = "10.11") -> DatastoreVersion:
    manager = ds
    return catalog.register_datastore_version(session, ds, name, manager, version=f"{name}.6")


def _doc(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"configuration-parameters": list(entries)}


def _count(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(ConfigurationParameterRule)) or 0)


# -- the file format ------------------------------------------------------------------------------


def test_parse_a_trove_document() -> None:
    parsed = rules.parse_rules(
        _doc(
            {
                "name": "Max_Connections",
                "restart_required": False,
                "type": "integer",
                "min": 1,
                "max": 100000,
            },
            {"name": "long_query_time", "restart_required": False, "type": "float", "min": 0},
            {"name": "performance_schema", "restart_required": True, "type": "boolean"},
            {
                "name": "maxmemory-policy",
                "restart_required": False,
                "type": "string",
                "allowed_values": ["noeviction", "allkeys-lru"],
            },
            # Trove's own files give 2**64-1 as a maximum.
            {
                "name": "sort_buffer_size",
                "restart_required": False,
                "type": "integer",
                "min": 32768,
                "max": 18446744073709551615,
            },
        )
    )
    by_name = {rule.name: rule for rule in parsed}
    assert set(by_name) == {
        "max_connections", "long_query_time", "performance_schema", "maxmemory-policy",
        "sort_buffer_size",
    }  # fmt: skip
    assert by_name["max_connections"] == ParameterRule(
        "max_connections", "integer", False, 1, 100000
    )
    assert by_name["long_query_time"].minimum == 0 and by_name["long_query_time"].maximum is None
    assert by_name["performance_schema"].restart_required is True
    assert by_name["maxmemory-policy"].allowed_values == ("noeviction", "allkeys-lru")
    assert by_name["sort_buffer_size"].maximum == 2**64 - 1
    # A rule written back out reads the same.
    assert rules.parse_rules(_doc(*(r.to_document() for r in parsed))) == parsed


def test_every_problem_of_a_document_is_listed_at_once() -> None:
    with pytest.raises(RulesFileError) as caught:
        rules.parse_rules(
            _doc(
                {"name": "a", "restart_requried": False, "type": "integer"},
                {"name": "b", "restart_required": False, "type": "decimal"},
                {"name": "c", "restart_required": False, "type": "integer", "min": 5, "max": 1},
                {"name": "d", "type": "integer"},
                {"name": "e", "restart_required": "no", "type": "integer"},
                {"name": "f; DROP", "restart_required": False, "type": "string"},
                {"name": "g", "restart_required": False, "type": "boolean", "min": 0},
                {"name": "h", "restart_required": False, "type": "integer", "min": 1.5},
                {
                    "name": "i",
                    "restart_required": False,
                    "type": "integer",
                    "allowed_values": ["x"],
                },
                {"name": "J", "restart_required": False, "type": "string"},
                {"name": "j", "restart_required": True, "type": "string"},
                "not an object",
            ),
            "rules.json",
        )
    problems = caught.value.problems
    assert len(problems) == 11, problems  # every entry but "J"
    text = "\n".join(problems)
    assert "restart_requried" in text and "did you mean 'restart_required'" in text
    assert "'decimal' is not one of integer, float, string, boolean" in text
    assert "min 5 is greater than max 1" in text
    assert "lacks restart_required" in text
    assert "restart_required must be true or false" in text
    assert "not a valid parameter name" in text
    assert "min and max apply to integer and float parameters only" in text
    assert "whole number" in text
    assert "allowed_values applies to string parameters only" in text
    assert "'j' is listed twice" in text
    assert "entry 12 is not an object" in text
    assert str(caught.value).startswith("rules.json is not a valid rules file:")


@pytest.mark.parametrize("document", [[], {}, {"configuration-parameters": {}}, "x", None])
def test_a_document_without_the_rule_list_is_refused(document: Any) -> None:
    with pytest.raises(RulesFileError, match='"configuration-parameters" list'):
        rules.parse_rules(document)


def test_read_rules_file_reports_unreadable_and_non_json_files(tmp_path: Path) -> None:
    with pytest.raises(RulesFileError, match="cannot be read"):
        rules.read_rules_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(RulesFileError, match="not JSON"):
        rules.read_rules_file(bad)


def test_nan_and_infinite_bounds_are_refused() -> None:
    for bound in (float("nan"), float("inf")):
        with pytest.raises(ValidationError, match="finite"):
            rules.make_rule("x", "float", False, minimum=bound)


# -- the shipped rules ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("manager", "name", "data_type", "restart"),
    [
        ("mariadb", "max_connections", "integer", False),
        # Resizable online since MariaDB 10.2; 10.11 reports it as not read-only.
        ("mariadb", "innodb_buffer_pool_size", "integer", False),
        ("mariadb", "innodb_log_buffer_size", "integer", True),
        ("mariadb", "performance_schema", "boolean", True),
        ("mariadb", "long_query_time", "float", False),
        ("postgresql", "max_connections", "integer", True),
        ("postgresql", "shared_buffers", "integer", True),
        ("postgresql", "work_mem", "integer", False),
        ("postgresql", "random_page_cost", "float", False),
        ("postgresql", "log_statement", "string", False),
        ("redis", "maxmemory-policy", "string", False),
        ("redis", "timeout", "integer", False),
        ("redis", "databases", "integer", True),
        ("redis", "lazyfree-lazy-eviction", "boolean", False),
    ],
)
def test_shipped_rules_mark_well_known_parameters(
    manager: str, name: str, data_type: str, restart: bool
) -> None:
    by_name = {rule.name: rule for rule in rules.shipped_rules(manager)}
    assert by_name[name].data_type == data_type
    assert by_name[name].restart_required is restart


def test_shipped_files_are_valid_and_keep_engine_managed_settings_out() -> None:
    # Addresses, ports, paths and credentials are Coffer's to set, never a tenant's.
    forbidden = {
        "bind_address", "port", "socket", "datadir", "listen_addresses", "unix_socket_directories",
        "data_directory", "hba_file", "bind", "dir", "requirepass", "masterauth", "unixsocket",
        "aclfile", "user", "plugin_dir", "ssl", "password_encryption",
    }  # fmt: skip
    for manager in ("mariadb", "postgresql", "redis"):
        path = rules.shipped_rules_path(manager)
        assert path is not None
        parsed = rules.read_rules_file(path)
        assert len(parsed) >= 25, manager
        assert forbidden.isdisjoint(rule.name for rule in parsed), manager
        assert {rule.data_type for rule in parsed} >= {"integer", "string", "boolean"}
        # Integers are bounded on both sides in the files Coffer ships.
        for rule in parsed:
            if rule.data_type == "integer":
                assert rule.minimum is not None and rule.maximum is not None, rule
    assert rules.shipped_rules("mysql") == ()
    assert rules.shipped_rules_path("mysql") is None


def test_a_missing_shipped_file_fails_loudly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rules, "SHIPPED_DIR", tmp_path)
    rules.shipped_rules.cache_clear()
    try:
        with pytest.raises(RulesFileError, match="missing from this installation"):
            rules.shipped_rules("redis")
        assert rules.shipped_rules("mysql") == ()
    finally:
        rules.shipped_rules.cache_clear()


# -- the control DB -------------------------------------------------------------------------------


def test_load_rules_upserts_and_replace_deletes_the_rest(session: Session) -> None:
    version = _version(session)
    first = [
        rules.make_rule("max_connections", "integer", False, 10, 100),
        rules.make_rule("tx_isolation", "string", False, allowed_values=["READ-COMMITTED"]),
    ]
    assert rules.load_rules(session, version.id, first) == (2, 0)
    changed = [rules.make_rule("max_connections", "integer", True, 10, 5000)]
    assert rules.load_rules(session, version.id, changed) == (1, 0)
    stored = {rule.name: rule for rule in rules.rules_for_version(session, version.id)}
    assert stored["max_connections"] == ParameterRule("max_connections", "integer", True, 10, 5000)
    assert stored["tx_isolation"].allowed_values == ("READ-COMMITTED",)
    assert rules.load_rules(session, version.id, changed, replace=True) == (1, 1)
    assert [r.name for r in rules.rules_for_version(session, version.id)] == ["max_connections"]
    assert rules.remove_rules(session, version.id) == 1
    assert rules.rules_for_version(session, version.id) == []


def test_huge_bounds_survive_the_round_trip(session: Session) -> None:
    version = _version(session)
    rule = rules.make_rule("sort_buffer_size", "integer", False, 0, 2**64 - 1)
    floaty = rules.make_rule("long_query_time", "float", False, 0.5, 31536000.0)
    rules.load_rules(session, version.id, [rule, floaty])
    assert rules.find_rule(session, version, "SORT_BUFFER_SIZE").maximum == 2**64 - 1
    assert rules.find_rule(session, version, "long_query_time") == floaty


def test_single_rule_create_update_delete(session: Session) -> None:
    version = _version(session)
    rule = rules.make_rule("thread_stack", "integer", True, 131072, 2**30)
    rules.create_rule(session, version.id, rule)
    with pytest.raises(Conflict, match="already has a rule"):
        rules.create_rule(session, version.id, rule)
    rules.update_rule(session, version, rules.make_rule("thread_stack", "integer", False, 1, 2))
    assert rules.find_rule(session, version, "thread_stack").restart_required is False
    rules.delete_rule(session, version, "Thread_Stack")
    with pytest.raises(NotFound, match="no configuration parameter 'thread_stack'"):
        rules.find_rule(session, version, "thread_stack")
    with pytest.raises(NotFound):
        rules.update_rule(session, version, rule)
    with pytest.raises(NotFound):
        rules.delete_rule(session, version, "thread_stack")


def test_register_shipped_rules_fills_only_versions_without_rules(session: Session) -> None:
    maria = _version(session)
    pg = _version(session, "postgresql", "15")
    mysql = catalog.register_datastore_version(session, "mysql", "8.0", "mysql")
    loaded = rules.register_shipped_rules(session)
    assert loaded == {
        maria.id: len(rules.shipped_rules("mariadb")),
        pg.id: len(rules.shipped_rules("postgresql")),
    }
    assert rules.rules_for_version(session, mysql.id) == []
    # An operator's change survives the next start; nothing is loaded twice.
    rules.update_rule(session, maria, rules.make_rule("max_connections", "integer", False, 10, 50))
    rules.delete_rule(session, pg, "work_mem")
    assert rules.register_shipped_rules(session) == {}
    assert rules.find_rule(session, maria, "max_connections").maximum == 50
    with pytest.raises(NotFound):
        rules.find_rule(session, pg, "work_mem")


def test_deleting_a_version_deletes_its_rules(session: Session) -> None:
    version = _version(session)
    spare = _version(session, "mariadb", "10.6")
    rules.register_shipped_rules(session)
    before = _count(session)
    catalog.delete_datastore_version(session, spare.id)
    assert _count(session) == before - len(rules.shipped_rules("mariadb"))
    assert len(rules.rules_for_version(session, version.id)) == len(rules.shipped_rules("mariadb"))


def test_views_follow_trove() -> None:
    rule = rules.make_rule("max_connections", "integer", 0, 10, 100)
    assert rule.public_view("v1") == {
        "name": "max_connections",
        "datastore_version_id": "v1",
        "restart_required": False,
        "type": "integer",
        "min": 10,
        "max": 100,
    }
    mgmt = rule.mgmt_view("v1")
    assert (mgmt["min_size"], mgmt["max_size"], mgmt["deleted"]) == (10, 100, False)
    assert "min" not in mgmt and "max" not in mgmt
    # A minimum of 0 is shown (Trove drops it, because 0 is false).
    assert rules.make_rule("sync_binlog", "integer", 0, 0, 9).public_view("v")["min"] == 0


# -- coffer manage --------------------------------------------------------------------------------


def _manage(tmp_path: Path, *args: str) -> Any:
    env = {"COFFER_STATE_DIR": str(tmp_path / "state")}
    return CliRunner().invoke(manage, list(args), env=env, catch_exceptions=False)


def test_manage_loads_lists_and_removes_rules(tmp_path: Path) -> None:
    out = _manage(tmp_path, "datastore-version-create", "mariadb", "10.11", "mariadb")
    assert out.exit_code == 0, out.output
    rules_file = tmp_path / "rules.json"
    rules_file.write_text(
        json.dumps(
            _doc(
                {"name": "max_connections", "restart_required": False, "type": "integer",
                 "min": 10, "max": 500},
                {"name": "wait_timeout", "restart_required": False, "type": "integer",
                 "min": 1, "max": 60},
            )
        )
    )  # fmt: skip
    out = _manage(tmp_path, "configuration-rules-load", "mariadb", "10.11", str(rules_file))
    assert out.exit_code == 0, out.output
    assert "2 parameter rules loaded" in out.output
    listed = _manage(tmp_path, "configuration-rules-list", "mariadb", "10.11")
    document = json.loads(listed.output)
    assert [r["name"] for r in document["configuration-parameters"]] == [
        "max_connections",
        "wait_timeout",
    ]
    assert document["configuration-parameters"][0]["max"] == 500

    # Without a file: the shipped rules for the version's engine; --replace drops the rest.
    shipped = len(rules.shipped_rules("mariadb"))
    out = _manage(tmp_path, "configuration-rules-load", "mariadb", "10.11", "--replace")
    assert out.exit_code == 0, out.output
    assert f"{shipped} parameter rules loaded, 0 removed" in out.output
    listed = json.loads(_manage(tmp_path, "configuration-rules-list", "mariadb", "10.11").output)
    by_name = {r["name"]: r for r in listed["configuration-parameters"]}
    assert len(by_name) == shipped and by_name["max_connections"]["max"] == 100000

    out = _manage(tmp_path, "configuration-rules-remove", "mariadb", "10.11")
    assert out.exit_code == 0 and f"{shipped} parameter rules removed" in out.output


def test_manage_refuses_a_bad_file_before_touching_the_control_db(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_doc({"name": "x", "type": "integer"})))
    out = _manage(tmp_path, "configuration-rules-load", "mariadb", "10.11", str(bad))
    assert out.exit_code == 1
    assert "lacks restart_required" in out.output
    assert not (tmp_path / "state" / "coffer.db").exists()
    out = _manage(tmp_path, "configuration-rules-remove", "nosuch", "1")
    assert out.exit_code == 1 and "Datastore 'nosuch' was not found" in out.output
