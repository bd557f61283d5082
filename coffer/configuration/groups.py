"""Configuration groups: a project's named set of parameter values for one datastore version.

The API routes (``coffer.api.routes.configurations``) are thin over these functions; attaching
a group to an instance and applying its values in the guest build on
``configuration_values_for_instance``, ``validate_values`` (``coffer.configuration.values``),
``restart_required_names`` and ``lock_group``.

Every function takes an open session and leaves committing to the caller. Functions that write
check everything first, so a refused request changes nothing. A group of another project is
``ConfigurationNotFound`` (404) unless the caller is an admin: a project must not learn that
another project's group exists.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from coffer.catalog import (
    datastore_of,
    find_datastore,
    find_version,
    resolve_datastore_version,
)
from coffer.configuration.parameter_rules import rules_for_version
from coffer.configuration.values import validate_values
from coffer.db.models import Datastore, DatastoreVersion, Instance, utcnow
from coffer.db.models_day2 import Configuration, ConfigurationValue
from coffer.errors import BadRequest, NotFound, ValidationError

_ALNUM_RE = re.compile(r"[0-9A-Za-z]")
_MAX_TEXT = 255
# oslo's mask_dict_password, which Trove applies to shown values, masks keys like these.
_SECRET_KEY_RE = re.compile(r"pass|secret|token|auth|credential|private_key", re.IGNORECASE)
MASK = "***"


class ConfigurationNotFound(NotFound):
    pass


class ConfigurationInUse(BadRequest):
    """Trove's ``InstanceAssignedToConfiguration``: a group is deleted only when unused."""


@dataclass(frozen=True)
class Owner:
    """Who is asking: the project in the URL, and whether the caller is an admin."""

    project_id: str
    is_admin: bool = False


def _check_text(kind: str, value: object, required: bool) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= _MAX_TEXT:
        raise ValidationError(
            f"The configuration {kind} must be a string of 1-{_MAX_TEXT} characters."
        )
    if not value.isprintable():
        raise ValidationError(f"The configuration {kind} must not contain control characters.")
    if kind == "name" and not _ALNUM_RE.search(value):
        raise ValidationError("The configuration name must contain at least one letter or digit.")
    return value


def resolve_version(
    session: Session,
    datastore: str | None,
    version: str | None,
    version_number: str | None = None,
) -> DatastoreVersion:
    """The datastore version a new group is for (Trove's rules; an inactive version may be
    named explicitly, so a group can be prepared before its version is offered)."""
    if datastore is None:
        return resolve_datastore_version(session, None, version, version_number)
    ds = find_datastore(session, datastore, admin=True)
    if version is None and version_number is None:
        return resolve_datastore_version(session, ds.id, None)
    if version is None:
        return resolve_datastore_version(session, ds.id, None, version_number)
    return find_version(session, ds, version, version_number, admin=True)


# -- reading ----------------------------------------------------------------------------------


def load_group(session: Session, owner: Owner, group_id: str, lock: bool = False) -> Configuration:
    """The group ``group_id`` if ``owner`` may see it; ``ConfigurationNotFound`` otherwise.
    ``lock`` takes the row lock (``SELECT ... FOR UPDATE``) on backends that have one."""
    query = select(Configuration).where(Configuration.id == group_id)
    if lock:
        query = query.with_for_update()
    group = session.scalar(query)
    if group is None or (group.tenant_id != owner.project_id and not owner.is_admin):
        raise ConfigurationNotFound(
            f"Configuration group {str(group_id)[:64]} could not be found; list groups with "
            "GET /configurations."
        )
    return group


def lock_group(session: Session, owner: Owner, group_id: str) -> Configuration:
    """``load_group`` with the row lock. Attaching a group to an instance takes it before it
    sets ``instances.configuration_id``, as deleting a group does before it checks for
    instances, so a group cannot be deleted while an attach is under way."""
    return load_group(session, owner, group_id, lock=True)


def list_groups(session: Session, owner: Owner) -> list[Configuration]:
    """The project's groups (an admin sees every project's, as in Trove), ordered by id."""
    query = select(Configuration).order_by(Configuration.id)
    if not owner.is_admin:
        query = query.where(Configuration.tenant_id == owner.project_id)
    return list(session.scalars(query))


def group_values(session: Session, group_id: str) -> dict[str, Any]:
    """The group's values keyed by parameter name, with their JSON types."""
    rows = session.scalars(
        select(ConfigurationValue)
        .where(ConfigurationValue.configuration_id == group_id)
        .order_by(ConfigurationValue.name)
    )
    return {row.name: row.value for row in rows}


def _live_instances(group_id: str) -> Any:
    return select(Instance).where(
        Instance.configuration_id == group_id, Instance.deleted.is_(False)
    )


def group_instances(session: Session, group_id: str) -> list[Instance]:
    """The live instances the group is attached to, ordered by id."""
    return list(session.scalars(_live_instances(group_id).order_by(Instance.id)))


def instance_count(session: Session, group_id: str) -> int:
    return (
        session.scalar(select(func.count()).select_from(_live_instances(group_id).subquery())) or 0
    )


def configuration_values_for_instance(session: Session, instance_id: str) -> dict[str, Any]:
    """The values the instance's engine must run with: those of its attached group, or ``{}``
    when it has none (its engine then runs on the defaults). What the guest is sent when a
    group is attached or changed, and on every start, so overrides survive restarts."""
    inst = session.get(Instance, instance_id)
    if inst is None or inst.configuration_id is None:
        return {}
    return group_values(session, inst.configuration_id)


def restart_required_names(session: Session, version_id: str, names: Sequence[str]) -> list[str]:
    """Those of ``names`` whose rule says a change needs an engine restart (sorted); an
    instance given any of them goes to RESTART_REQUIRED until restarted."""
    wanted = {name.lower() for name in names}
    return sorted(
        rule.name
        for rule in rules_for_version(session, version_id)
        if rule.restart_required and rule.name in wanted
    )


# -- writing ----------------------------------------------------------------------------------


def create_group(
    session: Session,
    owner: Owner,
    name: str,
    values: Mapping[str, Any],
    description: str | None = None,
    datastore: str | None = None,
    version: str | None = None,
    version_number: str | None = None,
) -> Configuration:
    """A new group in ``owner``'s project; 400 for a bad name or datastore choice, 404 for
    an unknown datastore or version, 422 for values the version's rules refuse."""
    _check_text("name", name, required=True)
    _check_text("description", description, required=False)
    ds_version = resolve_version(session, datastore, version, version_number)
    checked = validate_values(session, ds_version.id, values)
    group = Configuration(
        tenant_id=owner.project_id,
        name=name,
        description=description,
        datastore_version_id=ds_version.id,
    )
    session.add(group)
    session.flush()
    _write_values(session, group, checked, replace=True)
    return group


def _write_values(
    session: Session, group: Configuration, values: Mapping[str, Any], replace: bool
) -> None:
    if replace:
        session.execute(
            delete(ConfigurationValue).where(ConfigurationValue.configuration_id == group.id)
        )
    for name, value in values.items():
        row = None if replace else session.get(ConfigurationValue, (group.id, name))
        if row is None:
            session.add(ConfigurationValue(configuration_id=group.id, name=name, value=value))
        else:
            row.value = value
    # Value rows do not touch the group row, so mark it changed for ``updated``.
    group.updated = utcnow()
    session.flush()


def replace_values(
    session: Session,
    owner: Owner,
    group_id: str,
    values: Mapping[str, Any],
    name: str | None = None,
    description: str | None = None,
) -> tuple[Configuration, list[Instance]]:
    """PUT: the group's values become exactly ``values`` (absent from the body means none, as
    in Trove), with a new name and description when given. Returns the group and its live
    instances, which must be given the new values."""
    _check_text("name", name, required=False)
    _check_text("description", description, required=False)
    group = lock_group(session, owner, group_id)
    checked = validate_values(session, group.datastore_version_id, values)
    if name is not None:
        group.name = name
    if description is not None:
        group.description = description
    _write_values(session, group, checked, replace=True)
    return group, group_instances(session, group.id)


def merge_values(
    session: Session, owner: Owner, group_id: str, values: Mapping[str, Any]
) -> tuple[Configuration, list[Instance]]:
    """PATCH: set ``values`` in the group, keeping its other values. Returns the group and its
    live instances, which must be given the new values."""
    group = lock_group(session, owner, group_id)
    checked = validate_values(session, group.datastore_version_id, values)
    _write_values(session, group, checked, replace=False)
    return group, group_instances(session, group.id)


def delete_group(session: Session, owner: Owner, group_id: str) -> None:
    """Delete the group and its values; ``ConfigurationInUse`` (400) while attached."""
    group = lock_group(session, owner, group_id)
    attached = instance_count(session, group.id)
    if attached:
        raise ConfigurationInUse(
            f"Configuration group {group.id} is attached to {attached} instance(s); detach it "
            "from them first (openstack database configuration detach <instance>)."
        )
    session.execute(
        delete(ConfigurationValue).where(ConfigurationValue.configuration_id == group.id)
    )
    session.delete(group)
    session.flush()


# -- views (trove-api.md §2.6) ----------------------------------------------------------------


def masked(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with password-like keys' values replaced by ``***`` (as Trove shows them)."""
    return {key: MASK if _SECRET_KEY_RE.search(key) else value for key, value in values.items()}


def _iso(value: Any) -> str | None:
    return value.strftime("%Y-%m-%dT%H:%M:%S") if value else None


def group_view(
    group: Configuration, version: DatastoreVersion, datastore: Datastore
) -> dict[str, Any]:
    """A list item."""
    return {
        "id": group.id,
        "name": group.name,
        "description": group.description,
        "created": _iso(group.created),
        "updated": _iso(group.updated),
        "datastore_version_id": version.id,
        "datastore_name": datastore.name,
        "datastore_version_name": version.name,
        "datastore_version_number": version.version,
    }


def group_detail_view(session: Session, group: Configuration) -> dict[str, Any]:
    """The create/show shape: the list item plus ``values`` (masked) and ``instance_count``."""
    version = session.get(DatastoreVersion, group.datastore_version_id)
    assert version is not None  # the foreign key guarantees it
    view = group_view(group, version, datastore_of(session, version))
    view["values"] = masked(group_values(session, group.id))
    view["instance_count"] = instance_count(session, group.id)
    return view


def group_list_views(session: Session, groups: Sequence[Configuration]) -> list[dict[str, Any]]:
    """List items, loading each datastore version once."""
    versions: dict[str, tuple[DatastoreVersion, Datastore]] = {}
    views = []
    for group in groups:
        if group.datastore_version_id not in versions:
            version = session.get(DatastoreVersion, group.datastore_version_id)
            assert version is not None
            versions[version.id] = (version, datastore_of(session, version))
        views.append(group_view(group, *versions[group.datastore_version_id]))
    return views
