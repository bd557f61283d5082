"""Name and value rules for the PostgreSQL datastore.

Pure functions with no I/O, shared by the API (which checks a request before anything is sent to
a guest) and the guest (which checks again before touching the engine, because the guest trusts
nothing it is sent). The function names and signatures match ``mysql_rules`` so the API can pick
the module by datastore manager. Each check raises ``ValidationError`` with a sentence naming the
field and the rule, and returns the value in the form the engine stores it.

The guest never builds SQL from these strings: names go through ``psycopg.sql.Identifier`` and
values through bound parameters or ``psycopg.sql.Literal``. The rules still refuse characters
that are safe in SQL but make names hard to use everywhere else:

* Names are 1 to 63 bytes of UTF-8 (PostgreSQL's ``NAMEDATALEN - 1``; the server would silently
  cut a longer name short, so two long names could become one).
* Names may not contain quotes, backslashes, semicolons, backquotes or ``/`` (URLs, shells and
  client tools mangle them), nor control characters, nor start or end with whitespace. User names
  may not contain ``@`` either: the API's user URLs are ``name@host``.
* Everything else is allowed and quoted: mixed case (``"Shop"`` and ``"shop"`` are different
  databases, as in PostgreSQL), spaces, ``-``, ``.``, non-ASCII letters, SQL keywords.
* Reserved names are refused whatever their case, so a user never sees ``Postgres`` beside
  ``postgres``: databases ``postgres``, ``template0``, ``template1``; users ``postgres`` (root),
  ``os_admin`` (the agent), ``public``/``none``/``current_user``/``session_user``/
  ``current_role`` (SQL role keywords) and every ``pg_*`` name (reserved by PostgreSQL). The guest
  adds the OS user its engine runs as.
* PostgreSQL users are not tied to a client host: the host is ``%`` or absent. Client networks are
  limited per instance by ``access.allowed_cidrs``, which the guest writes into ``pg_hba.conf``.
* ``character_set`` is a PostgreSQL server encoding (``UTF8`` by default; aliases such as
  ``utf-8``, ``unicode`` or ``iso-8859-1`` are accepted and stored under the canonical name) and
  ``collate`` a libc locale name (``C``, ``POSIX``, ``C.UTF-8``, ``en_US.UTF-8``...); whether the
  server has that locale, and whether it fits the encoding, is checked by the guest against the
  server itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from coffer.datastores.rules_common import collect_names
from coffer.errors import ValidationError

#: PostgreSQL's identifier limit in bytes (``NAMEDATALEN - 1``).
MAX_IDENTIFIER_BYTES = 63
MAX_PASSWORD_LENGTH = 512
MAX_COLLATION_LENGTH = 63

#: Databases that belong to the engine; compared case-insensitively.
RESERVED_DATABASES = frozenset({"postgres", "template0", "template1"})
#: Accounts that belong to the engine or to Coffer, and SQL's role keywords; compared
#: case-insensitively. Names starting with ``RESERVED_USER_PREFIX`` are reserved too.
RESERVED_USERS = frozenset(
    {"postgres", "os_admin", "public", "none", "current_user", "session_user", "current_role"}
)
RESERVED_USER_PREFIX = "pg_"

DEFAULT_ENCODING = "UTF8"
DEFAULT_HOST = "%"

#: PostgreSQL 15's server encodings (``pg_encoding_to_char``), the names list_databases shows.
SERVER_ENCODINGS = (
    "UTF8",
    "SQL_ASCII",
    "EUC_CN",
    "EUC_JIS_2004",
    "EUC_JP",
    "EUC_KR",
    "EUC_TW",
    "ISO_8859_5",
    "ISO_8859_6",
    "ISO_8859_7",
    "ISO_8859_8",
    "KOI8R",
    "KOI8U",
    "LATIN1",
    "LATIN2",
    "LATIN3",
    "LATIN4",
    "LATIN5",
    "LATIN6",
    "LATIN7",
    "LATIN8",
    "LATIN9",
    "LATIN10",
    "MULE_INTERNAL",
    "WIN866",
    "WIN874",
    "WIN1250",
    "WIN1251",
    "WIN1252",
    "WIN1253",
    "WIN1254",
    "WIN1255",
    "WIN1256",
    "WIN1257",
    "WIN1258",
)
#: Aliases PostgreSQL accepts for a server encoding, in its cleaned form (lower case, letters and
#: digits only), mapped to the canonical name.
ENCODING_ALIASES: dict[str, str] = {
    "unicode": "UTF8",
    "iso88591": "LATIN1",
    "iso88592": "LATIN2",
    "iso88593": "LATIN3",
    "iso88594": "LATIN4",
    "iso88599": "LATIN5",
    "iso885910": "LATIN6",
    "iso885913": "LATIN7",
    "iso885914": "LATIN8",
    "iso885915": "LATIN9",
    "iso885916": "LATIN10",
    "iso88595": "ISO_8859_5",
    "iso88596": "ISO_8859_6",
    "iso88597": "ISO_8859_7",
    "iso88598": "ISO_8859_8",
    "koi8": "KOI8R",
    "win": "WIN1251",
    "alt": "WIN866",
    "abc": "WIN1258",
    "tcvn": "WIN1258",
    "tcvn5712": "WIN1258",
    "vscii": "WIN1258",
    **{f"windows{n}": f"WIN{n}" for n in (866, 874, 1250, 1251, 1252, 1253, 1254, 1255)},
    **{f"windows{n}": f"WIN{n}" for n in (1256, 1257, 1258)},
}
#: Encodings PostgreSQL speaks with clients but cannot store a database in.
CLIENT_ONLY_ENCODINGS = frozenset(
    {"big5", "gb18030", "gbk", "johab", "sjis", "shiftjis", "shiftjis2004", "mskanji", "uhc"}
    | {"win932", "win936", "win949", "win950", "windows932", "windows936", "windows949"}
    | {"windows950"}
)

_FORBIDDEN_IN_NAMES = frozenset("'\"\\;`/")
_FORBIDDEN_SHOWN = "' \" \\ ; ` /"
_COLLATION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]*", re.ASCII)


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
    return any(ord(ch) < 32 or 127 <= ord(ch) < 160 for ch in value)


def _check_identifier(name: str, field: str, extra_forbidden: str = "") -> None:
    """Rules common to database and user names (see the module docstring)."""
    if not name:
        raise ValidationError(f"The {field} must not be empty.")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValidationError(f"The {field} {_shown(name)} is not valid Unicode text.") from None
    if size > MAX_IDENTIFIER_BYTES:
        raise ValidationError(
            f"The {field} {_shown(name)} is {size} bytes long in UTF-8; PostgreSQL's limit is "
            f"{MAX_IDENTIFIER_BYTES} bytes."
        )
    if _has_control_character(name):
        raise ValidationError(
            f"The {field} {_shown(name)} contains control characters such as newlines, which "
            "are not allowed."
        )
    if name != name.strip():
        raise ValidationError(f"The {field} {_shown(name)} must not start or end with whitespace.")
    forbidden = sorted({ch for ch in name if ch in _FORBIDDEN_IN_NAMES or ch in extra_forbidden})
    if forbidden:
        shown = _FORBIDDEN_SHOWN + "".join(f" {ch}" for ch in extra_forbidden)
        raise ValidationError(
            f"The {field} {_shown(name)} must not contain any of these characters: {shown}"
        )


def validate_database_name(name: Any) -> str:
    """Return ``name`` if it is an acceptable database name, else raise ValidationError.

    Rules: 1 to 63 bytes of UTF-8; no control characters; no leading or trailing whitespace; none
    of ``' " \\ ; ` /``; not ``postgres``, ``template0`` or ``template1`` in any case.
    """
    name = _require_text(name, "database name")
    _check_identifier(name, "database name")
    if name.lower() in RESERVED_DATABASES:
        raise ValidationError(
            f"The database name {_shown(name)} is reserved for the engine; choose another name."
        )
    return name


def validate_user_name(name: Any, extra_reserved: Iterable[str] = ()) -> str:
    """Return ``name`` if it is an acceptable user name, else raise ValidationError.

    Rules: those of database names, no ``@`` either, and not a reserved account
    (``RESERVED_USERS``, any ``pg_*`` name, plus ``extra_reserved``; case-insensitive).
    """
    name = _require_text(name, "user name")
    _check_identifier(name, "user name", extra_forbidden="@")
    lowered = name.lower()
    reserved = RESERVED_USERS | {r.lower() for r in extra_reserved}
    if lowered in reserved or lowered.startswith(RESERVED_USER_PREFIX):
        raise ValidationError(
            f"The user name {_shown(name)} is reserved for the engine or for Coffer (so are "
            "all names starting with 'pg_'); choose another name (use the root API to manage "
            "the postgres superuser)."
        )
    return name


def validate_password(password: Any, field: str = "password") -> str:
    """Return ``password`` if acceptable, else raise ValidationError (never echoing the value).

    Rules: 1 to 512 characters; no leading or trailing whitespace; no control characters. Quotes
    and other punctuation are fine: passwords never appear in SQL text.
    """
    password = _require_text(password, field)
    if not password:
        raise ValidationError(f"The {field} must not be empty.")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise ValidationError(f"The {field} is longer than {MAX_PASSWORD_LENGTH} characters.")
    if password != password.strip():
        raise ValidationError(f"The {field} must not start or end with whitespace.")
    if _has_control_character(password):
        raise ValidationError(f"The {field} must not contain control characters such as newlines.")
    try:
        password.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(f"The {field} is not valid Unicode text.") from None
    return password


def normalize_host(host: Any) -> str:
    """Return ``'%'`` for an absent host or ``'%'``; any other host is refused.

    PostgreSQL roles are not tied to a client host the way MySQL accounts are.
    """
    if host is None:
        return DEFAULT_HOST
    host = _require_text(host, "host")
    if host != DEFAULT_HOST:
        raise ValidationError(
            f"The host {_shown(host)} cannot be used: PostgreSQL users are not tied to a client "
            "host. Leave the host out (or use '%'), and limit the networks clients may connect "
            "from with the instance's allowed CIDRs (access.allowed_cidrs)."
        )
    return host


def _clean_encoding_name(name: str) -> str:
    # PostgreSQL's own normalisation: case and punctuation do not matter ("utf-8" is "UTF8").
    return "".join(ch for ch in name.lower() if ch.isascii() and ch.isalnum())


def normalize_encoding(character_set: Any) -> str:
    """The canonical PostgreSQL server encoding for ``character_set`` (``UTF8`` when None)."""
    if character_set is None:
        return DEFAULT_ENCODING
    character_set = _require_text(character_set, "character set")
    cleaned = _clean_encoding_name(character_set)
    canonical = {_clean_encoding_name(e): e for e in SERVER_ENCODINGS}
    if cleaned in canonical:
        return canonical[cleaned]
    if cleaned in ENCODING_ALIASES:
        return ENCODING_ALIASES[cleaned]
    if cleaned in CLIENT_ONLY_ENCODINGS:
        raise ValidationError(
            f"The character set {_shown(character_set)} is a client-only encoding; PostgreSQL "
            "cannot store a database in it. Use UTF8."
        )
    raise ValidationError(
        f"The character set {_shown(character_set)} is not a PostgreSQL server encoding; use "
        f"one of: {', '.join(SERVER_ENCODINGS)}."
    )


def validate_collation(collate: Any) -> str | None:
    """A locale name for ``collate`` (None when absent): letters, digits, ``_ . @ -``."""
    if collate is None:
        return None
    collate = _require_text(collate, "collation")
    if len(collate) > MAX_COLLATION_LENGTH or not _COLLATION_NAME.fullmatch(collate):
        raise ValidationError(
            f"The collation {_shown(collate)} is invalid: use a locale name such as 'C', "
            "'C.UTF-8' or 'en_US.UTF-8'."
        )
    return collate


def normalize_character_set(character_set: Any, collate: Any) -> tuple[str, str | None]:
    """Return ``(encoding, collate)``: the canonical encoding and the locale name as given."""
    return normalize_encoding(character_set), validate_collation(collate)


def validate_database(spec: Any) -> dict[str, Any]:
    """Check one Trove database dict and return ``{"name", "character_set", "collate"}``.

    ``character_set`` is the canonical encoding; ``collate`` is None when not given (the guest
    then uses the server's default locale, or ``C`` for an encoding that locale cannot hold).
    """
    if not isinstance(spec, Mapping):
        raise ValidationError("Each database must be an object with at least a 'name'.")
    name = validate_database_name(spec.get("name"))
    encoding, collate = normalize_character_set(spec.get("character_set"), spec.get("collate"))
    return {"name": name, "character_set": encoding, "collate": collate}


def database_names(entries: Any, field: str = "databases") -> list[str]:
    """Names from Trove's ``[{"name": ...}]`` (plain strings accepted too), each validated."""
    return collect_names(entries, validate_database_name, field)


def validate_user(
    spec: Any, *, extra_reserved: Iterable[str] = (), require_password: bool = True
) -> dict[str, Any]:
    """Check one Trove user dict and return ``{"name", "host", "password", "databases"}``.

    ``host`` is always ``'%'``; ``databases`` comes back as a list of validated names.
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

    Returns only the attributes given, validated; at least one is required. ``host`` may only be
    ``'%'`` (a no-op kept for Trove clients that always send it).
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
