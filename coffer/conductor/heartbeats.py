"""Heartbeats, many at a time: checked one by one, written in one transaction.

``parse_heartbeat`` turns an opened envelope into a ``HeartbeatReport`` or refuses it (a body
about another instance, a stale or future report, arguments a heartbeat does not take).
``record_heartbeats`` then applies a batch of reports in order, in one write transaction: each
must carry a sequence number higher than the last one accepted from its instance (the same
guard, the same ``conductor_lastseen`` rows, as every other report), and an accepted one sets the
instance's status unless a newer observation is already recorded. Either the whole batch is
committed, or none of it is, so the messages can be acknowledged after the commit and redelivered
after a failure without losing or double-applying anything.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from coffer.bus.envelope import Envelope
from coffer.db.models import Base, ConductorLastSeen, Instance, ServiceStatusRow, utcnow
from coffer.db.session import transaction
from coffer.errors import SealError
from coffer.status import ServiceStatus

METHOD = "heartbeat"
#: A report older than this (by its own clock) is stale and dropped.
MAX_REPORT_AGE = 60.0
#: A report dated further ahead than this is dropped (the sender's clock is wrong).
MAX_REPORT_FUTURE = 30.0


def _heartbeat_signature(
    instance_id: str,
    status: str,
    sent_at: float,
    volume: dict[str, int] | None = None,
    message: str | None = None,
) -> None:
    """The arguments a heartbeat takes (those of ``Conductor.heartbeat``)."""


_SIGNATURE = inspect.signature(_heartbeat_signature)


@dataclass(frozen=True)
class HeartbeatReport:
    """One heartbeat that passed every check that needs no database."""

    instance_id: str
    seq: int
    status: ServiceStatus
    #: When the guest observed ``status``, by its clock (naive UTC, as the DB keeps times).
    reported: datetime
    volume_used: int | None
    volume_total: int | None
    message: str | None


def parse_heartbeat(env: Envelope, now: float) -> HeartbeatReport:
    """Check an opened heartbeat envelope (its seal and sender already verified) and parse it.

    Raises ``SealError`` saying why when it must be dropped: sent more than ``MAX_REPORT_AGE``
    seconds before ``now`` or more than ``MAX_REPORT_FUTURE`` after it, a body about another
    instance than the sealed sender, or arguments a heartbeat does not take.
    """
    if env.sent_at < now - MAX_REPORT_AGE:
        raise SealError(
            f"message {env.msg_id} from {env.sender!r} is stale: sent {now - env.sent_at:.0f} s "
            f"ago, more than the {MAX_REPORT_AGE:.0f} s allowed"
        )
    if env.sent_at > now + MAX_REPORT_FUTURE:
        raise SealError(
            f"message {env.msg_id} from {env.sender!r} is dated {env.sent_at - now:.0f} s in "
            "the future; check the sender's clock"
        )
    try:
        args = _SIGNATURE.bind(**env.kwargs).arguments
    except TypeError as exc:
        raise SealError(f"heartbeat from {env.sender!r} has wrong arguments: {exc}") from None
    if args["instance_id"] != env.sender:
        raise SealError(
            f"instance {env.sender} sent a report about {args['instance_id']}; a guest may only "
            "report on itself"
        )
    try:
        status = ServiceStatus(args["status"])
    except ValueError:
        raise SealError(
            f"instance {env.sender} reported unknown status {args['status']!r}"
        ) from None
    used, total = _volume(env.sender, args.get("volume"))
    sent_at = args["sent_at"]
    if (
        isinstance(sent_at, bool)
        or not isinstance(sent_at, int | float)
        or not math.isfinite(sent_at)
    ):
        raise SealError(f"heartbeat from {env.sender!r} has no valid sent_at")
    message = args.get("message")
    return HeartbeatReport(
        instance_id=env.sender,
        seq=env.seq,
        status=status,
        reported=datetime.fromtimestamp(sent_at, UTC).replace(tzinfo=None),
        volume_used=used,
        volume_total=total,
        message=message if isinstance(message, str) else None,
    )


def _volume(sender: str, volume: Any) -> tuple[int | None, int | None]:
    if not volume:
        return None, None
    if not isinstance(volume, dict):
        raise SealError(f"heartbeat from {sender!r} has a volume that is not an object")
    values = []
    for key in ("used", "total"):
        value = volume.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise SealError(f"heartbeat from {sender!r} has a bad volume {key!r}")
        values.append(value)
    return values[0], values[1]


def apply_heartbeat(
    session: Session, inst: Instance, row: ServiceStatusRow | None, report: HeartbeatReport
) -> ServiceStatusRow:
    """Set ``inst``'s status from ``report`` unless a newer observation is recorded already (an
    older one arriving late must not overwrite it); returns the status row (created if none)."""
    if row is None:
        row = ServiceStatusRow(instance_id=inst.id)
        session.add(row)
    if row.reported_at is not None and report.reported < row.reported_at:
        return row
    row.status = report.status
    row.reported_at = report.reported
    row.updated_at = utcnow()
    if report.volume_used is not None:
        inst.volume_used_bytes = report.volume_used
        inst.volume_total_bytes = report.volume_total
    return row


# Written with one statement per table for the whole batch (executemany), built once.
_SEEN = Base.metadata.tables[ConductorLastSeen.__tablename__]
_SET_SEQ = (
    update(_SEEN)
    .where(_SEEN.c.instance_id == bindparam("iid"), _SEEN.c.method == METHOD)
    .values(seq=bindparam("v_seq"))
)
_STATUS = Base.metadata.tables[ServiceStatusRow.__tablename__]
_SET_STATUS = (
    update(_STATUS)
    .where(_STATUS.c.instance_id == bindparam("iid"))
    .values(
        status=bindparam("v_status"),
        reported_at=bindparam("v_reported"),
        updated_at=bindparam("v_updated"),
    )
)
_INSTANCES = Base.metadata.tables[Instance.__tablename__]
_SET_VOLUME = (
    update(_INSTANCES)
    .where(_INSTANCES.c.id == bindparam("iid"))
    .values(volume_used_bytes=bindparam("v_used"), volume_total_bytes=bindparam("v_total"))
)


def record_heartbeats(
    factory: sessionmaker[Session], reports: Sequence[HeartbeatReport]
) -> list[bool]:
    """Apply ``reports`` in order in one write transaction (see the module docstring); whether
    each passed the sequence guard. Reports for unknown or deleted instances pass the guard and
    change nothing else. A database error raises and commits nothing.

    The guard and the "newer observation wins" rule are applied report by report in memory; the
    outcome is written with one bulk statement per table, one row per instance.
    """
    accepted: list[bool] = []
    if not reports:
        return accepted
    ids = sorted({report.instance_id for report in reports})
    with transaction(factory) as session:
        last_seq: dict[str, int] = {
            iid: seq
            for iid, seq in session.execute(
                select(ConductorLastSeen.instance_id, ConductorLastSeen.seq)
                .where(ConductorLastSeen.method == METHOD, ConductorLastSeen.instance_id.in_(ids))
                .with_for_update()
            )
        }
        live = set(
            session.scalars(
                select(Instance.id).where(Instance.id.in_(ids), Instance.deleted.is_(False))
            )
        )
        observed: dict[str, datetime | None] = {
            iid: reported
            for iid, reported in session.execute(
                select(ServiceStatusRow.instance_id, ServiceStatusRow.reported_at).where(
                    ServiceStatusRow.instance_id.in_(ids)
                )
            )
        }
        known_seq = set(last_seq)
        known_status = set(observed)
        new_seq: dict[str, int] = {}
        statuses: dict[str, dict[str, Any]] = {}
        volumes: dict[str, dict[str, Any]] = {}
        now = utcnow()
        for report in reports:
            iid = report.instance_id
            if iid in last_seq and report.seq <= last_seq[iid]:
                accepted.append(False)
                continue
            last_seq[iid] = new_seq[iid] = report.seq
            accepted.append(True)
            if iid not in live:
                continue
            before = observed.get(iid)
            if before is not None and report.reported < before:
                continue  # an older observation arriving late must not overwrite a newer one
            observed[iid] = report.reported
            statuses[iid] = {
                "iid": iid,
                "v_status": report.status,
                "v_reported": report.reported,
                "v_updated": now,
            }
            if report.volume_used is not None:
                volumes[iid] = {
                    "iid": iid,
                    "v_used": report.volume_used,
                    "v_total": report.volume_total,
                }
        seen = [{"iid": iid, "v_seq": seq} for iid, seq in new_seq.items() if iid in known_seq]
        if seen:
            session.execute(_SET_SEQ, seen)
        added = [
            {"instance_id": iid, "method": METHOD, "seq": seq}
            for iid, seq in new_seq.items()
            if iid not in known_seq
        ]
        if added:
            session.execute(insert(ConductorLastSeen), added)
        changed = [row for iid, row in statuses.items() if iid in known_status]
        if changed:
            session.execute(_SET_STATUS, changed)
        created = [
            {
                "instance_id": row["iid"],
                "status": row["v_status"],
                "reported_at": row["v_reported"],
                "updated_at": row["v_updated"],
            }
            for iid, row in statuses.items()
            if iid not in known_status
        ]
        if created:
            session.execute(insert(ServiceStatusRow), created)
        if volumes:
            session.execute(_SET_VOLUME, list(volumes.values()))
    return accepted
