"""quotas: limits, usage and per-holder charges

Revision ID: 35e95c8045ea
Revises: 2d3e073f3ba2
Create Date: 2026-11-22 00:33:49.811740

Instances that already exist are charged here, so usage is right from the first request after
the upgrade (an instance whose create failed holds nothing, as ``coffer.quotas`` releases it).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "35e95c8045ea"
down_revision = "2d3e073f3ba2"
branch_labels = None
depends_on = None

_LIVE = "i.deleted = :no AND i.task NOT LIKE 'building_error%'"


def upgrade() -> None:
    op.create_table(
        "quota_charges",
        sa.Column("holder_id", sa.String(length=80), nullable=False),
        sa.Column("resource", sa.String(length=32), nullable=False),
        sa.Column("project_id", sa.String(length=64), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("holder_id", "resource", name=op.f("pk_quota_charges")),
    )
    with op.batch_alter_table("quota_charges", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_quota_charges_project_id"), ["project_id"], unique=False
        )
    op.create_table(
        "quota_usages",
        sa.Column("project_id", sa.String(length=64), nullable=False),
        sa.Column("resource", sa.String(length=32), nullable=False),
        sa.Column("in_use", sa.BigInteger(), nullable=False),
        sa.Column("updated", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("project_id", "resource", name=op.f("pk_quota_usages")),
    )
    op.create_table(
        "quotas",
        sa.Column("project_id", sa.String(length=64), nullable=False),
        sa.Column("resource", sa.String(length=32), nullable=False),
        sa.Column("hard_limit", sa.BigInteger(), nullable=False),
        sa.Column("updated", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("project_id", "resource", name=op.f("pk_quotas")),
    )
    _charge_existing_instances()


def _charge_existing_instances() -> None:
    conn = op.get_bind()
    charges = {
        "instances": "1",
        "volumes": "i.volume_size",
        "ram": "COALESCE(f.ram, 0)",
    }
    for resource, amount in charges.items():
        conn.execute(
            sa.text(
                "INSERT INTO quota_charges (holder_id, resource, project_id, amount, created) "
                f"SELECT i.id, '{resource}', i.tenant_id, {amount}, CURRENT_TIMESTAMP "
                f"FROM instances i LEFT JOIN flavors f ON f.id = i.flavor_id WHERE {_LIVE}"
            ),
            {"no": False},
        )
    conn.execute(
        sa.text(
            "INSERT INTO quota_usages (project_id, resource, in_use, updated) "
            "SELECT project_id, resource, SUM(amount), CURRENT_TIMESTAMP FROM quota_charges "
            "GROUP BY project_id, resource"
        )
    )


def downgrade() -> None:
    op.drop_table("quotas")
    op.drop_table("quota_usages")
    with op.batch_alter_table("quota_charges", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_quota_charges_project_id"))
    op.drop_table("quota_charges")
