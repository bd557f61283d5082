"""Control-DB table for continuous log archives (issue 5): how far each instance's archive goes.

Imported at the bottom of ``coffer.db.models`` so every table shares one metadata. Schema changes
here go into the Alembic revision ``0006_archive``.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, String
from sqlalchemy.orm import Mapped, mapped_column

from coffer.db.models import Base, utcnow


class InstanceArchive(Base):
    """One instance's archived log (PostgreSQL WAL) in backup storage, under ``prefix``
    (``<project>/archive/<instance id>``): recorded when its first backup enables archiving,
    and moved forward by the guest's reports (through the conductor) as files are archived.

    ``newest_time`` is the restorable window's end: every transaction committed before it is in
    the archive. The row (and the archive) outlive the instance while backups of it exist.
    """

    __tablename__ = "instance_archives"

    instance_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True)
    storage_driver: Mapped[str] = mapped_column(String(32))
    prefix: Mapped[str] = mapped_column(String(255))
    #: The newest archived WAL file, the position where it ends, and the extent's time.
    newest_segment: Mapped[str | None] = mapped_column(String(64), nullable=True)
    newest_lsn: Mapped[str | None] = mapped_column(String(32), nullable=True)
    newest_time: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    created: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
