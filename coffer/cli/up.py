"""``coffer up``: api + taskmanager + conductor in one process, on embedded defaults."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import uvicorn

from coffer.api.app import Services, create_app
from coffer.api.policy import load_policy
from coffer.cli.bootstrap import bootstrap, identity_service, write_clouds_yaml
from coffer.compute.base import get_driver
from coffer.conductor.service import Conductor
from coffer.config import Settings
from coffer.controlplane import ControlPlane
from coffer.taskmanager.service import TaskManager

LOG = logging.getLogger("coffer.up")

#: Seconds the API keeps an idle keep-alive connection open. Longer than the idle expiry of
#: common HTTP clients (httpx: 5 s, uvicorn's own default too): with equal timeouts a client
#: sometimes sent its next request on a connection the server was closing that instant, and
#: got "connection reset" (seen in 3 of ~20 runs of bursts of creates 5-7 s apart).
KEEP_ALIVE_SECONDS = 75


def start_control_plane(settings: Settings, *, bootstrap_first: bool) -> ControlPlane:
    cp = ControlPlane(settings)
    cp.start_bus()
    if bootstrap_first:
        bootstrap(cp)
    return cp


def make_server(cp: ControlPlane) -> uvicorn.Server:
    services = Services(
        settings=cp.settings,
        session_factory=cp.session_factory,
        identity=identity_service(cp),
        rpc=cp,
    )
    app = create_app(services)
    # A bad policy.yaml stops the API here, with every problem listed, not at the first request.
    app.state.coffer_policy = load_policy(cp.settings)
    config = uvicorn.Config(
        app,
        host=cp.settings.default.bind_host,
        port=cp.settings.default.bind_port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
    )
    return uvicorn.Server(config)


def serve_api(cp: ControlPlane) -> None:
    make_server(cp).run()


def _banner(cp: ControlPlane, creds: dict[str, str], clouds: list[Any]) -> str:
    base = cp.settings.api_base_url
    ident = cp.settings.identity
    keystone = cp.settings.keystone_authtoken
    if keystone.enabled:
        # The embedded credentials and clouds.yaml are of no use: Keystone issues the tokens.
        return "\n".join(
            [
                "",
                "Coffer is up.",
                f"  Database API (Trove v1.0): {base}/v1.0/<project id>",
                f"  Identity:                  Keystone at "
                f"{keystone.www_authenticate_uri or keystone.auth_url}",
                f"  State directory:           {cp.settings.state_dir}",
                "",
                "Tokens are validated by that Keystone; the embedded identity is off. Register "
                "Coffer in its catalog if you have not:",
                "  openstack service create --name trove database",
                f"  openstack endpoint create database public '{base}/v1.0/%(tenant_id)s'",
                "  (and the same for the internal and admin interfaces)",
                "Then, with your usual cloud:",
                "  openstack database instance list",
                "",
                "Press Ctrl-C to stop Coffer; database instances keep running and are found "
                "again on the next 'coffer up'.",
                "",
            ]
        )
    lines = [
        "",
        "Coffer is up.",
        f"  Database API (Trove v1.0): {base}/v1.0/<project id>",
        f"  Identity (Keystone v3):    {base}/identity/v3",
        f"  State directory:           {cp.settings.state_dir}",
        "",
        "Credentials (also in clouds.yaml):",
        f"  admin:  user {ident.admin_user!r}, project {ident.admin_project!r}, "
        f"password {creds['admin_password']}",
        f"  demo:   user {ident.demo_user!r}, project {ident.demo_project!r}, "
        f"password {creds['demo_password']}",
        "",
        "clouds.yaml written to: " + ", ".join(str(p) for p in clouds),
        "Try:",
        "  openstack --os-cloud coffer datastore list",
        "  openstack --os-cloud coffer database instance list",
        "",
        "Press Ctrl-C to stop Coffer; database instances keep running and are found again "
        "on the next 'coffer up'.",
        "",
    ]
    return "\n".join(lines)


def run_up(settings: Settings) -> None:
    load_policy(settings)  # refuse a bad policy.yaml before anything starts
    cp = start_control_plane(settings, bootstrap_first=False)
    creds = bootstrap(cp)
    # With an external Keystone the embedded identity is off: no clouds.yaml pointing at it.
    clouds = [] if settings.keystone_authtoken.enabled else write_clouds_yaml(cp, creds)
    compute = get_driver(settings.compute.driver, settings)
    taskmanager = TaskManager(cp, compute)
    conductor = Conductor(cp)
    conductor.start()
    taskmanager.start()
    server = make_server(cp)
    stopping = threading.Event()

    def _stop(*_: Any) -> None:
        stopping.set()
        server.should_exit = True

    # uvicorn installs no signal handlers when it runs outside the main thread; ours stop every
    # service, not just the API.
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    thread = threading.Thread(target=server.run, name="api", daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        thread.join(timeout=0.05)
    if not server.started:
        conductor.stop()
        taskmanager.stop()
        cp.close()
        raise SystemExit(
            f"The API could not listen on {settings.default.bind_host}:"
            f"{settings.default.bind_port}; is another Coffer running? Use --port to choose "
            "another port."
        )
    print(_banner(cp, creds, clouds), flush=True)
    try:
        while not stopping.wait(timeout=0.5):
            if not thread.is_alive():
                break
    finally:
        LOG.info("stopping Coffer")
        server.should_exit = True
        thread.join(timeout=10)
        taskmanager.stop()
        conductor.stop()
        if cp.broker is not None:
            cp.broker.stop()
        cp.close()
        print("Coffer stopped; database instances keep running.", flush=True)
