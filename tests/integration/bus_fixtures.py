"""Shared fixtures and the RPC behaviour suite for the bus, run per transport.

``RpcBehaviour`` holds the tests; ``test_bus_rpc.py`` subclasses it once per real broker (the
embedded redis-server and RabbitMQ) by providing a ``bus_url`` fixture. Every process a fixture
starts is stopped by pid in a ``finally``; every queue a test uses has a unique name and is
deleted afterwards.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import kombu
import pytest

from coffer import errors
from coffer.bus.envelope import Envelope, KeyRing, StaticKeyRing, seal
from coffer.bus.keys import generate_key
from coffer.bus.rpc import CONTENT_TYPE, RpcClient, RpcServer
from coffer.bus.transport import EmbeddedBroker, connection, delete_queue

RABBIT_URL = os.environ.get("COFFER_TEST_RABBIT_URL", "amqp://guest:guest@127.0.0.1:5672//")


def wait_for(condition: Callable[[], bool], timeout: float = 10.0, interval: float = 0.01) -> bool:
    """Poll ``condition`` until it is true or ``timeout`` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


@pytest.fixture
def embedded_broker() -> Iterator[EmbeddedBroker]:
    """A started EmbeddedBroker in a short private directory; stopped by pid afterwards."""
    # Short path: unix socket paths are limited to 107 bytes, pytest's tmp_path can be longer.
    state_dir = Path(tempfile.mkdtemp(prefix="cbus", dir="/tmp"))
    broker = EmbeddedBroker(state_dir)
    try:
        broker.start()
        yield broker
    finally:
        pid = broker.pid
        broker.stop()
        if pid is not None:
            assert wait_for(lambda: not _process_alive(pid), 10), f"broker {pid} still running"
        _remove_tree(state_dir)


@pytest.fixture
def rabbit_url() -> str:
    """The real RabbitMQ; fails (not skips) when it is not reachable, so CI cannot pass silently."""
    conn = kombu.Connection(RABBIT_URL, connect_timeout=3)
    try:
        conn.ensure_connection(max_retries=1, interval_start=0)
    except Exception as exc:
        pytest.fail(f"RabbitMQ at {conn.as_uri()} is not reachable ({type(exc).__name__})")
    finally:
        conn.release()
    return RABBIT_URL


def _process_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def publish_raw(url: str, queue: str, body: bytes) -> None:
    """Publish ``body`` as is to ``queue`` (declared durable, as RpcClient does)."""
    with connection(url) as conn:
        producer = kombu.Producer(conn)
        producer.publish(
            body,
            exchange="",
            routing_key=queue,
            content_type=CONTENT_TYPE,
            content_encoding="binary",
            declare=[kombu.Queue(queue, durable=True, auto_delete=False)],
        )


class Endpoints:
    """Test endpoints that record what ran."""

    rpc_methods = frozenset({"record", "echo", "slow", "fail_conflict", "fail_internal", "whoami"})

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.recorded: list[Any] = []
        self.hidden_ran = False

    def record(self, value: Any) -> None:
        with self.lock:
            self.recorded.append(value)

    def echo(self, value: Any) -> Any:
        return value

    def whoami(self, token: str) -> dict[str, Any]:
        return {"token": token, "thread": threading.current_thread().name}

    def slow(self, seconds: float) -> str:
        time.sleep(seconds)
        return "done"

    def fail_conflict(self) -> None:
        raise errors.Conflict("the instance is busy with a resize; try again when it is ACTIVE")

    def fail_internal(self, user: dict[str, str]) -> None:
        # A careless handler puts a secret argument into its exception message.
        raise RuntimeError(f"could not create {user['name']} with {user['password']}")

    def hidden(self) -> None:
        """Public but not listed in rpc_methods: must never be reachable over the bus."""
        self.hidden_ran = True

    def seen(self, value: Any) -> bool:
        with self.lock:
            return value in self.recorded


class Harness:
    """Creates servers and clients on one queue and tears all of them down."""

    def __init__(self, url: str, queue: str) -> None:
        self.url = url
        self.queue = queue
        self.servers: list[RpcServer] = []
        self.clients: list[RpcClient] = []

    def server(
        self, endpoints: object, keyring: KeyRing, *, start: bool = True, **kwargs: Any
    ) -> RpcServer:
        server = RpcServer(self.url, self.queue, endpoints, keyring, **kwargs)
        self.servers.append(server)
        if start:
            server.start()
            assert server.wait_ready(10), "the RPC server did not start consuming"
        return server

    def client(self, key_id: str, key: bytes, sender: str = "control") -> RpcClient:
        client = RpcClient(self.url, self.queue, key_id, key, sender=sender)
        self.clients.append(client)
        return client

    def close(self) -> None:
        try:
            for client in self.clients:
                client.close()
            for server in self.servers:
                server.stop(timeout=10)
                assert server._thread is None, "an RPC server thread did not stop"
        finally:
            delete_queue(self.url, self.queue)


class RpcBehaviour:
    """The RPC behaviour every transport must show. Subclasses provide ``bus_url``."""

    @pytest.fixture
    def bus_url(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    @pytest.fixture
    def harness(self, bus_url: str) -> Iterator[Harness]:
        harness = Harness(bus_url, f"test.{uuid.uuid4().hex}")
        try:
            yield harness
        finally:
            harness.close()

    @pytest.fixture
    def key(self) -> bytes:
        return generate_key()

    def _marker_after(
        self, harness: Harness, endpoints: Endpoints, key_id: str, key: bytes
    ) -> None:
        """Send a valid cast and wait for it: with one worker, everything before it was handled."""
        marker = f"marker-{uuid.uuid4().hex}"
        harness.client(key_id, key, sender=key_id).cast("record", value=marker)
        assert wait_for(lambda: endpoints.seen(marker)), "the valid marker message never arrived"

    # -- delivery ----------------------------------------------------------------------------

    def test_cast_sent_before_the_server_starts_is_delivered(
        self, harness: Harness, key: bytes
    ) -> None:
        endpoints = Endpoints()
        client = harness.client("control", key)
        client.cast("record", value="early")
        harness.server(endpoints, StaticKeyRing({"control": key}))
        client.cast("record", value="late")
        assert wait_for(lambda: endpoints.seen("late"))
        assert endpoints.recorded == ["early", "late"]

    def test_call_returns_the_handlers_result(self, harness: Harness, key: bytes) -> None:
        harness.server(Endpoints(), StaticKeyRing({"control": key}))
        client = harness.client("control", key)
        payload = {"name": "db1", "sizes": [1, 2.5], "nested": {"ok": True, "none": None}}
        assert client.call("echo", 5, value=payload) == payload
        assert client.call("echo", 5, value="again") == "again"

    def test_call_times_out_with_rpc_timeout(self, harness: Harness, key: bytes) -> None:
        harness.server(Endpoints(), StaticKeyRing({"control": key}))
        client = harness.client("control", key)
        started = time.monotonic()
        with pytest.raises(errors.RpcTimeout, match=r"did not answer 'slow' within 0\.3 s"):
            client.call("slow", 0.3, seconds=1.5)
        assert time.monotonic() - started < 1.2  # did not wait for the handler
        # The late reply is dropped, and the client keeps working.
        assert client.call("echo", 5, value=1) == 1

    # -- errors ------------------------------------------------------------------------------

    def test_remote_coffer_error_keeps_kind_message_and_status(
        self, harness: Harness, key: bytes
    ) -> None:
        harness.server(Endpoints(), StaticKeyRing({"control": key}))
        with pytest.raises(errors.RemoteError) as caught:
            harness.client("control", key).call("fail_conflict", 5)
        assert caught.value.kind == "Conflict"
        assert caught.value.status == 409
        assert caught.value.message == (
            "the instance is busy with a resize; try again when it is ACTIVE"
        )

    def test_unexpected_exception_becomes_a_generic_internal_error(
        self, harness: Harness, key: bytes, caplog: pytest.LogCaptureFixture
    ) -> None:
        harness.server(Endpoints(), StaticKeyRing({"control": key}))
        with (
            caplog.at_level(logging.ERROR, logger="coffer.bus"),
            pytest.raises(errors.RemoteError) as caught,
        ):
            user = {"name": "app", "password": "hunter2-secret"}
            harness.client("control", key).call("fail_internal", 5, user=user)
        assert caught.value.kind == "InternalError"
        assert caught.value.status == 500
        assert "hunter2" not in caught.value.message
        # Details are in the server's log, with the secret argument masked.
        assert "RuntimeError: could not create app with **" in caplog.text
        assert "hunter2" not in caplog.text

    def test_unknown_or_unlisted_method_is_refused(self, harness: Harness, key: bytes) -> None:
        endpoints = Endpoints()
        harness.server(endpoints, StaticKeyRing({"control": key}))
        client = harness.client("control", key)
        for method in ("hidden", "no_such_method", "__init__"):
            with pytest.raises(errors.RemoteError) as caught:
                client.call(method, 5)
            assert caught.value.kind == "UnknownMethod"
            assert caught.value.status == 501
            assert method in caught.value.message
        assert not endpoints.hidden_ran

    def test_wrong_arguments_are_refused_before_the_handler_runs(
        self, harness: Harness, key: bytes
    ) -> None:
        endpoints = Endpoints()
        harness.server(endpoints, StaticKeyRing({"control": key}))
        with pytest.raises(errors.RemoteError) as caught:
            harness.client("control", key).call("record", 5, valeu=1)
        assert caught.value.kind == "BadArguments"
        assert caught.value.status == 400
        assert endpoints.recorded == []

    # -- rejected messages -------------------------------------------------------------------

    def test_message_sealed_with_another_instances_key_is_rejected(
        self, harness: Harness, caplog: pytest.LogCaptureFixture
    ) -> None:
        key_a, key_b = generate_key(), generate_key()
        endpoints = Endpoints()
        harness.server(endpoints, StaticKeyRing({"inst-a": key_a}))
        with caplog.at_level(logging.WARNING, logger="coffer.bus"):
            # Instance b using its own key id, which this server does not know ...
            harness.client("inst-b", key_b, sender="inst-b").cast("record", value="b-own-id")
            # ... and claiming instance a's key id while holding only its own key.
            harness.client("inst-a", key_b, sender="inst-a").cast("record", value="b-as-a")
            self._marker_after(harness, endpoints, "inst-a", key_a)
        assert not endpoints.seen("b-own-id")
        assert not endpoints.seen("b-as-a")
        assert "no key is known for key id 'inst-b'" in caplog.text
        assert "failed authentication" in caplog.text

    def test_replayed_message_is_rejected_the_second_time(
        self, harness: Harness, key: bytes, caplog: pytest.LogCaptureFixture
    ) -> None:
        endpoints = Endpoints()
        harness.server(endpoints, StaticKeyRing({"control": key}))
        body = seal(self._envelope(harness.queue, "replayed"), key)
        with caplog.at_level(logging.WARNING, logger="coffer.bus"):
            publish_raw(harness.url, harness.queue, body)
            publish_raw(harness.url, harness.queue, body)
            self._marker_after(harness, endpoints, "control", key)
        assert endpoints.recorded.count("replayed") == 1
        assert "already received (replay)" in caplog.text

    def test_stale_message_is_rejected(
        self, harness: Harness, key: bytes, caplog: pytest.LogCaptureFixture
    ) -> None:
        endpoints = Endpoints()
        harness.server(endpoints, StaticKeyRing({"control": key}))
        stale = replace(self._envelope(harness.queue, "stale"), sent_at=time.time() - 3600)
        with caplog.at_level(logging.WARNING, logger="coffer.bus"):
            publish_raw(harness.url, harness.queue, seal(stale, key))
            self._marker_after(harness, endpoints, "control", key)
        assert not endpoints.seen("stale")
        assert "is stale" in caplog.text

    def test_tampered_or_misrouted_message_is_rejected(
        self, harness: Harness, key: bytes, caplog: pytest.LogCaptureFixture
    ) -> None:
        endpoints = Endpoints()
        harness.server(endpoints, StaticKeyRing({"control": key}))
        body = bytearray(seal(self._envelope(harness.queue, "tampered"), key))
        body[-20] ^= 0x01
        misrouted = seal(self._envelope("conductor", "misrouted"), key)
        with caplog.at_level(logging.WARNING, logger="coffer.bus"):
            publish_raw(harness.url, harness.queue, bytes(body))
            publish_raw(harness.url, harness.queue, misrouted)
            publish_raw(harness.url, harness.queue, b"not a sealed message at all")
            self._marker_after(harness, endpoints, "control", key)
        assert len(endpoints.recorded) == 1
        assert endpoints.recorded[0].startswith("marker-")
        assert "failed authentication" in caplog.text
        assert "sealed for 'conductor'" in caplog.text
        assert "malformed header" in caplog.text

    def test_sender_spoofing_is_rejected_when_sender_must_be_key_id(
        self, harness: Harness, caplog: pytest.LogCaptureFixture
    ) -> None:
        key_a, key_b = generate_key(), generate_key()
        endpoints = Endpoints()
        harness.server(
            endpoints,
            StaticKeyRing({"inst-a": key_a, "inst-b": key_b}),
            require_sender_is_key_id=True,
        )
        with caplog.at_level(logging.WARNING, logger="coffer.bus"):
            harness.client("inst-a", key_a, sender="inst-b").cast("record", value="spoofed")
            harness.client("inst-a", key_a, sender="inst-a").cast("record", value="honest")
            self._marker_after(harness, endpoints, "inst-b", key_b)
        assert endpoints.seen("honest")
        assert not endpoints.seen("spoofed")
        assert "claims to come from 'inst-b'" in caplog.text

    # -- load --------------------------------------------------------------------------------

    def test_concurrent_calls_from_many_threads_get_their_own_answers(
        self, harness: Harness, key: bytes
    ) -> None:
        harness.server(Endpoints(), StaticKeyRing({"control": key}), workers=4)
        client = harness.client("control", key)

        def one(index: int) -> tuple[str, str]:
            token = f"{index}-{uuid.uuid4().hex}"
            return token, client.call("whoami", 10, token=token)["token"]

        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(one, range(50)))
        assert len(answers) == 50
        for sent, received in answers:
            assert sent == received

    # -- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _envelope(target: str, value: str) -> Envelope:
        return Envelope.new(
            key_id="control",
            sender="control",
            target=target,
            method="record",
            kwargs={"value": value},
            seq=time.time_ns(),
        )


def unix_connect_fails_without_password(path: Path) -> bool:
    """True if the socket answers but refuses a command without AUTH."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        sock.connect(str(path))
        sock.sendall(b"*1\r\n$4\r\nPING\r\n")
        return sock.recv(200).startswith(b"-NOAUTH")
