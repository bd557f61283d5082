"""Queue names of the services, and the key id of control-plane traffic.

Kept apart from ``coffer.controlplane`` so a guest agent can name its queues without importing
the control plane (SQLAlchemy, Alembic, the settings), which would triple its memory.
"""

from __future__ import annotations

TASKMANAGER_TOPIC = "taskmanager"
CONDUCTOR_TOPIC = "conductor"
CONTROL_KEY_ID = "control"


def guest_topic(instance_id: str) -> str:
    return f"guestagent.{instance_id}"
