"""``coffer conductor``: the only writer of guest-reported state.

Guests cast sealed reports to the ``conductor`` topic. Each report is opened with the sending
instance's own key (looked up in the control DB and unwrapped with the master key), must name that
instance as its sender (a guest speaks only for itself), must be fresh, and must carry a sequence
number higher than the last one accepted from that instance for that method; anything else is
dropped with a warning. Reports for deleted instances are ignored.

Reports are taken off the bus in batches (``coffer.conductor.ingest``); the heartbeats of a batch
are checked one by one and written in one transaction (``coffer.conductor.heartbeats``), and a
message is acknowledged only once its effect is committed.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from coffer.bus.envelope import Envelope, ReplayGuard
from coffer.conductor import heartbeats
from coffer.conductor.ingest import ReportIngester
from coffer.controlplane import CONDUCTOR_TOPIC, ControlPlane
from coffer.db.models import ConductorLastSeen, Instance, ServiceStatusRow
from coffer.db.session import transaction
from coffer.errors import NotFound, SealError, ValidationError
from coffer.status import ServiceStatus

LOG = logging.getLogger(__name__)

#: The sealed sender of the message being dispatched on this worker thread (set by the guard,
#: which the RPC server runs on the same thread just before the handler).
_CURRENT = threading.local()

#: A report older than this (by its own clock) is stale and dropped.
MAX_REPORT_AGE = heartbeats.MAX_REPORT_AGE


class InstanceKeyRing:
    """Opens guest messages with each instance's key from the control DB."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self._looked_up: set[str] = set()
        self._lock = threading.Lock()

    def key_for(self, key_id: str) -> bytes:
        try:
            return self.cp.instance_key(key_id)
        except NotFound as exc:
            raise SealError(f"message sealed for unknown instance {key_id}") from exc

    def preload(self, key_ids: Sequence[str]) -> None:
        """Read the keys of ``key_ids`` not looked up before in one query (the senders of a
        batch), so a conductor meeting thousands of instances does not query once for each."""
        with self._lock:
            new = sorted(set(key_ids) - self._looked_up)
        if not new:
            return
        with self.cp.session_factory() as session:
            # Loads the rows into the session, where ``instance_key`` finds them (``rows`` keeps
            # them alive: the session holds its objects weakly).
            rows = session.scalars(select(Instance).where(Instance.id.in_(new))).all()
            for key_id in new:
                with contextlib.suppress(NotFound):
                    self.cp.instance_key(key_id, session)
            del rows
        with self._lock:
            self._looked_up.update(new)


class SequenceGuard:
    """Rejects stale reports, replays and out-of-order reports, per instance and method."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self.freshness = ReplayGuard(max_age=MAX_REPORT_AGE)

    def __call__(self, env: Envelope) -> None:
        self.freshness.check(env)
        with transaction(self.cp.session_factory) as session:
            seen = session.get(ConductorLastSeen, (env.sender, env.method))
            if seen is not None and env.seq <= seen.seq:
                raise SealError(
                    f"report {env.method} from {env.sender} has sequence {env.seq}, not newer "
                    f"than {seen.seq}: replayed or out of order"
                )
            if seen is None:
                session.add(ConductorLastSeen(instance_id=env.sender, method=env.method, seq=0))
                try:
                    session.flush()
                except IntegrityError as exc:
                    raise SealError("concurrent report with the same sequence") from exc
                seen = session.get(ConductorLastSeen, (env.sender, env.method))
                assert seen is not None
            seen.seq = env.seq
        _CURRENT.sender = env.sender


class Conductor:
    """RPC endpoints for guest reports. ``instance_id`` is checked against the sealed sender."""

    rpc_methods = frozenset({"heartbeat", "update_backup", "update_archive", "update_restore"})

    def __init__(self, cp: ControlPlane, topic: str = CONDUCTOR_TOPIC) -> None:
        self.cp = cp
        self.topic = topic
        self._server: ReportIngester | None = None

    def heartbeat(
        self,
        instance_id: str,
        status: str,
        sent_at: float,
        volume: dict[str, int] | None = None,
        message: str | None = None,
    ) -> None:
        """Record the engine status a guest observed at ``sent_at`` (its clock, unix time)."""
        try:
            observed = ServiceStatus(status)
        except ValueError:
            LOG.warning("instance %s reported unknown status %r; ignored", instance_id, status)
            return
        report = heartbeats.HeartbeatReport(
            instance_id=instance_id,
            seq=0,
            status=observed,
            reported=datetime.fromtimestamp(sent_at, UTC).replace(tzinfo=None),
            volume_used=int(volume.get("used", 0)) if volume else None,
            volume_total=int(volume.get("total", 0)) if volume else None,
            message=message,
        )
        with transaction(self.cp.session_factory) as session:
            inst = session.get(Instance, instance_id)
            if inst is None or inst.deleted:
                return
            heartbeats.apply_heartbeat(
                session, inst, session.get(ServiceStatusRow, instance_id), report
            )
        if message and observed is ServiceStatus.FAILED:
            LOG.warning("instance %s reports failure: %s", instance_id, message)

    def update_backup(
        self,
        instance_id: str,
        backup_id: str,
        state: str,
        sent_at: float,
        size: int | None = None,
        raw_size: int | None = None,
        checksum: str | None = None,
        wrapped_key: str | None = None,
        engine_position: dict[str, Any] | None = None,
        reason: str | None = None,
    ) -> None:
        """Record a guest's report on one of its own instance's backups (progress or result).

        See ``coffer.taskmanager.backups.apply_backup_report``: a report on another instance's
        backup raises SealError (dropped), and a finished backup never changes again.
        """
        from coffer.taskmanager.backups import apply_backup_report

        report = {
            "state": state,
            "size": size,
            "raw_size": raw_size,
            "checksum": checksum,
            "wrapped_key": wrapped_key,
            "engine_position": engine_position,
            "reason": reason,
        }
        with transaction(self.cp.session_factory) as session:
            new_state = apply_backup_report(session, instance_id, backup_id, report)
        if new_state is not None and state != "building":
            LOG.info("backup %s of instance %s is %s", backup_id, instance_id, new_state.value)

    def update_archive(
        self,
        instance_id: str,
        sent_at: float,
        segment: str,
        lsn: str | None = None,
        time: str | None = None,
    ) -> None:
        """Record how far a guest's log archive goes (``coffer.guest.backup.archive``): see
        ``coffer.taskmanager.backups.apply_archive_report``; the extent only moves forward."""
        from coffer.taskmanager.backups import apply_archive_report

        with transaction(self.cp.session_factory) as session:
            inst = session.get(Instance, instance_id)
            if inst is None:
                return
            apply_archive_report(session, instance_id, segment, lsn, time)

    def update_restore(
        self,
        instance_id: str,
        sent_at: float,
        phase: str,
        verified_bytes: int,
        restored_bytes: int,
        total_bytes: int | None = None,
        rate: int = 0,
    ) -> None:
        """Record how far the restore of a guest's own instance has got
        (``coffer.backup.progress.RestoreMeter``): the latest report replaces the one before
        (the sequence guard has already dropped older ones). ValidationError for figures that
        are not counts; reports for deleted instances are ignored."""
        from coffer.backup.progress import RESTORE_PHASES
        from coffer.db.models_restore import RestoreProgress

        counts = (verified_bytes, restored_bytes, rate) + (
            () if total_bytes is None else (total_bytes,)
        )
        if phase not in RESTORE_PHASES or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts
        ):
            raise ValidationError("A restore progress report holds an unknown phase or count.")
        reported = datetime.fromtimestamp(sent_at, UTC).replace(tzinfo=None)
        for attempt in (1, 2):
            try:
                with transaction(self.cp.session_factory) as session:
                    inst = session.get(Instance, instance_id)
                    if inst is None or inst.deleted:
                        return
                    row = session.get(RestoreProgress, instance_id)
                    if row is None:
                        row = RestoreProgress(instance_id=instance_id)
                        session.add(row)
                    elif row.reported_at > reported:
                        # Two consumers may take two reports of one restore at once (the Redis
                        # bus): the one sent later stays.
                        return
                    row.phase = phase
                    row.verified_bytes = verified_bytes
                    row.restored_bytes = restored_bytes
                    row.total_bytes = total_bytes
                    row.rate = rate
                    row.reported_at = reported
                return
            except IntegrityError:
                if attempt == 2:
                    raise  # the row was made by the other report; the next report applies

    def record_heartbeats(self, reports: Sequence[heartbeats.HeartbeatReport]) -> list[bool]:
        """Apply checked heartbeats in order, in one transaction (sequence guard included);
        whether each passed the guard. See ``coffer.conductor.heartbeats``."""
        accepted = heartbeats.record_heartbeats(self.cp.session_factory, reports)
        for report, ok in zip(reports, accepted, strict=True):
            if ok and report.message and report.status is ServiceStatus.FAILED:
                LOG.warning("instance %s reports failure: %s", report.instance_id, report.message)
        return accepted

    def start(self) -> None:
        keyring = InstanceKeyRing(self.cp)
        self._server = ReportIngester(
            self.cp.bus_url,
            self.topic,
            keyring,
            preload_keys=keyring.preload,
            record_heartbeats=self.record_heartbeats,
            endpoints=_SenderBound(self),
            guard=SequenceGuard(self.cp),
            signatures=self,
        )
        self._server.start()
        LOG.info("conductor started")

    def wait_ready(self, timeout: float) -> bool:
        """Wait until the conductor consumes its topic; False on timeout (or if not started)."""
        return self._server is not None and self._server.wait_ready(timeout)

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()


class _SenderBound:
    """Endpoint wrapper: a report's ``instance_id`` argument must be its sealed sender.

    The RPC server hands handlers only kwargs, so the guest repeats its id in the body; the seal
    already proves the sender owns that key, and this refuses a body naming anyone else.
    """

    rpc_methods = Conductor.rpc_methods

    def __init__(self, conductor: Conductor) -> None:
        self._conductor = conductor

    def heartbeat(self, **kwargs: Any) -> None:
        sender = getattr(_CURRENT, "sender", None)
        _CURRENT.sender = None
        if sender is None or kwargs.get("instance_id") != sender:
            raise SealError(
                f"instance {sender} sent a report about {kwargs.get('instance_id')}; "
                "a guest may only report on itself"
            )
        self._conductor.heartbeat(**kwargs)

    def update_backup(self, **kwargs: Any) -> None:
        self._check_sender(kwargs)
        self._conductor.update_backup(**kwargs)

    def update_archive(self, **kwargs: Any) -> None:
        self._check_sender(kwargs)
        self._conductor.update_archive(**kwargs)

    def update_restore(self, **kwargs: Any) -> None:
        self._check_sender(kwargs)
        self._conductor.update_restore(**kwargs)

    @staticmethod
    def _check_sender(kwargs: dict[str, Any]) -> None:
        sender = getattr(_CURRENT, "sender", None)
        _CURRENT.sender = None
        if sender is None or kwargs.get("instance_id") != sender:
            raise SealError(
                f"instance {sender} sent a report about {kwargs.get('instance_id')}; "
                "a guest may only report on itself"
            )
