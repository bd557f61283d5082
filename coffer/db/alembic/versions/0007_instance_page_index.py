"""an index that serves a project's instance list page by itself

Revision ID: 0007_instance_page_index
Revises: 0006_archive
"""

from __future__ import annotations

from alembic import op

revision = "0007_instance_page_index"
down_revision = "0006_archive"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_instances_page",
        "instances",
        ["tenant_id", "deleted", "created", "id"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_instances_page", table_name="instances")
