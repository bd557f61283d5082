"""Instance lists page newest-first through every instance exactly once (real app, SQLite)."""

from __future__ import annotations

import warnings
from datetime import timedelta
from pathlib import Path

from coffer.api.app import Services, create_app
from coffer.catalog import create_flavor, register_datastore_version
from coffer.cli.bootstrap import identity_service
from coffer.config import load_settings
from coffer.controlplane import ControlPlane
from coffer.db.models import Instance, utcnow
from coffer.db.session import transaction

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient


def test_pages_cover_every_instance_once(tmp_path: Path) -> None:
    settings = load_settings(environ={}, overrides={"DEFAULT": {"state_dir": str(tmp_path)}})
    cp = ControlPlane(settings)
    try:
        identity = identity_service(cp)
        identity.bootstrap("admin-pass", "demo-pass")
        with transaction(cp.session_factory) as session:
            version = register_datastore_version(session, "mariadb", "10.11", "mariadb")
            create_flavor(session, "1", "tiny", 256, 1)
            version_id = version.id
        app = create_app(
            Services(
                settings=settings, session_factory=cp.session_factory, identity=identity, rpc=cp
            )
        )
        client = TestClient(app)
        body = {
            "auth": {
                "identity": {
                    "methods": ["password"],
                    "password": {
                        "user": {
                            "name": "demo",
                            "domain": {"id": "default"},
                            "password": "demo-pass",
                        }
                    },
                },
                "scope": {"project": {"name": "demo", "domain": {"id": "default"}}},
            }
        }
        resp = client.post("/identity/v3/auth/tokens", json=body)
        token = resp.headers["X-Subject-Token"]
        project = resp.json()["token"]["project"]["id"]
        now = utcnow()
        with transaction(cp.session_factory) as session:
            for n in range(45):
                # Several share a timestamp, so the id breaks ties.
                session.add(
                    Instance(
                        tenant_id=project,
                        name=f"i{n:02d}",
                        flavor_id="1",
                        volume_size=1,
                        datastore_version_id=version_id,
                        encrypted_key="x",
                        created=now - timedelta(seconds=n // 3),
                    )
                )
        headers = {"X-Auth-Token": token}
        seen: list[str] = []
        url: str | None = f"/v1.0/{project}/instances?limit=10"
        pages = 0
        while url:
            resp = client.get(url, headers=headers)
            assert resp.status_code == 200, resp.text
            page = resp.json()
            seen += [i["name"] for i in page["instances"]]
            pages += 1
            nexts = [link["href"] for link in page.get("links", []) if link["rel"] == "next"]
            url = nexts[0].split("testserver", 1)[1] if nexts else None
        assert pages == 5
        assert len(seen) == 45 and len(set(seen)) == 45
        ages = [int(name[1:]) // 3 for name in seen]
        assert ages == sorted(ages), "newest first"
        resp = client.get(f"/v1.0/{project}/instances?marker=not-an-id", headers=headers)
        assert resp.status_code == 400
    finally:
        cp.close()
