"""The validated-token cache: a token is checked against the control DB once per
``[identity] token_cache_time``; a change made through the same identity service applies at once,
one made by another process (here: another engine on the same SQLite file) within that bound;
an expired token is refused whatever the cache holds. Real SQLite, real app."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from api_fixtures import DEMO_PASSWORD, FAST_COST, ApiHarness, make_settings, password_body
from sqlalchemy import Engine, event, select, update

from coffer.db.models import Base, User
from coffer.db.session import make_engine, make_session_factory, transaction
from coffer.errors import Unauthorized
from coffer.identity import AuthContext, IdentityService
from coffer.identity.token_cache import TokenCache

KEY = b"t" * 32


class Clock:
    """A clock the test moves by hand (monotonic and wall time move together)."""

    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall = datetime.now(UTC).timestamp()

    def monotonic(self) -> float:
        return self.mono

    def time(self) -> float:
        return self.wall

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds


class Statements:
    """Counts the SQL statements an engine runs."""

    def __init__(self, engine: Engine) -> None:
        self.count = 0
        event.listen(engine, "before_cursor_execute", self._seen)

    def _seen(self, *_args: object) -> None:
        self.count += 1


@dataclass
class World:
    identity: IdentityService
    engine: Engine
    clock: Clock
    statements: Statements
    other_engine: Engine  # stands for another Coffer process on the same control DB


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    settings = make_settings(tmp_path)
    engine = make_engine(settings.database_url)
    other = make_engine(settings.database_url)
    try:
        Base.metadata.create_all(engine)
        clock = Clock()
        cache = TokenCache(5, clock=clock.monotonic, wall=clock.time)
        identity = IdentityService(
            make_session_factory(engine), KEY, settings, scrypt_cost=FAST_COST, token_cache=cache
        )
        identity.bootstrap("admin-pw", DEMO_PASSWORD)
        yield World(identity, engine, clock, Statements(engine), other)
    finally:
        engine.dispose()
        other.dispose()


def _demo_token(identity: IdentityService) -> str:
    token, _body = identity.authenticate(password_body("demo", DEMO_PASSWORD, "demo"))
    return token


def _disable_demo_elsewhere(world: World) -> None:
    with transaction(make_session_factory(world.other_engine)) as session:
        session.execute(update(User).where(User.name == "demo").values(enabled=False))


def test_a_validated_token_is_not_checked_again_within_the_cache_time(world: World) -> None:
    token = _demo_token(world.identity)
    first = world.identity.validate(token)
    before = world.statements.count
    for _ in range(5):
        assert world.identity.validate(token) == first
    assert world.statements.count == before  # answered from the cache
    world.clock.advance(5.01)
    assert world.identity.validate(token) == first
    assert world.statements.count > before  # checked against the control DB again


def test_a_change_made_by_another_process_applies_within_the_cache_time(world: World) -> None:
    token = _demo_token(world.identity)
    world.identity.validate(token)
    _disable_demo_elsewhere(world)
    world.clock.advance(4.9)
    world.identity.validate(token)  # still within the documented bound
    world.clock.advance(0.2)
    with pytest.raises(Unauthorized, match="disabled"):
        world.identity.validate(token)


def test_a_change_made_through_this_service_applies_at_once(world: World) -> None:
    world.identity.create_project("ops")
    world.identity.create_user("olga", "olga-pw", "ops", ["admin", "member"])
    token, _ = world.identity.authenticate(password_body("olga", "olga-pw", "ops"))
    assert world.identity.validate(token).roles == {"admin", "member"}
    world.identity.create_user("olga", "olga-pw", "ops", ["member"])  # admin taken away
    assert world.identity.validate(token).roles == {"member"}
    world.identity.create_user("olga", "olga-pw", "ops", ["reader"])
    with pytest.raises(Unauthorized, match="no longer has a role"):
        world.identity.validate(token)


def test_the_cache_never_outlives_the_token(world: World) -> None:
    token = _demo_token(world.identity)
    ctx = world.identity.validate(token)
    assert world.identity.recently_validated(token) == ctx
    world.clock.wall = ctx.expires_at.timestamp()  # the monotonic clock has not moved
    assert world.identity.recently_validated(token) is None
    before = world.statements.count
    world.identity.validate(token)  # a full check (its own expiry test reads the real clock)
    assert world.statements.count > before


def test_a_forged_token_is_never_cached(world: World) -> None:
    token = _demo_token(world.identity)
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    for _ in range(2):
        with pytest.raises(Unauthorized):
            world.identity.validate(forged)
    assert world.identity.recently_validated(forged) is None


def _ctx(name: str, expires_in: float = 3600) -> AuthContext:
    return AuthContext(
        user_id=name,
        user_name=name,
        project_id="p",
        project_name="p",
        roles=frozenset({"member"}),
        expires_at=datetime.now(UTC) + timedelta(seconds=expires_in),
    )


def test_the_cache_is_bounded_and_drops_the_oldest_entry() -> None:
    cache = TokenCache(60, max_entries=3)
    for name in ("a", "b", "c", "d"):
        cache.put(TokenCache.key(name), _ctx(name), cache.generation)
    assert len(cache) == 3
    assert cache.get(TokenCache.key("a")) is None
    newest = cache.get(TokenCache.key("d"))
    assert newest is not None and newest.user_id == "d"


def test_a_validation_that_raced_an_invalidation_is_not_stored() -> None:
    cache = TokenCache(60)
    generation = cache.generation  # read before the control DB was
    cache.invalidate()  # a change was committed meanwhile
    cache.put(TokenCache.key("a"), _ctx("a"), generation)
    assert cache.get(TokenCache.key("a")) is None
    cache.put(TokenCache.key("a"), _ctx("a"), cache.generation)
    assert cache.get(TokenCache.key("a")) is not None


def test_zero_cache_time_checks_every_time(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    settings.identity.token_cache_time = 0
    engine = make_engine(settings.database_url)
    try:
        Base.metadata.create_all(engine)
        identity = IdentityService(
            make_session_factory(engine), KEY, settings, scrypt_cost=FAST_COST
        )
        identity.bootstrap("admin-pw", DEMO_PASSWORD)
        token = _demo_token(identity)
        statements = Statements(engine)
        identity.validate(token)
        identity.validate(token)
        assert statements.count >= 2 * 3  # user, project and roles, both times
        assert identity.recently_validated(token) is None
    finally:
        engine.dispose()


def test_the_api_refuses_a_token_disabled_by_another_process_within_the_bound(
    tmp_path: Path,
) -> None:
    with ApiHarness.start(tmp_path) as api:
        token, project = api.login("demo")
        headers = {"X-Auth-Token": token}
        assert api.client.get(f"/v1.0/{project}/flavors", headers=headers).status_code == 200
        # Another process disables the user: this API answers from its cache for at most
        # token_cache_time seconds, then refuses.
        other = make_engine(api.settings.database_url)
        try:
            with transaction(make_session_factory(other)) as session:
                user = session.scalar(select(User).where(User.name == "demo"))
                assert user is not None
                user.enabled = False
        finally:
            other.dispose()
        bound = api.settings.identity.token_cache_time
        deadline = datetime.now(UTC) + timedelta(seconds=bound + 5)
        while datetime.now(UTC) < deadline:
            resp = api.client.get(f"/v1.0/{project}/flavors", headers=headers)
            if resp.status_code == 401:
                break
            time.sleep(0.05)
        assert resp.status_code == 401, resp.text
