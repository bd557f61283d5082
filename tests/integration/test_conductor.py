"""The conductor accepts only fresh, in-order reports sealed by the instance they are about.

Runs a real conductor on a real bus (the embedded redis broker and RabbitMQ) with a real control DB;
reports are sealed exactly as a guest seals them, or forged the ways an attacker would.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from bus_fixtures import embedded_broker, publish_raw, rabbit_url, wait_for  # noqa: F401

from coffer.bus import keys
from coffer.bus.envelope import Envelope, seal
from coffer.bus.rpc import RpcClient
from coffer.bus.transport import EmbeddedBroker
from coffer.conductor.service import Conductor
from coffer.config import load_settings
from coffer.controlplane import CONDUCTOR_TOPIC, ControlPlane
from coffer.db.models import Datastore, DatastoreVersion, Instance, ServiceStatusRow
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
def conductor(bus_url: str) -> Iterator[tuple[ControlPlane, Conductor]]:
    state = Path(tempfile.mkdtemp(prefix="ccond", dir="/tmp"))
    settings = load_settings(
        environ={}, overrides={"DEFAULT": {"state_dir": str(state), "transport_url": bus_url}}
    )
    cp = ControlPlane(settings)
    # Each test run gets its own conductor queue on the shared RabbitMQ.
    topic = f"{CONDUCTOR_TOPIC}.test-{uuid.uuid4().hex[:8]}"
    service = Conductor(cp, topic=topic)
    service.start()
    try:
        yield cp, service
    finally:
        service.stop()
        cp.close()
        shutil.rmtree(state, ignore_errors=True)


def _instance(cp: ControlPlane) -> tuple[str, bytes]:
    with transaction(cp.session_factory) as session:
        ds = session.query(Datastore).filter_by(name="mariadb").one_or_none()
        if ds is None:
            ds = Datastore(name="mariadb")
            session.add(ds)
            session.flush()
            session.add(
                DatastoreVersion(
                    datastore_id=ds.id, name="10.11", version="10.11", manager="mariadb"
                )
            )
            session.flush()
        version = session.query(DatastoreVersion).filter_by(datastore_id=ds.id).one()
        inst = Instance(
            tenant_id="p",
            name="i",
            flavor_id="1",
            volume_size=1,
            datastore_version_id=version.id,
            encrypted_key="",
        )
        session.add(inst)
        session.flush()
        key, wrapped = cp.new_instance_key(inst.id)
        inst.encrypted_key = wrapped
        session.add(ServiceStatusRow(instance_id=inst.id))
        return inst.id, key


def _status(cp: ControlPlane, instance_id: str) -> ServiceStatus:
    with cp.session_factory() as session:
        row = session.get(ServiceStatusRow, instance_id)
        assert row is not None
        return row.status


def _report(
    instance_id: str, status: str, *, seq: int, sender: str | None = None, sent_at: float | None
) -> Envelope:
    env = Envelope.new(
        key_id=sender or instance_id,
        sender=sender or instance_id,
        target="",
        method="heartbeat",
        kwargs={"instance_id": instance_id, "status": status, "sent_at": time.time()},
        seq=seq,
    )
    if sent_at is not None:
        env = Envelope(**{**env.__dict__, "sent_at": sent_at})
    return env


def _send(url: str, topic: str, env: Envelope, key: bytes) -> bytes:
    data = seal(Envelope(**{**env.__dict__, "target": topic}), key)
    publish_raw(url, topic, data)
    return data


def test_guest_heartbeat_is_recorded(conductor: tuple[ControlPlane, Conductor]) -> None:
    cp, service = conductor
    instance_id, key = _instance(cp)
    with RpcClient(cp.bus_url, service.topic, instance_id, key, sender=instance_id) as client:
        client.cast("heartbeat", instance_id=instance_id, status="healthy", sent_at=time.time())
    assert wait_for(lambda: _status(cp, instance_id) is ServiceStatus.HEALTHY)


def test_forged_replayed_and_stale_reports_are_dropped(
    conductor: tuple[ControlPlane, Conductor],
) -> None:
    cp, service = conductor
    url, topic = cp.bus_url, service.topic
    a_id, a_key = _instance(cp)
    b_id, b_key = _instance(cp)
    base = time.time_ns()

    first = _send(url, topic, _report(a_id, "healthy", seq=base + 1, sent_at=None), a_key)
    assert wait_for(lambda: _status(cp, a_id) is ServiceStatus.HEALTHY)
    _send(url, topic, _report(a_id, "shutdown", seq=base + 2, sent_at=None), a_key)
    assert wait_for(lambda: _status(cp, a_id) is ServiceStatus.SHUTDOWN)

    # Replay of the first report (same bytes): dropped, status stays SHUTDOWN.
    publish_raw(url, topic, first)
    # Instance B's guest reports about A, sealed with its own key: dropped.
    _send(url, topic, _report(a_id, "healthy", seq=base + 3, sender=b_id, sent_at=None), b_key)
    # A report claiming to be from A but sealed with B's key: fails to open.
    forged = _report(a_id, "healthy", seq=base + 4, sent_at=None)
    _send(url, topic, forged, b_key)
    # A report sealed with a key nobody has: fails to open.
    _send(url, topic, _report(a_id, "healthy", seq=base + 5, sent_at=None), keys.generate_key())
    # A stale report (an hour old), correctly sealed: dropped.
    _send(url, topic, _report(a_id, "healthy", seq=base + 6, sent_at=time.time() - 3600), a_key)
    # An out-of-order report (lower sequence than one already accepted): dropped.
    _send(url, topic, _report(a_id, "healthy", seq=base, sent_at=None), a_key)

    # A final good report from B shows the queue was drained past all of the above.
    _send(url, topic, _report(b_id, "running", seq=base + 10, sent_at=None), b_key)
    assert wait_for(lambda: _status(cp, b_id) is ServiceStatus.RUNNING)
    time.sleep(0.3)
    assert _status(cp, a_id) is ServiceStatus.SHUTDOWN
