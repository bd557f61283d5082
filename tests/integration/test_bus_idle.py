"""Idle consumers block on the broker instead of polling it, and still stop at once.

On the embedded redis-server the broker's own command counters show how often idle consumers
ask it for work; on RabbitMQ an idle consumer sends nothing at all, so there it is the stop that
is checked: a wait of ``IDLE_WAIT_SECONDS`` must not delay it.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from bus_fixtures import (  # noqa: F401 - fixtures are found by name
    Endpoints,
    Harness,
    embedded_broker,
    rabbit_url,
)

from coffer.bus import rpc
from coffer.bus.envelope import StaticKeyRing
from coffer.bus.keys import generate_key
from coffer.bus.transport import EmbeddedBroker

pytestmark = pytest.mark.integration

#: A stop that waited for an idle wait to run out would take IDLE_WAIT_SECONDS (30 s).
STOP_BOUND = 5.0


def brpop_calls(broker: EmbeddedBroker) -> int:
    client = redis.Redis(unix_socket_path=str(broker.socket_path), password=broker._password())
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return int(stats.get("cmdstat_brpop", {}).get("calls", 0))


class SlowRecorder(Endpoints):
    def slow(self, seconds: float) -> str:
        self.record(seconds)
        time.sleep(seconds)
        return "done"


@contextlib.contextmanager
def harness_on(url: str) -> Iterator[Harness]:
    harness = Harness(url, f"test.idle.{uuid.uuid4().hex}")
    try:
        yield harness
    finally:
        harness.close()


def test_idle_consumers_do_not_poll_the_embedded_broker(
    embedded_broker: EmbeddedBroker,  # noqa: F811
) -> None:
    with harness_on(embedded_broker.url) as harness:
        idle_then_stop(embedded_broker, harness)


def idle_then_stop(embedded_broker: EmbeddedBroker, harness: Harness) -> None:  # noqa: F811
    key = generate_key()
    server = harness.server(Endpoints(), StaticKeyRing({"inst-1": key}), workers=2)
    client = harness.client("inst-1", key)
    assert client.call("echo", timeout=10, value="hi") == "hi"  # the reply listener runs too
    time.sleep(0.5)  # let every consumer settle into its blocking wait
    before = brpop_calls(embedded_broker)
    time.sleep(3)
    issued = brpop_calls(embedded_broker) - before
    # Three consumers (two workers, one reply listener): polling every 0.25 s would have
    # issued about 36 BRPOPs here; blocking ones issue none until IDLE_WAIT_SECONDS pass.
    assert issued <= 3, f"idle consumers issued {issued} BRPOPs in 3 s"
    # Still serving at once after the idle spell.
    assert client.call("echo", timeout=10, value="again") == "again"

    started = time.monotonic()
    client.close()
    server.stop(timeout=STOP_BOUND * 2)
    took = time.monotonic() - started
    assert server._thread is None
    assert took < STOP_BOUND, f"stopping idle consumers took {took:.1f} s"


@pytest.mark.parametrize("transport", ["embedded", "rabbit"])
def test_a_handler_running_at_stop_finishes_and_is_not_redelivered(
    transport: str,
    request: pytest.FixtureRequest,
) -> None:
    url = (
        request.getfixturevalue("embedded_broker").url
        if transport == "embedded"
        else request.getfixturevalue("rabbit_url")
    )
    with harness_on(url) as harness:
        stop_while_busy(harness)


def stop_while_busy(harness: Harness) -> None:
    key = generate_key()
    endpoints = SlowRecorder()
    server = harness.server(endpoints, StaticKeyRing({"inst-1": key}), workers=2)
    client = harness.client("inst-1", key)
    result: dict[str, Any] = {}

    def call_slow() -> None:
        try:
            result["value"] = client.call("slow", timeout=20, seconds=1.0)
        except Exception as exc:  # reported by the assertion below
            result["error"] = exc

    caller = threading.Thread(target=call_slow)
    caller.start()
    time.sleep(0.4)  # the handler is running now
    started = time.monotonic()
    server.stop(timeout=10)
    took = time.monotonic() - started
    caller.join(20)
    assert result.get("value") == "done", result
    assert endpoints.recorded == [1.0]
    assert server._thread is None
    assert took < STOP_BOUND, f"stop took {took:.1f} s"

    # A new server on the same queue gets nothing: the message was acknowledged.
    again = SlowRecorder()
    harness.server(again, StaticKeyRing({"inst-1": key}))
    time.sleep(1.0)
    assert again.recorded == []
    assert rpc.IDLE_WAIT_SECONDS > STOP_BOUND
