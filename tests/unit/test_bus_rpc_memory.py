"""RPC dispatch rules on kombu's in-process memory transport (no broker process).

These check the client and server logic quickly; the same behaviour against real brokers is in
tests/integration/test_bus_rpc.py.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from coffer import errors
from coffer.bus.envelope import StaticKeyRing
from coffer.bus.keys import generate_key
from coffer.bus.rpc import RpcClient, RpcServer

URL = "memory://"


class Endpoints:
    rpc_methods = frozenset({"add", "fail", "record"})

    def __init__(self) -> None:
        self.recorded: list[Any] = []
        self.event = threading.Event()

    def add(self, a: int, b: int = 0) -> int:
        return a + b

    def fail(self) -> None:
        raise errors.UserNotFound("user 'bob' does not exist on this instance")

    def record(self, value: Any) -> None:
        self.recorded.append(value)
        self.event.set()

    def secret(self) -> str:
        return "not exposed"


@pytest.fixture
def key() -> bytes:
    return generate_key()


@pytest.fixture
def served(key: bytes) -> Iterator[tuple[Endpoints, RpcClient]]:
    target = f"unit.{uuid.uuid4().hex}"
    endpoints = Endpoints()
    server = RpcServer(URL, target, endpoints, StaticKeyRing({"control": key}))
    client = RpcClient(URL, target, "control", key)
    server.start()
    try:
        assert server.wait_ready(5)
        yield endpoints, client
    finally:
        client.close()
        server.stop()


def test_call_cast_and_errors(served: tuple[Endpoints, RpcClient]) -> None:
    endpoints, client = served
    assert client.call("add", 5, a=2, b=3) == 5
    client.cast("record", value="x")
    assert endpoints.event.wait(5)
    assert endpoints.recorded == ["x"]
    with pytest.raises(errors.RemoteError) as caught:
        client.call("fail", 5)
    assert (caught.value.kind, caught.value.status) == ("UserNotFound", 404)
    with pytest.raises(errors.RemoteError) as caught:
        client.call("secret", 5)
    assert caught.value.kind == "UnknownMethod"
    with pytest.raises(errors.RemoteError) as caught:
        client.call("add", 5, b=1)
    assert caught.value.kind == "BadArguments"
    assert "missing a required argument: 'a'" in caught.value.message


def test_closed_client_refuses_to_send(served: tuple[Endpoints, RpcClient]) -> None:
    _, client = served
    client.close()
    with pytest.raises(errors.BusError, match="is closed"):
        client.cast("record", value=1)


def test_client_validates_before_sending(key: bytes) -> None:
    with pytest.raises(errors.ValidationError, match="RPC target 'bad name!' is not valid"):
        RpcClient(URL, "bad name!", "control", key)
    with pytest.raises(ValueError, match="32 bytes"):
        RpcClient(URL, "ok", "control", b"short")
    client = RpcClient(URL, "unit.validate", "control", key)
    try:
        with pytest.raises(ValueError, match="must be positive"):
            client.call("add", 0, a=1)
        with pytest.raises(TypeError, match="only JSON types"):
            client.cast("record", value=object())
    finally:
        client.close()
    assert key.hex() not in repr(client)


def test_server_validates_its_endpoints(key: bytes) -> None:
    ring = StaticKeyRing({"control": key})

    class NoList:
        def add(self) -> None: ...

    class Listed:
        rpc_methods = frozenset({"missing"})

    with pytest.raises(errors.ValidationError, match="must have an 'rpc_methods' attribute"):
        RpcServer(URL, "unit.x", NoList(), ring)
    with pytest.raises(errors.ValidationError, match="lists 'missing'"):
        RpcServer(URL, "unit.x", Listed(), ring)
    with pytest.raises(errors.ValidationError, match="reserved prefix"):
        RpcServer(URL, "reply.x", Endpoints(), ring)
    with pytest.raises(errors.ValidationError, match="workers"):
        RpcServer(URL, "unit.x", Endpoints(), ring, workers=0)


def test_call_without_server_times_out(key: bytes) -> None:
    client = RpcClient(URL, f"unit.{uuid.uuid4().hex}", "control", key)
    try:
        started = time.monotonic()
        with pytest.raises(errors.RpcTimeout):
            client.call("add", 0.2, a=1)
        assert time.monotonic() - started < 1.5
    finally:
        client.close()
