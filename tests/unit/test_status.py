from enum import StrEnum

import pytest

from coffer.status import (
    ServerStatus,
    ServiceStatus,
    Task,
    trove_operating_status,
    trove_status,
)


@pytest.mark.parametrize("enum", [Task, ServerStatus, ServiceStatus])
def test_persisted_values_are_unique_and_lowercase(enum: type[StrEnum]) -> None:
    values = [m.value for m in enum]
    assert len(values) == len(set(values))
    assert all(v == v.lower() for v in values)


def test_build_then_active_then_healthy() -> None:
    assert trove_status(Task.BUILDING, ServerStatus.BUILD, ServiceStatus.NEW) == "BUILD"
    assert trove_operating_status(Task.BUILDING, ServerStatus.BUILD, ServiceStatus.NEW) == ""
    assert trove_status(Task.NONE, ServerStatus.ACTIVE, ServiceStatus.HEALTHY) == "ACTIVE"
    assert (
        trove_operating_status(Task.NONE, ServerStatus.ACTIVE, ServiceStatus.HEALTHY) == "HEALTHY"
    )


def test_errors_and_shutdown() -> None:
    assert (
        trove_status(Task.BUILDING_ERROR_GUEST, ServerStatus.ERROR, ServiceStatus.FAILED) == "ERROR"
    )
    assert trove_status(Task.NONE, ServerStatus.ACTIVE, ServiceStatus.SHUTDOWN) == "SHUTDOWN"
    assert (
        trove_operating_status(Task.NONE, ServerStatus.ACTIVE, ServiceStatus.SHUTDOWN) == "SHUTDOWN"
    )
    assert trove_status(Task.DELETING, ServerStatus.ACTIVE, ServiceStatus.HEALTHY) == "SHUTDOWN"
    assert (
        trove_operating_status(
            Task.NONE, ServerStatus.ACTIVE, ServiceStatus.FAILED_TIMEOUT_GUESTAGENT
        )
        == "ERROR"
    )


def test_backup_shows_while_running() -> None:
    assert (
        trove_status(Task.NONE, ServerStatus.ACTIVE, ServiceStatus.HEALTHY, backup_running=True)
        == "BACKUP"
    )
