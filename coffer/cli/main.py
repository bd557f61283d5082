"""The ``coffer`` command: ``up``, the services one by one, the guest agent, and ``manage``."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click

from coffer.config import Settings, load_settings
from coffer.errors import CofferError, ConfigError

LOG = logging.getLogger("coffer")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Per-request access lines and kombu's connection chatter drown what matters.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logging.getLogger("kombu").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _settings(config: str | None, overrides: dict[str, dict[str, Any]] | None = None) -> Settings:
    try:
        settings = load_settings(config, overrides=overrides)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    _setup_logging(settings.default.log_level)
    return settings


config_option = click.option(
    "--config",
    "config",
    type=click.Path(dir_okay=False),
    default=None,
    envvar="COFFER_CONFIG",
    help="coffer.conf to read (default: none; embedded defaults).",
)


@click.group()
@click.version_option(package_name="coffer")
def main() -> None:
    """Coffer: a Database-as-a-Service that speaks the OpenStack Trove v1.0 API."""


# --- services ----------------------------------------------------------------------------------


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


@main.command()
@config_option
@click.option("--host", default=None, help="Address the API listens on (default 127.0.0.1).")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="API port (8779).")
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where Coffer keeps its state (default /var/lib/coffer as root, else ~/.local/state).",
)
def up(config: str | None, host: str | None, port: int | None, state_dir: str | None) -> None:
    """Run api + taskmanager + conductor on embedded defaults, on this machine."""
    overrides: dict[str, dict[str, Any]] = {"DEFAULT": {}}
    if host:
        overrides["DEFAULT"]["bind_host"] = host
    if port:
        overrides["DEFAULT"]["bind_port"] = port
    if state_dir:
        overrides["DEFAULT"]["state_dir"] = state_dir
    settings = _settings(config, overrides)
    from coffer.cli.up import run_up

    try:
        run_up(settings)
    except CofferError as exc:
        raise click.ClickException(exc.message) from exc


@main.command()
@config_option
def api(config: str | None) -> None:
    """Run the API service (Trove v1.0, identity subset) alone."""
    from coffer.cli.up import serve_api, start_control_plane

    settings = _settings(config)
    cp = start_control_plane(settings, bootstrap_first=True)
    try:
        serve_api(cp)
    except CofferError as exc:
        raise click.ClickException(exc.message) from exc
    finally:
        cp.close()


@main.command()
@config_option
def taskmanager(config: str | None) -> None:
    """Run the taskmanager service alone."""
    from coffer.cli.up import start_control_plane
    from coffer.compute.base import get_driver
    from coffer.taskmanager.service import TaskManager

    settings = _settings(config)
    cp = start_control_plane(settings, bootstrap_first=False)
    tm = TaskManager(cp, get_driver(settings.compute.driver, settings))
    tm.start()
    try:
        _wait_for_signal()
    finally:
        tm.stop()
        cp.close()


@main.command()
@config_option
def conductor(config: str | None) -> None:
    """Run the conductor service alone."""
    from coffer.cli.up import start_control_plane
    from coffer.conductor.service import Conductor

    settings = _settings(config)
    cp = start_control_plane(settings, bootstrap_first=False)
    service = Conductor(cp)
    service.start()
    try:
        _wait_for_signal()
    finally:
        service.stop()
        cp.close()


@main.command()
@click.option(
    "--config",
    "config",
    type=click.Path(exists=True, dir_okay=False),
    required=True,
    help="The instance's guest.json (written by the compute driver).",
)
def guestagent(config: str) -> None:
    """Run the guest agent of one instance (started by the compute driver, not by hand)."""
    _setup_logging("INFO")
    from coffer.guest.agent import main as agent_main

    agent_main(Path(config))


# --- manage ------------------------------------------------------------------------------------

from coffer.cli.manage import manage  # noqa: E402 - the group registers itself on import

main.add_command(manage)
from coffer.cli.logs import log_group  # noqa: E402 - the `coffer log` group

main.add_command(log_group)

from coffer.cli.backups import backup  # noqa: E402 - the `coffer backup` group

main.add_command(backup)


if __name__ == "__main__":  # pragma: no cover
    main()
