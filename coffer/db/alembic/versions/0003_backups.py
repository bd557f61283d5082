"""backups and backup strategies

Revision ID: 0003_backups
Revises: 35e95c8045ea

Backup schedules (issue 5 item 5) are not part of this revision yet.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_backups"
down_revision = "35e95c8045ea"
branch_labels = None
depends_on = None

_INDEXED = ("created", "deleted", "instance_id", "parent_id", "tenant_id")


def upgrade() -> None:
    op.create_table(
        "backups",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("description", sa.String(length=255), nullable=True),
        sa.Column("instance_id", sa.String(length=36), nullable=True),
        sa.Column("datastore_version_id", sa.String(length=36), nullable=False),
        sa.Column("parent_id", sa.String(length=36), nullable=True),
        sa.Column("backup_type", sa.String(length=16), nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                "new",
                "building",
                "saving",
                "completed",
                "failed",
                "delete_failed",
                "restored",
                name="backupstate",
                native_enum=False,
                length=40,
            ),
            nullable=False,
        ),
        sa.Column("fail_reason", sa.Text(), nullable=True),
        sa.Column("storage_driver", sa.String(length=32), nullable=False),
        sa.Column("storage_key", sa.String(length=255), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=True),
        sa.Column("raw_size", sa.BigInteger(), nullable=True),
        sa.Column("checksum", sa.String(length=64), nullable=True),
        sa.Column("wrapped_key", sa.Text(), nullable=True),
        sa.Column("engine_position", sa.JSON(), nullable=False),
        sa.Column("volume_size", sa.Integer(), nullable=False),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.Column("updated", sa.DateTime(), nullable=False),
        sa.Column("completed", sa.DateTime(), nullable=True),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.Column("deleted_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["datastore_version_id"],
            ["datastore_versions.id"],
            name=op.f("fk_backups_datastore_version_id_datastore_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_backups")),
    )
    with op.batch_alter_table("backups", schema=None) as batch_op:
        for column in _INDEXED:
            batch_op.create_index(batch_op.f(f"ix_backups_{column}"), [column], unique=False)
    op.create_table(
        "backup_strategies",
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("instance_id", sa.String(length=36), nullable=False),
        sa.Column("backend", sa.String(length=32), nullable=False),
        sa.Column("swift_container", sa.String(length=255), nullable=False),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.Column("updated", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "instance_id", name=op.f("pk_backup_strategies")),
    )


def downgrade() -> None:
    op.drop_table("backup_strategies")
    with op.batch_alter_table("backups", schema=None) as batch_op:
        for column in reversed(_INDEXED):
            batch_op.drop_index(batch_op.f(f"ix_backups_{column}"))
    op.drop_table("backups")
