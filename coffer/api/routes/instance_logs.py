"""An instance's guest logs: Trove's ``GET/POST /instances/{id}/log``, and reading a published
log's text (a Coffer extension).

* ``GET .../log`` lists the logs of the instance's engine with Trove's fields (name, type,
  status, published, pending, container, prefix, metafile).
* ``POST .../log`` ``{"name", "enable"?, "disable"?, "publish"?, "discard"?}`` (flags 0 or 1):
  the name alone shows the log; ``enable`` with ``disable`` is a 400; ``publish`` switches a
  USER log on unless ``disable`` is given; a SYS log cannot be switched. Unknown logs are 404.
  Everything is checked here, before the guest is asked to change anything.
* ``GET .../log/{name}?lines=N`` (extension): the published text, all of it or its last ``N``
  lines, as ``text/plain``. Published logs live in Coffer's backup storage, which tenants
  cannot reach, so this is how they read them.

Publishing goes to the ``[storage]`` backup store, under ``[DEFAULT]
guest_log_container_name`` (Trove's ``database_logs``), in pieces of ``guest_log_limit`` bytes;
see ``coffer.guest.logs`` for the object names.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from coffer.api.audit import AuditedRoute
from coffer.api.context import RequestContext
from coffer.api.policy import authorize
from coffer.api.routes.instance_support import api_error, control_plane, load_instance
from coffer.controlplane import ControlPlane
from coffer.datastores.registry import require_capability
from coffer.db.models import DatastoreVersion, Instance
from coffer.db.session import transaction
from coffer.errors import (
    NotFound,
    RemoteError,
    UnprocessableEntity,
    ValidationError,
)
from coffer.guest.config.logs import LogSpec, LogType, find_log
from coffer.guest.datastores.base import Capability
from coffer.status import Task

LOG = logging.getLogger(__name__)

router = APIRouter(prefix="/v1.0/{tenant_id}", tags=["instances"], route_class=AuditedRoute)

#: Most lines ``lines=`` may ask for.
MAX_LINES = 100_000
_MEDIA_TYPE = "text/plain; charset=utf-8"


class LogActionBody(BaseModel):
    """Trove's guest log action body; the flags are Trove's ``boolean_string`` (0 or 1)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    enable: int | None = Field(None, ge=0, le=1)
    disable: int | None = Field(None, ge=0, le=1)
    publish: int | None = Field(None, ge=0, le=1)
    discard: int | None = Field(None, ge=0, le=1)


def _log_instance(request: Request, ctx: RequestContext, instance_id: str) -> tuple[Instance, str]:
    """The caller's instance and its manager; 501 for an engine without logs, 422 while it is
    still being built (its guest is not serving yet)."""
    cp = control_plane(request)
    with cp.session_factory() as session:
        inst = load_instance(session, ctx, instance_id)
        version = session.get(DatastoreVersion, inst.datastore_version_id)
        assert version is not None
        require_capability(version.manager, Capability.LOGS)
        if inst.task is Task.BUILDING:
            raise UnprocessableEntity(
                f"Instance {inst.id} is still being built; its logs can be read once it is ACTIVE."
            )
        return inst, version.manager


def _options(cp: ControlPlane) -> dict[str, Any]:
    settings = cp.settings.default
    return {
        "container": settings.guest_log_container_name,
        "limit": settings.guest_log_limit,
        "long_query_ms": settings.guest_log_long_query_time,
    }


def _call(cp: ControlPlane, inst: Instance, method: str, timeout: float, **kwargs: Any) -> Any:
    try:
        return cp.guest(inst.id).call(method, timeout=timeout, **kwargs)
    except RemoteError as exc:
        raise api_error(exc) from exc


@router.get("/instances/{instance_id}/log")
def list_logs(
    request: Request,
    instance_id: str,
    ctx: Annotated[RequestContext, Depends(authorize("instance:guest_log_list"))],
) -> dict[str, Any]:
    inst, _ = _log_instance(request, ctx, instance_id)
    cp = control_plane(request)
    logs = _call(
        cp, inst, "guest_log_list", cp.settings.default.agent_call_low_timeout, **_options(cp)
    )
    return {"logs": logs}


@router.post("/instances/{instance_id}/log")
def log_action(
    request: Request,
    instance_id: str,
    body: LogActionBody,
    ctx: Annotated[RequestContext, Depends(authorize("instance:guest_log_action"))],
) -> dict[str, Any]:
    inst, manager = _log_instance(request, ctx, instance_id)
    spec = find_log(manager, body.name)
    enable, disable = bool(body.enable), bool(body.disable)
    publish, discard = bool(body.publish), bool(body.discard)
    if enable and disable:
        raise ValidationError("Give either enable or disable, not both.")
    if spec.type is LogType.SYS and (enable or disable):
        raise ValidationError(
            f"The {spec.name} log is a SYS log: it is always on and can only be published or "
            "discarded."
        )
    cp = control_plane(request)
    kwargs: dict[str, Any] = {"name": spec.name, **_options(cp)}
    timeout = cp.settings.default.agent_call_low_timeout
    if publish or discard:
        from coffer.taskmanager.backups import ensure_storage_ready, storage_spec

        ensure_storage_ready(cp.settings)
        kwargs["storage"] = storage_spec(cp.settings)
        timeout = cp.settings.default.agent_call_high_timeout
    for flag, value in (
        ("enable", enable),
        ("disable", disable),
        ("publish", publish),
        ("discard", discard),
    ):
        if value:
            kwargs[flag] = 1
    log: dict[str, Any] = _call(cp, inst, "guest_log_action", timeout, **kwargs)
    if log.get("status") == "Restart_Required":
        _mark_restart_required(cp, inst.id)
    return {"log": log}


def _mark_restart_required(cp: ControlPlane, instance_id: str) -> None:
    """A log that takes effect only at a restart puts the instance in RESTART_REQUIRED, as a
    restart-required configuration value does (a restart clears it)."""
    with transaction(cp.session_factory) as session:
        row = session.get(Instance, instance_id)
        if row is not None and row.task is Task.NONE:
            row.task = Task.RESTART_REQUIRED


# --- reading published logs (extension) -------------------------------------------------------


def _published_keys(cp: ControlPlane, inst: Instance, manager: str, spec: LogSpec) -> list[str]:
    from coffer.storage.base import storage_from_settings

    container = cp.settings.default.guest_log_container_name
    prefix = f"{container}/{inst.id}/{manager}-{spec.name}/"
    with storage_from_settings(cp.settings) as storage:
        keys = sorted(obj.key for obj in storage.list(prefix))
    if not keys:
        raise NotFound(
            f"The {spec.name} log of instance {inst.id} has not been published; publish it "
            'first (POST .../log {"name": "' + spec.name + '", "publish": 1}).'
        )
    return keys


def _read_all(cp: ControlPlane, keys: list[str]) -> Iterator[bytes]:
    from coffer.storage.base import storage_from_settings

    with storage_from_settings(cp.settings) as storage:
        for key in keys:
            yield from storage.get_stream(key)


def _last_lines(cp: ControlPlane, keys: list[str], count: int) -> str:
    """The last ``count`` lines over the pieces, reading from the newest piece back."""
    from coffer.storage.base import storage_from_settings

    lines: list[str] = []
    with storage_from_settings(cp.settings) as storage:
        for key in reversed(keys):
            text = b"".join(storage.get_stream(key)).decode("utf-8", errors="replace")
            lines = text.splitlines(keepends=True) + lines
            if len(lines) >= count:
                break
    return "".join(lines[-count:]) if count else ""


@router.get("/instances/{instance_id}/log/{name}")
def read_log(
    request: Request,
    instance_id: str,
    name: str,
    ctx: Annotated[RequestContext, Depends(authorize("instance:guest_log_contents"))],
    lines: int | None = Query(None),
) -> Any:
    """The published text of a log (all of it, or the last ``lines`` lines), ``text/plain``."""
    if lines is not None and not 0 <= lines <= MAX_LINES:
        raise ValidationError(f"lines must be a whole number from 0 to {MAX_LINES}.")
    cp = control_plane(request)
    with cp.session_factory() as session:
        inst = load_instance(session, ctx, instance_id)
        version = session.get(DatastoreVersion, inst.datastore_version_id)
        assert version is not None
        manager = version.manager
    require_capability(manager, Capability.LOGS)
    spec = find_log(manager, name)
    keys = _published_keys(cp, inst, manager, spec)
    if lines is not None:
        return PlainTextResponse(_last_lines(cp, keys, lines), media_type=_MEDIA_TYPE)
    return StreamingResponse(_read_all(cp, keys), media_type=_MEDIA_TYPE)
