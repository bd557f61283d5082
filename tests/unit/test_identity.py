"""The embedded identity service: passwords, tokens, users, projects, roles; /identity routes."""

from __future__ import annotations

import base64
import os
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from api_fixtures import (
    ADMIN_PASSWORD,
    DEMO_PASSWORD,
    FAST_COST,
    ApiHarness,
    make_settings,
    password_body,
)
from sqlalchemy import select

from coffer.db.models import Base, Project, User
from coffer.db.session import make_engine, make_session_factory, transaction
from coffer.errors import BadRequest, NotFound, Unauthorized, ValidationError
from coffer.identity import IdentityService
from coffer.identity.passwords import (
    DEFAULT_COST,
    ScryptCost,
    hash_password,
    verify_password,
)
from coffer.identity.tokens import TokenCodec, TokenPayload, derive_key

KEY = b"k" * 32
TIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


@pytest.fixture
def identity(tmp_path: Path) -> Iterator[IdentityService]:
    settings = make_settings(tmp_path, bind_port=8779)
    engine = make_engine(settings.database_url)
    try:
        Base.metadata.create_all(engine)
        service = IdentityService(
            make_session_factory(engine), KEY, settings, scrypt_cost=FAST_COST
        )
        service.bootstrap(ADMIN_PASSWORD, DEMO_PASSWORD)
        yield service
    finally:
        engine.dispose()


@pytest.fixture
def api(tmp_path: Path) -> Iterator[ApiHarness]:
    with ApiHarness.start(tmp_path) as harness:
        yield harness


# -- passwords ----------------------------------------------------------------------------------


def test_password_hash_is_salted_and_verifies() -> None:
    first = hash_password("s3cret", FAST_COST)
    second = hash_password("s3cret", FAST_COST)
    assert first != second  # a fresh salt each time
    assert "s3cret" not in first
    assert verify_password("s3cret", first) and verify_password("s3cret", second)
    assert not verify_password("s3cret!", first)
    assert not verify_password("", first)


def test_password_hash_records_its_cost_and_default_cost_is_strong() -> None:
    stored = hash_password("pw", ScryptCost(n=2**5, r=4, p=2))
    assert stored.split("$")[:4] == ["scrypt", "32", "4", "2"]
    assert verify_password("pw", stored)
    # OWASP's minimum for scrypt is N=2^17 r=8 p=1 or an equivalent trade of N for p.
    assert DEFAULT_COST.n * DEFAULT_COST.p >= 2**16 and DEFAULT_COST.r >= 8


@pytest.mark.parametrize(
    "stored", ["", "plain", "bcrypt$1$2$3$aa$bb", "scrypt$x$8$1$aa$bb", "scrypt$3$8$1$aa$bb"]
)
def test_malformed_hash_never_verifies(stored: str) -> None:
    assert verify_password("pw", stored) is False


def test_empty_and_huge_passwords_are_refused() -> None:
    with pytest.raises(ValueError):
        hash_password("", FAST_COST)
    with pytest.raises(ValueError):
        hash_password("x" * 5000, FAST_COST)


# -- tokens -------------------------------------------------------------------------------------


def _payload(**overrides: Any) -> TokenPayload:
    now = time.time()
    fields: dict[str, Any] = {
        "user_id": "u1",
        "project_id": "p1",
        "roles": ("member",),
        "issued_at": now,
        "expires_at": now + 60,
        "audit_id": "a1",
    }
    fields.update(overrides)
    return TokenPayload(**fields)


def test_token_round_trip_and_tamper_detection() -> None:
    codec = TokenCodec(KEY)
    payload = _payload()
    token = codec.seal(payload)
    assert codec.open(token) == payload
    raw = base64.urlsafe_b64decode(token)
    assert b"member" not in raw and b'"u1"' not in raw  # encrypted, not just signed
    tampered = token[:-6] + ("A" if token[-6] != "A" else "B") + token[-5:]
    with pytest.raises(Unauthorized):
        codec.open(tampered)
    with pytest.raises(Unauthorized):
        TokenCodec(b"another key that is long enough").open(token)
    with pytest.raises(Unauthorized):
        codec.open("not-a-token")
    assert "k" * 8 not in repr(codec)


def test_token_key_derivation_is_per_purpose() -> None:
    assert derive_key(KEY, b"a") == derive_key(KEY, b"a")
    assert derive_key(KEY, b"a") != derive_key(KEY, b"b")
    assert derive_key(KEY, b"a") != KEY
    with pytest.raises(ValueError):
        derive_key(b"short", b"a")


# -- the service --------------------------------------------------------------------------------


def test_authenticate_by_name_and_domain_name(identity: IdentityService) -> None:
    token, body = identity.authenticate(password_body("demo", DEMO_PASSWORD, "demo"))
    tok = body["token"]
    assert tok["user"]["name"] == "demo"
    assert tok["user"]["domain"] == {"id": "default", "name": "Default"}
    assert tok["project"]["name"] == "demo"
    assert [r["name"] for r in tok["roles"]] == ["member"]
    assert tok["methods"] == ["password"]
    assert TIME_RE.match(tok["expires_at"]) and TIME_RE.match(tok["issued_at"])
    ctx = identity.validate(token)
    assert (ctx.user_name, ctx.project_name, ctx.roles) == ("demo", "demo", frozenset({"member"}))
    assert not ctx.is_admin
    assert ctx.project_id == tok["project"]["id"]
    lifetime = (ctx.expires_at - datetime.now(UTC)).total_seconds()
    assert 86400 - 60 < lifetime <= 86400


def test_token_catalog_has_database_and_identity_endpoints(identity: IdentityService) -> None:
    _token, body = identity.authenticate(password_body("admin", ADMIN_PASSWORD, "admin"))
    project_id = body["token"]["project"]["id"]
    catalog = {svc["type"]: svc for svc in body["token"]["catalog"]}
    assert set(catalog) == {"database", "identity"}
    (db_endpoint,) = catalog["database"]["endpoints"]
    assert db_endpoint["url"] == f"http://127.0.0.1:8779/v1.0/{project_id}"
    assert db_endpoint["interface"] == "public"
    assert db_endpoint["region"] == db_endpoint["region_id"] == "RegionOne"
    (id_endpoint,) = catalog["identity"]["endpoints"]
    assert id_endpoint["url"] == "http://127.0.0.1:8779/identity/v3"
    assert id_endpoint["region_id"] == "RegionOne"


def test_authenticate_by_ids_and_domain_id(identity: IdentityService) -> None:
    with transaction(identity._session_factory) as session:
        user_id = session.scalar(select(User.id).where(User.name == "admin"))
        project_id = session.scalar(select(Project.id).where(Project.name == "admin"))
    body = {
        "auth": {
            "identity": {
                "methods": ["password"],
                "password": {"user": {"id": user_id, "password": ADMIN_PASSWORD}},
            },
            "scope": {"project": {"id": project_id}},
        }
    }
    token, _ = identity.authenticate(body)
    assert identity.validate(token).is_admin
    by_domain_id = password_body("admin", ADMIN_PASSWORD, "admin", domain={"id": "default"})
    assert identity.authenticate(by_domain_id)[1]["token"]["project"]["id"] == project_id


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (password_body("demo", "wrong", "demo"), "password is wrong"),
        (password_body("nobody", "wrong", "demo"), "password is wrong"),
        (password_body("demo", DEMO_PASSWORD, "demo", {"name": "Other"}), "password is wrong"),
        (password_body("demo", DEMO_PASSWORD, None), "Unscoped tokens are not supported"),
        (password_body("demo", DEMO_PASSWORD, "nowhere"), "'nowhere' was not found"),
        (password_body("demo", DEMO_PASSWORD, "admin"), "has no role on project 'admin'"),
    ],
)
def test_authenticate_refusals(
    identity: IdentityService, body: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(Unauthorized) as info:
        identity.authenticate(body)
    assert fragment in info.value.message
    assert DEMO_PASSWORD not in info.value.message


def test_domain_scope_and_other_methods_are_refused(identity: IdentityService) -> None:
    body = password_body("demo", DEMO_PASSWORD, "demo")
    body["auth"]["scope"] = {"domain": {"id": "default"}}
    with pytest.raises(Unauthorized, match="Only project-scoped"):
        identity.authenticate(body)
    body = password_body("demo", DEMO_PASSWORD, "demo")
    body["auth"]["identity"]["methods"] = ["totp"]
    with pytest.raises(Unauthorized, match="totp are not supported"):
        identity.authenticate(body)


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"auth": []},
        {"auth": {"identity": {"methods": "password"}}},
        {"auth": {"identity": {"methods": ["password"], "password": {"user": {"name": "x"}}}}},
        {"auth": {"identity": {"methods": ["password"], "password": {"user": {"password": "x"}}}}},
    ],
)
def test_malformed_auth_bodies_are_bad_requests(identity: IdentityService, body: Any) -> None:
    with pytest.raises(BadRequest):
        identity.authenticate(body)


def test_expired_and_forged_tokens_are_refused(identity: IdentityService) -> None:
    token, _ = identity.authenticate(password_body("demo", DEMO_PASSWORD, "demo"))
    ctx = identity.validate(token)
    past = time.time() - 10
    expired = TokenCodec(KEY).seal(
        _payload(
            user_id=ctx.user_id,
            project_id=ctx.project_id,
            issued_at=past - 100,
            expires_at=past,
        )
    )
    with pytest.raises(Unauthorized, match="expired"):
        identity.validate(expired)
    forged = TokenCodec(os.urandom(32)).seal(
        _payload(user_id=ctx.user_id, project_id=ctx.project_id, roles=("admin",))
    )
    with pytest.raises(Unauthorized, match="not valid"):
        identity.validate(forged)


def test_token_never_grants_more_than_the_user_holds_now(identity: IdentityService) -> None:
    identity.create_project("ops")
    identity.create_user("olga", "olga-pw", "ops", ["admin", "member"])
    token, _ = identity.authenticate(password_body("olga", "olga-pw", "ops"))
    assert identity.validate(token).roles == {"admin", "member"}
    identity.create_user("olga", "olga-pw", "ops", ["member"])  # admin revoked
    assert identity.validate(token).roles == {"member"}
    identity.create_user("olga", "olga-pw", "ops", ["reader"])  # no role left from the token
    with pytest.raises(Unauthorized, match="no longer has a role"):
        identity.validate(token)


def test_disabled_user_loses_tokens_and_login(identity: IdentityService) -> None:
    token, _ = identity.authenticate(password_body("demo", DEMO_PASSWORD, "demo"))
    with transaction(identity._session_factory) as session:
        user = session.scalar(select(User).where(User.name == "demo"))
        assert user is not None
        user.enabled = False
    with pytest.raises(Unauthorized):
        identity.validate(token)
    with pytest.raises(Unauthorized):
        identity.authenticate(password_body("demo", DEMO_PASSWORD, "demo"))


def test_create_user_is_idempotent_and_updates_password_and_roles(
    identity: IdentityService,
) -> None:
    identity.create_project("team")
    first = identity.create_user("ann", "pw-one", "team", ["member"])
    again = identity.create_user("ann", "pw-two", "team", ["reader"])
    assert first.id == again.id
    with pytest.raises(Unauthorized):
        identity.authenticate(password_body("ann", "pw-one", "team"))
    token, _ = identity.authenticate(password_body("ann", "pw-two", "team"))
    ctx = identity.validate(token)
    assert ctx.roles == {"reader"} and ctx.is_read_only
    assert identity.create_project("team").id == identity.create_project("team").id


@pytest.mark.parametrize(
    ("args", "error", "fragment"),
    [
        (("bob", "pw", "team", ["membr"]), ValidationError, "did you mean 'member'"),
        (("bob", "pw", "team", []), ValidationError, "at least one role"),
        (("bob", "", "team", ["member"]), ValidationError, "password must not be empty"),
        (("bad name", "pw", "team", ["member"]), ValidationError, "user name"),
        (("bob", "pw", "no-such-project", ["member"]), NotFound, "create it first"),
    ],
)
def test_create_user_validation(
    identity: IdentityService, args: tuple[Any, ...], error: type[Exception], fragment: str
) -> None:
    identity.create_project("team")
    with pytest.raises(error, match=fragment):
        identity.create_user(*args)
    with transaction(identity._session_factory) as session:
        assert session.scalar(select(User).where(User.name == "bob")) is None


def test_bootstrap_is_idempotent_and_resets_passwords(identity: IdentityService) -> None:
    identity.bootstrap("new-admin-pw", "new-demo-pw")
    with transaction(identity._session_factory) as session:
        assert len(session.scalars(select(User)).all()) == 2
        assert {p.name for p in session.scalars(select(Project))} == {"admin", "demo"}
    with pytest.raises(Unauthorized):
        identity.authenticate(password_body("admin", ADMIN_PASSWORD, "admin"))
    token, _ = identity.authenticate(password_body("admin", "new-admin-pw", "admin"))
    assert identity.validate(token).is_admin


def test_repr_hides_keys(identity: IdentityService) -> None:
    assert "kkkk" not in repr(identity)


# -- the /identity routes -----------------------------------------------------------------------


def test_identity_version_documents(api: ApiHarness) -> None:
    root = api.client.get("/identity/")
    assert root.status_code == 300
    (v3,) = root.json()["versions"]["values"]
    assert v3["id"].startswith("v3") and v3["status"] == "stable"
    doc = api.client.get("/identity/v3")
    assert doc.status_code == 200
    assert doc.json()["version"]["links"] == [
        {"rel": "self", "href": "http://testserver/identity/v3/"}
    ]
    assert api.client.get("/identity/v3/").json() == doc.json()


def test_token_issue_over_http(api: ApiHarness) -> None:
    resp = api.client.post(
        "/identity/v3/auth/tokens", json=password_body("demo", DEMO_PASSWORD, "demo")
    )
    assert resp.status_code == 201
    token = resp.headers["X-Subject-Token"]
    assert api.identity.validate(token).user_name == "demo"
    assert resp.headers["content-type"] == "application/json"
    assert resp.headers["X-Openstack-Request-Id"].startswith("req-")
    # The catalog follows the URL the client used when no public_endpoint is set.
    urls = [e["url"] for svc in resp.json()["token"]["catalog"] for e in svc["endpoints"]]
    assert f"http://testserver/v1.0/{resp.json()['token']['project']['id']}" in urls


def test_bad_password_over_http_is_keystone_shaped_401(api: ApiHarness) -> None:
    resp = api.client.post(
        "/identity/v3/auth/tokens", json=password_body("demo", "nope-pw", "demo")
    )
    assert resp.status_code == 401
    assert resp.headers["content-type"] == "application/json"
    error = resp.json()["error"]
    assert error["code"] == 401 and error["title"] == "Unauthorized"
    assert "password" in error["message"] and "nope-pw" not in resp.text
    assert "X-Subject-Token" not in resp.headers


def test_malformed_token_request_is_keystone_shaped_400(api: ApiHarness) -> None:
    resp = api.client.post(
        "/identity/v3/auth/tokens",
        content=b'{"auth": ',
        headers={"Content-Type": "application/json"},
    )
    assert resp.status_code == 400
    assert resp.json()["error"]["message"].startswith("Validation error: the request body is not")
    resp = api.client.post("/identity/v3/auth/tokens", json={"auth": {"identity": {}}})
    assert resp.status_code == 400 and resp.json()["error"]["title"] == "Bad Request"


def test_token_validation_route(api: ApiHarness) -> None:
    admin, _ = api.login("admin")
    demo, _ = api.login("demo")
    reader, _ = api.login("reader")
    path = "/identity/v3/auth/tokens"
    resp = api.client.get(path, headers={"X-Auth-Token": admin, "X-Subject-Token": demo})
    assert resp.status_code == 200 and resp.headers["X-Subject-Token"] == demo
    assert resp.json()["token"]["user"]["name"] == "demo"
    head = api.client.head(path, headers={"X-Auth-Token": demo, "X-Subject-Token": demo})
    assert head.status_code == 200 and head.content == b""
    assert (
        api.client.get(path, headers={"X-Auth-Token": admin, "X-Subject-Token": "junk"}).status_code
        == 404
    )
    assert api.client.get(path, headers={"X-Subject-Token": demo}).status_code == 401
    denied = api.client.get(path, headers={"X-Auth-Token": reader, "X-Subject-Token": demo})
    assert denied.status_code == 403 and "error" in denied.json()
