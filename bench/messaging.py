"""Benchmark 5: control-plane messaging, sealed Coffer RPC vs raw kombu on the same transport.

Heartbeat ingestion: ``count`` sealed heartbeats from ``senders`` instances (each with its own key
in a private control DB) wait in the queue; then Coffer's real ``Conductor`` (key lookup,
freshness and sequence guard, status writes in SQLite, acknowledgement after the commit)
consumes them. The baseline publishes the same number of unsealed JSON heartbeats and consumes
them with plain kombu consumers (two, prefetch 1, acknowledged after handling): the transport
alone. Both rates run from the moment the consumers are started (connecting included) to the
last heartbeat handled, so a consumer that takes messages in batches is timed the same way as
one that takes them one by one.

Round trip: a guest-like ``RpcServer`` (the agent's settings: its own key, two workers) echoes
``calls`` sequential sealed calls; the baseline is kombu request/reply with a reply queue and
correlation ids, no sealing. Every queue is uniquely named and deleted afterwards; the embedded
broker runs in the benchmark's work directory and is stopped by PID.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import kombu

from bench.harness import BenchError, Workspace
from bench.report import BenchmarkResult, Check, Metric, Target, percentile

LOG = logging.getLogger("bench")

RABBIT_URL = "amqp://guest:guest@127.0.0.1:5672//"
HEARTBEAT_TARGET = Target(">= 2,000/s", (Check("median", ">=", 2000.0),))


class _Clock:
    """Counts events and remembers when the first and the latest happened."""

    def __init__(self) -> None:
        self.count = 0
        self.progress = 0
        self.first = 0.0
        self.last = 0.0
        self._lock = threading.Lock()

    def start(self) -> None:
        """The consumers are being started: the clock runs from here."""
        with self._lock:
            self.first = time.perf_counter()

    def tick(self, handled: int = 1) -> None:
        now = time.perf_counter()
        with self._lock:
            self.count += handled
            self.progress += handled
            self.last = now

    def tick_idle(self, handled: int = 1) -> None:
        """Something was handled that does not count (e.g. rejected): only proves progress."""
        with self._lock:
            self.progress += handled

    def rate(self) -> float:
        if self.count < 1 or self.last <= self.first:
            raise BenchError("too few messages were handled to compute a rate")
        return self.count / (self.last - self.first)


def _wait_for(condition: Callable[[], bool], clock: _Clock, what: str, stall: float = 15) -> None:
    """Wait until ``condition``; give up when nothing was handled for ``stall`` seconds."""
    seen, since = -1, time.monotonic()
    while not condition():
        if clock.progress != seen:
            seen, since = clock.progress, time.monotonic()
        elif time.monotonic() - since > stall:
            raise BenchError(f"{what}: only {clock.count} handled, then nothing for {stall:.0f} s")
        time.sleep(0.005)


# -- heartbeats ---------------------------------------------------------------------------------


def sealed_heartbeats(url: str, state_dir: Path, senders: int, count: int) -> tuple[float, int]:
    """Heartbeats per second Coffer's conductor ingests (see the module docstring), and how
    many of them it rejected (a report older than one already taken from the same instance)."""
    from coffer.bus.envelope import Envelope as Env
    from coffer.bus.envelope import SequenceCounter, seal
    from coffer.bus.rpc import CONTENT_TYPE
    from coffer.bus.transport import connection, delete_queue
    from coffer.conductor.heartbeats import HeartbeatReport
    from coffer.conductor.service import Conductor
    from coffer.config import load_settings
    from coffer.controlplane import ControlPlane
    from coffer.db.models import Datastore, DatastoreVersion, Instance
    from coffer.db.session import transaction

    settings = load_settings(
        environ={},
        overrides={"DEFAULT": {"state_dir": str(state_dir), "transport_url": url}},
    )
    cp = ControlPlane(settings)
    clock = _Clock()

    rejected = 0

    class CountingConductor(Conductor):
        def record_heartbeats(self, reports: Sequence[HeartbeatReport]) -> list[bool]:
            nonlocal rejected
            accepted = super().record_heartbeats(reports)
            applied = sum(accepted)
            rejected += len(accepted) - applied
            clock.tick(applied)
            clock.tick_idle(len(accepted) - applied)
            return accepted

    topic = f"bench.conductor.{uuid.uuid4().hex}"
    conductor = CountingConductor(cp, topic=topic)
    # Rejections are counted from the guard's answers; their warnings would only be noise.
    ingest_log = logging.getLogger("coffer.conductor.ingest")
    saved = ingest_log.level
    try:
        keys: list[tuple[str, bytes, SequenceCounter]] = []
        with transaction(cp.session_factory) as session:
            datastore = Datastore(name="bench")
            session.add(datastore)
            session.flush()
            version = DatastoreVersion(
                datastore_id=datastore.id, name="1", version="1", manager="mariadb"
            )
            session.add(version)
            session.flush()
            for _ in range(senders):
                instance_id = str(uuid.uuid4())
                key, wrapped = cp.new_instance_key(instance_id)
                session.add(
                    Instance(
                        id=instance_id,
                        tenant_id="bench",
                        name="bench-heartbeat",
                        flavor_id="6",
                        volume_size=1,
                        datastore_version_id=version.id,
                        encrypted_key=wrapped,
                    )
                )
                keys.append((instance_id, key, SequenceCounter()))
        # What a guest's ``RpcClient.cast("heartbeat", ...)`` sends, sealed with the instance's
        # own key, round robin over the instances (as many guests reporting at once would).
        queue = kombu.Queue(topic, durable=True, auto_delete=False)
        with connection(url) as conn:
            producer = kombu.Producer(conn.channel(), auto_declare=False)
            for index in range(count):
                instance_id, key, seq = keys[index % senders]
                envelope = Env.new(
                    key_id=instance_id,
                    sender=instance_id,
                    target=topic,
                    method="heartbeat",
                    kwargs={
                        "instance_id": instance_id,
                        "status": "healthy",
                        "sent_at": time.time(),
                        "volume": {"used": 1 << 20, "total": 1 << 30},
                    },
                    seq=seq.next(),
                )
                producer.publish(
                    seal(envelope, key),
                    exchange="",
                    routing_key=topic,
                    content_type=CONTENT_TYPE,
                    content_encoding="binary",
                    delivery_mode=2,
                    declare=[queue],
                )
        ingest_log.setLevel(logging.ERROR)
        clock.start()
        conductor.start()
        _wait_for(lambda: clock.progress >= count, clock, "conductor")
        return clock.rate(), rejected
    finally:
        conductor.stop()
        ingest_log.setLevel(saved)
        delete_queue(url, topic)
        cp.close()


def raw_heartbeats(url: str, count: int, workers: int = 2) -> float:
    """Unsealed JSON heartbeats per second plain kombu consumers take off the same transport."""
    from coffer.bus.transport import connection, delete_queue

    queue = kombu.Queue(f"bench.raw-hb.{uuid.uuid4().hex}", durable=True, auto_delete=False)
    clock = _Clock()
    stop = threading.Event()
    threads: list[threading.Thread] = []
    try:
        with connection(url) as conn:
            producer = kombu.Producer(conn.channel(), auto_declare=False)
            for index in range(count):
                producer.publish(
                    {
                        "method": "heartbeat",
                        "instance_id": f"raw-{index % 50}",
                        "status": "healthy",
                        "sent_at": time.time(),
                        "volume": {"used": 1 << 20, "total": 1 << 30},
                    },
                    exchange="",
                    routing_key=queue.name,
                    serializer="json",
                    delivery_mode=2,
                    declare=[queue],
                )

        def consume() -> None:
            def on_message(body: Any, message: kombu.Message) -> None:
                if body.get("method") == "heartbeat":
                    clock.tick()
                message.ack()

            with (
                connection(url) as conn,
                kombu.Consumer(
                    conn.channel(),
                    queues=[queue],
                    callbacks=[on_message],
                    accept=["json"],
                    prefetch_count=1,
                ),
            ):
                while not stop.is_set():
                    try:
                        conn.drain_events(timeout=0.25)
                    except TimeoutError:
                        continue

        clock.start()
        for _ in range(workers):
            thread = threading.Thread(target=consume, daemon=True)
            thread.start()
            threads.append(thread)
        _wait_for(lambda: clock.count >= count, clock, "raw consumers")
        return clock.rate()
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
        delete_queue(url, queue.name)


# -- round trips --------------------------------------------------------------------------------


class _Echo:
    rpc_methods = frozenset({"echo"})

    def echo(self, value: Any) -> Any:
        return value


def sealed_round_trips(url: str, calls: int) -> list[float]:
    """Seconds per sealed call to a guest-like RPC server."""
    from coffer.bus.envelope import StaticKeyRing
    from coffer.bus.keys import generate_key
    from coffer.bus.rpc import RpcClient, RpcServer
    from coffer.bus.transport import delete_queue

    instance_id = str(uuid.uuid4())
    queue = f"bench.guestagent.{instance_id}"
    key = generate_key()
    server = RpcServer(url, queue, _Echo(), StaticKeyRing({instance_id: key}), workers=2)
    client = RpcClient(url, queue, instance_id, key)
    server.start()
    try:
        if not server.wait_ready(15):
            raise BenchError("the guest-like RPC server did not start consuming in 15 s")
        client.call("echo", 10, value=0)  # reply queue and declarations
        latencies = []
        for index in range(calls):
            started = time.perf_counter()
            client.call("echo", 10, value=index)
            latencies.append(time.perf_counter() - started)
        return latencies
    finally:
        client.close()
        server.stop()
        delete_queue(url, queue)


def raw_round_trips(url: str, calls: int) -> list[float]:
    """Seconds per unsealed kombu request/reply on the same transport."""
    from coffer.bus.transport import connection, delete_queue

    queue = f"bench.raw-rpc.{uuid.uuid4().hex}"
    reply_queue = f"reply.{uuid.uuid4().hex}"
    stop = threading.Event()
    ready = threading.Event()

    def serve() -> None:
        with connection(url) as conn:
            producer = kombu.Producer(conn.channel())

            def on_message(body: Any, message: kombu.Message) -> None:
                producer.publish(
                    {"result": body["value"]},
                    exchange="",
                    routing_key=message.properties["reply_to"],
                    correlation_id=message.properties["correlation_id"],
                    serializer="json",
                )
                message.ack()

            with kombu.Consumer(
                conn.channel(),
                queues=[kombu.Queue(queue, durable=True, auto_delete=False)],
                callbacks=[on_message],
                accept=["json"],
                prefetch_count=1,
            ):
                ready.set()
                while not stop.is_set():
                    try:
                        conn.drain_events(timeout=0.25)
                    except TimeoutError:
                        continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    if not ready.wait(15):
        raise BenchError("the raw kombu server did not start consuming in 15 s")
    replies: dict[str, Any] = {}
    try:
        with connection(url) as conn:
            producer = kombu.Producer(conn.channel())
            reply = kombu.Queue(reply_queue, durable=False, auto_delete=True, exclusive=True)

            def on_reply(body: Any, message: kombu.Message) -> None:
                replies[message.properties["correlation_id"]] = body

            with kombu.Consumer(
                conn.channel(), queues=[reply], callbacks=[on_reply], accept=["json"], no_ack=True
            ):

                def call(value: int) -> None:
                    correlation_id = uuid.uuid4().hex
                    producer.publish(
                        {"method": "echo", "value": value},
                        exchange="",
                        routing_key=queue,
                        reply_to=reply_queue,
                        correlation_id=correlation_id,
                        serializer="json",
                        declare=[kombu.Queue(queue, durable=True, auto_delete=False)],
                    )
                    while correlation_id not in replies:
                        conn.drain_events(timeout=10)
                    replies.pop(correlation_id)

                call(0)
                latencies = []
                for index in range(calls):
                    started = time.perf_counter()
                    call(index)
                    latencies.append(time.perf_counter() - started)
        return latencies
    finally:
        stop.set()
        thread.join(10)
        delete_queue(url, queue)


# -- the benchmark ------------------------------------------------------------------------------


def rabbit_reachable(url: str = RABBIT_URL) -> str | None:
    """None if RabbitMQ answers at ``url``, else the reason it cannot be used."""
    from coffer.bus.transport import connection

    try:
        with connection(url) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0)
        return None
    except Exception as exc:
        return f"RabbitMQ at 127.0.0.1:5672 is not reachable ({type(exc).__name__})"


def bench_messaging(
    workspace: Workspace,
    *,
    runs: int,
    heartbeats: int,
    calls: int,
    transports: tuple[str, ...] = ("embedded", "rabbitmq"),
) -> BenchmarkResult:
    from coffer.bus.transport import EmbeddedBroker

    # Ten reports per instance: steady state (sequence rows updated, not created) without one
    # instance's reports queuing so close together that the two workers race them.
    senders = max(1, heartbeats // 10)
    result = BenchmarkResult("5-messaging", "Control-plane messaging: sealed vs raw kombu")
    for transport in transports:
        broker: EmbeddedBroker | None = None
        if transport == "embedded":
            broker = EmbeddedBroker(workspace.subdir("bus"))
            broker.start()
            url = broker.url
        else:
            reason = rabbit_reachable()
            if reason is not None:
                result.skipped.append(reason)
                continue
            url = RABBIT_URL
        rejected = 0
        try:
            ours_rate, theirs_rate = [], []
            ours_p50, ours_p99, theirs_p50, theirs_p99 = [], [], [], []
            for _ in range(runs):
                # A fresh control DB each run: the conductor's sequence table starts empty.
                rate, dropped = sealed_heartbeats(
                    url, workspace.subdir("control"), senders, heartbeats
                )
                ours_rate.append(rate)
                rejected += dropped
                theirs_rate.append(raw_heartbeats(url, heartbeats))
                sealed = sealed_round_trips(url, calls)
                raw = raw_round_trips(url, calls)
                ours_p50.append(percentile(sealed, 0.5) * 1000)
                ours_p99.append(percentile(sealed, 0.99) * 1000)
                theirs_p50.append(percentile(raw, 0.5) * 1000)
                theirs_p99.append(percentile(raw, 0.99) * 1000)
            LOG.info(
                "messaging %s: %.0f hb/s sealed, %.0f raw",
                transport,
                ours_rate[-1],
                theirs_rate[-1],
            )
        finally:
            if broker is not None:
                broker.stop()
        name = "embedded broker" if transport == "embedded" else "RabbitMQ"
        label = "raw kombu, no sealing"
        result.metrics += [
            Metric(
                result.name,
                f"{name}: heartbeats ingested",
                "msg/s",
                ours_rate,
                label,
                theirs_rate,
                better="higher",
                target=HEARTBEAT_TARGET,
                note=f"{heartbeats} queued heartbeats from {senders} instances per run; "
                f"{rejected} rejected as out of order over {runs} run(s)",
            ),
            Metric(
                result.name,
                f"{name}: RPC round trip p50",
                "ms",
                ours_p50,
                label,
                theirs_p50,
                note=f"{calls} sequential calls per run",
            ),
            Metric(
                result.name,
                f"{name}: RPC round trip p99",
                "ms",
                ours_p99,
                label,
                theirs_p99,
                note=f"{calls} sequential calls per run",
            ),
        ]
    return result
