"""The embedded identity service (a Keystone v3 subset): users, projects, roles, Fernet tokens."""

from coffer.identity.service import (
    DEFAULT_DOMAIN_ID,
    DEFAULT_DOMAIN_NAME,
    ROLES,
    AuthContext,
    IdentityService,
)

__all__ = [
    "DEFAULT_DOMAIN_ID",
    "DEFAULT_DOMAIN_NAME",
    "ROLES",
    "AuthContext",
    "IdentityService",
]
