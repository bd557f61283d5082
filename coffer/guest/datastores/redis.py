"""The Redis datastore: runs one ``redis-server`` for an instance and manages its ACL users.

How the engine is laid out in the instance's volume (``InstanceLayout``)::

    etc/redis.conf          written by Coffer at every start from the flavor (edits are lost)
    etc/users.acl           the ACL users; Redis rewrites it on every change Coffer makes
    data/                   ``dir``: appendonlydir/ (the AOF) and dump.rdb (snapshots)
    run/redis.sock          the agent's only way in (as ``os_admin`` with a password), mode 0700
    run/redis-server.pid    the engine's pid, for adoption after an agent restart
    log/redis.log           the engine's log
    secrets/os_admin.password

Choices, and why:

* **Persistence: AOF and RDB both on.** ``appendonly yes`` with ``appendfsync everysec`` loses at
  most about a second of writes when the host crashes, at a cost a database can carry (fsync on
  every write would make each write wait for the disk; ``no`` leaves it to the kernel, ~30 s).
  RDB snapshots (Redis's default save points: an hour after 1 change, 5 minutes after 100, a
  minute after 10,000) stay on as a second copy. At start Redis loads the AOF, which is the more
  complete of the two; the AOF's base file uses the RDB format, so loading is fast. Backups,
  full and incremental, are taken from the AOF (``coffer.guest.backup.redis``); Redis's own
  automatic AOF rewrites stay on (each one makes the next incremental backup self-contained).
* **Memory: ``maxmemory`` is 75% of the flavor's RAM** (256 MB -> 192 MB), leaving room for the
  server's own buffers and for the copy-on-write pages of a background save or AOF rewrite.
  The policy is ``noeviction``: this is a database, so a full instance refuses writes with an
  ``OOM`` error rather than silently dropping a tenant's keys.
* **Users are ACL users** (Redis 6+). Each Coffer user gets ``on >password ~* &* +@all -@admin
  -@dangerous`` plus back ``flushdb flushall keys sort sort_ro info swapdb``: every data command
  on every key and channel in every numbered keyspace, scripting and transactions, but no
  server administration (CONFIG, ACL other than WHOAMI/CAT/GENPASS, SHUTDOWN, DEBUG, MODULE,
  MONITOR, CLIENT KILL/LIST, SAVE, replication, MIGRATE, RESTORE). Redis keeps only SHA-256
  hashes of passwords in ``users.acl``. A user has no host (Redis cannot restrict by client
  address) and no databases (see ``redis_rules``).
* **Root is the built-in ``default`` user.** It is off, with no password, until root is
  enabled (it keeps every command: see ``DISABLED_ROOT_RULES``); enabling sets its password
  and turns it on; disabling turns it off again and closes its connections. Even root cannot
  change ``dir``/``dbfilename`` or use DEBUG and MODULE: the config disables them
  (``enable-protected-configs``, ``enable-debug-command``, ``enable-module-command``), because
  they would let it write files as the engine's OS user, which other instances share.
* **The agent's admin ``os_admin``** has every command. Its password is generated once per
  instance (``secrets/os_admin.password``, 0600) and its line in ``users.acl`` is written again
  at every start, so a lost or changed admin account (root can edit ACLs) and a volume copied
  from another instance are repaired by a restart. The password is never on a command line.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import os
import re
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from coffer.datastores import redis_rules as rules
from coffer.errors import CofferError, EngineError, UserAlreadyExists, UserNotFound, ValidationError
from coffer.guest.backup.base import EngineAccess
from coffer.guest.backup.redis import RedisBackup
from coffer.guest.config.logs import LogSource, read_switches
from coffer.guest.config.redis import RedisOverrides
from coffer.guest.datastores.base import (
    Capability,
    Datastore,
    EngineSpec,
    EngineUnavailable,
    paginate,
)
from coffer.guest.datastores.process import (
    EngineProcess,
    engine_status,
    os_user_name,
    resolve_run_as,
)
from coffer.guest.layout import write_private_file
from coffer.status import ServiceStatus

LOG = logging.getLogger(__name__)

ADMIN_USER = "os_admin"
#: The Redis user that is Coffer's root.
ROOT_USER = "default"

#: What a Coffer user may do: all data commands, no server administration. Rules after
#: ``-@dangerous`` give back dangerous-flagged commands that only touch the tenant's own data.
TENANT_RULES = (
    "~*",
    "&*",
    "+@all",
    "-@admin",
    "-@dangerous",
    "+flushdb",
    "+flushall",
    "+keys",
    "+sort",
    "+sort_ro",
    "+info",
    "+swapdb",
)
#: Root and the agent's admin: every command (the config still disables DEBUG, MODULE and the
#: protected configs).
SUPERUSER_RULES = ("~*", "&*", "+@all")
#: The ``default`` user while root is disabled: off and without a password, so no client can
#: log in as it (a client that does not AUTH gets NOAUTH). It keeps every command and key anyway:
#: Redis 7.0 replays the AOF as ``default``, and its EXEC checks the queued commands against
#: that user's rules, so with ``-@all`` every MULTI/EXEC in the AOF (transactions, scripts) was
#: silently dropped at each start (redis/redis#14541, fixed after 7.0).
DISABLED_ROOT_RULES = ("off", "resetpass", "~*", "&*", "+@all")

# sockaddr_un holds 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107
# Characters that would need quoting in redis.conf; instance roots never need them.
_UNSAFE_PATH = re.compile(r"[\s#'\"\\]")
_VERSION = re.compile(r"\bv=(\d+\.\d+\.\d+)")


def _no_client_setinfo() -> dict[str, Any]:
    """Options that keep redis-py from announcing itself on each new connection (CLIENT
    SETINFO: two more round trips, and a look-up of its own version in the installed
    packages' metadata). The agent's admin connections are short (each admin call opens one;
    status checks and readiness polls share a kept one that reconnects after every failure),
    so they skip it; the option's name depends on the redis-py version."""
    params = inspect.signature(redis.Redis.__init__).parameters
    if "driver_info" in params:
        return {"driver_info": None}
    if "lib_name" in params:
        return {"lib_name": None, "lib_version": None}
    return {}


_NO_CLIENT_SETINFO = _no_client_setinfo()


def _find_binary(name: str) -> str | None:
    # /usr/sbin is often missing from an unprivileged user's PATH.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")


def memory_settings(memory_mb: int) -> dict[str, str]:
    """Engine sizing for a flavor: ``maxmemory`` = 75% of its RAM, ``noeviction`` when full."""
    return {"maxmemory": f"{memory_mb * 3 // 4}mb", "maxmemory-policy": "noeviction"}


#: Redis's built-in slow log threshold (microseconds).
_SLOWLOG_DEFAULT_US = 10000


def _slowlog_word(arg: str) -> str:
    """One argument of a slow log entry, quoted when it holds blanks or is empty."""
    if arg and not any(ch.isspace() for ch in arg) and '"' not in arg:
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def password_hash(password: str) -> str:
    """The ``#<sha256 hex>`` form Redis stores a password in and accepts in ACL rules."""
    return "#" + hashlib.sha256(password.encode()).hexdigest()


@contextlib.contextmanager
def _redis_errors() -> Iterator[None]:
    """redis-py's errors as Coffer's, for the agent's admin commands."""
    try:
        yield
    except redis.AuthenticationError:
        raise EngineError(
            "redis-server runs but rejects Coffer's admin password; restart the instance "
            "so the admin account is written again."
        ) from None
    except redis.BusyLoadingError:
        raise EngineUnavailable(
            "Redis is still loading its data into memory; try again shortly."
        ) from None
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise EngineUnavailable(
            f"Redis is not answering on its socket ({type(exc).__name__}); is the instance running?"
        ) from None
    except redis.RedisError as exc:
        # Replies to Coffer's commands never carry a password: passwords go only into
        # ACL SETUSER, whose errors _set_user replaces.
        raise EngineError(f"Redis refused the operation: {exc}.") from None


class RedisDatastore(Datastore):
    """Redis 7.0 or later (the config uses 7.0's enable-* options): ACL users, root, no databases.

    See ``Datastore`` for the contract and this module's docstring for the configuration. Redis
    has no named databases, so ``capabilities`` lacks DATABASES: database calls, grants (which
    the contract files under USERS) and users given databases raise NotImplementedByDatastore
    with a sentence saying why. Every ACL change is saved to ``users.acl`` before the call
    returns, so it survives a restart.
    """

    manager: ClassVar[str] = "redis"
    capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {Capability.USERS, Capability.ROOT, Capability.BACKUP, Capability.LOGS}
    )
    capability_notes: ClassVar[dict[Capability, str]] = {
        Capability.DATABASES: rules.DATABASES_UNSUPPORTED
    }

    def __init__(self, spec: EngineSpec) -> None:
        super().__init__(spec)
        self._run_as = resolve_run_as(spec.run_as, "redis-server")
        self.os_user = os_user_name(self._run_as)
        self._owner = None if self._run_as is None else self._run_as.name
        layout = spec.layout
        if _UNSAFE_PATH.search(str(layout.root.resolve())):
            raise ValidationError(
                f"The instance directory {layout.root} contains whitespace, quotes or other "
                "characters a Redis config file cannot hold unquoted; use a plain path."
            )
        self.config_file = layout.etc_dir / "redis.conf"
        self.acl_file = layout.etc_dir / "users.acl"
        self.socket = layout.run_dir / "redis.sock"
        self.pidfile = layout.run_dir / "redis-server.pid"
        self.log_file = layout.log_dir / "redis.log"
        self.console_log = layout.log_dir / "redis.console.log"
        #: The slow log's entries, copied out of the server by ``collect_logs``.
        self.slow_query_log = layout.log_dir / "slow_query.log"
        self.password_file = layout.secrets_dir / "os_admin.password"
        if len(str(self.socket.resolve())) > _MAX_SOCKET_PATH:
            raise ValidationError(
                f"The socket path {self.socket} is longer than the {_MAX_SOCKET_PATH} bytes a "
                "unix socket allows; put the instance directory on a shorter path."
            )
        #: Accounts no API call may touch or see, besides those in ``redis_rules``.
        self.reserved_users = frozenset({self.os_user})
        # set-proc-title is off in the config, so the path stays in /proc/<pid>/cmdline.
        self._process = EngineProcess(
            "redis-server", self.pidfile, str(self.config_file), self._run_as
        )
        self._lock = threading.RLock()
        #: The kept admin connection for readiness polls and status checks (``_ping``), opened
        #: with ``_ping_password``; ``_ping_lock`` lets one thread use it at a time.
        self._ping_conn: redis.UnixDomainSocketConnection | None = None
        self._ping_password: str | None = None
        self._ping_lock = threading.Lock()
        #: Configuration group values: CONFIG SET, and etc/overrides.conf included by redis.conf.
        self.overrides = RedisOverrides(
            layout, self._owner, self._process.pid, self._admin, self.render_config
        )
        #: Backup and restore (``coffer.guest.backup``). A restored snapshot is loaded at the
        #: first start with AOF off, then AOF is rebuilt from it (``_finish_restore``).
        self.backups = RedisBackup(
            EngineAccess(layout, self._run_as, self.socket, self._admin_password)
        )

    # -- installation -------------------------------------------------------------------------

    @classmethod
    def detect_version(cls) -> str | None:
        binary = _find_binary("redis-server")
        if binary is None:
            return None
        try:
            result = subprocess.run(
                [binary, "--version"], capture_output=True, text=True, timeout=30, check=False
            )
        except (OSError, subprocess.SubprocessError):
            return None
        match = _VERSION.search(result.stdout)
        return match.group(1) if match else None

    def render_config(self) -> str:
        """The redis.conf for this instance, derived from the spec only."""
        layout, spec = self.layout, self.spec
        settings = {
            "bind": " ".join(spec.bind_addresses),
            "port": str(spec.port),
            "protected-mode": "yes",
            "unixsocket": str(self.socket),
            "unixsocketperm": "700",
            "daemonize": "no",
            "supervised": "no",
            # Keeps argv (with the config path) intact for adoption by pid file.
            "set-proc-title": "no",
            "dir": str(layout.data_dir),
            "logfile": str(self.log_file),
            "loglevel": "notice",
            "always-show-logo": "no",
            "aclfile": str(self.acl_file),
            # Off only for the first start after a restore, so Redis loads the restored RDB.
            "appendonly": "no" if self.backups.restore_pending() else "yes",
            "appendfsync": "everysec",
            "aof-use-rdb-preamble": "yes",
            "save": "3600 1 300 100 60 10000",
            "dbfilename": "dump.rdb",
            "databases": "16",
            "tcp-keepalive": "300",
            # Root has CONFIG: it must not point dir/dbfilename at another instance's files,
            # nor load modules or run DEBUG as the shared engine user.
            "enable-protected-configs": "no",
            "enable-debug-command": "no",
            "enable-module-command": "no",
            **memory_settings(spec.memory_mb),
            **self.log_settings(),
        }
        lines = ["# Written by Coffer at every start; edits here are lost."]
        lines += [f"{key} {value}" for key, value in settings.items()]
        # Last, so a configuration group's values win over the flavor's.
        lines += self.overrides.include_lines()
        return "\n".join(lines) + "\n"

    def _write_acl_file(self, admin_password: str) -> None:
        """Keep the users Redis saved; write ``os_admin`` afresh; add a disabled ``default``.

        Without a ``default`` line Redis would create that user with no password and every
        command, so one is always there.
        """
        try:
            existing = self.acl_file.read_text().splitlines()
        except FileNotFoundError:
            existing = []
        kept = []
        has_default = False
        for line in existing:
            words = line.split()
            if len(words) >= 2 and words[0] == "user" and words[1] == ADMIN_USER:
                continue
            if len(words) >= 2 and words[0] == "user" and words[1] == ROOT_USER:
                if "on" not in words[2:]:
                    continue  # disabled root: written afresh below (older rules lost MULTI/EXEC)
                has_default = True
            if words:
                kept.append(line.strip())
        if not has_default:
            kept.insert(0, " ".join(("user", ROOT_USER, *DISABLED_ROOT_RULES)))
        kept.append(
            " ".join(("user", ADMIN_USER, "on", password_hash(admin_password), *SUPERUSER_RULES))
        )
        write_private_file(self.acl_file, "\n".join(kept) + "\n", self._owner)

    # -- lifecycle ----------------------------------------------------------------------------

    def prepare(self, databases: list[dict[str, Any]], users: list[dict[str, Any]]) -> None:
        """See ``Datastore.prepare``; any database given raises NotImplementedByDatastore.

        A user that exists already (a retried prepare) gets the request's password again.
        """
        rules.database_names(databases)
        wanted = self._validate_users(users)
        with self._lock:
            self.layout.create(self._owner)
            self.start()
        if wanted:
            with self._admin() as client:
                for user in wanted:
                    self._set_tenant(client, user["name"], f">{user['password']}")
                self._save_acl(client)

    def start(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        with self._lock:
            running = self._process.pid()
            if running is not None:
                self._wait_ready(deadline)
                self._finish_restore()
                if not self._process.is_child(running):
                    LOG.info("adopted the running redis-server (pid %s)", running)
                return
            if not self.layout.data_dir.is_dir():
                raise EngineError(
                    f"The data directory {self.layout.data_dir} does not exist; run prepare first."
                )
            binary = _find_binary("redis-server")
            if binary is None:
                raise EngineError("redis-server is not installed; install the Redis server.")
            write_private_file(self.config_file, self.render_config(), self._owner)
            self._write_acl_file(self._admin_password(create=True))
            self._process.forget_stale_pidfile()
            # A crash leaves the socket file behind; nothing can be listening on it now.
            self.socket.unlink(missing_ok=True)
            self._process.spawn(
                [binary, str(self.config_file)],
                cwd=self.layout.root,
                console_log=self.console_log,
            )
            self._wait_ready(deadline)
            LOG.info(
                "redis-server started (pid %s), listening on %s port %s",
                self._process.pid(),
                ",".join(self.spec.bind_addresses),
                self.spec.port,
            )
            self._finish_restore()

    def _finish_restore(self) -> None:
        """Turn AOF on once a restored snapshot is loaded (see ``coffer.guest.backup.redis``)."""
        if self.backups.restore_pending():
            with self._admin() as client:
                self.backups.finish_restore(client)
            LOG.info("loaded the restored snapshot and rebuilt the AOF from it")

    def _admin_password(self, create: bool = False) -> str:
        try:
            return self.password_file.read_text().strip()
        except FileNotFoundError:
            if not create:
                raise EngineUnavailable(
                    "Redis has not been started by Coffer yet (no admin credentials)."
                ) from None
        password = secrets.token_urlsafe(32)
        write_private_file(self.password_file, password + "\n", self._owner)
        return password

    def _wait_ready(self, deadline: float) -> None:
        """Wait until PING answers (Redis refuses it while it loads its data)."""
        self._admin_password()  # no credentials: waiting cannot help
        while True:
            if self._process.pid() is None:
                code = self._process.exit_code()
                how = f" with exit code {code}" if code is not None else ""
                raise EngineError(
                    f"redis-server exited during start{how}. Last lines of its log: "
                    + " | ".join(self._log_tail(6))
                )
            try:
                self._ping()
                return
            except EngineUnavailable:
                pass  # the next poll connects afresh
            if time.monotonic() >= deadline:
                raise EngineUnavailable(
                    "redis-server did not answer in time; it may still be loading its data. "
                    "Last lines of its log: " + " | ".join(self._log_tail(3))
                )
            time.sleep(0.01)

    def _answers(self) -> bool:
        """PING on the kept connection; when that fails (a restart closed it, or the server is
        gone), once more on a fresh connection before calling the server down."""
        for _ in range(2):
            try:
                return self._ping(check_login=True)
            except CofferError:
                continue
        return False

    def _ping(self, check_login: bool = False) -> bool:
        """PING as os_admin on one kept connection. Readiness polls come every 10 ms during a
        start and status checks with every heartbeat; a new client for each cost the agent
        more CPU than the command. The connection opens on first use and any failure closes
        it, so the next call connects afresh. Errors are Coffer's, as in ``_admin``.

        Redis keeps a connection logged in when its user's password changes or the user is
        turned off, so ``check_login`` (status checks) sends AUTH again before the PING, in
        the same round trip: an admin account that no longer works reads as one, as it did
        when every check logged in anew."""
        password = self._admin_password()
        with self._ping_lock:
            if self._ping_conn is None or self._ping_password != password:
                self._close_ping_conn()
                self._ping_conn = redis.UnixDomainSocketConnection(  # type: ignore[abstract]
                    path=str(self.socket),
                    username=ADMIN_USER,
                    password=password,
                    decode_responses=True,
                    socket_timeout=2,
                    socket_connect_timeout=2,
                    retry=Retry(NoBackoff(), 0),
                    **_NO_CLIENT_SETINFO,
                )
                self._ping_password = password
            conn = self._ping_conn
            try:
                with _redis_errors():
                    if check_login:
                        login = ("AUTH", ADMIN_USER, password)
                        conn.send_packed_command(conn.pack_commands([login, ("PING",)]))
                        conn.read_response()
                    else:
                        conn.send_command("PING")
                    return bool(conn.read_response() == "PONG")
            except BaseException:
                conn.disconnect()
                raise

    def _close_ping_conn(self) -> None:
        """Close the kept connection (the caller holds ``_ping_lock``)."""
        if self._ping_conn is not None:
            self._ping_conn.disconnect()
            self._ping_conn = None
            self._ping_password = None

    def _log_tail(self, lines: int) -> list[str]:
        tail: list[str] = []
        # Config errors go to stderr (the console log) before Redis opens its own log.
        for path in (self.console_log, self.log_file):
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            tail += [line.strip() for line in text.splitlines()[-lines:] if line.strip()]
        secret = self._known_password()
        return [line.replace(secret, "***") if secret else line for line in tail[-lines:]]

    def _known_password(self) -> str | None:
        try:
            return self.password_file.read_text().strip() or None
        except OSError:
            return None

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM: Redis fsyncs the AOF, writes a snapshot and exits; killed after ``timeout``."""
        with self._lock:
            if not self._process.terminate(timeout):
                raise EngineError(
                    f"redis-server did not shut down within {timeout:g} s and was killed; "
                    "up to a second of writes may be lost."
                )
            with self._ping_lock:
                self._close_ping_conn()
            self.socket.unlink(missing_ok=True)

    def is_running(self) -> bool:
        return self._process.pid() is not None

    def status(self) -> ServiceStatus:
        return engine_status(self._process, self._answers)

    # -- guest logs (coffer.guest.logs) ------------------------------------------------------

    def log_sources(self) -> dict[str, LogSource]:
        """The engine's logs (``coffer.guest.config.logs``); the slow log lives in the server's
        memory, so ``collect_logs`` copies it to a file first."""
        return {"error": LogSource(self.log_file), "slow_query": LogSource(self.slow_query_log)}

    def log_settings(self) -> dict[str, str]:
        """The slow log threshold ``etc/logs.json`` asks for (Redis's own default, 10 ms, while
        the slow_query log is off: the server keeps its slow log either way)."""
        switches = read_switches(self.layout)
        if not switches.is_on("slow_query"):
            return {"slowlog-log-slower-than": str(_SLOWLOG_DEFAULT_US)}
        return {"slowlog-log-slower-than": str(switches.long_query_ms * 1000)}

    def apply_log_switches(self) -> set[str]:
        """Make the running server follow ``etc/logs.json`` (``CONFIG SET``, live); returns the
        logs that wait for a restart, none here."""
        with self._admin() as client:
            for name, value in self.log_settings().items():
                client.execute_command("CONFIG", "SET", name, value)
        return set()

    def collect_logs(self) -> None:
        """Append the slow log entries not copied yet to ``log/slow_query.log`` (while the
        slow_query log is on), but for the agent's own. Redis itself redacts secrets in them
        (AUTH, HELLO, ACL SETUSER); entries are told apart by (time, id), since ids restart
        with the server."""
        if not read_switches(self.layout).is_on("slow_query"):
            return
        mark_file = self.layout.log_dir / ".slow_query.mark"
        try:
            mark = tuple(int(part) for part in mark_file.read_text().split()[:2])
        except (OSError, ValueError):
            mark = (0, -1)
        with self._admin() as client:
            entries = client.execute_command("SLOWLOG", "GET", "-1")
        # The agent's own commands (over the unix socket, which only it can reach) are left
        # out, as its sessions are on the other engines.
        # Redis names a unix socket client by the socket's path, cut short on long paths.
        own = str(self.layout.run_dir)
        fresh = sorted(
            (int(entry[1]), int(entry[0]), entry)
            for entry in entries
            if (int(entry[1]), int(entry[0])) > mark
            and not str(entry[4] if len(entry) > 4 else "").startswith(own)
        )
        if not fresh:
            return
        lines = []
        for started, _, entry in fresh:
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started))
            words = " ".join(_slowlog_word(str(arg)) for arg in entry[3])
            client_address = entry[4] if len(entry) > 4 else ""
            lines.append(
                f"{when} id={entry[0]} duration_us={entry[2]} client={client_address} "
                f"command: {words}\n"
            )
        fd = os.open(self.slow_query_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        with os.fdopen(fd, "a", encoding="utf-8") as handle:
            handle.write("".join(lines))
        write_private_file(mark_file, f"{fresh[-1][0]} {fresh[-1][1]}\n", self._owner)

    # -- connection and errors ----------------------------------------------------------------

    @contextlib.contextmanager
    def _admin(self, timeout: float = 10) -> Iterator[redis.Redis]:
        """A client on the unix socket as os_admin; redis-py errors become Coffer errors."""
        client: redis.Redis | None = None
        try:
            with _redis_errors():
                client = redis.Redis(
                    unix_socket_path=str(self.socket),
                    username=ADMIN_USER,
                    password=self._admin_password(),
                    decode_responses=True,
                    socket_timeout=timeout,
                    socket_connect_timeout=timeout,
                    # Retries belong to the caller (start's loop, the agent's next cycle).
                    retry=Retry(NoBackoff(), 0),
                    single_connection_client=True,
                    **_NO_CLIENT_SETINFO,
                )
                yield client
        finally:
            if client is not None:
                client.close()

    @staticmethod
    def _set_user(client: redis.Redis, name: str, *acl_rules: str) -> None:
        """ACL SETUSER with every rule its own argument (never parsed out of a longer string)."""
        try:
            client.execute_command("ACL", "SETUSER", name, *acl_rules)
        except redis.ResponseError:
            # Redis quotes the failing rule, which may be a password.
            raise EngineError(f"Redis refused the ACL rules for the user {name!r}.") from None

    def _set_tenant(self, client: redis.Redis, name: str, *passwords: str) -> None:
        """Make ``name`` a tenant user with exactly ``passwords`` (``>plain`` or ``#hash``)."""
        self._set_user(client, name, "reset", "on", *passwords, *TENANT_RULES)

    @staticmethod
    def _save_acl(client: redis.Redis) -> None:
        """Write the ACL users to users.acl, so the change survives a restart."""
        client.execute_command("ACL", "SAVE")

    # -- validation ---------------------------------------------------------------------------

    def _validate_users(self, users: Any) -> list[dict[str, Any]]:
        if not isinstance(users, list):
            raise ValidationError("The users must be a list of objects with a name and password.")
        result = [rules.validate_user(u, extra_reserved=self.reserved_users) for u in users]
        names = [u["name"] for u in result]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValidationError(f"The user {dupes[0]!r} is given more than once.")
        return result

    def _user_name(self, name: Any, host: Any) -> str:
        rules.normalize_host(host)
        return rules.validate_user_name(name, self.reserved_users)

    def _is_hidden_user(self, name: str) -> bool:
        lowered = name.lower()
        return lowered in rules.RESERVED_USERS or lowered in {
            u.lower() for u in self.reserved_users
        }

    @staticmethod
    def _get_user(client: redis.Redis, name: str) -> dict[str, Any] | None:
        user: dict[str, Any] | None = client.acl_getuser(name)
        return user

    def _require_user(self, client: redis.Redis, name: str) -> dict[str, Any]:
        user = self._get_user(client, name)
        if user is None:
            raise UserNotFound(f"The user {name!r} does not exist.")
        return user

    # -- databases: Redis has none ------------------------------------------------------------

    def create_databases(self, databases: list[dict[str, Any]]) -> None:
        raise rules.databases_unsupported()

    def list_databases(
        self, limit: int | None = None, marker: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        raise rules.databases_unsupported()

    def delete_database(self, name: str) -> None:
        raise rules.databases_unsupported()

    def grant_access(self, name: str, host: str, databases: list[str]) -> None:
        raise rules.databases_unsupported()

    def list_access(self, name: str, host: str = "%") -> list[dict[str, Any]]:
        raise rules.databases_unsupported()

    def revoke_access(self, name: str, host: str, database: str) -> None:
        raise rules.databases_unsupported()

    # -- users --------------------------------------------------------------------------------

    def create_users(self, users: list[dict[str, Any]]) -> None:
        wanted = self._validate_users(users)
        with self._admin() as client:
            for user in wanted:
                if self._get_user(client, user["name"]) is not None:
                    raise UserAlreadyExists(f"The user {user['name']!r} already exists.")
            for user in wanted:
                self._set_tenant(client, user["name"], f">{user['password']}")
            self._save_acl(client)

    def list_users(
        self, limit: int | None = None, marker: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Tenant users, paged by ``"name@%"`` (the marker format MariaDB uses too).

        ``default``, ``os_admin``, ``root`` and the engine's OS user are hidden.
        """
        with self._admin() as client:
            names = [str(name) for name in client.acl_users()]
        items = [
            {"name": name, "host": rules.DEFAULT_HOST, "databases": []}
            for name in names
            if not self._is_hidden_user(name)
        ]
        return paginate(items, lambda u: f"{u['name']}@{u['host']}", limit, marker)

    def get_user(self, name: str, host: str = "%") -> dict[str, Any]:
        name = self._user_name(name, host)
        with self._admin() as client:
            self._require_user(client, name)
        return {"name": name, "host": rules.DEFAULT_HOST, "databases": []}

    def update_user(self, name: str, host: str, attrs: dict[str, Any]) -> None:
        """Change a user's name and/or password; a host other than ``'%'`` is refused.

        A rename creates the new user with the old one's password hashes (or the new
        password) and deletes the old one in one transaction; the old name's connections close.
        """
        name = self._user_name(name, host)
        changes = rules.validate_user_update(attrs, self.reserved_users)
        new_name = changes.get("name", name)
        password = changes.get("password")
        with self._admin() as client:
            current = self._require_user(client, name)
            if new_name == name:
                if password is not None:
                    self._set_user(client, name, "resetpass", f">{password}")
            else:
                if self._get_user(client, new_name) is not None:
                    raise UserAlreadyExists(f"The user {new_name!r} already exists.")
                if password is not None:
                    keep = [f">{password}"]
                else:
                    keep = ["#" + str(h) for h in current.get("passwords", [])]
                self._rename(client, name, new_name, keep)
            self._save_acl(client)

    def _rename(self, client: redis.Redis, old: str, new: str, passwords: list[str]) -> None:
        pipe = client.pipeline(transaction=True)
        pipe.execute_command("ACL", "SETUSER", new, "reset", "on", *passwords, *TENANT_RULES)
        pipe.execute_command("ACL", "DELUSER", old)
        try:
            results = pipe.execute(raise_on_error=False)
        except redis.ResponseError:
            raise EngineError(f"Redis refused to rename the user {old!r}.") from None
        if any(isinstance(result, Exception) for result in results):
            raise EngineError(f"Redis refused to rename the user {old!r} to {new!r}.")

    def change_passwords(self, users: list[dict[str, Any]]) -> None:
        if not isinstance(users, list):
            raise ValidationError("The users must be a list of objects with a name and password.")
        wanted = []
        for user in users:
            if not isinstance(user, dict):
                raise ValidationError("Each user must be an object with a name and a password.")
            name = self._user_name(user.get("name"), user.get("host"))
            wanted.append((name, rules.validate_password(user.get("password"))))
        with self._admin() as client:
            for name, _ in wanted:
                self._require_user(client, name)
            for name, password in wanted:
                self._set_user(client, name, "resetpass", f">{password}")
            self._save_acl(client)

    def delete_user(self, name: str, host: str = "%") -> None:
        """Delete the user; Redis closes its open connections."""
        name = self._user_name(name, host)
        with self._admin() as client:
            self._require_user(client, name)
            client.execute_command("ACL", "DELUSER", name)
            self._save_acl(client)

    # -- root ---------------------------------------------------------------------------------

    def enable_root(self, password: str | None = None) -> dict[str, Any]:
        """Give ``default`` this password (generated if None) and every command; old root
        passwords stop working. Clients log in with ``AUTH default <password>`` (or
        ``AUTH <password>``)."""
        if password is None:
            password = secrets.token_urlsafe(24)
        else:
            password = rules.validate_password(password, "root password")
        with self._admin() as client:
            self._set_user(client, ROOT_USER, "reset", "on", f">{password}", *SUPERUSER_RULES)
            self._save_acl(client)
        return {"name": ROOT_USER, "password": password}

    def disable_root(self) -> None:
        """Turn ``default`` off, forget its passwords and close its connections; idempotent."""
        with self._admin() as client:
            self._set_user(client, ROOT_USER, "reset", *DISABLED_ROOT_RULES)
            client.execute_command("CLIENT", "KILL", "USER", ROOT_USER)
            self._save_acl(client)

    def is_root_enabled(self) -> bool:
        with self._admin() as client:
            user = self._get_user(client, ROOT_USER)
        return user is not None and "on" in user.get("flags", [])
