"""The audit log: one JSON line per state-changing API request, on the ``coffer.audit`` logger.

Each line says who (request id, user, the token's project), what (the policy rule that governs the
request, the method and path, the target: the URL's project and the ids in the path) and the
outcome (the HTTP status, also for refusals). Bodies, query strings and headers are never logged,
so neither are passwords or tokens.

Routers opt in with ``APIRouter(route_class=AuditedRoute)``; the same route class renders a
``RateLimited`` refusal in Trove's shape (413 with ``Retry-After`` and ``retryAfter``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from coffer.api.context import READ_METHODS
from coffer.api.errors import request_id_of
from coffer.api.policy import ACTION_STATE, AUTH_STATE
from coffer.errors import CofferError
from coffer.quotas import RateLimited

AUDIT_LOGGER = "coffer.audit"
audit_log = logging.getLogger(AUDIT_LOGGER)

#: ``request.state`` attribute a handler may set (with ``note_target``) to add ids it created.
TARGET_STATE = "coffer_audit_target"
#: Methods that change nothing and are not audited.
SAFE_METHODS = READ_METHODS | {"OPTIONS"}


def note_target(request: Request, **ids: str) -> None:
    """Add ids to this request's audit target (e.g. the id of an instance it created)."""
    target = dict(getattr(request.state, TARGET_STATE, None) or {})
    target.update(ids)
    setattr(request.state, TARGET_STATE, target)


def rate_limited_response(exc: RateLimited) -> JSONResponse:
    """Trove's rate-limit fault: 413 ``overLimit`` with ``details``, ``retryAfter`` and the
    ``Retry-After`` header."""
    retry = exc.retry_after_header
    body = {
        "overLimit": {
            "code": exc.status,
            "message": exc.message,
            "details": exc.details,
            "retryAfter": retry,
        }
    }
    return JSONResponse(body, status_code=exc.status, headers={"Retry-After": retry})


def status_of(exc: BaseException) -> int:
    """The HTTP status the app's error handlers will answer ``exc`` with."""
    if isinstance(exc, CofferError):
        return exc.status
    if isinstance(exc, StarletteHTTPException):
        return exc.status_code
    if isinstance(exc, RequestValidationError):
        return 400
    return 500


def audit_record(request: Request, status: int) -> dict[str, Any]:
    """The audit line's fields for ``request`` answered with ``status``."""
    auth = getattr(request.state, AUTH_STATE, None)
    params = dict(request.path_params)
    project = params.pop("tenant_id", None)
    target: dict[str, Any] = {"project": project, **params}
    target.update(getattr(request.state, TARGET_STATE, None) or {})
    return {
        "request_id": request_id_of(request),
        "user_id": auth.user_id if auth else None,
        "user_name": auth.user_name if auth else None,
        "project_id": auth.project_id if auth else None,
        "action": getattr(request.state, ACTION_STATE, None),
        "method": request.method,
        "path": request.url.path,
        "target": target,
        "outcome": status,
    }


class AuditedRoute(APIRoute):
    """An ``APIRoute`` that writes the audit line of every state-changing request it serves,
    whatever the outcome, and answers ``RateLimited`` in Trove's shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def audited(request: Request) -> Response:
            status = 500
            try:
                try:
                    response = await handler(request)
                except RateLimited as exc:
                    response = rate_limited_response(exc)
                status = response.status_code
                return response
            except BaseException as exc:
                status = status_of(exc)
                raise
            finally:
                if request.method not in SAFE_METHODS:
                    record = audit_record(request, status)
                    audit_log.info(json.dumps(record, sort_keys=True))

        return audited
