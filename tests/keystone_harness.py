"""Run a real OpenStack Keystone, installed from PyPI, for integration tests.

Keystone pins many libraries of its own, so it lives in a virtualenv of its own, never in
Coffer's. Building that virtualenv takes a minute on a fresh machine, so it is cached under
``$COFFER_TEST_CACHE`` (default ``/var/cache/coffer-tests``, or ``~/.cache/coffer-tests`` when that
is not writable) in a directory named after the Keystone version and a hash of everything
installed into it: a changed pin builds a new one, an unchanged one is reused. A half-built
virtualenv is never used (it is marked complete only after pip succeeded) and builds are
serialised with a lock file.

``running_keystone()`` then sets up a fresh Keystone the way a deployer does (SQLite database,
``keystone-manage db_sync``, ``fernet_setup``, ``credential_setup``, ``bootstrap``), serves its
WSGI application with gunicorn on a free loopback port, and stops it by PID at the end.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import hashlib
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from coffer_harness import free_port, kill_all_under, processes_under

#: Keystone 30 (OpenStack 2026.x) installs and runs on Python 3.11.
KEYSTONE_VERSION = "30.0.0"
GUNICORN_VERSION = "27.0.1"

# Every package the Keystone virtualenv gets, pinned to a set known to work together (what pip
# resolved for the two requirements above); the OpenStack upper-constraints in miniature.
_CONSTRAINTS = """
alembic==1.20.1 amqp==5.4.2 aniso8601==10.0.1 attrs==26.1.0 bcrypt==5.0.0 blinker==1.9.0
cachetools==8.0.1 certifi==2026.10.18 cffi==2.1.1 charset-normalizer==3.5.2 click==8.5.1
cryptography==50.0.2 debtcollector==3.1.0 decorator==5.3.1 defusedxml==0.7.1 dnspython==2.9.2
dogpile.cache==1.5.0 elementpath==4.8.0 eventlet==0.41.3 fasteners==0.20 Flask==3.1.3
Flask-RESTful==0.3.10 futurist==3.5.0 greenlet==3.5.6 gunicorn==27.0.1 idna==3.20
iso8601==2.1.0 itsdangerous==2.2.0 Jinja2==3.1.6 jsonschema==4.26.0
jsonschema-specifications==2025.9.1 keystone==30.0.0 keystoneauth1==5.18.1
keystonemiddleware==13.0.1 kombu==5.7.0 Mako==1.4.3 MarkupSafe==3.0.4 msgpack==1.2.4
netaddr==1.3.0 oauthlib==4.0.1 os-service-types==1.9.0 oslo.cache==4.3.0 oslo.concurrency==7.6.1
oslo.config==10.7.0 oslo.context==6.5.0 oslo.db==18.1.1 oslo.i18n==6.9.0 oslo.log==8.3.2
oslo.messaging==18.3.1 oslo.metrics==0.17.0 oslo.middleware==8.2.0 oslo.policy==6.0.1
oslo.serialization==5.11.0 oslo.service==4.8.0 oslo.upgradecheck==2.8.0 oslo.utils==10.2.0
osprofiler==4.4.0 packaging==26.3 Paste==3.10.1 PasteDeploy==3.1.0 pbr==7.1.3
prettytable==3.18.0 prometheus_client==0.26.0 psutil==7.2.2 pycadf==4.1.0 pycparser==3.12
PyJWT==2.15.1 pyOpenSSL==26.4.0 pyparsing==3.3.3 pysaml2==7.5.5 python-dateutil==4.0.0
python-keystoneclient==6.0.0 pytz==2026.6 PyYAML==6.0.3 referencing==0.37.0 repoze-lru==0.8
requests==2.34.2 rfc3986==2.0.0 Routes==2.5.1 rpds-py==2026.9.1 six==1.17.0 SQLAlchemy==2.1.9
statsd==4.0.1 stevedore==5.10.0 testresources==2.1.2 testscenarios==0.7.0
typing_extensions==4.16.0 tzdata==2026.6 urllib3==2.8.0 vine==5.1.0 wcwidth==0.9.4
WebOb==1.8.11 Werkzeug==3.1.9 wrapt==2.5.2 xmlschema==2.5.1 yappi==1.7.6
"""
_REQUIREMENTS = (f"keystone=={KEYSTONE_VERSION}", f"gunicorn=={GUNICORN_VERSION}")

# keystone reads its command line with oslo.config when the application is built, and gunicorn's
# arguments are not keystone's: hide them before keystone looks.
_WSGI_MODULE = """\
import sys

sys.argv = sys.argv[:1]

from keystone.server import wsgi  # noqa: E402

application = wsgi.initialize_public_application()
"""

_KEYSTONE_CONF = """\
[DEFAULT]
log_file = {state}/keystone.log

[database]
connection = sqlite:///{state}/keystone.db

[fernet_tokens]
key_repository = {state}/fernet-keys

[credential]
key_repository = {state}/credential-keys

[token]
provider = fernet

[identity]
# The minimum bcrypt cost: tests authenticate often and protect nothing.
password_hash_rounds = 4
"""

_BUILD_TIMEOUT = 900
_START_TIMEOUT = 90
REGION = "RegionOne"


def cache_root() -> Path:
    """Where built virtualenvs are kept between runs."""
    configured = os.environ.get("COFFER_TEST_CACHE")
    candidates = [Path(configured)] if configured else []
    candidates += [Path("/var/cache/coffer-tests"), Path.home() / ".cache" / "coffer-tests"]
    for candidate in candidates:
        try:
            candidate.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(candidate, os.W_OK | os.X_OK):
            return candidate
    raise RuntimeError(f"none of {', '.join(map(str, candidates))} is a writable cache directory")


def _venv_key() -> str:
    recipe = "\n".join(
        [sys.version.split()[0], *_REQUIREMENTS, *sorted(_CONSTRAINTS.split())]
    ).encode()
    return hashlib.sha256(recipe).hexdigest()[:12]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def keystone_venv() -> Path:
    """The cached Keystone virtualenv, built first if missing or incomplete."""
    root = cache_root()
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    venv = root / f"keystone-{KEYSTONE_VERSION}-{py}-{_venv_key()}"
    marker = venv / ".complete"
    with _locked(root / ".keystone-venv.lock"):
        if marker.exists():
            return venv
        shutil.rmtree(venv, ignore_errors=True)
        # The base interpreter, not Coffer's virtualenv: the new one must not see Coffer's
        # packages.
        subprocess.run(
            [sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, text=True
        )
        constraints = venv / "constraints.txt"
        constraints.write_text("\n".join(_CONSTRAINTS.split()) + "\n")
        log = venv / "pip.log"
        with open(log, "w") as out:
            proc = subprocess.run(
                [
                    str(venv / "bin" / "pip"),
                    "install",
                    "--disable-pip-version-check",
                    "--no-input",
                    "-c",
                    str(constraints),
                    *_REQUIREMENTS,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=_BUILD_TIMEOUT,
                check=False,
            )
        if proc.returncode != 0:
            tail = log.read_text(errors="replace")[-4000:]
            shutil.rmtree(venv, ignore_errors=True)
            raise RuntimeError(f"installing Keystone {KEYSTONE_VERSION} failed:\n{tail}")
        marker.write_text(f"{' '.join(_REQUIREMENTS)}\n")
        return venv


@dataclass
class Keystone:
    """A running Keystone: its URL, its bootstrap admin, and a small admin client for setup."""

    port: int
    state_dir: Path
    admin_password: str
    proc: subprocess.Popen[bytes] | None = None
    _admin_token: str | None = field(default=None, repr=False)
    _role_ids: dict[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Keystone(url={self.url!r})"

    @property
    def url(self) -> str:
        """The v3 endpoint: ``http://127.0.0.1:<port>/v3``."""
        return f"http://127.0.0.1:{self.port}/v3"

    def requests_seen(self, method: str, path: str) -> int:
        """How many ``method path`` requests (query string ignored) Keystone has answered."""
        log = self.state_dir / "access.log"
        if not log.exists():
            return 0
        needle = f'"{method} {path}'
        return sum(
            1
            for line in log.read_text(errors="replace").splitlines()
            if needle + " " in line or needle + "?" in line
        )

    def log(self) -> str:
        parts = []
        for name in ("gunicorn.log", "keystone.log"):
            path = self.state_dir / name
            if path.exists():
                parts.append(f"--- {name}\n{path.read_text(errors='replace')[-6000:]}")
        return "\n".join(parts)

    # -- tokens -----------------------------------------------------------------------------

    def token(self, user: str, password: str, project: str) -> tuple[str, str]:
        """(token, project id) for ``user`` scoped to ``project`` (both in domain Default)."""
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
        resp = httpx.post(f"{self.url}/auth/tokens?nocatalog", json=body, timeout=30)
        if resp.status_code != 201:
            raise AssertionError(f"Keystone refused a token for {user}: {resp.text}")
        return resp.headers["X-Subject-Token"], resp.json()["token"]["project"]["id"]

    def revoke(self, token: str) -> None:
        self.call("DELETE", "/auth/tokens", headers={"X-Subject-Token": token})

    def admin_token(self) -> str:
        if self._admin_token is None:
            self._admin_token, _ = self.token("admin", self.admin_password, "admin")
        return self._admin_token

    # -- administration (as the bootstrap admin) ---------------------------------------------

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        headers = {"X-Auth-Token": self.admin_token(), **kwargs.pop("headers", {})}
        resp = httpx.request(method, self.url + path, headers=headers, timeout=30, **kwargs)
        if resp.status_code >= 400:
            raise AssertionError(f"Keystone {method} {path}: {resp.status_code} {resp.text}")
        return resp.json() if resp.content else None

    def role_id(self, name: str) -> str:
        if not self._role_ids:
            roles = self.call("GET", "/roles")["roles"]
            self._role_ids = {role["name"]: role["id"] for role in roles}
        return self._role_ids[name]

    def create_project(self, name: str) -> str:
        body = {"project": {"name": name, "domain_id": "default", "enabled": True}}
        project_id: str = self.call("POST", "/projects", json=body)["project"]["id"]
        return project_id

    def create_user(self, name: str, password: str, project_id: str, role: str) -> str:
        body = {
            "user": {
                "name": name,
                "password": password,
                "domain_id": "default",
                "default_project_id": project_id,
                "enabled": True,
            }
        }
        user_id: str = self.call("POST", "/users", json=body)["user"]["id"]
        self.call("PUT", f"/projects/{project_id}/users/{user_id}/roles/{self.role_id(role)}")
        return user_id

    def register_service(self, kind: str, name: str, url: str) -> str:
        """Create service ``name`` of type ``kind`` with public/internal/admin endpoints at
        ``url`` (which may hold ``%(tenant_id)s``); returns the service id."""
        body = {"service": {"type": kind, "name": name, "enabled": True}}
        service_id: str = self.call("POST", "/services", json=body)["service"]["id"]
        for interface in ("public", "internal", "admin"):
            endpoint = {
                "service_id": service_id,
                "interface": interface,
                "url": url,
                "region_id": REGION,
                "enabled": True,
            }
            self.call("POST", "/endpoints", json={"endpoint": endpoint})
        return service_id

    # -- lifecycle --------------------------------------------------------------------------

    def stop(self, timeout: float = 15) -> None:
        """Stop gunicorn (master, then any worker left) by PID."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        kill_all_under(self.state_dir)


def _keystone_manage(venv: Path, conf: Path, *args: str, env: dict[str, str]) -> None:
    proc = subprocess.run(
        [str(venv / "bin" / "keystone-manage"), "--config-file", str(conf), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"keystone-manage {args[0]} failed:\n{proc.stderr[-4000:]}")


def _setup(keystone: Keystone, venv: Path, env: dict[str, str]) -> None:
    state = keystone.state_dir
    conf = state / "keystone.conf"
    conf.write_text(_KEYSTONE_CONF.format(state=state))
    (state / "coffer_keystone_wsgi.py").write_text(_WSGI_MODULE)
    # Keystone insists on owning its key repositories; the owner is whoever runs it here.
    user = pwd.getpwuid(os.geteuid()).pw_name
    group = grp.getgrgid(os.getegid()).gr_name
    owner = ("--keystone-user", user, "--keystone-group", group)
    _keystone_manage(venv, conf, "db_sync", env=env)
    _keystone_manage(venv, conf, "fernet_setup", *owner, env=env)
    _keystone_manage(venv, conf, "credential_setup", *owner, env=env)
    _keystone_manage(
        venv,
        conf,
        "bootstrap",
        "--bootstrap-admin-url",
        keystone.url,
        "--bootstrap-internal-url",
        keystone.url,
        "--bootstrap-public-url",
        keystone.url,
        "--bootstrap-region-id",
        REGION,
        # The password comes from OS_BOOTSTRAP_PASSWORD: never on a command line.
        env={**env, "OS_BOOTSTRAP_PASSWORD": keystone.admin_password},
    )


def _serve(keystone: Keystone, venv: Path, env: dict[str, str]) -> None:
    state = keystone.state_dir
    log = open(state / "gunicorn.log", "ab")  # noqa: SIM115 - lives as long as the server
    keystone.proc = subprocess.Popen(
        [
            str(venv / "bin" / "gunicorn"),
            "--no-control-socket",
            "--chdir",
            str(state),
            "--bind",
            f"127.0.0.1:{keystone.port}",
            "--workers",
            "1",
            "--threads",
            "4",
            "--timeout",
            "120",
            "--access-logfile",
            str(state / "access.log"),
            "coffer_keystone_wsgi:application",
        ],
        env={**env, "OS_KEYSTONE_CONFIG_FILES": str(state / "keystone.conf")},
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    log.close()
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if keystone.proc.poll() is not None:
            raise RuntimeError(f"Keystone exited at start:\n{keystone.log()}")
        try:
            if httpx.get(keystone.url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"Keystone did not answer in {_START_TIMEOUT}s:\n{keystone.log()}")


@contextlib.contextmanager
def running_keystone() -> Iterator[Keystone]:
    """A freshly bootstrapped Keystone on a free loopback port, stopped (by PID) on exit.

    The bootstrap admin is user ``admin`` (role ``admin`` on project ``admin``) with a random
    password (``keystone.admin_password``); the roles ``admin``, ``manager``, ``member``,
    ``reader`` and ``service`` exist, and the identity endpoints are registered in ``RegionOne``.
    """
    venv = keystone_venv()
    state = Path(tempfile.mkdtemp(prefix="keystone-test-", dir="/tmp"))
    keystone = Keystone(port=free_port(), state_dir=state, admin_password=secrets.token_urlsafe(16))
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("OS_", "COFFER_", "PYTHON", "VIRTUAL_ENV"))
    }
    env["HOME"] = str(state)
    try:
        _setup(keystone, venv, env)
        _serve(keystone, venv, env)
        yield keystone
    finally:
        keystone.stop()
        leftover = processes_under(state)
        shutil.rmtree(state, ignore_errors=True)
        assert not leftover, f"Keystone processes left running: {leftover}"
