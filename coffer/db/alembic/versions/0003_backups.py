"""backups, backup schedules and strategies

Revision ID: 0003_backups
Revises: 35e95c8045ea
"""

from __future__ import annotations

revision = "0003_backups"
down_revision = "35e95c8045ea"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
