"""Keystone v3 routes of the embedded identity service, mounted under ``/identity``.

``OS_AUTH_URL`` is ``http://host:port/identity/v3`` (or ``.../identity``: version discovery finds
v3). Errors here use Keystone's ``{"error": {...}}`` shape (see ``coffer.api.errors``).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Request, Response
from fastapi.responses import JSONResponse

from coffer.api.context import (
    AUTH_HEADER,
    Services,
    ServicesDep,
    authenticate_request,
    public_base_url,
)
from coffer.errors import Forbidden, NotFound, Unauthorized

SUBJECT_HEADER = "X-Subject-Token"
_V3_UPDATED = "2020-04-07T00:00:00Z"
_V3_ID = "v3.14"

router = APIRouter(prefix="/identity", tags=["identity"])


def _v3_version(request: Request) -> dict[str, Any]:
    return {
        "id": _V3_ID,
        "status": "stable",
        "updated": _V3_UPDATED,
        "links": [{"rel": "self", "href": f"{public_base_url(request)}/identity/v3/"}],
        "media-types": [
            {"base": "application/json", "type": "application/vnd.openstack.identity-v3+json"}
        ],
    }


@router.get("", include_in_schema=False)
@router.get("/", summary="Identity API versions")
def identity_versions(request: Request) -> JSONResponse:
    """Keystone answers its root with 300 Multiple Choices and the version list; keystoneauth's
    discovery follows the v3 ``self`` link."""
    return JSONResponse({"versions": {"values": [_v3_version(request)]}}, status_code=300)


@router.get("/v3", include_in_schema=False)
@router.get("/v3/", summary="Identity v3 version document")
def identity_v3(request: Request) -> dict[str, Any]:
    return {"version": _v3_version(request)}


@router.post("/v3/auth/tokens", status_code=201, summary="Issue a project-scoped token")
def issue_token(
    request: Request, services: ServicesDep, body: Annotated[dict[str, Any], Body()]
) -> JSONResponse:
    """Password authentication scoped to a project. The token is in ``X-Subject-Token``."""
    token, token_body = services.identity.authenticate(body, base_url=public_base_url(request))
    return JSONResponse(token_body, status_code=201, headers={SUBJECT_HEADER: token})


@router.get("/v3/auth/tokens", summary="Validate a token (X-Subject-Token)")
def check_token(request: Request, services: ServicesDep) -> Response:
    """Validate ``X-Subject-Token`` on behalf of the ``X-Auth-Token`` holder.

    401 when the caller's own token is missing or invalid; 404 when the subject token is not
    valid (Keystone's answer); 403 when a non-admin asks about another user's token.
    """
    body, headers = _check_subject(request, services)
    return JSONResponse(body, headers=headers)


@router.head("/v3/auth/tokens", summary="Check a token (X-Subject-Token), no body")
def check_token_head(request: Request, services: ServicesDep) -> Response:
    _body, headers = _check_subject(request, services)
    return Response(status_code=200, headers=headers)


def _check_subject(request: Request, services: Services) -> tuple[dict[str, Any], dict[str, str]]:
    caller = authenticate_request(request)
    subject = request.headers.get(SUBJECT_HEADER)
    if not subject:
        raise NotFound(f"Send the token to check in the {SUBJECT_HEADER} header.")
    try:
        body = services.identity.token_body(subject, base_url=public_base_url(request))
    except Unauthorized as exc:
        raise NotFound(f"The subject token is not valid: {exc.message}") from exc
    if not caller.is_admin and body["token"]["user"]["id"] != caller.user_id:
        raise Forbidden(
            f"Only administrators may check other users' tokens; send your own token in both "
            f"{AUTH_HEADER} and {SUBJECT_HEADER}."
        )
    return body, {SUBJECT_HEADER: subject}
