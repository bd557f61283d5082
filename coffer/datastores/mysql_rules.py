"""Name and value rules for MySQL-family datastores (MariaDB; MySQL when it comes).

Pure functions with no I/O, shared by the API (which checks a request before anything is sent to
a guest) and the guest (which checks again before touching the engine, because the guest trusts
nothing it is sent). Each check raises ``ValidationError`` with a sentence naming the field and
the rule, and returns the value in the form the engine stores it, so both sides agree on what a
name or host means. The last section writes validated names into SQL (identifiers and exact
grant patterns).

Where these rules differ from Trove's, on purpose:

* User names may be up to 80 characters (MariaDB's limit). Trove says 16, the limit of MySQL
  before 5.7; a user name longer than the engine accepts is still refused here.
* The default character set is ``utf8mb4``, not Trove's ``utf8`` (``utf8mb3``): utf8mb3 cannot
  store characters outside the Basic Multilingual Plane (emoji, many CJK ideographs), and
  MariaDB and MySQL both treat it as legacy. ``utf8`` is still accepted and means ``utf8mb3``.
* A host may be an IPv4 network in CIDR form (``10.0.0.0/24``); MariaDB 10.11 only matches the
  ``address/netmask`` form, so the network is stored as ``10.0.0.0/255.255.255.0``.
* Passwords and names may not contain control characters (newlines, NUL): they would be stored,
  but no client can type them and they make logs ambiguous.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from typing import Any

from coffer.datastores.rules_common import collect_names
from coffer.errors import ValidationError

MAX_DATABASE_NAME_LENGTH = 64
MAX_USER_NAME_LENGTH = 80
#: MariaDB 10.11 stores hosts in a 255-character column.
MAX_HOST_LENGTH = 255
MAX_PASSWORD_LENGTH = 512

#: Databases that belong to the engine; compared case-insensitively.
RESERVED_DATABASES = frozenset({"mysql", "information_schema", "performance_schema", "sys"})
#: Accounts that belong to the engine or to Coffer; compared case-insensitively. The guest adds
#: the OS user its engine runs as.
RESERVED_USERS = frozenset({"root", "os_admin", "mariadb.sys"})

DEFAULT_CHARACTER_SET = "utf8mb4"
DEFAULT_HOST = "%"

#: MariaDB 10.11's character sets and each one's default collation (``SHOW CHARACTER SET``).
CHARACTER_SETS: dict[str, str] = {
    "armscii8": "armscii8_general_ci",
    "ascii": "ascii_general_ci",
    "big5": "big5_chinese_ci",
    "binary": "binary",
    "cp1250": "cp1250_general_ci",
    "cp1251": "cp1251_general_ci",
    "cp1256": "cp1256_general_ci",
    "cp1257": "cp1257_general_ci",
    "cp850": "cp850_general_ci",
    "cp852": "cp852_general_ci",
    "cp866": "cp866_general_ci",
    "cp932": "cp932_japanese_ci",
    "dec8": "dec8_swedish_ci",
    "eucjpms": "eucjpms_japanese_ci",
    "euckr": "euckr_korean_ci",
    "gb2312": "gb2312_chinese_ci",
    "gbk": "gbk_chinese_ci",
    "geostd8": "geostd8_general_ci",
    "greek": "greek_general_ci",
    "hebrew": "hebrew_general_ci",
    "hp8": "hp8_english_ci",
    "keybcs2": "keybcs2_general_ci",
    "koi8r": "koi8r_general_ci",
    "koi8u": "koi8u_general_ci",
    "latin1": "latin1_swedish_ci",
    "latin2": "latin2_general_ci",
    "latin5": "latin5_turkish_ci",
    "latin7": "latin7_general_ci",
    "macce": "macce_general_ci",
    "macroman": "macroman_general_ci",
    "sjis": "sjis_japanese_ci",
    "swe7": "swe7_swedish_ci",
    "tis620": "tis620_thai_ci",
    "ucs2": "ucs2_general_ci",
    "ujis": "ujis_japanese_ci",
    "utf16": "utf16_general_ci",
    "utf16le": "utf16le_general_ci",
    "utf32": "utf32_general_ci",
    "utf8mb3": "utf8mb3_general_ci",
    "utf8mb4": "utf8mb4_general_ci",
}
#: Names the engine accepts for a character set, mapped to the name it stores.
CHARACTER_SET_ALIASES = {"utf8": "utf8mb3"}

# Trove's database-name rule; fullmatch so a trailing newline cannot slip past "$".
_DATABASE_NAME = re.compile(r"[A-Za-z0-9_-]+[\s?#@]*[A-Za-z0-9_-]+", re.ASCII)
# Trove's host rule: an optional leading and trailing '%' around word characters, '(', ')', '.'.
_HOST_PATTERN = re.compile(r"[%]?[\w().]*[%]?", re.ASCII)
_CHARSET_NAME = re.compile(r"[a-z0-9_]+")
_FORBIDDEN_IN_USER_VALUES = frozenset("'\";`,/\\")
_FORBIDDEN_SHOWN = "' \" ; ` , / \\"


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


def _has_control_character(value: str) -> bool:
    return any(ord(ch) < 32 or ord(ch) == 127 for ch in value)


def validate_database_name(name: Any) -> str:
    """Return ``name`` if it is an acceptable database name, else raise ValidationError.

    Rules: 1 to 64 characters; Trove's pattern (letters, digits, ``_`` and ``-``, with spaces,
    ``?``, ``#`` or ``@`` allowed only between them, so at least two characters); not one of the
    engine's own databases.
    """
    name = _require_text(name, "database name")
    if not name:
        raise ValidationError("The database name must not be empty.")
    if len(name) > MAX_DATABASE_NAME_LENGTH:
        raise ValidationError(
            f"The database name {_shown(name)} is {len(name)} characters long; "
            f"the limit is {MAX_DATABASE_NAME_LENGTH}."
        )
    if "\\" in name:
        raise ValidationError(
            f"The database name {_shown(name)} contains a backslash, which is not allowed."
        )
    if not _DATABASE_NAME.fullmatch(name):
        raise ValidationError(
            f"The database name {_shown(name)} is invalid: use at least two letters, digits, "
            "'_' or '-'; spaces, '?', '#' and '@' are allowed only between them."
        )
    if name.lower() in RESERVED_DATABASES:
        raise ValidationError(
            f"The database name {_shown(name)} is reserved for the engine; choose another name."
        )
    return name


def _check_user_value(value: str, field: str, *, show: bool) -> None:
    """Rules common to user names and passwords; ``show`` is False for secrets."""
    what = f"The {field} {_shown(value)}" if show else f"The {field}"
    if value != value.strip():
        raise ValidationError(f"{what} must not start or end with whitespace.")
    if any(ch in _FORBIDDEN_IN_USER_VALUES for ch in value):
        raise ValidationError(
            f"{what} must not contain any of these characters: {_FORBIDDEN_SHOWN}"
        )
    if _has_control_character(value):
        raise ValidationError(f"{what} must not contain control characters such as newlines.")


def validate_user_name(name: Any, extra_reserved: Iterable[str] = ()) -> str:
    """Return ``name`` if it is an acceptable user name, else raise ValidationError.

    Rules: 1 to 80 characters; no leading or trailing whitespace; none of ``' " ; ` , / \\``; no
    control characters; not a reserved account (``RESERVED_USERS`` plus ``extra_reserved``,
    compared case-insensitively).
    """
    name = _require_text(name, "user name")
    if not name:
        raise ValidationError("The user name must not be empty.")
    if len(name) > MAX_USER_NAME_LENGTH:
        raise ValidationError(
            f"The user name {_shown(name)} is {len(name)} characters long; "
            f"the limit is {MAX_USER_NAME_LENGTH}."
        )
    _check_user_value(name, "user name", show=True)
    reserved = RESERVED_USERS | {r.lower() for r in extra_reserved}
    if name.lower() in reserved:
        raise ValidationError(
            f"The user name {_shown(name)} is reserved for the engine or for Coffer; "
            "choose another name (use the root API to manage root)."
        )
    return name


def validate_password(password: Any, field: str = "password") -> str:
    """Return ``password`` if acceptable, else raise ValidationError (never echoing the value).

    Rules: 1 to 512 characters; no leading or trailing whitespace; none of ``' " ; ` , / \\``;
    no control characters.
    """
    password = _require_text(password, field)
    if not password:
        raise ValidationError(f"The {field} must not be empty.")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise ValidationError(f"The {field} is longer than {MAX_PASSWORD_LENGTH} characters.")
    _check_user_value(password, field, show=False)
    return password


def normalize_host(host: Any) -> str:
    """Return the engine form of a user's host, ``'%'`` when ``host`` is None.

    Accepted: ``%``; a wildcard pattern matching Trove's rule (``%``, ``_`` with letters, digits,
    ``.``, ``(``, ``)``; ``%`` only at the ends), e.g. ``10.0.%``; an IP address; an IPv4
    network as ``a.b.c.d/prefix`` or ``a.b.c.d/netmask`` with no host bits set, returned in the
    netmask form MariaDB matches.
    """
    if host is None:
        return DEFAULT_HOST
    host = _require_text(host, "host")
    if not host:
        raise ValidationError("The host must not be empty; use '%' to allow any host.")
    if len(host) > MAX_HOST_LENGTH:
        raise ValidationError(
            f"The host {_shown(host)} is {len(host)} characters long; "
            f"the limit is {MAX_HOST_LENGTH}."
        )
    if "%" in host or "_" in host:
        if not _HOST_PATTERN.fullmatch(host):
            raise ValidationError(
                f"The host {_shown(host)} is not a valid pattern: use letters, digits and '.', "
                "with '%' only at the start or the end (for example '10.0.%')."
            )
        return host
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if "/" not in host:
        raise ValidationError(
            f"The host {_shown(host)} is not an IP address, a network or a pattern with '%'; "
            "host names are not resolved, so use an address such as '192.0.2.10'."
        )
    try:
        network = ipaddress.ip_network(host, strict=True)
    except ValueError as exc:
        raise ValidationError(
            f"The host {_shown(host)} is not a valid network ({exc}); use a form such as "
            "'10.0.0.0/24' with no host bits set."
        ) from None
    if not isinstance(network, ipaddress.IPv4Network):
        raise ValidationError(
            f"The host {_shown(host)} is an IPv6 network, which MariaDB cannot match; "
            "use a single IPv6 address or an IPv4 network."
        )
    return f"{network.network_address}/{network.netmask}"


def _charset_of_collation(collate: str) -> str | None:
    if collate == "binary":
        return "binary"
    names = sorted((*CHARACTER_SETS, *CHARACTER_SET_ALIASES), key=len, reverse=True)
    for name in names:
        if collate.startswith(name + "_"):
            return CHARACTER_SET_ALIASES.get(name, name)
    return None


def normalize_character_set(character_set: Any, collate: Any) -> tuple[str, str | None]:
    """Return ``(character_set, collate)`` as the engine stores them.

    With neither given the character set is ``utf8mb4`` and the collation is left to the engine
    (its default for the set). A collation alone implies its character set. ``utf8`` means
    ``utf8mb3``. The collation must belong to the character set; whether the engine has that
    exact collation is checked by the guest against the engine itself.
    """
    if character_set is not None:
        character_set = _require_text(character_set, "character set").lower()
        if not _CHARSET_NAME.fullmatch(character_set):
            raise ValidationError(
                f"The character set {_shown(character_set)} is invalid: use a name such as "
                "'utf8mb4'."
            )
        character_set = CHARACTER_SET_ALIASES.get(character_set, character_set)
        if character_set not in CHARACTER_SETS:
            raise ValidationError(
                f"The character set {_shown(character_set)} is not supported; choose one of: "
                f"{', '.join(sorted(CHARACTER_SETS))}."
            )
    if collate is None:
        return (character_set or DEFAULT_CHARACTER_SET), None
    collate = _require_text(collate, "collation").lower()
    if not _CHARSET_NAME.fullmatch(collate) or len(collate) > 64:
        raise ValidationError(
            f"The collation {_shown(collate)} is invalid: use a name such as 'utf8mb4_unicode_ci'."
        )
    implied = _charset_of_collation(collate)
    if implied is None:
        raise ValidationError(
            f"The collation {_shown(collate)} does not belong to any supported character set."
        )
    # The engine stores utf8_* collations under their utf8mb3_* names.
    for alias, real in CHARACTER_SET_ALIASES.items():
        if collate.startswith(alias + "_") and not collate.startswith(real + "_"):
            collate = real + collate[len(alias) :]
    if character_set is not None and implied != character_set:
        raise ValidationError(
            f"The collation {_shown(collate)} belongs to character set {implied!r}, "
            f"not {character_set!r}; give a collation of {character_set!r} or leave it out."
        )
    return implied, collate


def validate_database(spec: Any) -> dict[str, Any]:
    """Check one Trove database dict and return ``{"name", "character_set", "collate"}``."""
    if not isinstance(spec, Mapping):
        raise ValidationError("Each database must be an object with at least a 'name'.")
    name = validate_database_name(spec.get("name"))
    character_set, collate = normalize_character_set(spec.get("character_set"), spec.get("collate"))
    return {"name": name, "character_set": character_set, "collate": collate}


def database_names(entries: Any, field: str = "databases") -> list[str]:
    """Names from Trove's ``[{"name": ...}]`` (plain strings accepted too), each validated."""
    return collect_names(entries, validate_database_name, field)


def validate_user(
    spec: Any, *, extra_reserved: Iterable[str] = (), require_password: bool = True
) -> dict[str, Any]:
    """Check one Trove user dict and return ``{"name", "host", "password", "databases"}``.

    ``databases`` comes back as a list of validated names; ``host`` in engine form.
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

    Returns only the attributes given, validated and normalised; at least one is required.
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


# -- names in SQL -------------------------------------------------------------------------------


def quote_identifier(name: str) -> str:
    """A backquoted SQL identifier; backquotes inside are doubled."""
    return "`" + name.replace("`", "``") + "`"


def grant_pattern(database: str) -> str:
    """The pattern a database-level grant (and ``mysql.db``) uses for exactly ``database``.

    In database-level grants ``_`` and ``%`` are wildcards, so a grant on ``my_db`` would also
    open ``myXdb``; escaping them makes the grant exact.
    """
    return database.replace("\\", "\\\\").replace("_", "\\_").replace("%", "\\%")


def grant_target(database: str) -> str:
    """The ``db.*`` of a GRANT that matches exactly ``database``."""
    return quote_identifier(grant_pattern(database)) + ".*"


def grant_name(pattern: str) -> str:
    """The database name a ``mysql.db`` pattern written by ``grant_target`` stands for."""
    return re.sub(r"\\(.)", r"\1", pattern)
