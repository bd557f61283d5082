"""Name and value rules for the Redis datastore.

Pure functions with no I/O, shared by the API (which checks a request before anything is sent to
a guest) and the guest (which checks again before touching the engine). The function names and
signatures are those of ``mysql_rules``, so the API can pick a rules module by manager. Each
check raises ``ValidationError`` with a sentence naming the field and the rule, and returns the
value in the form the engine stores it.

Why the rules are what they are:

* **User names are a whitelist** (letters, digits, ``_``, ``.``, ``-``, ``@``; starting with a
  letter, digit or ``_``; at most 64 characters). Redis writes ACL users to its ``aclfile`` as
  ``user <name> <rule> <rule> ...`` and reads the file back by splitting on spaces and quotes,
  so a name holding a space, a quote or a backslash would turn into ACL rules (or an unreadable
  file) at the next start. A whitelist also rules out every rule prefix (``> < # ~ % & + - ( )
  !``) at the start of a name. Redis compares names case-sensitively; reserved names are
  compared case-insensitively so ``Default`` cannot pose as ``default``.
* **Passwords** may hold any printable character except whitespace, at most 512 of them. The
  guest sends a password to Redis only as the single argument ``>password`` (the engine takes
  everything after ``>`` as the password) and Redis keeps only its SHA-256 in the aclfile, so no
  password can become a rule. Whitespace is refused because ``redis-cli``, ``redis://`` URLs
  and many clients split ``AUTH`` arguments on it.
* **Hosts**: Redis has no host-based access control, so a user's host may only be ``%`` (any
  host) or left out.
* **Databases**: Redis has only the numbered keyspaces 0-15 (``SELECT n``), which every user may
  use, and its ACLs cannot restrict a user to some of them. Coffer therefore does not offer the
  databases capability for Redis: every database operation, and a user given databases, raises
  ``NotImplementedByDatastore`` (a 501) with a sentence saying so.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, NoReturn

from coffer.errors import NotImplementedByDatastore, ValidationError

MAX_USER_NAME_LENGTH = 64
MAX_PASSWORD_LENGTH = 512

#: Accounts that belong to Redis or to Coffer; compared case-insensitively. ``default`` is the
#: engine's built-in user (Coffer's root), ``os_admin`` the guest agent's own, and ``root`` is
#: kept free so nobody mistakes a tenant user for the root the root API manages. The guest adds
#: the OS user its engine runs as.
RESERVED_USERS = frozenset({"default", "os_admin", "root"})

DEFAULT_HOST = "%"

#: The one explanation every refused database operation gives.
DATABASES_UNSUPPORTED = (
    "Redis has no named databases: it has the numbered keyspaces 0-15, which every user "
    "reaches with SELECT, and no per-database access control. Coffer does not create, list, "
    "delete or grant databases on Redis; leave databases out and select a keyspace in the client."
)

_USER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]*", re.ASCII)


def _shown(value: str, limit: int = 70) -> str:
    """A value for an error message: quoted, escaped, and cut short so a huge input stays small."""
    if len(value) > limit:
        return repr(value[:limit]) + "..."
    return repr(value)


def _require_text(value: Any, field: str) -> str:
    if value is None:
        raise ValidationError(f"The {field} is required.")
    if not isinstance(value, str):
        raise ValidationError(f"The {field} must be a string, not {type(value).__name__}.")
    return value


def databases_unsupported() -> NotImplementedByDatastore:
    """The error every database operation on Redis raises."""
    return NotImplementedByDatastore(DATABASES_UNSUPPORTED)


# -- users ---------------------------------------------------------------------------------------


def validate_user_name(name: Any, extra_reserved: Iterable[str] = ()) -> str:
    """Return ``name`` if it is an acceptable Redis user name, else raise ValidationError.

    Rules: 1 to 64 characters from letters, digits, ``_ . - @``, the first a letter, digit or
    ``_``; not a reserved account (``RESERVED_USERS`` plus ``extra_reserved``, compared
    case-insensitively).
    """
    name = _require_text(name, "user name")
    if not name:
        raise ValidationError("The user name must not be empty.")
    if len(name) > MAX_USER_NAME_LENGTH:
        raise ValidationError(
            f"The user name {_shown(name)} is {len(name)} characters long; "
            f"the limit is {MAX_USER_NAME_LENGTH}."
        )
    if not _USER_NAME.fullmatch(name):
        raise ValidationError(
            f"The user name {_shown(name)} is invalid for Redis: use letters, digits, '_', '.', "
            "'-' and '@' only, starting with a letter, a digit or '_' (no spaces, quotes or "
            "ACL rule characters such as '>', '~', '+' or '&')."
        )
    reserved = RESERVED_USERS | {r.lower() for r in extra_reserved}
    if name.lower() in reserved:
        raise ValidationError(
            f"The user name {_shown(name)} is reserved for Redis or for Coffer; choose another "
            "name (use the root API to manage the 'default' user)."
        )
    return name


def validate_password(password: Any, field: str = "password") -> str:
    """Return ``password`` if acceptable, else raise ValidationError (never echoing the value).

    Rules: 1 to 512 characters; no whitespace, control or other unprintable characters.
    """
    password = _require_text(password, field)
    if not password:
        raise ValidationError(f"The {field} must not be empty.")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise ValidationError(f"The {field} is longer than {MAX_PASSWORD_LENGTH} characters.")
    if any(ch.isspace() for ch in password):
        raise ValidationError(
            f"The {field} must not contain whitespace: Redis clients split AUTH on it."
        )
    if not password.isprintable():
        raise ValidationError(
            f"The {field} must not contain control characters or other unprintable characters."
        )
    return password


def normalize_host(host: Any) -> str:
    """Return ``'%'`` for a host of None or ``'%'``; anything else is a ValidationError."""
    if host is None:
        return DEFAULT_HOST
    host = _require_text(host, "host")
    if host != DEFAULT_HOST:
        raise ValidationError(
            f"The host {_shown(host)} cannot be used with Redis, which has no host-based "
            "access control; leave the host out or use '%'."
        )
    return host


def database_names(entries: Any, field: str = "databases") -> list[str]:
    """An empty list for None or ``[]``; any database given raises NotImplementedByDatastore."""
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise ValidationError(f"The {field} must be a list of objects with a 'name'.")
    if entries:
        raise databases_unsupported()
    return []


def validate_user(
    spec: Any, *, extra_reserved: Iterable[str] = (), require_password: bool = True
) -> dict[str, Any]:
    """Check one Trove user dict and return ``{"name", "host", "password", "databases"}``.

    ``host`` is always ``'%'`` and ``databases`` always empty: a user given other hosts is a
    ValidationError, one given databases a NotImplementedByDatastore.
    """
    if not isinstance(spec, Mapping):
        raise ValidationError("Each user must be an object with a 'name' and a 'password'.")
    name = validate_user_name(spec.get("name"), extra_reserved)
    password = spec.get("password")
    if password is not None or require_password:
        password = validate_password(password)
    return {
        "name": name,
        "host": normalize_host(spec.get("host")),
        "password": password,
        "databases": database_names(spec.get("databases")),
    }


def validate_user_update(attrs: Any, extra_reserved: Iterable[str] = ()) -> dict[str, str]:
    """Check the attributes of a user update (``name``, ``password``, ``host``, each optional).

    Returns only the attributes given, validated; at least one is required. A ``host`` other
    than ``'%'`` is refused (Redis has no hosts).
    """
    if not isinstance(attrs, Mapping):
        raise ValidationError("The user update must be an object.")
    unknown = sorted(set(attrs) - {"name", "password", "host"})
    if unknown:
        raise ValidationError(
            f"The user update has unknown attributes: {', '.join(unknown)}; "
            "only 'name', 'password' and 'host' can be changed."
        )
    result: dict[str, str] = {}
    if attrs.get("name") is not None:
        result["name"] = validate_user_name(attrs["name"], extra_reserved)
    if attrs.get("password") is not None:
        result["password"] = validate_password(attrs["password"])
    if attrs.get("host") is not None:
        result["host"] = normalize_host(attrs["host"])
    if not result:
        raise ValidationError("The user update must change at least one of: name, password, host.")
    return result


# -- databases -----------------------------------------------------------------------------------


def validate_database_name(name: Any) -> NoReturn:
    """Always raises NotImplementedByDatastore: Redis has no named databases."""
    raise databases_unsupported()


def validate_database(spec: Any) -> NoReturn:
    """Always raises NotImplementedByDatastore: Redis has no named databases."""
    raise databases_unsupported()
