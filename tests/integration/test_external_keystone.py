"""Coffer with ``[keystone_authtoken]``: tokens come from, and are checked by, a real OpenStack
Keystone (from PyPI, SQLite backend, served by gunicorn), and the seed CLI sequence runs with the
real ``openstack`` and ``trove`` CLIs authenticating against that Keystone.

The Keystone has: the bootstrap ``admin`` (role admin on project ``admin``), Coffer's service user
``coffer`` (role service on project ``service``), and in project ``demo`` the users ``demo``
(member), ``rita`` (reader) and ``bot`` (only the ``service`` role, which Coffer does not know);
``eve`` is a member of project ``other``. Coffer's database endpoint is registered in its catalog
as ``http://127.0.0.1:<port>/v1.0/%(tenant_id)s``.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pymysql
import pytest
import yaml
from coffer_harness import VENV_BIN, Coffer, coffer_environment, processes_under
from keystone_harness import REGION, Keystone, running_keystone
from keystoneauth1 import access

from coffer.config import KeystoneAuthtokenSection, Settings, load_settings
from coffer.errors import ConfigError, Forbidden, Unauthorized
from coffer.identity.external import (
    KeystoneTokenValidator,
    KeystoneUnavailable,
    TokenCache,
    auth_context_from_access,
)

pytestmark = [pytest.mark.integration, pytest.mark.compat, pytest.mark.slow]

SERVICE_USER = "coffer"


@dataclass
class Deployment:
    keystone: Keystone
    coffer: Coffer
    passwords: dict[str, str]  # user name -> password
    projects: dict[str, str]  # project name -> id
    service_password: str

    def token(self, user: str, project: str = "demo") -> str:
        token, _ = self.keystone.token(user, self.passwords[user], project)
        return token

    def get(self, token: str | None, path: str, project: str = "demo") -> httpx.Response:
        return self.call("GET", token, path, project)

    def call(
        self, method: str, token: str | None, path: str, project: str = "demo", **kw: Any
    ) -> httpx.Response:
        headers = {"X-Auth-Token": token} if token is not None else {}
        url = f"{self.coffer.base_url}/v1.0/{self.projects[project]}{path}"
        return httpx.request(method, url, headers=headers, timeout=30, **kw)

    # -- the real CLIs, authenticating against Keystone ------------------------------------------

    def openstack(self, *args: str, cloud: str = "ks-demo", check: bool = True) -> Any:
        env = dict(self.coffer.env)
        env["OS_CLIENT_CONFIG_FILE"] = str(self.coffer.state_dir / "keystone-clouds.yaml")
        env["OS_CLOUD"] = cloud
        proc = subprocess.run(
            [str(VENV_BIN / "openstack"), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"openstack {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}"
            )
        if "-f" in args and "json" in args and proc.returncode == 0 and proc.stdout.strip():
            return json.loads(proc.stdout)
        return proc

    def trove(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = dict(self.coffer.env)
        env.update(
            {
                "OS_AUTH_URL": self.keystone.url,
                "OS_USERNAME": "demo",
                "OS_PASSWORD": self.passwords["demo"],
                "OS_PROJECT_NAME": "demo",
                "OS_USER_DOMAIN_NAME": "Default",
                "OS_PROJECT_DOMAIN_NAME": "Default",
                "OS_REGION_NAME": REGION,
            }
        )
        return subprocess.run(
            [str(VENV_BIN / "trove"), *args], env=env, capture_output=True, text=True, timeout=60
        )


def _clouds_yaml(keystone: Keystone, passwords: dict[str, str]) -> str:
    def cloud(user: str, project: str) -> dict[str, Any]:
        return {
            "auth": {
                "auth_url": keystone.url,
                "username": user,
                "password": passwords[user],
                "project_name": project,
                "user_domain_name": "Default",
                "project_domain_name": "Default",
            },
            "region_name": REGION,
            "identity_api_version": 3,
            "interface": "public",
        }

    clouds = {"ks-demo": cloud("demo", "demo"), "ks-admin": cloud("admin", "admin")}
    return yaml.safe_dump({"clouds": clouds}, sort_keys=False)


def _coffer_conf(keystone: Keystone) -> str:
    # The service password is not in the file: it comes from COFFER_KEYSTONE_AUTHTOKEN__PASSWORD.
    return f"""\
[keystone_authtoken]
www_authenticate_uri = {keystone.url}
auth_url = {keystone.url}
auth_type = password
username = {SERVICE_USER}
project_name = service
user_domain_name = Default
project_domain_name = Default
region_name = {REGION}
interface = internal
http_connect_timeout = 5
http_request_max_retries = 0
token_cache_time = 300
"""


@pytest.fixture(scope="module")
def deployment(engine_user: str) -> Iterator[Deployment]:
    with running_keystone() as keystone:
        passwords = {"admin": keystone.admin_password}
        projects = {"admin": keystone.call("GET", "/projects?name=admin")["projects"][0]["id"]}
        for project in ("service", "demo", "other"):
            projects[project] = keystone.create_project(project)
        service_password = secrets.token_urlsafe(16)
        keystone.create_user(SERVICE_USER, service_password, projects["service"], "service")
        for user, project, role in [
            ("demo", "demo", "member"),
            ("rita", "demo", "reader"),
            ("bot", "demo", "service"),
            ("eve", "other", "member"),
        ]:
            passwords[user] = secrets.token_urlsafe(12)
            keystone.create_user(user, passwords[user], projects[project], role)

        with coffer_environment(COFFER_KEYSTONE_AUTHTOKEN__PASSWORD=service_password) as coffer:
            keystone.register_service("database", "trove", f"{coffer.base_url}/v1.0/%(tenant_id)s")
            conf = coffer.state_dir / "coffer.conf"
            conf.write_text(_coffer_conf(keystone))
            clouds = coffer.state_dir / "keystone-clouds.yaml"
            clouds.write_text(_clouds_yaml(keystone, passwords))
            clouds.chmod(0o600)
            coffer.start("up", "up", "--config", str(conf))
            coffer.wait_api()
            yield Deployment(keystone, coffer, passwords, projects, service_password)


def test_up_points_at_keystone_and_embedded_identity_is_off(deployment: Deployment) -> None:
    coffer, keystone = deployment.coffer, deployment.keystone
    deadline = time.monotonic() + 10
    while "Coffer is up." not in coffer.log("up") and time.monotonic() < deadline:
        time.sleep(0.1)
    banner = coffer.log("up")
    assert f"Identity:                  Keystone at {keystone.url}" in banner
    assert "embedded identity is off" in banner
    assert "/identity/v3" not in banner
    assert deployment.service_password not in banner
    # No embedded users, credentials or clouds.yaml pointing at an identity that is off.
    assert not (coffer.state_dir / "credentials.json").exists()
    assert not (coffer.state_dir / "clouds.yaml").exists()

    # The embedded Keystone subset is not served: a client pointed at it finds nothing.
    assert httpx.get(f"{coffer.base_url}/identity/v3", timeout=10).status_code == 404
    body = {"auth": {"identity": {"methods": ["password"]}}}
    resp = httpx.post(f"{coffer.base_url}/identity/v3/auth/tokens", json=body, timeout=10)
    assert resp.status_code == 404
    # The service password never reaches a process's argv.
    pids = [proc.pid for proc in coffer.procs.values()] + processes_under(coffer.state_dir)
    assert pids
    for pid in pids:
        assert deployment.service_password not in _argv(pid)


def test_tokens_are_checked_by_keystone(deployment: Deployment) -> None:
    d = deployment
    missing = d.get(None, "/instances")
    assert missing.status_code == 401
    assert d.keystone.url in missing.json()["unauthorized"]["message"]
    forged = d.get("gAAAAABnot-a-real-token", "/instances")
    assert forged.status_code == 401
    assert "Keystone did not accept this token" in forged.json()["unauthorized"]["message"]

    demo = d.token("demo")
    listed = d.get(demo, "/instances")
    assert listed.status_code == 200, listed.text
    assert listed.json()["instances"] == []
    # The path's project must be the token's.
    assert d.get(demo, "/instances", project="other").status_code == 403
    eve = d.token("eve", "other")
    assert d.get(eve, "/instances", project="other").status_code == 200
    assert d.get(eve, "/instances", project="demo").status_code == 403

    # A token Keystone has revoked is refused (this one never reached Coffer's cache).
    revoked = d.token("demo")
    d.keystone.revoke(revoked)
    assert d.get(revoked, "/instances").status_code == 401

    # Roles map by name: reader looks, does not change; a role Coffer does not know grants nothing.
    rita = d.token("rita")
    assert d.get(rita, "/flavors").status_code == 200
    body = {"instance": {"name": "nope", "flavorRef": "6", "volume": {"size": 1}}}
    refused = d.call("POST", rita, "/instances", json=body)
    assert refused.status_code == 403, refused.text
    bot = d.call("GET", d.token("bot"), "/flavors")
    assert bot.status_code == 403
    assert "none of the roles Coffer knows" in bot.json()["forbidden"]["message"]

    # Keystone's admin role is Coffer's admin: mgmt routes, and other projects through their URL.
    admin = d.token("admin", "admin")
    assert d.get(admin, "/mgmt/datastore-versions", project="admin").status_code == 200
    assert d.get(demo, "/mgmt/datastore-versions").status_code == 403
    assert d.get(admin, "/instances", project="demo").status_code == 200


def _wait_status(d: Deployment, name: str, want: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    shown: dict[str, Any] = {}
    while time.monotonic() < deadline:
        shown = d.openstack("database", "instance", "show", name, "-f", "json")
        if shown["status"] == want:
            return shown
        assert shown["status"] != "ERROR", f"instance went to ERROR: {shown}"
        time.sleep(0.5)
    raise AssertionError(f"instance {name} not {want} in {timeout}s: {shown}")


def _can_use(host: str, user: str, password: str, db: str) -> bool:
    try:
        conn = pymysql.connect(
            host=host, port=3306, user=user, password=password, database=db, connect_timeout=5
        )
    except pymysql.err.OperationalError:
        return False
    with conn, conn.cursor() as cur:
        cur.execute("SELECT 1")
        return cur.fetchone() == (1,)


def test_seed_sequence_against_keystone(deployment: Deployment) -> None:
    d = deployment
    # The CLIs find Coffer through Keystone's catalog, with Keystone's tokens.
    versions = d.openstack("datastore", "version", "list", "mariadb", "-f", "json")
    assert versions, "coffer up registers the host's MariaDB"
    host_version = versions[0]["Name"]
    major_minor = ".".join(host_version.split(".")[:2])

    # 1. An operator (Keystone admin) registers a version; 2. it is listed.
    d.openstack(
        "datastore",
        "version",
        "create",
        major_minor,
        "mariadb",
        "mariadb",
        "",
        "--image-tags",
        "trove,mariadb",
        "--active",
        "--version-number",
        major_minor,
        cloud="ks-admin",
    )
    names = {
        v["Name"] for v in d.openstack("datastore", "version", "list", "mariadb", "-f", "json")
    }
    assert {host_version, major_minor} <= names
    # ... which a member may not do.
    refused = d.openstack(
        "datastore", "version", "create", "9.9", "mariadb", "mariadb", "", check=False
    )
    assert refused.returncode != 0

    # 3. instance create, as the seeds do it; 4. instance list.
    created = d.openstack(
        "database",
        "instance",
        "create",
        "my_db",
        "--flavor",
        "d1.micro",
        "--size",
        "1",
        "--nic",
        f"net-id={uuid.uuid4()}",
        "--database",
        "testdb",
        "--users",
        "spatel:mypassword",
        "--datastore",
        "mariadb",
        "--datastore-version",
        major_minor,
        "--is-public",
        "--allowed-cidr",
        "0.0.0.0/0",
        "-f",
        "json",
    )
    assert created["name"] == "my_db"
    shown = _wait_status(d, "my_db", "ACTIVE")
    instance_id = shown["id"]
    private = next(a["address"] for a in shown["addresses"] if a["type"] == "private")
    listed = d.openstack("database", "instance", "list", "-f", "json")
    assert [(i["Name"], i["Status"]) for i in listed] == [("my_db", "ACTIVE")]

    # 5-10. users and databases.
    users = d.openstack("database", "user", "list", "my_db", "-f", "json")
    assert [(u["Name"], u["Databases"]) for u in users] == [("spatel", "testdb")]
    d.openstack(
        "database", "user", "create", "my_db", "newuser", "userpass", "--databases", "testdb"
    )
    d.openstack("database", "db", "create", "my_db", "newdb")
    dbs = {x["Name"] for x in d.openstack("database", "db", "list", "my_db", "-f", "json")}
    assert {"testdb", "newdb"} <= dbs
    d.openstack("database", "user", "grant", "access", "my_db", "newuser", "newdb")
    access = d.openstack("database", "user", "show", "access", "my_db", "newuser", "-f", "json")
    assert {a["Name"] for a in access} == {"testdb", "newdb"}

    # 11-13. the legacy trove CLI, also through Keystone.
    out = d.trove("list")
    assert out.returncode == 0, out.stderr
    assert "my_db" in out.stdout and "ACTIVE" in out.stdout
    out = d.trove("datastore-list")
    assert out.returncode == 0, out.stderr
    assert "mariadb" in out.stdout
    out = d.trove("flavor-list")
    assert out.returncode == 0, out.stderr
    assert "d1.micro" in out.stdout

    # The instance is real: the granted user reaches exactly the granted databases.
    assert _can_use(private, "newuser", "userpass", "newdb")
    assert not _can_use(private, "spatel", "mypassword", "newdb")

    # Tenant isolation with Keystone projects: another project does not see it; the admin
    # sees it through the admin project's own URL.
    eve = d.token("eve", "other")
    assert d.get(eve, "/instances", project="other").json()["instances"] == []
    assert d.get(eve, f"/instances/{instance_id}", project="other").status_code == 404
    admin = d.token("admin", "admin")
    every = d.get(admin, "/mgmt/instances", project="admin")
    assert every.status_code == 200, every.text
    assert [(i["id"], i["tenant_id"]) for i in every.json()["instances"]] == [
        (instance_id, d.projects["demo"])
    ]

    d.openstack("database", "instance", "delete", "my_db")
    deadline = time.monotonic() + 60
    demo = d.token("demo")
    while d.get(demo, f"/instances/{instance_id}").status_code != 404:
        assert time.monotonic() < deadline, "instance still there 60s after delete"
        time.sleep(0.5)


def test_the_validator_in_process(deployment: Deployment) -> None:
    d = deployment
    token = d.token("demo")
    validator = KeystoneTokenValidator(_options(d.keystone, d.service_password))
    ctx = validator.validate(token, method="GET", path="/v1.0/x/instances")
    # Keystone's implied roles: member brings reader with it.
    assert ctx.roles == {"member", "reader"}
    assert (ctx.user_name, ctx.project_id) == ("demo", d.projects["demo"])
    # Coffer's own credentials refused is Coffer's problem, not the user's: 503, not 401.
    wrong = KeystoneTokenValidator(_options(d.keystone, "not-the-password"))
    with pytest.raises(KeystoneUnavailable, match="refused Coffer's service credentials"):
        wrong.validate(token, method="GET", path="/")


def test_validated_tokens_are_cached_and_an_outage_is_a_503(deployment: Deployment) -> None:
    """Last in the module: it stops Keystone."""
    d = deployment
    seen = d.token("demo")
    unseen = d.token("demo")
    validations = d.keystone.requests_seen("GET", "/v3/auth/tokens")
    for _ in range(5):
        assert d.get(seen, "/flavors").status_code == 200
    # Five requests, one validation: Keystone was asked about this token once.
    deadline = time.monotonic() + 5
    while d.keystone.requests_seen("GET", "/v3/auth/tokens") == validations:
        assert time.monotonic() < deadline, "Keystone never saw the token validated"
        time.sleep(0.1)
    assert d.keystone.requests_seen("GET", "/v3/auth/tokens") == validations + 1
    # ... through Coffer's shared cache, not keystonemiddleware's per-connection fallback.
    assert "in-process token cache is deprecated" not in d.coffer.log("up")
    d.keystone.stop()
    with pytest.raises(httpx.HTTPError):
        httpx.get(d.keystone.url, timeout=2)

    # Validated before: answered from the token cache without Keystone.
    assert d.get(seen, "/flavors").status_code == 200
    # Never validated: Coffer cannot know, and says so with a 503 (not a 401: the token may
    # well be good, and the client should not throw it away).
    resp = d.get(unseen, "/flavors")
    assert resp.status_code == 503, resp.text
    assert "could not be reached" in resp.json()["serviceUnavailable"]["message"]


def _argv(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# -- the validator's own rules (no Keystone needed) -----------------------------------------------


def _settings(**keystone: str) -> Settings:
    env = {f"COFFER_KEYSTONE_AUTHTOKEN__{k.upper()}": v for k, v in keystone.items()}
    return load_settings(environ=env)


def _options(keystone: Keystone, password: str) -> KeystoneAuthtokenSection:
    return _settings(
        auth_url=keystone.url,
        username=SERVICE_USER,
        password=password,
        project_name="service",
        region_name=REGION,
        http_request_max_retries="0",
    ).keystone_authtoken


def test_external_mode_needs_complete_service_credentials() -> None:
    assert not _settings().keystone_authtoken.enabled
    with pytest.raises(ConfigError, match="set username, password, project_name"):
        _settings(auth_url="http://127.0.0.1:5000/v3")
    with pytest.raises(ConfigError, match="auth_url"):
        _settings(auth_url="keystone:5000", username="c", password="p", project_name="s")
    with pytest.raises(ConfigError, match="set memcache_secret_key"):
        _settings(
            auth_url="http://127.0.0.1:5000/v3",
            username="c",
            password="p",
            project_name="s",
            memcache_security_strategy="ENCRYPT",
        )


def test_the_service_password_stays_hidden() -> None:
    password = "hunter2-" + secrets.token_urlsafe(8)
    options = _settings(
        auth_url="http://127.0.0.1:5000/v3", username="c", password=password, project_name="s"
    ).keystone_authtoken
    assert options.enabled
    validator = KeystoneTokenValidator(options)
    assert password not in repr(options)
    assert password not in repr(validator)
    assert validator.public_url == "http://127.0.0.1:5000/v3"


def test_token_cache_honours_lifetimes_and_bounds() -> None:
    cache = TokenCache(max_entries=2)
    assert cache  # keystonemiddleware only uses a cache object that is true
    assert cache.set("a", b"1", time=60) and cache.set("b", b"2", time=60)
    assert cache.get("a") == b"1"  # ... which makes "b" the least recently used
    cache.set("c", b"3", time=60)
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (b"1", None, b"3")
    assert not cache.set("d", b"4", time=-1)  # token_cache_time = -1: no caching
    assert cache.get("d") is None
    cache.set("e", b"5", time=0.05)
    time.sleep(0.1)
    assert cache.get("e") is None


def _access(roles: list[str], scope: dict[str, Any] | None) -> Any:
    token: dict[str, Any] = {
        "methods": ["password"],
        "expires_at": "2099-01-01T00:00:00.000000Z",
        "issued_at": "2024-01-01T00:00:00.000000Z",
        "audit_ids": ["abc"],
        "user": {"id": "u1", "name": "ann", "domain": {"id": "default", "name": "Default"}},
        "roles": [{"id": f"r-{name}", "name": name} for name in roles],
    }
    if scope:
        token.update(scope)
    return access.create(body={"token": token}, auth_token="t")


def test_roles_map_by_name_and_a_project_scope_is_required() -> None:
    project = {"project": {"id": "p1", "name": "demo", "domain": {"id": "default"}}}
    ctx = auth_context_from_access(_access(["Admin", "manager", "member", "reader"], project))
    assert ctx.roles == {"admin", "member", "reader"}
    assert (ctx.user_id, ctx.user_name, ctx.project_id, ctx.project_name) == (
        "u1",
        "ann",
        "p1",
        "demo",
    )
    assert ctx.is_admin and ctx.audit_id == "abc"
    reader = auth_context_from_access(_access(["reader"], project))
    assert reader.is_read_only and not reader.is_admin
    with pytest.raises(Forbidden, match="none of the roles"):
        auth_context_from_access(_access(["service"], project))
    with pytest.raises(Unauthorized, match="not scoped to a project"):
        auth_context_from_access(_access(["admin"], {"domain": {"id": "default", "name": "D"}}))
