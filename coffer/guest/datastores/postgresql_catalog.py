"""Databases, users, grants and root of one PostgreSQL server: its catalog as a tenant sees it.

``PostgreSQLCatalog`` is the SQL half of ``PostgreSQLDatastore``, which owns one and hands it a
way to open admin connections; the datastore runs the server, the catalog changes what is in it.
Every method validates its arguments with ``postgresql_rules`` before it connects, names go into
SQL only through ``psycopg.sql.Identifier``, and passwords only as SCRAM verifiers computed by
libpq here, so the server never sees (or logs) a clear-text password. Errors are Coffer errors:
the connection factory maps driver errors, and the methods raise the not-found and
already-exists errors of the ``Datastore`` contract themselves.

How access works: Coffer revokes ``CONNECT`` (and everything else) from ``PUBLIC`` on each
database it creates; a grant gives a user ``ALL`` on the database (connect, create schemas,
temporary tables) plus ``USAGE, CREATE`` on its ``public`` schema; a revoke takes both away and
ends the user's sessions on that database, so a revoked user really cannot connect. Root is the
``postgres`` superuser, created or re-enabled with a password and disabled with ``NOLOGIN``.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

from coffer.datastores import postgresql_rules as rules
from coffer.errors import (
    DatabaseAlreadyExists,
    DatabaseNotFound,
    UserAlreadyExists,
    UserNotFound,
    ValidationError,
)
from coffer.guest.datastores.base import paginate

ADMIN_USER = "os_admin"
ROOT_USER = "postgres"
#: The database the agent connects to for instance-wide work.
MAINTENANCE_DB = "postgres"

_SCRAM = b"scram-sha-256"
_TERMINATE_WAIT_MS = 5000

Connection = psycopg.Connection[Any]
#: Opens an admin connection to a database (default: ``MAINTENANCE_DB``), autocommit, with
#: driver errors turned into Coffer errors.
AdminConnect = Callable[..., contextlib.AbstractContextManager[Connection]]


def _locale_key(locale: str) -> str:
    """Locale names as glibc matches them: ``C.UTF-8`` and ``C.utf8`` are the same locale."""
    lang, dot, rest = locale.partition(".")
    codeset, at, modifier = rest.partition("@")
    codeset = "".join(ch for ch in codeset.lower() if ch.isalnum())
    return f"{lang.lower()}{dot}{codeset}{at}{modifier.lower()}"


class PostgreSQLCatalog:
    """The ``Datastore`` contract's database, user and root operations for one server.

    ``connect`` opens admin connections (see ``AdminConnect``); ``reserved_users`` are accounts
    besides those in ``postgresql_rules`` that no call may touch or see (the engine's OS user).
    Thread-safe: each call uses its own connections.
    """

    def __init__(self, connect: AdminConnect, reserved_users: frozenset[str]) -> None:
        self._connect = connect
        self.reserved_users = reserved_users

    def ensure(self, databases: list[dict[str, Any]], users: list[dict[str, Any]]) -> None:
        """Create what is missing of already validated databases and users (``prepare``).

        Safe to repeat: an existing database is only closed to PUBLIC again, an existing user
        gets the request's password, and grants are given again. The engine's own ``postgres``
        and ``template1`` databases are closed to PUBLIC too: tenants enter only what they are
        granted (root still enters everything).
        """
        with self._connect() as conn:
            locales = self._resolve_locales(conn, databases)
            existing = self._database_names(conn)
            given = {db["name"] for db in databases}
            for user in users:
                self._require_databases(user["databases"], existing | given)
            for name in (MAINTENANCE_DB, "template1"):
                self._close_to_public(conn, name)
            for db in databases:
                if db["name"] not in existing:
                    self._create_database(conn, db, locales[db["name"]])
                else:
                    self._close_to_public(conn, db["name"])
            for user in users:
                if self._role_exists(conn, user["name"]):
                    self._set_password(conn, user["name"], user["password"])
                else:
                    self._create_role(conn, user["name"], user["password"])
        for user in users:
            for name in user["databases"]:
                self._grant(user["name"], name)

    @staticmethod
    def _verifier(conn: Connection, name: str, password: str) -> sql.Literal:
        """The SCRAM verifier libpq computes for ``password``; the server never sees the text."""
        secret = conn.pgconn.encrypt_password(password.encode(), name.encode(), _SCRAM)
        return sql.Literal(secret.decode("ascii"))

    # -- validation ---------------------------------------------------------------------------

    def validate_databases(self, databases: Any) -> list[dict[str, Any]]:
        if not isinstance(databases, list):
            raise ValidationError("The databases must be a list of objects with a 'name'.")
        result = [rules.validate_database(db) for db in databases]
        names = [db["name"] for db in result]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValidationError(f"The database {dupes[0]!r} is given more than once.")
        return result

    def validate_users(self, users: Any) -> list[dict[str, Any]]:
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

    @staticmethod
    def _resolve_locales(
        conn: Connection, databases: list[dict[str, Any]]
    ) -> dict[str, str | None]:
        """The locale each database gets (None: the server default), asked of the server.

        Refuses a locale the server does not have, or one whose encoding differs from the
        database's, before anything is created.
        """
        if not databases:
            return {}
        row = conn.execute(
            "SELECT datcollate, pg_encoding_to_char(encoding) FROM pg_database "
            "WHERE datname = 'template0'"
        ).fetchone()
        default_locale, default_encoding = (str(row[0]), str(row[1])) if row else ("C", "UTF8")
        available: dict[str, tuple[str, str | None]] = {
            _locale_key(default_locale): (default_locale, default_encoding),
        }
        for name, encoding in conn.execute(
            "SELECT collcollate, CASE WHEN collencoding = -1 THEN NULL "
            "ELSE pg_encoding_to_char(collencoding) END "
            "FROM pg_collation WHERE collprovider = 'c'"
        ).fetchall():
            key = _locale_key(str(name))
            # "C" is listed for any encoding and again (ucs_basic) for UTF8: the wider one wins.
            if key not in available or (encoding is None and available[key][1] is not None):
                available[key] = (str(name), encoding)
        result: dict[str, str | None] = {}
        for db in databases:
            encoding, wanted = db["character_set"], db["collate"]
            if wanted is None:
                # The default locale holds only its own encoding; C holds any.
                result[db["name"]] = None if encoding == default_encoding else "C"
                continue
            found = available.get(_locale_key(wanted))
            if found is None:
                choices = ", ".join(sorted({n for n, _ in available.values()}))
                raise ValidationError(
                    f"The collation {wanted!r} is not a locale this server has; choose one of: "
                    f"{choices}."
                )
            locale, needs = found
            if needs is not None and needs != encoding and encoding != "SQL_ASCII":
                raise ValidationError(
                    f"The collation {wanted!r} needs character set {needs}, not {encoding}; "
                    "give a matching pair, or use collation 'C' for any character set."
                )
            result[db["name"]] = locale
        return result

    def _require_databases(self, names: list[str], existing: set[str]) -> None:
        missing = [name for name in names if name not in existing]
        if missing:
            raise DatabaseNotFound(f"The database {missing[0]!r} does not exist; create it first.")

    # -- queries ------------------------------------------------------------------------------

    @staticmethod
    def _database_names(conn: Connection) -> set[str]:
        return {str(row[0]) for row in conn.execute("SELECT datname FROM pg_database")}

    @staticmethod
    def _role_exists(conn: Connection, name: str) -> bool:
        cur = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,))
        return cur.fetchone() is not None

    def _require_user(self, conn: Connection, name: str) -> None:
        cur = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s AND rolcanlogin", (name,))
        if cur.fetchone() is None:
            raise UserNotFound(f"The user {name!r} does not exist.")

    @staticmethod
    def _grants(conn: Connection, name: str | None = None) -> list[tuple[str, str]]:
        """``(user, database)`` pairs where the database's ACL grants the user CONNECT."""
        query = (
            "SELECT r.rolname, d.datname FROM pg_database d "
            "CROSS JOIN LATERAL aclexplode(d.datacl) AS a "
            "JOIN pg_roles r ON r.oid = a.grantee WHERE a.privilege_type = 'CONNECT'"
        )
        if name is None:
            rows = conn.execute(query).fetchall()
        else:
            rows = conn.execute(query + " AND r.rolname = %s", (name,)).fetchall()
        return [(str(user), str(db)) for user, db in rows]

    def _is_hidden_user(self, name: str) -> bool:
        lowered = name.lower()
        return (
            lowered in rules.RESERVED_USERS
            or lowered.startswith(rules.RESERVED_USER_PREFIX)
            or lowered in {u.lower() for u in self.reserved_users}
        )

    @staticmethod
    def _is_hidden_database(name: str) -> bool:
        return name.lower() in rules.RESERVED_DATABASES

    # -- statements ---------------------------------------------------------------------------

    def _create_database(self, conn: Connection, db: dict[str, Any], locale: str | None) -> None:
        statement = sql.SQL("CREATE DATABASE {} WITH TEMPLATE template0 ENCODING {}").format(
            sql.Identifier(db["name"]), sql.Literal(db["character_set"])
        )
        if locale is not None:
            statement += sql.SQL(" LC_COLLATE {0} LC_CTYPE {0}").format(sql.Literal(locale))
        conn.execute(statement)
        self._close_to_public(conn, db["name"])

    @staticmethod
    def _close_to_public(conn: Connection, database: str) -> None:
        # Every role may connect to a new database by default; here only granted users may.
        conn.execute(
            sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(database))
        )

    def _create_role(self, conn: Connection, name: str, password: str) -> None:
        conn.execute(
            sql.SQL(
                "CREATE ROLE {} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION "
                "PASSWORD {}"
            ).format(sql.Identifier(name), self._verifier(conn, name, password))
        )

    def _set_password(self, conn: Connection, name: str, password: str) -> None:
        conn.execute(
            sql.SQL("ALTER ROLE {} WITH LOGIN PASSWORD {}").format(
                sql.Identifier(name), self._verifier(conn, name, password)
            )
        )

    @staticmethod
    def _terminate(conn: Connection, user: str, database: str | None = None) -> None:
        """End the user's sessions (on one database, or all), waiting until they are gone."""
        query = (
            "SELECT pg_terminate_backend(pid, %s) FROM pg_stat_activity "
            "WHERE usename = %s AND pid <> pg_backend_pid()"
        )
        params: tuple[Any, ...] = (_TERMINATE_WAIT_MS, user)
        if database is not None:
            query += " AND datname = %s"
            params += (database,)
        conn.execute(query, params)

    def _public_schema_privileges(self, verb: str, user: str, database: str) -> None:
        """GRANT or REVOKE the user's use of the database's ``public`` schema, if it has one."""
        with self._connect(database) as conn:
            if conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = 'public'").fetchone():
                template = (
                    "GRANT USAGE, CREATE ON SCHEMA public TO {}"
                    if verb == "GRANT"
                    else "REVOKE ALL ON SCHEMA public FROM {}"
                )
                conn.execute(sql.SQL(template).format(sql.Identifier(user)))

    def _grant(self, user: str, database: str) -> None:
        with self._connect() as conn:
            conn.execute(
                sql.SQL("GRANT ALL ON DATABASE {} TO {}").format(
                    sql.Identifier(database), sql.Identifier(user)
                )
            )
        self._public_schema_privileges("GRANT", user, database)

    def _revoke(self, user: str, database: str) -> None:
        with self._connect() as conn:
            conn.execute(
                sql.SQL("REVOKE ALL ON DATABASE {} FROM {}").format(
                    sql.Identifier(database), sql.Identifier(user)
                )
            )
            # New sessions are refused from here on; end the ones already open.
            self._terminate(conn, user, database)
        self._public_schema_privileges("REVOKE", user, database)

    # -- databases ----------------------------------------------------------------------------

    def create_databases(self, databases: list[dict[str, Any]]) -> None:
        wanted = self.validate_databases(databases)
        with self._connect() as conn:
            locales = self._resolve_locales(conn, wanted)
            existing = self._database_names(conn)
            for db in wanted:
                if db["name"] in existing:
                    raise DatabaseAlreadyExists(f"The database {db['name']!r} already exists.")
            for db in wanted:
                self._create_database(conn, db, locales[db["name"]])

    def list_databases(
        self, limit: int | None = None, marker: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT datname, pg_encoding_to_char(encoding), datcollate FROM pg_database"
            ).fetchall()
        items = [
            {"name": str(name), "character_set": str(encoding), "collate": str(collate)}
            for name, encoding, collate in rows
            if not self._is_hidden_database(str(name))
        ]
        return paginate(items, lambda db: str(db["name"]), limit, marker)

    def delete_database(self, name: str) -> None:
        """Drop the database, ending the sessions on it first (``WITH (FORCE)``)."""
        name = rules.validate_database_name(name)
        with self._connect() as conn:
            if name not in self._database_names(conn):
                raise DatabaseNotFound(f"The database {name!r} does not exist.")
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))

    # -- users --------------------------------------------------------------------------------

    def create_users(self, users: list[dict[str, Any]]) -> None:
        wanted = self.validate_users(users)
        with self._connect() as conn:
            existing = self._database_names(conn)
            for user in wanted:
                if self._role_exists(conn, user["name"]):
                    raise UserAlreadyExists(f"The user {user['name']!r} already exists.")
                self._require_databases(user["databases"], existing)
            for user in wanted:
                self._create_role(conn, user["name"], user["password"])
        for user in wanted:
            for database in user["databases"]:
                self._grant(user["name"], database)

    def list_users(
        self, limit: int | None = None, marker: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Login roles with their databases, paged by name (the marker is a user name).

        Reserved accounts (postgres, os_admin, pg_*, the engine's OS user) are hidden.
        """
        with self._connect() as conn:
            names = [
                str(r[0]) for r in conn.execute("SELECT rolname FROM pg_roles WHERE rolcanlogin")
            ]
            grants: dict[str, set[str]] = {}
            for user, db in self._grants(conn):
                grants.setdefault(user, set()).add(db)
        items = [
            {
                "name": name,
                "host": rules.DEFAULT_HOST,
                "databases": [
                    {"name": db}
                    for db in sorted(grants.get(name, ()))
                    if not self._is_hidden_database(db)
                ],
            }
            for name in names
            if not self._is_hidden_user(name)
        ]
        return paginate(items, lambda u: str(u["name"]), limit, marker)

    def get_user(self, name: str, host: str = "%") -> dict[str, Any]:
        name = self._user_name(name, host)
        return {"name": name, "host": rules.DEFAULT_HOST, "databases": self.list_access(name)}

    def update_user(self, name: str, host: str, attrs: dict[str, Any]) -> None:
        """Rename and/or set the password. A SCRAM password survives a rename; an MD5 one
        (set outside Coffer) would be cleared by it, so such a rename needs a new password."""
        name = self._user_name(name, host)
        changes = rules.validate_user_update(attrs, self.reserved_users)
        new_name = changes.get("name", name)
        with self._connect() as conn:
            self._require_user(conn, name)
            if new_name != name:
                if self._role_exists(conn, new_name):
                    raise UserAlreadyExists(f"The user {new_name!r} already exists.")
                row = conn.execute(
                    "SELECT rolpassword LIKE 'md5%%' FROM pg_authid WHERE rolname = %s", (name,)
                ).fetchone()
                if row and row[0] and "password" not in changes:
                    raise ValidationError(
                        f"The user {name!r} has an MD5 password, which PostgreSQL clears on "
                        "rename; give a new password together with the new name."
                    )
                conn.execute(
                    sql.SQL("ALTER ROLE {} RENAME TO {}").format(
                        sql.Identifier(name), sql.Identifier(new_name)
                    )
                )
            if "password" in changes:
                self._set_password(conn, new_name, changes["password"])

    def change_passwords(self, users: list[dict[str, Any]]) -> None:
        if not isinstance(users, list):
            raise ValidationError("The users must be a list of objects with a name and password.")
        wanted = []
        for user in users:
            if not isinstance(user, dict):
                raise ValidationError("Each user must be an object with a name and a password.")
            name = self._user_name(user.get("name"), user.get("host"))
            wanted.append((name, rules.validate_password(user.get("password"))))
        with self._connect() as conn:
            for name, _ in wanted:
                self._require_user(conn, name)
            for name, password in wanted:
                self._set_password(conn, name, password)

    def delete_user(self, name: str, host: str = "%") -> None:
        """Drop the user after ending its sessions; what it owned passes to os_admin (kept for
        root to recover) and its privileges are dropped in every database."""
        name = self._user_name(name, host)
        with self._connect() as conn:
            self._require_user(conn, name)
            # No new sessions while the old ones end and what it owned is handed over.
            conn.execute(sql.SQL("ALTER ROLE {} WITH NOLOGIN").format(sql.Identifier(name)))
            self._terminate(conn, name)
            databases = [
                str(row[0])
                for row in conn.execute("SELECT datname FROM pg_database WHERE datallowconn")
            ]
        reassign = sql.SQL("REASSIGN OWNED BY {} TO {}").format(
            sql.Identifier(name), sql.Identifier(ADMIN_USER)
        )
        drop = sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name))
        for database in databases:
            with self._connect(database) as conn:
                conn.execute(reassign)
                conn.execute(drop)
        with self._connect() as conn:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))

    # -- access -------------------------------------------------------------------------------

    def grant_access(self, name: str, host: str, databases: list[str]) -> None:
        name = self._user_name(name, host)
        wanted = rules.database_names(databases)
        with self._connect() as conn:
            self._require_user(conn, name)
            self._require_databases(wanted, self._database_names(conn))
        for database in wanted:
            self._grant(name, database)

    def list_access(self, name: str, host: str = "%") -> list[dict[str, Any]]:
        """The databases whose privileges grant the user CONNECT directly, as ``[{"name"}]``."""
        name = self._user_name(name, host)
        with self._connect() as conn:
            self._require_user(conn, name)
            databases = {db for _, db in self._grants(conn, name)}
        return [{"name": db} for db in sorted(databases) if not self._is_hidden_database(db)]

    def revoke_access(self, name: str, host: str, database: str) -> None:
        """Revoke the user's privileges on ``database`` and end its sessions there; a no-op if
        it had none. DatabaseNotFound or UserNotFound if either does not exist."""
        name = self._user_name(name, host)
        database = rules.validate_database_name(database)
        with self._connect() as conn:
            self._require_user(conn, name)
            if database not in self._database_names(conn):
                raise DatabaseNotFound(f"The database {database!r} does not exist.")
        self._revoke(name, database)

    # -- root ---------------------------------------------------------------------------------

    def enable_root(self, password: str | None = None) -> dict[str, Any]:
        if password is None:
            password = secrets.token_urlsafe(24)
        else:
            password = rules.validate_password(password, "root password")
        with self._connect() as conn:
            verb = "ALTER" if self._role_exists(conn, ROOT_USER) else "CREATE"
            conn.execute(
                sql.SQL(verb + " ROLE {} WITH LOGIN SUPERUSER PASSWORD {}").format(
                    sql.Identifier(ROOT_USER), self._verifier(conn, ROOT_USER, password)
                )
            )
        return {"name": ROOT_USER, "password": password}

    def disable_root(self) -> None:
        """Make ``postgres`` unable to log in (its password is removed and its sessions end);
        the role stays, with whatever it owns."""
        with self._connect() as conn:
            if self._role_exists(conn, ROOT_USER):
                conn.execute(
                    sql.SQL("ALTER ROLE {} WITH NOLOGIN PASSWORD NULL").format(
                        sql.Identifier(ROOT_USER)
                    )
                )
                self._terminate(conn, ROOT_USER)

    def is_root_enabled(self) -> bool:
        with self._connect() as conn:
            row = conn.execute(
                "SELECT rolcanlogin FROM pg_roles WHERE rolname = %s", (ROOT_USER,)
            ).fetchone()
        return bool(row and row[0])
