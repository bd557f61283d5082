"""The raw baselines: each engine provisioned by hand, and the real-client log-in checks.

A ``RawEngine`` does what a person would do at a shell: initialise a data directory, start the
server as the unprivileged engine user on an address of its own, and create one database and one
user through the admin socket; ``destroy`` stops it and removes its directory. The settings follow
what Coffer's guest plugins use where practical (for MariaDB the same option file keys and the
same flavor sizing, imported from the plugin), so the difference measured is Coffer's own work.

Passwords never reach a command line: SQL and ACL commands go over the admin socket through the
client libraries, and server-side secrets sit in 0600 files.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import signal
import subprocess
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import psycopg
import pymysql
import redis
from psycopg import sql
from redis.backoff import NoBackoff
from redis.retry import Retry

from bench.harness import BenchError, EngineUser, port_open

#: The flavor the benchmarks create (Coffer's ``d1.micro``): small instances, many per machine.
FLAVOR_ID = "6"
FLAVOR_RAM_MB = 256
FLAVOR_VCPUS = 1

#: How often a baseline polls for its own engine; Coffer's own polling is part of what it costs.
_RAW_POLL = 0.01
#: How often the benchmark tries to log in, for Coffer and the baselines alike.
LOGIN_POLL = 0.02


def find_binary(name: str) -> str | None:
    """``name`` on PATH, in the sbin directories, or in the newest PostgreSQL bin directory."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _require(name: str) -> str:
    binary = find_binary(name)
    if binary is None:
        raise BenchError(f"{name} is not installed; the raw baseline needs it.")
    return binary


def new_password() -> str:
    return secrets.token_urlsafe(18)


@dataclass(frozen=True)
class Credentials:
    """What a tenant asks for and then logs in with."""

    user: str
    password: str
    database: str | None

    @classmethod
    def fresh(cls, with_database: bool) -> Credentials:
        return cls("app", new_password(), "appdb" if with_database else None)

    def __repr__(self) -> str:
        return f"Credentials(user={self.user!r}, database={self.database!r})"


# -- log-in checks with the real clients ------------------------------------------------------


def try_login(manager: str, address: str, creds: Credentials | None) -> bool:
    """One log-in attempt at ``address`` on the engine's standard port; True on success.

    With ``creds`` None (an engine whose plugin creates no users) success means the server
    answers a request at all. Errors that mean "not there yet" return False.
    """
    try:
        if manager in ("mariadb", "mysql"):
            assert creds is not None
            conn = pymysql.connect(
                host=address,
                port=3306,
                user=creds.user,
                password=creds.password,
                database=creds.database,
                connect_timeout=2,
            )
            conn.close()
            return True
        if manager == "postgresql":
            assert creds is not None
            with psycopg.connect(
                host=address,
                port=5432,
                user=creds.user,
                password=creds.password,
                dbname=creds.database or "postgres",
                connect_timeout=2,
            ) as pg:
                pg.execute("SELECT 1")
            return True
        if manager == "redis":
            client = redis.Redis(
                host=address,
                port=6379,
                username=creds.user if creds else None,
                password=creds.password if creds else None,
                socket_connect_timeout=2,
                socket_timeout=2,
                # One attempt is one connection, as with the other clients: redis-py's default
                # retries a refused connection with backoff, for up to seconds per attempt.
                retry=Retry(NoBackoff(), 0),
            )
            try:
                if creds is None:
                    with contextlib.suppress(redis.AuthenticationError):
                        client.ping()
                    return True
                return bool(client.ping())
            finally:
                client.close()
    except (pymysql.Error, psycopg.Error, redis.RedisError, OSError):
        return False
    raise BenchError(f"no log-in check for datastore manager {manager!r}")


def wait_login(manager: str, address: str, creds: Credentials | None, deadline: float) -> None:
    """Try to log in every ``LOGIN_POLL`` seconds until it works or ``deadline`` passes."""
    while not try_login(manager, address, creds):
        if time.monotonic() > deadline:
            raise BenchError(f"could not log in to {manager} at {address} in time")
        time.sleep(LOGIN_POLL)


# -- raw engines --------------------------------------------------------------------------------


class RawEngine(ABC):
    """One engine provisioned by hand in ``root`` (owned by the engine user) at ``address``.

    ``provision`` returns once the database and user exist (or, with ``creds`` None, once the
    server answers); the caller then checks the log-in with ``wait_login`` like it does for
    Coffer. ``destroy`` stops the server (SIGTERM, waiting for it to exit) and removes ``root``;
    it is safe to call at any point, also after a failed ``provision``.
    """

    manager: ClassVar[str]
    port: ClassVar[int]
    label: ClassVar[str]

    def __init__(
        self,
        root: Path,
        address: str,
        user: EngineUser,
        ram_mb: int = FLAVOR_RAM_MB,
        vcpus: int = FLAVOR_VCPUS,
        volume_gb: int = 1,
    ) -> None:
        self.root = root
        self.address = address
        self.user = user
        #: The flavor this server is sized for, with the same sizing rules as Coffer's plugin.
        self.ram_mb = ram_mb
        self.vcpus = vcpus
        self.volume_gb = volume_gb
        self.process: subprocess.Popen[bytes] | None = None

    @abstractmethod
    def provision(self, creds: Credentials | None, deadline: float) -> None: ...

    def destroy(self, timeout: float = 30) -> None:
        proc = self.process
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.process = None
        shutil.rmtree(self.root, ignore_errors=True)

    @property
    def pid(self) -> int | None:
        return None if self.process is None or self.process.poll() is not None else self.process.pid

    def _dir(self, name: str, mode: int = 0o750) -> Path:
        path = self.root / name
        path.mkdir(mode=mode, exist_ok=True)
        path.chmod(mode)
        self.user.chown(path)
        return path

    def _write(self, path: Path, text: str, mode: int = 0o600) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        self.user.chown(path)

    def _run(self, argv: list[str], what: str) -> None:
        result = subprocess.run(
            argv,
            cwd=self.root,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            umask=0o027,
            **self.user.popen_identity(),
        )
        if result.returncode != 0:
            tail = " | ".join((result.stdout + result.stderr).strip().splitlines()[-5:])
            raise BenchError(f"{what} failed with exit code {result.returncode}: {tail}")

    def _spawn(self, argv: list[str]) -> None:
        with open(self.root / "console.log", "ab") as log:
            self.process = subprocess.Popen(
                argv,
                cwd=self.root,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                umask=0o027,
                **self.user.popen_identity(),
            )

    def _check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            log = self.root / "console.log"
            tail = log.read_text(errors="replace").splitlines()[-5:] if log.exists() else []
            raise BenchError(
                f"{self.label} exited with code {self.process.returncode}: {' | '.join(tail)}"
            )

    def _address_free(self) -> None:
        if port_open(self.address, self.port, timeout=0.2):
            raise BenchError(f"{self.address}:{self.port} is already taken; pick another block")


class RawMariaDB(RawEngine):
    """mariadb-install-db + mariadbd + CREATE DATABASE/USER over the socket as root."""

    manager = "mariadb"
    port = 3306
    label = "install-db + mariadbd + CREATE DB/USER"

    def _config(self) -> str:
        # The same option keys and flavor sizing as Coffer's MariaDB plugin (imported so they
        # cannot drift), minus the instance-specific paths.
        from coffer.datastores import mysql_rules
        from coffer.guest.datastores.mariadb import memory_settings

        run = self.root / "run"
        settings = {
            "datadir": str(self.root / "data"),
            "socket": str(run / "mysqld.sock"),
            "pid-file": str(run / "mariadbd.pid"),
            "bind-address": self.address,
            "port": str(self.port),
            "log-error": str(self.root / "log" / "error.log"),
            "tmpdir": str(run / "tmp"),
            "secure-file-priv": str(run / "files"),
            "local-infile": "0",
            "symbolic-links": "0",
            "skip-name-resolve": "1",
            "character-set-server": mysql_rules.DEFAULT_CHARACTER_SET,
            "collation-server": mysql_rules.CHARACTER_SETS[mysql_rules.DEFAULT_CHARACTER_SET],
            "performance-schema": "OFF",
            "table-open-cache": "400",
            "thread-cache-size": "8",
            **memory_settings(self.ram_mb, self.vcpus),
        }
        return "[mariadbd]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items())

    def provision(self, creds: Credentials | None, deadline: float) -> None:
        self._address_free()
        for name in ("data", "run", "log", "run/tmp", "run/files", "etc"):
            self._dir(name)
        config = self.root / "etc" / "my.cnf"
        self._write(config, self._config(), 0o640)
        self._run(
            [
                _require("mariadb-install-db"),
                f"--defaults-file={config}",
                "--skip-test-db",
                "--auth-root-authentication-method=socket",
                "--auth-root-socket-user=root",
            ],
            "mariadb-install-db",
        )
        self._spawn([_require("mariadbd"), f"--defaults-file={config}"])
        socket_path = str(self.root / "run" / "mysqld.sock")
        while True:
            self._check_alive()
            try:
                # root@localhost is unix_socket-authenticated: only the OS root gets in.
                conn = pymysql.connect(unix_socket=socket_path, user="root", autocommit=True)
                break
            except pymysql.Error:
                if time.monotonic() > deadline:
                    raise BenchError("mariadbd did not open its socket in time") from None
                time.sleep(_RAW_POLL)
        try:
            with conn.cursor() as cur:
                if creds is not None:
                    if creds.database:
                        cur.execute(f"CREATE DATABASE `{creds.database}`")
                    cur.execute(
                        f"CREATE USER '{creds.user}'@'%%' IDENTIFIED BY %s", (creds.password,)
                    )
                    if creds.database:
                        cur.execute(f"GRANT ALL ON `{creds.database}`.* TO '{creds.user}'@'%'")
        finally:
            conn.close()


class RawPostgreSQL(RawEngine):
    """initdb + postgres + CREATE ROLE/DATABASE over the socket as the superuser."""

    manager = "postgresql"
    port = 5432
    label = "initdb + postgres + CREATE ROLE/DATABASE"

    def _memory_settings(self) -> dict[str, str]:
        # The flavor sizing of Coffer's plugin, so both servers are the same size.
        try:
            from coffer.guest.datastores.postgresql import memory_settings
        except ImportError:
            return {"shared_buffers": f"{self.ram_mb // 4}MB"}
        return memory_settings(self.ram_mb, self.vcpus, self.volume_gb)

    def provision(self, creds: Credentials | None, deadline: float) -> None:
        self._address_free()
        data = self._dir("data", 0o700)
        run = self._dir("run")
        self._run(
            [
                _require("initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-instructions",
            ],
            "initdb",
        )
        # initdb allows TCP from 127.0.0.1 only; the instance's own address is elsewhere in
        # 127.0.0.0/8. The socket directory is private to the engine user (and root).
        self._write(
            data / "pg_hba.conf",
            "local all all trust\nhost all all 127.0.0.0/8 scram-sha-256\n",
        )
        settings = {
            "listen_addresses": self.address,
            "port": str(self.port),
            "unix_socket_directories": str(run),
            "unix_socket_permissions": "0700",
            "password_encryption": "scram-sha-256",
            "ssl": "off",
            "huge_pages": "off",
            "max_logical_replication_workers": "0",
            "logging_collector": "off",
            **self._memory_settings(),
        }
        argv = [_require("postgres"), "-D", str(data)]
        for key, value in settings.items():
            argv += ["-c", f"{key}={value}"]
        self._spawn(argv)
        while True:
            self._check_alive()
            try:
                conn = psycopg.connect(
                    host=str(run),
                    port=self.port,
                    user="postgres",
                    dbname="postgres",
                    autocommit=True,
                )
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise BenchError("postgres did not open its socket in time") from None
                time.sleep(_RAW_POLL)
        with conn:
            if creds is not None:
                conn.execute(
                    sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                        sql.Identifier(creds.user), sql.Literal(creds.password)
                    )
                )
                if creds.database:
                    conn.execute(
                        sql.SQL("CREATE DATABASE {} OWNER {}").format(
                            sql.Identifier(creds.database), sql.Identifier(creds.user)
                        )
                    )


class RawRedis(RawEngine):
    """redis-server + ACL SETUSER over the socket with the admin password."""

    manager = "redis"
    port = 6379
    label = "redis-server + ACL SETUSER"

    def _memory_settings(self) -> dict[str, str]:
        try:
            from coffer.guest.datastores.redis import memory_settings
        except ImportError:
            return {"maxmemory": f"{self.ram_mb * 3 // 4}mb"}
        return memory_settings(self.ram_mb)

    def provision(self, creds: Credentials | None, deadline: float) -> None:
        self._address_free()
        data = self._dir("data")
        run = self._dir("run")
        admin_password = new_password()
        config = self.root / "redis.conf"
        sock = run / "redis.sock"
        self._write(
            config,
            "\n".join(
                [
                    f"bind {self.address}",
                    f"port {self.port}",
                    f"unixsocket {sock}",
                    "unixsocketperm 700",
                    f"dir {data}",
                    "daemonize no",
                    # Persistence as Coffer's plugin sets it up: AOF every second plus RDB.
                    "appendonly yes",
                    "appendfsync everysec",
                    "aof-use-rdb-preamble yes",
                    "save 3600 1 300 100 60 10000",
                    *(f"{key} {value}" for key, value in self._memory_settings().items()),
                    f"requirepass {admin_password}",
                    "",
                ]
            ),
        )
        self._spawn([_require("redis-server"), str(config)])
        admin = redis.Redis(unix_socket_path=str(sock), password=admin_password)
        try:
            while True:
                self._check_alive()
                try:
                    admin.ping()
                    break
                except (redis.ConnectionError, OSError):
                    if time.monotonic() > deadline:
                        raise BenchError("redis-server did not open its socket in time") from None
                    time.sleep(_RAW_POLL)
            if creds is not None:
                admin.acl_setuser(
                    creds.user,
                    enabled=True,
                    passwords=[f"+{creds.password}"],
                    keys=["*"],
                    channels=["*"],
                    commands=["+@all"],
                )
        finally:
            admin.close()


RAW_ENGINES: dict[str, type[RawEngine]] = {
    "mariadb": RawMariaDB,
    "mysql": RawMariaDB,
    "postgresql": RawPostgreSQL,
    "redis": RawRedis,
}
