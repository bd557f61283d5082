"""``coffer conductor``: the only writer of guest-reported state.

Guests cast sealed reports to the ``conductor`` topic. Each report is opened with the sending
instance's own key (looked up in the control DB and unwrapped with the master key), must name that
instance as its sender (a guest speaks only for itself), must be fresh, and must carry a sequence
number higher than the last one accepted from that instance for that method; anything else is
dropped with a warning. Reports for deleted instances are ignored.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.exc import IntegrityError

from coffer.bus.envelope import Envelope, ReplayGuard
from coffer.bus.rpc import RpcServer
from coffer.controlplane import CONDUCTOR_TOPIC, ControlPlane
from coffer.db.models import ConductorLastSeen, Instance, ServiceStatusRow, utcnow
from coffer.db.session import transaction
from coffer.errors import NotFound, SealError
from coffer.status import ServiceStatus

LOG = logging.getLogger(__name__)

#: The sealed sender of the message being dispatched on this worker thread (set by the guard,
#: which the RPC server runs on the same thread just before the handler).
_CURRENT = threading.local()

#: A report older than this (by its own clock) is stale and dropped.
MAX_REPORT_AGE = 60.0


class InstanceKeyRing:
    """Opens guest messages with each instance's key from the control DB."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    def key_for(self, key_id: str) -> bytes:
        try:
            return self.cp.instance_key(key_id)
        except NotFound as exc:
            raise SealError(f"message sealed for unknown instance {key_id}") from exc


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

    rpc_methods = frozenset({"heartbeat", "update_backup"})

    def __init__(self, cp: ControlPlane, topic: str = CONDUCTOR_TOPIC) -> None:
        self.cp = cp
        self.topic = topic
        self._server: RpcServer | None = None

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
        reported = datetime.fromtimestamp(sent_at, UTC).replace(tzinfo=None)
        with transaction(self.cp.session_factory) as session:
            inst = session.get(Instance, instance_id)
            if inst is None or inst.deleted:
                return
            row = session.get(ServiceStatusRow, instance_id)
            if row is None:
                row = ServiceStatusRow(instance_id=instance_id)
                session.add(row)
            if row.reported_at is not None and reported < row.reported_at:
                return  # an older observation arriving late must not overwrite a newer one
            row.status = observed
            row.reported_at = reported
            row.updated_at = utcnow()
            if volume:
                inst.volume_used_bytes = int(volume.get("used", 0))
                inst.volume_total_bytes = int(volume.get("total", 0))
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

    def start(self) -> None:
        self._server = RpcServer(
            self.cp.bus_url,
            self.topic,
            _SenderBound(self),
            InstanceKeyRing(self.cp),
            guard=SequenceGuard(self.cp),
            require_sender_is_key_id=True,
            workers=2,
        )
        self._server.start()
        LOG.info("conductor started")

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

    @staticmethod
    def _check_sender(kwargs: dict[str, Any]) -> None:
        sender = getattr(_CURRENT, "sender", None)
        _CURRENT.sender = None
        if sender is None or kwargs.get("instance_id") != sender:
            raise SealError(
                f"instance {sender} sent a report about {kwargs.get('instance_id')}; "
                "a guest may only report on itself"
            )
