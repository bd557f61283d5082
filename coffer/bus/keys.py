"""Keys for sealed bus traffic: generation, the master key file, wrapping and derivation.

Every instance gets its own 32-byte key from the operating system's CSPRNG. The control DB stores
it only wrapped (AES-256-GCM) under the master key, with the instance id as associated data so a
wrapped key copied onto another instance's row does not unwrap. Control-plane traffic uses a key
derived from the master key with HKDF, so no second secret has to be stored.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import os
import secrets
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from coffer.errors import CofferError, SealError

log = logging.getLogger(__name__)

KEY_SIZE = 32
_NONCE_SIZE = 12
_TAG_SIZE = 16
# Version prefix of wrapped keys, so the format can change without guessing what a value is.
_WRAP_PREFIX = "cfk1."
_WRAP_AAD_PREFIX = b"coffer-wrapped-key-v1:"
_HKDF_INFO_PREFIX = b"coffer-derived-key-v1:"


class MasterKeyError(CofferError):
    """The master key file exists but cannot be used (unreadable, malformed, wrong size)."""


def generate_key() -> bytes:
    """Return a new random 32-byte key from the operating system's CSPRNG."""
    return secrets.token_bytes(KEY_SIZE)


def check_key(key: bytes, what: str = "key") -> None:
    """Raise ``ValueError`` unless ``key`` is exactly 32 bytes (an AES-256 key).

    A wrong key size is a bug in the caller, not bad user input, so it is a plain ``ValueError``.
    """
    if not isinstance(key, bytes | bytearray) or len(key) != KEY_SIZE:
        size = len(key) if isinstance(key, bytes | bytearray) else type(key).__name__
        raise ValueError(f"the {what} must be {KEY_SIZE} bytes, got {size}")


def load_or_create_master_key(path: Path) -> bytes:
    """Return the master key stored base64-encoded in ``path``, creating the file if missing.

    A new file is written with mode 0600 under a temporary name and linked into place, so a crash
    never leaves a half-written key and two processes starting at once agree on one key (the loser
    of the race reads the winner's file). The parent directory is created if needed.

    Raises ``MasterKeyError`` if the file exists but does not hold a base64 32-byte key; the
    message names the file, never its content.
    """
    path = Path(path)
    try:
        return _read_master_key(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = generate_key()
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(base64.b64encode(key) + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            # Another process created the key first: use theirs so everyone agrees.
            return _read_master_key(path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    log.info("created a new master key in %s", path)
    return key


def _read_master_key(path: Path) -> bytes:
    try:
        info = path.stat()
        raw = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise MasterKeyError(
            f"cannot read the master key file {path} ({exc.strerror}); check its permissions"
        ) from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "master key file %s is accessible to group or others (mode %o); run 'chmod 600 %s'",
            path,
            stat.S_IMODE(info.st_mode),
            path,
        )
    try:
        key = base64.b64decode(raw.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise MasterKeyError(
            f"the master key file {path} does not contain base64 text; restore it from a backup "
            "(a new key cannot unwrap the existing instance keys)"
        ) from None
    if len(key) != KEY_SIZE:
        raise MasterKeyError(
            f"the master key in {path} is {len(key)} bytes, expected {KEY_SIZE}; "
            "restore the file from a backup"
        )
    return key


def wrap_key(master: bytes, key: bytes, key_id: str) -> str:
    """Encrypt ``key`` under ``master`` (AES-256-GCM) and return it as ASCII text for storage.

    ``key_id`` (normally the instance id) is authenticated as associated data: ``unwrap_key``
    succeeds only with the same ``key_id``. ``key`` is normally a 32-byte instance key, but any
    non-empty bytes are accepted, so other secrets a later step needs can be stored the same way.
    """
    check_key(master, "master key")
    if not isinstance(key, bytes | bytearray) or not key:
        raise ValueError("wrap_key needs non-empty bytes to wrap")
    nonce = secrets.token_bytes(_NONCE_SIZE)
    sealed = AESGCM(bytes(master)).encrypt(nonce, bytes(key), _wrap_aad(key_id))
    return _WRAP_PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode("ascii")


def unwrap_key(master: bytes, wrapped: str, key_id: str) -> bytes:
    """Return the key that ``wrap_key(master, key, key_id)`` wrapped.

    Raises ``SealError`` if the text is malformed, was wrapped under another master key or for
    another ``key_id``, or was altered.
    """
    check_key(master, "master key")
    if not isinstance(wrapped, str) or not wrapped.startswith(_WRAP_PREFIX):
        raise SealError(f"the wrapped key for {key_id!r} is not in the expected format")
    try:
        blob = base64.urlsafe_b64decode(wrapped[len(_WRAP_PREFIX) :].encode("ascii"))
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise SealError(f"the wrapped key for {key_id!r} is not valid base64") from None
    if len(blob) <= _NONCE_SIZE + _TAG_SIZE:
        raise SealError(f"the wrapped key for {key_id!r} has the wrong length")
    try:
        key = AESGCM(bytes(master)).decrypt(
            blob[:_NONCE_SIZE], blob[_NONCE_SIZE:], _wrap_aad(key_id)
        )
    except InvalidTag:
        raise SealError(
            f"the wrapped key for {key_id!r} does not unwrap: wrong master key, "
            "wrong key id, or altered data"
        ) from None
    return key


def derive_key(master: bytes, purpose: str) -> bytes:
    """Derive a 32-byte key for ``purpose`` (e.g. ``"control-bus"``) from ``master`` (HKDF-SHA256).

    The same master and purpose always give the same key; different purposes give unrelated keys.
    """
    check_key(master, "master key")
    if not purpose:
        raise ValueError("derive_key needs a non-empty purpose")
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_SIZE,
        salt=None,
        info=_HKDF_INFO_PREFIX + purpose.encode("utf-8"),
    )
    return hkdf.derive(bytes(master))


def _wrap_aad(key_id: str) -> bytes:
    if not isinstance(key_id, str) or not key_id:
        raise ValueError("a wrapped key needs a non-empty key id")
    return _WRAP_AAD_PREFIX + key_id.encode("utf-8")
