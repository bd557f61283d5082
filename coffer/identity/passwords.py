"""Password hashing for the embedded identity service: salted scrypt, constant-time comparison.

A stored hash is self-describing, ``scrypt$<n>$<r>$<p>$<salt>$<digest>`` (salt and digest in
unpadded URL-safe base64), so the cost can be raised later without invalidating existing hashes:
``verify_password`` always uses the parameters stored with the hash.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass

_SCHEME = "scrypt"
_SALT_BYTES = 16
_DIGEST_BYTES = 32
#: Longest password accepted; scrypt cost does not grow with length, but unbounded input is a
#: needless way to make a server hash megabytes per request.
MAX_PASSWORD_LENGTH = 4096


@dataclass(frozen=True)
class ScryptCost:
    """scrypt work factors: ``n`` (CPU/memory, a power of two), ``r`` (block size), ``p``."""

    n: int
    r: int
    p: int

    def __post_init__(self) -> None:
        if self.n < 2 or self.n & (self.n - 1):
            raise ValueError("scrypt n must be a power of two greater than 1")
        if self.r < 1 or self.p < 1:
            raise ValueError("scrypt r and p must be positive")

    @property
    def maxmem(self) -> int:
        # hashlib refuses anything above 32 MiB by default; allow what these parameters need.
        return 128 * self.n * self.r * (self.p + 1) + 1024 * 1024


#: One of OWASP's equivalent scrypt settings (N=2^15, r=8, p=3): about 32 MiB and a few hundred
#: milliseconds per hash, paid once per token request.
DEFAULT_COST = ScryptCost(n=2**15, r=8, p=3)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _scrypt(password: str, salt: bytes, cost: ScryptCost) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8"),
        salt=salt,
        n=cost.n,
        r=cost.r,
        p=cost.p,
        maxmem=cost.maxmem,
        dklen=_DIGEST_BYTES,
    )


def hash_password(password: str, cost: ScryptCost = DEFAULT_COST) -> str:
    """Return a salted, self-describing scrypt hash of ``password``.

    Raises ``ValueError`` for an empty or over-long password (callers validate first and turn
    that into a user-facing error).
    """
    if not password:
        raise ValueError("password must not be empty")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise ValueError(f"password must be at most {MAX_PASSWORD_LENGTH} characters")
    salt = os.urandom(_SALT_BYTES)
    digest = _scrypt(password, salt, cost)
    return f"{_SCHEME}${cost.n}${cost.r}${cost.p}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """True when ``password`` matches ``stored``; False for a mismatch or a malformed hash.

    The digests are compared in constant time. Never raises for bad input.
    """
    if len(password) > MAX_PASSWORD_LENGTH:
        return False
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != _SCHEME:
            return False
        cost = ScryptCost(n=int(n), r=int(r), p=int(p))
        expected = _unb64(digest)
        actual = _scrypt(password, _unb64(salt), cost)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


def dummy_verify(password: str, cost: ScryptCost = DEFAULT_COST) -> None:
    """Spend the time of one verification, so an unknown user name answers as slowly as a
    wrong password and response timing does not reveal which user names exist."""
    _scrypt(password[:MAX_PASSWORD_LENGTH], b"\0" * _SALT_BYTES, cost)
