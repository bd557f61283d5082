"""Control-DB tables (SQLAlchemy 2 typed declarative).

Schema changes go through an Alembic revision in ``coffer/db/alembic/versions``; the models and
the newest revision must agree (a unit test compares them).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from coffer.status import ServerStatus, ServiceStatus, Task

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def new_id() -> str:
    return str(uuid.uuid4())


def _enum(cls: type) -> Enum:
    return Enum(
        cls,
        native_enum=False,
        length=40,
        values_callable=lambda members: [m.value for m in members],
        validate_strings=True,
    )


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


# --- identity (embedded Keystone subset) -------------------------------------------------------


class Project(Base):
    __tablename__ = "projects"
    __table_args__ = (UniqueConstraint("domain_id", "name"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: uuid.uuid4().hex)
    name: Mapped[str] = mapped_column(String(64))
    domain_id: Mapped[str] = mapped_column(String(64), default="default")
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class User(Base):
    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("domain_id", "name"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: uuid.uuid4().hex)
    name: Mapped[str] = mapped_column(String(64))
    domain_id: Mapped[str] = mapped_column(String(64), default="default")
    password_hash: Mapped[str] = mapped_column(String(255))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    default_project_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Role(Base):
    __tablename__ = "roles"

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: uuid.uuid4().hex)
    name: Mapped[str] = mapped_column(String(64), unique=True)


class RoleAssignment(Base):
    __tablename__ = "role_assignments"

    user_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    project_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True
    )
    role_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("roles.id", ondelete="CASCADE"), primary_key=True
    )


# --- catalogue: datastores, versions, flavors --------------------------------------------------


class Datastore(Base):
    __tablename__ = "datastores"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    default_version_id: Mapped[str | None] = mapped_column(String(36), nullable=True)


class DatastoreVersion(Base):
    __tablename__ = "datastore_versions"
    __table_args__ = (UniqueConstraint("datastore_id", "name", "version"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    datastore_id: Mapped[str] = mapped_column(String(36), ForeignKey("datastores.id"))
    name: Mapped[str] = mapped_column(String(255))
    #: The engine version number (e.g. "10.11.6"); defaults to the name.
    version: Mapped[str] = mapped_column(String(255))
    #: Guest plugin short name: mariadb, mysql, postgresql, redis.
    manager: Mapped[str] = mapped_column(String(64))
    image_id: Mapped[str | None] = mapped_column(String(255), nullable=True)
    image_tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    packages: Mapped[list[str]] = mapped_column(JSON, default=list)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    registry_ext: Mapped[str | None] = mapped_column(String(255), nullable=True)
    repl_strategy: Mapped[str | None] = mapped_column(String(255), nullable=True)
    created: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class Flavor(Base):
    __tablename__ = "flavors"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    ram: Mapped[int] = mapped_column(Integer)  # MB
    vcpus: Mapped[int] = mapped_column(Integer)
    disk: Mapped[int] = mapped_column(Integer, default=0)  # GB
    ephemeral: Mapped[int] = mapped_column(Integer, default=0)


# --- instances ---------------------------------------------------------------------------------


class Instance(Base):
    __tablename__ = "instances"
    #: A page of a project's live instances (newest first) is read off this index alone.
    __table_args__ = (Index("ix_instances_page", "tenant_id", "deleted", "created", "id"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True)
    user_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    name: Mapped[str] = mapped_column(String(255))
    flavor_id: Mapped[str] = mapped_column(String(64))
    volume_size: Mapped[int] = mapped_column(Integer)
    datastore_version_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("datastore_versions.id")
    )
    task: Mapped[Task] = mapped_column(_enum(Task), default=Task.BUILDING)
    task_description: Mapped[str] = mapped_column(String(255), default="")
    server_status: Mapped[ServerStatus] = mapped_column(
        _enum(ServerStatus), default=ServerStatus.BUILD
    )
    access: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    configuration_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    slave_of_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    region_id: Mapped[str] = mapped_column(String(255), default="RegionOne")
    #: The per-instance bus key, wrapped (encrypted) by the master key.
    encrypted_key: Mapped[str] = mapped_column(Text)
    #: Driver-specific handle of the server (for the local driver: pids, paths).
    compute_ref: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    volume_used_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    volume_total_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    updated: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class ServiceStatusRow(Base):
    """The engine status as last reported by the guest (through the conductor)."""

    __tablename__ = "service_statuses"

    instance_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("instances.id"), primary_key=True
    )
    status: Mapped[ServiceStatus] = mapped_column(_enum(ServiceStatus), default=ServiceStatus.NEW)
    #: Guest-side wall-clock time of the report that set ``status``.
    reported_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    #: Control-plane time the report was accepted (heartbeat freshness is judged on this).
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class ConductorLastSeen(Base):
    """Highest sequence number accepted per instance and method; replays and stale reports drop."""

    __tablename__ = "conductor_lastseen"

    instance_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    method: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)


class InstanceFault(Base):
    __tablename__ = "instance_faults"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    instance_id: Mapped[str] = mapped_column(String(36), ForeignKey("instances.id"), index=True)
    message: Mapped[str] = mapped_column(String(255))
    details: Mapped[str] = mapped_column(Text, default="")
    created: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class AddressAllocation(Base):
    """An address handed to an instance; the primary key makes double allocation impossible."""

    __tablename__ = "address_allocations"

    address: Mapped[str] = mapped_column(String(45), primary_key=True)
    pool: Mapped[str] = mapped_column(String(16))  # "private" | "public"
    instance_id: Mapped[str] = mapped_column(String(36), index=True)
    created: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class RootEnabledHistory(Base):
    __tablename__ = "root_enabled_history"

    instance_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    user: Mapped[str] = mapped_column(String(255))
    created: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Operation(Base):
    """A long operation as a durable state machine (see ``coffer.taskmanager``).

    ``step`` is the next step to run; steps are idempotent, so a taskmanager that dies mid-step
    re-runs that step. ``lease_owner``/``lease_until`` stop two taskmanagers running one operation.
    """

    __tablename__ = "operations"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(64))
    instance_id: Mapped[str | None] = mapped_column(String(36), index=True, nullable=True)
    state: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    step: Mapped[str] = mapped_column(String(64), default="start")
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
    deadline: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


# --- quotas (see ``coffer.quotas``) ------------------------------------------------------------


class Quota(Base):
    """A project's limit for one resource, set by an admin; absent rows take the configured
    default (``max_<resource>_per_tenant``)."""

    __tablename__ = "quotas"

    project_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    resource: Mapped[str] = mapped_column(String(32), primary_key=True)
    #: -1 means unlimited.
    hard_limit: Mapped[int] = mapped_column(BigInteger)
    updated: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class QuotaUsage(Base):
    """How much of one resource a project uses. Reservations lock these rows, so two creates
    cannot both take the last unit."""

    __tablename__ = "quota_usages"

    project_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    resource: Mapped[str] = mapped_column(String(32), primary_key=True)
    in_use: Mapped[int] = mapped_column(BigInteger, default=0)
    updated: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class QuotaCharge(Base):
    """What one holder (an instance, a backup) has charged to its project's usage. Releasing
    deletes these rows, so a second release of the same holder gives nothing back twice."""

    __tablename__ = "quota_charges"

    holder_id: Mapped[str] = mapped_column(String(80), primary_key=True)
    resource: Mapped[str] = mapped_column(String(32), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(64), index=True)
    amount: Mapped[int] = mapped_column(BigInteger)
    created: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


# Tables of later features live in their own modules and join this metadata here.
from coffer.db import (  # noqa: E402, F401
    models_archive,
    models_backups,
    models_day2,
    models_restore,
    models_schedules,
)
