"""Token validation by an external OpenStack Keystone, through keystonemiddleware's auth_token.

With ``[keystone_authtoken] auth_url`` set, the API stops trusting the embedded identity service
and asks a real Keystone about every ``X-Auth-Token`` instead. keystonemiddleware does the work
Trove relies on too: it logs in with Coffer's service credentials, validates the user's token with
``GET /v3/auth/tokens``, checks expiry, token binding and application-credential access rules, and
caches what it learned for ``token_cache_time`` seconds. Coffer then maps the result onto its own
``AuthContext``: the token's project, and its roles *by name* (``admin``, ``member``, ``reader``;
Keystone's implied roles mean an admin token carries all three).

keystonemiddleware is WSGI middleware, and the API is ASGI, so the validator drives the
middleware through its WSGI interface with a one-header request and reads the verdict the
middleware leaves in the WSGI environment. Nothing talks to Keystone until the first token arrives.

keystonemiddleware is an optional dependency (``pip install 'coffer[keystone]'``); it is imported
only when external mode is configured.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections import OrderedDict
from typing import Any

from coffer.config import KeystoneAuthtokenSection
from coffer.errors import CofferError, Forbidden, ServiceUnavailable, Unauthorized
from coffer.identity.service import ROLES, AuthContext

LOG = logging.getLogger(__name__)

#: keystonemiddleware's option group; also the name of Coffer's INI section.
GROUP = "keystone_authtoken"
#: WSGI environment key under which the shared token cache is handed to the middleware (its
#: documented ``cache`` option, meant for a cache object the application owns).
CACHE_ENVIRON_KEY = "coffer.keystone_token_cache"
#: Where keystonemiddleware leaves the validated token (a ``UserAuthPlugin``).
_VERDICT_ENVIRON_KEY = "keystone.token_auth"
_KNOWN_ROLES = frozenset(ROLES)


class KeystoneUnavailable(ServiceUnavailable):
    """Keystone could not be reached, or refused Coffer's own service credentials, so a token
    could not be checked. Transient: the same request may succeed later."""


class KeystoneMiddlewareMissing(CofferError):
    """``[keystone_authtoken]`` is configured but keystonemiddleware is not installed."""


class TokenCache:
    """A bounded, thread-safe in-process cache with per-entry lifetimes.

    keystonemiddleware calls ``get(key)`` and ``set(key, value, time=seconds)``; keys are already
    hashes of the tokens, values are the validated token bodies. Entries live ``time`` seconds
    (``time <= 0`` stores nothing: -1 is how ``token_cache_time`` turns caching off); past
    ``max_entries`` the least recently used entry is dropped. One cache serves every request
    thread, so a token is validated with Keystone once per lifetime, not once per thread.
    """

    def __init__(self, max_entries: int = 10_000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._max = max_entries
        self._entries: OrderedDict[str, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()

    # No ``__len__``: keystonemiddleware tests the cache object for truth, and an empty cache
    # must still count as "given".

    def size(self) -> int:
        """How many entries are stored (expired ones included until they are next looked up)."""
        with self._lock:
            return len(self._entries)

    def get(self, key: str) -> Any:
        """The value stored under ``key`` if it has not expired, else ``None``."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            deadline, value = entry
            if time.monotonic() >= deadline:
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return value

    def set(self, key: str, value: Any, time: float = 0, **_ignored: Any) -> bool:
        """Store ``value`` for ``time`` seconds (the memcache client signature)."""
        if time <= 0:
            return False
        deadline = _now() + time
        with self._lock:
            self._entries[key] = (deadline, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)
        return True


def _now() -> float:
    # ``time`` is shadowed by the memcache-style parameter name inside ``TokenCache.set``.
    return time.monotonic()


def auth_context_from_access(access: Any) -> AuthContext:
    """Turn keystoneauth's ``AccessInfo`` for a validated token into Coffer's ``AuthContext``.

    Roles are matched by name, case-insensitively, against ``admin``, ``member`` and ``reader``;
    other roles are ignored. Raises ``Unauthorized`` (401) for a token that is not scoped to a
    project (Coffer's URLs name one) and ``Forbidden`` (403) for a project token holding none of
    the three roles.
    """
    project_id = access.project_id
    if not project_id:
        raise Unauthorized(
            "This token is not scoped to a project (it is unscoped, or scoped to a domain or the "
            "system); get a project-scoped token, e.g. 'openstack token issue' with "
            "--os-project-name set."
        )
    names = {str(name).lower() for name in access.role_names or ()}
    roles = frozenset(names & _KNOWN_ROLES)
    if not roles:
        held = ", ".join(sorted(names)) or "none"
        raise Forbidden(
            f"User {access.username!r} has none of the roles Coffer knows (admin, member, "
            f"reader) on project {access.project_name!r} (it has: {held}); ask a Keystone "
            "administrator to assign one."
        )
    return AuthContext(
        user_id=access.user_id,
        user_name=access.username or access.user_id,
        project_id=project_id,
        project_name=access.project_name or project_id,
        roles=roles,
        expires_at=access.expires,
        issued_at=access.issued,
        audit_id=access.audit_id or "",
    )


class KeystoneTokenValidator:
    """Validates ``X-Auth-Token`` values with an external Keystone via keystonemiddleware.

    Build it once per process from the ``[keystone_authtoken]`` settings; it is safe to share
    between request threads. Construction checks the options and that keystonemiddleware is
    installed (``KeystoneMiddlewareMissing`` otherwise) but contacts nothing. ``validate`` may
    block on Keystone for up to ``http_connect_timeout`` (per try) on a cache miss.
    """

    def __init__(self, options: KeystoneAuthtokenSection) -> None:
        if not options.enabled:
            raise ValueError("[keystone_authtoken] auth_url is not set")
        self._options = options
        auth_token, webob = _import_middleware()
        self._request_class = webob.Request
        self._cache: TokenCache | None = None if options.memcached_servers else TokenCache()
        conf = _oslo_config(options, auth_token)
        self._middleware = auth_token.AuthProtocol(_accepted, {"oslo_config_config": conf})

    def __repr__(self) -> str:
        return f"KeystoneTokenValidator(auth_url={self._options.auth_url!r}, <password hidden>)"

    @property
    def public_url(self) -> str:
        """The Keystone URL users authenticate against (``www_authenticate_uri``, else
        ``auth_url``)."""
        return self._options.www_authenticate_uri or str(self._options.auth_url)

    @property
    def token_hint(self) -> str:
        """How a user gets a token, for error messages."""
        return f"get one from Keystone at {self.public_url} ('openstack token issue')"

    def validate(self, token: str, *, method: str = "GET", path: str = "/") -> AuthContext:
        """Return who ``token`` speaks for, according to Keystone (or the token cache).

        ``method`` and ``path`` are the request's, used for application-credential access
        rules. Raises ``Unauthorized`` (401) for a token Keystone rejects (malformed, expired,
        revoked) or one scoped to no project, ``Forbidden`` (403) when it holds none of Coffer's
        roles, and ``KeystoneUnavailable`` (503) when Keystone cannot be asked.
        """
        request = self._request_class.blank(path, method=method, headers={"X-Auth-Token": token})
        if self._cache is not None:
            request.environ[CACHE_ENVIRON_KEY] = self._cache
        try:
            response = request.get_response(self._middleware)
        except Exception as exc:
            # e.g. no identity endpoint for the configured interface/region in the catalog.
            LOG.warning("token validation with Keystone failed: %s", type(exc).__name__)
            raise KeystoneUnavailable(
                f"Coffer could not validate the token with Keystone at "
                f"{self._options.auth_url} ({type(exc).__name__}); check [keystone_authtoken] "
                "(interface, region_name) against Keystone's catalog."
            ) from exc
        status = response.status_int
        if status == 401:
            raise Unauthorized(
                "Keystone did not accept this token (it is malformed, expired or revoked); "
                f"{self.token_hint}."
            )
        if status == 503:
            raise KeystoneUnavailable(
                f"Keystone at {self._options.auth_url} could not be reached, or refused "
                "Coffer's service credentials, so the token could not be checked; try again "
                "shortly, and if it persists check [keystone_authtoken]."
            )
        plugin = request.environ.get(_VERDICT_ENVIRON_KEY)
        if status != 200 or plugin is None or plugin.user is None:
            raise KeystoneUnavailable(
                f"Token validation with Keystone answered HTTP {status}; try again shortly."
            )
        return auth_context_from_access(plugin.user)


def _accepted(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    # The application behind the middleware: reached only when the token was valid.
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b""]


def _import_middleware() -> tuple[Any, Any]:
    try:
        # WebOb imports the deprecated ``cgi`` module; that is the library's business, not a
        # warning Coffer's users can act on.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import webob
            from keystonemiddleware import auth_token
    except ImportError as exc:
        raise KeystoneMiddlewareMissing(
            "[keystone_authtoken] auth_url is set but keystonemiddleware is not installed; "
            "install it with \"pip install 'coffer[keystone]'\" or remove auth_url to use the "
            "embedded identity service."
        ) from exc
    return auth_token, webob


def _oslo_config(options: KeystoneAuthtokenSection, auth_token: Any) -> Any:
    """A private oslo.config object holding keystonemiddleware's options.

    Private, not oslo's global ``CONF``: nothing else in the process reads it, no config file
    or ``OS_*`` environment variable leaks in, and several validators may coexist (tests).
    """
    from keystoneauth1 import loading
    from oslo_config import cfg

    conf = cfg.ConfigOpts()
    conf([], project="coffer", default_config_files=[], default_config_dirs=[], use_env=False)
    for group, opts in auth_token.list_opts():
        conf.register_opts(opts, group=group)
    conf.register_opts(loading.get_auth_plugin_conf_options(options.auth_type), group=GROUP)
    for name, value in _middleware_values(options).items():
        conf.set_override(name, value, group=GROUP)
    return conf


def _middleware_values(options: KeystoneAuthtokenSection) -> dict[str, Any]:
    """keystonemiddleware option values for ``options`` (secrets revealed: never log this)."""
    password = options.password.get_secret_value() if options.password else None
    secret_key = options.memcache_secret_key
    values: dict[str, Any] = {
        "www_authenticate_uri": options.www_authenticate_uri or options.auth_url,
        "auth_type": options.auth_type,
        "auth_url": options.auth_url,
        "username": options.username,
        "password": password,
        "project_name": options.project_name,
        # An id wins over a name; passing both would make keystoneauth send both.
        "user_domain_id": options.user_domain_id,
        "user_domain_name": None if options.user_domain_id else options.user_domain_name,
        "project_domain_id": options.project_domain_id,
        "project_domain_name": None if options.project_domain_id else options.project_domain_name,
        "region_name": options.region_name,
        "interface": options.interface,
        "service_type": options.service_type,
        "cafile": str(options.cafile) if options.cafile else None,
        "certfile": str(options.certfile) if options.certfile else None,
        "keyfile": str(options.keyfile) if options.keyfile else None,
        "insecure": options.insecure,
        "http_connect_timeout": options.http_connect_timeout,
        "http_request_max_retries": options.http_request_max_retries,
        # memcached reads a lifetime of 0 as "forever"; Coffer documents 0 as "no caching".
        "token_cache_time": options.token_cache_time or -1,
        "memcache_security_strategy": options.memcache_security_strategy,
        "memcache_secret_key": secret_key.get_secret_value() if secret_key else None,
        # Coffer makes the decision (and writes the error) itself, and does not need the
        # catalog in every validation answer.
        "delay_auth_decision": False,
        "include_service_catalog": False,
        # Coffer accepts no service tokens; requiring the service role for them is the safe
        # setting keystonemiddleware recommends (and stops it warning at every start).
        "service_token_roles_required": True,
    }
    if options.memcached_servers:
        values["memcached_servers"] = [
            server.strip() for server in options.memcached_servers.split(",") if server.strip()
        ]
    else:
        values["cache"] = CACHE_ENVIRON_KEY
    return values
