"""The MariaDB datastore: runs one ``mariadbd`` for an instance and manages its databases and users.

How the engine is laid out in the instance's volume (``InstanceLayout``)::

    etc/my.cnf              written by Coffer at every start from the flavor (edits are lost)
    data/                   the data directory; ``data/mysql`` exists once it is initialised
    run/mysqld.sock         the agent's only way in (as ``os_admin`` with a password)
    run/mariadbd.pid        the engine's pid, for adoption after an agent restart
    run/tmp/, run/files/    the engine's tmpdir and the only directory FILE privileges reach
    log/error.log           the engine's error log
    secrets/os_admin.password

The agent's admin account ``os_admin@localhost`` gets a fresh random password at the first start
of every data directory: ``start`` writes a 0600 ``--init-file`` that creates or resets the
account, and deletes it once the server answers. The password is never on a command line, and a
data directory copied from a pre-initialised template gets its own password the same way.

**Templates.** With ``spec.template_dir`` set, ``prepare`` does not initialise an empty data
directory itself: it copies a template (``coffer.guest.datastores.template``) built once per
MariaDB version and variant by a separate ``mariadb-install-db`` run into the store, then starts
the copy. What ``mariadb-install-db`` 10.11 writes was checked for anything secret or
instance-specific, by reading the files and querying a started copy:

* accounts: only ``root@localhost`` (password "invalid", unix_socket for OS user root only) and
  the locked ``mariadb.sys@localhost``; no password hash, no tenant account, no ``os_admin``
  (created at each copy's first start by the init file, with the copy's own password), and with
  ``--cross-bootstrap`` no row naming the build host (a ``root@<hostname>`` proxy grant
  otherwise; ``--skip-name-resolve`` does not drop it).
* no server identity to keep unique: MariaDB has no ``auto.cnf``/``server_uuid``; ``server_id``
  and GTID domain come from the option file; ``mysql.gtid_slave_pos`` is empty and no binary
  log exists. ``aria_log_control`` holds an Aria UUID, shared by copies as by any physical
  backup and restore; Aria uses it only to notice tables moved in from another server.
* the rest is version- and settings-bound, hence in the template's key: ``mysql_upgrade_info``
  (the version), ``db.opt`` files (the server character set), the redo log header.
  ``ib_buffer_pool`` lists page numbers of the system tables. Paths are not recorded.

The template's redo log has the smallest flavor's size; a bigger flavor's first start resizes it
(``innodb_log_file_size`` is read at every start), which costs far less than copying a big log.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pymysql
from pymysql.converters import escape_string
from pymysql.cursors import Cursor

from coffer.datastores import mysql_rules as rules
from coffer.errors import (
    CofferError,
    DatabaseAlreadyExists,
    DatabaseNotFound,
    EngineError,
    UserAlreadyExists,
    UserNotFound,
    ValidationError,
)
from coffer.guest.backup.archive import binlog_dir, mariadb_binlog_settings
from coffer.guest.backup.base import EngineAccess
from coffer.guest.backup.mariadb import MariaDBBackup
from coffer.guest.config.logs import LogSource, read_switches
from coffer.guest.config.mariadb import MariaDBOverrides
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
from coffer.guest.datastores.template import TemplateError, TemplateStore
from coffer.guest.layout import chown_to, write_private_file
from coffer.status import ServiceStatus

LOG = logging.getLogger(__name__)

ADMIN_USER = "os_admin"
ADMIN_HOST = "localhost"
ROOT_USER = "root"
ROOT_HOST = "%"

# sockaddr_un holds 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107
# Characters that would need quoting in an option file; instance roots never need them.
_UNSAFE_PATH = re.compile(r"[\s#'\"\\;=]")
_VERSION = re.compile(r"Ver\s+(\d+\.\d+\.\d+)")
# Client errors that mean "the server is not there", as opposed to "it refused".
_CONNECTION_ERRORS = frozenset({2002, 2003, 2006, 2013})
_ACCESS_DENIED = 1045
#: Run first in every session of the agent's: nothing it sends reaches the general log, and no
#: statement of it is slow enough for the slow query log (the longest time MariaDB takes).
_UNLOGGED_SESSION = "SET SESSION sql_log_off = 1, SESSION long_query_time = 31536000"


#: How often to try the socket while mariadbd starts; a start takes 0.1-0.2 s, so a coarse
#: poll would add a large share of it.
_READY_POLL = 0.01
#: ``mariadbd --version`` takes ~45 ms; cached per binary (path, inode, mtime, size) so an
#: upgraded binary is asked again and never paired with an older version's template.
_VERSIONS: dict[tuple[str, int, int, int], str] = {}
#: Arguments of every ``mariadb-install-db`` run. Only root@localhost over unix_socket (the OS
#: root) gets in without a password; no account is tied to the engine's OS user, which every
#: instance shares. ``--cross-bootstrap`` (the option for building a data directory to ship
#: elsewhere) leaves out the rows naming this host (``root@<hostname>`` proxy grants).
_INSTALL_DB_FLAGS = (
    "--skip-test-db",
    "--auth-root-authentication-method=socket",
    "--auth-root-socket-user=root",
    "--cross-bootstrap",
)
#: Bumped when how templates are built changes in a way the settings below do not show.
_TEMPLATE_RECIPE = 1
_TEMPLATE_FLAVOR = (256, 1)  # (RAM MB, vCPUs): the smallest redo log a flavor gets


def _find_binary(name: str) -> str | None:
    # /usr/sbin is often missing from an unprivileged user's PATH.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")


def init_settings() -> dict[str, str]:
    """Option-file settings that shape what ``mariadb-install-db`` writes into a data directory.

    Every instance's option file carries them, and a template is keyed by them: adding a
    setting here (page size, ``lower_case_table_names``...) gives templates a new variant.
    """
    return {
        "character-set-server": rules.DEFAULT_CHARACTER_SET,
        "collation-server": rules.CHARACTER_SETS[rules.DEFAULT_CHARACTER_SET],
    }


def template_variant() -> str:
    """The template variant for the current init settings and flags (12 hex digits)."""
    recipe = {
        "recipe": _TEMPLATE_RECIPE,
        "settings": init_settings(),
        "flags": list(_INSTALL_DB_FLAGS),
    }
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
    return digest[:12]


def memory_settings(memory_mb: int, vcpus: int) -> dict[str, str]:
    """Engine sizing for a flavor, chosen so a 256 MB instance runs and an idle one stays light.

    * ``innodb_buffer_pool_size`` = max(32, min(ram / 2, ram - 192)) MB: half the RAM, leaving
      at least 192 MB for the server itself and its connections (256 MB -> 64 MB, 512 -> 256,
      1024 -> 512, 4096 -> 2048).
    * ``max_connections`` = ram / 6, between 30 and 1000 (256 MB -> 42, 1024 -> 170, 8192 ->
      1000): an idle connection costs about 1 MB and a sorting one a few MB more.
    * ``innodb_log_file_size`` = buffer pool / 4, 16 MB to 1 GB: a redo log much larger than the
      pool buys little and makes initialising (and copying) a data directory heavier.
    * ``key_buffer_size`` and ``aria_pagecache_buffer_size`` = ram / 32, 8 to 128 MB: MyISAM and
      Aria serve only internal temporary tables here (the defaults, 128 MB each, would dwarf a
      small flavor).
    * InnoDB I/O threads = vCPUs, up to 4 each for reads and writes (at least 1 reader and 2
      writers, the engine's minimums).
    """
    pool = max(32, min(memory_mb // 2, memory_mb - 192))
    return {
        "innodb_buffer_pool_size": f"{pool}M",
        "innodb_log_file_size": f"{max(16, min(pool // 4, 1024))}M",
        "innodb_log_buffer_size": "4M" if memory_mb < 1024 else "16M",
        "max_connections": str(max(30, min(memory_mb // 6, 1000))),
        "key_buffer_size": f"{max(8, min(memory_mb // 32, 128))}M",
        "aria_pagecache_buffer_size": f"{max(8, min(memory_mb // 32, 128))}M",
        "innodb_read_io_threads": str(max(1, min(vcpus, 4))),
        "innodb_write_io_threads": str(max(2, min(vcpus, 4))),
    }


class MariaDBDatastore(Datastore):
    """MariaDB 10.11 (10.5 and later should work): databases, users, grants and root.

    See ``Datastore`` for the contract. Specific to MariaDB: the engine listens on every
    ``spec.bind_addresses`` at ``spec.port`` and on a unix socket in ``run/``; grants are
    ``ALL PRIVILEGES`` on each granted database; dropping a database also removes the grants on
    it, so a later database of the same name is not opened to old users by accident.
    """

    manager: ClassVar[str] = "mariadb"
    capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {
            Capability.DATABASES,
            Capability.USERS,
            Capability.ROOT,
            Capability.BACKUP,
            Capability.LOGS,
        }
    )

    def __init__(self, spec: EngineSpec) -> None:
        super().__init__(spec)
        self._run_as = resolve_run_as(spec.run_as, "mariadbd")
        self.os_user = os_user_name(self._run_as)
        self._owner = None if self._run_as is None else self._run_as.name
        layout = spec.layout
        if _UNSAFE_PATH.search(str(layout.root.resolve())):
            raise ValidationError(
                f"The instance directory {layout.root} contains whitespace, quotes or other "
                "characters MariaDB option files cannot hold; use a plain path."
            )
        self.config_file = layout.etc_dir / "my.cnf"
        self.socket = layout.run_dir / "mysqld.sock"
        self.pidfile = layout.run_dir / "mariadbd.pid"
        self.error_log = layout.log_dir / "error.log"
        self.general_log = layout.log_dir / "general.log"
        self.slow_query_log = layout.log_dir / "slow_query.log"
        self.password_file = layout.secrets_dir / "os_admin.password"
        self._init_file = layout.secrets_dir / "init.sql"
        if len(str(self.socket.resolve())) > _MAX_SOCKET_PATH:
            raise ValidationError(
                f"The socket path {self.socket} is longer than the {_MAX_SOCKET_PATH} bytes a "
                "unix socket allows; put the instance directory on a shorter path."
            )
        #: Accounts no API call may touch or see, besides those in ``mysql_rules``.
        self.reserved_users = frozenset({self.os_user})
        self._process = EngineProcess(
            "mariadbd", self.pidfile, f"--defaults-file={self.config_file}", self._run_as
        )
        self._lock = threading.RLock()
        #: Configuration group values: SET GLOBAL, and etc/overrides.cnf included by my.cnf.
        self.overrides = MariaDBOverrides(
            layout, self._owner, self._process.pid, self._admin, self.render_config
        )
        #: Backup and restore (``coffer.guest.backup``). A restore fills the empty data
        #: directory before the first start, in place of a template or mariadb-install-db.
        self.backups = MariaDBBackup(
            EngineAccess(layout, self._run_as, self.socket, self._admin_password)
        )

    # -- installation -------------------------------------------------------------------------

    @classmethod
    def detect_version(cls) -> str | None:
        binary = _find_binary("mariadbd")
        if binary is None:
            return None
        try:
            info = os.stat(binary)
        except OSError:
            return None
        key = (binary, info.st_ino, info.st_mtime_ns, info.st_size)
        if key in _VERSIONS:
            return _VERSIONS[key]
        try:
            result = subprocess.run(
                [binary, "--version"], capture_output=True, text=True, timeout=30, check=False
            )
        except (OSError, subprocess.SubprocessError):
            return None
        match = _VERSION.search(result.stdout)
        if match is None:
            return None
        _VERSIONS[key] = match.group(1)
        return match.group(1)

    def is_initialized(self) -> bool:
        """True once the data directory holds the system tables (``data/mysql``)."""
        return (self.layout.data_dir / "mysql").is_dir()

    def render_config(self) -> str:
        """The option file for this instance, derived from the spec only."""
        layout, spec = self.layout, self.spec
        settings = {
            "datadir": str(layout.data_dir),
            "socket": str(self.socket),
            "pid-file": str(self.pidfile),
            "bind-address": ",".join(spec.bind_addresses),
            "port": str(spec.port),
            "log-error": str(self.error_log),
            "tmpdir": str(layout.run_dir / "tmp"),
            # FILE privileges (a tenant's root has them) must not reach other instances' files,
            # which the same OS user owns.
            "secure-file-priv": str(layout.run_dir / "files"),
            "local-infile": "0",
            "symbolic-links": "0",
            "skip-name-resolve": "1",
            **init_settings(),
            "performance-schema": "OFF",
            "table-open-cache": "400",
            "thread-cache-size": "8",
            **memory_settings(spec.memory_mb, spec.vcpus),
            **{name: str(value) for name, value in self.log_variables().items()},
            # A row-based binary log, archived for point-in-time restores (backup/archive.py).
            **mariadb_binlog_settings(layout),
        }
        lines = ["# Written by Coffer at every start; edits here are lost.", "[mariadbd]"]
        lines += [f"{key} = {value}" for key, value in settings.items()]
        # Last, so a configuration group's values win over the flavor's.
        lines += self.overrides.include_lines()
        return "\n".join(lines) + "\n"

    def _write_config(self) -> None:
        for directory in (
            self.layout.run_dir / "tmp",
            self.layout.run_dir / "files",
            binlog_dir(self.layout),
        ):
            directory.mkdir(mode=0o750, exist_ok=True)
            chown_to(directory, self._owner)
        write_private_file(self.config_file, self.render_config(), self._owner, mode=0o640)

    def _require_empty_data_dir(self) -> None:
        data_dir = self.layout.data_dir
        leftovers = [p.name for p in data_dir.iterdir()]
        if leftovers:
            raise EngineError(
                f"The data directory {data_dir} holds files ({', '.join(sorted(leftovers)[:5])}) "
                "but no system tables; Coffer will not initialise over them. Empty it or "
                "restore a complete data directory."
            )

    def _install_db(self, datadir: Path, defaults_file: Path, cwd: Path) -> None:
        """Run mariadb-install-db as the engine user into the empty directory ``datadir``."""
        install_db = _find_binary("mariadb-install-db")
        if install_db is None:
            raise EngineError("mariadb-install-db is not installed; install the MariaDB server.")
        argv = [
            install_db,
            f"--defaults-file={defaults_file}",
            f"--datadir={datadir}",
            *_INSTALL_DB_FLAGS,
        ]
        run_as = self._run_as
        try:
            result = subprocess.run(
                argv,
                cwd=cwd,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
                user=None if run_as is None else run_as.uid,
                group=None if run_as is None else run_as.gid,
                extra_groups=None if run_as is None else [],
                umask=0o027,
            )
        except subprocess.TimeoutExpired:
            raise EngineError("mariadb-install-db did not finish within 10 minutes.") from None
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip().splitlines()[-8:]
            raise EngineError(
                f"mariadb-install-db failed with exit code {result.returncode}: "
                + " | ".join(output + self._error_log_tail(4))
            )

    def _initialize(self) -> None:
        """Create the system tables in a staging directory, then move them into ``data/``.

        ``data/mysql`` is moved last, so an interrupted move is seen as "not initialised" and is
        redone; an interrupted mariadb-install-db leaves only the staging directory behind.
        """
        data_dir = self.layout.data_dir
        self._require_empty_data_dir()
        staging = self.layout.root / ".data-init"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(mode=0o700)
        chown_to(staging, self._owner)
        try:
            self._install_db(staging, self.config_file, self.layout.root)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        entries = sorted(staging.iterdir(), key=lambda p: (p.name == "mysql", p.name))
        for entry in entries:
            entry.replace(data_dir / entry.name)
        staging.rmdir()
        LOG.info("initialised MariaDB data directory %s", data_dir)

    def _template_store(self) -> TemplateStore | None:
        directory = self.spec.template_dir
        if directory is None:
            return None
        if not directory.is_absolute():
            LOG.warning("ignoring the template directory %s: it is not an absolute path", directory)
            return None
        return TemplateStore(directory, owner=self._owner)

    def _copy_template(self) -> bool:
        """Fill the empty data directory from the host's template, building it first if there
        is none. False when there is no usable store: the caller then initialises by hand.
        EngineError from building (mariadb-install-db failing) propagates: by hand would fail
        the same way."""
        store = self._template_store()
        version = self.detect_version()
        if store is None or version is None:
            return False
        self._require_empty_data_dir()
        try:
            template = store.get_or_build(
                self.manager, version, template_variant(), self._build_template
            )
            if not store.take_spare(template, self.layout.data_dir):
                store.copy_into(template, self.layout.data_dir)
        except TemplateError as exc:
            LOG.warning("initialising without a template: %s", exc.message)
            return False
        LOG.info("data directory %s copied from template %s", self.layout.data_dir, template.name)
        return True

    def _build_template(self, tree: Path, scratch: Path) -> None:
        """Initialise ``tree`` with only the settings that shape it (see ``init_settings``); the
        redo log gets the smallest flavor's size, which any start resizes to its own."""
        settings = {
            **init_settings(),
            **memory_settings(*_TEMPLATE_FLAVOR),
            "performance-schema": "OFF",
            "skip-name-resolve": "1",
        }
        lines = ["# The recipe of a Coffer template data directory.", "[mariadbd]"]
        lines += [f"{key} = {value}" for key, value in settings.items()]
        defaults_file = scratch / "my.cnf"
        write_private_file(defaults_file, "\n".join(lines) + "\n", self._owner, mode=0o640)
        self._install_db(tree, defaults_file, scratch)
        if not (tree / "mysql").is_dir():
            raise EngineError(
                "mariadb-install-db finished but wrote no system tables; check its installation."
            )

    # -- lifecycle ----------------------------------------------------------------------------

    def prepare(self, databases: list[dict[str, Any]], users: list[dict[str, Any]]) -> None:
        wanted_dbs = self._validate_databases(databases)
        wanted_users = self._validate_users(users)
        with self._lock:
            self.layout.create(self._owner)
            if not self.is_initialized():
                self._write_config()  # mariadb-install-db sizes the redo log from it
                if not self._copy_template():
                    self._initialize()
            self.start()
        with self._admin() as cur:
            self._check_character_sets(cur, wanted_dbs)
            existing = self._database_names(cur)
            given = {db["name"] for db in wanted_dbs}
            for user in wanted_users:
                self._require_databases(user["databases"], existing | given)
            for db in wanted_dbs:
                if db["name"] not in existing:
                    self._create_database(cur, db)
            for user in wanted_users:
                # A retried prepare finds its users made; the request's password still holds.
                if self._user_exists(cur, user["name"], user["host"]):
                    self._set_password(cur, user["name"], user["host"], user["password"])
                else:
                    self._create_user(cur, user)
                for name in user["databases"]:
                    self._grant(cur, user["name"], user["host"], name)

    def start(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        with self._lock:
            running = self._process.pid()
            if running is not None:
                self._wait_ready(deadline)
                if not self._process.is_child(running):
                    LOG.info("adopted the running mariadbd (pid %s)", running)
                if self.backups.restore_pending():
                    self.backups.finish_restore()
                return
            if not self.is_initialized():
                raise EngineError(
                    f"The data directory {self.layout.data_dir} is not initialised; "
                    "run prepare first."
                )
            self._write_config()
            self._process.forget_stale_pidfile()
            # A crash leaves the socket file behind; nothing can be listening on it now.
            self.socket.unlink(missing_ok=True)
            self._write_init_file(self._admin_password(create=True))
            ready = False
            try:
                self._process.spawn(
                    [
                        str(_find_binary("mariadbd") or "/usr/sbin/mariadbd"),
                        f"--defaults-file={self.config_file}",
                        f"--init-file={self._init_file}",
                    ],
                    cwd=self.layout.root,
                    console_log=self.layout.log_dir / "mariadbd.console.log",
                )
                self._wait_ready(deadline)
                ready = True
                if self.backups.restore_pending():
                    # A point-in-time restore: replay its binary logs before it is ready.
                    self.backups.finish_restore()
                LOG.info(
                    "mariadbd started (pid %s), listening on %s port %s",
                    self._process.pid(),
                    ",".join(self.spec.bind_addresses),
                    self.spec.port,
                )
            finally:
                # Keep the file only while a live server may still have to read it.
                if ready or self._process.pid() is None or self._answers():
                    self._init_file.unlink(missing_ok=True)

    def _write_init_file(self, password: str) -> None:
        account = f"'{ADMIN_USER}'@'{ADMIN_HOST}'"
        secret = escape_string(password)
        sql = (
            f"{_UNLOGGED_SESSION};\n"
            f"CREATE USER IF NOT EXISTS {account} IDENTIFIED BY '{secret}';\n"
            f"ALTER USER {account} IDENTIFIED BY '{secret}';\n"
            f"GRANT ALL PRIVILEGES ON *.* TO {account} WITH GRANT OPTION;\n"
        )
        write_private_file(self._init_file, sql, self._owner)

    def _admin_password(self, create: bool = False) -> str:
        try:
            return self.password_file.read_text().strip()
        except FileNotFoundError:
            if not create:
                raise EngineUnavailable(
                    "MariaDB has not been started by Coffer yet (no admin credentials)."
                ) from None
        password = secrets.token_urlsafe(32)
        write_private_file(self.password_file, password + "\n", self._owner)
        return password

    def _wait_ready(self, deadline: float) -> None:
        self._admin_password()  # no credentials: waiting cannot help
        while True:
            if self._process.pid() is None:
                code = self._process.exit_code()
                how = f" with exit code {code}" if code is not None else ""
                raise EngineError(
                    f"mariadbd exited during start{how}. Last lines of its error log: "
                    + " | ".join(self._error_log_tail(6))
                )
            try:
                with self._admin(connect_timeout=2) as cur:
                    cur.execute("SELECT 1")
                    return
            except EngineUnavailable as exc:
                if exc.__cause__ is not None and _error_code(exc.__cause__) == _ACCESS_DENIED:
                    raise EngineError(
                        "mariadbd runs but rejects Coffer's admin password; restart the "
                        "instance so the admin account is reset."
                    ) from None
            if time.monotonic() >= deadline:
                raise EngineUnavailable(
                    "mariadbd did not answer in time; it may still be recovering. "
                    "Last lines of its error log: " + " | ".join(self._error_log_tail(3))
                )
            time.sleep(_READY_POLL)

    def _answers(self) -> bool:
        try:
            with self._admin(connect_timeout=2) as cur:
                cur.execute("SELECT 1")
            return True
        except CofferError:
            return False

    def _error_log_tail(self, lines: int) -> list[str]:
        try:
            text = self.error_log.read_text(errors="replace")
        except OSError:
            return []
        tail = [line.strip() for line in text.splitlines()[-lines:]]
        secret = self._known_password()
        return [line.replace(secret, "***") if secret else line for line in tail]

    def _known_password(self) -> str | None:
        try:
            return self.password_file.read_text().strip() or None
        except OSError:
            return None

    def stop(self, timeout: float = 60) -> None:
        with self._lock:
            if not self._process.terminate(timeout):
                raise EngineError(
                    f"mariadbd did not shut down within {timeout:g} s and was killed; "
                    "InnoDB will recover at the next start."
                )
            self.socket.unlink(missing_ok=True)

    def is_running(self) -> bool:
        return self._process.pid() is not None

    def status(self) -> ServiceStatus:
        return engine_status(self._process, self._answers)

    # -- guest logs (coffer.guest.logs) ------------------------------------------------------

    def log_sources(self) -> dict[str, LogSource]:
        """The files the engine's logs (``coffer.guest.config.logs``) are written to."""
        return {
            "error": LogSource(self.error_log),
            "general": LogSource(self.general_log),
            "slow_query": LogSource(self.slow_query_log),
        }

    def log_variables(self) -> dict[str, str | float]:
        """The server variables ``etc/logs.json`` asks for: the general and slow query logs on
        or off, in ``log/``. Statement text in them has passwords masked (``log_raw`` is off)."""
        switches = read_switches(self.layout)
        return {
            "general_log_file": str(self.general_log),
            "general_log": "ON" if switches.is_on("general") else "OFF",
            "slow_query_log_file": str(self.slow_query_log),
            "slow_query_log": "ON" if switches.is_on("slow_query") else "OFF",
            "long_query_time": switches.long_query_ms / 1000,
        }

    def apply_log_switches(self) -> set[str]:
        """Make the running server follow ``etc/logs.json`` (every switch is live: ``SET
        GLOBAL``); returns the logs that wait for a restart, none here."""
        with self._admin() as cur:
            # Names are the fixed ones above; values go as parameters.
            for name, value in self.log_variables().items():
                cur.execute(f"SET GLOBAL {name} = %s", (value,))
        return set()

    # -- connection and errors ----------------------------------------------------------------

    @contextlib.contextmanager
    def _admin(self, connect_timeout: float = 10) -> Iterator[Cursor]:
        """A cursor on the unix socket as os_admin, autocommit; pymysql errors become ours."""
        password = self._admin_password()
        try:
            conn = pymysql.connect(
                unix_socket=str(self.socket),
                user=ADMIN_USER,
                password=password,
                charset="utf8mb4",
                autocommit=True,
                connect_timeout=connect_timeout,
                # The agent's statements carry passwords, which MariaDB's general log does not
                # mask in CREATE USER: keep them out of the general and slow query logs.
                init_command=_UNLOGGED_SESSION,
            )
        except pymysql.MySQLError as exc:
            raise EngineUnavailable(
                f"MariaDB is not answering on its socket (error {_error_code(exc)}); "
                "is the instance running?"
            ) from exc
        try:
            with conn.cursor() as cur:
                yield cur
        except pymysql.MySQLError as exc:
            raise _engine_error(exc) from None
        finally:
            conn.close()

    # -- validation ---------------------------------------------------------------------------

    def _validate_databases(self, databases: Any) -> list[dict[str, Any]]:
        if not isinstance(databases, list):
            raise ValidationError("The databases must be a list of objects with a 'name'.")
        result = [rules.validate_database(db) for db in databases]
        names = [db["name"] for db in result]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValidationError(f"The database {dupes[0]!r} is given more than once.")
        return result

    def _validate_users(self, users: Any) -> list[dict[str, Any]]:
        if not isinstance(users, list):
            raise ValidationError("The users must be a list of objects with a name and password.")
        result = [rules.validate_user(u, extra_reserved=self.reserved_users) for u in users]
        keys = [(u["name"], u["host"]) for u in result]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ValidationError(f"The user {dupes[0][0]!r}@{dupes[0][1]!r} is given twice.")
        return result

    def _user_key(self, name: Any, host: Any) -> tuple[str, str]:
        return rules.validate_user_name(name, self.reserved_users), rules.normalize_host(host)

    def _check_character_sets(self, cur: Cursor, databases: list[dict[str, Any]]) -> None:
        """Refuse a character set or collation this server does not have (asked, not assumed)."""
        if not databases:
            return
        cur.execute("SELECT COLLATION_NAME, CHARACTER_SET_NAME FROM information_schema.COLLATIONS")
        collations = {str(row[0]).lower(): str(row[1]).lower() for row in cur.fetchall()}
        charsets = set(collations.values())
        for db in databases:
            if db["character_set"] not in charsets:
                raise ValidationError(
                    f"The character set {db['character_set']!r} is not available on this server."
                )
            collate = db["collate"]
            if collate is not None and collations.get(collate) != db["character_set"]:
                raise ValidationError(
                    f"The collation {collate!r} is not a collation of character set "
                    f"{db['character_set']!r} on this server."
                )

    def _require_databases(self, names: list[str], existing: set[str]) -> None:
        missing = [name for name in names if name not in existing]
        if missing:
            raise DatabaseNotFound(f"The database {missing[0]!r} does not exist; create it first.")

    # -- queries ------------------------------------------------------------------------------

    @staticmethod
    def _database_names(cur: Cursor) -> set[str]:
        cur.execute("SELECT SCHEMA_NAME FROM information_schema.SCHEMATA")
        return {str(row[0]) for row in cur.fetchall()}

    @staticmethod
    def _user_exists(cur: Cursor, name: str, host: str) -> bool:
        cur.execute("SELECT 1 FROM mysql.user WHERE User = %s AND Host = %s", (name, host))
        return cur.fetchone() is not None

    def _require_user(self, cur: Cursor, name: str, host: str) -> None:
        if not self._user_exists(cur, name, host):
            raise UserNotFound(f"The user {name!r}@{host!r} does not exist.")

    @staticmethod
    def _grants_of(cur: Cursor, name: str, host: str) -> list[str]:
        cur.execute("SELECT Db FROM mysql.db WHERE User = %s AND Host = %s", (name, host))
        return sorted({rules.grant_name(str(row[0])) for row in cur.fetchall()})

    def _is_hidden_user(self, name: str) -> bool:
        lowered = name.lower()
        return (
            not name
            or lowered in rules.RESERVED_USERS
            or lowered in {u.lower() for u in self.reserved_users}
        )

    @staticmethod
    def _is_hidden_database(name: str) -> bool:
        return name.lower() in rules.RESERVED_DATABASES or name.startswith("#mysql50#")

    # -- statements ---------------------------------------------------------------------------

    @staticmethod
    def _create_database(cur: Cursor, db: dict[str, Any]) -> None:
        # Character set and collation are [a-z0-9_]+ (mysql_rules) and known to the server.
        name = rules.quote_identifier(db["name"])
        sql = f"CREATE DATABASE {name} CHARACTER SET {db['character_set']}"
        if db["collate"]:
            sql += f" COLLATE {db['collate']}"
        cur.execute(sql)

    @staticmethod
    def _create_user(cur: Cursor, user: dict[str, Any]) -> None:
        cur.execute(
            "CREATE USER %s@%s IDENTIFIED BY %s", (user["name"], user["host"], user["password"])
        )

    @staticmethod
    def _set_password(cur: Cursor, name: str, host: str, password: str) -> None:
        cur.execute("ALTER USER %s@%s IDENTIFIED BY %s", (name, host, password))

    @staticmethod
    def _grant(cur: Cursor, name: str, host: str, database: str) -> None:
        cur.execute(
            f"GRANT ALL PRIVILEGES ON {rules.grant_target(database)} TO %s@%s", (name, host)
        )

    @staticmethod
    def _revoke(cur: Cursor, name: str, host: str, database: str) -> None:
        cur.execute(
            f"REVOKE ALL PRIVILEGES ON {rules.grant_target(database)} FROM %s@%s", (name, host)
        )

    # -- databases ----------------------------------------------------------------------------

    def create_databases(self, databases: list[dict[str, Any]]) -> None:
        wanted = self._validate_databases(databases)
        with self._admin() as cur:
            self._check_character_sets(cur, wanted)
            existing = self._database_names(cur)
            for db in wanted:
                if db["name"] in existing:
                    raise DatabaseAlreadyExists(f"The database {db['name']!r} already exists.")
            for db in wanted:
                self._create_database(cur, db)

    def list_databases(
        self, limit: int | None = None, marker: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        with self._admin() as cur:
            cur.execute(
                "SELECT SCHEMA_NAME, DEFAULT_CHARACTER_SET_NAME, DEFAULT_COLLATION_NAME "
                "FROM information_schema.SCHEMATA"
            )
            rows = cur.fetchall()
        items = [
            {"name": str(name), "character_set": str(charset), "collate": str(collate)}
            for name, charset, collate in rows
            if not self._is_hidden_database(str(name))
        ]
        return paginate(items, lambda db: str(db["name"]), limit, marker)

    def delete_database(self, name: str) -> None:
        name = rules.validate_database_name(name)
        with self._admin() as cur:
            if name not in self._database_names(cur):
                raise DatabaseNotFound(f"The database {name!r} does not exist.")
            cur.execute(
                "SELECT User, Host FROM mysql.db WHERE Db = %s", (rules.grant_pattern(name),)
            )
            holders = [(str(user), str(host)) for user, host in cur.fetchall()]
            for user, host in holders:
                self._revoke(cur, user, host, name)
            cur.execute(f"DROP DATABASE {rules.quote_identifier(name)}")

    # -- users --------------------------------------------------------------------------------

    def create_users(self, users: list[dict[str, Any]]) -> None:
        wanted = self._validate_users(users)
        with self._admin() as cur:
            existing = self._database_names(cur)
            for user in wanted:
                if self._user_exists(cur, user["name"], user["host"]):
                    raise UserAlreadyExists(
                        f"The user {user['name']!r}@{user['host']!r} already exists."
                    )
                self._require_databases(user["databases"], existing)
            for user in wanted:
                self._create_user(cur, user)
                for database in user["databases"]:
                    self._grant(cur, user["name"], user["host"], database)

    def list_users(
        self, limit: int | None = None, marker: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Tenant users, paged by ``"name@host"`` (the marker format). Reserved accounts (root at
        any host, os_admin, mariadb.sys, the engine's OS user) and roles are hidden."""
        with self._admin() as cur:
            cur.execute("SELECT User, Host FROM mysql.user WHERE is_role = 'N'")
            accounts = [(str(u), str(h)) for u, h in cur.fetchall()]
            cur.execute("SELECT User, Host, Db FROM mysql.db")
            grants: dict[tuple[str, str], set[str]] = {}
            for user, host, db in cur.fetchall():
                grants.setdefault((str(user), str(host)), set()).add(rules.grant_name(str(db)))
        items = [
            {
                "name": name,
                "host": host,
                "databases": [{"name": db} for db in sorted(grants.get((name, host), ()))],
            }
            for name, host in accounts
            if not self._is_hidden_user(name)
        ]
        return paginate(items, lambda u: f"{u['name']}@{u['host']}", limit, marker)

    def get_user(self, name: str, host: str = "%") -> dict[str, Any]:
        name, host = self._user_key(name, host)
        with self._admin() as cur:
            self._require_user(cur, name, host)
            databases = self._grants_of(cur, name, host)
        return {"name": name, "host": host, "databases": [{"name": db} for db in databases]}

    def update_user(self, name: str, host: str, attrs: dict[str, Any]) -> None:
        name, host = self._user_key(name, host)
        changes = rules.validate_user_update(attrs, self.reserved_users)
        new_name = changes.get("name", name)
        new_host = changes.get("host", host)
        with self._admin() as cur:
            self._require_user(cur, name, host)
            if (new_name, new_host) != (name, host):
                if self._user_exists(cur, new_name, new_host):
                    raise UserAlreadyExists(f"The user {new_name!r}@{new_host!r} already exists.")
                # RENAME USER carries the account's grants along.
                cur.execute("RENAME USER %s@%s TO %s@%s", (name, host, new_name, new_host))
            if "password" in changes:
                self._set_password(cur, new_name, new_host, changes["password"])

    def change_passwords(self, users: list[dict[str, Any]]) -> None:
        if not isinstance(users, list):
            raise ValidationError("The users must be a list of objects with a name and password.")
        wanted = []
        for user in users:
            if not isinstance(user, dict):
                raise ValidationError("Each user must be an object with a name and a password.")
            name, host = self._user_key(user.get("name"), user.get("host"))
            wanted.append((name, host, rules.validate_password(user.get("password"))))
        with self._admin() as cur:
            for name, host, _ in wanted:
                self._require_user(cur, name, host)
            for name, host, password in wanted:
                self._set_password(cur, name, host, password)

    def delete_user(self, name: str, host: str = "%") -> None:
        name, host = self._user_key(name, host)
        with self._admin() as cur:
            self._require_user(cur, name, host)
            cur.execute("DROP USER %s@%s", (name, host))

    # -- access -------------------------------------------------------------------------------

    def grant_access(self, name: str, host: str, databases: list[str]) -> None:
        name, host = self._user_key(name, host)
        wanted = rules.database_names(databases)
        with self._admin() as cur:
            self._require_user(cur, name, host)
            self._require_databases(wanted, self._database_names(cur))
            for database in wanted:
                self._grant(cur, name, host, database)

    def list_access(self, name: str, host: str = "%") -> list[dict[str, Any]]:
        name, host = self._user_key(name, host)
        with self._admin() as cur:
            self._require_user(cur, name, host)
            return [{"name": db} for db in self._grants_of(cur, name, host)]

    def revoke_access(self, name: str, host: str, database: str) -> None:
        """Revoke the user's grant on ``database``; no-op if it had none.

        DatabaseNotFound if the database does not exist, UserNotFound if the user does not.
        """
        name, host = self._user_key(name, host)
        database = rules.validate_database_name(database)
        with self._admin() as cur:
            self._require_user(cur, name, host)
            if database not in self._database_names(cur):
                raise DatabaseNotFound(f"The database {database!r} does not exist.")
            if database in self._grants_of(cur, name, host):
                self._revoke(cur, name, host, database)

    # -- root ---------------------------------------------------------------------------------

    def enable_root(self, password: str | None = None) -> dict[str, Any]:
        if password is None:
            password = secrets.token_urlsafe(24)
        else:
            password = rules.validate_password(password, "root password")
        with self._admin() as cur:
            cur.execute(
                "CREATE USER IF NOT EXISTS %s@%s IDENTIFIED BY %s", (ROOT_USER, ROOT_HOST, password)
            )
            self._set_password(cur, ROOT_USER, ROOT_HOST, password)
            cur.execute(
                "GRANT ALL PRIVILEGES ON *.* TO %s@%s WITH GRANT OPTION", (ROOT_USER, ROOT_HOST)
            )
        return {"name": ROOT_USER, "password": password}

    def disable_root(self) -> None:
        with self._admin() as cur:
            cur.execute("DROP USER IF EXISTS %s@%s", (ROOT_USER, ROOT_HOST))

    def is_root_enabled(self) -> bool:
        with self._admin() as cur:
            return self._user_exists(cur, ROOT_USER, ROOT_HOST)


def _error_code(exc: BaseException) -> int | None:
    args = getattr(exc, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def _engine_error(exc: pymysql.MySQLError) -> CofferError:
    """Turn a driver error into a Coffer error. Statements carry passwords only as parameters,
    which the server never echoes, so its message is safe to pass on."""
    code = _error_code(exc)
    message = str(exc.args[1]) if len(exc.args) > 1 else type(exc).__name__
    if code in _CONNECTION_ERRORS:
        return EngineUnavailable(f"Lost the connection to MariaDB (error {code}); try again.")
    if code == 1007:
        return DatabaseAlreadyExists(f"MariaDB says: {message}.")
    if code in (1008, 1049):
        return DatabaseNotFound(f"MariaDB says: {message}.")
    return EngineError(f"MariaDB refused the operation (error {code}): {message}.")
