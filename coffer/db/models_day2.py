"""Control-DB tables for day-2 operations (issue 6): configuration groups and their values,
parameter rules per datastore version, instance events.

Imported at the bottom of ``coffer.db.models`` so every table shares one metadata. Schema changes
here go into the Alembic revision ``0004_day2``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from coffer.db.models import Base, new_id, utcnow


class ConfigurationParameterRule(Base):
    """What a configuration group may set on one datastore version: one row per parameter.

    Trove's ``datastore_configuration_parameters`` table. ``name`` is stored lower-case (every
    engine here treats its parameter names case-insensitively). ``min_size``/``max_size`` are
    decimal strings as in Trove, because the engines' limits (2^64-1) do not fit a BIGINT.
    ``allowed_values`` is Coffer's addition for string parameters that take one of a fixed set.
    Deleting the version deletes its rules.
    """

    __tablename__ = "datastore_configuration_parameters"

    datastore_version_id: Mapped[str] = mapped_column(
        String(36),
        # Named by hand: the naming convention's name is longer than MySQL's 64-character limit.
        ForeignKey("datastore_versions.id", ondelete="CASCADE", name="fk_parameter_rules_version"),
        primary_key=True,
    )
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    #: "integer", "float", "string" or "boolean".
    data_type: Mapped[str] = mapped_column(String(16))
    restart_required: Mapped[bool] = mapped_column(Boolean, default=False)
    min_size: Mapped[str | None] = mapped_column(String(40), nullable=True)
    max_size: Mapped[str | None] = mapped_column(String(40), nullable=True)
    allowed_values: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    created: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class Configuration(Base):
    """A configuration group: a project's named set of parameter values for one datastore
    version. Instances point at it through ``instances.configuration_id``; a group is deleted
    only while no live instance does."""

    __tablename__ = "configurations"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(255))
    description: Mapped[str | None] = mapped_column(String(255), nullable=True)
    datastore_version_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("datastore_versions.id")
    )
    created: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class ConfigurationValue(Base):
    """One value of a group, keyed by the rule's (lower-case) parameter name; ``value`` keeps
    its JSON type (an integer stays an integer)."""

    __tablename__ = "configuration_values"

    configuration_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("configurations.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    value: Mapped[Any] = mapped_column(JSON)


class InstanceEvent(Base):
    """One operation on an instance as its owner sees it (issue 6 item 8): what was asked
    (``action`` and ``details``), by whom (``user_id``; None when Coffer started it itself, e.g.
    to apply a changed configuration group), when (``created``, ``finished``), and how it ended
    (``state``: running, succeeded or failed, with ``fault_message`` saying why it failed).
    ``operation_id`` ties it to the durable operation that carried it out. Kept with the
    instance's row (instances are deleted softly), so the history outlives a delete."""

    __tablename__ = "instance_events"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    instance_id: Mapped[str] = mapped_column(String(36), ForeignKey("instances.id"), index=True)
    action: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    state: Mapped[str] = mapped_column(String(16), default="running")
    fault_message: Mapped[str | None] = mapped_column(String(255), nullable=True)
    operation_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    created: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    finished: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
