"""Fernet tokens for the embedded identity service.

A token is a Fernet token (AES-128-CBC + HMAC-SHA256, from ``cryptography``) over a small JSON
payload: user id, project id, role names, issue and expiry times, an audit id. Nothing is stored
server-side, so there is no token table to grow or clean. The Fernet key is derived from the
master key with HKDF under a purpose label, so the master key itself never signs anything and a
token key leak does not expose the keys the master key wraps.
"""

from __future__ import annotations

import base64
import json
import secrets
from dataclasses import dataclass
from typing import Any

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from coffer.errors import Unauthorized

TOKEN_PURPOSE = b"coffer identity fernet token key v1"
_MIN_SECRET_BYTES = 16
#: Fernet tokens from this service stay well under this; anything longer is not ours.
_MAX_TOKEN_LENGTH = 4096


def derive_key(secret: bytes, purpose: bytes, length: int = 32) -> bytes:
    """Derive ``length`` bytes for one ``purpose`` from ``secret`` with HKDF-SHA256.

    Different purposes give independent keys; the same inputs always give the same key.
    """
    if len(secret) < _MIN_SECRET_BYTES:
        raise ValueError(f"the secret must be at least {_MIN_SECRET_BYTES} bytes long")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=purpose)
    return hkdf.derive(secret)


@dataclass(frozen=True)
class TokenPayload:
    """What a token carries. Times are POSIX seconds (UTC)."""

    user_id: str
    project_id: str
    roles: tuple[str, ...]
    issued_at: float
    expires_at: float
    audit_id: str
    methods: tuple[str, ...] = ("password",)


class TokenCodec:
    """Seals and opens token payloads with a Fernet key derived from ``secret``."""

    def __init__(self, secret: bytes) -> None:
        key = derive_key(secret, TOKEN_PURPOSE)
        self._fernet = Fernet(base64.urlsafe_b64encode(key))

    def __repr__(self) -> str:  # the key never appears in logs or tracebacks
        return "TokenCodec(<key hidden>)"

    @staticmethod
    def new_audit_id() -> str:
        return secrets.token_urlsafe(16)

    def seal(self, payload: TokenPayload) -> str:
        """Return the token string for ``payload``."""
        data = {
            "u": payload.user_id,
            "p": payload.project_id,
            "r": list(payload.roles),
            "i": payload.issued_at,
            "e": payload.expires_at,
            "a": payload.audit_id,
            "m": list(payload.methods),
        }
        raw = json.dumps(data, separators=(",", ":")).encode("utf-8")
        return self._fernet.encrypt(raw).decode("ascii")

    def open(self, token: str) -> TokenPayload:
        """Decrypt and authenticate ``token``; expiry is the caller's check.

        Raises ``Unauthorized`` when the token was not made with this key, was altered or is not
        a token at all.
        """
        if not token or len(token) > _MAX_TOKEN_LENGTH:
            raise Unauthorized(_INVALID)
        try:
            raw = self._fernet.decrypt(token.encode("ascii"))
            data: dict[str, Any] = json.loads(raw)
            return TokenPayload(
                user_id=str(data["u"]),
                project_id=str(data["p"]),
                roles=tuple(str(role) for role in data["r"]),
                issued_at=float(data["i"]),
                expires_at=float(data["e"]),
                audit_id=str(data["a"]),
                methods=tuple(str(m) for m in data.get("m", ["password"])),
            )
        except (InvalidToken, UnicodeError, ValueError, KeyError, TypeError) as exc:
            raise Unauthorized(_INVALID) from exc


_INVALID = (
    "The token is not valid (it was altered, or issued by another server or key); "
    "get a new one with POST /identity/v3/auth/tokens."
)
