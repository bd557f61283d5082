"""The embedded identity service: a Keystone v3 subset with projects, users, roles and tokens.

Only what the OpenStack clients need: password authentication scoped to a project, Fernet tokens
(see ``coffer.identity.tokens``), one domain (``default``, named ``Default``) and three roles
(``admin``, ``member``, ``reader``). Users, projects and role assignments live in the control DB.
"""

from __future__ import annotations

import difflib
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from coffer.config import Settings
from coffer.db.models import Project, Role, RoleAssignment, User
from coffer.db.session import transaction
from coffer.errors import BadRequest, NotFound, Unauthorized, ValidationError
from coffer.identity.passwords import (
    DEFAULT_COST,
    MAX_PASSWORD_LENGTH,
    ScryptCost,
    dummy_verify,
    hash_password,
    verify_password,
)
from coffer.identity.token_cache import TokenCache
from coffer.identity.tokens import TokenCodec, TokenPayload

DEFAULT_DOMAIN_ID = "default"
DEFAULT_DOMAIN_NAME = "Default"
#: Every role Coffer knows. ``admin`` unlocks mgmt routes and cross-project access, ``member`` is an
#: ordinary user, ``reader`` may only read.
ROLES = ("admin", "member", "reader")
#: Roles that may change things; a token holding none of these is read-only.
WRITER_ROLES = frozenset({"admin", "member"})

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]*$")
_MAX_NAME = 64
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"

_BAD_CREDENTIALS = (
    "The user name, domain or password is wrong; check them and try again "
    "(the domain is 'Default')."
)
_RENEW_HINT = "get a new one with POST /identity/v3/auth/tokens"


@dataclass(frozen=True)
class AuthContext:
    """Who a valid token speaks for. Built only by ``IdentityService.validate``/``authenticate``."""

    user_id: str
    user_name: str
    project_id: str
    project_name: str
    roles: frozenset[str]
    expires_at: datetime
    issued_at: datetime | None = None
    audit_id: str = ""

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles

    @property
    def is_read_only(self) -> bool:
        """True for tokens that hold only the ``reader`` role: they may look, not change."""
        return not (self.roles & WRITER_ROLES)


def format_time(moment: datetime) -> str:
    """Keystone's timestamp format, always UTC with a ``Z`` (some tools reject ``+00:00``)."""
    return moment.astimezone(UTC).strftime(_TIME_FORMAT)


def _catalog_id(*parts: str) -> str:
    # Stable ids, so the catalog looks the same in every token.
    return uuid.uuid5(uuid.NAMESPACE_URL, "coffer:" + ":".join(parts)).hex


class IdentityService:
    """Authenticates users and issues and validates project-scoped tokens.

    ``token_key`` is secret keying material (normally the master key): the Fernet key is derived
    from it with HKDF, so rotating it invalidates every token. ``scrypt_cost`` sets the cost of
    newly stored password hashes; only tests should lower it. Every method opens its own
    session on ``session_factory``, so one instance may be shared by all request threads.

    ``validate`` remembers what it found for ``[identity] token_cache_time`` seconds (see
    ``coffer.identity.token_cache``): a user, project or role change made through this instance
    applies to tokens at once, one made by another process within that many seconds. Tests may
    pass a ``token_cache`` of their own (e.g. with a clock they control).
    """

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        token_key: bytes,
        settings: Settings,
        *,
        scrypt_cost: ScryptCost = DEFAULT_COST,
        token_cache: TokenCache | None = None,
    ) -> None:
        self._session_factory = session_factory
        self._codec = TokenCodec(token_key)
        self._settings = settings
        self._cost = scrypt_cost
        self._token_cache = (
            token_cache
            if token_cache is not None
            else TokenCache(settings.identity.token_cache_time)
        )

    def __repr__(self) -> str:
        return "IdentityService(<key hidden>)"

    # -- tokens -----------------------------------------------------------------------------

    def authenticate(
        self, body: Mapping[str, Any], base_url: str | None = None
    ) -> tuple[str, dict[str, Any]]:
        """Check a Keystone v3 password-auth request and issue a project-scoped token.

        Returns ``(token, {"token": {...}})``; the body's catalog points at ``base_url`` (default:
        ``settings.api_base_url``). Raises ``BadRequest`` for a malformed body and
        ``Unauthorized`` for wrong credentials, a missing or unknown project scope, a disabled
        user or project, or a user without a role on the project.
        """
        user_ref, password, project_ref = _parse_auth_body(body)
        with transaction(self._session_factory) as session:
            user = self._find_user(session, user_ref)
            if user is None:
                dummy_verify(password, self._cost)
                raise Unauthorized(_BAD_CREDENTIALS)
            if not verify_password(password, user.password_hash) or not user.enabled:
                raise Unauthorized(_BAD_CREDENTIALS)
            project = self._find_project(session, project_ref)
            if project is None or not project.enabled:
                raise Unauthorized(
                    f"Project {_describe_ref(project_ref)} was not found or is disabled; check "
                    "the project name (or id) and its domain."
                )
            roles = _roles_on(session, user.id, project.id)
            if not roles:
                raise Unauthorized(
                    f"User {user.name!r} has no role on project {project.name!r}; scope the "
                    "token to a project you belong to, or ask an administrator for a role."
                )
            now = datetime.now(UTC)
            expires = now + timedelta(seconds=self._settings.identity.token_expiration)
            payload = TokenPayload(
                user_id=user.id,
                project_id=project.id,
                roles=tuple(sorted(role.name for role in roles)),
                issued_at=now.timestamp(),
                expires_at=expires.timestamp(),
                audit_id=TokenCodec.new_audit_id(),
            )
            token = self._codec.seal(payload)
            ctx = AuthContext(
                user_id=user.id,
                user_name=user.name,
                project_id=project.id,
                project_name=project.name,
                roles=frozenset(payload.roles),
                expires_at=expires,
                issued_at=now,
                audit_id=payload.audit_id,
            )
            return token, self._token_body(ctx, roles, base_url)

    def validate(self, token: str) -> AuthContext:
        """Return who ``token`` speaks for.

        Raises ``Unauthorized`` when the token is malformed, forged, expired, or when its user or
        project has since been disabled or removed. Roles are the token's roles that the user
        still holds: a token never grants more than the user has now ("now" being at most
        ``[identity] token_cache_time`` seconds ago for changes made by other processes).
        """
        cache = self._token_cache
        key = cache.key(token)
        cached = cache.get(key)
        if cached is not None:
            return cached
        generation = cache.generation
        ctx, _roles = self._validate(token)
        cache.put(key, ctx, generation)
        return ctx

    def recently_validated(self, token: str) -> AuthContext | None:
        """What ``validate`` would return for ``token`` if it can answer from its cache (a
        token it validated within ``token_cache_time`` seconds, unexpired); None otherwise.
        Never touches the control DB, so it may run on an event loop."""
        return self._token_cache.get(TokenCache.key(token))

    def forget_validated_tokens(self) -> None:
        """Make the next ``validate`` of every token check the control DB again (called after
        every identity change made through this service)."""
        self._token_cache.invalidate()

    def token_body(self, token: str, base_url: str | None = None) -> dict[str, Any]:
        """The ``{"token": {...}}`` body for a valid ``token`` (for ``GET /v3/auth/tokens``)."""
        ctx, roles = self._validate(token)
        return self._token_body(ctx, roles, base_url)

    def _validate(self, token: str) -> tuple[AuthContext, list[Role]]:
        payload = self._codec.open(token)
        now = datetime.now(UTC)
        expires = datetime.fromtimestamp(payload.expires_at, UTC)
        if expires <= now:
            raise Unauthorized(f"The token expired at {format_time(expires)}; {_RENEW_HINT}.")
        # Only reads: a plain session, so validations never queue for the write lock.
        with self._session_factory() as session:
            user = session.get(User, payload.user_id)
            project = session.get(Project, payload.project_id)
            if user is None or not user.enabled or project is None or not project.enabled:
                raise Unauthorized(
                    f"The token's user or project no longer exists or is disabled; {_RENEW_HINT}."
                )
            held = [r for r in _roles_on(session, user.id, project.id) if r.name in payload.roles]
            if not held:
                raise Unauthorized(
                    f"User {user.name!r} no longer has a role on project {project.name!r}; "
                    "ask an administrator for a role."
                )
            ctx = AuthContext(
                user_id=user.id,
                user_name=user.name,
                project_id=project.id,
                project_name=project.name,
                roles=frozenset(r.name for r in held),
                expires_at=expires,
                issued_at=datetime.fromtimestamp(payload.issued_at, UTC),
                audit_id=payload.audit_id,
            )
            return ctx, held

    def _token_body(
        self, ctx: AuthContext, roles: list[Role], base_url: str | None
    ) -> dict[str, Any]:
        base = (base_url or self._settings.api_base_url).rstrip("/")
        region = self._settings.default.region_name
        domain = {"id": DEFAULT_DOMAIN_ID, "name": DEFAULT_DOMAIN_NAME}

        def service(kind: str, name: str, url: str) -> dict[str, Any]:
            return {
                "type": kind,
                "name": name,
                "id": _catalog_id("service", kind),
                "endpoints": [
                    {
                        "id": _catalog_id("endpoint", kind, "public"),
                        "interface": "public",
                        "region": region,
                        "region_id": region,
                        "url": url,
                    }
                ],
            }

        issued = ctx.issued_at or datetime.now(UTC)
        return {
            "token": {
                "methods": ["password"],
                "audit_ids": [ctx.audit_id] if ctx.audit_id else [],
                "expires_at": format_time(ctx.expires_at),
                "issued_at": format_time(issued),
                "user": {"id": ctx.user_id, "name": ctx.user_name, "domain": domain},
                "project": {"id": ctx.project_id, "name": ctx.project_name, "domain": domain},
                "roles": [{"id": r.id, "name": r.name} for r in sorted(roles, key=_role_name)],
                "catalog": [
                    service("database", "trove", f"{base}/v1.0/{ctx.project_id}"),
                    service("identity", "keystone", f"{base}/identity/v3"),
                ],
            }
        }

    # -- administration ---------------------------------------------------------------------

    def ensure_roles(self) -> None:
        """Create the ``admin``, ``member`` and ``reader`` roles if missing (idempotent)."""
        with transaction(self._session_factory) as session:
            self._ensure_roles(session)
        self.forget_validated_tokens()

    def create_project(self, name: str) -> Project:
        """Create the project ``name`` in the default domain, or return it if it exists."""
        _check_name("project", name)
        with transaction(self._session_factory) as session:
            project = _get_or_create_project(session, name)
        self.forget_validated_tokens()
        return project

    def create_user(self, name: str, password: str, project: str, roles: list[str]) -> User:
        """Create user ``name`` with ``roles`` on ``project`` (a name or id).

        Idempotent: when the user exists, its password is replaced and its roles on that project
        become exactly ``roles``. Raises ``ValidationError`` for a bad name, password or role
        and ``NotFound`` for an unknown project, before changing anything.
        """
        _check_name("user", name)
        _check_password(password)
        _check_roles(roles)
        password_hash = hash_password(password, self._cost)
        with transaction(self._session_factory) as session:
            role_rows = self._ensure_roles(session)
            target = session.get(Project, project) or _project_by_name(session, project)
            if target is None:
                raise NotFound(
                    f"Project {project!r} does not exist; create it first (create_project)."
                )
            user = session.scalar(
                select(User).where(User.domain_id == DEFAULT_DOMAIN_ID, User.name == name)
            )
            if user is None:
                user = User(name=name, domain_id=DEFAULT_DOMAIN_ID, password_hash=password_hash)
                session.add(user)
            else:
                user.password_hash = password_hash
            user.default_project_id = target.id
            session.flush()
            existing = session.scalars(
                select(RoleAssignment).where(
                    RoleAssignment.user_id == user.id, RoleAssignment.project_id == target.id
                )
            ).all()
            wanted = {role_rows[r].id for r in roles}
            for assignment in existing:
                if assignment.role_id not in wanted:
                    session.delete(assignment)
            have = {a.role_id for a in existing}
            for role_id in wanted - have:
                session.add(RoleAssignment(user_id=user.id, project_id=target.id, role_id=role_id))
        # After the commit: a validation that read the roles before it cannot cache them now.
        self.forget_validated_tokens()
        return user

    def bootstrap(self, admin_password: str, demo_password: str) -> None:
        """Create the admin project and user (role ``admin``) and the demo project and user
        (role ``member``), with names from ``[identity]``. Safe to run on every start; it resets
        both passwords to the ones given."""
        ident = self._settings.identity
        self.ensure_roles()
        self.create_project(ident.admin_project)
        self.create_project(ident.demo_project)
        self.create_user(ident.admin_user, admin_password, ident.admin_project, ["admin"])
        self.create_user(ident.demo_user, demo_password, ident.demo_project, ["member"])

    # -- lookups ----------------------------------------------------------------------------

    @staticmethod
    def _ensure_roles(session: Session) -> dict[str, Role]:
        found = {r.name: r for r in session.scalars(select(Role).where(Role.name.in_(ROLES)))}
        for name in ROLES:
            if name not in found:
                found[name] = Role(name=name)
                session.add(found[name])
        session.flush()
        return found

    @staticmethod
    def _find_user(session: Session, ref: Mapping[str, Any]) -> User | None:
        if "id" in ref:
            return session.get(User, ref["id"])
        domain = _domain_id(ref.get("domain"))
        if domain is None:
            return None
        return session.scalar(
            select(User).where(User.domain_id == domain, User.name == ref["name"])
        )

    @staticmethod
    def _find_project(session: Session, ref: Mapping[str, Any]) -> Project | None:
        if "id" in ref:
            return session.get(Project, ref["id"])
        domain = _domain_id(ref.get("domain"))
        if domain is None:
            return None
        return session.scalar(
            select(Project).where(Project.domain_id == domain, Project.name == ref["name"])
        )


# -- request parsing and validation helpers ---------------------------------------------------


def _parse_auth_body(
    body: Mapping[str, Any],
) -> tuple[Mapping[str, Any], str, Mapping[str, Any]]:
    """Pick (user ref, password, project ref) out of a v3 auth body, checking its shape."""
    auth = _obj(body, "auth", "the request body")
    identity = _obj(auth, "identity", "auth")
    methods = identity.get("methods")
    if not isinstance(methods, list) or not methods:
        raise BadRequest('auth.identity.methods must be a list such as ["password"].')
    if "password" not in methods:
        raise Unauthorized(
            f"Authentication method(s) {', '.join(map(str, methods))} are not supported; "
            "use the password method."
        )
    user = _obj(_obj(identity, "password", "auth.identity"), "user", "auth.identity.password")
    _check_ref(user, "auth.identity.password.user")
    password = user.get("password")
    if not isinstance(password, str) or not password:
        raise BadRequest("auth.identity.password.user.password must be a non-empty string.")
    scope = auth.get("scope")
    if not scope:
        raise Unauthorized(
            "Unscoped tokens are not supported; add auth.scope.project with the project's name "
            "and domain, or its id."
        )
    if not isinstance(scope, dict) or "project" not in scope:
        raise Unauthorized(
            "Only project-scoped tokens are supported; use auth.scope.project (not a domain or "
            "system scope)."
        )
    project = _obj(scope, "project", "auth.scope")
    _check_ref(project, "auth.scope.project")
    return user, password, project


def _obj(parent: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    if not isinstance(parent, Mapping):
        raise BadRequest(f"{where} must be a JSON object.")
    value = parent.get(key)
    if not isinstance(value, Mapping):
        raise BadRequest(f"{where} needs a {key!r} object.")
    return value


def _check_ref(ref: Mapping[str, Any], where: str) -> None:
    if "id" in ref:
        if not isinstance(ref["id"], str) or not ref["id"]:
            raise BadRequest(f"{where}.id must be a non-empty string.")
        return
    if not isinstance(ref.get("name"), str) or not ref["name"]:
        raise BadRequest(f"{where} needs an 'id', or a 'name' with a 'domain'.")
    domain = ref.get("domain")
    if domain is not None and not (
        isinstance(domain, Mapping)
        and (isinstance(domain.get("id"), str) or isinstance(domain.get("name"), str))
    ):
        raise BadRequest(f"{where}.domain must be an object with an 'id' or a 'name'.")


def _domain_id(domain: Any) -> str | None:
    """The domain id a reference names; a missing domain means the default one. ``None`` for a
    domain that does not exist (which then matches nothing)."""
    if domain is None:
        return DEFAULT_DOMAIN_ID
    if domain.get("id") is not None:
        return DEFAULT_DOMAIN_ID if domain["id"] == DEFAULT_DOMAIN_ID else None
    return DEFAULT_DOMAIN_ID if domain.get("name") == DEFAULT_DOMAIN_NAME else None


def _describe_ref(ref: Mapping[str, Any]) -> str:
    if "id" in ref:
        return f"with id {ref['id']!r}"
    return repr(ref["name"])


def _roles_on(session: Session, user_id: str, project_id: str) -> list[Role]:
    return list(
        session.scalars(
            select(Role)
            .join(RoleAssignment, RoleAssignment.role_id == Role.id)
            .where(RoleAssignment.user_id == user_id, RoleAssignment.project_id == project_id)
        )
    )


def _role_name(role: Role) -> str:
    return role.name


def _project_by_name(session: Session, name: str) -> Project | None:
    return session.scalar(
        select(Project).where(Project.domain_id == DEFAULT_DOMAIN_ID, Project.name == name)
    )


def _get_or_create_project(session: Session, name: str) -> Project:
    project = _project_by_name(session, name)
    if project is None:
        project = Project(name=name, domain_id=DEFAULT_DOMAIN_ID)
        session.add(project)
        session.flush()
    return project


def _check_name(kind: str, name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name) or len(name) > _MAX_NAME:
        raise ValidationError(
            f"The {kind} name {name!r} is not valid; use 1-{_MAX_NAME} letters, digits and "
            "'_.@+-', starting with a letter or digit."
        )


def _check_password(password: str) -> None:
    if not isinstance(password, str) or not password:
        raise ValidationError("The password must not be empty.")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise ValidationError(f"The password must be at most {MAX_PASSWORD_LENGTH} characters.")


def _check_roles(roles: list[str]) -> None:
    if not roles:
        raise ValidationError(f"Give the user at least one role ({', '.join(ROLES)}).")
    for role in roles:
        if role not in ROLES:
            close = difflib.get_close_matches(str(role), ROLES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValidationError(f"Unknown role {role!r}{hint}; the roles are {', '.join(ROLES)}.")
