"""The API framework: versions documents, fault JSON, request ids, auth context, pagination."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from api_fixtures import ApiHarness
from fastapi import FastAPI, Request
from starlette.datastructures import Headers

from coffer.api.context import AdminContext, Context
from coffer.api.errors import describe_validation_errors, fault_name
from coffer.api.pagination import PageRequest, page_request, paginate
from coffer.errors import CofferError, NotFound, RemoteError, ValidationError


class WidgetMissing(NotFound):
    """A subclass nobody mapped: it must still be a 404 through the MRO."""


@pytest.fixture
def api(tmp_path: Path) -> Iterator[ApiHarness]:
    with ApiHarness.start(tmp_path) as harness:
        app = harness.client.app
        assert isinstance(app, FastAPI)
        _add_probe_routes(app)
        yield harness


def _add_probe_routes(app: FastAPI) -> None:
    def echo(ctx: Context) -> dict[str, Any]:
        return {
            "user": ctx.auth.user_name,
            "project": ctx.project_id,
            "token_project": ctx.auth.project_id,
            "request_id": ctx.request_id,
            "project_url": ctx.project_url,
        }

    def admin_only(ctx: AdminContext) -> dict[str, Any]:
        return {"admin": ctx.is_admin}

    def boom() -> None:
        raise RuntimeError("database password is hunter2")  # must never reach the client

    def widget() -> None:
        raise WidgetMissing("Widget 7 was not found.")

    def remote() -> None:
        raise RemoteError("UserNotFound", "User bob does not exist.", status=404)

    def guest_down() -> None:
        raise CofferError("The guest agent crashed.")

    app.add_api_route("/v1.0/{tenant_id}/echo", echo, methods=["GET"], include_in_schema=False)
    app.add_api_route("/v1.0/{tenant_id}/echo", echo, methods=["POST"], include_in_schema=False)
    app.add_api_route("/v1.0/{tenant_id}/mgmt/probe", admin_only, methods=["GET"])
    app.add_api_route("/boom", boom, methods=["GET"])
    app.add_api_route("/widget", widget, methods=["GET"])
    app.add_api_route("/remote", remote, methods=["GET"])
    app.add_api_route("/guest-down", guest_down, methods=["GET"])


# -- versions -----------------------------------------------------------------------------------


def test_trove_versions_document_at_root(api: ApiHarness) -> None:
    resp = api.client.get("/")
    assert resp.status_code == 200
    assert resp.json() == {
        "versions": [
            {
                "id": "v1.0",
                "status": "CURRENT",
                "updated": "2012-08-01T00:00:00Z",
                "links": [{"rel": "self", "href": "http://testserver/v1.0/"}],
            }
        ]
    }
    single = api.client.get("/v1.0/")
    assert single.status_code == 200
    assert single.json()["version"]["id"] == "v1.0"
    assert api.client.get("/v1.0").json() == single.json()


def test_public_endpoint_shapes_links(tmp_path: Path) -> None:
    with ApiHarness.start(tmp_path, public_endpoint="https://db.example.org/") as api:
        href = api.client.get("/").json()["versions"][0]["links"][0]["href"]
        assert href == "https://db.example.org/v1.0/"


def test_openapi_document(api: ApiHarness) -> None:
    doc = api.client.get("/openapi.json").json()
    assert doc["info"]["title"] == "Coffer"
    assert "/v1.0/{tenant_id}/flavors" in doc["paths"]
    assert "/identity/v3/auth/tokens" in doc["paths"]


# -- faults -------------------------------------------------------------------------------------


def _assert_fault(resp: Any, status: int, fault: str) -> str:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json"
    assert resp.headers["X-Openstack-Request-Id"].startswith("req-")
    body = resp.json()
    assert list(body) == [fault]
    assert body[fault]["code"] == status
    message = body[fault]["message"]
    assert isinstance(message, str) and message
    return message


def test_unmatched_route_is_item_not_found(api: ApiHarness) -> None:
    message = _assert_fault(api.client.get("/v1.0/p/nothing/here"), 404, "itemNotFound")
    assert "/v1.0/p/nothing/here" in message


def test_wrong_method_is_bad_method(api: ApiHarness) -> None:
    resp = api.client.delete("/")
    message = _assert_fault(resp, 405, "badMethod")
    assert "DELETE" in message and resp.headers["allow"] == "GET"


def test_validation_error_names_the_field(api: ApiHarness) -> None:
    resp = api.request(
        "POST", "admin", "mgmt/datastore-versions", json={"version": {"name": "10.11"}}
    )
    message = _assert_fault(resp, 400, "badRequest")
    assert message.startswith("Validation error:")
    assert "version.datastore_name" in message and "version.datastore_manager" in message


def test_malformed_json_is_bad_request(api: ApiHarness) -> None:
    resp = api.request(
        "POST",
        "admin",
        "mgmt/datastore-versions",
        content=b'{"version": {',
        headers={"Content-Type": "application/json"},
    )
    message = _assert_fault(resp, 400, "badRequest")
    assert message.startswith("Validation error: the request body is not valid JSON")


def test_unhandled_exception_is_instance_fault_with_error_id(
    api: ApiHarness, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="coffer.api"):
        resp = api.client.get("/boom")
    message = _assert_fault(resp, 500, "instanceFault")
    assert "hunter2" not in resp.text and "Traceback" not in resp.text
    error_id = message.split("error id ")[1].split(" ")[0]
    assert len(error_id) == 36
    logged = [r for r in caplog.records if error_id in r.getMessage()]
    assert logged and logged[0].exc_info is not None  # the traceback went to the log


def test_error_status_follows_the_class_hierarchy(api: ApiHarness) -> None:
    assert (
        _assert_fault(api.client.get("/widget"), 404, "itemNotFound") == "Widget 7 was not found."
    )
    _assert_fault(api.client.get("/remote"), 404, "itemNotFound")
    _assert_fault(api.client.get("/guest-down"), 500, "instanceFault")


def test_every_response_has_a_fresh_request_id(api: ApiHarness) -> None:
    first = api.client.get("/").headers["X-Openstack-Request-Id"]
    second = api.client.get("/").headers["X-Openstack-Request-Id"]
    assert first != second and first.startswith("req-") and len(first) == 40


def test_fault_names_and_validation_descriptions() -> None:
    assert fault_name(409) == "conflict"
    assert fault_name(429) == "tooManyRequests"
    assert fault_name(418) == "imATeapot"
    assert fault_name(503) == "serviceUnavailable"
    text = describe_validation_errors(
        [
            {"loc": ("query", "limit"), "msg": "bad", "type": "int_parsing", "input": "pw"},
            {"loc": ("body",), "msg": "Field required", "type": "missing"},
        ]
    )
    assert text == ("query parameter limit: bad; the request body is missing; send a JSON object.")


# -- request context ----------------------------------------------------------------------------


def test_missing_and_invalid_tokens_are_unauthorized(api: ApiHarness) -> None:
    _, project = api.login("demo")
    message = _assert_fault(api.client.get(f"/v1.0/{project}/echo"), 401, "unauthorized")
    assert "X-Auth-Token" in message
    resp = api.client.get(f"/v1.0/{project}/echo", headers={"X-Auth-Token": "garbage"})
    _assert_fault(resp, 401, "unauthorized")


def test_context_carries_caller_and_project(api: ApiHarness) -> None:
    _, project = api.login("demo")
    resp = api.request("GET", "demo", "echo")
    assert resp.status_code == 200
    body = resp.json()
    assert body["user"] == "demo" and body["project"] == project
    assert body["request_id"] == resp.headers["X-Openstack-Request-Id"]
    assert body["project_url"] == f"http://testserver/v1.0/{project}"


def test_other_projects_path_is_forbidden(api: ApiHarness) -> None:
    _, admin_project = api.login("admin")
    _, demo_project = api.login("demo")
    resp = api.request("GET", "demo", "echo", project=admin_project)
    message = _assert_fault(resp, 403, "forbidden")
    assert demo_project in message and "use a URL with that project id" in message


def test_admin_may_use_any_project_path(api: ApiHarness) -> None:
    _, admin_project = api.login("admin")
    _, demo_project = api.login("demo")
    resp = api.request("GET", "admin", "echo", project=demo_project)
    assert resp.status_code == 200
    assert resp.json()["project"] == demo_project
    assert resp.json()["token_project"] == admin_project


def test_reader_may_get_but_not_post(api: ApiHarness) -> None:
    assert api.request("GET", "reader", "echo").status_code == 200
    message = _assert_fault(api.request("POST", "reader", "echo"), 403, "forbidden")
    assert "reader" in message
    assert api.request("POST", "demo", "echo").status_code == 200


def test_admin_routes_refuse_non_admins_with_403(api: ApiHarness) -> None:
    message = _assert_fault(api.request("GET", "demo", "mgmt/probe"), 403, "forbidden")
    assert "admin role" in message
    assert api.request("GET", "admin", "mgmt/probe").json() == {"admin": True}


# -- pagination ---------------------------------------------------------------------------------


def _request(query: str) -> Request:
    scope = {
        "type": "http",
        "method": "GET",
        "scheme": "http",
        "server": ("coffer.test", 8779),
        "path": "/v1.0/p/instances",
        "query_string": query.encode(),
        "headers": Headers({"host": "coffer.test:8779"}).raw,
    }
    return Request(scope)


def test_paginate_pages_through_everything_in_key_order() -> None:
    items = [f"id-{n:02d}" for n in range(7)][::-1]
    seen: list[str] = []
    marker = None
    for _ in range(10):
        page = paginate(items, PageRequest(limit=3, marker=marker), str)
        seen += page.items
        marker = page.next_marker
        if marker is None:
            break
    assert seen == sorted(items)
    # A marker whose item vanished still continues after its position.
    assert paginate(items, PageRequest(limit=2, marker="id-025"), str).items == ["id-03", "id-04"]
    assert paginate(items, PageRequest(limit=None, marker=None), str).next_marker is None


def test_page_request_validation_and_page_size() -> None:
    assert page_request(_request("limit=5&marker=abc")) == PageRequest(5, "abc")
    assert page_request(_request(""), default_size=20) == PageRequest(20, None)
    assert page_request(_request("limit=500"), default_size=20).limit == 20
    assert page_request(_request("")) == PageRequest(None, None)
    for bad in ("limit=0", "limit=-3", "limit=ten", "limit=", "marker="):
        with pytest.raises(ValidationError, match="Validation error: query parameter"):
            page_request(_request(bad))


def test_next_link_keeps_host_scheme_and_other_parameters() -> None:
    request = _request("include_clustered=False&limit=2")
    page = paginate(["a", "b", "c"], page_request(request), str)
    assert page.links(request) == [
        {
            "rel": "next",
            "href": "http://coffer.test:8779/v1.0/p/instances?include_clustered=False&limit=2&marker=b",
        }
    ]
    last = paginate(["a", "b"], page_request(request), str)
    assert last.links(request) == [] and last.links_field(request) == {}


def test_pagination_over_http(api: ApiHarness) -> None:
    for name in ("1", "2", "3"):
        resp = api.request(
            "POST",
            "admin",
            "mgmt/datastore-versions",
            json={
                "version": {"name": name, "datastore_name": "redis", "datastore_manager": "redis"}
            },
        )
        assert resp.status_code == 202
    first = api.request("GET", "admin", "mgmt/datastore-versions?limit=2").json()
    assert len(first["versions"]) == 2
    (link,) = first["links"]
    assert link["rel"] == "next" and link["href"].startswith("http://testserver/")
    token, _ = api.login("admin")
    second = api.client.get(link["href"], headers={"X-Auth-Token": token}).json()
    assert len(second["versions"]) == 1 and "links" not in second
    ids = [v["id"] for v in first["versions"] + second["versions"]]
    assert len(set(ids)) == 3
    bad = api.request("GET", "admin", "mgmt/datastore-versions?limit=0")
    assert _assert_fault(bad, 400, "badRequest").startswith("Validation error:")
