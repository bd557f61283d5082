"""restore progress: the bytes a restoring guest has verified and restored

Revision ID: 0008_restore_progress
Revises: 0007_instance_page_index
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_restore_progress"
down_revision = "0007_instance_page_index"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "restore_progress",
        sa.Column("instance_id", sa.String(length=36), nullable=False),
        sa.Column("phase", sa.String(length=16), nullable=False),
        sa.Column("verified_bytes", sa.BigInteger(), nullable=False),
        sa.Column("restored_bytes", sa.BigInteger(), nullable=False),
        sa.Column("total_bytes", sa.BigInteger(), nullable=True),
        sa.Column("rate", sa.BigInteger(), nullable=False),
        sa.Column("reported_at", sa.DateTime(), nullable=False),
        sa.Column("updated", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["instance_id"],
            ["instances.id"],
            name=op.f("fk_restore_progress_instance_id_instances"),
        ),
        sa.PrimaryKeyConstraint("instance_id", name=op.f("pk_restore_progress")),
    )


def downgrade() -> None:
    op.drop_table("restore_progress")
