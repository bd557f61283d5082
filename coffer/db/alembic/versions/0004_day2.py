"""configuration groups, parameter rules and instance events

Revision ID: 0004_day2
Revises: 0003_backups
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_day2"
down_revision = "0003_backups"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "datastore_configuration_parameters",
        sa.Column("datastore_version_id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("data_type", sa.String(length=16), nullable=False),
        sa.Column("restart_required", sa.Boolean(), nullable=False),
        sa.Column("min_size", sa.String(length=40), nullable=True),
        sa.Column("max_size", sa.String(length=40), nullable=True),
        sa.Column("allowed_values", sa.JSON(), nullable=True),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.Column("updated", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["datastore_version_id"],
            ["datastore_versions.id"],
            name="fk_parameter_rules_version",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "datastore_version_id", "name", name=op.f("pk_datastore_configuration_parameters")
        ),
    )
    op.create_table(
        "configurations",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("description", sa.String(length=255), nullable=True),
        sa.Column("datastore_version_id", sa.String(length=36), nullable=False),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.Column("updated", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["datastore_version_id"],
            ["datastore_versions.id"],
            name=op.f("fk_configurations_datastore_version_id_datastore_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_configurations")),
    )
    with op.batch_alter_table("configurations", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_configurations_tenant_id"), ["tenant_id"], unique=False
        )
    op.create_table(
        "configuration_values",
        sa.Column("configuration_id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("value", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["configuration_id"],
            ["configurations.id"],
            name=op.f("fk_configuration_values_configuration_id_configurations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("configuration_id", "name", name=op.f("pk_configuration_values")),
    )
    op.create_table(
        "instance_events",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("instance_id", sa.String(length=36), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.String(length=64), nullable=True),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("fault_message", sa.String(length=255), nullable=True),
        sa.Column("operation_id", sa.String(length=36), nullable=True),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.Column("finished", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["instance_id"],
            ["instances.id"],
            name=op.f("fk_instance_events_instance_id_instances"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_instance_events")),
    )
    with op.batch_alter_table("instance_events", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_instance_events_instance_id"), ["instance_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("instance_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_instance_events_instance_id"))
    op.drop_table("instance_events")
    op.drop_table("configuration_values")
    with op.batch_alter_table("configurations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_configurations_tenant_id"))
    op.drop_table("configurations")
    op.drop_table("datastore_configuration_parameters")
