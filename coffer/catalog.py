"""The catalogue: datastores, their versions, and flavors.

Used by the API (``coffer.api.routes.catalog``, instance create) and by ``coffer manage``. Every
function takes an open SQLAlchemy session and leaves committing to the caller; every function
that writes validates all of its arguments before touching the session, so bad input changes
nothing. Views return the Trove JSON shapes (``trove-api.md`` §2.7).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from coffer.db.models import Datastore, DatastoreVersion, Flavor, Instance
from coffer.errors import BadRequest, Conflict, NotFound, ValidationError

#: Guest plugin short names a version's ``manager`` may name.
KNOWN_MANAGERS = ("mariadb", "mysql", "postgresql", "redis")

# Datastore and version names appear in URL paths, so keep them to URL-safe characters.
_SLUG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_FLAVOR_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_ALNUM_RE = re.compile(r"[0-9A-Za-z]")
_MAX_NAME = 255
_MAX_TAGS = 5
_MAX_TAG = 20


class DatastoreNotFound(NotFound):
    pass


class DatastoreVersionNotFound(NotFound):
    pass


class FlavorNotFound(NotFound):
    pass


class DatastoreVersionInUse(Conflict):
    pass


# -- validation -----------------------------------------------------------------------------------


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_slug(kind: str, value: object) -> str:
    if not isinstance(value, str) or not _SLUG_RE.match(value) or len(value) > _MAX_NAME:
        raise ValidationError(
            f"The {kind} {value!r} is not valid; use 1-{_MAX_NAME} letters, digits, '.', '_' "
            "or '-', starting with a letter or digit."
        )
    return value


def _check_text(kind: str, value: object, required: bool = True) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or not (1 <= len(value) <= _MAX_NAME):
        raise ValidationError(f"The {kind} must be a string of 1-{_MAX_NAME} characters.")
    if not _ALNUM_RE.search(value):
        raise ValidationError(f"The {kind} {value!r} must contain at least one letter or digit.")
    return value


def check_manager(manager: object) -> str:
    """Return ``manager`` if it is a known guest plugin name, else ``ValidationError``."""
    if not isinstance(manager, str) or manager not in KNOWN_MANAGERS:
        hint = _did_you_mean(str(manager), KNOWN_MANAGERS)
        raise ValidationError(
            f"Unknown datastore manager {manager!r}{hint}; "
            f"the managers are {', '.join(KNOWN_MANAGERS)}."
        )
    return manager


def _check_tags(tags: Sequence[str] | None) -> list[str]:
    if tags is None:
        return []
    if isinstance(tags, str) or len(tags) > _MAX_TAGS or len(set(tags)) != len(tags):
        raise ValidationError(f"image_tags must be a list of at most {_MAX_TAGS} different tags.")
    for tag in tags:
        if not isinstance(tag, str) or not (1 <= len(tag) <= _MAX_TAG):
            raise ValidationError(f"Each image tag must be a string of 1-{_MAX_TAG} characters.")
    return list(tags)


def _check_packages(packages: Sequence[str] | str | None) -> list[str]:
    if packages is None:
        return []
    if isinstance(packages, str):
        # Trove stores packages comma-joined and accepts them that way too.
        packages = [p.strip() for p in packages.split(",") if p.strip()]
    for package in packages:
        _check_text("package name", package)
    return list(packages)


def _check_positive(kind: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValidationError(f"The flavor's {kind} must be an integer of at least {minimum}.")
    return value


# -- datastores and versions --------------------------------------------------------------------


def list_datastores(session: Session) -> list[Datastore]:
    return list(session.scalars(select(Datastore).order_by(Datastore.name)))


def versions_of(session: Session, datastore: Datastore, admin: bool) -> list[DatastoreVersion]:
    """The datastore's versions ordered by name and number; active ones only unless ``admin``."""
    query = select(DatastoreVersion).where(DatastoreVersion.datastore_id == datastore.id)
    if not admin:
        query = query.where(DatastoreVersion.active.is_(True))
    return list(session.scalars(query.order_by(DatastoreVersion.name, DatastoreVersion.version)))


def visible_datastores(
    session: Session, admin: bool
) -> list[tuple[Datastore, list[DatastoreVersion]]]:
    """Datastores with their visible versions; non-admins see only datastores with an active
    version, and only the active versions."""
    pairs = [(ds, versions_of(session, ds, admin)) for ds in list_datastores(session)]
    return [(ds, versions) for ds, versions in pairs if admin or versions]


def find_datastore(session: Session, ref: str, admin: bool = True) -> Datastore:
    """The datastore whose id or name is ``ref``; ``DatastoreNotFound`` (404) otherwise, also
    for non-admins when it has no active version."""
    datastore = session.get(Datastore, ref) or session.scalar(
        select(Datastore).where(Datastore.name == ref)
    )
    if datastore is None or (not admin and not versions_of(session, datastore, admin=False)):
        names = [ds.name for ds, _ in visible_datastores(session, admin)]
        available = f"; available: {', '.join(names)}" if names else "; none is registered"
        raise DatastoreNotFound(
            f"Datastore {ref!r} was not found{_did_you_mean(ref, names)}{available}."
        )
    return datastore


def find_version(
    session: Session,
    datastore: Datastore,
    ref: str,
    version_number: str | None = None,
    admin: bool = True,
) -> DatastoreVersion:
    """The version of ``datastore`` whose id or name is ``ref`` (narrowed by ``version_number``
    when several share the name). ``DatastoreVersionNotFound`` (404) when none matches (or it
    is inactive and the caller not an admin); ``BadRequest`` when the name is ambiguous."""
    candidates = versions_of(session, datastore, admin)
    by_id = [v for v in candidates if v.id == ref]
    matches = by_id or [v for v in candidates if v.name == ref]
    if version_number is not None:
        matches = [v for v in matches if v.version == version_number]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        numbers = ", ".join(v.version for v in matches)
        raise BadRequest(
            f"Datastore {datastore.name!r} has several versions named {ref!r} (numbers: "
            f"{numbers}); pass the version number, or the version's id, to choose one."
        )
    names = sorted({v.name for v in candidates})
    number = f" with number {version_number!r}" if version_number is not None else ""
    available = f"; available: {', '.join(names)}" if names else ""
    raise DatastoreVersionNotFound(
        f"Datastore {datastore.name!r} has no version {ref!r}{number}"
        f"{_did_you_mean(ref, names)}{available}."
    )


def find_version_by_id(session: Session, version_id: str, admin: bool = True) -> DatastoreVersion:
    """The version with id ``version_id``; ``DatastoreVersionNotFound`` (404) otherwise (also for
    inactive versions when not ``admin``)."""
    version = session.get(DatastoreVersion, version_id)
    if version is None or (not admin and not version.active):
        raise DatastoreVersionNotFound(
            f"Datastore version {version_id!r} was not found; list versions with "
            "GET /datastores/<datastore>/versions."
        )
    return version


def datastore_of(session: Session, version: DatastoreVersion) -> Datastore:
    datastore = session.get(Datastore, version.datastore_id)
    assert datastore is not None  # the foreign key guarantees it
    return datastore


def resolve_datastore_version(
    session: Session,
    ds_type: str | None,
    version: str | None,
    version_number: str | None = None,
) -> DatastoreVersion:
    """The active version an instance request names, by Trove's rules.

    ``ds_type`` (datastore name or id) may be omitted only when exactly one datastore is
    available, or when ``version`` is a version id. ``version`` is a name or id; without it the
    datastore's default version is used. Raises ``BadRequest`` (400) when the choice is
    ambiguous, missing or inactive and ``NotFound`` (404) for unknown names, always saying which
    values are available.
    """
    if ds_type is None:
        if version is not None:
            direct = session.get(DatastoreVersion, version)
            if direct is not None:
                return _require_active(direct, datastore_of(session, direct))
        available = visible_datastores(session, admin=False)
        if len(available) != 1:
            names = ", ".join(ds.name for ds, _ in available) or "none is registered"
            raise BadRequest(
                "Specify the datastore type: it may be left out only when exactly one datastore "
                f"exists, and there are {len(available)} ({names})."
            )
        datastore = available[0][0]
    else:
        datastore = find_datastore(session, ds_type, admin=True)
    if version is None:
        if version_number is not None:
            matches = [
                v for v in versions_of(session, datastore, True) if v.version == version_number
            ]
            if len(matches) == 1:
                return _require_active(matches[0], datastore)
        if datastore.default_version_id is None:
            names = ", ".join(v.name for v in versions_of(session, datastore, admin=False))
            raise BadRequest(
                f"Datastore {datastore.name!r} has no default version; pass a version "
                f"(available: {names or 'none'})."
            )
        chosen = session.get(DatastoreVersion, datastore.default_version_id)
        if chosen is None:
            raise BadRequest(
                f"Datastore {datastore.name!r} points at a default version that no longer "
                "exists; pass a version explicitly."
            )
        return _require_active(chosen, datastore)
    return _require_active(
        find_version(session, datastore, version, version_number, admin=True), datastore
    )


def _require_active(version: DatastoreVersion, datastore: Datastore) -> DatastoreVersion:
    if not version.active:
        raise BadRequest(
            f"Datastore version {version.name!r} of {datastore.name!r} is not active; choose an "
            "active version (GET /datastores/<datastore>/versions lists them)."
        )
    return version


def register_datastore_version(
    session: Session,
    datastore: str,
    name: str,
    manager: str,
    version: str | None = None,
    active: bool = True,
    default: bool = False,
    image_tags: list[str] | None = None,
    packages: Sequence[str] | str | None = None,
    image_id: str | None = None,
    registry_ext: str | None = None,
    repl_strategy: str | None = None,
) -> DatastoreVersion:
    """Create or update the version ``name`` of ``datastore`` (created if missing).

    Idempotent upsert keyed on (datastore, name, version number). Without ``version`` the number
    defaults to ``name`` for a new row, and an existing single version of that name is updated
    whatever its number. ``default=True`` makes it the datastore's default (it must be active).
    Raises ``ValidationError`` for any bad argument before touching the session.
    """
    _check_slug("datastore name", datastore)
    _check_slug("version name", name)
    check_manager(manager)
    if version is not None:
        _check_text("version number", version)
    tags = _check_tags(image_tags)
    pkgs = _check_packages(packages)
    for kind, value in (
        ("image id", image_id),
        ("registry_ext", registry_ext),
        ("repl_strategy", repl_strategy),
    ):
        _check_text(kind, value, required=False)
    if default and not active:
        raise ValidationError(
            f"Version {name!r} cannot be the default while inactive; make it active as well."
        )
    if datastore == "versions":
        raise ValidationError("'versions' cannot name a datastore: it is a reserved path word.")

    ds = session.scalar(select(Datastore).where(Datastore.name == datastore))
    if ds is None:
        ds = Datastore(name=datastore)
        session.add(ds)
        session.flush()
    same_name = list(
        session.scalars(
            select(DatastoreVersion).where(
                DatastoreVersion.datastore_id == ds.id, DatastoreVersion.name == name
            )
        )
    )
    if version is None:
        row = same_name[0] if len(same_name) == 1 else None
        if len(same_name) > 1:
            numbers = ", ".join(v.version for v in same_name)
            raise ValidationError(
                f"Datastore {datastore!r} has several versions named {name!r} (numbers: "
                f"{numbers}); pass the version number to choose one."
            )
    else:
        row = next((v for v in same_name if v.version == version), None)
    if row is None:
        row = DatastoreVersion(datastore_id=ds.id, name=name, version=version or name)
        session.add(row)
    row.manager = manager
    row.active = active
    row.image_tags = tags
    row.packages = pkgs
    row.image_id = image_id
    row.registry_ext = registry_ext
    row.repl_strategy = repl_strategy
    session.flush()
    if default:
        ds.default_version_id = row.id
    elif not active and ds.default_version_id == row.id:
        ds.default_version_id = None
    session.flush()
    return row


def update_datastore_version(
    session: Session, version_id: str, changes: dict[str, Any]
) -> DatastoreVersion:
    """Apply a mgmt PATCH: keys among ``datastore_manager``, ``image``, ``image_tags``,
    ``packages``, ``registry_ext``, ``repl_strategy``, ``active``, ``default``, ``name``.

    Validates every value first. Deactivating the default version also clears the datastore's
    default; ``default=True`` on an inactive version is refused (``ValidationError``); a rename
    onto an existing (name, number) pair is a ``Conflict``.
    """
    allowed = {
        "datastore_manager",
        "image",
        "image_tags",
        "packages",
        "registry_ext",
        "repl_strategy",
        "active",
        "default",
        "name",
    }
    unknown = sorted(set(changes) - allowed)
    if unknown:
        raise ValidationError(
            f"Unknown field(s) {', '.join(unknown)}; "
            f"a version accepts {', '.join(sorted(allowed))}."
        )
    if "datastore_manager" in changes:
        check_manager(changes["datastore_manager"])
    if "name" in changes:
        _check_slug("version name", changes["name"])
    tags = _check_tags(changes["image_tags"]) if "image_tags" in changes else None
    pkgs = _check_packages(changes["packages"]) if "packages" in changes else None
    for key in ("image", "registry_ext", "repl_strategy"):
        if key in changes:
            _check_text(key, changes[key], required=False)
    for key in ("active", "default"):
        if key in changes and not isinstance(changes[key], bool):
            raise ValidationError(f"{key} must be true or false.")

    row = find_version_by_id(session, version_id)
    ds = datastore_of(session, row)
    active = changes.get("active", row.active)
    if changes.get("default") is True and not active:
        raise ValidationError(
            f"Version {row.name!r} cannot be the default while inactive; make it active as well."
        )
    if "name" in changes and changes["name"] != row.name:
        clash = session.scalar(
            select(DatastoreVersion).where(
                DatastoreVersion.datastore_id == ds.id,
                DatastoreVersion.name == changes["name"],
                DatastoreVersion.version == row.version,
            )
        )
        if clash is not None:
            raise Conflict(
                f"Datastore {ds.name!r} already has a version {changes['name']!r} numbered "
                f"{row.version!r}; choose another name."
            )
        row.name = changes["name"]
    if "datastore_manager" in changes:
        row.manager = changes["datastore_manager"]
    if "image" in changes:
        row.image_id = changes["image"] or None
    if tags is not None:
        row.image_tags = tags
    if pkgs is not None:
        row.packages = pkgs
    if "registry_ext" in changes:
        row.registry_ext = changes["registry_ext"]
    if "repl_strategy" in changes:
        row.repl_strategy = changes["repl_strategy"]
    row.active = active
    if changes.get("default") is True:
        ds.default_version_id = row.id
    elif (changes.get("default") is False or not active) and ds.default_version_id == row.id:
        ds.default_version_id = None
    session.flush()
    return row


def delete_datastore_version(session: Session, version_id: str) -> None:
    """Delete a version; ``DatastoreVersionInUse`` (409) while any instance row refers to it."""
    row = find_version_by_id(session, version_id)
    live = session.scalar(
        select(func.count())
        .select_from(Instance)
        .where(Instance.datastore_version_id == row.id, Instance.deleted.is_(False))
    )
    if live:
        raise DatastoreVersionInUse(
            f"Datastore version {row.name!r} is used by {live} instance(s); delete them first, "
            "or deactivate the version (openstack datastore version set <id> --disable)."
        )
    ds = datastore_of(session, row)
    if ds.default_version_id == row.id:
        ds.default_version_id = None
    try:
        with session.begin_nested():
            session.delete(row)
            session.flush()
    except IntegrityError as exc:
        # Deleted instances, backups or configurations still point at it.
        raise DatastoreVersionInUse(
            f"Datastore version {row.name!r} is still referenced by deleted instances or other "
            "records, so it cannot be removed; deactivate it instead "
            "(openstack datastore version set <id> --disable)."
        ) from exc


# -- flavors ------------------------------------------------------------------------------------


def list_flavors(session: Session) -> list[Flavor]:
    return list(session.scalars(select(Flavor).order_by(Flavor.ram, Flavor.vcpus, Flavor.id)))


def create_flavor(
    session: Session, id: str, name: str, ram: int, vcpus: int, disk: int = 0
) -> Flavor:
    """Create flavor ``id`` or update it to these values (idempotent).

    ``ram`` in MB (≥ 64), ``vcpus`` ≥ 1, ``disk`` in GB (≥ 0). ``ValidationError`` for a bad value;
    ``Conflict`` when another flavor already has ``name``.
    """
    if not isinstance(id, str) or not _FLAVOR_ID_RE.match(id) or len(id) > 64:
        raise ValidationError(
            f"The flavor id {id!r} is not valid; use 1-64 letters, digits, '.', '_' or '-'."
        )
    _check_text("flavor name", name)
    _check_positive("ram (MB)", ram, 64)
    _check_positive("vcpus", vcpus, 1)
    _check_positive("disk (GB)", disk, 0)
    clash = session.scalar(select(Flavor).where(Flavor.name == name, Flavor.id != id))
    if clash is not None:
        raise Conflict(f"Flavor {clash.id!r} is already named {name!r}; choose another name.")
    flavor = session.get(Flavor, id)
    if flavor is None:
        flavor = Flavor(id=id, name=name, ram=ram, vcpus=vcpus, disk=disk, ephemeral=0)
        session.add(flavor)
    else:
        flavor.name, flavor.ram, flavor.vcpus, flavor.disk = name, ram, vcpus, disk
    session.flush()
    return flavor


def find_flavor(session: Session, ref: str | int) -> Flavor:
    """The flavor whose id is ``ref``, or whose id ends the URL ``ref`` (a flavor href).

    ``FlavorNotFound`` (404) otherwise. Names are not looked up: clients resolve names through
    the list, and a 404 here is how they learn ``ref`` was not an id.
    """
    if isinstance(ref, bool) or not isinstance(ref, str | int):
        raise ValidationError("A flavor reference must be a flavor id or a flavor link.")
    key = str(ref).strip()
    if "/" in key:
        key = key.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    flavor = session.get(Flavor, key) if key else None
    if flavor is None:
        raise FlavorNotFound(
            f"Flavor {str(ref)[:255]!r} was not found; list flavors with "
            "'openstack database flavor list' (GET /flavors) and use an id."
        )
    return flavor


# -- views --------------------------------------------------------------------------------------


def _links(project_url: str, path: str) -> list[dict[str, str]]:
    base = project_url.rsplit("/v1.0/", 1)[0]
    return [
        {"rel": "self", "href": f"{project_url}/{path}"},
        {"rel": "bookmark", "href": f"{base}/{path}"},
    ]


def flavor_view(flavor: Flavor, project_url: str) -> dict[str, Any]:
    """A flavor. ``id`` is the real id as a string (Trove's int-or-null id makes openstackclient
    ask for ``/flavors/None``); ``str_id`` repeats it for clients that read that."""
    return {
        "id": flavor.id,
        "str_id": flavor.id,
        "name": flavor.name,
        "ram": flavor.ram,
        "vcpus": flavor.vcpus,
        "disk": flavor.disk,
        "ephemeral": flavor.ephemeral,
        "links": _links(project_url, f"flavors/{flavor.id}"),
    }


def version_view(
    version: DatastoreVersion,
    datastore: Datastore,
    admin: bool,
    project_url: str,
    nested: bool = False,
) -> dict[str, Any]:
    """A datastore version; admins also see activity, image and packaging fields. ``nested``
    (inside a datastore) leaves out the ``datastore`` id."""
    view: dict[str, Any] = {
        "id": version.id,
        "name": version.name,
        "version": version.version,
        "links": _links(project_url, f"datastores/versions/{version.id}"),
    }
    if not nested:
        view["datastore"] = datastore.id
    if admin:
        view.update(
            active=version.active,
            packages=list(version.packages or []),
            image=version.image_id,
            image_tags=list(version.image_tags or []),
            registry_ext=version.registry_ext,
            repl_strategy=version.repl_strategy,
        )
    return view


def datastore_view(
    datastore: Datastore,
    versions: Sequence[DatastoreVersion],
    admin: bool,
    project_url: str,
) -> dict[str, Any]:
    """A datastore with its (already filtered) versions. ``default_version`` appears only when
    the default is among ``versions``: troveclient looks it up in that list."""
    view: dict[str, Any] = {
        "id": datastore.id,
        "name": datastore.name,
        "links": _links(project_url, f"datastores/{datastore.id}"),
        "versions": [version_view(v, datastore, admin, project_url, nested=True) for v in versions],
    }
    if datastore.default_version_id in {v.id for v in versions}:
        view["default_version"] = datastore.default_version_id
    return view


def mgmt_version_view(version: DatastoreVersion, datastore: Datastore) -> dict[str, Any]:
    """The management view of a version (``/mgmt/datastore-versions``)."""
    return {
        "id": version.id,
        "name": version.name,
        "version": version.version,
        "datastore_id": datastore.id,
        "datastore_name": datastore.name,
        "datastore_manager": version.manager,
        "image": version.image_id,
        "image_tags": list(version.image_tags or []),
        "packages": list(version.packages or []),
        "active": version.active,
        "registry_ext": version.registry_ext,
        "repl_strategy": version.repl_strategy,
        "default": datastore.default_version_id == version.id,
    }
