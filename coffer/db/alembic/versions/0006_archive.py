"""continuous log archives: each instance's archived extent

Revision ID: 0006_archive
Revises: 0005_schedules
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_archive"
down_revision = "0005_schedules"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "instance_archives",
        sa.Column("instance_id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("storage_driver", sa.String(length=32), nullable=False),
        sa.Column("prefix", sa.String(length=255), nullable=False),
        sa.Column("newest_segment", sa.String(length=64), nullable=True),
        sa.Column("newest_lsn", sa.String(length=32), nullable=True),
        sa.Column("newest_time", sa.DateTime(), nullable=True),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.Column("updated", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("instance_id"),
    )
    op.create_index(
        op.f("ix_instance_archives_tenant_id"), "instance_archives", ["tenant_id"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_instance_archives_tenant_id"), table_name="instance_archives")
    op.drop_table("instance_archives")
