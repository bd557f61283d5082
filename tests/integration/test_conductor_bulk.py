"""On the embedded (Redis) bus the conductor reads its queue in bulk: many reports per round
trip, held in a list of the consumer's own until their batch is committed, so a conductor that
dies between taking and committing loses nothing.

Real conductor, real control DB (SQLite), the real embedded redis-server; reports are published
with kombu exactly as a guest's ``RpcClient.cast`` publishes them. The killed conductor is a real
child process, stopped by SIGKILL and reaped by PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path

import pytest
import redis
from bus_fixtures import embedded_broker, publish_raw, wait_for  # noqa: F401
from conductor_fixtures import Guest, make_guests

from coffer.bus.bulk import RedisBulkReader, redis_client, taken_keys
from coffer.bus.envelope import Envelope, seal
from coffer.bus.rpc import CONTENT_TYPE as CONTENT
from coffer.bus.transport import EmbeddedBroker, delete_queue
from coffer.conductor.heartbeats import HeartbeatReport
from coffer.conductor.ingest import ReportIngester
from coffer.conductor.service import Conductor
from coffer.config import load_settings
from coffer.controlplane import CONDUCTOR_TOPIC, ControlPlane
from coffer.db.models import (
    Base,
    ConductorLastSeen,
    ServiceStatusRow,
)
from coffer.db.models_archive import InstanceArchive
from coffer.status import ServiceStatus

pytestmark = pytest.mark.integration

SEGMENT = "000000010000000000000007"


@pytest.fixture
def cp(embedded_broker: EmbeddedBroker) -> Iterator[ControlPlane]:  # noqa: F811
    state = Path(tempfile.mkdtemp(prefix="ccblk", dir="/tmp"))
    settings = load_settings(
        environ={},
        overrides={"DEFAULT": {"state_dir": str(state), "transport_url": embedded_broker.url}},
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


@pytest.fixture
def client(cp: ControlPlane) -> Iterator[redis.Redis]:
    """A plain redis-py client on the broker, to look at the lists as they are."""
    plain = redis_client(cp.bus_url, socket_timeout=10)
    try:
        yield plain
    finally:
        plain.close()


def _guests(cp: ControlPlane, count: int, *, archive: bool = False) -> list[Guest]:
    return make_guests(cp, count, manager="postgresql", version="15", archive=archive)


def _report(guest: Guest, topic: str, method: str, seq: int, **kwargs: object) -> bytes:
    env = Envelope.new(
        key_id=guest.instance_id,
        sender=guest.instance_id,
        target=topic,
        method=method,
        kwargs={"instance_id": guest.instance_id, "sent_at": time.time(), **kwargs},
        seq=seq,
    )
    return seal(env, guest.key)


def _publish_all(url: str, topic: str, bodies: Sequence[bytes]) -> None:
    """Publish ``bodies`` in order as ``RpcClient.cast`` does (persistent, sealed content type),
    on one connection."""
    import kombu

    from coffer.bus.transport import connection

    queue = kombu.Queue(topic, durable=True, auto_delete=False)
    with connection(url) as conn:
        producer = kombu.Producer(conn.channel(), auto_declare=False)
        for body in bodies:
            producer.publish(
                body,
                exchange="",
                routing_key=topic,
                content_type=CONTENT,
                content_encoding="binary",
                delivery_mode=2,
                declare=[queue],
            )


def _heartbeat(guest: Guest, topic: str, seq: int, status: str = "healthy") -> bytes:
    return _report(guest, topic, "heartbeat", seq, status=status, volume={"used": 1, "total": 2})


def _archive(guest: Guest, topic: str, seq: int) -> bytes:
    return _report(
        guest, topic, "update_archive", seq, segment=SEGMENT, lsn="0/7000000", time=_iso_now()
    )


def _iso_now() -> str:
    return datetime.now().astimezone().isoformat()


def _last_seq(cp: ControlPlane, instance_id: str, method: str = "heartbeat") -> int | None:
    with cp.session_factory() as session:
        seen = session.get(ConductorLastSeen, (instance_id, method))
        return seen.seq if seen else None


def _status(cp: ControlPlane, instance_id: str) -> ServiceStatus:
    with cp.session_factory() as session:
        row = session.get(ServiceStatusRow, instance_id)
        assert row is not None
        return row.status


def _archived_segment(cp: ControlPlane, instance_id: str) -> str | None:
    with cp.session_factory() as session:
        row = session.get(InstanceArchive, instance_id)
        assert row is not None
        return row.newest_segment


def _readers(client: redis.Redis, topic: str) -> set[bytes]:
    return set(client.smembers(f"coffer.bulk.{topic}.readers"))


class Watching(Conductor):
    """The real conductor, counting the heartbeats of each transaction."""

    def __init__(self, cp: ControlPlane, topic: str) -> None:
        super().__init__(cp, topic=topic)
        self.batches: list[int] = []

    def record_heartbeats(self, reports: Sequence[HeartbeatReport]) -> list[bool]:
        self.batches.append(len(reports))
        return super().record_heartbeats(reports)


def test_queued_reports_are_taken_in_bulk_and_committed_per_batch(
    cp: ControlPlane, topic: str, client: redis.Redis
) -> None:
    guests = _guests(cp, 50, archive=True)
    base = time.time_ns()
    bodies = []
    for step in range(12):
        bodies += [_heartbeat(guest, topic, base + step) for guest in guests]
        if step == 5:
            # Reports of another kind in the middle of the heartbeats.
            bodies += [_archive(guest, topic, base + 100) for guest in guests[:3]]
    _publish_all(cp.bus_url, topic, bodies)
    assert client.llen(topic) == 603
    conductor = Watching(cp, topic)
    conductor.start()
    try:
        assert conductor._server is not None and conductor._server.bulk
        assert conductor._server.workers == 1
        last = base + 11
        assert wait_for(lambda: all(_last_seq(cp, g.instance_id) == last for g in guests), 30)
        for guest in guests[:3]:
            assert _archived_segment(cp, guest.instance_id) == SEGMENT
            assert _last_seq(cp, guest.instance_id, "update_archive") == base + 100
        assert _archived_segment(cp, guests[3].instance_id) is None
        assert all(_status(cp, g.instance_id) is ServiceStatus.HEALTHY for g in guests)
        # Nothing waits, nothing is held once the batches are settled.
        assert wait_for(lambda: client.llen(topic) == 0 and not taken_keys(client, topic), 10)
    finally:
        conductor.stop()
    # 603 reports in three takes of at most 256, the heartbeats of each in one transaction, in
    # order: none was refused.
    assert sum(conductor.batches) == 600
    assert conductor.batches == [256, 253, 91]
    assert _readers(client, topic) == set()  # the reader gave up its lease on stop


def test_a_report_of_another_kind_inside_a_batch_is_handled(
    cp: ControlPlane, topic: str, client: redis.Redis
) -> None:
    a, b = _guests(cp, 2, archive=True)
    base = time.time_ns()
    conductor = Watching(cp, topic)
    conductor.start()
    try:
        assert conductor.wait_ready(10)
        # Published together while the conductor waits: they come in one or a few takes.
        for step in range(4):
            publish_raw(cp.bus_url, topic, _heartbeat(a, topic, base + step))
        publish_raw(cp.bus_url, topic, _archive(b, topic, base))
        publish_raw(cp.bus_url, topic, _heartbeat(b, topic, base + 1, "blocked"))
        assert wait_for(lambda: _archived_segment(cp, b.instance_id) == SEGMENT, 10)
        assert wait_for(lambda: _last_seq(cp, a.instance_id) == base + 3, 10)
        assert wait_for(lambda: _status(cp, b.instance_id) is ServiceStatus.BLOCKED, 10)
        assert wait_for(lambda: client.llen(topic) == 0 and not taken_keys(client, topic), 10)
    finally:
        conductor.stop()
    assert sum(conductor.batches) == 5


def test_a_batch_taken_and_never_committed_comes_back(
    cp: ControlPlane, topic: str, client: redis.Redis
) -> None:
    guests = _guests(cp, 5, archive=True)
    base = time.time_ns()
    for guest in guests:
        publish_raw(cp.bus_url, topic, _heartbeat(guest, topic, base))
    publish_raw(cp.bus_url, topic, _archive(guests[0], topic, base))
    # A consumer takes everything, then stops answering (its process hangs, or its host is
    # gone): it never settles, and never renews its one-second lease.
    doomed = RedisBulkReader(cp.bus_url, topic, batch_size=100, idle_wait=0.2, lease_seconds=1)
    doomed.open()
    assert len(doomed.take()) == 6
    doomed._disconnect()
    assert client.llen(topic) == 0
    assert client.llen(doomed.taken_key) == 6
    # Once its lease has expired, the next conductor to start takes the reports back.
    assert wait_for(lambda: not client.exists(doomed.lease_key), 5)
    conductor = Watching(cp, topic)
    conductor.start()
    try:
        assert wait_for(lambda: all(_last_seq(cp, g.instance_id) == base for g in guests), 15)
        assert wait_for(lambda: _archived_segment(cp, guests[0].instance_id) == SEGMENT, 10)
        assert wait_for(lambda: not taken_keys(client, topic), 10)
    finally:
        conductor.stop()
    assert _readers(client, topic) == set()


def test_a_reader_holding_a_live_lease_keeps_its_batch(
    cp: ControlPlane, topic: str, client: redis.Redis
) -> None:
    (guest,) = _guests(cp, 1)
    base = time.time_ns()
    publish_raw(cp.bus_url, topic, _heartbeat(guest, topic, base))
    busy = RedisBulkReader(cp.bus_url, topic, batch_size=10, idle_wait=0.2)
    other = RedisBulkReader(cp.bus_url, topic, batch_size=10, idle_wait=0.2)
    try:
        busy.open()
        batch = busy.take()
        assert len(batch) == 1
        other.open()  # sweeps: the busy reader is alive, in this very process
        assert other.sweep() == 0
        assert other.take() == []
        assert client.llen(busy.taken_key) == 1
        # Settling with nothing acknowledged puts the message back at the head of the queue.
        assert busy.settle() == 1
        again = other.take()
        assert [m.body for m in again] == [m.body for m in batch]
        again[0].ack()
        assert other.settle() == 0
        assert client.llen(topic) == 0 and not taken_keys(client, topic)
    finally:
        busy.close()
        other.close()
    assert _readers(client, topic) == set()


_STUCK_CONDUCTOR = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from coffer.conductor.service import Conductor
    from coffer.config import load_settings
    from coffer.controlplane import ControlPlane

    state, topic, marker = sys.argv[1:4]
    settings = load_settings(
        environ={},
        overrides={"DEFAULT": {"state_dir": state,
                               "transport_url": os.environ["COFFER_TEST_BUS_URL"]}},
    )
    cp = ControlPlane(settings, migrate_db=False)

    class Stuck(Conductor):
        # Takes the batch, handles its other reports, then hangs before the heartbeats commit.
        def record_heartbeats(self, reports):
            Path(marker).write_text(str(len(reports)))
            time.sleep(3600)
            return []

    Stuck(cp, topic=topic).start()
    time.sleep(3600)
    """
)


def test_a_killed_conductor_loses_nothing(
    cp: ControlPlane, topic: str, client: redis.Redis, tmp_path: Path
) -> None:
    guests = _guests(cp, 20, archive=True)
    base = time.time_ns()
    bodies = []
    for step in range(3):
        bodies += [_heartbeat(guest, topic, base + step) for guest in guests]
        if step == 1:
            bodies.append(_archive(guests[0], topic, base))
    _publish_all(cp.bus_url, topic, bodies)
    marker = tmp_path / "taken"
    # The broker's password goes through the environment, never the argument list.
    env = {**os.environ, "COFFER_TEST_BUS_URL": cp.bus_url}
    child = subprocess.Popen(
        [sys.executable, "-c", _STUCK_CONDUCTOR, str(cp.settings.state_dir), topic, str(marker)],
        env=env,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert wait_for(marker.exists, 30), "the child conductor never took its batch"
        assert marker.read_text() == "60"
        # The report of another kind was handled before the heartbeats' transaction.
        assert _archived_segment(cp, guests[0].instance_id) == SEGMENT
        assert client.llen(topic) == 0
        assert sum(client.llen(key) for key in taken_keys(client, topic)) == 61
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    assert all(_last_seq(cp, g.instance_id) is None for g in guests)  # nothing was committed
    # A new conductor on this host sees the dead one's lease and takes its batch back at once
    # (not only after the lease expires).
    conductor = Watching(cp, topic)
    started = time.monotonic()
    conductor.start()
    try:
        last = base + 2
        assert wait_for(lambda: all(_last_seq(cp, g.instance_id) == last for g in guests), 20)
        assert time.monotonic() - started < 10
        assert wait_for(lambda: not taken_keys(client, topic), 10)
        assert client.llen(topic) == 0
    finally:
        conductor.stop()
    # The archive report came back too and was refused as already applied; nothing was lost.
    assert _last_seq(cp, guests[0].instance_id, "update_archive") == base
    assert sum(conductor.batches) == 60
    assert _readers(client, topic) == set()


def _broker_calls(client: redis.Redis) -> int:
    """How many reads of queues the broker has served (blocking or not, bulk or kombu's)."""
    stats = client.info("commandstats")
    names = ("blmove", "evalsha", "eval", "brpop", "rpop", "lmove")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in names)


def test_an_idle_conductor_waits_without_polling_and_stops_promptly(
    cp: ControlPlane, topic: str, client: redis.Redis
) -> None:
    ingest = ReportIngester(
        cp.bus_url,
        topic,
        keyring=_NoKeys(),
        record_heartbeats=lambda reports: [True] * len(reports),
        endpoints=_NoEndpoints(),
        guard=lambda env: None,
    )
    ingest.start()
    try:
        assert ingest.wait_ready(10)
        time.sleep(0.3)  # well inside its blocking wait
        before = _broker_calls(client)
        time.sleep(2)
        # One blocking wait lasts 5 s: at most one more (and the bulk take before it) began
        # here; polling every 0.25 s would have been eight or more.
        assert _broker_calls(client) - before <= 2
        thread = ingest._threads[0]
        assert thread.is_alive()
    finally:
        started = time.monotonic()
        ingest.stop(timeout=10)
        took = time.monotonic() - started
    assert not thread.is_alive()
    assert took < 1.0, f"stopping took {took:.2f} s"


def test_shutdown_finishes_the_batch_in_hand(
    cp: ControlPlane, topic: str, client: redis.Redis
) -> None:
    guests = _guests(cp, 3)
    base = time.time_ns()
    entered, release = threading.Event(), threading.Event()

    class Slow(Watching):
        def record_heartbeats(self, reports: Sequence[HeartbeatReport]) -> list[bool]:
            entered.set()
            release.wait(10)
            return super().record_heartbeats(reports)

    conductor = Slow(cp, topic)
    conductor.start()
    try:
        assert conductor.wait_ready(10)
        for guest in guests:
            publish_raw(cp.bus_url, topic, _heartbeat(guest, topic, base))
        assert entered.wait(10)
        stopper = threading.Thread(target=conductor.stop)
        stopper.start()
        time.sleep(0.2)
        release.set()
        stopper.join(10)
        assert not stopper.is_alive()
    finally:
        release.set()
        conductor.stop()
    # The batch in hand was committed and settled; what came after it waits in the queue.
    handled = sum(conductor.batches)
    assert 1 <= handled <= 3
    assert sum(_last_seq(cp, g.instance_id) == base for g in guests) == handled
    assert client.llen(topic) == 3 - handled and not taken_keys(client, topic)


class _NoKeys:
    def key_for(self, key_id: str) -> bytes:
        raise KeyError(key_id)


class _NoEndpoints:
    rpc_methods = frozenset({"heartbeat"})

    def heartbeat(self) -> None:  # pragma: no cover - never called
        raise AssertionError


def test_messages_are_decoded_exactly_as_kombu_decodes_them(cp: ControlPlane, topic: str) -> None:
    """The same messages, published twice: kombu's own consumer reads one copy, the bulk reader
    the other, and both see the same bodies."""
    import kombu

    from coffer.bus.transport import connection

    twin = f"{topic}.kombu"
    sent: list[tuple[object, dict[str, object]]] = [
        (b"\x00sealed\xff" * 50, {"content_type": CONTENT, "content_encoding": "binary"}),
        (bytes(range(256)), {"content_type": CONTENT, "content_encoding": "binary"}),
        ({"text": "caf\u00e9", "n": [1, 2.5, None]}, {"serializer": "json"}),
        ("plain text \u00e9", {}),
        (b"zipped" * 100, {"compression": "zlib"}),
    ]
    try:
        with connection(cp.bus_url) as conn:
            producer = kombu.Producer(conn)
            for queue in (topic, twin):
                for body, options in sent:
                    producer.publish(
                        body,
                        exchange="",
                        routing_key=queue,
                        declare=[kombu.Queue(queue, durable=True, auto_delete=False)],
                        **options,
                    )
            simple = conn.SimpleQueue(kombu.Queue(twin, durable=True, auto_delete=False))
            theirs = []
            for _ in sent:
                message = simple.get(timeout=5)
                theirs.append(message.body)
                message.ack()
            simple.close()
        reader = RedisBulkReader(cp.bus_url, topic, batch_size=10, idle_wait=0.2)
        try:
            reader.open()
            batch = reader.take()
            assert [m.body for m in batch] == theirs
            assert all(isinstance(body, bytes) for body in theirs)
            batch[-1].ack(multiple=True)
            assert all(m.acknowledged for m in batch)
            assert reader.settle() == 0
        finally:
            reader.close()
    finally:
        delete_queue(cp.bus_url, twin)


def test_the_conductor_reads_again_after_the_broker_restarts(
    cp: ControlPlane,
    topic: str,
    embedded_broker: EmbeddedBroker,  # noqa: F811
) -> None:
    (guest,) = _guests(cp, 1)
    base = time.time_ns()
    conductor = Watching(cp, topic)
    conductor.start()
    try:
        assert conductor.wait_ready(10)
        publish_raw(cp.bus_url, topic, _heartbeat(guest, topic, base))
        assert wait_for(lambda: _last_seq(cp, guest.instance_id) == base, 10)
        # The embedded broker keeps nothing across a restart; the consumer reconnects.
        embedded_broker.stop()
        embedded_broker.start()
        publish_raw(cp.bus_url, topic, _heartbeat(guest, topic, base + 1, "blocked"))
        assert wait_for(lambda: _last_seq(cp, guest.instance_id) == base + 1, 20)
        assert _status(cp, guest.instance_id) is ServiceStatus.BLOCKED
    finally:
        conductor.stop()
