"""The catalogue: datastores, versions and flavors, as functions and as Trove routes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from api_fixtures import ApiHarness
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from coffer import catalog
from coffer.db.models import Datastore, DatastoreVersion, Flavor, Instance
from coffer.db.session import transaction
from coffer.errors import BadRequest, Conflict, NotFound, ValidationError


@pytest.fixture
def api(tmp_path: Path) -> Iterator[ApiHarness]:
    with ApiHarness.start(tmp_path) as harness:
        yield harness


@pytest.fixture
def session(api: ApiHarness) -> Iterator[Session]:
    with transaction(api.session_factory) as s:
        yield s


def _seed(api: ApiHarness) -> dict[str, str]:
    """mariadb 10.11 (default) + 10.6 (inactive), postgresql 15; redis with only an inactive
    version; two flavors. Returns the ids."""
    with transaction(api.session_factory) as s:
        v1011 = catalog.register_datastore_version(
            s, "mariadb", "10.11", "mariadb", version="10.11.6", default=True
        )
        v106 = catalog.register_datastore_version(s, "mariadb", "10.6", "mariadb", active=False)
        pg = catalog.register_datastore_version(s, "postgresql", "15", "postgresql")
        rd = catalog.register_datastore_version(s, "redis", "7.0", "redis", active=False)
        catalog.create_flavor(s, "m1.small", "m1.small", ram=1024, vcpus=1, disk=10)
        catalog.create_flavor(s, "7", "tiny", ram=256, vcpus=1)
        return {
            "10.11": v1011.id,
            "10.6": v106.id,
            "pg15": pg.id,
            "redis": rd.id,
            "mariadb": v1011.datastore_id,
        }


def _count(session: Session, model: type[Any]) -> int:
    return int(session.scalar(select(func.count()).select_from(model)) or 0)


# -- catalogue functions ------------------------------------------------------------------------


def test_register_version_is_an_idempotent_upsert(api: ApiHarness) -> None:
    with transaction(api.session_factory) as s:
        first = catalog.register_datastore_version(s, "mariadb", "10.11", "mariadb")
        again = catalog.register_datastore_version(
            s, "mariadb", "10.11", "mysql", image_tags=["trove"], packages="a, b", default=True
        )
        assert first.id == again.id
        assert (again.manager, again.image_tags, again.packages) == ("mysql", ["trove"], ["a", "b"])
        assert again.version == "10.11"
        assert _count(s, Datastore) == 1 and _count(s, DatastoreVersion) == 1
        ds = s.get(Datastore, again.datastore_id)
        assert ds is not None and ds.default_version_id == again.id
        # A different version number under the same name is another row (Trove's key).
        other = catalog.register_datastore_version(s, "mariadb", "10.11", "mariadb", "10.11.9")
        assert other.id != first.id


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"manager": "mariadbb"}, "did you mean 'mariadb'"),
        ({"manager": "oracle"}, "the managers are mariadb, mysql, postgresql, redis"),
        ({"datastore": "my store"}, "datastore name"),
        ({"datastore": "versions"}, "reserved"),
        ({"name": ""}, "version name"),
        ({"image_tags": ["a"] * 2}, "image_tags"),
        ({"image_tags": ["x" * 21]}, "image tag"),
        ({"active": False, "default": True}, "cannot be the default while inactive"),
    ],
)
def test_register_version_validates_before_writing(
    session: Session, kwargs: dict[str, Any], fragment: str
) -> None:
    args: dict[str, Any] = {"datastore": "mariadb", "name": "10.11", "manager": "mariadb"}
    args.update(kwargs)
    with pytest.raises(ValidationError, match=fragment):
        catalog.register_datastore_version(session, **args)
    assert _count(session, Datastore) == 0 and _count(session, DatastoreVersion) == 0


def test_flavors_create_update_and_find(session: Session) -> None:
    made = catalog.create_flavor(session, "m1.medium", "m1.medium", ram=4096, vcpus=2, disk=20)
    again = catalog.create_flavor(session, "m1.medium", "m1.medium", ram=8192, vcpus=4)
    assert made.id == again.id and again.ram == 8192 and _count(session, Flavor) == 1
    assert catalog.find_flavor(session, "m1.medium").vcpus == 4
    assert catalog.find_flavor(session, "http://h:8779/v1.0/p/flavors/m1.medium").id == "m1.medium"
    catalog.create_flavor(session, "3", "numeric", ram=512, vcpus=1)
    assert catalog.find_flavor(session, 3).name == "numeric"
    with pytest.raises(NotFound, match=r"'m1\.large' was not found"):
        catalog.find_flavor(session, "m1.large")
    with pytest.raises(Conflict, match="already named"):
        catalog.create_flavor(session, "other", "m1.medium", ram=512, vcpus=1)
    for bad in ({"ram": 0}, {"vcpus": 0}, {"disk": -1}, {"ram": True}):
        args: dict[str, Any] = {"ram": 512, "vcpus": 1, "disk": 0, **bad}
        with pytest.raises(ValidationError):
            catalog.create_flavor(session, "new", "new", **args)
    with pytest.raises(ValidationError, match="flavor id"):
        catalog.create_flavor(session, "a/b", "slash", ram=512, vcpus=1)
    assert _count(session, Flavor) == 2


def test_resolve_datastore_version_rules(api: ApiHarness) -> None:
    ids = _seed(api)
    with transaction(api.session_factory) as s:
        resolve = catalog.resolve_datastore_version
        assert resolve(s, "mariadb", None).id == ids["10.11"]  # the default
        assert resolve(s, "mariadb", "10.11").id == ids["10.11"]  # by name
        assert resolve(s, ids["mariadb"], ids["10.11"]).id == ids["10.11"]  # ids
        assert resolve(s, None, ids["pg15"]).id == ids["pg15"]  # version id alone
        assert resolve(s, "mariadb", None, "10.11.6").id == ids["10.11"]
        with pytest.raises(BadRequest, match="exactly one datastore exists, and there are 2"):
            resolve(s, None, None)
        with pytest.raises(BadRequest, match="not active"):
            resolve(s, "mariadb", "10.6")
        with pytest.raises(BadRequest, match="no default version"):
            resolve(s, "postgresql", None)
        with pytest.raises(NotFound, match="did you mean 'mariadb'"):
            resolve(s, "mariadbb", None)
        with pytest.raises(NotFound, match=r"no version '11\.0'"):
            resolve(s, "mariadb", "11.0")
        catalog.register_datastore_version(s, "mariadb", "10.11", "mariadb", "10.11.9")
        with pytest.raises(BadRequest, match=r"several versions named '10\.11'"):
            resolve(s, "mariadb", "10.11")
        assert resolve(s, "mariadb", "10.11", "10.11.9").version == "10.11.9"


def test_resolve_without_type_when_one_datastore(session: Session) -> None:
    only = catalog.register_datastore_version(session, "redis", "7.0", "redis", default=True)
    assert catalog.resolve_datastore_version(session, None, None).id == only.id
    assert catalog.resolve_datastore_version(session, None, "7.0").id == only.id


# -- flavor routes ------------------------------------------------------------------------------


def test_flavor_list_and_show(api: ApiHarness) -> None:
    _seed(api)
    _, project = api.login("demo")
    flavors = api.request("GET", "demo", "flavors").json()["flavors"]
    assert [f["id"] for f in flavors] == ["7", "m1.small"]  # ordered by RAM
    small = flavors[1]
    assert small == {
        "id": "m1.small",
        "str_id": "m1.small",
        "name": "m1.small",
        "ram": 1024,
        "vcpus": 1,
        "disk": 10,
        "ephemeral": 0,
        "links": [
            {"rel": "self", "href": f"http://testserver/v1.0/{project}/flavors/m1.small"},
            {"rel": "bookmark", "href": "http://testserver/flavors/m1.small"},
        ],
    }
    shown = api.request("GET", "demo", "flavors/7").json()["flavor"]
    assert shown["id"] == "7" and isinstance(shown["id"], str) and shown["name"] == "tiny"
    missing = api.request("GET", "demo", "flavors/tiny")  # names are not ids
    assert missing.status_code == 404 and "itemNotFound" in missing.json()


def test_empty_lists_are_objects(api: ApiHarness) -> None:
    assert api.request("GET", "demo", "flavors").json() == {"flavors": []}
    assert api.request("GET", "demo", "datastores").json() == {"datastores": []}


# -- datastore routes ---------------------------------------------------------------------------


def test_datastore_list_hides_inactive_from_non_admins(api: ApiHarness) -> None:
    ids = _seed(api)
    public = api.request("GET", "demo", "datastores").json()["datastores"]
    assert [d["name"] for d in public] == ["mariadb", "postgresql"]  # redis has no active one
    mariadb = public[0]
    assert [v["name"] for v in mariadb["versions"]] == ["10.11"]
    assert mariadb["default_version"] == ids["10.11"]
    assert set(mariadb["versions"][0]) == {"id", "name", "version", "links"}
    assert "default_version" not in public[1]

    admin = api.request("GET", "admin", "datastores").json()["datastores"]
    assert [d["name"] for d in admin] == ["mariadb", "postgresql", "redis"]
    admin_versions = {v["name"]: v for v in admin[0]["versions"]}
    assert set(admin_versions) == {"10.11", "10.6"}
    assert admin_versions["10.6"]["active"] is False
    assert admin_versions["10.11"]["image_tags"] == [] and "packages" in admin_versions["10.11"]


def test_datastore_show_by_id_or_name(api: ApiHarness) -> None:
    ids = _seed(api)
    by_name = api.request("GET", "demo", "datastores/mariadb").json()["datastore"]
    by_id = api.request("GET", "demo", f"datastores/{ids['mariadb']}").json()["datastore"]
    assert by_name == by_id and by_name["id"] == ids["mariadb"]
    assert api.request("GET", "demo", "datastores/redis").status_code == 404
    assert api.request("GET", "admin", "datastores/redis").status_code == 200
    missing = api.request("GET", "demo", "datastores/mariadbb")
    assert missing.status_code == 404
    assert "did you mean 'mariadb'" in missing.json()["itemNotFound"]["message"]


def test_version_routes(api: ApiHarness) -> None:
    ids = _seed(api)
    versions = api.request("GET", "demo", "datastores/mariadb/versions").json()["versions"]
    assert [(v["name"], v["version"]) for v in versions] == [("10.11", "10.11.6")]
    assert versions[0]["datastore"] == ids["mariadb"]
    admin_versions = api.request("GET", "admin", "datastores/mariadb/versions").json()
    assert len(admin_versions["versions"]) == 2

    by_name = api.request("GET", "demo", "datastores/mariadb/versions/10.11").json()["version"]
    by_id = api.request("GET", "demo", f"datastores/mariadb/versions/{ids['10.11']}").json()
    by_uuid = api.request("GET", "demo", f"datastores/versions/{ids['10.11']}").json()
    assert by_name == by_id["version"] == by_uuid["version"]
    assert by_name["links"][0]["href"].endswith(f"/datastores/versions/{ids['10.11']}")

    assert api.request("GET", "demo", "datastores/mariadb/versions/10.6").status_code == 404
    assert api.request("GET", "demo", f"datastores/versions/{ids['10.6']}").status_code == 404
    assert api.request("GET", "admin", f"datastores/versions/{ids['10.6']}").status_code == 200
    assert api.request("GET", "demo", "datastores/versions/nope").status_code == 404

    flavors = api.request("GET", "demo", "datastores/mariadb/versions/10.11/flavors").json()
    assert {f["id"] for f in flavors["flavors"]} == {"7", "m1.small"}
    assert api.request("GET", "demo", "datastores/mariadb/versions/9/flavors").status_code == 404


# -- mgmt datastore-versions --------------------------------------------------------------------


def _create_body(**overrides: Any) -> dict[str, Any]:
    # Exactly what `openstack datastore version create` sends.
    version: dict[str, Any] = {
        "name": "5.7.29",
        "datastore_name": "mysql",
        "datastore_manager": "mysql",
        "image_tags": ["trove", "mysql"],
        "packages": [],
        "active": True,
        "default": True,
        "version": "5.7.29",
    }
    version.update(overrides)
    return {"version": version}


def test_mgmt_create_answers_202_with_empty_body(api: ApiHarness) -> None:
    resp = api.request("POST", "admin", "mgmt/datastore-versions", json=_create_body())
    assert resp.status_code == 202
    assert resp.content == b""
    listed = api.request("GET", "admin", "mgmt/datastore-versions").json()["versions"]
    (row,) = listed
    assert row["datastore_name"] == "mysql" and row["datastore_manager"] == "mysql"
    assert row["image_tags"] == ["trove", "mysql"] and row["default"] is True
    assert row["active"] is True and row["version"] == "5.7.29"
    # Created the datastore too, visible to ordinary users with its default version.
    (ds,) = api.request("GET", "demo", "datastores").json()["datastores"]
    assert ds["name"] == "mysql" and ds["default_version"] == row["id"]
    again = api.request("POST", "admin", "mgmt/datastore-versions", json=_create_body())
    assert again.status_code == 202
    assert len(api.request("GET", "admin", "mgmt/datastore-versions").json()["versions"]) == 1


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"version": {"name": "1"}}, "version.datastore_name: Field required"),
        (_create_body(datastore_manager="mysqll"), "did you mean 'mysql'"),
        (_create_body(active="true"), "version.active"),
        (_create_body(flavor="x"), "version.flavor: Extra inputs are not permitted"),
        (_create_body(name=5), "version.name"),
        (_create_body(image_tags=["a", "b", "c", "d", "e", "f"]), "image_tags"),
        ({}, "version: Field required"),
    ],
)
def test_mgmt_create_validation(api: ApiHarness, body: dict[str, Any], fragment: str) -> None:
    resp = api.request("POST", "admin", "mgmt/datastore-versions", json=body)
    assert resp.status_code == 400
    message = resp.json()["badRequest"]["message"]
    assert fragment in message
    assert api.request("GET", "admin", "mgmt/datastore-versions").json() == {"versions": []}
    assert api.request("GET", "admin", "datastores").json() == {"datastores": []}


def test_mgmt_routes_are_admin_only(api: ApiHarness) -> None:
    ids = _seed(api)
    calls: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", "mgmt/datastore-versions", {}),
        ("POST", "mgmt/datastore-versions", {"json": _create_body()}),
        ("GET", f"mgmt/datastore-versions/{ids['10.11']}", {}),
        ("PATCH", f"mgmt/datastore-versions/{ids['10.11']}", {"json": {"active": False}}),
        ("DELETE", f"mgmt/datastore-versions/{ids['10.11']}", {}),
    ]
    for method, path, kwargs in calls:
        resp = api.request(method, "demo", path, **kwargs)
        assert resp.status_code == 403, (method, path)
        assert "forbidden" in resp.json()
    assert len(api.request("GET", "admin", "mgmt/datastore-versions").json()["versions"]) == 4


def test_mgmt_show_patch_and_delete(api: ApiHarness) -> None:
    ids = _seed(api)
    path = f"mgmt/datastore-versions/{ids['10.6']}"
    shown = api.request("GET", "admin", path).json()["version"]
    assert shown["name"] == "10.6" and shown["active"] is False and shown["default"] is False

    edit = api.request(
        "PATCH",
        "admin",
        path,
        json={"active": True, "default": True, "image_tags": ["t"], "name": "10.6-lts"},
    )
    assert edit.status_code == 202 and edit.content == b""
    shown = api.request("GET", "admin", path).json()["version"]
    assert (shown["name"], shown["active"], shown["default"]) == ("10.6-lts", True, True)
    assert shown["image_tags"] == ["t"]
    ds = api.request("GET", "demo", "datastores/mariadb").json()["datastore"]
    assert ds["default_version"] == ids["10.6"]

    bad = api.request("PATCH", "admin", path, json={"datastore_manager": "postgres"})
    assert bad.status_code == 400 and "did you mean 'postgresql'" in bad.text
    with transaction(api.session_factory) as s:
        catalog.register_datastore_version(s, "mariadb", "10.6-old", "mariadb", version="10.6")
    clash = api.request("PATCH", "admin", path, json={"name": "10.6-old", "active": False})
    assert clash.status_code == 409 and "choose another name" in clash.text
    assert api.request("GET", "admin", path).json()["version"]["active"] is True  # unchanged

    # Disabling the default version clears the datastore's default.
    assert api.request("PATCH", "admin", path, json={"active": False}).status_code == 202
    ds = api.request("GET", "admin", "datastores/mariadb").json()["datastore"]
    assert "default_version" not in ds

    gone = api.request("DELETE", "admin", path)
    assert gone.status_code == 202 and gone.content == b""
    assert api.request("GET", "admin", path).status_code == 404
    assert api.request("DELETE", "admin", path).status_code == 404


def test_mgmt_delete_refused_while_instances_use_the_version(api: ApiHarness) -> None:
    ids = _seed(api)
    with transaction(api.session_factory) as s:
        s.add(
            Instance(
                id="inst-1",
                tenant_id="p",
                name="db1",
                flavor_id="7",
                volume_size=1,
                datastore_version_id=ids["10.11"],
                encrypted_key="sealed",
            )
        )
    path = f"mgmt/datastore-versions/{ids['10.11']}"
    live = api.request("DELETE", "admin", path)
    assert live.status_code == 409
    assert "used by 1 instance" in live.json()["conflict"]["message"]

    with transaction(api.session_factory) as s:
        inst = s.get(Instance, "inst-1")
        assert inst is not None
        inst.deleted = True
    dead = api.request("DELETE", "admin", path)  # the deleted row still points at it
    assert dead.status_code == 409 and "deactivate it" in dead.json()["conflict"]["message"]
    assert api.request("GET", "admin", path).status_code == 200
