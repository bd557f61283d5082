"""The Coffer API application: Trove v1.0, the embedded identity subset, and the OpenAPI document.

``create_app(services)`` is all a process needs to serve the API (``uvicorn`` runs the result).
Layout of the URL space:

* ``/``: Trove versions document; ``/v1.0/``: the single version.
* ``/identity/...``: the Keystone v3 subset (``coffer.api.routes.identity``); not mounted when
  tokens are validated by an external Keystone (``[keystone_authtoken]``), so it answers 404.
* ``/v1.0/{tenant_id}/...``: the Trove API (catalogue and instance routers).
* ``/openapi.json``: the OpenAPI document.
"""

from __future__ import annotations

from dataclasses import replace
from importlib import metadata
from typing import Any

from fastapi import FastAPI, Request

from coffer.api.context import Services, public_base_url
from coffer.api.errors import install_error_handlers
from coffer.api.responses import install_hot_routes

# ``instances`` holds the instance, database, user and root routes. It is a plain import, not a
# discovery, so a broken module fails loudly at start instead of silently losing routes.
from coffer.api.routes import (
    catalog,
    configurations,
    flavors_hot,
    identity,
    instance_logs,
    instances,
    instances_hot,
)

__all__ = ["Services", "create_app"]

#: Trove's only API version and the date Trove has always advertised for it.
API_VERSION = "v1.0"
_VERSION_UPDATED = "2012-08-01T00:00:00Z"


def _version_doc(request: Request) -> dict[str, Any]:
    return {
        "id": API_VERSION,
        "status": "CURRENT",
        "updated": _VERSION_UPDATED,
        "links": [{"rel": "self", "href": f"{public_base_url(request)}/{API_VERSION}/"}],
    }


def _package_version() -> str:
    # The installed distribution's version; ``coffer.__version__`` is not reliably reachable when
    # the package is installed in editable mode and imported from outside the source tree.
    try:
        return metadata.version("coffer")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _with_token_validator(services: Services) -> Services:
    """``services`` with the external Keystone validator when ``[keystone_authtoken]`` asks
    for one (and none was given); otherwise unchanged."""
    options = services.settings.keystone_authtoken
    if services.token_validator is not None or not options.enabled:
        return services
    from coffer.identity.external import KeystoneTokenValidator

    return replace(services, token_validator=KeystoneTokenValidator(options))


def create_app(services: Services) -> FastAPI:
    """Build the API application around ``services`` (kept on ``app.state.services``).

    With ``[keystone_authtoken] auth_url`` set, tokens are validated by that Keystone and the
    embedded ``/identity`` routes are left out. Raises ``KeystoneMiddlewareMissing`` when that
    mode is configured but keystonemiddleware is not installed.
    """
    services = _with_token_validator(services)
    app = FastAPI(
        title="Coffer",
        version=_package_version(),
        summary="Database-as-a-Service speaking the OpenStack Trove v1.0 API",
        # The interactive docs pages load scripts from a CDN; the JSON document is enough.
        docs_url=None,
        redoc_url=None,
    )
    app.state.services = services
    install_error_handlers(app)

    @app.get("/", summary="Trove API versions")
    def versions(request: Request) -> dict[str, Any]:
        return {"versions": [_version_doc(request)]}

    @app.get("/v1.0", include_in_schema=False)
    @app.get("/v1.0/", summary="The v1.0 version document")
    def version(request: Request) -> dict[str, Any]:
        return {"version": _version_doc(request)}

    if services.embedded_identity:
        app.include_router(identity.router)
    app.include_router(catalog.router)
    app.include_router(instances.router)
    from coffer.api.routes import backup_schedules, backups

    app.include_router(backups.router)
    app.include_router(backup_schedules.router)
    app.include_router(configurations.router)
    app.include_router(instance_logs.router)
    # The busiest reads, in front of their FastAPI routes (see ``coffer.api.responses``).
    install_hot_routes(app, [*instances_hot.hot_routes(), *flavors_hot.hot_routes()])
    return app
