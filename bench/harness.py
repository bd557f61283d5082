"""Run a whole Coffer for the benchmarks, and clean up everything that was started.

Every process the benchmarks start lives under one work directory (``Workspace``): a ``coffer
up`` with its private state dir, its instances (supervisor, guest agent, engine) and the raw
engines of the baselines. ``Workspace.close`` stops them all by PID (``kill_all_under``) and
removes the directory, also after an error or Ctrl-C. Addresses come from loopback blocks of the
workspace's own (127.0.0.0/8 is all local on Linux), never the standard 127.0.0.1 ports that
system services hold.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
# sockaddr_un holds 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107
VENV_BIN = Path(sys.executable).parent


class BenchError(Exception):
    """A benchmark could not be measured; the message says what went wrong and where to look."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def processes_under(path: Path) -> list[int]:
    """PIDs whose argv or cwd mentions ``path`` (ours, by construction of the work directory)."""
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


def kill_all_under(path: Path, grace: float = 20.0) -> list[int]:
    """SIGTERM every process under ``path``, SIGKILL what is left after ``grace``; returns the
    PIDs that survived even that (normally none)."""
    for pid in processes_under(path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and processes_under(path):
        time.sleep(0.1)
    for pid in processes_under(path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and processes_under(path):
        time.sleep(0.05)
    return processes_under(path)


def port_open(address: str, port: int, timeout: float = 0.5) -> bool:
    """True if something accepts TCP connections at ``address:port``."""
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class EngineUser:
    """Who engines run as: ``coffer`` when we are root (engines never run as root), else us."""

    name: str
    uid: int
    gid: int

    @property
    def switch(self) -> bool:
        return self.uid != os.geteuid()

    @classmethod
    def resolve(cls) -> EngineUser:
        if os.geteuid() != 0:
            entry = pwd.getpwuid(os.geteuid())
        else:
            try:
                entry = pwd.getpwnam("coffer")
            except KeyError:
                raise BenchError(
                    "The 'coffer' system user is missing; engines never run as root. Create it "
                    "with 'useradd --system --no-create-home --shell /usr/sbin/nologin coffer' "
                    "or run scripts/setup."
                ) from None
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid)

    def chown(self, path: Path) -> None:
        if self.switch:
            os.chown(path, self.uid, self.gid)

    def popen_identity(self) -> dict[str, Any]:
        """Keyword arguments for ``subprocess`` that run a child as this user."""
        if not self.switch:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


class AddressBlock:
    """Hands out addresses of one loopback /24 in order (.1, .2, ...). Thread-safe."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._next = 1
        self._lock = threading.Lock()

    def take(self) -> str:
        with self._lock:
            if self._next > 254:
                raise BenchError(f"the loopback block {self.prefix}.0/24 is used up")
            address = f"{self.prefix}.{self._next}"
            self._next += 1
            return address


class Workspace:
    """A private work directory (traversable, not listable, by the engine user) and address
    blocks of its own. Use as a context manager; see the module docstring."""

    def __init__(self, parent: Path | None = None) -> None:
        base = (parent or Path("/tmp")).absolute()
        # Every engine's admin socket ends up at <root>/c-XXXXXXXX/instances/<id>/run/<name>, and
        # unix socket paths are limited to 107 bytes: a plugin refuses longer ones.
        longest = len(str(base)) + len("/cb-XXXXXXXX/c-XXXXXXXX/instances/") + 36 + 20
        if longest > _MAX_SOCKET_PATH:
            raise BenchError(
                f"The work directory {base} is too long: instance sockets under it would exceed "
                f"the {_MAX_SOCKET_PATH} bytes a unix socket path may have. Use a directory of "
                f"at most {len(str(base)) - (longest - _MAX_SOCKET_PATH)} characters."
            )
        base.mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix="cb-", dir=base))
        self.root.chmod(0o711)
        self.user = EngineUser.resolve()
        octet = random.randint(1, 250)
        # Blocks away from those the test harness uses (127.100-249.x), so a bench run beside
        # the test suite never meets a test's instance.
        self.raw_block = AddressBlock(f"127.{30 + octet % 30}.{octet}")
        self.coffer_private_pool = f"127.{60 + octet % 40}.{octet}.0/24"
        self.coffer_public_pool = f"127.250.{octet}.0/24"
        self.survivors: list[int] = []

    def subdir(self, name: str, for_engine: bool = False) -> Path:
        """A fresh directory under the workspace; owned by the engine user if ``for_engine``."""
        # Short names: engine sockets live below these directories (see __init__).
        path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.root))
        if for_engine:
            path.chmod(0o750)
            self.user.chown(path)
        else:
            path.chmod(0o711)
        return path

    def close(self) -> None:
        self.survivors = kill_all_under(self.root)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: Limits a benchmark must lift: quotas would stop the density benchmark long before the
#: machine is full, and request rate limits would throttle the load generator.
_UNLIMITED = {
    "max_instances_per_tenant": "-1",
    "max_volumes_per_tenant": "-1",
    "max_ram_per_tenant": "-1",
    "http_get_rate": "0",
    "http_post_rate": "0",
    "http_put_rate": "0",
    "http_delete_rate": "0",
    "http_mgmt_post_rate": "0",
}


def unlimited_options() -> dict[str, str]:
    """Environment settings lifting every limit this Coffer knows (unknown options would be
    refused at start, so only those its settings model has)."""
    from coffer.config import DefaultSection

    known = DefaultSection.model_fields
    return {f"COFFER_DEFAULT__{k.upper()}": v for k, v in _UNLIMITED.items() if k in known}


class CofferProcess:
    """``coffer up`` as a subprocess on a private state dir, port and loopback pools.

    ``stop`` ends it with SIGINT (as a person would) and then stops by PID every process under
    its state dir: instances outlive ``coffer up`` on purpose, but not a benchmark.
    """

    def __init__(self, workspace: Workspace, **extra_env: str) -> None:
        self.workspace = workspace
        #: Redis warm instances it keeps (``[compute] redis_warm_pool``; see wait_warm_pool).
        self.warm_pool = int(extra_env.get("COFFER_COMPUTE__REDIS_WARM_POOL", "0"))
        self.state_dir = workspace.subdir("c")
        self.home = self.state_dir / "home"
        self.home.mkdir()
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("COFFER_", "OS_"))}
        env.update(
            {
                "HOME": str(self.home),
                "PATH": f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}",
                "COFFER_STATE_DIR": str(self.state_dir),
                "COFFER_DEFAULT__BIND_PORT": str(self.port),
                "COFFER_DEFAULT__LOG_LEVEL": "WARNING",
                "COFFER_COMPUTE__PRIVATE_POOL": workspace.coffer_private_pool,
                "COFFER_COMPUTE__PUBLIC_POOL": workspace.coffer_public_pool,
                **unlimited_options(),
                **extra_env,
            }
        )
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.state_dir / "up.log"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def db_path(self) -> Path:
        return self.state_dir / "coffer.db"

    def instance_dir(self, instance_id: str) -> Path:
        return self.state_dir / "instances" / instance_id

    def start(self, timeout: float = 60) -> float:
        """Start ``coffer up`` and wait until the API answers; returns the seconds it took."""
        started = time.perf_counter()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(VENV_BIN / "coffer"), "up"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"coffer up exited early; its log:\n{self.log_tail()}")
            try:
                if httpx.get(self.base_url + "/", timeout=1).status_code == 200:
                    return time.perf_counter() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise BenchError(f"the Coffer API did not come up in {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def credentials(self) -> dict[str, str]:
        data: dict[str, str] = json.loads((self.state_dir / "credentials.json").read_text())
        return data

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        kill_all_under(self.state_dir)


WARM_PROJECT = "coffer-warm-pool"


def wait_warm_pool(coffer: CofferProcess, timeout: float = 180) -> None:
    """Until ``coffer``'s Redis warm pool is full and idle (``[compute] redis_warm_pool``
    warm instances ready), so that a timed Redis create finds one; no-op without a pool."""
    if coffer.warm_pool <= 0:
        return
    query = (
        "select count(*) from instances i join service_statuses s on s.instance_id = i.id "
        "where i.tenant_id = ? and i.deleted = 0 and i.task = 'none' "
        "and i.server_status = 'active' and s.status in ('running', 'healthy')"
    )
    deadline = time.monotonic() + timeout
    ready = 0
    while time.monotonic() < deadline:
        conn = sqlite3.connect(coffer.db_path, timeout=30)
        try:
            (ready,) = conn.execute(query, (WARM_PROJECT,)).fetchone()
        finally:
            conn.close()
        if ready >= coffer.warm_pool:
            return
        time.sleep(0.2)
    raise BenchError(
        f"the Redis warm pool had {ready} of {coffer.warm_pool} warm instances ready after "
        f"{timeout:.0f} s; see coffer up's log"
    )


class CofferApi:
    """The Trove API of one Coffer, as the demo user (a project member)."""

    def __init__(self, coffer: CofferProcess) -> None:
        self.coffer = coffer
        self.client = httpx.Client(base_url=coffer.base_url, timeout=60)
        self.token, self.project = self._login()
        self.client.headers["X-Auth-Token"] = self.token

    def __repr__(self) -> str:
        return f"CofferApi({self.coffer.base_url}, project={self.project})"

    def _login(self) -> tuple[str, str]:
        password = self.coffer.credentials()["demo_password"]
        body = {
            "auth": {
                "identity": {
                    "methods": ["password"],
                    "password": {
                        "user": {"name": "demo", "domain": {"id": "default"}, "password": password}
                    },
                },
                "scope": {"project": {"name": "demo", "domain": {"id": "default"}}},
            }
        }
        resp = self.client.post("/identity/v3/auth/tokens", json=body)
        if resp.status_code != 201:
            raise BenchError(f"could not log in to Coffer as demo ({resp.status_code})")
        return resp.headers["X-Subject-Token"], resp.json()["token"]["project"]["id"]

    def path(self, suffix: str) -> str:
        return f"/v1.0/{self.project}{suffix}"

    def get(self, suffix: str) -> httpx.Response:
        return self.client.get(self.path(suffix))

    def create(self, body: dict[str, Any]) -> str:
        resp = self.client.post(self.path("/instances"), json={"instance": body})
        if resp.status_code != 200:
            raise BenchError(f"POST /instances answered {resp.status_code}: {resp.text[:300]}")
        instance_id: str = resp.json()["instance"]["id"]
        return instance_id

    def show(self, instance_id: str) -> dict[str, Any]:
        resp = self.get(f"/instances/{instance_id}")
        if resp.status_code != 200:
            raise BenchError(f"GET /instances/{instance_id} answered {resp.status_code}")
        shown: dict[str, Any] = resp.json()["instance"]
        return shown

    def delete(self, instance_id: str) -> None:
        resp = self.client.delete(self.path(f"/instances/{instance_id}"))
        if resp.status_code != 202:
            raise BenchError(
                f"DELETE /instances/{instance_id} answered {resp.status_code}: {resp.text[:300]}"
            )

    def close(self) -> None:
        self.client.close()


def private_address(shown: dict[str, Any]) -> str | None:
    """The instance's private address from a Trove instance view, once it has one."""
    for entry in shown.get("addresses") or []:
        if entry.get("type") == "private" and entry.get("address"):
            return str(entry["address"])
    ip = shown.get("ip") or []
    return str(ip[0]) if ip else None


@contextlib.contextmanager
def running_coffer(workspace: Workspace, **extra_env: str) -> Iterator[CofferProcess]:
    coffer = CofferProcess(workspace, **extra_env)
    try:
        coffer.start()
        yield coffer
    finally:
        coffer.stop()
