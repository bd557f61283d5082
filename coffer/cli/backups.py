"""``coffer backup ...``: backups and restores through Coffer's API, with a progress bar.

Credentials come the way the OpenStack clients take them: ``--os-cloud``/``OS_CLOUD`` names a
cloud in ``clouds.yaml`` (``OS_CLIENT_CONFIG_FILE``, ``./clouds.yaml``,
``~/.config/openstack/clouds.yaml``, ``/etc/openstack/clouds.yaml``), else the ``OS_AUTH_URL``,
``OS_USERNAME``, ``OS_PASSWORD``, ``OS_PROJECT_NAME`` (and domain, region) variables. The
password is never taken from the command line. The token's catalogue gives the database
endpoint, as for ``openstack database ...``.

While a backup runs, the bar shows the bytes read from the engine so far and the rate (the
backup view's ``raw_size_bytes``, which the guest reports every few seconds); its total is
unknown until it ends. While a restore runs, ``GET /instances/{id}/restore`` gives the
phase, the bytes the restore writes (``total_bytes``) and, from the guest's reports (twice a
second), the bytes verified and then restored so far and the rate: the bar shows the current
pass (``verifying`` every backup of the chain, then ``restoring`` it into the engine) against
the total. When standard error is not a terminal, each change is also printed as a line
(``restore restoring: 12.5 MB of 80.1 MB, 40.2 MB/s``), so logs show the progress. Exit
status: 0 when the backup COMPLETED or the restored instance is ACTIVE, 1 when it FAILED /
ended in ERROR or a request was refused (the API's sentence is printed), 2 for bad usage.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import httpx
import yaml
from rich import filesize
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

#: Seconds between two looks at a running backup or restore.
POLL_SECONDS = 0.5
HTTP_TIMEOUT = 30.0
_FINAL = ("COMPLETED", "FAILED")


@dataclass(frozen=True)
class Credentials:
    auth_url: str
    username: str
    password: str
    project_name: str
    user_domain: str = "Default"
    project_domain: str = "Default"
    region: str = "RegionOne"
    interface: str = "public"


def _clouds_files() -> list[Path]:
    named = os.environ.get("OS_CLIENT_CONFIG_FILE")
    files = [Path(named)] if named else []
    files += [
        Path.cwd() / "clouds.yaml",
        Path.home() / ".config" / "openstack" / "clouds.yaml",
        Path("/etc/openstack/clouds.yaml"),
    ]
    return files


def credentials(cloud: str | None) -> Credentials:
    """The credentials of ``cloud`` (from clouds.yaml) or, without one, of ``OS_*``."""
    env = os.environ
    if cloud:
        for path in _clouds_files():
            if not path.is_file():
                continue
            data = yaml.safe_load(path.read_text()) or {}
            entry = (data.get("clouds") or {}).get(cloud)
            if not isinstance(entry, dict):
                continue
            auth = entry.get("auth") or {}
            try:
                return Credentials(
                    auth_url=str(auth["auth_url"]),
                    username=str(auth["username"]),
                    password=str(auth["password"]),
                    project_name=str(auth["project_name"]),
                    user_domain=str(auth.get("user_domain_name", "Default")),
                    project_domain=str(auth.get("project_domain_name", "Default")),
                    region=str(entry.get("region_name", "RegionOne")),
                    interface=str(entry.get("interface", "public")),
                )
            except KeyError as exc:
                raise click.UsageError(
                    f"cloud {cloud!r} in {path} has no auth {exc.args[0]}"
                ) from None
        raise click.UsageError(
            f"no cloud named {cloud!r} in {', '.join(map(str, _clouds_files()))}"
        )
    missing = [
        name
        for name in ("OS_AUTH_URL", "OS_USERNAME", "OS_PASSWORD", "OS_PROJECT_NAME")
        if not env.get(name)
    ]
    if missing:
        raise click.UsageError(
            f"no credentials: set OS_CLOUD (a cloud in clouds.yaml) or {', '.join(missing)}"
        )
    return Credentials(
        auth_url=env["OS_AUTH_URL"],
        username=env["OS_USERNAME"],
        password=env["OS_PASSWORD"],
        project_name=env["OS_PROJECT_NAME"],
        user_domain=env.get("OS_USER_DOMAIN_NAME", "Default"),
        project_domain=env.get("OS_PROJECT_DOMAIN_NAME", "Default"),
        region=env.get("OS_REGION_NAME", "RegionOne"),
        interface=env.get("OS_INTERFACE", "public"),
    )


class ApiError(click.ClickException):
    """A refused request: the API's own sentence, exit status 1."""


class Api:
    """A token and the database endpoint, from Keystone v3 password authentication."""

    def __init__(self, creds: Credentials) -> None:
        base = creds.auth_url.rstrip("/")
        if not base.endswith("/v3"):
            base += "/v3"
        body = {
            "auth": {
                "identity": {
                    "methods": ["password"],
                    "password": {
                        "user": {
                            "name": creds.username,
                            "domain": {"name": creds.user_domain},
                            "password": creds.password,
                        }
                    },
                },
                "scope": {
                    "project": {
                        "name": creds.project_name,
                        "domain": {"name": creds.project_domain},
                    }
                },
            }
        }
        self.http = httpx.Client(timeout=HTTP_TIMEOUT)
        try:
            resp = self.http.post(f"{base}/auth/tokens", json=body)
        except httpx.HTTPError as exc:
            raise ApiError(f"cannot reach the identity service at {base}: {exc}") from None
        if resp.status_code != 201:
            raise ApiError(f"authentication failed ({resp.status_code}): {_message(resp)}")
        self.token = resp.headers["X-Subject-Token"]
        self.endpoint = self._endpoint(resp.json().get("token", {}), creds)

    @staticmethod
    def _endpoint(token: dict[str, Any], creds: Credentials) -> str:
        for service in token.get("catalog", []):
            if service.get("type") != "database":
                continue
            for endpoint in service.get("endpoints", []):
                if endpoint.get("interface") == creds.interface and creds.region in (
                    endpoint.get("region"),
                    endpoint.get("region_id"),
                ):
                    return str(endpoint["url"]).rstrip("/")
        raise ApiError(
            f"the catalogue has no {creds.interface} database endpoint in region {creds.region}"
        )

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            resp = self.http.request(
                method,
                f"{self.endpoint}/{path.lstrip('/')}",
                headers={"X-Auth-Token": self.token},
                **kwargs,
            )
        except httpx.HTTPError as exc:
            raise ApiError(f"cannot reach the database API: {exc}") from None
        if resp.status_code >= 400:
            raise ApiError(f"{_message(resp)} (HTTP {resp.status_code})")
        return resp.json() if resp.content else None

    def close(self) -> None:
        self.http.close()


def _message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:200] or resp.reason_phrase
    if isinstance(body, dict) and len(body) == 1:
        (fault,) = body.values()
        if isinstance(fault, dict) and fault.get("message"):
            return str(fault["message"])
    return json.dumps(body)[:300]


# --- output ------------------------------------------------------------------------------------


def _mb(value: int | float | None) -> str:
    return "-" if value is None else f"{value / 1_000_000:.1f} MB"


def _table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    table = Table(*columns)
    for row in rows:
        table.add_row(*("" if row.get(c) is None else str(row.get(c)) for c in columns))
    Console(width=200).print(table)


def _show(record: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(record, indent=2, sort_keys=True))
        return
    _table([{"field": k, "value": v} for k, v in sorted(record.items())], ["field", "value"])


class _Rate(TransferSpeedColumn):
    """Bytes per second: rich's recent rate, else the average so far (rich needs two samples
    within its window for a recent rate, and a short backup may report only once)."""

    def render(self, task: Task) -> Text:
        # A restore's guest reports its own recent rate; rich's is from our polls.
        speed = task.fields.get("rate") or task.finished_speed or task.speed
        if speed is None and task.elapsed and task.completed:
            speed = task.completed / task.elapsed
        if speed is None:
            return Text("?", style="progress.data.speed")
        size, suffix = filesize.pick_unit_and_suffix(
            int(speed), ["bytes", "kB", "MB", "GB", "TB"], 1000
        )
        return Text(f"{speed / size:.1f} {suffix}/s", style="progress.data.speed")


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        _Rate(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def follow_backup(api: Api, backup_id: str, sleep: Callable[[float], None] = time.sleep) -> bool:
    """Show a running backup's bytes and rate until it ends; True when it COMPLETED."""
    console = Console(stderr=True)
    started = time.monotonic()
    with _progress(console) as progress:
        task = progress.add_task(f"backup {backup_id[:8]}", total=None)
        while True:
            backup = api.call("GET", f"/backups/{backup_id}")["backup"]
            status = backup["status"]
            done = backup.get("raw_size_bytes") or 0
            progress.update(task, completed=done, description=f"backup {status.lower()}")
            if status in _FINAL:
                if status == "COMPLETED":
                    progress.update(task, total=done, completed=done)
                break
            sleep(POLL_SECONDS)
    elapsed = max(time.monotonic() - started, 1e-6)
    if status == "COMPLETED":
        raw = backup.get("raw_size_bytes") or 0
        click.echo(
            f"Backup {backup_id} COMPLETED: {_mb(raw)} from the engine, stored as "
            f"{_mb(backup.get('size_bytes'))}, in {elapsed:.1f} s ({_mb(raw / elapsed)}/s)."
        )
        return True
    click.echo(f"Backup {backup_id} FAILED: {backup.get('fail_reason') or 'no reason given'}")
    return False


def chain_bytes(api: Api, backup_id: str) -> int | None:
    """The engine bytes of ``backup_id``'s chain (it and the parents it builds on), which is
    what a restore of it writes; None when a link's size is unknown."""
    total = 0
    seen: set[str] = set()
    current: str | None = backup_id
    while current and current not in seen:
        seen.add(current)
        backup = api.call("GET", f"/backups/{current}")["backup"]
        raw = backup.get("raw_size_bytes")
        if not raw:
            return None
        total += int(raw)
        current = backup.get("parent_id")
    return total


def _restore_figures(restore: dict[str, Any]) -> tuple[str, int, float | None]:
    """The phase of a restore view, the bytes of its current pass, and the guest's rate."""
    phase = str(restore.get("phase") or "waiting")
    if phase == "verifying":
        done = int(restore.get("verified_bytes") or 0)
    else:
        done = int(restore.get("restored_bytes") or 0)
    rate = restore.get("rate")
    return phase, done, float(rate) if rate else None


def follow_restore(
    api: Api,
    instance_id: str,
    sleep: Callable[[float], None] = time.sleep,
    backup_id: str | None = None,
) -> bool:
    """Follow an instance being built from a backup until it is ACTIVE (True) or ERROR.

    While it is in BUILD its restore's progress is read as well (``/instances/{id}/restore``,
    Coffer's extension): the bar shows the bytes of the restore's current pass (verifying, then
    restoring) against the chain's total, and the rate the guest reports. A small restore can
    end before the first look sees its progress; the total then comes from the backup's chain
    when ``backup_id`` is known."""
    console = Console(stderr=True)
    started = time.monotonic()
    total = None
    shown: tuple[str, int, int | None] | None = None
    with _progress(console) as progress:
        task = progress.add_task(f"restore {instance_id[:8]}", total=None)
        pass_phase: str | None = None
        while True:
            inst = api.call("GET", f"/instances/{instance_id}")["instance"]
            restore: dict[str, Any] = {}
            if inst["status"] == "BUILD":
                restore = api.call("GET", f"/instances/{instance_id}/restore")["restore"] or {}
            total = restore.get("total_bytes") or total
            if restore:
                phase, done, rate = _restore_figures(restore)
            else:
                phase, done, rate = inst["status"].lower(), 0, None
            counting = "verifying" if phase == "verifying" else "restoring"
            if restore and counting != pass_phase:
                # A new pass over the chain: its bytes (and rich's rate) start again.
                progress.reset(task, total=total, description=f"restore {phase}")
                pass_phase = counting
            progress.update(
                task,
                total=total,
                completed=done if restore else None,
                description=f"restore {phase}",
            )
            if restore:
                # Once the instance has left BUILD, the last rate the guest reported stays shown.
                progress.update(task, rate=rate)
            if not console.is_terminal and restore and (phase, done, total) != shown:
                shown = (phase, done, total)
                speed = f", {_mb(rate)}/s" if rate else ""
                console.print(
                    f"restore {phase}: {_mb(done)} of {_mb(total)}{speed}",
                    highlight=False,
                    soft_wrap=True,
                )
            if inst["status"] not in ("BUILD",):
                if inst["status"] == "ACTIVE" and total:
                    progress.update(task, completed=total)
                break
            sleep(POLL_SECONDS)
    elapsed = max(time.monotonic() - started, 1e-6)
    if inst["status"] == "ACTIVE" and total is None and backup_id is not None:
        total = chain_bytes(api, backup_id)
    if inst["status"] == "ACTIVE":
        rate_text = f" ({_mb(total / elapsed)}/s)" if total else ""
        click.echo(
            f"Instance {instance_id} ACTIVE: restored {_mb(total)} in {elapsed:.1f} s{rate_text}."
        )
        return True
    fault = (inst.get("fault") or {}).get("message") or "no reason given"
    click.echo(f"Instance {instance_id} is {inst['status']}: {fault}")
    return False


# --- commands ----------------------------------------------------------------------------------


@click.group("backup")
@click.option(
    "--os-cloud",
    "cloud",
    envvar="OS_CLOUD",
    default=None,
    help="A cloud in clouds.yaml (default: $OS_CLOUD, else the OS_* variables).",
)
@click.pass_context
def backup(ctx: click.Context, cloud: str | None) -> None:
    """Back up instances and restore backups through the API, showing progress."""
    ctx.obj = {"cloud": cloud}


def _api(ctx: click.Context) -> Api:
    api = Api(credentials(ctx.obj["cloud"]))
    ctx.call_on_close(api.close)
    return api


def _instance_id(api: Api, ref: str) -> str:
    """An instance's id from its id or its (unique) name."""
    try:
        found: str = api.call("GET", f"/instances/{ref}")["instance"]["id"]
        return found
    except ApiError:
        pass
    matches = [i["id"] for i in api.call("GET", "/instances")["instances"] if i["name"] == ref]
    if len(matches) != 1:
        raise ApiError(
            f"no instance named {ref!r}" if not matches else f"several instances are named {ref!r}"
        )
    return str(matches[0])


@backup.command("create")
@click.argument("instance")
@click.argument("name")
@click.option("--description", default=None)
@click.option("--incremental", is_flag=True, help="Build on the instance's latest backup.")
@click.option("--parent", "parent_id", default=None, help="Build on this backup.")
@click.option("--no-wait", is_flag=True, help="Print the new backup and return at once.")
@click.option("--json", "as_json", is_flag=True, help="Print the backup as JSON.")
@click.pass_context
def create(
    ctx: click.Context,
    instance: str,
    name: str,
    description: str | None,
    incremental: bool,
    parent_id: str | None,
    no_wait: bool,
    as_json: bool,
) -> None:
    """Back up INSTANCE (id or name) as NAME and follow it until it ends."""
    api = _api(ctx)
    spec: dict[str, Any] = {"name": name, "instance": _instance_id(api, instance)}
    if description is not None:
        spec["description"] = description
    if incremental:
        spec["incremental"] = 1
    if parent_id is not None:
        spec["parent_id"] = parent_id
    created = api.call("POST", "/backups", json={"backup": spec})["backup"]
    if no_wait:
        _show(created, as_json)
        return
    ok = follow_backup(api, created["id"])
    if as_json:
        _show(api.call("GET", f"/backups/{created['id']}")["backup"], True)
    sys.exit(0 if ok else 1)


@backup.command("show")
@click.argument("backup_id")
@click.option("--follow", is_flag=True, help="While it runs, show its progress until it ends.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def show(ctx: click.Context, backup_id: str, follow: bool, as_json: bool) -> None:
    """Show a backup (with --follow: its progress while it runs)."""
    api = _api(ctx)
    record = api.call("GET", f"/backups/{backup_id}")["backup"]
    if follow and record["status"] not in _FINAL:
        ok = follow_backup(api, backup_id)
        record = api.call("GET", f"/backups/{backup_id}")["backup"]
        _show(record, as_json)
        sys.exit(0 if ok else 1)
    _show(record, as_json)


@backup.command("list")
@click.option("--instance", default=None, help="Only this instance's backups (id or name).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def list_(ctx: click.Context, instance: str | None, as_json: bool) -> None:
    """List the project's backups, newest first."""
    api = _api(ctx)
    path = f"/instances/{_instance_id(api, instance)}/backups" if instance else "/backups"
    rows: list[dict[str, Any]] = []
    marker: str | None = None
    while True:
        page = api.call("GET", path, params={"marker": marker} if marker else None)
        rows.extend(page["backups"])
        nxt = [link for link in page.get("links", []) if link.get("rel") == "next"]
        if not nxt:
            break
        marker = str(httpx.URL(nxt[0]["href"]).params.get("marker"))
    if as_json:
        click.echo(json.dumps(rows, indent=2, sort_keys=True))
        return
    for row in rows:
        row["stored"] = _mb(row.get("size_bytes"))
    _table(rows, ["id", "name", "instance_id", "status", "parent_id", "stored", "updated"])


@backup.command("delete")
@click.argument("backup_id")
@click.option("--wait", is_flag=True, help="Return once the backup is gone.")
@click.pass_context
def delete(ctx: click.Context, backup_id: str, wait: bool) -> None:
    """Delete a backup (and the incremental backups built on it)."""
    api = _api(ctx)
    api.call("DELETE", f"/backups/{backup_id}")
    while wait:
        try:
            api.call("GET", f"/backups/{backup_id}")
        except ApiError:
            break
        time.sleep(POLL_SECONDS)
    click.echo(f"Backup {backup_id} {'deleted' if wait else 'is being deleted'}.")


@backup.command("restore")
@click.argument("backup_id")
@click.argument("name")
@click.option("--flavor", required=True, help="Flavor id of the new instance.")
@click.option("--size", type=click.IntRange(1), required=True, help="Volume size (GB).")
@click.option("--no-wait", is_flag=True, help="Print the new instance's id and return.")
@click.pass_context
def restore(
    ctx: click.Context, backup_id: str, name: str, flavor: str, size: int, no_wait: bool
) -> None:
    """Restore BACKUP_ID into a new instance NAME and follow it until it is ACTIVE."""
    api = _api(ctx)
    body = {
        "instance": {
            "name": name,
            "flavorRef": flavor,
            "volume": {"size": size},
            "restorePoint": {"backupRef": backup_id},
        }
    }
    instance_id = api.call("POST", "/instances", json=body)["instance"]["id"]
    click.echo(f"Restoring backup {backup_id} into instance {instance_id}.")
    if not no_wait:
        sys.exit(0 if follow_restore(api, instance_id, backup_id=backup_id) else 1)


@backup.command("follow-restore")
@click.argument("instance")
@click.pass_context
def follow_restore_command(ctx: click.Context, instance: str) -> None:
    """Follow INSTANCE (id or name), being restored from a backup, until it is ACTIVE."""
    api = _api(ctx)
    sys.exit(0 if follow_restore(api, _instance_id(api, instance)) else 1)
