"""Who is asking, for which project: the per-request context and the dependencies that build it.

Every route under ``/v1.0/{tenant_id}/...`` takes a ``Context`` (or ``AdminContext``) parameter:

    @router.get("/v1.0/{tenant_id}/things")
    def list_things(ctx: Context, services: ServicesDep) -> dict[str, Any]: ...

``get_context`` checks the ``X-Auth-Token`` header, that the path's project is the token's (admins
may name any project), and that read-only tokens only read. ``require_admin`` adds the admin check
for mgmt routes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any, Concatenate, ParamSpec, Protocol, TypeVar

from fastapi import Depends, Request
from sqlalchemy import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from coffer.api.errors import request_id_of
from coffer.config import Settings
from coffer.errors import Forbidden, Unauthorized
from coffer.identity import AuthContext, IdentityService

AUTH_HEADER = "X-Auth-Token"
#: Methods a read-only (``reader``) token may use.
READ_METHODS = frozenset({"GET", "HEAD"})


class TokenValidator(Protocol):
    """Turns an ``X-Auth-Token`` from a service other than the embedded identity into an
    ``AuthContext`` (``coffer.identity.external.KeystoneTokenValidator`` is the one Coffer
    ships).

    ``validate`` raises ``Unauthorized`` (401) for a token it does not accept, ``Forbidden``
    (403) for a valid token that grants nothing here, and a transient ``ServiceUnavailable``
    (503) when it cannot decide now. ``method`` and ``path`` are the request's (validators may
    check a token's access rules against them). It is called from many threads at once.
    """

    @property
    def token_hint(self) -> str:
        """How a user gets a token (``get one from ...``), for error messages."""
        ...

    def validate(self, token: str, *, method: str, path: str) -> AuthContext: ...


@dataclass
class Services:
    """Everything a request handler may use; stored on ``app.state.services``.

    ``rpc`` is opaque here: the process that builds the app puts its bus clients there.
    ``token_validator`` is ``None`` when the embedded ``identity`` issues and validates tokens
    (its ``/identity`` routes are served); otherwise it validates every token and the embedded
    identity routes are not mounted (``create_app`` sets it when ``[keystone_authtoken]`` is
    configured).
    """

    settings: Settings
    session_factory: sessionmaker[Session]
    identity: IdentityService
    rpc: Any = None
    token_validator: TokenValidator | None = None

    @property
    def embedded_identity(self) -> bool:
        """True when tokens come from, and are checked by, the embedded identity service."""
        return self.token_validator is None


@dataclass(frozen=True)
class RequestContext:
    """The caller (``auth``), the project named in the URL (``project_id``; differs from
    ``auth.project_id`` only for admins), this request's id and the public base URL used to build
    links (``http://host:port``, no trailing slash)."""

    auth: AuthContext
    project_id: str
    request_id: str
    base_url: str = ""

    @property
    def is_admin(self) -> bool:
        return self.auth.is_admin

    @property
    def project_url(self) -> str:
        """``<base>/v1.0/<project_id>``: the prefix of this project's resource links."""
        return f"{self.base_url}/v1.0/{self.project_id}"


def get_services(request: Request) -> Services:
    """The ``Services`` the app was created with."""
    services: Services = request.app.state.services
    return services


def public_base_url(request: Request) -> str:
    """The base URL for links: ``public_endpoint`` if configured, else the URL the client used."""
    configured = get_services(request).settings.default.public_endpoint
    if configured:
        return configured.rstrip("/")
    return str(request.base_url).rstrip("/")


def authenticate_request(request: Request) -> AuthContext:
    """Validate the request's ``X-Auth-Token`` with the embedded identity or, when configured,
    the external validator; ``Unauthorized`` when missing or invalid (see ``TokenValidator``
    for the other errors an external validator raises)."""
    services = get_services(request)
    validator = services.token_validator
    token = request.headers.get(AUTH_HEADER)
    if not token:
        hint = (
            validator.token_hint
            if validator is not None
            else "get a token with POST /identity/v3/auth/tokens"
        )
        raise Unauthorized(f"This request needs an {AUTH_HEADER} header; {hint}.")
    if validator is not None:
        return validator.validate(token, method=request.method, path=request.url.path)
    return services.identity.validate(token)


async def authenticate_request_async(request: Request) -> AuthContext:
    """``authenticate_request`` for async code: a token the embedded identity validated within
    ``[identity] token_cache_time`` seconds is answered on the event loop; every other check
    (the control DB, an external Keystone) runs in the thread pool, never on the loop."""
    services = get_services(request)
    token = request.headers.get(AUTH_HEADER)
    if token and services.token_validator is None:
        cached = services.identity.recently_validated(token)
        if cached is not None:
            return cached
    return await run_in_threadpool(authenticate_request, request)


def get_context(request: Request, tenant_id: str) -> RequestContext:
    """FastAPI dependency for every ``/v1.0/{tenant_id}/...`` route.

    Raises ``Unauthorized`` (401) for a missing, invalid or expired token; ``Forbidden`` (403)
    when the path's project is not the token's and the caller is not an admin, and when a
    read-only (``reader``) token tries anything but GET/HEAD.
    """
    auth = authenticate_request(request)
    if tenant_id != auth.project_id and not auth.is_admin:
        raise Forbidden(
            f"This token is for project {auth.project_id}; use a URL with that project id "
            f"(/v1.0/{auth.project_id}/...)."
        )
    if auth.is_read_only and request.method not in READ_METHODS:
        raise Forbidden(
            f"User {auth.user_name!r} has only the reader role on project "
            f"{auth.project_name!r}, which allows GET requests only; ask for the member role "
            "to make changes."
        )
    return RequestContext(
        auth=auth,
        project_id=tenant_id,
        request_id=request_id_of(request),
        base_url=public_base_url(request),
    )


Context = Annotated[RequestContext, Depends(get_context)]


def require_admin(ctx: Context) -> RequestContext:
    """Dependency (or plain check) for mgmt routes: ``Forbidden`` (403) unless ``admin``.

    Trove answers 401 here (its ``admin_context`` raises an exception mapped to 401). Coffer
    answers 403 because the caller *is* authenticated; 401 would tell clients to get a new token,
    which cannot help.
    """
    if not ctx.is_admin:
        raise Forbidden(
            f"Only administrators may use this request; user {ctx.auth.user_name!r} does not "
            "have the admin role."
        )
    return ctx


AdminContext = Annotated[RequestContext, Depends(require_admin)]


async def _services_dependency(request: Request) -> Services:
    # ``get_services`` as a dependency: async, so FastAPI does not hop to a worker thread for it.
    return get_services(request)


ServicesDep = Annotated[Services, Depends(_services_dependency)]


# -- reads served on the event loop -------------------------------------------------------------

_P = ParamSpec("_P")
_T = TypeVar("_T")


class LoopReader:
    """The control-DB connection the event loop's own reads use (``read_on_loop``).

    One connection, kept open: a read on the loop never waits for the pool, and pays neither
    a checkout nor a return. Each read is its own transaction, ended when the read is done, so
    it sees everything committed before it began. Only one thread uses it at a time (a second
    event loop in the same process, as in tests, gets a pooled connection instead).
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._connection: Connection | None = None

    def run(
        self, fn: Callable[Concatenate[Connection, _P], _T], *args: _P.args, **kwargs: _P.kwargs
    ) -> _T:
        """``fn(connection, *args, **kwargs)`` in a transaction of its own."""
        if not self._lock.acquire(blocking=False):
            with self.engine.connect() as conn:
                return fn(conn, *args, **kwargs)
        try:
            kept = self._connection
            if kept is None or kept.closed or kept.invalidated:
                kept = self._connection = self.engine.connect()
            conn = kept
            try:
                return fn(conn, *args, **kwargs)
            finally:
                try:
                    conn.rollback()  # a read: nothing to keep, and the next read sees newer data
                except Exception:
                    self._connection = None
                    conn.close()
                    raise
        finally:
            self._lock.release()

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None


def _engine_of(services: Services) -> Engine:
    bind = services.session_factory.kw.get("bind")
    if not isinstance(bind, Engine):
        raise TypeError("the API's session factory must be bound to an engine")
    return bind


async def read_on_loop(
    request: Request,
    fn: Callable[Concatenate[Connection, _P], _T],
    *args: _P.args,
    **kwargs: _P.kwargs,
) -> _T:
    """``fn(connection, *args, **kwargs)``: a short read of the control DB for the busiest
    routes (``coffer.api.responses.HotRoute``).

    On a SQLite control DB it runs right here on the event loop, with the loop's own
    connection: a read of a few rows from a file the OS has cached takes well under a
    millisecond, while handing it to a worker thread cost more than the read, and under load
    the worker threads then queued for the interpreter lock at every row SQLite returned. In
    WAL mode readers do not wait for writers. On a server database (PostgreSQL, MariaDB)
    every query is a network round trip, so it runs in the thread pool with a pooled
    connection, as the other routes' work does.
    """
    services = get_services(request)
    engine = _engine_of(services)
    if engine.dialect.name != "sqlite":
        return await run_in_threadpool(partial(_pooled_read, engine, fn, *args, **kwargs))
    state = request.app.state
    reader: LoopReader | None = getattr(state, "coffer_loop_reader", None)
    if reader is None or reader.engine is not engine:
        reader = state.coffer_loop_reader = LoopReader(engine)
    return reader.run(fn, *args, **kwargs)


def _pooled_read(engine: Engine, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    with engine.connect() as conn:
        return fn(conn, *args, **kwargs)
