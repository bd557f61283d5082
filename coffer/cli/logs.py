"""``coffer log``: an instance's guest logs, through the API, as a tenant.

Credentials come the way the OpenStack clients take them: ``--os-cloud`` / ``OS_CLOUD`` names a
cloud in ``clouds.yaml`` (``OS_CLIENT_CONFIG_FILE``, ``./clouds.yaml``,
``~/.config/openstack/clouds.yaml`` or ``/etc/openstack/clouds.yaml``; ``coffer up`` writes
one), or ``OS_AUTH_URL``, ``OS_USERNAME``, ``OS_PASSWORD``, ``OS_PROJECT_NAME`` (and the
domain variables) are set. The token's catalog gives the database endpoint.

``tail`` and ``save`` read a published log through Coffer's extension route
(``GET .../instances/{id}/log/{name}``): published logs live in Coffer's backup storage, which
tenants cannot reach themselves.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    import httpx

# httpx and yaml are imported inside the functions that use them: ``coffer`` (the guest agent's
# command too) imports this module at start, and a guest agent never needs them.

_TIMEOUT = 200.0
_COLUMNS = ("name", "type", "status", "published", "pending", "container", "prefix")


class ApiFailure(click.ClickException):
    """The API or the identity service refused (the message says why)."""


def _clouds_files() -> list[Path]:
    explicit = os.environ.get("OS_CLIENT_CONFIG_FILE")
    if explicit:
        return [Path(explicit)]
    return [
        Path.cwd() / "clouds.yaml",
        Path.home() / ".config" / "openstack" / "clouds.yaml",
        Path("/etc/openstack/clouds.yaml"),
    ]


def _cloud_settings(cloud: str | None) -> dict[str, Any]:
    """``{"auth": {...}, "region_name", "interface"}`` from clouds.yaml or OS_* variables."""
    import yaml

    if cloud:
        for path in _clouds_files():
            try:
                data = yaml.safe_load(path.read_text()) or {}
            except FileNotFoundError:
                continue
            except (OSError, yaml.YAMLError) as exc:
                raise click.ClickException(f"Cannot read {path}: {exc}") from None
            entry = (data.get("clouds") or {}).get(cloud)
            if isinstance(entry, dict):
                return entry
        searched = ", ".join(str(p) for p in _clouds_files())
        raise click.ClickException(f"No cloud {cloud!r} in clouds.yaml (looked in {searched}).")
    env = os.environ
    auth = {
        "auth_url": env.get("OS_AUTH_URL"),
        "username": env.get("OS_USERNAME"),
        "password": env.get("OS_PASSWORD"),
        "project_name": env.get("OS_PROJECT_NAME") or env.get("OS_TENANT_NAME"),
        "project_id": env.get("OS_PROJECT_ID"),
        "user_domain_name": env.get("OS_USER_DOMAIN_NAME"),
        "user_domain_id": env.get("OS_USER_DOMAIN_ID"),
        "project_domain_name": env.get("OS_PROJECT_DOMAIN_NAME"),
        "project_domain_id": env.get("OS_PROJECT_DOMAIN_ID"),
    }
    missing = [
        name
        for name, key in (
            ("OS_AUTH_URL", "auth_url"),
            ("OS_USERNAME", "username"),
            ("OS_PASSWORD", "password"),
        )
        if not auth[key]
    ]
    if missing:
        raise click.ClickException(
            "No credentials: set OS_CLOUD (a cloud in clouds.yaml) or " + ", ".join(missing) + "."
        )
    return {
        "auth": auth,
        "region_name": env.get("OS_REGION_NAME"),
        "interface": env.get("OS_INTERFACE", "public"),
    }


def _domain(auth: dict[str, Any], kind: str) -> dict[str, str]:
    if auth.get(f"{kind}_domain_id"):
        return {"id": str(auth[f"{kind}_domain_id"])}
    return {"name": str(auth.get(f"{kind}_domain_name") or "Default")}


def _error_text(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text.strip()[:500] or resp.reason_phrase
    if isinstance(body, dict) and len(body) == 1:
        fault = next(iter(body.values()))
        if isinstance(fault, dict) and "message" in fault:
            return str(fault["message"])
    return json.dumps(body)[:500]


@dataclass
class DatabaseApi:
    """A token and the database endpoint of the caller's project."""

    endpoint: str
    token: str

    @classmethod
    def login(cls, cloud: str | None) -> DatabaseApi:
        import httpx

        settings = _cloud_settings(cloud)
        auth = settings.get("auth") or {}
        auth_url = str(auth.get("auth_url") or "").rstrip("/")
        if not auth_url:
            raise click.ClickException("The cloud has no auth_url.")
        if not auth_url.endswith("/v3"):
            auth_url += "/v3"
        scope: dict[str, Any] = (
            {"project": {"id": str(auth["project_id"])}}
            if auth.get("project_id")
            else {"project": {"name": auth.get("project_name"), "domain": _domain(auth, "project")}}
        )
        body = {
            "auth": {
                "identity": {
                    "methods": ["password"],
                    "password": {
                        "user": {
                            "name": auth.get("username"),
                            "domain": _domain(auth, "user"),
                            "password": auth.get("password"),
                        }
                    },
                },
                "scope": scope,
            }
        }
        try:
            resp = httpx.post(f"{auth_url}/auth/tokens", json=body, timeout=30)
        except httpx.HTTPError as exc:
            raise ApiFailure(f"Cannot reach the identity service at {auth_url}: {exc}") from None
        if resp.status_code != 201:
            raise ApiFailure(f"Authentication failed ({resp.status_code}): {_error_text(resp)}")
        token = resp.headers.get("X-Subject-Token", "")
        catalog = resp.json().get("token", {}).get("catalog") or []
        region = settings.get("region_name")
        interface = settings.get("interface") or "public"
        for service in catalog:
            if service.get("type") != "database":
                continue
            for endpoint in service.get("endpoints") or []:
                if endpoint.get("interface") != interface:
                    continue
                if region and region not in (endpoint.get("region"), endpoint.get("region_id")):
                    continue
                return cls(str(endpoint["url"]).rstrip("/"), token)
        raise ApiFailure("The token's catalog has no database endpoint for this region.")

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        import httpx

        try:
            resp = httpx.request(
                method,
                self.endpoint + path,
                headers={"X-Auth-Token": self.token, "Accept": "application/json"},
                timeout=_TIMEOUT,
                **kwargs,
            )
        except httpx.HTTPError as exc:
            raise ApiFailure(f"Cannot reach the database API: {exc}") from None
        if resp.status_code >= 400:
            raise ApiFailure(f"{_error_text(resp)} (HTTP {resp.status_code})")
        return resp

    def instance_id(self, name_or_id: str) -> str:
        """The id of the instance named or identified by ``name_or_id`` (as openstack does)."""
        import httpx

        try:
            resp = httpx.get(
                f"{self.endpoint}/instances/{name_or_id}",
                headers={"X-Auth-Token": self.token},
                timeout=30,
            )
        except httpx.HTTPError as exc:
            raise ApiFailure(f"Cannot reach the database API: {exc}") from None
        if resp.status_code == 200:
            return str(resp.json()["instance"]["id"])
        if resp.status_code != 404:
            raise ApiFailure(f"{_error_text(resp)} (HTTP {resp.status_code})")
        found = [
            item["id"]
            for item in self.request("GET", "/instances").json().get("instances", [])
            if item.get("name") == name_or_id
        ]
        if len(found) != 1:
            what = "No instance" if not found else f"{len(found)} instances"
            raise click.ClickException(f"{what} with the name or id {name_or_id!r}.")
        return str(found[0])


def _print(data: Any, fmt: str) -> None:
    if fmt == "json":
        click.echo(json.dumps(data, indent=2, sort_keys=True))
        return
    rows = data if isinstance(data, list) else None
    if rows is None:
        for key in sorted(data):
            click.echo(f"{key:<10} {data[key]}")
        return
    widths = [max([len(col)] + [len(str(row.get(col, ""))) for row in rows]) for col in _COLUMNS]
    click.echo("  ".join(col.title().ljust(w) for col, w in zip(_COLUMNS, widths, strict=True)))
    for row in rows:
        cells = [str(row.get(col, "")).ljust(w) for col, w in zip(_COLUMNS, widths, strict=True)]
        click.echo("  ".join(cells).rstrip())


format_option = click.option(
    "-f",
    "--format",
    "fmt",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="Output format.",
)


@click.group("log")
@click.option(
    "--os-cloud",
    envvar="OS_CLOUD",
    default=None,
    help="Cloud in clouds.yaml (default: $OS_CLOUD, else the OS_* variables).",
)
@click.pass_context
def log_group(ctx: click.Context, os_cloud: str | None) -> None:
    """An instance's guest logs: list, show, enable, disable, publish, discard, tail, save."""
    ctx.obj = {"cloud": os_cloud}


def _api(ctx: click.Context) -> DatabaseApi:
    return DatabaseApi.login(ctx.obj["cloud"])


def _action(ctx: click.Context, instance: str, name: str, fmt: str, **flags: bool) -> None:
    api = _api(ctx)
    body: dict[str, Any] = {"name": name}
    body.update({flag: 1 for flag, on in flags.items() if on})
    instance_id = api.instance_id(instance)
    _print(api.request("POST", f"/instances/{instance_id}/log", json=body).json()["log"], fmt)


@log_group.command("list")
@click.argument("instance")
@format_option
@click.pass_context
def list_logs(ctx: click.Context, instance: str, fmt: str) -> None:
    """List INSTANCE's logs (name or id)."""
    api = _api(ctx)
    instance_id = api.instance_id(instance)
    _print(api.request("GET", f"/instances/{instance_id}/log").json()["logs"], fmt)


@log_group.command("show")
@click.argument("instance")
@click.argument("name")
@format_option
@click.pass_context
def show_log(ctx: click.Context, instance: str, name: str, fmt: str) -> None:
    """Show one log of INSTANCE."""
    _action(ctx, instance, name, fmt)


@log_group.command("enable")
@click.argument("instance")
@click.argument("name")
@format_option
@click.pass_context
def enable_log(ctx: click.Context, instance: str, name: str, fmt: str) -> None:
    """Switch a USER log on (e.g. general, slow_query)."""
    _action(ctx, instance, name, fmt, enable=True)


@log_group.command("disable")
@click.argument("instance")
@click.argument("name")
@format_option
@click.pass_context
def disable_log(ctx: click.Context, instance: str, name: str, fmt: str) -> None:
    """Switch a USER log off (what was published stays)."""
    _action(ctx, instance, name, fmt, disable=True)


@log_group.command("publish")
@click.argument("instance")
@click.argument("name")
@click.option("--disable", is_flag=True, help="Switch the log off after publishing.")
@click.option("--discard", is_flag=True, help="Delete what was published before, first.")
@format_option
@click.pass_context
def publish_log(
    ctx: click.Context, instance: str, name: str, disable: bool, discard: bool, fmt: str
) -> None:
    """Publish what the log gained since its last publish (switches a USER log on)."""
    _action(ctx, instance, name, fmt, publish=True, disable=disable, discard=discard)


@log_group.command("discard")
@click.argument("instance")
@click.argument("name")
@format_option
@click.pass_context
def discard_log(ctx: click.Context, instance: str, name: str, fmt: str) -> None:
    """Delete the published objects of a log."""
    _action(ctx, instance, name, fmt, discard=True)


@log_group.command("tail")
@click.argument("instance")
@click.argument("name")
@click.option(
    "--lines", type=click.IntRange(0, 100_000), default=50, show_default=True, help="Lines."
)
@click.pass_context
def tail_log(ctx: click.Context, instance: str, name: str, lines: int) -> None:
    """Print the last lines of a published log."""
    api = _api(ctx)
    instance_id = api.instance_id(instance)
    resp = api.request("GET", f"/instances/{instance_id}/log/{name}", params={"lines": lines})
    sys.stdout.write(resp.text)


@log_group.command("save")
@click.argument("instance")
@click.argument("name")
@click.option(
    "--file",
    "path",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="Where to write it (default: coffer-<instance id>-<log>.log).",
)
@click.pass_context
def save_log(ctx: click.Context, instance: str, name: str, path: str | None) -> None:
    """Save the whole published text of a log to a file."""
    import httpx

    api = _api(ctx)
    instance_id = api.instance_id(instance)
    target = Path(path or f"coffer-{instance_id}-{name}.log")
    url = f"{api.endpoint}/instances/{instance_id}/log/{name}"
    try:
        with httpx.stream(
            "GET", url, headers={"X-Auth-Token": api.token}, timeout=_TIMEOUT
        ) as resp:
            if resp.status_code >= 400:
                resp.read()
                raise ApiFailure(f"{_error_text(resp)} (HTTP {resp.status_code})")
            with target.open("wb") as handle:
                for chunk in resp.iter_bytes():
                    handle.write(chunk)
    except httpx.HTTPError as exc:
        raise ApiFailure(f"Cannot reach the database API: {exc}") from None
    click.echo(f"Log {name!r} of {instance_id} written to {target}")
