"""The RPC behaviour suite on the embedded redis-server and on the real RabbitMQ."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator

import pytest
from bus_fixtures import (  # noqa: F401 - fixtures are found by name
    Endpoints,
    Harness,
    RpcBehaviour,
    embedded_broker,
    rabbit_url,
    wait_for,
)

from coffer import errors
from coffer.bus.envelope import StaticKeyRing
from coffer.bus.keys import generate_key
from coffer.bus.transport import EmbeddedBroker

pytestmark = pytest.mark.integration


class TestEmbeddedRedis(RpcBehaviour):
    @pytest.fixture
    def bus_url(self, embedded_broker: EmbeddedBroker) -> str:  # noqa: F811
        return embedded_broker.url

    @pytest.fixture(autouse=True)
    def _password_never_logged(
        self,
        embedded_broker: EmbeddedBroker,  # noqa: F811
        caplog: pytest.LogCaptureFixture,
    ) -> Iterator[None]:
        caplog.set_level(logging.DEBUG)  # everything, kombu and redis-py included
        yield
        password = embedded_broker.password_path.read_text().strip()
        assert password not in caplog.text

    def test_server_survives_a_broker_restart(
        self,
        embedded_broker: EmbeddedBroker,  # noqa: F811
        harness: Harness,
        key: bytes,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        endpoints = Endpoints()
        harness.server(endpoints, StaticKeyRing({"control": key}))
        client = harness.client("control", key)
        assert client.call("echo", 5, value="before") == "before"
        old_pid = embedded_broker.pid

        embedded_broker.stop()
        embedded_broker.start()
        assert embedded_broker.pid != old_pid

        # The same client and server carry on once both have reconnected.
        client.cast("record", value="after-restart")
        assert wait_for(lambda: endpoints.seen("after-restart"), timeout=15)
        deadline = time.monotonic() + 15
        while True:
            try:
                assert client.call("echo", 2, value="after") == "after"
                break
            except errors.BusError:
                if time.monotonic() > deadline:
                    raise
        assert "lost the bus" in caplog.text


class TestRabbitMQ(RpcBehaviour):
    @pytest.fixture
    def bus_url(self, rabbit_url: str) -> str:  # noqa: F811
        return rabbit_url

    def test_queues_are_deleted_after_use(self, rabbit_url: str) -> None:  # noqa: F811
        import kombu

        from coffer.bus.transport import delete_queue

        name = f"test.{uuid.uuid4().hex}"
        harness = Harness(rabbit_url, name)
        harness.client("control", generate_key()).cast("record", value=1)
        harness.close()
        delete_queue(rabbit_url, name)
        with kombu.Connection(rabbit_url) as conn:
            channel = conn.channel()
            with pytest.raises(conn.channel_errors):
                channel.queue_declare(name, passive=True)
