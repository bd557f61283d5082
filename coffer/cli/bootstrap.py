"""First-start work shared by ``coffer up`` and ``coffer manage``: identity, engines, flavors,
and the ``clouds.yaml`` that lets the OpenStack clients talk to Coffer at once."""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

import yaml

from coffer.bus import keys
from coffer.catalog import create_flavor, register_datastore_version
from coffer.configuration.parameter_rules import install_shipped_rules
from coffer.controlplane import ControlPlane
from coffer.datastores.registry import installed_engines
from coffer.db.models import Datastore
from coffer.db.session import transaction
from coffer.identity.service import IdentityService

LOG = logging.getLogger(__name__)

#: (id, name, RAM MB, vCPUs, disk GB): small enough that many instances fit on one machine.
DEFAULT_FLAVORS = [
    ("1", "m1.tiny", 512, 1, 1),
    ("2", "m1.small", 1024, 1, 5),
    ("3", "m1.medium", 2048, 2, 10),
    ("4", "m1.large", 4096, 2, 20),
    ("5", "m1.xlarge", 8192, 4, 40),
    ("6", "d1.micro", 256, 1, 1),
]


def identity_service(cp: ControlPlane) -> IdentityService:
    return IdentityService(
        cp.session_factory, keys.derive_key(cp.master_key, "identity-token"), cp.settings
    )


def load_or_create_credentials(cp: ControlPlane) -> dict[str, str]:
    """The admin and demo passwords, generated once and kept 0600 in the state dir."""
    path = cp.settings.state_dir / "credentials.json"
    if path.exists():
        data: dict[str, str] = json.loads(path.read_text())
        return data
    data = {
        "admin_password": secrets.token_urlsafe(18),
        "demo_password": secrets.token_urlsafe(18),
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh)
    return data


def register_host_engines(cp: ControlPlane) -> list[tuple[str, str]]:
    """Register every engine this host can run (idempotent); the first of each becomes default."""
    registered = []
    with transaction(cp.session_factory) as session:
        for engine in installed_engines():
            ds = session.query(Datastore).filter_by(name=engine.manager).one_or_none()
            make_default = ds is None or ds.default_version_id is None
            register_datastore_version(
                session,
                datastore=engine.manager,
                name=engine.version,
                manager=engine.manager,
                version=engine.version,
                active=True,
                default=make_default,
            )
            registered.append((engine.manager, engine.version))
    return registered


def register_default_flavors(cp: ControlPlane) -> None:
    with transaction(cp.session_factory) as session:
        for flavor_id, name, ram, vcpus, disk in DEFAULT_FLAVORS:
            create_flavor(session, flavor_id, name, ram, vcpus, disk)


def bootstrap(cp: ControlPlane) -> dict[str, str]:
    """Everything a fresh ``coffer up`` needs before it serves; safe to run on every start."""
    creds: dict[str, str] = {}
    if not cp.settings.keystone_authtoken.enabled:
        # Embedded identity only: an external Keystone owns users and projects.
        creds = load_or_create_credentials(cp)
        identity = identity_service(cp)
        identity.bootstrap(creds["admin_password"], creds["demo_password"])
    register_host_engines(cp)
    install_shipped_rules(cp.session_factory)
    register_default_flavors(cp)
    return creds


def clouds_entries(cp: ControlPlane, creds: dict[str, str]) -> dict[str, Any]:
    auth_url = f"{cp.settings.api_base_url}/identity/v3"
    ident = cp.settings.identity

    def entry(user: str, project: str, password: str) -> dict[str, Any]:
        return {
            "auth": {
                "auth_url": auth_url,
                "username": user,
                "password": password,
                "project_name": project,
                "user_domain_name": "Default",
                "project_domain_name": "Default",
            },
            "region_name": cp.settings.default.region_name,
            "identity_api_version": 3,
            "interface": "public",
        }

    return {
        "coffer": entry(ident.demo_user, ident.demo_project, creds["demo_password"]),
        "coffer-admin": entry(ident.admin_user, ident.admin_project, creds["admin_password"]),
    }


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    tmp.replace(path)


def write_clouds_yaml(cp: ControlPlane, creds: dict[str, str]) -> list[Path]:
    """Write ``<state_dir>/clouds.yaml`` and merge Coffer's two clouds into the user's own
    ``~/.config/openstack/clouds.yaml`` (other clouds there are kept)."""
    entries = clouds_entries(cp, creds)
    written = []
    own = cp.settings.state_dir / "clouds.yaml"
    _write_private(own, yaml.safe_dump({"clouds": entries}, sort_keys=False))
    written.append(own)
    user_file = Path.home() / ".config" / "openstack" / "clouds.yaml"
    try:
        existing: dict[str, Any] = {}
        if user_file.exists():
            existing = yaml.safe_load(user_file.read_text()) or {}
        existing.setdefault("clouds", {}).update(entries)
        _write_private(user_file, yaml.safe_dump(existing, sort_keys=False))
        written.append(user_file)
    except (OSError, yaml.YAMLError) as exc:
        LOG.warning("could not update %s (%s); use OS_CLIENT_CONFIG_FILE=%s", user_file, exc, own)
    return written
