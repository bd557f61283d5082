"""What every control-plane process (api, taskmanager, conductor) shares.

``ControlPlane`` owns the settings, the control-DB engine and session factory, the master key,
the bus URL, and caches of per-instance keys and guest RPC clients. Each process builds one at
start; ``coffer up`` builds one and hands it to all three services.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from coffer.bus import keys
from coffer.bus.rpc import RpcClient
from coffer.bus.topics import CONDUCTOR_TOPIC, CONTROL_KEY_ID, TASKMANAGER_TOPIC, guest_topic
from coffer.bus.transport import EmbeddedBroker, resolve_url
from coffer.compute.zygote import remember_redis_version
from coffer.config import Settings
from coffer.db import migrate
from coffer.db.models import Instance
from coffer.db.session import WriteGate, make_engine, make_session_factory
from coffer.errors import NotFound

LOG = logging.getLogger(__name__)

__all__ = ["CONDUCTOR_TOPIC", "CONTROL_KEY_ID", "TASKMANAGER_TOPIC", "ControlPlane", "guest_topic"]


def prepare_state_dir(path: Path) -> None:
    """Create the state dir. Engines run as another user and must traverse it, not list it."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        path.chmod(0o711)


class ControlPlane:
    """Shared resources of one control-plane process. Thread-safe."""

    def __init__(self, settings: Settings, *, migrate_db: bool = True) -> None:
        self.settings = settings
        prepare_state_dir(settings.state_dir)
        self.engine: Engine = make_engine(settings.database_url, write_gate=WriteGate())
        if migrate_db:
            migrate.upgrade(self.engine)
        self.session_factory: sessionmaker[Session] = make_session_factory(self.engine)
        # Every bus connection (a reply queue per guest client, the conductor's, ...) would
        # otherwise read the installed packages' metadata to learn redis-py's version: a
        # fifth of this process's CPU during a burst of creates.
        remember_redis_version()
        self.master_key = keys.load_or_create_master_key(settings.master_key_path)
        self.control_key = keys.derive_key(self.master_key, "control-bus")
        self.broker: EmbeddedBroker | None = None
        self._bus_url: str | None = None
        self._lock = threading.Lock()
        self._guest_clients: OrderedDict[str, RpcClient] = OrderedDict()
        self._instance_keys: dict[str, bytes] = {}
        self._taskmanager: RpcClient | None = None

    # -- bus -------------------------------------------------------------------------------------

    def start_bus(self) -> None:
        """Start (or adopt) the embedded broker when the transport is ``embedded://``."""
        if self.settings.default.transport_url.startswith("embedded"):
            self.broker = EmbeddedBroker(self.settings.state_dir)
            self.broker.start()

    @property
    def bus_url(self) -> str:
        if self._bus_url is None:
            self._bus_url = resolve_url(
                self.settings.default.transport_url, self.settings.state_dir
            )
        return self._bus_url

    def taskmanager(self) -> RpcClient:
        with self._lock:
            if self._taskmanager is None:
                self._taskmanager = RpcClient(
                    self.bus_url, TASKMANAGER_TOPIC, CONTROL_KEY_ID, self.control_key
                )
            return self._taskmanager

    # -- per-instance keys and guest clients -----------------------------------------------------

    def new_instance_key(self, instance_id: str) -> tuple[bytes, str]:
        """A fresh CSPRNG key for an instance, and its master-key-wrapped form for the DB.

        The key is also kept in this process's cache, so a taskmanager in the same process
        (``coffer up``) does not read and unwrap it again for the instance's first steps."""
        key = keys.generate_key()
        wrapped = keys.wrap_key(self.master_key, key, instance_id)
        with self._lock:
            self._instance_keys[instance_id] = key
        return key, wrapped

    def instance_key(self, instance_id: str, session: Session | None = None) -> bytes:
        with self._lock:
            cached = self._instance_keys.get(instance_id)
        if cached is not None:
            return cached
        own = session is None
        sess = session or self.session_factory()
        try:
            row = sess.get(Instance, instance_id)
            if row is None:
                raise NotFound(f"Instance {instance_id} could not be found.")
            key = keys.unwrap_key(self.master_key, row.encrypted_key, instance_id)
        finally:
            if own:
                sess.close()
        with self._lock:
            self._instance_keys[instance_id] = key
        return key

    def guest(self, instance_id: str) -> RpcClient:
        """An RPC client for one instance's guest agent (LRU-cached)."""
        with self._lock:
            client = self._guest_clients.get(instance_id)
            if client is not None:
                self._guest_clients.move_to_end(instance_id)
                return client
        key = self.instance_key(instance_id)
        client = RpcClient(self.bus_url, guest_topic(instance_id), instance_id, key)
        with self._lock:
            self._guest_clients[instance_id] = client
            while len(self._guest_clients) > 64:
                _, old = self._guest_clients.popitem(last=False)
                old.close()
        return client

    def forget_instance(self, instance_id: str) -> None:
        with self._lock:
            client = self._guest_clients.pop(instance_id, None)
            self._instance_keys.pop(instance_id, None)
        if client is not None:
            client.close()

    def guest_config(
        self,
        instance: Instance,
        addresses: dict[str, str | None],
        session: Session | None = None,
    ) -> dict[str, Any]:
        """What a guest agent is told at boot (written 0600 into its volume; holds its key).
        Read in ``session`` when given (the caller's, which read ``instance``)."""
        from coffer.db.models import DatastoreVersion, Flavor

        with contextlib.ExitStack() as stack:
            db = session if session is not None else stack.enter_context(self.session_factory())
            version = db.get(DatastoreVersion, instance.datastore_version_id)
            flavor = db.get(Flavor, instance.flavor_id)
            key = self.instance_key(instance.id, db)
        assert version is not None and flavor is not None
        return {
            "instance_id": instance.id,
            "manager": version.manager,
            "datastore_version": version.version,
            "transport_url": self.bus_url,
            "key": base64.b64encode(key).decode(),
            "addresses": addresses,
            "flavor": {"id": flavor.id, "ram": flavor.ram, "vcpus": flavor.vcpus},
            "volume_size_gb": instance.volume_size,
            "heartbeat_interval": self.settings.default.agent_heartbeat_interval,
            "allowed_cidrs": list((instance.access or {}).get("allowed_cidrs") or []),
            "template_dir": str(self.settings.state_dir / "templates"),
            "engine_user": self.settings.engine_user,
        }

    def close(self) -> None:
        with self._lock:
            clients = list(self._guest_clients.values())
            self._guest_clients.clear()
            tm, self._taskmanager = self._taskmanager, None
        for client in clients:
            client.close()
        if tm is not None:
            tm.close()
        self.engine.dispose()
