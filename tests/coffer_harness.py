"""Run a whole Coffer (``coffer up`` or the services one by one) for integration tests.

Everything a harness starts is stopped by PID at teardown, even when the test failed: the Coffer
processes themselves, and every process (supervisors, guest agents, engines, the embedded broker)
whose command line or working directory is inside the harness's state directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def processes_under(path: Path) -> list[int]:
    """PIDs whose argv or cwd mentions ``path`` (ours, by construction of the state dir)."""
    needle = str(path)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            cwd = ""
        if needle in cmdline or cwd.startswith(needle):
            found.append(int(entry.name))
    return found


def kill_all_under(path: Path, grace: float = 10.0) -> None:
    pids = processes_under(path)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and processes_under(path):
        time.sleep(0.1)
    for pid in processes_under(path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@dataclass
class Coffer:
    state_dir: Path
    port: int
    env: dict[str, str]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def clouds_yaml(self) -> Path:
        return self.state_dir / "clouds.yaml"

    def credentials(self) -> dict[str, str]:
        data: dict[str, str] = json.loads((self.state_dir / "credentials.json").read_text())
        return data

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.state_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the proc
        proc = subprocess.Popen(
            [str(VENV_BIN / "coffer"), *args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.procs[name] = proc
        return proc

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def log(self, name: str) -> str:
        path = self.state_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_api(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited early:\n{self.log(name)}")
            try:
                if httpx.get(self.base_url + "/", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError("the Coffer API did not come up:\n" + self.log("up"))

    def cli_env(self, cloud: str = "coffer") -> dict[str, str]:
        env = dict(self.env)
        env["OS_CLIENT_CONFIG_FILE"] = str(self.clouds_yaml)
        env["OS_CLOUD"] = cloud
        return env

    def openstack(self, *args: str, cloud: str = "coffer", check: bool = True) -> Any:
        """Run the real ``openstack`` CLI; JSON output parsed when ``-f json`` is given."""
        proc = subprocess.run(
            [str(VENV_BIN / "openstack"), *args],
            env=self.cli_env(cloud),
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"openstack {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}"
            )
        if "-f" in args and "json" in args and proc.returncode == 0 and proc.stdout.strip():
            return json.loads(proc.stdout)
        return proc

    def trove(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run the legacy ``trove`` CLI as the demo user (it takes OS_* variables, not clouds)."""
        env = dict(self.env)
        env.update(
            {
                "OS_AUTH_URL": f"{self.base_url}/identity/v3",
                "OS_USERNAME": "demo",
                "OS_PASSWORD": self.credentials()["demo_password"],
                "OS_PROJECT_NAME": "demo",
                "OS_USER_DOMAIN_NAME": "Default",
                "OS_PROJECT_DOMAIN_NAME": "Default",
                "OS_REGION_NAME": "RegionOne",
            }
        )
        return subprocess.run(
            [str(VENV_BIN / "trove"), *args], env=env, capture_output=True, text=True, timeout=60
        )

    def token(self, user: str = "demo", project: str = "demo") -> tuple[str, str]:
        """(token, project id) from the embedded identity service."""
        creds = self.credentials()
        password = creds["admin_password"] if user == "admin" else creds["demo_password"]
        body = {
            "auth": {
                "identity": {
                    "methods": ["password"],
                    "password": {
                        "user": {"name": user, "domain": {"id": "default"}, "password": password}
                    },
                },
                "scope": {"project": {"name": project, "domain": {"id": "default"}}},
            }
        }
        resp = httpx.post(self.base_url + "/identity/v3/auth/tokens", json=body, timeout=10)
        resp.raise_for_status()
        return resp.headers["X-Subject-Token"], resp.json()["token"]["project"]["id"]


@contextlib.contextmanager
def coffer_environment(**extra_env: str) -> Iterator[Coffer]:
    """A state dir (traversable by the engine user), a free port and loopback pools of its own."""
    state = Path(tempfile.mkdtemp(prefix="coffer-test-", dir="/tmp"))
    state.chmod(0o711)
    home = state / "home"
    home.mkdir()
    port = free_port()
    octet = random.randint(1, 250)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COFFER_", "OS_"))}
    env.update(
        {
            "HOME": str(home),
            "PATH": f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}",
            "COFFER_STATE_DIR": str(state),
            "COFFER_DEFAULT__BIND_PORT": str(port),
            "COFFER_DEFAULT__AGENT_HEARTBEAT_INTERVAL": "2",
            "COFFER_COMPUTE__PRIVATE_POOL": f"127.{100 + octet % 100}.{octet}.0/24",
            "COFFER_COMPUTE__PUBLIC_POOL": f"127.{200 + octet % 50}.{octet}.0/24",
            **extra_env,
        }
    )
    coffer = Coffer(state_dir=state, port=port, env=env)
    try:
        yield coffer
    finally:
        for name in list(coffer.procs):
            coffer.stop(name, sig=signal.SIGINT if name == "up" else signal.SIGTERM)
        kill_all_under(state)
        leftover = processes_under(state)
        shutil.rmtree(state, ignore_errors=True)
        assert not leftover, f"processes left running: {leftover}"


class TenantApi:
    """A tenant's HTTP view of a running Coffer: a token, its project, and the usual waits."""

    def __init__(self, coffer: Coffer, user: str = "demo", project: str = "demo") -> None:
        self.coffer = coffer
        self.token, self.project = coffer.token(user, project)

    def url(self, path: str, project: str | None = None) -> str:
        return f"{self.coffer.base_url}/v1.0/{project or self.project}{path}"

    def request(
        self,
        method: str,
        path: str,
        *,
        project: str | None = None,
        token: str | None = "",
        **kwargs: Any,
    ) -> httpx.Response:
        """``token=None`` sends no token; ``""`` (default) sends this tenant's."""
        headers = dict(kwargs.pop("headers", {}))
        if token is not None:
            headers["X-Auth-Token"] = token or self.token
        return httpx.request(method, self.url(path, project), headers=headers, timeout=30, **kwargs)

    def show(self, instance_id: str) -> dict[str, Any]:
        resp = self.request("GET", f"/instances/{instance_id}")
        assert resp.status_code == 200, resp.text
        instance: dict[str, Any] = resp.json()["instance"]
        return instance

    def create(self, **instance: Any) -> str:
        """POST /instances with ``instance`` as the body's instance; returns the new id."""
        resp = self.request("POST", "/instances", json={"instance": instance})
        assert resp.status_code == 200, resp.text
        instance_id: str = resp.json()["instance"]["id"]
        return instance_id

    def wait_settled(self, instance_id: str, timeout: float = 120) -> dict[str, Any]:
        """Poll until the instance leaves BUILD; return its last view."""
        deadline = time.monotonic() + timeout
        shown = self.show(instance_id)
        while shown["status"] == "BUILD" and time.monotonic() < deadline:
            time.sleep(0.2)
            shown = self.show(instance_id)
        return shown

    def delete_and_wait_gone(self, instance_id: str, timeout: float = 60) -> None:
        resp = self.request("DELETE", f"/instances/{instance_id}")
        assert resp.status_code == 202, resp.text
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.request("GET", f"/instances/{instance_id}").status_code == 404:
                return
            time.sleep(0.2)
        raise AssertionError(f"instance {instance_id} still exists {timeout}s after delete")


def quota_in_use(api: TenantApi, project: str, resource: str) -> int:
    """A project's ``in_use`` of ``resource`` from ``GET /mgmt/quotas`` (``api``: an admin, or
    the project's own member where the policy lets one read its quotas)."""
    resp = api.request("GET", f"/mgmt/quotas/{project}")
    assert resp.status_code == 200, resp.text
    (row,) = [r for r in resp.json()["quotas"] if r["resource"] == resource]
    in_use: int = row["in_use"]
    return in_use


def redis_ping(address: str, user: str, password: str) -> Any:
    """Log in to a Redis instance as ``user`` and PING (raises redis' AuthenticationError)."""
    import redis

    client = redis.Redis(host=address, username=user, password=password, socket_timeout=5)
    try:
        return client.ping()
    finally:
        client.close()


def mariadb_instance(name: str, database: str, user: str, password: str) -> dict[str, Any]:
    """The body of a small MariaDB instance with one database and one user granted on it."""
    return {
        "name": name,
        "flavorRef": "6",
        "volume": {"size": 1},
        "datastore": {"type": "mariadb"},
        "databases": [{"name": database}],
        "users": [{"name": user, "password": password, "databases": [{"name": database}]}],
    }
