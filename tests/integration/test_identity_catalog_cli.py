"""The real ``openstack`` and ``trove`` CLIs against the API served by uvicorn on a loopback port:
token issue, datastore version create/list, datastore and flavor lists."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from coffer import catalog
from coffer.api.app import Services, create_app
from coffer.config import load_settings
from coffer.db.models import Base
from coffer.db.session import make_engine, make_session_factory, transaction
from coffer.identity import IdentityService

pytestmark = [pytest.mark.integration, pytest.mark.compat]

BIN = Path(sys.executable).parent
ADMIN_PASSWORD = "cli-admin-pw"
DEMO_PASSWORD = "cli-demo-pw"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _unbytes(cell: str) -> str:
    return cell[2:-1] if cell.startswith(("b'", 'b"')) else cell


@dataclass
class Served:
    url: str
    home: Path

    def env(self, user: str, password: str, auth_path: str = "/identity/v3") -> dict[str, str]:
        # Only what the CLIs need: no OS_* or proxy settings leak in from the caller.
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            "OS_AUTH_URL": self.url + auth_path,
            "OS_IDENTITY_API_VERSION": "3",
            "OS_USERNAME": user,
            "OS_PASSWORD": password,
            "OS_PROJECT_NAME": user,
            "OS_USER_DOMAIN_NAME": "Default",
            "OS_PROJECT_DOMAIN_NAME": "Default",
            "OS_REGION_NAME": "RegionOne",
            "OS_AUTH_TYPE": "password",
        }

    def run(self, tool: str, *args: str, user: str = "admin", check: bool = True, **kw: Any) -> Any:
        password = ADMIN_PASSWORD if user == "admin" else DEMO_PASSWORD
        proc = subprocess.run(
            [str(BIN / tool), *args],
            env=self.env(user, password, **kw),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if check:
            assert proc.returncode == 0, f"{tool} {args}: {proc.stdout}\n{proc.stderr}"
        return proc


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    port = _free_port()
    settings = load_settings(
        environ={},
        overrides={
            "DEFAULT": {"state_dir": str(tmp_path), "bind_port": port},
            "database": {"connection": f"sqlite:///{tmp_path / 'coffer.db'}"},
        },
    )
    engine = make_engine(settings.database_url)
    server: uvicorn.Server | None = None
    thread: threading.Thread | None = None
    try:
        # The smallest start: tables, identity bootstrap, one version and one flavor.
        Base.metadata.create_all(engine)
        factory = make_session_factory(engine)
        identity = IdentityService(factory, os.urandom(32), settings)
        identity.bootstrap(ADMIN_PASSWORD, DEMO_PASSWORD)
        with transaction(factory) as session:
            catalog.register_datastore_version(
                session, "mariadb", "10.11", "mariadb", version="10.11.6", default=True
            )
            catalog.create_flavor(session, "m1.small", "m1.small", ram=1024, vcpus=1, disk=5)
        app = create_app(Services(settings=settings, session_factory=factory, identity=identity))
        config = uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, name="coffer-api", daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while not server.started:
            assert thread.is_alive(), "uvicorn stopped during start"
            assert time.monotonic() < deadline, "uvicorn did not start in 20 s"
            time.sleep(0.05)
        home = tmp_path / "home"
        home.mkdir()
        yield Served(url=f"http://127.0.0.1:{port}", home=home)
    finally:
        if server is not None:
            server.should_exit = True
        if thread is not None:
            thread.join(timeout=15)
            assert not thread.is_alive(), "uvicorn did not stop"
        engine.dispose()


def test_real_clients_against_identity_and_catalogue(served: Served) -> None:
    # Token issue, via a bare OS_AUTH_URL (version discovery) and via .../v3.
    issued = json.loads(served.run("openstack", "token", "issue", "-f", "json").stdout)
    assert issued["id"] and issued["user_id"] and issued["project_id"]
    bare = served.run("openstack", "token", "issue", "-f", "json", auth_path="/identity")
    assert json.loads(bare.stdout)["project_id"] == issued["project_id"]
    wrong = subprocess.run(
        [str(BIN / "openstack"), "token", "issue"],
        env={**served.env("admin", "not-the-password")},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert wrong.returncode != 0 and "401" in wrong.stderr
    assert "not-the-password" not in wrong.stderr + wrong.stdout

    # An operator registers a version: the admin mgmt call must answer 202 with an empty body,
    # or openstackclient prints "Failed to create datastore version".
    created = served.run(
        "openstack", "datastore", "version", "create", "16", "postgresql", "postgresql", "",
        "--image-tags", "trove,postgresql", "--active", "--default", "--version-number", "16.4",
    )  # fmt: skip
    assert "Failed" not in created.stderr
    refused = served.run(
        "openstack", "datastore", "version", "create", "7.2", "redis", "redis", "",
        "--active", user="demo", check=False,
    )  # fmt: skip
    assert refused.returncode != 0 and "403" in refused.stderr

    listed = json.loads(
        served.run(
            "openstack", "datastore", "version", "list", "postgresql", "-f", "json", user="demo"
        ).stdout
    )
    assert [(v["Name"], v["Version"]) for v in listed] == [("16", "16.4")]
    mariadb = json.loads(
        served.run("openstack", "datastore", "version", "list", "mariadb", "-f", "json").stdout
    )
    assert [(v["Name"], v["Version"]) for v in mariadb] == [("10.11", "10.11.6")]

    datastores = served.run("trove", "datastore-list", user="demo").stdout
    assert "mariadb" in datastores and "postgresql" in datastores and "redis" not in datastores
    flavors = served.run("trove", "flavor-list", user="demo").stdout
    row = next(line for line in flavors.splitlines() if "m1.small" in line)
    # troveclient's table printer shows every str as bytes (b'...') on Python 3; unwrap that.
    cells = [_unbytes(cell.strip()) for cell in row.strip("|").split("|")]
    assert cells == ["m1.small", "m1.small", "1024", "1", "5", "0"]
    shown = json.loads(
        served.run("openstack", "database", "flavor", "show", "m1.small", "-f", "json").stdout
    )
    assert shown["name"] == "m1.small" and shown["ram"] == 1024
