"""configuration groups, parameter rules and instance events

Revision ID: 0004_day2
Revises: 0003_backups
"""

from __future__ import annotations

revision = "0004_day2"
down_revision = "0003_backups"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
