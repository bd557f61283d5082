"""The hot reads (``GET /instances``, ``/instances/detail``, ``/instances/{id}``, ``/flavors``)
served by ``HotRoute`` answer exactly what their FastAPI routes answer, errors included, and
always what the control DB says now. Real app, real SQLite, two apps on one control DB: one
as ``create_app`` builds it, one with the hot routes taken out (the FastAPI routes alone)."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from api_fixtures import DEMO_PASSWORD, READER_PASSWORD, password_body
from sqlalchemy import Connection, create_engine, text, update

from coffer.api.app import Services, create_app
from coffer.api.context import LoopReader
from coffer.api.policy import Policy, PolicyDenied
from coffer.api.responses import HotRoute
from coffer.api.routes import instance_support
from coffer.catalog import create_flavor, register_datastore_version
from coffer.cli.bootstrap import identity_service
from coffer.config import load_settings
from coffer.controlplane import ControlPlane
from coffer.db.models import Base, Instance, InstanceFault, ServiceStatusRow, utcnow
from coffer.db.models_backups import Backup, BackupState
from coffer.db.models_day2 import Configuration
from coffer.db.session import transaction
from coffer.identity import AuthContext
from coffer.status import ServerStatus, ServiceStatus, Task

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*httpx2.*")
    from fastapi.testclient import TestClient


@dataclass
class Pair:
    """The same control DB behind the app with hot routes (``hot``) and without (``plain``)."""

    cp: ControlPlane
    hot: TestClient
    plain: TestClient
    hot_app: Any
    tokens: dict[str, tuple[str, str]]
    version_id: str
    #: ``(path, True)`` for each request a hot route answered, ``(path, False)`` if passed on.
    served: list[tuple[str, bool]]

    def both(self, user: str | None, path: str, method: str = "GET", **kw: Any) -> Any:
        """The hot app's response, after checking the plain app answers the same."""
        headers = dict(kw.pop("headers", {}))
        if user is not None:
            headers["X-Auth-Token"] = self.tokens[user][0]
        answers = [
            client.request(method, path, headers=headers, **kw) for client in (self.plain, self.hot)
        ]
        plain, hot = answers
        assert hot.status_code == plain.status_code, (hot.text, plain.text)
        assert hot.content == plain.content
        assert _headers(hot) == _headers(plain)
        return hot

    def project(self, user: str) -> str:
        return self.tokens[user][1]

    def add(self, count: int, project: str, **fields: Any) -> list[str]:
        ids = []
        now = utcnow()
        with transaction(self.cp.session_factory) as session:
            for n in range(count):
                values: dict[str, Any] = {
                    "task": Task.NONE,
                    "server_status": ServerStatus.ACTIVE,
                    "compute_ref": {"private": f"127.10.0.{n + 2}"},
                    **fields,
                }
                inst = Instance(
                    tenant_id=project,
                    name=f"i-{n:03d}",
                    flavor_id="1",
                    volume_size=1,
                    datastore_version_id=self.version_id,
                    encrypted_key="x",
                    created=now - timedelta(seconds=n),
                    **values,
                )
                session.add(inst)
                session.flush()
                session.add(ServiceStatusRow(instance_id=inst.id, status=ServiceStatus.HEALTHY))
                ids.append(inst.id)
        return ids


def _headers(resp: Any) -> dict[str, str]:
    return {k: v for k, v in resp.headers.items() if k.lower() != "x-openstack-request-id"}


def _watch_hot_routes(app: Any, served: list[tuple[str, bool]]) -> Any:
    for route in app.router.routes:
        if isinstance(route, HotRoute):
            route.endpoint = _watched(route.endpoint, served)
    return app


def _watched(endpoint: Any, served: list[tuple[str, bool]]) -> Any:
    async def watched(request: Any) -> Any:
        response = await endpoint(request)
        served.append((request.url.path, response is not None))
        return response

    return watched


def _without_hot_routes(app: Any) -> Any:
    app.router.routes[:] = [r for r in app.router.routes if not isinstance(r, HotRoute)]
    # And every view rendered afresh, to hold the hot app's remembered ones against.
    app.state.coffer_rendered_views = False
    return app


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    yield from _pair(tmp_path)


def _pair(tmp_path: Path, **default: Any) -> Iterator[Pair]:
    settings = load_settings(
        environ={},
        overrides={"DEFAULT": {"state_dir": str(tmp_path), "instances_page_size": 5, **default}},
    )
    cp = ControlPlane(settings, migrate_db=False)
    try:
        Base.metadata.create_all(cp.engine)
        identity = identity_service(cp)
        identity.bootstrap("admin-pass", DEMO_PASSWORD)
        identity.create_project("readers")
        identity.create_user("reader", READER_PASSWORD, "readers", ["reader"])
        with transaction(cp.session_factory) as session:
            version = register_datastore_version(session, "mariadb", "10.11", "mariadb")
            create_flavor(session, "1", "tiny", 256, 1)
            create_flavor(session, "2", "small", 1024, 2, 5)
            version_id = version.id
        services = Services(
            settings=settings, session_factory=cp.session_factory, identity=identity, rpc=cp
        )
        served: list[tuple[str, bool]] = []
        hot_app = _watch_hot_routes(create_app(services), served)
        assert sum(isinstance(r, HotRoute) for r in hot_app.router.routes) == 4
        with (
            TestClient(hot_app, raise_server_exceptions=False) as hot,
            TestClient(
                _without_hot_routes(create_app(services)), raise_server_exceptions=False
            ) as plain,
        ):
            tokens = {}
            for user, password, project in (
                ("admin", "admin-pass", "admin"),
                ("demo", DEMO_PASSWORD, "demo"),
                ("reader", READER_PASSWORD, "readers"),
            ):
                resp = hot.post(
                    "/identity/v3/auth/tokens", json=password_body(user, password, project)
                )
                assert resp.status_code == 201, resp.text
                tokens[user] = (
                    resp.headers["X-Subject-Token"],
                    resp.json()["token"]["project"]["id"],
                )
            yield Pair(cp, hot, plain, hot_app, tokens, version_id, served)
    finally:
        cp.close()


def test_lists_shows_and_flavors_are_the_same_bytes(pair: Pair) -> None:
    demo = pair.project("demo")
    ids = pair.add(7, demo)
    (building,) = pair.add(1, demo, task=Task.BUILDING, server_status=ServerStatus.BUILD)
    with transaction(pair.cp.session_factory) as session:
        group = Configuration(
            tenant_id=demo, name="tuned", datastore_version_id=pair.version_id, description=""
        )
        session.add(group)
        session.flush()
        session.get(Instance, ids[2]).configuration_id = group.id  # type: ignore[union-attr]
        failed = session.get(Instance, ids[3])
        assert failed is not None
        failed.server_status = ServerStatus.ERROR
        session.add(InstanceFault(instance_id=failed.id, message="it broke", details="trace"))
    base = f"/v1.0/{demo}"
    first = pair.both("demo", f"{base}/instances").json()
    assert len(first["instances"]) == 5 and first["links"][0]["rel"] == "next"
    marker = first["instances"][-1]["id"]
    rest = pair.both("demo", f"{base}/instances?marker={marker}").json()
    assert len(rest["instances"]) == 3 and "links" not in rest
    for path in (
        "instances/detail",
        "instances/detail?limit=2",
        f"instances/detail?limit=2&marker={ids[1]}",
        "instances?limit=3&include_clustered=false",
        "instances?limit=0",
        "instances?marker=no-such-instance",
        "instances?marker=",
        f"instances/{ids[2]}",
        f"instances/{ids[3]}",
        f"instances/{building}",
        "instances/no-such-instance",
        "flavors",
    ):
        pair.both("demo", f"{base}/{path}")
    assert pair.both("demo", f"{base}/instances/{ids[3]}").json()["instance"]["fault"]
    assert pair.both("demo", f"{base}/instances/{ids[2]}").json()["instance"]["configuration"]
    # Admins see any project's instances, with their admin fields.
    admin_view = pair.both("admin", f"/v1.0/{demo}/instances/{ids[0]}").json()["instance"]
    assert admin_view["tenant_id"] == demo
    pair.both("admin", f"/v1.0/{demo}/instances/detail")
    # Links follow the Host the client used.
    pair.both("demo", f"{base}/instances?limit=1", headers={"Host": "db.example:8779"})
    # Asked twice: the second answer came from the views rendered for the first.
    memo = pair.hot_app.state.coffer_rendered_views
    pair.both("demo", f"{base}/instances/{ids[0]}")
    hits = memo.hits
    pair.both("demo", f"{base}/instances?marker={marker}")
    pair.both("demo", f"{base}/instances/{ids[0]}")
    assert memo.hits == hits + 2
    # The first page shows an instance being built: never remembered.
    pair.both("demo", f"{base}/instances")
    assert memo.hits == hits + 2
    # The hot routes answered all of these themselves.
    answered = {path.removeprefix(base) for path, hot in pair.served if hot}
    assert not [path for path, hot in pair.served if not hot]
    assert {"/instances", "/instances/detail", f"/instances/{ids[2]}", "/flavors"} <= answered


def test_refusals_are_the_same(pair: Pair) -> None:
    demo = pair.project("demo")
    (inst,) = pair.add(1, demo)
    for path in ("instances", "instances/detail", f"instances/{inst}", "flavors"):
        assert pair.both(None, f"/v1.0/{demo}/{path}").status_code == 401
        bad = {"X-Auth-Token": "not-a-token"}
        assert pair.both(None, f"/v1.0/{demo}/{path}", headers=bad).status_code == 401
        # Another project's URL: 403 for a member, whatever the route.
        other = pair.project("reader")
        assert pair.both("demo", f"/v1.0/{other}/{path}").status_code == 403
    # Another project's instance is not found, even by its id.
    assert (
        pair.both("reader", f"/v1.0/{pair.project('reader')}/instances/{inst}").status_code == 404
    )


def test_unusual_query_strings_are_read_by_the_fastapi_route(pair: Pair) -> None:
    demo = pair.project("demo")
    pair.add(3, demo)
    for query in (
        "limit=abc",
        "limit=",
        "limit=2&limit=1",
        "limit=007",
        "limit=%202",
        "limit=99999999999999999999",
        "limit=-1",
        "marker=a&marker=b",
    ):
        for path in ("instances", "instances/detail"):
            pair.both("demo", f"/v1.0/{demo}/{path}?{query}")
    # Each went on to the FastAPI route.
    assert pair.served and not [path for path, hot in pair.served if hot]
    refused = pair.both("demo", f"/v1.0/{demo}/instances?limit=abc")
    assert refused.status_code == 400
    assert refused.json()["badRequest"]["message"].startswith("Validation error")


def test_other_methods_and_the_openapi_document_are_unchanged(pair: Pair) -> None:
    demo = pair.project("demo")
    (inst,) = pair.add(1, demo)
    pair.both("demo", f"/v1.0/{demo}/instances", method="POST", json={"instance": {}})
    pair.both("demo", f"/v1.0/{demo}/flavors", method="DELETE")
    pair.both("demo", f"/v1.0/{demo}/instances/{inst}", method="HEAD")
    pair.both("reader", f"/v1.0/{demo}/instances/{inst}", method="DELETE")
    pair.both("demo", f"/v1.0/{demo}/instances/", method="GET")
    pair.both("demo", f"/v1.0/{demo}/flavors/2")
    assert pair.hot.get("/openapi.json").json() == pair.plain.get("/openapi.json").json()


def test_what_another_process_writes_shows_at_once(pair: Pair) -> None:
    demo = pair.project("demo")
    (inst,) = pair.add(1, demo)
    path = f"/v1.0/{demo}/instances/{inst}"
    assert pair.both("demo", path).json()["instance"]["status"] == "ACTIVE"
    assert pair.both("demo", f"/v1.0/{demo}/instances").json()["instances"][0]["name"] == "i-000"
    # Another process (a conductor, a manage command) writes through its own engine.
    other = create_engine(pair.cp.settings.database_url)
    try:
        with other.begin() as conn:
            conn.execute(
                update(ServiceStatusRow)
                .where(ServiceStatusRow.instance_id == inst)
                .values(status=ServiceStatus.SHUTDOWN, updated_at=utcnow())
            )
            conn.execute(update(Instance).where(Instance.id == inst).values(name="renamed"))
        view = pair.both("demo", path).json()["instance"]
        assert (view["status"], view["name"]) == ("SHUTDOWN", "renamed")
        listed = pair.both("demo", f"/v1.0/{demo}/instances").json()["instances"][0]
        assert (listed["status"], listed["name"]) == ("SHUTDOWN", "renamed")
        with other.begin() as conn:
            conn.execute(text("UPDATE flavors SET ram = 2048 WHERE id = '1'"))
        flavors = pair.both("demo", f"/v1.0/{demo}/flavors").json()["flavors"]
        assert {f["id"]: f["ram"] for f in flavors}["1"] == 2048
        with other.begin() as conn:
            conn.execute(update(Instance).where(Instance.id == inst).values(deleted=True))
        assert pair.both("demo", path).status_code == 404
        assert pair.both("demo", f"/v1.0/{demo}/instances").json()["instances"] == []
    finally:
        other.dispose()


def test_a_quiet_guest_is_reported_as_soon_as_its_heartbeat_expires(pair: Pair) -> None:
    demo = pair.project("demo")
    (inst,) = pair.add(1, demo)
    expiry = pair.cp.settings.default.agent_heartbeat_expiry
    path = f"/v1.0/{demo}/instances/{inst}"
    assert pair.both("demo", path).json()["instance"]["operating_status"] == "HEALTHY"
    with transaction(pair.cp.session_factory) as session:
        row = session.get(ServiceStatusRow, inst)
        assert row is not None
        row.updated_at = utcnow() - timedelta(seconds=expiry + 5)
    view = pair.both("demo", path).json()["instance"]
    assert view["status"] == "ERROR"
    assert pair.both("demo", f"/v1.0/{demo}/instances").json()["instances"][0]["status"] == "ERROR"


def test_remembered_views_expire_with_the_heartbeat(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    demo = pair.project("demo")
    (inst,) = pair.add(1, demo)
    for path in (f"/v1.0/{demo}/instances/{inst}", f"/v1.0/{demo}/instances"):
        assert "ERROR" not in pair.both("demo", path).text
        assert "ERROR" not in pair.both("demo", path).text  # remembered now
    # Nothing is written, but time passes beyond the heartbeat expiry.
    later = utcnow() + timedelta(seconds=pair.cp.settings.default.agent_heartbeat_expiry + 5)
    monkeypatch.setattr(instance_support, "utcnow", lambda: later)
    assert pair.both("demo", f"/v1.0/{demo}/instances/{inst}").json()["instance"]["status"] == (
        "ERROR"
    )
    assert pair.both("demo", f"/v1.0/{demo}/instances").json()["instances"][0]["status"] == "ERROR"


def test_policy_rate_limits_and_policy_files_apply(tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text('"flavor:index": "rule:admin"\n')
    for pair in _pair(tmp_path, http_get_rate=4):
        demo = pair.project("demo")
        denied = pair.both("demo", f"/v1.0/{demo}/flavors")
        assert denied.status_code == 403 and "flavor:index" in denied.text
        assert pair.both("admin", f"/v1.0/{demo}/flavors").status_code == 200
        # Each app counts its own requests: a project's fifth GET in a minute is refused.
        for _ in range(3):
            pair.both("demo", f"/v1.0/{demo}/instances")
        limited = pair.both("demo", f"/v1.0/{demo}/instances")
        assert limited.status_code == 413
        assert limited.headers["Retry-After"]
        assert limited.json()["overLimit"]["retryAfter"]


def _auth(roles: set[str], project: str = "p1") -> AuthContext:
    return AuthContext(
        user_id="u1",
        user_name="someone",
        project_id=project,
        project_name="project",
        roles=frozenset(roles),
        expires_at=utcnow() + timedelta(hours=1),
    )


def test_remembered_policy_decisions_follow_the_roles() -> None:
    policy = Policy()
    policy.enforce_on_project("instance:create", "p1", _auth({"member"}))
    policy.enforce_on_project("instance:create", "p1", _auth({"member"}))
    # The same user with only the reader role now: refused, and refused again.
    for _ in range(2):
        with pytest.raises(PolicyDenied):
            policy.enforce_on_project("instance:create", "p1", _auth({"reader"}))
    # Another project in the URL: refused for a member, allowed for an admin.
    with pytest.raises(PolicyDenied):
        policy.enforce_on_project("instance:create", "p2", _auth({"member"}))
    policy.enforce_on_project("instance:create", "p2", _auth({"admin"}))


def test_loop_reader_sees_new_commits_and_never_shares_its_connection(pair: Pair) -> None:
    reader = LoopReader(pair.cp.engine)
    try:

        def count(conn: Connection) -> int:
            return int(conn.execute(text("SELECT count(*) FROM instances")).scalar_one())

        assert reader.run(count) == 0
        pair.add(2, pair.project("demo"))
        assert reader.run(count) == 2
        # A read while another holds the loop's connection gets one of its own.
        assert reader.run(lambda outer: reader.run(lambda inner: inner is not outer))
        seen: list[bool] = []

        def hold(conn: Connection) -> None:
            thread = threading.Thread(target=lambda: seen.append(reader.run(lambda c: c is conn)))
            thread.start()
            thread.join()

        reader.run(hold)
        assert seen == [False]
        # A failed read leaves the connection usable.
        with pytest.raises(Exception, match="no such table"):
            reader.run(lambda conn: conn.execute(text("SELECT * FROM no_such_table")))
        assert reader.run(count) == 2
    finally:
        reader.close()


def test_a_short_page_reads_fewer_columns_and_answers_the_same_bytes(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``GET /instances`` reads only the columns its short views show (through the driver's
    cursor for a first page on SQLite); its bytes are those the detail columns render to."""
    demo = pair.project("demo")
    ids = pair.add(
        4,
        demo,
        access={"is_public": True, "allowed_cidrs": ["10.0.0.0/8"]},
        compute_ref={"private": "127.10.0.9", "public": "192.0.2.9"},
        volume_used_bytes=123456789,
        volume_total_bytes=987654321,
    )
    with transaction(pair.cp.session_factory) as session:
        session.add(
            Backup(
                tenant_id=demo,
                name="running",
                instance_id=ids[0],
                datastore_version_id=pair.version_id,
                state=BackupState.BUILDING,
                storage_driver="local",
                storage_key="k",
            )
        )
        status = session.get(ServiceStatusRow, ids[1])
        assert status is not None
        status.updated_at = utcnow() - timedelta(days=1)  # a guest gone quiet
        status = session.get(ServiceStatusRow, ids[2])
        session.delete(status)  # no status reported yet
    base = f"/v1.0/{demo}"
    with pair.cp.engine.connect() as conn:
        rows = instance_support.page_values(conn, demo, 10, detail=False)
    assert [type(row) for row in rows] == [instance_support._ShortValues] * 4
    paths = [
        ("demo", f"{base}/instances"),
        ("demo", f"{base}/instances?limit=2"),
        ("demo", f"{base}/instances?limit=2&marker={ids[1]}"),
        ("admin", f"{base}/instances"),
    ]
    pair.hot_app.state.coffer_rendered_views = False
    short = [pair.both(user, path).content for user, path in paths]
    assert b'"status":"BACKUP"' in short[0]
    # The same pages, read with every column of the detail view.
    monkeypatch.setitem(instance_support._PAGES, False, instance_support._PAGES[True])
    monkeypatch.setattr(instance_support, "_SHORT_SHAPE", instance_support._DETAIL_SHAPE)
    monkeypatch.setattr(instance_support, "_short_page_reader", lambda _db: None)
    assert [pair.both(user, path).content for user, path in paths] == short
