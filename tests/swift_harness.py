"""Run a real all-in-one OpenStack Swift, from Debian's packages, for integration tests.

``running_swift()`` builds a one-replica cluster in a fresh directory under /tmp the way the
Swift "all in one" guide does: a ``swift.conf`` with a random hash prefix and suffix, account,
container and object rings made with ``swift-ring-builder`` (one device each, a plain directory:
no real disk, so the file system must support extended attributes, as ext4 does), and one
process each for the account, container, object and proxy servers, plus a private memcached
that tempauth keeps its tokens in. The proxy serves the native Swift API with tempauth (v1
auth) and the S3 API through the s3api middleware; both use one generated account and key.

Every process gets its own free loopback port and runs in the foreground (``workers = 0``), so
each is one PID that is stopped, SIGTERM then SIGKILL, when the context exits, even on failure.
As root, the servers drop to the given unprivileged user (the same one that runs engines).

The servers read a hermetic ``swift.conf``: Swift's servers always read
``/etc/swift/swift.conf`` unless ``swift.common.utils.set_swift_dir`` is called before its
modules load, so each server starts through a few lines that do exactly that and then call the
same ``run_wsgi`` as Debian's ``swift-*-server`` scripts.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from coffer_harness import free_port

_START_TIMEOUT = 40.0
SERVERS = ("account", "container", "object", "proxy")

# The argv holds only paths: the key is in the proxy's config file (mode 0600).
_LAUNCHER = """\
import sys

from swift.common import utils

utils.set_swift_dir(sys.argv[1])
from swift.common.wsgi import run_wsgi  # noqa: E402

kwargs = {}
if sys.argv[2] == "object-server":
    from swift.obj import server

    kwargs["global_conf_callback"] = server.global_conf_callback
sys.exit(run_wsgi(sys.argv[3], sys.argv[2], verbose=True, **kwargs))
"""

_SWIFT_CONF = """\
[swift-hash]
swift_hash_path_prefix = {prefix}
swift_hash_path_suffix = {suffix}

[storage-policy:0]
name = Policy-0
default = yes
"""

# Shared by the account, container and object servers.
_BACKEND_CONF = """\
[DEFAULT]
bind_ip = 127.0.0.1
bind_port = {port}
workers = 0
user = {user}
swift_dir = {etc}
devices = {devices}
mount_check = false
disable_fallocate = true
log_name = {server}-server
log_udp_host = 127.0.0.1
log_udp_port = {log_port}

[pipeline:main]
pipeline = {server}-server

[app:{server}-server]
use = egg:swift#{server}
"""

_PROXY_CONF = """\
[DEFAULT]
bind_ip = 127.0.0.1
bind_port = {port}
workers = 0
user = {user}
swift_dir = {etc}
log_name = proxy-server
log_udp_host = 127.0.0.1
log_udp_port = {log_port}

[pipeline:main]
pipeline = catch_errors gatekeeper healthcheck proxy-logging cache listing_formats
    s3api tempauth copy slo dlo proxy-logging proxy-server

[app:proxy-server]
use = egg:swift#proxy
account_autocreate = true

[filter:catch_errors]
use = egg:swift#catch_errors

[filter:gatekeeper]
use = egg:swift#gatekeeper

[filter:healthcheck]
use = egg:swift#healthcheck

[filter:proxy-logging]
use = egg:swift#proxy_logging

[filter:cache]
use = egg:swift#memcache
memcache_servers = 127.0.0.1:{memcached_port}

[filter:listing_formats]
use = egg:swift#listing_formats

[filter:s3api]
use = egg:swift#s3api
location = {region}

[filter:tempauth]
use = egg:swift#tempauth
user_{account}_{user_name} = {key} .admin

[filter:copy]
use = egg:swift#copy

[filter:slo]
use = egg:swift#slo

[filter:dlo]
use = egg:swift#dlo
"""


@dataclass
class Swift:
    """A running Swift: where to reach it and the one account's credentials."""

    base: Path
    proxy_port: int
    account: str
    user_name: str
    key: str = field(repr=False)
    region: str = "us-east-1"
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)

    @property
    def proxy_url(self) -> str:
        """The proxy's base URL; also the S3 endpoint."""
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def auth_url(self) -> str:
        """The tempauth (v1) endpoint."""
        return f"{self.proxy_url}/auth/v1.0"

    @property
    def user(self) -> str:
        """The v1 user name, ``account:user``; also the S3 access key id."""
        return f"{self.account}:{self.user_name}"

    def log(self, server: str) -> str:
        """What ``server`` wrote to its console (Swift's verbose log)."""
        path = self.base / "log" / f"{server}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def device_files(self) -> list[Path]:
        """Every file on the object device: what a storage test left behind, if anything."""
        return [p for p in (self.base / "devices").rglob("*.data") if p.is_file()]


def _swift_python() -> str:
    """The interpreter Debian's Swift is installed for (its scripts' shebang)."""
    script = shutil.which("swift-proxy-server") or "/usr/bin/swift-proxy-server"
    try:
        first = Path(script).read_text().splitlines()[0]
    except OSError as exc:
        raise RuntimeError(
            "OpenStack Swift is not installed: run scripts/setup --test (Debian packages "
            "swift-proxy, swift-account, swift-container, swift-object, memcached)"
        ) from exc
    return first.removeprefix("#!").strip().split()[0]


_RING_BUILDER = """\
import sys

from swift.cli.ringbuilder import main

for argv in sys.argv[1:]:
    try:
        main(["swift-ring-builder", *argv.split()])
    except SystemExit as exc:
        # swift-ring-builder exits 1 for warnings, 2 for errors.
        if exc.code not in (0, 1, None):
            sys.exit(f"swift-ring-builder {argv} failed with {exc.code}")
"""


def _build_rings(python: str, etc: Path, ports: dict[str, int]) -> None:
    """One ring per server kind, one device each, made by Swift's ring builder.

    The nine ``swift-ring-builder`` commands run in one interpreter (the script's own ``main``
    with the same arguments): started one by one they cost a second or more each on a busy
    two-core machine.
    """
    commands = []
    for kind in ("account", "container", "object"):
        builder = etc / f"{kind}.builder"
        commands += [
            f"{builder} create 6 1 0",  # 64 partitions, one replica: a single device
            f"{builder} add r1z1-127.0.0.1:{ports[kind]}/d1 100",
            f"{builder} rebalance",
        ]
    done = subprocess.run(
        [python, "-c", _RING_BUILDER, *commands],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"building Swift's rings failed:\n{done.stdout}{done.stderr}")


def _as_user(user: str) -> dict[str, Any]:
    """Popen arguments that run a server as ``user`` when we are root (Swift's own privilege
    drop happens only in forked workers, and these run in the foreground)."""
    if os.geteuid() != 0:
        return {}
    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _stop(procs: dict[str, subprocess.Popen[bytes]], grace: float = 5.0) -> None:
    for proc in procs.values():
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs.values():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _wait_ready(swift: Swift) -> None:
    """Until an authenticated request goes through proxy, account server and memcached."""
    deadline = time.monotonic() + _START_TIMEOUT
    last = "no answer yet"
    while time.monotonic() < deadline:
        for name, proc in swift.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(
                    f"Swift's {name} exited with {proc.returncode} while starting:\n"
                    f"{swift.log(name)[-3000:]}"
                )
        try:
            auth = httpx.get(
                swift.auth_url,
                headers={"X-Auth-User": swift.user, "X-Auth-Key": swift.key},
                timeout=2,
            )
            if auth.status_code == 200:
                account = httpx.head(
                    auth.headers["X-Storage-Url"],
                    headers={"X-Auth-Token": auth.headers["X-Auth-Token"]},
                    timeout=2,
                )
                if account.status_code in (200, 204):
                    return
                last = f"account HEAD answered {account.status_code}"
            else:
                last = f"auth answered {auth.status_code}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(0.1)
    raise RuntimeError(
        f"Swift did not become ready in {_START_TIMEOUT:.0f} s ({last}); proxy log:\n"
        f"{swift.log('proxy')[-3000:]}"
    )


@contextlib.contextmanager
def running_swift(user: str) -> Iterator[Swift]:
    """A fresh all-in-one Swift whose servers run as ``user``; stopped and removed on exit."""
    python = _swift_python()
    memcached = shutil.which("memcached") or "/usr/bin/memcached"
    if not Path(memcached).exists():
        raise RuntimeError("memcached is not installed: run scripts/setup --test")
    base = Path(tempfile.mkdtemp(prefix="coffer-swift-"))
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        etc, devices, logs = base / "etc", base / "devices", base / "log"
        for directory in (etc, devices / "d1", logs):
            directory.mkdir(parents=True)
        ports = {name: free_port() for name in (*SERVERS, "memcached", "log")}
        swift = Swift(
            base=base,
            proxy_port=ports["proxy"],
            account="coffer",
            user_name="tester",
            key=secrets.token_urlsafe(24),
            procs=procs,
        )
        (etc / "swift.conf").write_text(
            _SWIFT_CONF.format(prefix=secrets.token_hex(8), suffix=secrets.token_hex(8))
        )
        common = {"user": user, "etc": etc, "log_port": ports["log"]}
        for server in ("account", "container", "object"):
            (etc / f"{server}-server.conf").write_text(
                _BACKEND_CONF.format(server=server, port=ports[server], devices=devices, **common)
            )
        (etc / "proxy-server.conf").write_text(
            _PROXY_CONF.format(
                port=ports["proxy"],
                memcached_port=ports["memcached"],
                region=swift.region,
                account=swift.account,
                user_name=swift.user_name,
                key=swift.key,
                **common,
            )
        )
        _build_rings(python, etc, ports)
        (etc / "proxy-server.conf").chmod(0o600)
        if os.geteuid() == 0:
            # The servers drop to ``user`` before they read configs or write objects.
            entry = pwd.getpwnam(user)
            for path in [base, *base.rglob("*")]:
                os.chown(path, entry.pw_uid, entry.pw_gid)

        as_user = _as_user(user)
        memcached_argv = [memcached, "-l", "127.0.0.1", "-p", str(ports["memcached"])]
        memcached_argv += ["-U", "0", "-m", "16"]
        with open(logs / "memcached.log", "wb") as out:
            procs["memcached"] = subprocess.Popen(
                memcached_argv, stdout=out, stderr=subprocess.STDOUT, **as_user
            )
        for server in SERVERS:
            with open(logs / f"{server}.log", "wb") as out:
                procs[server] = subprocess.Popen(
                    [
                        python,
                        "-c",
                        _LAUNCHER,
                        str(etc),
                        f"{server}-server",
                        str(etc / f"{server}-server.conf"),
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    cwd=base,
                    **as_user,
                )
        _wait_ready(swift)
        yield swift
    finally:
        _stop(procs)
        shutil.rmtree(base, ignore_errors=True)
