"""The API side of day-2 operations: check a request completely, then record the desired state,
the operation and an instance event in the caller's transaction (``day2.begin_operation``), so a
refusal changes nothing and the taskmanager finds everything it needs in the control DB.

An instance takes a day-2 operation only while it is ACTIVE: its server runs, no other operation
holds it (task NONE, or RESTART_REQUIRED; attaching or detaching a group needs NONE, as in
Trove), no backup of it is being taken, and its guest reported a running engine within the
heartbeat expiry; anything else is a 422 (Trove's ``validate_can_perform_action``;
``day2.not_actionable``). Checks run in this order: the body (400), the instance's state (422),
the flavor, group or size (400, 404, 413), the quota (413). A changed configuration group is
handed to its ACTIVE instances by ``request_group_applies``.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy.orm import Session

from coffer import quotas
from coffer.catalog import datastore_of, find_flavor, find_version
from coffer.configuration import groups
from coffer.configuration.values import validate_values
from coffer.controlplane import ControlPlane
from coffer.datastores.registry import serving_engine
from coffer.db.models import DatastoreVersion, Flavor, Instance
from coffer.db.models_day2 import Configuration
from coffer.errors import BadRequest, NotImplementedByDatastore, OverLimit, UnprocessableEntity
from coffer.status import Task
from coffer.taskmanager.day2 import (
    APPLY_CONFIGURATION,
    RESIZE_FLAVOR,
    RESIZE_VOLUME,
    RESTART,
    UPDATE_ACCESS,
    Caller,
    begin_operation,
    not_actionable,
    reapply_configuration,
    record_event,
)

_SIZE_RE = re.compile(r"0*[1-9][0-9]{0,8}")


class InstanceNotActionable(UnprocessableEntity):
    """The instance is not ACTIVE (busy, building, stopped or silent); nothing was changed."""


class ConfigurationAlreadyAttached(BadRequest):
    pass


class ConfigurationMismatch(BadRequest):
    pass


class UpgradeNotPossible(BadRequest):
    pass


def _lock(session: Session, inst: Instance) -> Instance:
    # Two requests must not both see an idle task: the row lock (PostgreSQL, MySQL) or SQLite's
    # write transaction serialises them.
    locked = session.get(Instance, inst.id, with_for_update=True, populate_existing=True)
    assert locked is not None
    return locked


def ensure_actionable(
    cp: ControlPlane,
    session: Session,
    inst: Instance,
    what: str,
    restart: bool = False,
    configuration: bool = False,
) -> None:
    """Refuse (422, ``InstanceNotActionable``) unless the instance is ACTIVE (module doc)."""
    why = not_actionable(cp, session, inst, restart=restart, configuration=configuration)
    if why is not None:
        raise InstanceNotActionable(
            f"Instance {inst.id} cannot {what} now: {why}. Try again when it is ACTIVE."
        )


def request_group_applies(
    cp: ControlPlane, session: Session, caller: Caller, instances: list[Instance]
) -> list[str]:
    """After PUT/PATCH ``/configurations/{id}`` changed a group, in the same transaction: an
    apply operation for each of its ``instances`` that is ACTIVE; returns their ids to wake
    the taskmanager with. The others get the values when they are ACTIVE again
    (``Day2Flows.converge_configurations``)."""
    started = []
    for inst in instances:
        op_id = reapply_configuration(cp, session, caller, _lock(session, inst))
        if op_id is not None:
            started.append(op_id)
    return started


def request_action(
    cp: ControlPlane, session: Session, caller: Caller, inst: Instance, action: str, args: Any
) -> str:
    """``restart`` or ``resize`` (flavor or volume) from ``POST /instances/{id}/action``; returns
    the operation id to wake the taskmanager with. Raises 400/404/413/422 having changed
    nothing."""
    inst = _lock(session, inst)
    if action == "restart":
        if args not in (None, {}):
            raise BadRequest('The restart action takes no arguments: send {"restart": {}}.')
        ensure_actionable(cp, session, inst, "restart", restart=True)
        return begin_operation(
            cp,
            session,
            caller,
            inst,
            RESTART,
            Task.REBOOTING,
            "Restarting the database.",
            {},
            ("restart", {}),
        )
    if action != "resize":
        raise NotImplementedByDatastore(f"The {action} action is not supported yet.")
    if not isinstance(args, dict) or not ({"volume", "flavorRef"} & set(args)):
        raise BadRequest(
            'The resize action takes {"flavorRef": <flavor id>} or {"volume": {"size": <GB>}}.'
        )
    if "volume" in args:  # Trove: volume wins when both are given
        return _resize_volume(cp, session, caller, inst, args["volume"])
    return _resize_flavor(cp, session, caller, inst, args["flavorRef"])


def _volume_size(volume: Any) -> int:
    size = volume.get("size") if isinstance(volume, dict) else None
    if isinstance(size, str) and _SIZE_RE.fullmatch(size.strip()):
        size = int(size)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise BadRequest('The new volume size must be a whole number of GB: {"size": <GB>}.')
    return size


def _resize_volume(
    cp: ControlPlane, session: Session, caller: Caller, inst: Instance, volume: Any
) -> str:
    size = _volume_size(volume)
    ensure_actionable(cp, session, inst, "resize its volume")
    if size <= inst.volume_size:
        raise BadRequest(
            f"The new volume size ({size} GB) must be larger than the current one "
            f"({inst.volume_size} GB): volumes only grow."
        )
    largest = cp.settings.default.max_accepted_volume_size
    if size > largest:
        raise OverLimit(f"Volume size {size} GB is larger than the largest accepted, {largest} GB.")
    delta = size - inst.volume_size
    quotas.reserve(session, cp.settings, inst.tenant_id, inst.id, {"volumes": delta})
    payload = {"old_size": inst.volume_size, "new_size": size, "delta": delta}
    return begin_operation(
        cp,
        session,
        caller,
        inst,
        RESIZE_VOLUME,
        Task.RESIZING,
        f"Resizing the volume to {size} GB.",
        payload,
        ("resize_volume", {"old_size": inst.volume_size, "new_size": size}),
    )


def _resize_flavor(
    cp: ControlPlane, session: Session, caller: Caller, inst: Instance, ref: Any
) -> str:
    if ref is None or isinstance(ref, dict | list):
        raise BadRequest('flavorRef must be a flavor id or link: {"resize": {"flavorRef": "2"}}.')
    flavor = find_flavor(session, ref)
    ensure_actionable(cp, session, inst, "resize")
    if flavor.id == inst.flavor_id:
        raise BadRequest(f"Instance {inst.id} already has flavor {flavor.id}; choose another.")
    if flavor.ram < 128:
        raise BadRequest(f"Flavor {flavor.id} has {flavor.ram} MB of RAM; engines need 128 MB.")
    old = session.get(Flavor, inst.flavor_id)
    delta = flavor.ram - (old.ram if old is not None else 0)
    # Growth is charged now, under the quota check; shrinking gives RAM back when it is done.
    if delta > 0:
        quotas.reserve(session, cp.settings, inst.tenant_id, inst.id, {"ram": delta})
    payload = {"old_flavor": inst.flavor_id, "new_flavor": flavor.id, "ram_delta": delta}
    return begin_operation(
        cp,
        session,
        caller,
        inst,
        RESIZE_FLAVOR,
        Task.RESIZING,
        f"Resizing to flavor {flavor.name}.",
        payload,
        ("resize_flavor", {"old_flavor": inst.flavor_id, "new_flavor": flavor.id}),
    )


def request_update(
    cp: ControlPlane, session: Session, caller: Caller, inst: Instance, field: str, value: Any
) -> str | None:
    """One attribute of ``PUT /instances/{id}``: ``configuration`` (an id attaches, None
    detaches), ``access`` (the fields given) or ``datastore_version``. Returns the operation id,
    or None when nothing needs doing. Raises 400/404/422 having changed nothing."""
    inst = _lock(session, inst)
    if field == "configuration":
        if value is None:
            return _detach(cp, session, caller, inst)
        return _attach(cp, session, caller, inst, str(value))
    if field == "access":
        return _update_access(cp, session, caller, inst, dict(value or {}))
    if field == "datastore_version":
        if not isinstance(value, str) or not value:
            raise BadRequest("datastore_version must name a version of the instance's datastore.")
        ensure_actionable(cp, session, inst, "change its datastore version")
        _refuse_upgrade(session, inst, value)
    raise NotImplementedByDatastore(f"Changing '{field}' is not supported by this deployment yet.")


def record_rename(session: Session, caller: Caller, inst: Instance, name: str) -> None:
    """A rename is immediate; its event is recorded as succeeded."""
    if name != inst.name:
        details = {"old_name": inst.name, "new_name": name}
        record_event(session, inst.id, "rename", caller.user_id, details, state="succeeded")
        inst.name = name


def _attach(
    cp: ControlPlane, session: Session, caller: Caller, inst: Instance, group_id: str
) -> str:
    if inst.configuration_id is not None:
        raise ConfigurationAlreadyAttached(
            f"Instance {inst.id} already has configuration group {inst.configuration_id}; "
            "detach it first (openstack database configuration detach <instance>)."
        )
    group = groups.lock_group(session, groups.Owner(caller.project_id, caller.is_admin), group_id)
    if group.tenant_id != inst.tenant_id:
        raise ConfigurationMismatch(
            f"Configuration group {group.id} belongs to another project than instance {inst.id}."
        )
    if group.datastore_version_id != inst.datastore_version_id:
        raise ConfigurationMismatch(
            f"Configuration group {group.id} is for another datastore version than instance "
            f"{inst.id}; create a group for the instance's version."
        )
    # The rules may have changed since the values were written (422 naming the parameter).
    validate_values(session, inst.datastore_version_id, groups.group_values(session, group.id))
    ensure_actionable(cp, session, inst, "change its configuration", configuration=True)
    inst.configuration_id = group.id
    payload = {"configuration_id": group.id, "previous_configuration_id": None}
    return begin_operation(
        cp,
        session,
        caller,
        inst,
        APPLY_CONFIGURATION,
        Task.UPDATING,
        "Applying configuration group values.",
        payload,
        ("attach_configuration", {"configuration_id": group.id, "name": group.name}),
    )


def _detach(cp: ControlPlane, session: Session, caller: Caller, inst: Instance) -> str | None:
    if inst.configuration_id is None:
        return None  # as in Trove: nothing attached, nothing to do
    ensure_actionable(cp, session, inst, "change its configuration", configuration=True)
    previous = inst.configuration_id
    inst.configuration_id = None
    payload = {"configuration_id": None, "previous_configuration_id": previous}
    return begin_operation(
        cp,
        session,
        caller,
        inst,
        APPLY_CONFIGURATION,
        Task.UPDATING,
        "Removing configuration group values.",
        payload,
        ("detach_configuration", {"configuration_id": previous}),
    )


def _update_access(
    cp: ControlPlane, session: Session, caller: Caller, inst: Instance, given: dict[str, Any]
) -> str | None:
    current = {"is_public": False, "allowed_cidrs": [], **dict(inst.access or {})}
    # Fields left out keep their value (troveclient sends only the ones it was given).
    wanted = {
        "is_public": bool(given.get("is_public", current["is_public"])),
        "allowed_cidrs": list(given.get("allowed_cidrs", current["allowed_cidrs"]) or []),
    }
    if wanted == {k: current[k] for k in wanted}:
        return None
    ensure_actionable(cp, session, inst, "change its access")
    ref = dict(inst.compute_ref or {})
    payload = {
        "access": wanted,
        "previous_access": current,
        "previous_addresses": {"private": ref.get("private"), "public": ref.get("public")},
    }
    return begin_operation(
        cp,
        session,
        caller,
        inst,
        UPDATE_ACCESS,
        Task.UPDATING,
        "Changing network access.",
        payload,
        ("update_access", wanted),
    )


def _refuse_upgrade(session: Session, inst: Instance, ref: str) -> None:
    current = session.get(DatastoreVersion, inst.datastore_version_id)
    assert current is not None
    target = find_version(session, datastore_of(session, current), ref)
    if target.id == current.id:
        raise UpgradeNotPossible(f"Instance {inst.id} already runs datastore version {ref!r}.")
    engine = serving_engine(target.manager, target.version)  # 400 when nothing installed runs it
    if target.manager == current.manager and engine == serving_engine(
        current.manager, current.version
    ):
        raise UpgradeNotPossible(
            f"Cannot upgrade instance {inst.id} to {target.name}: this host has a single "
            f"{engine.manager} engine installed ({engine.version}), which already runs it. An "
            f"upgrade needs a second {engine.manager} version installed on the host."
        )
    raise NotImplementedByDatastore(
        "Upgrading an instance to another installed engine version is not supported yet."
    )


def configuration_ref(session: Session, inst: Instance, project_url: str) -> dict[str, Any] | None:
    """Trove's ``configuration`` of the instance show view, or None when none is attached."""
    if inst.configuration_id is None:
        return None
    group = session.get(Configuration, inst.configuration_id)
    if group is None:
        return None
    base = project_url.rsplit("/v1.0/", 1)[0]
    return {
        "id": group.id,
        "name": group.name,
        "links": [
            {"rel": "self", "href": f"{project_url}/configurations/{group.id}"},
            {"rel": "bookmark", "href": f"{base}/configurations/{group.id}"},
        ],
    }
