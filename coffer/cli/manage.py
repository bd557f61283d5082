"""``coffer manage``: operator tasks (the ``trove-manage`` of Coffer).

Passwords are never taken on the command line (they would show in ``ps``): they are read from
standard input or generated and printed once.
"""

from __future__ import annotations

import secrets
import sys
from typing import Any

import click

from coffer.config import Settings, load_settings
from coffer.errors import CofferError, ConfigError


def _settings(config: str | None) -> Settings:
    try:
        return load_settings(config)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


def _control_plane(config: str | None, migrate_db: bool = True) -> Any:
    from coffer.controlplane import ControlPlane

    return ControlPlane(_settings(config), migrate_db=migrate_db)


config_option = click.option(
    "--config", "config", type=click.Path(dir_okay=False), default=None, envvar="COFFER_CONFIG"
)


@click.group()
def manage() -> None:
    """Operator tasks: schema, datastores, flavors, projects and users."""


@manage.group()
def db() -> None:
    """The control DB."""


@db.command("upgrade")
@config_option
def db_upgrade(config: str | None) -> None:
    """Apply schema migrations up to the newest revision."""
    from coffer.db import migrate

    cp = _control_plane(config, migrate_db=False)
    try:
        migrate.upgrade(cp.engine)
        click.echo(f"control DB at revision {migrate.current_revision(cp.engine)}")
    finally:
        cp.close()


@manage.command("datastore-version-create")
@config_option
@click.argument("datastore")
@click.argument("name")
@click.argument("manager")
@click.option("--version", "version_number", default=None, help="Engine version number.")
@click.option("--default", "make_default", is_flag=True, help="Make it the datastore's default.")
@click.option("--inactive", is_flag=True, help="Register it but do not offer it to users.")
def datastore_version_create(
    config: str | None,
    datastore: str,
    name: str,
    manager: str,
    version_number: str | None,
    make_default: bool,
    inactive: bool,
) -> None:
    """Register (or update) a datastore version; the datastore is created if missing."""
    from coffer.catalog import register_datastore_version
    from coffer.db.session import transaction

    cp = _control_plane(config)
    try:
        with transaction(cp.session_factory) as session:
            version = register_datastore_version(
                session,
                datastore=datastore,
                name=name,
                manager=manager,
                version=version_number,
                active=not inactive,
                default=make_default,
            )
            click.echo(f"datastore version {datastore} {name} registered (id {version.id})")
    except CofferError as exc:
        raise click.ClickException(exc.message) from exc
    finally:
        cp.close()


@manage.command("register-engines")
@config_option
def register_engines(config: str | None) -> None:
    """Register every engine this host can run, with its real version number."""
    from coffer.cli.bootstrap import register_host_engines

    cp = _control_plane(config)
    try:
        for manager, version in register_host_engines(cp):
            click.echo(f"{manager} {version}")
    finally:
        cp.close()


@manage.command("flavor-create")
@config_option
@click.argument("flavor_id")
@click.argument("name")
@click.option("--ram", type=click.IntRange(64, None), required=True, help="RAM in MB.")
@click.option("--vcpus", type=click.IntRange(1, None), required=True)
@click.option("--disk", type=click.IntRange(0, None), default=0, help="Disk in GB.")
def flavor_create(
    config: str | None, flavor_id: str, name: str, ram: int, vcpus: int, disk: int
) -> None:
    """Create (or update) a flavor."""
    from coffer.catalog import create_flavor
    from coffer.db.session import transaction

    cp = _control_plane(config)
    try:
        with transaction(cp.session_factory) as session:
            create_flavor(session, flavor_id, name, ram, vcpus, disk)
        click.echo(f"flavor {flavor_id} ({name}) ready")
    except CofferError as exc:
        raise click.ClickException(exc.message) from exc
    finally:
        cp.close()


@manage.command("project-create")
@config_option
@click.argument("name")
def project_create(config: str | None, name: str) -> None:
    """Create a project (idempotent) and print its id."""
    from coffer.cli.bootstrap import identity_service

    cp = _control_plane(config)
    try:
        identity = identity_service(cp)
        identity.ensure_roles()
        project = identity.create_project(name)
        click.echo(project.id)
    except CofferError as exc:
        raise click.ClickException(exc.message) from exc
    finally:
        cp.close()


@manage.command("user-create")
@config_option
@click.argument("name")
@click.option("--project", required=True, help="Project the user gets a role on.")
@click.option(
    "--role",
    "roles",
    multiple=True,
    type=click.Choice(["admin", "member", "reader"]),
    default=["member"],
    show_default=True,
)
@click.option(
    "--password-stdin",
    is_flag=True,
    help="Read the password from standard input; otherwise one is generated and printed.",
)
def user_create(
    config: str | None, name: str, project: str, roles: tuple[str, ...], password_stdin: bool
) -> None:
    """Create or update a user with roles on a project (created if missing)."""
    from coffer.cli.bootstrap import identity_service

    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
        if not password:
            raise click.ClickException("no password on standard input")
    else:
        password = secrets.token_urlsafe(18)
    cp = _control_plane(config)
    try:
        identity = identity_service(cp)
        identity.ensure_roles()
        identity.create_project(project)
        identity.create_user(name, password, project, list(roles))
        click.echo(f"user {name} has roles {', '.join(roles)} on project {project}")
        if not password_stdin:
            click.echo(f"password: {password}")
    except CofferError as exc:
        raise click.ClickException(exc.message) from exc
    finally:
        cp.close()


@manage.command("config-reference")
def config_reference() -> None:
    """Print every configuration option as Markdown (docs/configuration.md)."""
    from coffer.config import options_markdown

    click.echo(options_markdown(), nl=False)


# --- policy and quotas -------------------------------------------------------------------------


@manage.group()
def policy() -> None:
    """API policy rules: the defaults, and checking an operator's policy file."""


@policy.command("sample")
@click.option(
    "--uncommented",
    is_flag=True,
    help="Write every rule active, not commented out (the file then pins today's defaults).",
)
def policy_sample(uncommented: bool) -> None:
    """Print every policy rule with its default as a policy.yaml (commented out)."""
    from coffer.api.policy import sample_yaml

    click.echo(sample_yaml(commented=not uncommented), nl=False)


@policy.command("check")
@config_option
def policy_check(config: str | None) -> None:
    """Check the policy file the API would load; list every problem."""
    from coffer.api.policy import load_policy, policy_path

    settings = _settings(config)
    try:
        loaded = load_policy(settings)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    path = policy_path(settings)
    if path is None:
        click.echo("no policy file; the default rules apply")
    else:
        changed = ", ".join(sorted(loaded.overridden)) or "none"
        click.echo(f"{path} is valid; rules it sets: {changed}")


def _project_id(cp: Any, project: str) -> str:
    """A project given by id or (embedded identity) by name; unknown ones pass as ids, since an
    external Keystone's projects are not in the control DB."""
    from sqlalchemy import select

    from coffer.db.models import Project

    with cp.session_factory() as session:
        if session.get(Project, project) is not None:
            return project
        found = session.scalars(select(Project.id).where(Project.name == project)).first()
    return found or project


@manage.command("quota-show")
@config_option
@click.argument("project")
def quota_show(config: str | None, project: str) -> None:
    """Show a project's quotas and usage (PROJECT is an id or a name)."""
    from coffer import quotas

    cp = _control_plane(config)
    try:
        project_id = _project_id(cp, project)
        with cp.session_factory() as session:
            rows = quotas.usage_report(session, cp.settings, project_id)
        click.echo(f"project {project_id}")
        click.echo(f"{'resource':<12}{'in use':>10}{'limit':>10}")
        for row in rows:
            limit = "unlimited" if row["limit"] == quotas.UNLIMITED else row["limit"]
            click.echo(f"{row['resource']:<12}{row['in_use']:>10}{limit:>10}")
    finally:
        cp.close()


@manage.command("quota-set")
@config_option
@click.argument("project")
@click.argument("resource")
@click.argument("limit", type=click.IntRange(-1, None))
def quota_set(config: str | None, project: str, resource: str, limit: int) -> None:
    """Set a project's limit for RESOURCE (instances, ram, volumes, backups); -1: unlimited."""
    from coffer import quotas
    from coffer.db.session import transaction

    cp = _control_plane(config)
    try:
        project_id = _project_id(cp, project)
        with transaction(cp.session_factory) as session:
            quotas.set_limits(session, cp.settings, project_id, {resource: limit})
        click.echo(f"project {project_id}: {resource} limit is now {limit}")
    except CofferError as exc:
        raise click.ClickException(exc.message) from exc
    finally:
        cp.close()


# --- configuration parameter rules -------------------------------------------------------------


def _rules_version(session: Any, datastore: str, version: str, number: str | None) -> Any:
    from coffer.catalog import find_datastore, find_version

    return find_version(session, find_datastore(session, datastore), version, number)


@manage.command("configuration-rules-load")
@config_option
@click.argument("datastore")
@click.argument("version")
@click.argument("rules_file", required=False, type=click.Path(dir_okay=False))
@click.option("--version-number", default=None, help="Version number, when names are shared.")
@click.option("--replace", is_flag=True, help="Also delete the version's rules not in the file.")
def configuration_rules_load(
    config: str | None,
    datastore: str,
    version: str,
    rules_file: str | None,
    version_number: str | None,
    replace: bool,
) -> None:
    """Load configuration parameter rules for a datastore version from RULES_FILE (Trove's
    validation-rules.json format); without RULES_FILE, the rules Coffer ships for the version's
    engine. Rules are added or updated by name (trove-manage
    db_load_datastore_config_parameters)."""
    from coffer.configuration import parameter_rules
    from coffer.db.session import transaction

    try:
        # Read and check the file before the control DB is touched.
        rules = parameter_rules.read_rules_file(rules_file) if rules_file else None
    except CofferError as exc:
        raise click.ClickException(exc.message) from exc
    cp = _control_plane(config)
    try:
        with transaction(cp.session_factory) as session:
            row = _rules_version(session, datastore, version, version_number)
            if rules is None:
                rules = list(parameter_rules.shipped_rules(row.manager))
                if not rules:
                    raise click.ClickException(
                        f"Coffer ships no rules for the {row.manager} engine; give a RULES_FILE."
                    )
            written, deleted = parameter_rules.load_rules(session, row.id, rules, replace=replace)
        removed = f", {deleted} removed" if replace else ""
        click.echo(f"{datastore} {version}: {written} parameter rules loaded{removed}")
    except CofferError as exc:
        raise click.ClickException(exc.message) from exc
    finally:
        cp.close()


@manage.command("configuration-rules-remove")
@config_option
@click.argument("datastore")
@click.argument("version")
@click.option("--version-number", default=None, help="Version number, when names are shared.")
def configuration_rules_remove(
    config: str | None, datastore: str, version: str, version_number: str | None
) -> None:
    """Remove every configuration parameter rule of a datastore version (trove-manage
    db_remove_datastore_config_parameters). Existing groups keep their values; no new group
    can be made for the version until rules are loaded again."""
    from coffer.configuration import parameter_rules
    from coffer.db.session import transaction

    cp = _control_plane(config)
    try:
        with transaction(cp.session_factory) as session:
            row = _rules_version(session, datastore, version, version_number)
            removed = parameter_rules.remove_rules(session, row.id)
        click.echo(f"{datastore} {version}: {removed} parameter rules removed")
    except CofferError as exc:
        raise click.ClickException(exc.message) from exc
    finally:
        cp.close()


@manage.command("configuration-rules-list")
@config_option
@click.argument("datastore")
@click.argument("version")
@click.option("--version-number", default=None, help="Version number, when names are shared.")
def configuration_rules_list(
    config: str | None, datastore: str, version: str, version_number: str | None
) -> None:
    """Print a datastore version's configuration parameter rules as a validation-rules.json
    document (load it elsewhere with configuration-rules-load)."""
    import json

    from coffer.configuration import parameter_rules

    cp = _control_plane(config)
    try:
        with cp.session_factory() as session:
            row = _rules_version(session, datastore, version, version_number)
            rules = parameter_rules.rules_for_version(session, row.id)
        document = {parameter_rules.RULES_KEY: [rule.to_document() for rule in rules]}
        click.echo(json.dumps(document, indent=2))
    except CofferError as exc:
        raise click.ClickException(exc.message) from exc
    finally:
        cp.close()
