"""Policy rules (language, defaults, operator files, the sample), rate limits, and the audit log.

The route-by-route authorization matrix is in test_policy_matrix.py.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from api_fixtures import ApiHarness
from click.testing import CliRunner
from test_policy_matrix import World, build_world

from coffer.api.audit import AUDIT_LOGGER
from coffer.api.policy import (
    DEFAULT_RULES,
    RULE_NAMES,
    Policy,
    PolicySyntaxError,
    load_policy,
    parse_rule,
    sample_yaml,
)
from coffer.cli.main import main as cli
from coffer.config import load_settings
from coffer.errors import ConfigError
from coffer.quotas import RateLimit, RateLimited, RateLimiter


def creds(*roles: str, project: str = "p1", user: str = "u1") -> dict[str, Any]:
    return {
        "roles": frozenset(roles),
        "project_id": project,
        "user_id": user,
        "is_admin": "admin" in roles,
    }


# --- the rule language --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "roles", "project", "allowed"),
    [
        ("role:admin", ("admin",), "p1", True),
        ("role:admin", ("member",), "p1", False),
        ("role:Admin", ("admin",), "p1", True),  # role names compare case-insensitively
        ("@", (), "p1", True),
        ("", (), "p1", True),
        ("!", ("admin",), "p1", False),
        ("project_id:%(tenant)s", ("member",), "p1", True),
        ("project_id:%(tenant)s", ("member",), "p2", False),
        ("project_id:%(missing)s", ("member",), "p1", False),
        ("is_admin:True", ("admin",), "p1", True),
        ("role:member and project_id:%(tenant)s", ("member",), "p1", True),
        ("role:member and project_id:%(tenant)s", ("reader",), "p1", False),
        ("role:reader or role:member", ("member",), "p2", True),
        ("not role:reader", ("reader",), "p1", False),
        ("not role:reader", ("member",), "p1", True),
        ("(role:reader or role:member) and project_id:%(tenant)s", ("reader",), "p1", True),
        ("role:admin or (role:member and project_id:%(tenant)s)", ("member",), "p2", False),
        ("role:admin or (role:member and project_id:%(tenant)s)", ("admin",), "p2", True),
    ],
)
def test_rule_language(text: str, roles: tuple[str, ...], project: str, allowed: bool) -> None:
    check = parse_rule(text)
    assert check(Policy(), {"tenant": "p1"}, creds(*roles, project=project)) is allowed


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("role:admin or", "ends too early"),
        ("(role:admin", "not closed"),
        ("role:admin )", "unexpected ')'"),
        ("and role:admin", "unexpected 'and'"),
        ("admin", "is not a check"),
        ("project:%(tenant)s", "did you mean 'project_id'"),
    ],
)
def test_syntax_errors_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(PolicySyntaxError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_rule(text)


def test_every_default_parses_and_names_are_unique() -> None:
    assert len(RULE_NAMES) == len(DEFAULT_RULES)
    policy = Policy()
    assert policy.texts["instance:create"] == "rule:admin_or_owner"
    assert policy.texts["instance:reset_status"] == "rule:admin"


@pytest.mark.parametrize(
    ("rule", "admin", "member", "reader", "member_elsewhere"),
    [
        ("instance:create", True, True, False, False),
        ("instance:show", True, True, True, False),
        ("instance:reset_status", True, False, False, False),
        ("instance:force_delete", True, True, False, False),
        ("instance:extension:user:create", True, True, False, False),
        ("instance:extension:user:index", True, True, True, False),
        ("backup:index:all_projects", True, False, False, False),
        ("flavor:index", True, True, True, True),
        ("mgmt:instance:index", True, False, False, False),
        ("quota:show", True, True, True, False),
        ("quota:update", True, False, False, False),
    ],
)
def test_default_roles(
    rule: str, admin: bool, member: bool, reader: bool, member_elsewhere: bool
) -> None:
    policy = Policy()
    target = {"tenant": "p1"}
    # An admin's token is for its own project, so admins pass whatever the target project.
    assert policy.allows(rule, target, creds("admin", project="admin-project")) is admin
    assert policy.allows(rule, target, creds("member")) is member
    assert policy.allows(rule, target, creds("reader")) is reader
    assert policy.allows(rule, target, creds("member", project="p2")) is member_elsewhere


def test_overrides_are_validated_with_every_problem_listed() -> None:
    with pytest.raises(ConfigError) as caught:
        Policy(
            {
                "instance:creat": "rule:admin",
                "instance:delete": 42,
                "instance:show": "role:admin or",
                "flavor:index": "rule:admn",
            },
            source="policy.yaml",
        )
    message = caught.value.message
    assert "'instance:creat' is not a policy rule (did you mean 'instance:create'?)" in message
    assert "rule 'instance:delete' must be a string" in message
    assert "rule 'instance:show' ('role:admin or'): the rule ends too early" in message
    assert "refers to rule 'admn', which does not exist (did you mean 'admin'?)" in message
    assert message.count("policy.yaml: ") == 4


def test_rules_that_refer_to_each_other_in_a_loop_are_refused() -> None:
    with pytest.raises(ConfigError, match="loop: admin -> admin_or_owner -> admin"):
        Policy({"admin": "rule:admin_or_owner"})


def test_an_override_replaces_the_default() -> None:
    policy = Policy({"instance:create": "rule:admin", "instance:index": None})
    assert not policy.allows("instance:create", {"tenant": "p1"}, creds("member"))
    # null (or an empty string) is "always", as in oslo.policy.
    assert policy.allows("instance:index", {"tenant": "p1"}, creds())
    assert policy.overridden == {"instance:create", "instance:index"}


# --- policy files -------------------------------------------------------------------------------


def _settings(tmp_path: Path, **default: Any) -> Any:
    return load_settings(environ={}, overrides={"DEFAULT": {"state_dir": str(tmp_path), **default}})


def test_policy_file_in_the_state_dir_is_used(tmp_path: Path) -> None:
    assert load_policy(_settings(tmp_path)).overridden == frozenset()
    (tmp_path / "policy.yaml").write_text('"flavor:index": "rule:admin"\n')
    policy = load_policy(_settings(tmp_path))
    assert policy.texts["flavor:index"] == "rule:admin"


def test_policy_file_problems(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_policy(_settings(tmp_path, policy_file=str(tmp_path / "nope.yaml")))
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot read the policy file"):
        load_policy(_settings(tmp_path, policy_file=str(bad)))
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must map rule names to rules"):
        load_policy(_settings(tmp_path, policy_file=str(bad)))
    bad.write_text('"instance:creat": "@"\n')
    with pytest.raises(ConfigError, match=f"{bad}: 'instance:creat' is not a policy rule"):
        load_policy(_settings(tmp_path, policy_file=str(bad)))


def test_sample_is_the_defaults() -> None:
    commented = yaml.safe_load(sample_yaml())
    assert commented is None  # every rule is commented out: the file changes nothing
    active = yaml.safe_load(sample_yaml(commented=False))
    assert active == {rule.name: rule.check for rule in DEFAULT_RULES}
    assert Policy(active).texts == Policy().texts
    assert "#   POST /v1.0/{tenant_id}/instances\n" in sample_yaml()


def test_manage_policy_sample_and_check(tmp_path: Path) -> None:
    runner = CliRunner()
    sample = runner.invoke(cli, ["manage", "policy", "sample", "--uncommented"])
    assert sample.exit_code == 0, sample.output
    assert yaml.safe_load(sample.output)["instance:reset_status"] == "rule:admin"
    env = {"COFFER_STATE_DIR": str(tmp_path)}
    ok = runner.invoke(cli, ["manage", "policy", "check"], env=env)
    assert ok.exit_code == 0 and "default rules apply" in ok.output
    (tmp_path / "policy.yaml").write_text('"instance:creat": "rule:admin"\n')
    bad = runner.invoke(cli, ["manage", "policy", "check"], env=env)
    assert bad.exit_code != 0
    assert "did you mean 'instance:create'" in bad.output


# --- policy through the API ---------------------------------------------------------------------


@pytest.fixture
def api(tmp_path: Path) -> Iterator[ApiHarness]:
    with ApiHarness.start(tmp_path) as harness:
        yield harness


def test_operator_rules_decide(tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text(
        yaml.safe_dump(
            {
                "flavor:index": "rule:admin",
                # Members may set their own project's quotas here; readers may "write" too, but
                # the read-only backstop still stops them.
                "quota:update": "rule:admin or project_id:%(tenant)s",
            }
        )
    )
    with ApiHarness.start(tmp_path) as api:
        denied = api.request("GET", "demo", "flavors")
        assert denied.status_code == 403
        message = denied.json()["forbidden"]["message"]
        assert message.startswith("Policy rule 'flavor:index' does not allow user 'demo'")
        assert api.request("GET", "admin", "flavors").status_code == 200

        _, demo = api.login("demo")
        body = {"quotas": {"instances": 3}}
        resp = api.request("PUT", "demo", f"mgmt/quotas/{demo}", json=body)
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"quotas": {"instances": 3}}
        _, readers = api.login("reader")
        resp = api.request("PUT", "reader", f"mgmt/quotas/{readers}", json=body)
        assert resp.status_code == 403
        assert "only the reader role" in resp.json()["forbidden"]["message"]


def test_an_invalid_policy_file_refuses_requests_not_start_silently(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with ApiHarness.start(tmp_path) as api:
        (tmp_path / "policy.yaml").write_text('"instance:creat": "@"\n')
        with caplog.at_level(logging.ERROR, logger="coffer.api.policy"):
            resp = api.request("GET", "demo", "flavors")
        assert resp.status_code == 503
        assert "policy file is invalid" in resp.json()["serviceUnavailable"]["message"]
        assert "did you mean 'instance:create'" in caplog.text


# --- rate limits --------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_leaky_bucket() -> None:
    clock = FakeClock()
    limiter = RateLimiter(
        [RateLimit("GET", "*", ".*", 3), RateLimit("POST", "*/mgmt", "^/mgmt", 1)], clock
    )
    for _ in range(3):
        limiter.hit("p1", "GET", "/instances")
    with pytest.raises(RateLimited) as caught:
        limiter.hit("p1", "GET", "/instances")
    assert caught.value.details == "Only 3 GET request(s) can be made to * every minute."
    assert caught.value.retry_after == pytest.approx(20.0)
    limiter.hit("p2", "GET", "/instances")  # another project has its own buckets
    limiter.hit("p1", "POST", "/instances")  # no limit on POST here
    clock.now += 20
    limiter.hit("p1", "GET", "/instances")  # one request's worth drained
    limiter.hit("p1", "POST", "/mgmt/quotas/x")
    with pytest.raises(RateLimited):
        limiter.hit("p1", "POST", "/mgmt/instances/x/action")
    report = {row["verb"]: row for row in limiter.report("p1")}
    assert report["GET"]["remaining"] == 0 and report["GET"]["value"] == 3
    assert report["GET"]["unit"] == "MINUTE"
    clock.now += 60
    assert limiter.report("p1")[0]["remaining"] == 3


def test_rate_limited_requests_get_trove_s_413(tmp_path: Path) -> None:
    with ApiHarness.start(tmp_path, http_get_rate=2) as api:
        for _ in range(2):
            assert api.request("GET", "demo", "flavors").status_code == 200
        resp = api.request("GET", "demo", "flavors")
        assert resp.status_code == 413
        retry = int(resp.headers["Retry-After"])
        assert 1 <= retry <= 30
        assert resp.headers["X-Openstack-Request-Id"].startswith("req-")
        assert resp.json() == {
            "overLimit": {
                "code": 413,
                "message": "This request was rate-limited.",
                "details": "Only 2 GET request(s) can be made to * every minute.",
                "retryAfter": str(retry),
            }
        }
        # Counted per project: the admin's project is not held back by demo's requests.
        assert api.request("GET", "admin", "flavors").status_code == 200
        # Writes have their own limits.
        _, demo = api.login("admin")
        assert (
            api.request(
                "PUT", "admin", f"mgmt/quotas/{demo}", json={"quotas": {"ram": 1}}
            ).status_code
            == 200
        )


def test_limits_view(tmp_path: Path) -> None:
    with ApiHarness.start(tmp_path, http_post_rate=0, max_ram_per_tenant=4096) as api:
        resp = api.request("GET", "demo", "limits")
        assert resp.status_code == 200
        absolute, *rates = resp.json()["limits"]
        assert absolute == {
            "verb": "ABSOLUTE",
            "max_instances": 10,
            "max_backups": 50,
            "max_volumes": 40,
            "max_ram": 4096,
        }
        by_verb = {(r["verb"], r["uri"]): r for r in rates}
        assert set(by_verb) == {("GET", "*"), ("PUT", "*"), ("DELETE", "*"), ("POST", "*/mgmt")}
        get = by_verb[("GET", "*")]
        assert get["value"] == 200 and get["remaining"] == 199  # this request counted
        assert set(get) == {"verb", "uri", "regex", "value", "remaining", "unit", "nextAvailable"}
        _, demo = api.login("demo")
        put = api.request("PUT", "admin", f"mgmt/quotas/{demo}", json={"quotas": {"instances": 4}})
        assert put.status_code == 200
        assert api.request("GET", "demo", "limits").json()["limits"][0]["max_instances"] == 4


# --- audit --------------------------------------------------------------------------------------


def _audit_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == AUDIT_LOGGER]


def test_state_changing_requests_are_audited(
    api: ApiHarness, caplog: pytest.LogCaptureFixture
) -> None:
    _, demo = api.login("demo")
    admin_token, admin_project = api.login("admin")
    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        ok = api.request("PUT", "admin", f"mgmt/quotas/{demo}", json={"quotas": {"instances": 5}})
        denied = api.request(
            "PUT", "demo", f"mgmt/quotas/{demo}", json={"quotas": {"instances": 50}}
        )
        anonymous = api.client.put(f"/v1.0/{demo}/mgmt/quotas/{demo}", json={})
        api.request("GET", "demo", "flavors")  # reads are not audited
    assert (ok.status_code, denied.status_code, anonymous.status_code) == (200, 403, 401)
    lines = _audit_lines(caplog)
    assert len(lines) == 3
    first, second, third = lines
    assert first == {
        "request_id": ok.headers["X-Openstack-Request-Id"],
        "user_id": first["user_id"],
        "user_name": "admin",
        "project_id": admin_project,
        "action": "quota:update",
        "method": "PUT",
        "path": f"/v1.0/{admin_project}/mgmt/quotas/{demo}",
        "target": {"project": admin_project, "project_id": demo},
        "outcome": 200,
    }
    assert first["user_id"]
    assert (second["user_name"], second["action"], second["outcome"]) == (
        "demo",
        "quota:update",
        403,
    )
    assert second["request_id"] == denied.headers["X-Openstack-Request-Id"]
    assert (third["user_id"], third["action"], third["outcome"]) == (None, "quota:update", 401)
    assert admin_token not in caplog.text


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    yield from build_world(tmp_path_factory.mktemp("audit"))


def test_audit_never_holds_secrets_and_names_created_ids(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.reset()
    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        users = {"users": [{"name": "bob", "password": "bob-audit-secret"}]}
        path = f"/v1.0/{{tenant_id}}/instances/{world.instance_id}/users"
        assert world.request("POST", "member", path, json=users).status_code == 202
        root = world.request(
            "POST", "member", f"/v1.0/{{tenant_id}}/instances/{world.instance_id}/root"
        )
        assert root.status_code == 200
        body = {
            "instance": {
                "name": "audited",
                "flavorRef": "6",
                "volume": {"size": 1},
                "users": users["users"],
                "databases": [],
            }
        }
        created = world.request("POST", "member", "/v1.0/{tenant_id}/instances", json=body)
        assert created.status_code == 200, created.text
        action = world.request(
            "POST",
            "member",
            f"/v1.0/{{tenant_id}}/instances/{world.instance_id}/action",
            json={"reset_status": {}},
        )
        assert action.status_code == 403
    lines = _audit_lines(caplog)
    assert [(line["action"], line["outcome"]) for line in lines] == [
        ("instance:extension:user:create", 202),
        ("instance:extension:root:create", 200),
        ("instance:create", 200),  # the route's rule, not the extra users check
        ("instance:reset_status", 403),
    ]
    assert lines[2]["target"]["instance_id"] == created.json()["instance"]["id"]
    assert lines[0]["target"]["instance_id"] == world.instance_id
    assert "bob-audit-secret" not in caplog.text
    assert root.json()["user"]["password"] not in caplog.text
    assert world.tokens["demo"] not in caplog.text
