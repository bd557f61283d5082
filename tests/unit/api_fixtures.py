"""A real Coffer API on a SQLite file, for unit tests: ``ApiHarness``.

Not a conftest: test modules build their own fixtures from it, e.g.

    @pytest.fixture
    def api(tmp_path):
        with ApiHarness.start(tmp_path) as harness:
            yield harness
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from coffer.api.app import Services, create_app
from coffer.config import Settings, load_settings
from coffer.db.models import Base
from coffer.db.session import make_engine, make_session_factory
from coffer.identity import IdentityService
from coffer.identity.passwords import ScryptCost

with warnings.catch_warnings():
    # Starlette 1.x prefers the httpx2 package and warns when it falls back to httpx; the client
    # works the same with either, and pytest turns warnings into errors.
    warnings.filterwarnings("ignore", message=".*httpx2.*")
    from fastapi.testclient import TestClient

ADMIN_PASSWORD = "admin-secret-pw"
DEMO_PASSWORD = "demo-secret-pw"
READER_PASSWORD = "reader-secret-pw"
#: Cheap hashing so each test does not spend a second on scrypt; the default cost has its own test.
FAST_COST = ScryptCost(n=2**4, r=8, p=1)


def make_settings(tmp_path: Path, **default: Any) -> Settings:
    return load_settings(
        environ={},
        overrides={
            "DEFAULT": {"state_dir": str(tmp_path), **default},
            "database": {"connection": f"sqlite:///{tmp_path / 'coffer.db'}"},
        },
    )


def password_body(
    user: str, password: str, project: str | None, domain: dict[str, str] | None = None
) -> dict[str, Any]:
    """A Keystone v3 password-auth request body, scoped to ``project`` by name when given."""
    dom = domain or {"name": "Default"}
    auth: dict[str, Any] = {
        "identity": {
            "methods": ["password"],
            "password": {"user": {"name": user, "domain": dom, "password": password}},
        }
    }
    if project is not None:
        auth["scope"] = {"project": {"name": project, "domain": dom}}
    return {"auth": auth}


@dataclass
class ApiHarness:
    """The app, a TestClient, the services, and cached tokens for admin, demo and reader."""

    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
    identity: IdentityService
    services: Services
    client: TestClient
    _tokens: dict[str, tuple[str, str]] = field(default_factory=dict)

    @classmethod
    @contextmanager
    def start(cls, tmp_path: Path, **default: Any) -> Iterator[ApiHarness]:
        settings = make_settings(tmp_path, **default)
        engine = make_engine(settings.database_url)
        try:
            Base.metadata.create_all(engine)
            factory = make_session_factory(engine)
            identity = IdentityService(factory, os.urandom(32), settings, scrypt_cost=FAST_COST)
            identity.bootstrap(ADMIN_PASSWORD, DEMO_PASSWORD)
            identity.create_project("readers")
            identity.create_user("reader", READER_PASSWORD, "readers", ["reader"])
            services = Services(settings=settings, session_factory=factory, identity=identity)
            app = create_app(services)
            with TestClient(app, raise_server_exceptions=False) as client:
                yield cls(settings, engine, factory, identity, services, client)
        finally:
            engine.dispose()

    def login(self, user: str) -> tuple[str, str]:
        """(token, project id) for ``admin``, ``demo`` or ``reader``; cached per harness."""
        if user not in self._tokens:
            password, project = {
                "admin": (ADMIN_PASSWORD, "admin"),
                "demo": (DEMO_PASSWORD, "demo"),
                "reader": (READER_PASSWORD, "readers"),
            }[user]
            resp = self.client.post(
                "/identity/v3/auth/tokens", json=password_body(user, password, project)
            )
            assert resp.status_code == 201, resp.text
            self._tokens[user] = (
                resp.headers["X-Subject-Token"],
                resp.json()["token"]["project"]["id"],
            )
        return self._tokens[user]

    def request(
        self, method: str, user: str, path: str, project: str | None = None, **kwargs: Any
    ) -> Any:
        """``method`` on ``/v1.0/<project>/<path>`` as ``user`` (project defaults to the user's)."""
        token, own = self.login(user)
        headers = {"X-Auth-Token": token, **kwargs.pop("headers", {})}
        url = f"/v1.0/{project or own}/{path.lstrip('/')}"
        return self.client.request(method, url, headers=headers, **kwargs)
