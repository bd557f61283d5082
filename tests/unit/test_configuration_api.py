"""The configuration group routes on the real app and a SQLite control DB: shapes and codes as in
Trove, 422 for values a rule refuses, 404 across projects, nothing changed by a refusal, and
the parameter listings and their admin-only management."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from api_fixtures import ApiHarness, password_body
from sqlalchemy import func, select

from coffer import catalog
from coffer.configuration import groups
from coffer.configuration import parameter_rules as rules
from coffer.db.models import Instance
from coffer.db.models_day2 import Configuration, ConfigurationValue
from coffer.db.session import transaction

EVE_PASSWORD = "eve-secret-pw"


@pytest.fixture
def api(tmp_path: Path) -> Iterator[ApiHarness]:
    with ApiHarness.start(tmp_path) as harness:
        with transaction(harness.session_factory) as s:
            catalog.register_datastore_version(
                s, "mariadb", "10.11", "mariadb", version="10.11.6", default=True
            )
            catalog.register_datastore_version(s, "mariadb", "10.6", "mariadb", active=False)
            catalog.register_datastore_version(
                s, "postgresql", "15", "postgresql", version="15.8", default=True
            )
            # Registered but with no rules: groups are not supported for it.
            catalog.register_datastore_version(s, "mysql", "8.0", "mysql", default=True)
            rules.register_shipped_rules(s)
        yield harness


def _ids(api: ApiHarness) -> dict[str, str]:
    with api.session_factory() as s:
        found = {}
        for ds in catalog.list_datastores(s):
            for v in catalog.versions_of(s, ds, admin=True):
                found[f"{ds.name} {v.name}"] = v.id
        return found


def _create(api: ApiHarness, user: str = "demo", **fields: Any) -> Any:
    body: dict[str, Any] = {
        "name": "tuned",
        "values": {"max_connections": 555},
        "datastore": {"type": "mariadb", "version": "10.11"},
    }
    body.update(fields)
    return api.request("POST", user, "configurations", json={"configuration": body})


def _group_count(api: ApiHarness) -> tuple[int, int]:
    with api.session_factory() as s:
        groups_ = s.scalar(select(func.count()).select_from(Configuration)) or 0
        values = s.scalar(select(func.count()).select_from(ConfigurationValue)) or 0
        return groups_, values


def _eve(api: ApiHarness) -> tuple[str, str]:
    """A member of another project: (token, project id)."""
    api.identity.create_project("other")
    api.identity.create_user("eve", EVE_PASSWORD, "other", ["member"])
    resp = api.client.post(
        "/identity/v3/auth/tokens", json=password_body("eve", EVE_PASSWORD, "other")
    )
    assert resp.status_code == 201
    return resp.headers["X-Subject-Token"], resp.json()["token"]["project"]["id"]


def _attach(api: ApiHarness, group_id: str, name: str = "db1", deleted: bool = False) -> str:
    """Point an instance row at the group, as attaching does."""
    _, project = api.login("demo")
    with transaction(api.session_factory) as s:
        group = s.get(Configuration, group_id)
        assert group is not None
        inst = Instance(
            tenant_id=project,
            name=name,
            flavor_id="1",
            volume_size=1,
            datastore_version_id=group.datastore_version_id,
            encrypted_key="sealed",
            configuration_id=group_id,
            deleted=deleted,
        )
        s.add(inst)
        s.flush()
        return inst.id


# -- create, show, list ---------------------------------------------------------------------------


def test_create_answers_200_with_the_detail_view(api: ApiHarness) -> None:
    resp = _create(
        api, description="for the app", values={"MAX_CONNECTIONS": 555, "wait_timeout": 60}
    )
    assert resp.status_code == 200, resp.text
    view = resp.json()["configuration"]
    ids = _ids(api)
    assert view["name"] == "tuned" and view["description"] == "for the app"
    assert view["values"] == {"max_connections": 555, "wait_timeout": 60}
    assert view["instance_count"] == 0
    assert view["datastore_name"] == "mariadb"
    assert view["datastore_version_id"] == ids["mariadb 10.11"]
    assert view["datastore_version_name"] == "10.11"
    assert view["datastore_version_number"] == "10.11.6"
    assert len(view["created"]) == 19 and view["created"] <= view["updated"]

    shown = api.request("GET", "demo", f"configurations/{view['id']}")
    assert shown.status_code == 200
    assert shown.json()["configuration"] == view


def test_create_picks_the_datastore_default_version(api: ApiHarness) -> None:
    resp = _create(api, datastore={"type": "postgresql"}, values={"work_mem": 8192})
    assert resp.status_code == 200, resp.text
    assert resp.json()["configuration"]["datastore_version_name"] == "15"
    # An inactive version may be named explicitly: a group can be prepared before it is offered.
    resp = _create(api, datastore={"type": "mariadb", "version": "10.6"}, values={})
    assert resp.status_code == 200, resp.text
    assert resp.json()["configuration"]["datastore_version_name"] == "10.6"


@pytest.mark.parametrize(
    ("fields", "status", "fragment"),
    [
        ({"values": {"max_connections": 5}}, 422, "'max_connections': 5 is less than the minimum"),
        ({"values": {"max_connections": "5"}}, 422, "must be a whole number, not a string"),
        ({"values": {"no_such": 1}}, 422, "'no_such' is not supported for datastore mariadb 10.11"),
        ({"datastore": {"type": "mysql"}, "values": {}}, 422, "not supported for datastore mysql"),
        ({"datastore": {"type": "nosuch"}}, 404, "Datastore 'nosuch' was not found"),
        ({"datastore": {"type": "mariadb", "version": "9"}}, 404, "has no version '9'"),
        # Several datastores exist, so the type cannot be left out.
        ({"datastore": None}, 400, "Specify the datastore type"),
        ({"name": ""}, 400, "name must be a string of 1-255"),
        ({"name": "---"}, 400, "at least one letter or digit"),
        ({"description": "x" * 256}, 400, "description must be a string of 1-255"),
        ({"valeus": {}}, 400, "Validation error: configuration.valeus"),
        ({"values": [1]}, 400, "Validation error: configuration.values"),
    ],
)
def test_create_refusals_change_nothing(
    api: ApiHarness, fields: dict[str, Any], status: int, fragment: str
) -> None:
    resp = _create(api, **fields)
    assert resp.status_code == status, resp.text
    fault = next(iter(resp.json().values()))
    assert fragment in fault["message"]
    assert _group_count(api) == (0, 0)


def test_list_pages_and_isolates_projects(api: ApiHarness) -> None:
    made = sorted(_create(api, name=f"g{i}").json()["configuration"]["id"] for i in range(3))
    token, other_project = _eve(api)
    headers = {"X-Auth-Token": token}
    theirs = api.client.post(
        f"/v1.0/{other_project}/configurations",
        headers=headers,
        json={"configuration": {"name": "eve's", "values": {}, "datastore": {"type": "mariadb"}}},
    )
    assert theirs.status_code == 200

    listed = api.request("GET", "demo", "configurations")
    assert listed.status_code == 200
    items = listed.json()["configurations"]
    assert [item["id"] for item in items] == made
    assert "values" not in items[0] and items[0]["datastore_version_number"] == "10.11.6"
    first = api.request("GET", "demo", "configurations?limit=2").json()
    assert [item["id"] for item in first["configurations"]] == made[:2]
    assert first["links"][0]["rel"] == "next" and f"marker={made[1]}" in first["links"][0]["href"]
    rest = api.request("GET", "demo", f"configurations?limit=2&marker={made[1]}").json()
    assert [item["id"] for item in rest["configurations"]] == made[2:] and "links" not in rest

    # Eve sees only her own group; an admin sees every project's (as in Trove).
    eve_list = api.client.get(f"/v1.0/{other_project}/configurations", headers=headers).json()
    assert [item["name"] for item in eve_list["configurations"]] == ["eve's"]
    assert len(api.request("GET", "admin", "configurations").json()["configurations"]) == 4


def test_other_projects_get_404_and_change_nothing(api: ApiHarness) -> None:
    group_id = _create(api).json()["configuration"]["id"]
    token, other_project = _eve(api)
    headers = {"X-Auth-Token": token}
    base = f"/v1.0/{other_project}/configurations/{group_id}"
    change = {"configuration": {"values": {"max_connections": 999}}}
    for method, path, body in (
        ("GET", base, None),
        ("GET", f"{base}/instances", None),
        ("PUT", base, change),
        ("PATCH", base, change),
        ("DELETE", base, None),
    ):
        resp = api.client.request(method, path, headers=headers, json=body)
        assert resp.status_code == 404, (method, path, resp.text)
        assert "could not be found" in resp.json()["itemNotFound"]["message"]
    shown = api.request("GET", "demo", f"configurations/{group_id}").json()["configuration"]
    assert shown["values"] == {"max_connections": 555}


def test_password_like_values_are_masked(api: ApiHarness) -> None:
    version_id = _ids(api)["mariadb 10.11"]
    with transaction(api.session_factory) as s:
        rules.create_rule(s, version_id, rules.make_rule("repl_password", "string", False))
    resp = _create(api, values={"repl_password": "s3cret-value", "max_connections": 100})
    assert resp.status_code == 200, resp.text
    assert resp.json()["configuration"]["values"] == {
        "repl_password": "***",
        "max_connections": 100,
    }
    assert "s3cret-value" not in resp.text
    # Stored as given: the guest needs the real value.
    with api.session_factory() as s:
        values = groups.group_values(s, resp.json()["configuration"]["id"])
    assert values["repl_password"] == "s3cret-value"


# -- PUT, PATCH, DELETE and attached instances ----------------------------------------------------


def test_put_replaces_every_value_and_patch_merges(api: ApiHarness) -> None:
    group_id = _create(api, values={"max_connections": 555, "wait_timeout": 60}).json()[
        "configuration"
    ]["id"]
    path = f"configurations/{group_id}"

    patched = api.request(
        "PATCH", "demo", path, json={"configuration": {"values": {"max_connections": 666}}}
    )
    assert patched.status_code == 200 and patched.content == b""
    values = api.request("GET", "demo", path).json()["configuration"]["values"]
    assert values == {"max_connections": 666, "wait_timeout": 60}

    put = api.request(
        "PUT",
        "demo",
        path,
        json={
            "configuration": {
                "values": {"interactive_timeout": 120},
                "name": "renamed",
                "description": "d",
            }
        },
    )
    assert put.status_code == 202 and put.content == b""
    shown = api.request("GET", "demo", path).json()["configuration"]
    assert shown["values"] == {"interactive_timeout": 120}
    assert (shown["name"], shown["description"]) == ("renamed", "d")

    # As in Trove, PUT without values leaves none.
    assert (
        api.request("PUT", "demo", path, json={"configuration": {"name": "bare"}}).status_code
        == 202
    )
    assert api.request("GET", "demo", path).json()["configuration"]["values"] == {}


def test_refused_changes_leave_the_group_as_it_was(api: ApiHarness) -> None:
    group_id = _create(api, values={"max_connections": 555}).json()["configuration"]["id"]
    path = f"configurations/{group_id}"
    for method, body, status in (
        ("PUT", {"configuration": {"values": {"max_connections": 1}, "name": "x"}}, 422),
        ("PATCH", {"configuration": {"values": {"wait_timeout": 60, "bogus": 1}}}, 422),
        ("PATCH", {"configuration": {}}, 400),
        ("PUT", {"configuration": {"values": {}, "name": ""}}, 400),
    ):
        resp = api.request(method, "demo", path, json=body)
        assert resp.status_code == status, (method, body, resp.text)
    shown = api.request("GET", "demo", path).json()["configuration"]
    assert shown["values"] == {"max_connections": 555} and shown["name"] == "tuned"


def test_delete_is_refused_while_attached(api: ApiHarness) -> None:
    group_id = _create(api).json()["configuration"]["id"]
    _attach(api, group_id, "gone", deleted=True)  # a deleted instance does not hold the group
    inst_id = _attach(api, group_id, "db1")
    shown = api.request("GET", "demo", f"configurations/{group_id}").json()["configuration"]
    assert shown["instance_count"] == 1
    listed = api.request("GET", "demo", f"configurations/{group_id}/instances").json()
    assert [(i["id"], i["name"]) for i in listed["instances"]] == [(inst_id, "db1")]
    assert listed["instances"][0]["links"][0]["href"].endswith(f"/instances/{inst_id}")

    refused = api.request("DELETE", "demo", f"configurations/{group_id}")
    assert refused.status_code == 400
    assert "attached to 1 instance(s)" in refused.json()["badRequest"]["message"]
    assert _group_count(api) == (1, 1)

    with transaction(api.session_factory) as s:
        inst = s.get(Instance, inst_id)
        assert inst is not None
        inst.configuration_id = None
    assert api.request("DELETE", "demo", f"configurations/{group_id}").status_code == 202
    assert _group_count(api) == (0, 0)
    assert api.request("GET", "demo", f"configurations/{group_id}").status_code == 404


def test_service_helpers_for_attach_and_apply(api: ApiHarness) -> None:
    ids = _ids(api)
    group_id = _create(
        api,
        datastore={"type": "postgresql"},
        values={"work_mem": 8192, "shared_buffers": 16384, "max_connections": 50},
    ).json()["configuration"]["id"]
    inst_id = _attach(api, group_id)
    with api.session_factory() as s:
        assert groups.configuration_values_for_instance(s, inst_id) == {
            "max_connections": 50,
            "shared_buffers": 16384,
            "work_mem": 8192,
        }
        assert groups.configuration_values_for_instance(s, "no-such-instance") == {}
        assert groups.restart_required_names(
            s, ids["postgresql 15"], ["work_mem", "SHARED_BUFFERS", "max_connections"]
        ) == ["max_connections", "shared_buffers"]
    with transaction(api.session_factory) as s:
        _, project = api.login("demo")
        owner = groups.Owner(project)
        group, attached = groups.merge_values(s, owner, group_id, {"work_mem": 4096})
        assert [inst.id for inst in attached] == [inst_id]
        assert groups.validate_values(s, group.datastore_version_id, {"WORK_MEM": 64}) == {
            "work_mem": 64
        }


# -- parameters -----------------------------------------------------------------------------------


def test_parameter_listings_by_name_and_by_id(api: ApiHarness) -> None:
    ids = _ids(api)
    by_name = api.request("GET", "demo", "datastores/mariadb/versions/10.11/parameters")
    assert by_name.status_code == 200
    params = by_name.json()["configuration-parameters"]
    assert len(params) == len(rules.shipped_rules("mariadb"))
    by_id = api.request("GET", "demo", f"datastores/versions/{ids['mariadb 10.11']}/parameters")
    assert by_id.json()["configuration-parameters"] == params

    one = api.request("GET", "demo", "datastores/mariadb/versions/10.11/parameters/max_connections")
    assert one.status_code == 200
    assert one.json() == {
        "name": "max_connections",
        "datastore_version_id": ids["mariadb 10.11"],
        "restart_required": False,
        "type": "integer",
        "min": 10,
        "max": 100000,
    }
    path = f"datastores/versions/{ids['postgresql 15']}/parameters/shared_buffers"
    assert api.request("GET", "demo", path).json()["restart_required"] is True

    missing = api.request("GET", "demo", "datastores/mariadb/versions/10.11/parameters/max_conn")
    assert missing.status_code == 404
    assert "did you mean 'max_connections'?" in missing.json()["itemNotFound"]["message"]
    # A version with no rules lists none; inactive versions are hidden from non-admins.
    assert api.request("GET", "demo", "datastores/mysql/versions/8.0/parameters").json() == {
        "configuration-parameters": []
    }
    assert (
        api.request("GET", "demo", "datastores/mariadb/versions/10.6/parameters").status_code == 404
    )
    assert (
        api.request("GET", "admin", "datastores/mariadb/versions/10.6/parameters").status_code
        == 200
    )


def test_mgmt_parameter_crud(api: ApiHarness) -> None:
    version_id = _ids(api)["mariadb 10.11"]
    base = f"mgmt/datastores/versions/{version_id}/parameters"
    body = {
        "configuration-parameter": {
            "name": "thread_stack",
            "restart_required": 1,
            "data_type": "integer",
            "min_size": "131072",
            "max_size": 1073741824,
        }
    }
    created = api.request("POST", "admin", base, json=body)
    assert created.status_code == 200, created.text
    assert created.json() == {
        "name": "thread_stack",
        "datastore_version_id": version_id,
        "restart_required": True,
        "type": "integer",
        "min_size": 131072,
        "max_size": 1073741824,
        "deleted": False,
        "deleted_at": None,
    }
    assert api.request("POST", "admin", base, json=body).status_code == 409
    # The new rule is usable at once.
    assert _create(api, values={"thread_stack": 262144}).status_code == 200

    body["configuration-parameter"].update(restart_required=0, max_size=524288)
    changed = api.request("PUT", "admin", f"{base}/thread_stack", json=body)
    assert changed.status_code == 200 and changed.json()["max_size"] == 524288
    shown = api.request("GET", "admin", f"{base}/thread_stack").json()
    assert shown["restart_required"] is False
    listed = api.request("GET", "admin", base).json()["configuration-parameters"]
    assert "thread_stack" in {p["name"] for p in listed} and "min_size" in listed[0]

    assert api.request("DELETE", "admin", f"{base}/thread_stack").status_code == 204
    assert api.request("GET", "admin", f"{base}/thread_stack").status_code == 404
    assert api.request("DELETE", "admin", f"{base}/thread_stack").status_code == 404


@pytest.mark.parametrize(
    ("rule", "fragment"),
    [
        ({"data_type": "integer", "min_size": 10, "max_size": 1}, "min 10 is greater than max 1"),
        ({"data_type": "decimal"}, "type 'decimal' is not one of"),
        ({"data_type": "integer", "min_size": "ten"}, "min_size must be a number"),
        ({"data_type": "integer", "min_size": "NaN"}, "finite"),
        ({"data_type": "integer", "restart_required": 2}, "restart_required must be true or false"),
        ({"name": "bad name!"}, "not a valid parameter name"),
        ({"data_type": "integer", "bogus": 1}, "Validation error"),
    ],
)
def test_mgmt_parameter_refusals(api: ApiHarness, rule: dict[str, Any], fragment: str) -> None:
    version_id = _ids(api)["mariadb 10.11"]
    body = {"name": "thread_stack", "restart_required": 0, "data_type": "integer", **rule}
    base = f"mgmt/datastores/versions/{version_id}/parameters"
    resp = api.request("POST", "admin", base, json={"configuration-parameter": body})
    assert resp.status_code == 400, resp.text
    assert fragment in resp.json()["badRequest"]["message"]
    assert api.request("GET", "admin", f"{base}/thread_stack").status_code == 404


def test_mgmt_update_cannot_rename(api: ApiHarness) -> None:
    version_id = _ids(api)["mariadb 10.11"]
    body = {"name": "wait_timeout", "restart_required": 0, "data_type": "integer"}
    path = f"mgmt/datastores/versions/{version_id}/parameters/max_connections"
    resp = api.request("PUT", "admin", path, json={"configuration-parameter": body})
    assert resp.status_code == 400 and "cannot be renamed" in resp.text
    unknown = f"mgmt/datastores/versions/{version_id}/parameters/no_such"
    del body["name"]
    assert (
        api.request("PUT", "admin", unknown, json={"configuration-parameter": body}).status_code
        == 404
    )
