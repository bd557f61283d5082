"""Every error the API returns, in the shape clients expect, with a request id on every response.

* A ``CofferError`` becomes a Trove fault: ``{"<fault>": {"code": N, "message": "..."}}``, with the
  status and fault name taken from the error's class (resolved along the MRO).
* Request validation errors and malformed JSON become 400 ``badRequest`` whose message starts
  ``Validation error:`` and names the field.
* Unmatched routes become 404 ``itemNotFound``, a wrong method 405 ``badMethod``.
* Anything else becomes 500 ``instanceFault`` quoting an error id; the traceback is logged under
  that id and never returned.
* Under ``/identity`` the same errors take Keystone's shape instead:
  ``{"error": {"code": N, "title": "...", "message": "..."}}``.

``RequestIdMiddleware`` gives each request an ``X-Openstack-Request-Id: req-<uuid>`` header and is
also the last line of defence that turns an unhandled exception into the 500 fault, so even that
response carries the request id.
"""

from __future__ import annotations

import http
import json
import logging
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coffer.errors import CofferError

log = logging.getLogger("coffer.api")

REQUEST_ID_HEADER = "X-Openstack-Request-Id"
#: Where the request id is kept in the ASGI scope (read it with ``request_id_of``).
_SCOPE_KEY = "coffer.request_id"
#: Routes under this prefix answer errors in Keystone's shape.
IDENTITY_PREFIX = "/identity"

#: Trove's fault names by HTTP status (``trove/common/wsgi.py``).
FAULT_NAMES: dict[int, str] = {
    400: "badRequest",
    401: "unauthorized",
    403: "forbidden",
    404: "itemNotFound",
    405: "badMethod",
    406: "notAcceptable",
    409: "conflict",
    413: "overLimit",
    415: "badMediaType",
    422: "unprocessableEntity",
    500: "instanceFault",
    501: "notImplemented",
    503: "serviceUnavailable",
}


def fault_name(status: int) -> str:
    """The Trove fault name for ``status`` (webob's rule for statuses Trove does not list)."""
    if status in FAULT_NAMES:
        return FAULT_NAMES[status]
    try:
        words = http.HTTPStatus(status).phrase.split()
    except ValueError:
        return "instanceFault" if status >= 500 else "badRequest"
    joined = "".join(c for c in "".join(w[:1].upper() + w[1:] for w in words) if c.isalnum())
    return joined[:1].lower() + joined[1:]


def request_id_of(request: Request) -> str:
    """The ``req-<uuid>`` id of this request (set by ``RequestIdMiddleware``)."""
    rid = request.scope.get(_SCOPE_KEY)
    return rid if isinstance(rid, str) else "req-unknown"


def error_body(path: str, status: int, message: str, fault: str | None = None) -> dict[str, Any]:
    """The JSON error body for a request to ``path``: Keystone's shape under ``/identity``,
    Trove's fault shape everywhere else."""
    if _is_identity(path):
        try:
            title = http.HTTPStatus(status).phrase
        except ValueError:
            title = "Error"
        return {"error": {"code": status, "title": title, "message": message}}
    return {fault or fault_name(status): {"code": status, "message": message}}


def error_response(
    path: str,
    status: int,
    message: str,
    fault: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(path, status, message, fault), status_code=status, headers=headers
    )


def _is_identity(path: str) -> bool:
    return path == IDENTITY_PREFIX or path.startswith(IDENTITY_PREFIX + "/")


# -- handlers ------------------------------------------------------------------------------------


async def _coffer_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, CofferError)
    status = exc.status
    # An instance may override the class's status (RemoteError carries the remote one); the
    # class's fault name then no longer matches, so derive it from the status.
    fault = exc.fault if type(exc).status == status else fault_name(status)
    if status >= 500:
        log.warning(
            "%s %s failed with %s (%s): %s",
            request.method,
            request.url.path,
            type(exc).__name__,
            request_id_of(request),
            exc.message,
        )
    return error_response(request.url.path, status, exc.message, fault)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    headers = dict(exc.headers or {})
    default_detail = _phrase(status)
    detail = exc.detail if isinstance(exc.detail, str) and exc.detail != default_detail else None
    if status == 404:
        message = detail or (
            f"The resource could not be found: nothing answers at {request.url.path}."
        )
    elif status == 405:
        allowed = headers.get("allow") or headers.get("Allow")
        hint = f"; allowed: {allowed}" if allowed else ""
        message = detail or f"Method {request.method} is not allowed on {request.url.path}{hint}."
    else:
        message = detail or f"{default_detail}."
    return error_response(request.url.path, status, message, headers=headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    message = "Validation error: " + describe_validation_errors(exc.errors())
    return error_response(request.url.path, 400, message)


def describe_validation_errors(errors: Sequence[Any]) -> str:
    """One sentence naming each invalid field and why, e.g. ``version.name: Field required``.

    Input values are never quoted, so a rejected password cannot leak into the message.
    """
    parts: list[str] = []
    for error in errors:
        loc = [str(part) for part in error.get("loc", ())]
        kind = error.get("type", "")
        if kind == "json_invalid":
            reason = (error.get("ctx") or {}).get("error", "malformed JSON")
            parts.append(f"the request body is not valid JSON ({reason})")
            continue
        where = _location(loc)
        msg = str(error.get("msg", "invalid value"))
        if where == "body" and kind == "missing":
            parts.append("the request body is missing; send a JSON object")
        elif where == "body" and kind in ("dict_type", "model_attributes_type", "model_type"):
            parts.append(
                "the request body must be a JSON object (sent with Content-Type: application/json)"
            )
        else:
            parts.append(f"{where}: {msg}")
    return "; ".join(parts) + "." if parts else "the request is not valid."


def _location(loc: list[str]) -> str:
    if not loc:
        return "request"
    source, rest = loc[0], loc[1:]
    if source == "body":
        return ".".join(rest) if rest else "body"
    if source in ("query", "path", "header", "cookie"):
        return f"{source} parameter {'.'.join(rest)}"
    return ".".join(loc)


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def install_error_handlers(app: FastAPI) -> None:
    """Register every handler and the request-id middleware on ``app``."""
    app.add_exception_handler(CofferError, _coffer_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_middleware(RequestIdMiddleware)


# -- middleware ----------------------------------------------------------------------------------


class RequestIdMiddleware:
    """Tags every HTTP response with ``X-Openstack-Request-Id`` and turns an unhandled exception
    into a 500 ``instanceFault`` that quotes an error id (the traceback goes to the log)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = f"req-{uuid.uuid4()}"
        scope[_SCOPE_KEY] = request_id
        header = (REQUEST_ID_HEADER.lower().encode("latin-1"), request_id.encode("latin-1"))
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*_without_request_id(message.get("headers", [])), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            error_id = str(uuid.uuid4())
            log.exception(
                "unhandled error %s (%s) on %s %s",
                error_id,
                request_id,
                scope.get("method", "?"),
                scope.get("path", "?"),
            )
            if started:
                raise  # too late for an error body; let the server drop the connection
            message = (
                "The server hit an unexpected error and did not complete the request; "
                f"quote error id {error_id} when reporting it."
            )
            body = json.dumps(error_body(scope.get("path", ""), 500, message)).encode()
            await send_with_id(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send_with_id({"type": "http.response.body", "body": body})


def _without_request_id(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    name = REQUEST_ID_HEADER.lower().encode("latin-1")
    return [(k, v) for k, v in headers if k.lower() != name]
