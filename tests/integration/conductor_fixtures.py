"""What the conductor test modules share: instances recorded with their own keys, as guests
that send sealed reports."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from coffer.controlplane import ControlPlane
from coffer.db.models import Datastore, DatastoreVersion, Instance, ServiceStatusRow
from coffer.db.models_archive import InstanceArchive
from coffer.db.session import transaction


@dataclass(frozen=True)
class Guest:
    instance_id: str
    key: bytes


def make_guests(
    cp: ControlPlane,
    count: int,
    *,
    manager: str = "mariadb",
    version: str = "10.11",
    archive: bool = False,
) -> list[Guest]:
    """``count`` instances of a fresh datastore version, each with its key and status row (and,
    with ``archive``, an archive row, so archive reports about it are accepted)."""
    guests = []
    with transaction(cp.session_factory) as session:
        ds = Datastore(name=f"{manager}-{uuid.uuid4().hex[:6]}")
        session.add(ds)
        session.flush()
        row = DatastoreVersion(datastore_id=ds.id, name=version, version=version, manager=manager)
        session.add(row)
        session.flush()
        for n in range(count):
            inst = Instance(
                tenant_id="p",
                name=f"i{n}",
                flavor_id="1",
                volume_size=1,
                datastore_version_id=row.id,
                encrypted_key="",
            )
            session.add(inst)
            session.flush()
            key, wrapped = cp.new_instance_key(inst.id)
            inst.encrypted_key = wrapped
            session.add(ServiceStatusRow(instance_id=inst.id))
            if archive:
                session.add(
                    InstanceArchive(
                        instance_id=inst.id,
                        tenant_id="p",
                        storage_driver="file",
                        prefix=f"p/archive/{inst.id}",
                    )
                )
            guests.append(Guest(inst.id, key))
    return guests
