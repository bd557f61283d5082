"""Measure the bus: call round trip (p50/p99) and cast throughput, sealed RPC vs raw kombu.

Usage::

    .venv/bin/python bench/bus_roundtrip.py --url embedded:// -n 1000
    .venv/bin/python bench/bus_roundtrip.py --url amqp://guest:guest@127.0.0.1:5672// -n 1000

``embedded://`` starts a private redis-server in a temporary state directory and stops it (by
pid) at the end. Queues are uniquely named and deleted afterwards. "casts/s" counts messages
sent and consumed by the server, from the first send to the last one handled.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kombu

from coffer.bus.envelope import StaticKeyRing
from coffer.bus.keys import generate_key
from coffer.bus.rpc import RpcClient, RpcServer
from coffer.bus.transport import EmbeddedBroker, connection, delete_queue, resolve_url, safe_url


class _Counter:
    def __init__(self) -> None:
        self.count = 0
        self.lock = threading.Lock()

    def bump(self) -> None:
        with self.lock:
            self.count += 1


class _Echo:
    rpc_methods = frozenset({"echo", "tick"})

    def __init__(self) -> None:
        self.ticks = _Counter()

    def echo(self, value: Any) -> Any:
        return value

    def tick(self) -> None:
        self.ticks.bump()


def _wait(condition: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the server did not consume every message in time")
        time.sleep(0.001)


def _percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def bench_sealed(url: str, count: int) -> tuple[list[float], float]:
    queue = f"bench.sealed.{uuid.uuid4().hex}"
    key = generate_key()
    endpoints = _Echo()
    server = RpcServer(url, queue, endpoints, StaticKeyRing({"control": key}))
    client = RpcClient(url, queue, "control", key)
    server.start()
    try:
        server.wait_ready(10)
        client.call("echo", 10, value=0)  # warm up: reply queue, declarations
        latencies = []
        for index in range(count):
            started = time.perf_counter()
            client.call("echo", 10, value=index)
            latencies.append(time.perf_counter() - started)
        started = time.perf_counter()
        for _ in range(count):
            client.cast("tick")
        _wait(lambda: endpoints.ticks.count >= count)
        rate = count / (time.perf_counter() - started)
        return latencies, rate
    finally:
        client.close()
        server.stop()
        delete_queue(url, queue)


def bench_raw(url: str, count: int) -> tuple[list[float], float]:
    queue = f"bench.raw.{uuid.uuid4().hex}"
    reply_queue = f"reply.{uuid.uuid4().hex}"
    ticks = _Counter()
    stop = threading.Event()
    ready = threading.Event()

    def serve() -> None:
        with connection(url) as conn:
            producer = kombu.Producer(conn.channel())

            def on_message(body: Any, message: kombu.Message) -> None:
                if body.get("method") == "tick":
                    ticks.bump()
                else:
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
    ready.wait(10)
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
                    )
                    while correlation_id not in replies:
                        conn.drain_events(timeout=10)
                    replies.pop(correlation_id)

                call(0)
                latencies = []
                for index in range(count):
                    started = time.perf_counter()
                    call(index)
                    latencies.append(time.perf_counter() - started)
                started = time.perf_counter()
                for _ in range(count):
                    producer.publish({"method": "tick"}, exchange="", routing_key=queue)
                _wait(lambda: ticks.count >= count)
                rate = count / (time.perf_counter() - started)
        return latencies, rate
    finally:
        stop.set()
        thread.join(10)
        delete_queue(url, queue)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="embedded://", help="transport URL (default embedded://)")
    parser.add_argument("-n", "--count", type=int, default=1000, help="messages per measurement")
    args = parser.parse_args()

    state_dir: Path | None = None
    broker: EmbeddedBroker | None = None
    url = args.url
    try:
        if url.startswith("embedded://"):
            state_dir = Path(tempfile.mkdtemp(prefix="cbench", dir="/tmp"))
            broker = EmbeddedBroker(state_dir)
            broker.start()
        url = resolve_url(url, state_dir or Path(tempfile.gettempdir()))
        rows = [("sealed RPC", *bench_sealed(url, args.count))]
        rows.append(("raw kombu", *bench_raw(url, args.count)))
    finally:
        if broker is not None:
            broker.stop()
        if state_dir is not None:
            shutil.rmtree(state_dir, ignore_errors=True)

    print(f"transport: {safe_url(url)}   messages per row: {args.count}")
    print(f"{'mode':<12} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'calls/s':>9} {'casts/s':>9}")
    for name, latencies, rate in rows:
        mean = statistics.fmean(latencies)
        print(
            f"{name:<12} {_percentile(latencies, 0.5) * 1000:>8.2f} "
            f"{_percentile(latencies, 0.99) * 1000:>8.2f} {mean * 1000:>8.2f} "
            f"{1 / mean:>9.0f} {rate:>9.0f}"
        )


if __name__ == "__main__":
    main()
