"""Control-DB table for the progress of restores (issue 5): what the guest of an instance being
built from a backup has read and restored so far, as its reports (through the conductor) say.

Imported at the bottom of ``coffer.db.models`` so every table shares one metadata. Schema changes
here go into the Alembic revision ``0008_restore_progress``.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from coffer.db.models import Base, utcnow


class RestoreProgress(Base):
    """The latest progress report of one instance's restore (one row per instance; written
    only by the conductor, read by the API into the instance view's ``restore`` field).

    A restore reads its backup chain twice: ``verifying`` reads every backup whole and checks
    it before anything is written, ``restoring`` streams it again into the engine. Both counts
    are engine (uncompressed) bytes, so each ends at the chain's engine bytes; ``restored``
    is the phase of the last report, sent once the engine's data directory is filled.
    """

    __tablename__ = "restore_progress"

    instance_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("instances.id"), primary_key=True
    )
    phase: Mapped[str] = mapped_column(String(16))
    verified_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    restored_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    #: The chain's engine bytes, once the guest knows them (after verifying).
    total_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    #: Bytes per second over the last few seconds of the current phase.
    rate: Mapped[int] = mapped_column(BigInteger, default=0)
    #: The guest's clock when it sent the report (unix time, as UTC).
    reported_at: Mapped[datetime] = mapped_column(DateTime)
    updated: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
