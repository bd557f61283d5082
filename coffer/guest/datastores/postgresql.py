"""The PostgreSQL datastore: runs one ``postgres`` for an instance; its ``PostgreSQLCatalog``
(``postgresql_catalog.py``) manages the databases, users, grants and ``postgres`` superuser in it.

How the engine is laid out in the instance's volume (``InstanceLayout``)::

    etc/postgresql.conf     written by Coffer at every start from the flavor (edits are lost)
    etc/pg_hba.conf         written by Coffer at every start from the spec's allowed CIDRs
    etc/pg_ident.conf       empty: no ident maps
    data/                   the data directory; ``data/PG_VERSION`` exists once it is initialised
    run/.s.PGSQL.5432       the agent's only way in (as ``os_admin`` with a password)
    run/postgres.pid        the postmaster's pid, for adoption after an agent restart
    log/postgresql.log      the server's log (its stderr; no logging collector process)
    secrets/os_admin.password

Who can connect (``pg_hba.conf``): ``os_admin`` only over the unix socket (mode 0700, so only
the engine's OS user and root reach it), with its password; ``os_admin`` is rejected over TCP
from anywhere; every other role (tenant users and, once enabled, ``postgres``) over TCP from
``spec.allowed_cidrs`` only (everywhere when empty), with SCRAM-SHA-256. Nothing else matches,
so nothing else connects. Which database a user may enter is its ``CONNECT`` privilege: Coffer
revokes it from ``PUBLIC`` on every database it creates and grants it per user.

Secrets: ``initdb`` reads the admin password from a 0600 ``--pwfile`` deleted right after; a data
directory found without Coffer's password file (copied from a template or a backup) gets a fresh
one through a single-user-mode ``ALTER ROLE`` fed on stdin. Tenant and root passwords are turned
into SCRAM verifiers by libpq on the agent's side, so no statement the server sees (or could log)
holds a clear-text password, and the agent's own sessions switch statement logging off.

**Templates.** With ``spec.template_dir`` set, ``prepare`` copies a template
(``coffer.guest.datastores.template``) built once per PostgreSQL version and initdb flags
(``template_variant``) instead of running initdb. The template is initdb's output minus what a
copy must not share: no configuration files (Coffer writes its own into ``etc/``), no write-ahead
log, and an ``os_admin`` password verifier for a throwaway password that was never stored. Each
copy gets a new system identifier and mock-authentication nonce in ``global/pg_control``
(``pg_control.renew_identity``), a write-ahead log of its own from ``pg_resetwal``, and a fresh
admin password at its first start, so no two instances (and no instance and the template)
share an identity or a credential. Nothing else initdb writes is instance-specific: the
catalogs hold only built-in objects, and no path or host name is recorded.

A caveat for operators: root is a real PostgreSQL superuser, and a superuser can read files and
run programs as the engine's OS user (``COPY ... PROGRAM``, ``pg_read_file``). Where several
instances share that OS user, an instance's root can reach the others' files; give each instance
its own OS user (or container) before offering root to tenants who must not see each other.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import psycopg
from psycopg import errors as pg_errors

from coffer.errors import (
    CofferError,
    DatabaseAlreadyExists,
    DatabaseNotFound,
    EngineError,
    UserAlreadyExists,
    UserNotFound,
    ValidationError,
)
from coffer.guest.backup.archive import pg_archive_script, pg_archive_settings, script_path
from coffer.guest.backup.base import EngineAccess
from coffer.guest.backup.postgresql import PostgreSQLBackup
from coffer.guest.config.logs import LogSource, read_switches
from coffer.guest.config.postgresql import PostgreSQLOverrides
from coffer.guest.datastores import pg_control
from coffer.guest.datastores.base import (
    Capability,
    Datastore,
    EngineSpec,
    EngineUnavailable,
)
from coffer.guest.datastores.postgresql_catalog import (
    ADMIN_USER,
    MAINTENANCE_DB,
    Connection,
    PostgreSQLCatalog,
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

# sockaddr_un holds 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107
# Characters that would need quoting in postgresql.conf or split a list setting.
_UNSAFE_PATH = re.compile(r"[\s#'\"\\;=,]")
_VERSION = re.compile(r"\(PostgreSQL\)\s+(\d+(?:\.\d+)*)")
#: ``postgres --version`` takes tens of ms (a process start), once per create: cached per
#: binary (path, inode, mtime, size), so an upgraded binary is asked again and never paired
#: with an older version's template. The zygote fills it once for all its forks.
_VERSIONS: dict[tuple[str, int, int, int], str] = {}
_GENERATED_PASSWORD = re.compile(r"[A-Za-z0-9_-]+")
# The agent's sessions never log statement text: DDL carries password verifiers.
_ADMIN_OPTIONS = (
    "-c log_min_error_statement=panic -c log_statement=none -c log_min_duration_statement=-1 "
    "-c lock_timeout=30s"
)
# A postmaster that crashed leaves children that exit within moments; until they have, a new
# one refuses to start with this message, which is worth waiting out.
_SHARED_MEMORY_IN_USE = "pre-existing shared memory block"
_AUTH_FAILED = frozenset({"28P01", "28000"})
#: What every initdb run is given besides its directory, user and password file. A template is
#: keyed by them (see ``template_variant``): changing one gives templates a new variant.
_INITDB_FLAGS = (
    f"--username={ADMIN_USER}",
    "--auth=scram-sha-256",
    "--encoding=UTF8",
    "--locale=C.UTF-8",
    "--no-instructions",
)
#: Bumped when how templates are built changes in a way the flags above do not show.
_TEMPLATE_RECIPE = 1
#: initdb's own configuration files: Coffer writes its own into etc/ at every start.
_INITDB_CONFIG_FILES = ("postgresql.conf", "pg_hba.conf", "pg_ident.conf")


def template_variant() -> str:
    """The template variant for the current initdb flags (12 hex digits)."""
    recipe = {"recipe": _TEMPLATE_RECIPE, "flags": list(_INITDB_FLAGS)}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
    return digest[:12]


def bin_dir() -> Path | None:
    """The directory of the newest installed PostgreSQL server binaries, or None.

    Debian installs each major version under ``/usr/lib/postgresql/<major>/bin``; elsewhere
    ``postgres`` on the PATH is used when ``initdb`` sits beside it.
    """
    found: list[tuple[tuple[int, ...], Path]] = []
    for candidate in Path("/usr/lib/postgresql").glob("*/bin"):
        major = candidate.parent.name
        if re.fullmatch(r"\d+(\.\d+)?", major) and (candidate / "postgres").is_file():
            found.append((tuple(int(p) for p in major.split(".")), candidate))
    if found:
        return max(found)[1]
    binary = shutil.which("postgres") or shutil.which("postgres", path="/usr/sbin:/usr/bin")
    if binary is not None and (Path(binary).parent / "initdb").is_file():
        return Path(binary).parent
    return None


def memory_settings(memory_mb: int, vcpus: int, volume_size_gb: int) -> dict[str, str]:
    """Engine sizing for a flavor, chosen so a 256 MB instance runs and an idle one stays light.

    * ``shared_buffers`` = ram / 4, at least 16 MB (256 MB -> 64 MB, 1024 -> 256, 8192 -> 2048),
      PostgreSQL's usual quarter: the OS page cache holds the rest of the working set.
    * ``effective_cache_size`` = ram * 3 / 4 (256 MB -> 192 MB): a planner hint, not memory
      the server takes.
    * ``max_connections`` = ram / 8, between 25 and 500 (256 MB -> 32, 1024 -> 128, 4096 ->
      500): a connection costs a few MB of private memory plus ``work_mem`` per sort or hash.
    * ``work_mem`` = ram / 64, 1 to 64 MB (256 MB -> 4 MB, the server default);
      ``maintenance_work_mem`` = ram / 16, 16 MB to 1 GB.
    * ``max_wal_size`` = an eighth of the volume, 64 MB to 4 GB (1 GB volume -> 128 MB), so the
      write-ahead log cannot fill a small volume (the default, 1 GB, would fill a 1 GB one).
    * Workers follow the vCPUs: no parallel query on one vCPU, up to 4 workers per query.
    """
    buffers = max(16, memory_mb // 4)
    workers = max(4, min(vcpus * 2, 16))
    return {
        "shared_buffers": f"{buffers}MB",
        "effective_cache_size": f"{max(32, memory_mb * 3 // 4)}MB",
        "max_connections": str(max(25, min(memory_mb // 8, 500))),
        "work_mem": f"{max(1, min(memory_mb // 64, 64))}MB",
        "maintenance_work_mem": f"{max(16, min(memory_mb // 16, 1024))}MB",
        "max_wal_size": f"{max(64, min(volume_size_gb * 1024 // 8, 4096))}MB",
        "min_wal_size": "32MB",
        "max_worker_processes": str(workers),
        "max_parallel_workers": str(min(vcpus, workers)),
        "max_parallel_workers_per_gather": str(min(vcpus // 2, 4)),
        "max_parallel_maintenance_workers": str(min(vcpus // 2, 4)),
        "autovacuum_max_workers": str(max(1, min(vcpus, 3))),
    }


def client_networks(allowed_cidrs: Iterable[str]) -> list[str]:
    """The networks tenant clients may connect from, normalised; everywhere when none given."""
    networks = [str(ipaddress.ip_network(cidr, strict=False)) for cidr in allowed_cidrs]
    return list(dict.fromkeys(networks)) or ["0.0.0.0/0", "::/0"]


def render_hba(allowed_cidrs: Iterable[str]) -> str:
    """``pg_hba.conf`` for an instance: see the module docstring for who may connect."""
    rows = [
        # Base backups (pg_basebackup) are replication connections, which "all" does not match.
        ("local", "replication", ADMIN_USER, "", "scram-sha-256"),
        ("local", "all", ADMIN_USER, "", "scram-sha-256"),
        # First match wins: the agent's account never gets a password prompt over TCP.
        ("host", "all", ADMIN_USER, "0.0.0.0/0", "reject"),
        ("host", "all", ADMIN_USER, "::/0", "reject"),
    ]
    rows += [("host", "all", "all", net, "scram-sha-256") for net in client_networks(allowed_cidrs)]
    lines = [
        "# Written by Coffer at every start; edits here are lost.",
        "# TYPE  DATABASE  USER      ADDRESS      METHOD",
    ]
    lines += ["  ".join(f"{field:<9}" for field in row).rstrip() for row in rows]
    return "\n".join(lines) + "\n"


def _conf_value(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class PostgreSQLDatastore(Datastore):
    """PostgreSQL 15 (12 and later should work): databases, users, grants and root.

    See ``Datastore`` for the contract. Specific to PostgreSQL: users have no host (only ``%``
    is accepted); a grant is ``ALL`` on the database (connect, create schemas, temporary tables)
    plus ``USAGE, CREATE`` on its ``public`` schema, and a revoke takes both away and ends the
    user's sessions on that database; deleting a user gives what it owned to ``os_admin``
    (nothing is dropped with it); root is the ``postgres`` superuser, which logs in over TCP from
    the allowed networks while enabled. ``start`` of a running engine rewrites its configuration
    and reloads it when it changed, so new allowed CIDRs apply without a restart.
    """

    manager: ClassVar[str] = "postgresql"
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
        self._run_as = resolve_run_as(spec.run_as, "postgres")
        self.os_user = os_user_name(self._run_as)
        self._owner = None if self._run_as is None else self._run_as.name
        layout = spec.layout
        if _UNSAFE_PATH.search(str(layout.root.resolve())):
            raise ValidationError(
                f"The instance directory {layout.root} contains whitespace, quotes, commas or "
                "other characters PostgreSQL settings cannot hold; use a plain path."
            )
        self.config_file = layout.etc_dir / "postgresql.conf"
        self.hba_file = layout.etc_dir / "pg_hba.conf"
        self.ident_file = layout.etc_dir / "pg_ident.conf"
        self.socket = layout.run_dir / f".s.PGSQL.{spec.port}"
        self.pidfile = layout.run_dir / "postgres.pid"
        self.log_file = layout.log_dir / "postgresql.log"
        self.password_file = layout.secrets_dir / "os_admin.password"
        self._pwfile = layout.secrets_dir / "initdb.pwfile"
        if len(str(self.socket.resolve())) > _MAX_SOCKET_PATH:
            raise ValidationError(
                f"The socket path {self.socket} is longer than the {_MAX_SOCKET_PATH} bytes a "
                "unix socket allows; put the instance directory on a shorter path."
            )
        #: Accounts no API call may touch or see, besides those in ``postgresql_rules``.
        self.reserved_users = frozenset({self.os_user})
        self._process = EngineProcess(
            "postgres", self.pidfile, f"--config-file={self.config_file}", self._run_as
        )
        self._lock = threading.RLock()
        #: The SQL half: databases, users, grants and root.
        self.catalog = PostgreSQLCatalog(self._admin, self.reserved_users)
        #: Configuration group values: ALTER SYSTEM + reload (postgresql.auto.conf keeps them).
        self.overrides = PostgreSQLOverrides(
            layout, self._owner, self._process.pid, self._admin, self._reload
        )
        #: Backup and restore (``coffer.guest.backup``). A restore fills the empty data
        #: directory before the first start, in place of initdb.
        self.backups = PostgreSQLBackup(
            EngineAccess(layout, self._run_as, self.socket, self._admin_password, port=spec.port)
        )

    # -- installation -------------------------------------------------------------------------

    @classmethod
    def detect_version(cls) -> str | None:
        directory = bin_dir()
        if directory is None:
            return None
        binary = str(directory / "postgres")
        try:
            info = os.stat(binary)
        except OSError:
            return None
        key = (binary, info.st_ino, info.st_mtime_ns, info.st_size)
        if key in _VERSIONS:
            return _VERSIONS[key]
        try:
            result = subprocess.run(
                [binary, "--version"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        match = _VERSION.search(result.stdout)
        if match is None:
            return None
        _VERSIONS[key] = match.group(1)
        return match.group(1)

    def _binary(self, name: str) -> str:
        directory = bin_dir()
        if directory is None or not (directory / name).is_file():
            raise EngineError(f"{name} is not installed; install the PostgreSQL server.")
        return str(directory / name)

    def is_initialized(self) -> bool:
        """True once the data directory holds a cluster (``data/PG_VERSION``)."""
        return (self.layout.data_dir / "PG_VERSION").is_file()

    def _server_args(self) -> list[str]:
        """Settings given on the command line as well as in postgresql.conf: the command line
        wins over ``ALTER SYSTEM``, so a tenant superuser cannot move the server off its
        addresses or swap the access rules at the next restart."""
        layout, spec = self.layout, self.spec
        return [
            f"--config-file={self.config_file}",
            f"--hba-file={self.hba_file}",
            f"--ident-file={self.ident_file}",
            f"--listen-addresses={','.join(spec.bind_addresses)}",
            f"--port={spec.port}",
            f"--unix-socket-directories={layout.run_dir}",
            f"--external-pid-file={self.pidfile}",
        ]

    def render_config(self) -> str:
        """postgresql.conf for this instance, derived from the spec only."""
        layout, spec = self.layout, self.spec
        settings = {
            "data_directory": str(layout.data_dir),
            "hba_file": str(self.hba_file),
            "ident_file": str(self.ident_file),
            "external_pid_file": str(self.pidfile),
            "listen_addresses": ",".join(spec.bind_addresses),
            "port": str(spec.port),
            "unix_socket_directories": str(layout.run_dir),
            "unix_socket_permissions": "0700",
            "password_encryption": "scram-sha-256",
            "ssl": "off",
            **memory_settings(spec.memory_mb, spec.vcpus, spec.volume_size_gb),
            "huge_pages": "off",
            # No subscriptions are offered, so no launcher process idles for them.
            "max_logical_replication_workers": "0",
            # The log is the server's stderr, which the agent sends to log/postgresql.log; a
            # logging collector would be one more process per instance.
            "logging_collector": "off",
            "log_destination": "stderr",
            "log_line_prefix": "%m [%p] %q%u@%d ",
            **self.log_settings(),
            "log_timezone": "UTC",
            "timezone": "UTC",
            "lc_messages": "C",
            "lc_monetary": "C",
            "lc_numeric": "C",
            "lc_time": "C",
            "datestyle": "iso, mdy",
            "default_text_search_config": "pg_catalog.english",
            # Completed WAL files go to a spool the agent's archiver uploads (backup/archive.py).
            **pg_archive_settings(layout),
        }
        lines = ["# Written by Coffer at every start; edits here are lost."]
        lines += [f"{key} = {_conf_value(value)}" for key, value in settings.items()]
        return "\n".join(lines) + "\n"

    def render_hba(self) -> str:
        """pg_hba.conf for this instance (see ``render_hba``)."""
        return render_hba(self.spec.allowed_cidrs)

    def _write_config(self) -> bool:
        """Write the three configuration files; True if any of them changed."""
        wanted = {
            self.config_file: self.render_config(),
            self.hba_file: self.render_hba(),
            self.ident_file: "# Written by Coffer: no ident maps.\n",
            script_path(self.layout): pg_archive_script(self.layout),
        }
        changed = False
        for path, content in wanted.items():
            try:
                if path.read_text() == content:
                    continue
            except OSError:
                pass
            write_private_file(path, content, self._owner, mode=0o640)
            changed = True
        return changed

    def _run_as_engine(self, argv: list[str], what: str, stdin: str | None = None) -> str:
        """Run a PostgreSQL tool as the engine's user; its output, or EngineError on failure."""
        run_as = self._run_as
        try:
            result = subprocess.run(
                argv,
                cwd=self.layout.root,
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"},
                input=stdin,
                stdin=None if stdin is not None else subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
                user=None if run_as is None else run_as.uid,
                group=None if run_as is None else run_as.gid,
                extra_groups=None if run_as is None else [],
                umask=0o077,
            )
        except subprocess.TimeoutExpired:
            raise EngineError(f"{what} did not finish within 10 minutes.") from None
        output = (result.stdout + result.stderr).strip()
        if result.returncode != 0:
            raise EngineError(
                f"{what} failed with exit code {result.returncode}: "
                + " | ".join(self._scrub(output.splitlines()[-8:]))
            )
        return output

    def _initialize(self) -> None:
        """Create a cluster with initdb in a staging directory, then move it into ``data/``.

        ``PG_VERSION`` is moved last, so an interrupted move is seen as "not initialised" and is
        redone; an interrupted initdb leaves only the staging directory behind. A data directory
        copied from a template is installed the same way (``_copy_template``).
        """
        data_dir = self.layout.data_dir
        self._require_empty_data_dir()
        initdb = self._binary("initdb")
        staging = self._new_staging()
        password = self._admin_password(create=True)
        write_private_file(self._pwfile, password + "\n", self._owner)
        try:
            self._run_as_engine(
                [initdb, f"--pgdata={staging}", f"--pwfile={self._pwfile}", *_INITDB_FLAGS],
                "initdb",
            )
        except EngineError:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            self._pwfile.unlink(missing_ok=True)
        self._install_data_dir(staging)
        LOG.info("initialised PostgreSQL data directory %s", data_dir)

    def _require_empty_data_dir(self) -> None:
        data_dir = self.layout.data_dir
        leftovers = [p.name for p in data_dir.iterdir()]
        if leftovers:
            raise EngineError(
                f"The data directory {data_dir} holds files ({', '.join(sorted(leftovers)[:5])}) "
                "but no cluster; Coffer will not initialise over them. Empty it or restore a "
                "complete data directory."
            )

    def _new_staging(self) -> Path:
        """An empty ``.data-init`` beside ``data/`` (owned by the engine user, 0700)."""
        staging = self.layout.root / ".data-init"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(mode=0o700)
        chown_to(staging, self._owner)
        return staging

    # -- templates ----------------------------------------------------------------------------

    def _template_store(self) -> TemplateStore | None:
        directory = self.spec.template_dir
        if directory is None:
            return None
        if not directory.is_absolute():
            LOG.warning("ignoring the template directory %s: it is not an absolute path", directory)
            return None
        return TemplateStore(directory, owner=self._owner)

    def _copy_template(self) -> bool:
        """Fill the empty data directory from the host's template (built first if there is
        none), with an identity of its own. False when there is no usable store or the copy
        failed: the caller then runs initdb itself. EngineError from building (initdb failing)
        propagates: initdb by hand would fail the same way.

        The copy goes to ``.data-init``, gets a new system identifier and nonce
        (``pg_control.renew_identity``) and a write-ahead log of its own (``pg_resetwal``),
        and only then moves into ``data/`` with ``PG_VERSION`` last, so an interrupted copy is
        redone from the start. The admin password file is removed first: the copy's
        ``os_admin`` gets its own password at its first start (``_reset_admin_password``).
        """
        store = self._template_store()
        version = self.detect_version()
        if store is None or version is None:
            return False
        self._require_empty_data_dir()
        staging = self._new_staging()
        try:
            template = store.get_or_build(
                self.manager, version, template_variant(), self._build_template
            )
            if not store.take_spare(template, staging):
                store.copy_into(template, staging)
        except TemplateError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            LOG.warning("initialising without a template: %s", exc.message)
            return False
        try:
            pg_control.renew_identity(staging)
            self._run_as_engine(
                [self._binary("pg_resetwal"), "-D", str(staging)], "Resetting the copied WAL"
            )
        except EngineError:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        # Whatever password an earlier, interrupted initialisation stored is not this copy's.
        self.password_file.unlink(missing_ok=True)
        self._install_data_dir(staging)
        LOG.info("data directory %s copied from template %s", self.layout.data_dir, template.name)
        return True

    def _build_template(self, tree: Path, scratch: Path) -> None:
        """initdb into ``tree`` with the instances' own flags and a throwaway admin password
        that is never stored (so the template's password verifier opens nothing), then drop
        what each copy makes its own: initdb's configuration files and the write-ahead log
        (every copy writes a new one with its own system identifier)."""
        pwfile = scratch / "initdb.pwfile"
        write_private_file(pwfile, secrets.token_urlsafe(32) + "\n", self._owner)
        try:
            self._run_as_engine(
                [self._binary("initdb"), f"--pgdata={tree}", f"--pwfile={pwfile}", *_INITDB_FLAGS],
                "initdb (template)",
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if not (tree / "PG_VERSION").is_file() or not (tree / "global" / "pg_control").is_file():
            raise EngineError("initdb finished but wrote no cluster; check its installation.")
        for name in _INITDB_CONFIG_FILES:
            (tree / name).unlink(missing_ok=True)
        for segment in (tree / "pg_wal").iterdir():
            if segment.is_file():
                segment.unlink()

    def _install_data_dir(self, staging: Path) -> None:
        # Coffer's own configuration lives in etc/; initdb's copies would only mislead.
        for name in _INITDB_CONFIG_FILES:
            (staging / name).unlink(missing_ok=True)
        entries = sorted(staging.iterdir(), key=lambda p: (p.name == "PG_VERSION", p.name))
        for entry in entries:
            entry.replace(self.layout.data_dir / entry.name)
        staging.rmdir()

    def _reset_admin_password(self) -> str:
        """Give ``os_admin`` a fresh password in single-user mode (the server must be stopped).

        For a data directory this instance did not initialise (a template or a backup copy), so
        it never shares credentials with the instance it came from. The statement goes in on
        stdin, never on a command line, and statement logging is off for it.
        """
        password = secrets.token_urlsafe(32)
        if not _GENERATED_PASSWORD.fullmatch(password):  # pragma: no cover - token_urlsafe
            raise EngineError("Generated an admin password that cannot be quoted safely.")
        statements = (
            f"DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{ADMIN_USER}') "
            f"THEN CREATE ROLE {ADMIN_USER}; END IF; END$$;\n"
            f"ALTER ROLE {ADMIN_USER} WITH SUPERUSER LOGIN PASSWORD '{password}';\n"
        )
        output = self._run_as_engine(
            [
                self._binary("postgres"),
                "--single",
                "-D",
                str(self.layout.data_dir),
                f"--config-file={self.config_file}",
                "-c",
                "log_min_error_statement=panic",
                "-c",
                "log_statement=none",
                "-c",
                "listen_addresses=",
                MAINTENANCE_DB,
            ],
            "Resetting the admin password",
            stdin=statements,
        )
        if "ERROR" in output:
            raise EngineError(
                "Could not reset the admin password in single-user mode: "
                + " | ".join(self._scrub(output.splitlines()[-4:], password))
            )
        write_private_file(self.password_file, password + "\n", self._owner)
        LOG.info("gave os_admin a fresh password in %s", self.layout.data_dir)
        return password

    # -- lifecycle ----------------------------------------------------------------------------

    def prepare(self, databases: list[dict[str, Any]], users: list[dict[str, Any]]) -> None:
        wanted_dbs = self.catalog.validate_databases(databases)
        wanted_users = self.catalog.validate_users(users)
        with self._lock:
            self.layout.create(self._owner)
            if not self.is_initialized() and not self._copy_template():
                self._initialize()
            self.start()
        self.catalog.ensure(wanted_dbs, wanted_users)

    def start(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        with self._lock:
            running = self._process.pid()
            if running is not None:
                self._wait_ready(deadline, log_offset=None)
                if self._write_config():
                    self._reload()
                if not self._process.is_child(running):
                    LOG.info("adopted the running postgres (pid %s)", running)
                return
            if not self.is_initialized():
                raise EngineError(
                    f"The data directory {self.layout.data_dir} is not initialised; "
                    "run prepare first."
                )
            self._write_config()
            if self._known_password() is None:
                self._reset_admin_password()
            self._process.forget_stale_pidfile()
            while True:
                offset = self._log_size()
                self._process.spawn(
                    [
                        self._binary("postgres"),
                        "-D",
                        str(self.layout.data_dir),
                        *self._server_args(),
                    ],
                    cwd=self.layout.root,
                    console_log=self.log_file,
                )
                try:
                    self._wait_ready(deadline, log_offset=offset)
                except _SharedMemoryInUse:
                    if time.monotonic() >= deadline:
                        raise EngineError(
                            "postgres cannot start: processes of its previous run still hold "
                            "its shared memory. Try again in a moment."
                        ) from None
                    time.sleep(0.1)
                    continue
                break
            LOG.info(
                "postgres started (pid %s), listening on %s port %s",
                self._process.pid(),
                ",".join(self.spec.bind_addresses),
                self.spec.port,
            )

    def _wait_ready(self, deadline: float, log_offset: int | None) -> None:
        self._admin_password()  # no credentials: waiting cannot help
        while True:
            if self._process.pid() is None:
                code = self._process.exit_code()
                how = f" with exit code {code}" if code is not None else ""
                tail = self._log_tail(6, log_offset)
                if any(_SHARED_MEMORY_IN_USE in line for line in tail):
                    raise _SharedMemoryInUse(" | ".join(tail))
                raise EngineError(
                    f"postgres exited during start{how}. Last lines of its log: " + " | ".join(tail)
                )
            try:
                with self._admin(connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                    return
            except EngineUnavailable as exc:
                if _is_auth_failure(exc.__cause__):
                    raise EngineError(
                        "postgres runs but rejects Coffer's admin password; stop the instance "
                        "and delete its secrets/os_admin.password so the next start resets it."
                    ) from None
            if time.monotonic() >= deadline:
                raise EngineUnavailable(
                    "postgres did not answer in time; it may still be recovering. "
                    "Last lines of its log: " + " | ".join(self._log_tail(3, log_offset))
                )
            time.sleep(0.05)

    def _reload(self) -> None:
        """Make the running server read its configuration again, and wait until it has."""
        with self._admin() as conn:
            # A changed parameter that needs a restart (a configuration group's, from ALTER
            # SYSTEM) "could not be applied" by a reload: it is pending, not wrong.
            bad = conn.execute(
                "SELECT 'pg_hba.conf line ' || line_number || ': ' || error "
                "FROM pg_hba_file_rules WHERE error IS NOT NULL UNION ALL "
                "SELECT sourcefile || ' line ' || sourceline || ': ' || error "
                "FROM pg_file_settings f WHERE error IS NOT NULL AND NOT ("
                "error = 'setting could not be applied' AND EXISTS (SELECT FROM pg_settings s "
                "WHERE lower(s.name) = lower(f.name) AND s.context = 'postmaster'))"
            ).fetchall()
            if bad:
                raise EngineError(
                    "PostgreSQL does not accept the configuration Coffer wrote: "
                    + "; ".join(str(row[0]) for row in bad[:3])
                )
            row = conn.execute("SELECT pg_conf_load_time(), pg_reload_conf()").fetchone()
        loaded_before = row[0] if row else None
        # New sessions inherit the postmaster's load time, so a later one proves the reload.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with self._admin() as conn:
                row = conn.execute("SELECT pg_conf_load_time()").fetchone()
            if row is not None and row[0] != loaded_before:
                LOG.info("postgres reloaded its configuration")
                return
            time.sleep(0.02)
        raise EngineUnavailable("postgres did not reload its configuration within 10 s.")

    # -- guest logs (coffer.guest.logs) ------------------------------------------------------

    def log_sources(self) -> dict[str, LogSource]:
        """The engine's logs (``coffer.guest.config.logs``): all in the one server log, the
        general and slow query logs as views of its statement and duration entries."""
        return {
            "error": LogSource(self.log_file),
            "general": LogSource(self.log_file, view="postgresql-statements"),
            "slow_query": LogSource(self.log_file, view="postgresql-durations"),
        }

    def log_settings(self) -> dict[str, str]:
        """What ``etc/logs.json`` asks of ``postgresql.conf``. Tenant sessions' statements are
        logged as sent; the agent's own sessions switch statement logging off."""
        switches = read_switches(self.layout)
        slow = switches.is_on("slow_query")
        return {
            "log_statement": "all" if switches.is_on("general") else "none",
            "log_min_duration_statement": str(switches.long_query_ms) if slow else "-1",
        }

    def apply_log_switches(self) -> set[str]:
        """Make the running server follow ``etc/logs.json``: rewrite ``postgresql.conf`` and
        reload (both settings take a reload); returns the logs that wait for a restart."""
        if self._write_config():
            self._reload()
        names = {"log_statement": "general", "log_min_duration_statement": "slow_query"}
        with self._admin() as conn:
            rows = conn.execute(
                "SELECT name FROM pg_settings WHERE pending_restart AND name = ANY(%s)",
                (list(names),),
            ).fetchall()
        return {names[str(row[0])] for row in rows}

    def _admin_password(self, create: bool = False) -> str:
        password = self._known_password()
        if password is not None:
            return password
        if not create:
            raise EngineUnavailable(
                "PostgreSQL has not been started by Coffer yet (no admin credentials)."
            )
        password = secrets.token_urlsafe(32)
        write_private_file(self.password_file, password + "\n", self._owner)
        return password

    def _known_password(self) -> str | None:
        try:
            return self.password_file.read_text().strip() or None
        except OSError:
            return None

    def _log_size(self) -> int:
        try:
            return self.log_file.stat().st_size
        except OSError:
            return 0

    def _log_tail(self, lines: int, offset: int | None = None) -> list[str]:
        try:
            with self.log_file.open("rb") as handle:
                if offset is not None:
                    handle.seek(offset)
                text = handle.read().decode(errors="replace")
        except OSError:
            return []
        return self._scrub([line.strip() for line in text.splitlines()[-lines:]])

    def _scrub(self, lines: list[str], *extra_secrets: str) -> list[str]:
        hidden = [s for s in (self._known_password(), *extra_secrets) if s]
        for secret in hidden:
            lines = [line.replace(secret, "***") for line in lines]
        return lines

    def stop(self, timeout: float = 60) -> None:
        with self._lock:
            pid = self._process.pid()
            if pid is not None:
                # Fast shutdown: SIGTERM alone (what terminate sends) would wait for every
                # client to disconnect on its own.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGINT)
            if not self._process.terminate(timeout):
                raise EngineError(
                    f"postgres did not shut down within {timeout:g} s and was killed; it will "
                    "recover from its write-ahead log at the next start."
                )

    def is_running(self) -> bool:
        return self._process.pid() is not None

    def status(self) -> ServiceStatus:
        return engine_status(self._process, self._answers)

    def _answers(self) -> bool:
        try:
            with self._admin(connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return True
        except CofferError:
            return False

    # -- connection and errors ----------------------------------------------------------------

    @contextlib.contextmanager
    def _admin(
        self, dbname: str = MAINTENANCE_DB, connect_timeout: float = 10
    ) -> Iterator[Connection]:
        """A connection on the unix socket as os_admin, autocommit; psycopg errors become ours."""
        password = self._admin_password()
        try:
            conn = psycopg.connect(
                host=str(self.layout.run_dir),
                port=self.spec.port,
                user=ADMIN_USER,
                password=password,
                dbname=dbname,
                connect_timeout=max(2, int(connect_timeout)),
                autocommit=True,
                application_name="coffer-guest",
                options=_ADMIN_OPTIONS,
                sslmode="disable",
            )
        except psycopg.Error as exc:
            # libpq reports a refused connection as text only (no SQLSTATE); the server's
            # messages are in English (lc_messages = C), so the text is stable.
            if exc.sqlstate == "3D000" or f'database "{dbname}" does not exist' in str(exc):
                raise DatabaseNotFound(f"The database {dbname!r} does not exist.") from None
            raise EngineUnavailable(
                f"PostgreSQL is not answering on its socket ({_short(exc)}); "
                "is the instance running?"
            ) from exc
        try:
            yield conn
        except psycopg.Error as exc:
            raise _engine_error(exc) from None
        finally:
            conn.close()

    # -- databases, users, access and root: the catalog does the SQL ------------------------

    def create_databases(self, databases: list[dict[str, Any]]) -> None:
        self.catalog.create_databases(databases)

    def list_databases(
        self, limit: int | None = None, marker: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        return self.catalog.list_databases(limit, marker)

    def delete_database(self, name: str) -> None:
        self.catalog.delete_database(name)

    def create_users(self, users: list[dict[str, Any]]) -> None:
        self.catalog.create_users(users)

    def list_users(
        self, limit: int | None = None, marker: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        return self.catalog.list_users(limit, marker)

    def get_user(self, name: str, host: str = "%") -> dict[str, Any]:
        return self.catalog.get_user(name, host)

    def update_user(self, name: str, host: str, attrs: dict[str, Any]) -> None:
        self.catalog.update_user(name, host, attrs)

    def change_passwords(self, users: list[dict[str, Any]]) -> None:
        self.catalog.change_passwords(users)

    def delete_user(self, name: str, host: str = "%") -> None:
        self.catalog.delete_user(name, host)

    def grant_access(self, name: str, host: str, databases: list[str]) -> None:
        self.catalog.grant_access(name, host, databases)

    def list_access(self, name: str, host: str = "%") -> list[dict[str, Any]]:
        return self.catalog.list_access(name, host)

    def revoke_access(self, name: str, host: str, database: str) -> None:
        self.catalog.revoke_access(name, host, database)

    def enable_root(self, password: str | None = None) -> dict[str, Any]:
        return self.catalog.enable_root(password)

    def disable_root(self) -> None:
        self.catalog.disable_root()

    def is_root_enabled(self) -> bool:
        return self.catalog.is_root_enabled()


class _SharedMemoryInUse(EngineError):
    """The previous postmaster's children still hold its shared memory (start again shortly)."""


def _is_auth_failure(exc: BaseException | None) -> bool:
    """True if a connection was refused for its credentials (not for being down)."""
    if not isinstance(exc, psycopg.Error):
        return False
    return exc.sqlstate in _AUTH_FAILED or "password authentication failed" in str(exc)


def _short(exc: psycopg.Error) -> str:
    """The first line of a driver error, which names the problem without statement text."""
    diag = getattr(exc, "diag", None)
    primary = diag.message_primary if diag is not None else None
    text = primary or (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
    return text.strip().rstrip(".")


def _engine_error(exc: psycopg.Error) -> CofferError:
    """Turn a driver error into a Coffer error. Statements carry passwords only as verifiers,
    and the message's primary text never quotes a statement, so it is safe to pass on."""
    state = exc.sqlstate or ""
    message = _short(exc)
    if isinstance(exc, psycopg.OperationalError) and (not state or state[:2] in ("08", "57")):
        return EngineUnavailable(f"Lost the connection to PostgreSQL ({message}); try again.")
    if isinstance(exc, pg_errors.DuplicateDatabase):
        return DatabaseAlreadyExists(f"PostgreSQL says: {message}.")
    if isinstance(exc, pg_errors.InvalidCatalogName):
        return DatabaseNotFound(f"PostgreSQL says: {message}.")
    if isinstance(exc, pg_errors.DuplicateObject):
        return UserAlreadyExists(f"PostgreSQL says: {message}.")
    if isinstance(exc, pg_errors.UndefinedObject):
        return UserNotFound(f"PostgreSQL says: {message}.")
    return EngineError(f"PostgreSQL refused the operation ({state or 'no code'}): {message}.")
