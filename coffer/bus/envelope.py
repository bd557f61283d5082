"""Sealed envelopes: what travels on the bus, and how it is authenticated and encrypted.

Wire format of a sealed message (all integers big-endian)::

    b"CFB1" | u16 len(key_id) | key_id | u16 len(target) | target | nonce (12) | AES-256-GCM

The header (everything before the nonce) is in the clear so a receiver can pick the key, and it is
the associated data of the AEAD: changing the key id or the target breaks the tag. A message sealed
for ``guestagent.a`` therefore cannot be re-routed to ``conductor``, and a reply (whose target is a
reply queue) can never be opened as a request by a server.

The plaintext is JSON of every ``Envelope`` field. Envelopes are immutable; their ``repr`` leaves
out ``kwargs`` and ``result`` because those may carry passwords.
"""

from __future__ import annotations

import json
import secrets
import struct
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from heapq import heappop, heappush
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from coffer.bus.keys import check_key
from coffer.errors import SealError

MAGIC = b"CFB1"
_LEN = struct.Struct(">H")
_NONCE_SIZE = 12
_TAG_SIZE = 16
#: Identifiers (key ids, queue names) are limited like AMQP queue names.
MAX_NAME_LENGTH = 255


@dataclass(frozen=True)
class Envelope:
    """One request or reply on the bus.

    ``key_id`` names the key that seals it: an instance id, or ``"control"`` for control-plane
    traffic. ``sender`` is who speaks (``"control"`` or an instance id); a server built with
    ``require_sender_is_key_id`` accepts only envelopes where the two are equal, so a guest can
    speak only for itself. ``seq`` is the sender's monotonic sequence and ``sent_at`` the unix
    time of sending; receivers use them to drop stale reports. Replies carry ``correlation_id``
    (the request's) and either ``result`` or ``error`` (``{"kind", "message", "status"}``).
    """

    key_id: str
    sender: str
    target: str
    method: str
    kwargs: dict[str, Any] = field(repr=False)
    msg_id: str
    seq: int
    sent_at: float
    reply_to: str | None = None
    correlation_id: str | None = None
    result: Any = field(default=None, repr=False)
    error: dict[str, Any] | None = None

    @classmethod
    def new(
        cls,
        *,
        key_id: str,
        sender: str,
        target: str,
        method: str,
        kwargs: Mapping[str, Any] | None = None,
        seq: int,
        reply_to: str | None = None,
        correlation_id: str | None = None,
        result: Any = None,
        error: dict[str, Any] | None = None,
    ) -> Envelope:
        """Build an envelope with a fresh random ``msg_id`` and ``sent_at`` set to now."""
        return cls(
            key_id=key_id,
            sender=sender,
            target=target,
            method=method,
            kwargs=dict(kwargs or {}),
            msg_id=uuid.uuid4().hex,
            seq=seq,
            sent_at=time.time(),
            reply_to=reply_to,
            correlation_id=correlation_id,
            result=result,
            error=error,
        )


class SequenceCounter:
    """Thread-safe monotonic sequence: each value is ``max(previous + 1, time.time_ns())``.

    Starting from the clock means a restarted sender still counts upwards from where it was,
    without persisting anything, as long as the clock does not jump back.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = 0

    def next(self) -> int:
        with self._lock:
            self._last = max(self._last + 1, time.time_ns())
            return self._last


class KeyRing(Protocol):
    """Where a receiver finds the key for a key id.

    ``key_for`` returns the 32-byte key, or raises ``SealError`` if the key id is unknown. It is
    called from consumer threads, so implementations must be thread-safe.
    """

    def key_for(self, key_id: str) -> bytes: ...


class StaticKeyRing:
    """A ``KeyRing`` over a fixed mapping of key id to key. Its ``repr`` shows only key ids."""

    def __init__(self, keys: Mapping[str, bytes]) -> None:
        for key_id, key in keys.items():
            check_key(key, f"key for {key_id!r}")
        self._keys = {key_id: bytes(key) for key_id, key in keys.items()}

    def key_for(self, key_id: str) -> bytes:
        try:
            return self._keys[key_id]
        except KeyError:
            raise SealError(f"no key is known for key id {key_id!r}") from None

    def __repr__(self) -> str:
        return f"StaticKeyRing(key_ids={sorted(self._keys)!r})"


def _encode_name(value: str, what: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise ValueError(f"the envelope's {what} must be a non-empty string")
    raw = value.encode("utf-8")
    if len(raw) > MAX_NAME_LENGTH:
        raise ValueError(f"the envelope's {what} is longer than {MAX_NAME_LENGTH} bytes")
    return raw


def _header(key_id: str, target: str) -> bytes:
    kid = _encode_name(key_id, "key_id")
    tgt = _encode_name(target, "target")
    return MAGIC + _LEN.pack(len(kid)) + kid + _LEN.pack(len(tgt)) + tgt


def seal(env: Envelope, key: bytes) -> bytes:
    """Serialise ``env`` to JSON and encrypt it with AES-256-GCM under ``key``.

    Raises ``TypeError`` if ``kwargs``, ``result`` or ``error`` hold something JSON cannot carry,
    and ``ValueError`` for a key that is not 32 bytes or an empty key id or target. Nothing is
    sent by this function, so a failure has no side effect.
    """
    check_key(key, "sealing key")
    header = _header(env.key_id, env.target)
    payload = {f.name: getattr(env, f.name) for f in fields(env)}
    try:
        plaintext = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"the arguments or result of {env.method!r} cannot be sent on the bus: {exc}; "
            "use only JSON types (dict, list, str, int, float, bool, None)"
        ) from None
    nonce = secrets.token_bytes(_NONCE_SIZE)
    return header + nonce + AESGCM(bytes(key)).encrypt(nonce, plaintext, header)


def peek_header(data: bytes) -> tuple[str, str, int]:
    """Return ``(key_id, target, header_length)`` of a sealed message without opening it.

    Raises ``SealError`` if the bytes are not a sealed message.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise SealError(f"a sealed message must be bytes, got {type(data).__name__}")
    data = bytes(data)
    try:
        if data[:4] != MAGIC:
            raise ValueError("bad magic")
        pos = 4
        (kid_len,) = _LEN.unpack_from(data, pos)
        pos += _LEN.size
        key_id = data[pos : pos + kid_len].decode("utf-8")
        pos += kid_len
        (tgt_len,) = _LEN.unpack_from(data, pos)
        pos += _LEN.size
        target = data[pos : pos + tgt_len].decode("utf-8")
        pos += tgt_len
        if (
            len(key_id.encode("utf-8")) != kid_len
            or len(target.encode("utf-8")) != tgt_len
            or not key_id
            or not target
        ):
            raise ValueError("truncated header")
        if len(data) < pos + _NONCE_SIZE + _TAG_SIZE:
            raise ValueError("truncated body")
    except (ValueError, struct.error, UnicodeDecodeError):
        raise SealError("the message is not a sealed Coffer envelope (malformed header)") from None
    return key_id, target, pos


def open_sealed(data: bytes, keyring: KeyRing, expected_target: str | None = None) -> Envelope:
    """Authenticate and decrypt a sealed message and return its ``Envelope``.

    Raises ``SealError`` when the bytes are malformed, the key id is unknown to ``keyring``, the
    message was sealed with another key or altered, or (with ``expected_target``) it was sealed
    for a different queue. The message says which, and never includes key material.
    """
    key_id, target, header_len = peek_header(data)
    data = bytes(data)
    if expected_target is not None and target != expected_target:
        raise SealError(
            f"the message was sealed for {target!r}, not for {expected_target!r}; dropped"
        )
    key = keyring.key_for(key_id)
    header = data[:header_len]
    nonce = data[header_len : header_len + _NONCE_SIZE]
    try:
        plaintext = AESGCM(key).decrypt(nonce, data[header_len + _NONCE_SIZE :], header)
    except InvalidTag:
        raise SealError(
            f"the message for key id {key_id!r} failed authentication: it was sealed with "
            "another key or altered in transit"
        ) from None
    env = _envelope_from_json(plaintext)
    if env.key_id != key_id or env.target != target:
        raise SealError("the message's sealed header and content disagree; dropped")
    return env


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "key_id": (str,),
    "sender": (str,),
    "target": (str,),
    "method": (str,),
    "kwargs": (dict,),
    "msg_id": (str,),
    "seq": (int,),
    "sent_at": (float, int),
}
_OPTIONAL_TYPES: dict[str, tuple[type, ...]] = {
    "reply_to": (str,),
    "correlation_id": (str,),
    "error": (dict,),
}


def _envelope_from_json(plaintext: bytes) -> Envelope:
    try:
        payload = json.loads(plaintext)
    except (ValueError, UnicodeDecodeError):
        raise SealError("the sealed message does not contain valid JSON") from None
    if not isinstance(payload, dict):
        raise SealError("the sealed message does not contain an envelope object")
    for name, types in _FIELD_TYPES.items():
        value = payload.get(name)
        if not isinstance(value, types) or isinstance(value, bool):
            raise SealError(f"the sealed envelope's {name!r} is missing or has the wrong type")
    for name, types in _OPTIONAL_TYPES.items():
        value = payload.get(name)
        if value is not None and not isinstance(value, types):
            raise SealError(f"the sealed envelope's {name!r} has the wrong type")
    known = {f.name for f in fields(Envelope)}
    return Envelope(**{k: v for k, v in payload.items() if k in known})


class ReplayGuard:
    """Rejects replayed and stale envelopes; in memory and thread-safe.

    ``check`` raises ``SealError`` if ``sent_at`` is more than ``max_age`` seconds in the past
    or more than ``max_future`` seconds ahead (clock skew allowance), or if the same ``msg_id``
    was already checked. Ids are remembered only while they would still pass the age check, so
    memory stays proportional to the traffic of the last ``max_age`` seconds.
    """

    def __init__(self, max_age: float = 120.0, max_future: float = 30.0) -> None:
        if max_age <= 0 or max_future < 0:
            raise ValueError("ReplayGuard needs max_age > 0 and max_future >= 0")
        self.max_age = max_age
        self.max_future = max_future
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        self._expiry: list[tuple[float, str]] = []

    def check(self, env: Envelope) -> None:
        now = time.time()
        if env.sent_at < now - self.max_age:
            raise SealError(
                f"message {env.msg_id} from {env.sender!r} is stale: sent "
                f"{now - env.sent_at:.0f} s ago, more than the {self.max_age:.0f} s allowed"
            )
        if env.sent_at > now + self.max_future:
            raise SealError(
                f"message {env.msg_id} from {env.sender!r} is dated {env.sent_at - now:.0f} s "
                "in the future; check the sender's clock"
            )
        with self._lock:
            while self._expiry and self._expiry[0][0] < now:
                self._seen.discard(heappop(self._expiry)[1])
            if env.msg_id in self._seen:
                raise SealError(
                    f"message {env.msg_id} from {env.sender!r} was already received (replay)"
                )
            self._seen.add(env.msg_id)
            # Past this moment the age check rejects the message anyway.
            heappush(self._expiry, (env.sent_at + self.max_age, env.msg_id))

    def __len__(self) -> int:
        with self._lock:
            return len(self._seen)
