"""backup schedules and their runs

Revision ID: 0005_schedules
Revises: 0004_day2
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_schedules"
down_revision = "0004_day2"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "backup_schedules",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("instance_id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("description", sa.String(length=255), nullable=True),
        sa.Column("pattern", sa.String(length=128), nullable=False),
        sa.Column("retention_count", sa.Integer(), nullable=True),
        sa.Column("retention_days", sa.Integer(), nullable=True),
        sa.Column("incremental", sa.Boolean(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("next_run", sa.DateTime(), nullable=True),
        sa.Column("last_run", sa.DateTime(), nullable=True),
        sa.Column("last_result", sa.String(length=16), nullable=True),
        sa.Column("last_reason", sa.Text(), nullable=True),
        sa.Column("last_backup_id", sa.String(length=36), nullable=True),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.Column("updated", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_backup_schedules")),
    )
    with op.batch_alter_table("backup_schedules", schema=None) as batch_op:
        for column in ("instance_id", "next_run", "tenant_id"):
            batch_op.create_index(
                batch_op.f(f"ix_backup_schedules_{column}"), [column], unique=False
            )
    op.create_table(
        "backup_schedule_runs",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("schedule_id", sa.String(length=36), nullable=False),
        sa.Column("slot", sa.DateTime(), nullable=False),
        sa.Column("backup_id", sa.String(length=36), nullable=True),
        sa.Column(
            "state",
            sa.Enum(
                "started",
                "refused",
                "completed",
                "failed",
                name="runstate",
                native_enum=False,
                length=40,
            ),
            nullable=False,
        ),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.Column("finished", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["schedule_id"],
            ["backup_schedules.id"],
            name=op.f("fk_backup_schedule_runs_schedule_id_backup_schedules"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_backup_schedule_runs")),
        sa.UniqueConstraint(
            "schedule_id", "slot", name=op.f("uq_backup_schedule_runs_schedule_id")
        ),
    )
    with op.batch_alter_table("backup_schedule_runs", schema=None) as batch_op:
        for column in ("backup_id", "schedule_id"):
            batch_op.create_index(
                batch_op.f(f"ix_backup_schedule_runs_{column}"), [column], unique=False
            )


def downgrade() -> None:
    with op.batch_alter_table("backup_schedule_runs", schema=None) as batch_op:
        for column in ("backup_id", "schedule_id"):
            batch_op.drop_index(batch_op.f(f"ix_backup_schedule_runs_{column}"))
    op.drop_table("backup_schedule_runs")
    with op.batch_alter_table("backup_schedules", schema=None) as batch_op:
        for column in ("instance_id", "next_run", "tenant_id"):
            batch_op.drop_index(batch_op.f(f"ix_backup_schedules_{column}"))
    op.drop_table("backup_schedules")
