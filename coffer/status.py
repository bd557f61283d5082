"""Persisted statuses: a compatibility contract.

Every value here is stored in the control DB. Values are unique (``@unique``) and never reused or
renamed; add new members at the end. The Trove ``status`` and ``operating_status`` strings the API
shows are derived from these in ``trove_status`` / ``trove_operating_status``, never stored.
"""

from __future__ import annotations

from enum import StrEnum, unique


@unique
class Task(StrEnum):
    """What the control plane is doing to an instance (desired-state side)."""

    NONE = "none"
    BUILDING = "building"
    DELETING = "deleting"
    REBOOTING = "rebooting"
    RESIZING = "resizing"
    RESTART_REQUIRED = "restart_required"
    UPDATING = "updating"
    UPGRADING = "upgrading"
    DETACHING = "detaching"
    PROMOTING = "promoting"
    EJECTING = "ejecting"
    BUILDING_ERROR_SERVER = "building_error_server"
    BUILDING_ERROR_TIMEOUT_GA = "building_error_timeout_ga"
    BUILDING_ERROR_GUEST = "building_error_guest"
    DELETING_ERROR = "deleting_error"

    @property
    def is_error(self) -> bool:
        return "error" in self.value


@unique
class ServerStatus(StrEnum):
    """What the compute driver last saw of the instance's server (process tree)."""

    BUILD = "build"
    ACTIVE = "active"
    SHUTOFF = "shutoff"
    ERROR = "error"
    DELETED = "deleted"


@unique
class ServiceStatus(StrEnum):
    """What the guest agent reports of the engine (observed; written only by the conductor)."""

    NEW = "new"
    BUILDING = "building"
    RUNNING = "running"
    HEALTHY = "healthy"
    SHUTDOWN = "shutdown"
    CRASHED = "crashed"
    FAILED = "failed"
    BLOCKED = "blocked"
    UNKNOWN = "unknown"
    DELETED = "deleted"
    RESTART_REQUIRED = "restart_required"
    FAILED_TIMEOUT_GUESTAGENT = "failed_timeout_guestagent"


#: Engine statuses in which database/user/root calls may be sent to the guest.
SERVICE_READY = frozenset({ServiceStatus.RUNNING, ServiceStatus.HEALTHY})

_SERVICE_API = {
    ServiceStatus.NEW: "NEW",
    ServiceStatus.BUILDING: "BUILD",
    ServiceStatus.RUNNING: "ACTIVE",
    ServiceStatus.HEALTHY: "HEALTHY",
    ServiceStatus.SHUTDOWN: "SHUTDOWN",
    ServiceStatus.CRASHED: "SHUTDOWN",
    ServiceStatus.FAILED: "FAILED",
    ServiceStatus.BLOCKED: "BLOCKED",
    ServiceStatus.UNKNOWN: "ERROR",
    ServiceStatus.DELETED: "DELETED",
    ServiceStatus.RESTART_REQUIRED: "RESTART_REQUIRED",
    ServiceStatus.FAILED_TIMEOUT_GUESTAGENT: "ERROR",
}

_TASK_API = {
    Task.REBOOTING: "REBOOT",
    Task.RESIZING: "RESIZE",
    Task.UPGRADING: "UPGRADE",
    Task.RESTART_REQUIRED: "RESTART_REQUIRED",
    Task.PROMOTING: "PROMOTE",
    Task.EJECTING: "EJECT",
    Task.DETACHING: "DETACH",
}


def trove_status(
    task: Task, server: ServerStatus, service: ServiceStatus, backup_running: bool = False
) -> str:
    """The Trove ``status`` string, derived in Trove's order of rules."""
    if task.is_error:
        return "ERROR"
    if task is Task.BUILDING:
        return "ERROR" if server is ServerStatus.ERROR else "BUILD"
    if task in _TASK_API:
        return _TASK_API[task]
    if task is Task.DELETING:
        return "SHUTDOWN"
    if backup_running:
        return "BACKUP"
    if server is ServerStatus.ACTIVE:
        if service in (ServiceStatus.SHUTDOWN, ServiceStatus.CRASHED):
            return "SHUTDOWN"
        if service in (ServiceStatus.FAILED, ServiceStatus.FAILED_TIMEOUT_GUESTAGENT):
            return "ERROR"
        return "ACTIVE"
    if server is ServerStatus.SHUTOFF or server is ServerStatus.DELETED:
        return "SHUTDOWN"
    if server is ServerStatus.ERROR:
        return "ERROR"
    if server is ServerStatus.BUILD:
        return "BUILD"
    return "UNKNOWN"


def trove_operating_status(task: Task, server: ServerStatus, service: ServiceStatus) -> str:
    """The Trove ``operating_status``: the engine's state, shown only when nothing is in flight."""
    if task is not Task.NONE or server is not ServerStatus.ACTIVE:
        return ""
    return _SERVICE_API[service]
