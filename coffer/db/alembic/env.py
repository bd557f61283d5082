"""Alembic environment: the URL and connection come from Coffer's settings (see migrate.py)."""

from __future__ import annotations

from alembic import context

from coffer.db.models import Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # pragma: no cover - only through coffer.db.migrate
    raise RuntimeError("run migrations through `coffer manage db upgrade`")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
