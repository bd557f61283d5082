"""The conductor takes reports in batches: every check still holds per message, the heartbeats
of a batch are written in one transaction, and a message is acknowledged only after its effect
is committed (a failed batch is delivered again and applied then).

Real conductor, real control DB (SQLite), real brokers (the embedded redis-server and RabbitMQ);
reports are sealed exactly as a guest seals them, or forged the ways an attacker would.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from bus_fixtures import embedded_broker, publish_raw, rabbit_url, wait_for  # noqa: F401
from conductor_fixtures import Guest, make_guests
from sqlalchemy.exc import IntegrityError

from coffer.bus import keys
from coffer.bus.envelope import Envelope, seal
from coffer.bus.transport import EmbeddedBroker, connection, delete_queue
from coffer.conductor import heartbeats
from coffer.conductor.heartbeats import HeartbeatReport
from coffer.conductor.ingest import ReportIngester
from coffer.conductor.service import Conductor, InstanceKeyRing, SequenceGuard, _SenderBound
from coffer.config import load_settings
from coffer.controlplane import CONDUCTOR_TOPIC, ControlPlane
from coffer.db.models import (
    Base,
    ConductorLastSeen,
    Instance,
    ServiceStatusRow,
)
from coffer.db.session import transaction
from coffer.status import ServiceStatus

pytestmark = pytest.mark.integration


@pytest.fixture(params=["embedded", "rabbit"])
def bus_url(request: pytest.FixtureRequest) -> str:
    if request.param == "embedded":
        broker: EmbeddedBroker = request.getfixturevalue("embedded_broker")
        return broker.url
    url: str = request.getfixturevalue("rabbit_url")
    return url


@pytest.fixture
def cp(bus_url: str) -> Iterator[ControlPlane]:
    state = Path(tempfile.mkdtemp(prefix="ccbat", dir="/tmp"))
    settings = load_settings(
        environ={}, overrides={"DEFAULT": {"state_dir": str(state), "transport_url": bus_url}}
    )
    plane = ControlPlane(settings, migrate_db=False)
    Base.metadata.create_all(plane.engine)
    try:
        yield plane
    finally:
        plane.close()
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
def topic(cp: ControlPlane) -> Iterator[str]:
    name = f"{CONDUCTOR_TOPIC}.test-{uuid.uuid4().hex[:8]}"
    try:
        yield name
    finally:
        delete_queue(cp.bus_url, name)


def _guests(cp: ControlPlane, count: int) -> list[Guest]:
    return make_guests(cp, count)


def _heartbeat(
    guest: Guest,
    topic: str,
    status: str,
    seq: int,
    *,
    about: str | None = None,
    sent_at: float | None = None,
    used: int = 1,
) -> Envelope:
    env = Envelope.new(
        key_id=guest.instance_id,
        sender=guest.instance_id,
        target=topic,
        method="heartbeat",
        kwargs={
            "instance_id": about or guest.instance_id,
            "status": status,
            "sent_at": time.time(),
            "volume": {"used": used, "total": 1 << 30},
        },
        seq=seq,
    )
    if sent_at is None:
        return env
    return replace(env, sent_at=sent_at, kwargs={**env.kwargs, "sent_at": sent_at})


def _state(cp: ControlPlane, instance_id: str) -> tuple[ServiceStatus, int | None, int | None]:
    """(status, last accepted heartbeat sequence, volume bytes used)."""
    with cp.session_factory() as session:
        row = session.get(ServiceStatusRow, instance_id)
        seen = session.get(ConductorLastSeen, (instance_id, "heartbeat"))
        inst = session.get(Instance, instance_id)
        assert row is not None and inst is not None
        return row.status, seen.seq if seen else None, inst.volume_used_bytes


def _queued(url: str, topic: str) -> int:
    with connection(url) as conn:
        declared = conn.default_channel.queue_declare(topic, durable=True, auto_delete=False)
        return int(declared.message_count)


def test_queued_reports_are_checked_one_by_one_and_the_newest_wins(
    cp: ControlPlane, topic: str
) -> None:
    url = cp.bus_url
    a, b, c = _guests(cp, 3)
    base = time.time_ns()
    statuses = ["running", "healthy", "blocked", "shutdown", "healthy"]
    sent: list[bytes] = []
    for step, status in enumerate(statuses):
        for guest in (a, b):
            data = seal(_heartbeat(guest, topic, status, base + step, used=step), guest.key)
            publish_raw(url, topic, data)
            sent.append(data)
    publish_raw(url, topic, sent[0])  # a replay of a's first report
    # b's guest reports about a, sealed with its own key
    publish_raw(
        url, topic, seal(_heartbeat(b, topic, "failed", base + 90, about=a.instance_id), b.key)
    )
    # a report claiming to be from a, sealed with b's key; one sealed with nobody's key
    forged = _heartbeat(a, topic, "failed", base + 91)
    publish_raw(url, topic, seal(forged, b.key))
    publish_raw(url, topic, seal(forged, keys.generate_key()))
    # stale, and dated in the future
    publish_raw(
        url,
        topic,
        seal(_heartbeat(a, topic, "failed", base + 92, sent_at=time.time() - 3600), a.key),
    )
    publish_raw(
        url,
        topic,
        seal(_heartbeat(a, topic, "failed", base + 93, sent_at=time.time() + 3600), a.key),
    )
    # c: a report queued after a newer one (whichever is taken first, the newer one wins)
    now = time.time()
    publish_raw(url, topic, seal(_heartbeat(c, topic, "healthy", base + 20, sent_at=now), c.key))
    older = _heartbeat(c, topic, "failed", base + 10, sent_at=now - 1)
    publish_raw(url, topic, seal(older, c.key))
    batches: list[int] = []

    class Watching(Conductor):
        def record_heartbeats(self, reports: Sequence[HeartbeatReport]) -> list[bool]:
            batches.append(len(reports))
            return super().record_heartbeats(reports)

    conductor = Watching(cp, topic=topic)
    conductor.start()
    try:
        last = base + len(statuses) - 1
        assert wait_for(lambda: _state(cp, c.instance_id)[1] == base + 20, 20)
        assert wait_for(lambda: _state(cp, a.instance_id) == (ServiceStatus.HEALTHY, last, 4), 20)
        assert wait_for(lambda: _state(cp, b.instance_id) == (ServiceStatus.HEALTHY, last, 4), 20)
        assert _state(cp, c.instance_id)[:2] == (ServiceStatus.HEALTHY, base + 20)
        assert wait_for(lambda: _queued(url, topic) == 0, 10)  # every message acknowledged
    finally:
        conductor.stop()
    # Thirteen heartbeats reached the transaction (ten good ones, the replay and c's two; the
    # forged, misaddressed and misdated ones never did), in fewer transactions than messages.
    assert sum(batches) == 13 and len(batches) < 13


def test_a_batch_whose_transaction_fails_is_delivered_again(cp: ControlPlane, topic: str) -> None:
    url = cp.bus_url
    guests = _guests(cp, 4)
    base = time.time_ns()
    for step in range(3):
        for guest in guests:
            publish_raw(
                url, topic, seal(_heartbeat(guest, topic, "healthy", base + step), guest.key)
            )
    conductor = Conductor(cp, topic=topic)
    failures: list[int] = []

    def flaky(reports: Sequence[HeartbeatReport]) -> list[bool]:
        if len(failures) < 2:  # the control DB is unavailable twice
            failures.append(len(reports))
            raise RuntimeError("the control DB is unavailable")
        return conductor.record_heartbeats(reports)

    ingester = ReportIngester(
        url,
        topic,
        InstanceKeyRing(cp),
        record_heartbeats=flaky,
        endpoints=_SenderBound(conductor),
        guard=SequenceGuard(cp),
        signatures=conductor,
    )
    ingester.start()
    try:
        assert wait_for(lambda: all(_state(cp, g.instance_id)[1] == base + 2 for g in guests), 30)
        assert all(_state(cp, g.instance_id)[0] is ServiceStatus.HEALTHY for g in guests)
        assert wait_for(lambda: _queued(url, topic) == 0, 10)
    finally:
        ingester.stop()
    assert len(failures) == 2 and failures[0] > 0


def test_a_batch_is_all_or_nothing_and_newer_observations_win(tmp_path: Path) -> None:
    settings = load_settings(environ={}, overrides={"DEFAULT": {"state_dir": str(tmp_path)}})
    plane = ControlPlane(settings, migrate_db=False)
    try:
        Base.metadata.create_all(plane.engine)
        a, gone = _guests(plane, 2)
        with transaction(plane.session_factory) as session:
            inst = session.get(Instance, gone.instance_id)
            assert inst is not None
            inst.deleted = True
        now = time.time()

        def report(guest: Guest, status: str, seq: int, at: float) -> HeartbeatReport:
            env = _heartbeat(guest, "conductor", status, seq)
            env = replace(env, kwargs={**env.kwargs, "sent_at": at})
            return heartbeats.parse_heartbeat(env, now)

        accepted = heartbeats.record_heartbeats(
            plane.session_factory,
            [
                report(a, "healthy", 10, now),
                report(a, "blocked", 11, now - 5),  # newer sequence, older observation
                report(a, "failed", 9, now),  # out of order
                report(gone, "healthy", 5, now),  # a deleted instance
            ],
        )
        assert accepted == [True, True, False, True]
        assert _state(plane, a.instance_id)[:2] == (ServiceStatus.HEALTHY, 11)
        assert _state(plane, gone.instance_id)[:2] == (ServiceStatus.NEW, 5)

        # A batch that cannot be written (a status the column refuses) leaves nothing behind,
        # not even the reports before the bad one.
        bad = replace(report(a, "running", 13, now), status=None)  # type: ignore[arg-type]
        with pytest.raises(IntegrityError):
            heartbeats.record_heartbeats(
                plane.session_factory, [report(a, "running", 12, now), bad]
            )
        assert _state(plane, a.instance_id)[:2] == (ServiceStatus.HEALTHY, 11)
    finally:
        plane.close()


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"status": "healthy", "sent_at": 1.0}, "instance_id"),
        ({"instance_id": "X", "status": "healthy", "sent_at": 1.0, "extra": 1}, "arguments"),
        ({"instance_id": "X", "status": "dancing", "sent_at": 1.0}, "unknown status"),
        ({"instance_id": "X", "status": "healthy", "sent_at": "soon"}, "sent_at"),
        (
            {"instance_id": "X", "status": "healthy", "sent_at": 1.0, "volume": {"used": -1}},
            "volume",
        ),
    ],
)
def test_malformed_heartbeats_are_refused_before_the_transaction(
    kwargs: dict[str, Any], reason: str
) -> None:
    from coffer.errors import SealError

    env = Envelope.new(
        key_id="X", sender="X", target="conductor", method="heartbeat", kwargs=kwargs, seq=1
    )
    with pytest.raises(SealError, match=reason):
        heartbeats.parse_heartbeat(env, time.time())
