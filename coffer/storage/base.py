"""The backup storage contract, its error family and the registry of drivers.

A ``BackupStorage`` keeps whole objects (one backup each) under path-like keys and moves their
bytes as streams: a backup flows engine -> compression -> encryption -> checksum -> storage
without ever being staged whole in memory or on local disk, and a restore reads it back the
same way. Drivers are found by short name (``file``, ``s3``, ``swift``, or a third party's
``coffer.storage`` entry point) and built from the ``[storage]`` section of ``coffer.conf``.

The public methods live here and validate their arguments before any side effect; a driver fills
the private hooks (``_put``, ``_open``, ``_stat``, ``_delete``, ``_list``) and turns its
library's errors into the ``StorageError`` family below.

Errors, and what a caller does about them:

* ``InvalidStorageKey`` (400, not transient): a key, prefix or metadata entry broke the rules in
  ``validate_key``/``validate_metadata``; nothing was sent anywhere. Fix the caller.
* ``StorageNotFound`` (404, not transient): no object under the key.
* ``StorageUnavailable`` (503, **transient**): the store could not be reached, timed out, was
  throttled, answered 5xx, or a download was cut short. Retrying later may succeed.
* ``StorageAccessDenied`` (500, not transient): the store refused Coffer's credentials or
  permissions. The operator must fix ``[storage]``.
* ``StorageIntegrityError`` (500, not transient): the store holds something other than what was
  sent (size or checksum mismatch), or an object is damaged.
* ``StorageConfigError`` (500, not transient, also a ``ConfigError``): the driver name or its
  options are wrong, or its library is missing.
* ``StorageError`` (500, not transient): any other failure of the store.

An exception raised by the caller's own chunk iterator during ``put_stream`` is not a storage
error: it is re-raised unchanged after the partial upload has been removed.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import logging
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from coffer.errors import (
    CofferError,
    ConfigError,
    NotFound,
    ServiceUnavailable,
    ValidationError,
)

if TYPE_CHECKING:
    from typing import Self

    from coffer.config import Settings, StorageSection

LOG = logging.getLogger(__name__)

#: What a chunk of a stream may be: bytes, or a buffer holding them (copied when kept).
Chunk = bytes | bytearray | memoryview

# --- errors ------------------------------------------------------------------------------------


class StorageError(CofferError):
    """The backup store failed. Not transient unless a subclass says so.

    Defines no status of its own, so each subclass takes its HTTP status from its second parent.
    """


class StorageUnavailable(StorageError, ServiceUnavailable):
    """The store could not be reached or answered with a temporary failure. Transient."""


class StorageNotFound(StorageError, NotFound):
    """No object exists under the key."""


class InvalidStorageKey(StorageError, ValidationError):
    """A key, prefix or metadata entry is not acceptable; nothing was sent to the store."""


class StorageAccessDenied(StorageError):
    """The store refused Coffer's credentials or permissions; the operator must fix them."""


class StorageIntegrityError(StorageError):
    """What the store holds differs from what was sent, or an object is damaged."""


class StorageConfigError(StorageError, ConfigError):
    """The ``[storage]`` options are wrong or the driver cannot be loaded."""

    def __init__(self, problems: list[str]) -> None:
        ConfigError.__init__(self, problems)


# --- names -------------------------------------------------------------------------------------

#: Longest key accepted. Every driver can store it: the file driver keeps a key as one file name
#: (255 bytes at most on Linux) and the object stores add segment suffixes to it.
MAX_KEY_LENGTH = 200
#: User metadata limits common to S3 (2 KB in total) and Swift (90 entries, 4 KB).
MAX_METADATA_ENTRIES = 32
MAX_METADATA_BYTES = 2000

_SEGMENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_META_KEY = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
_META_VALUE = re.compile(r"[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?")


def validate_key(key: object) -> str:
    """Return ``key`` if every driver can store it safely, else raise ``InvalidStorageKey``.

    A key is 1 to ``MAX_KEY_LENGTH`` characters of ``/``-separated segments; each segment uses
    only ASCII letters, digits, ``.``, ``_`` and ``-`` and does not start with a dot. So there is
    no absolute path, no ``..``, no empty segment, no hidden name (drivers keep their temporary
    objects under hidden names), and nothing that needs quoting in a URL or a file name.
    """
    if not isinstance(key, str) or not key:
        raise InvalidStorageKey("A backup storage key must be a non-empty string.")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidStorageKey(
            f"The backup storage key {key[:40]!r}... is {len(key)} characters long; "
            f"use at most {MAX_KEY_LENGTH}."
        )
    for segment in key.split("/"):
        if not _SEGMENT.fullmatch(segment):
            raise InvalidStorageKey(
                f"The backup storage key {key!r} is not allowed: each '/'-separated part must "
                "be non-empty, use only letters, digits, '.', '_' and '-', and not start with "
                "'.'."
            )
    return key


def validate_prefix(prefix: object) -> str:
    """Return ``prefix`` if it can start a valid key (or is empty), else ``InvalidStorageKey``.

    A prefix may end with ``/`` or in the middle of a segment (``"backups/2024-"``).
    """
    if prefix == "":
        return ""
    if not isinstance(prefix, str):
        raise InvalidStorageKey("A backup storage prefix must be a string.")
    body = prefix[:-1] if prefix.endswith("/") else prefix
    try:
        validate_key(body)
    except InvalidStorageKey:
        raise InvalidStorageKey(
            f"The backup storage prefix {prefix!r} cannot start any valid key: use "
            "'/'-separated parts of letters, digits, '.', '_' and '-', none starting with '.'."
        ) from None
    return prefix


def validate_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """Return a copy of ``metadata`` if every driver can store it, else ``InvalidStorageKey``.

    Names are lowercase ASCII letters, digits and ``-`` (HTTP stores fold case and turn ``_``
    into ``-``), at most 64 characters; values are printable ASCII without leading or trailing
    spaces and not empty; at most ``MAX_METADATA_ENTRIES`` entries and ``MAX_METADATA_BYTES``
    of names plus values.
    """
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise InvalidStorageKey("Backup metadata must be a mapping of names to strings.")
    checked: dict[str, str] = {}
    for name, value in metadata.items():
        if not isinstance(name, str) or not _META_KEY.fullmatch(name):
            raise InvalidStorageKey(
                f"The backup metadata name {name!r} is not allowed: use 1 to 64 lowercase "
                "letters, digits and '-', starting with a letter or digit."
            )
        if not isinstance(value, str) or not _META_VALUE.fullmatch(value):
            raise InvalidStorageKey(
                f"The backup metadata value for {name!r} is not allowed: use non-empty "
                "printable ASCII without leading or trailing spaces (leave the entry out "
                "instead of storing an empty value)."
            )
        checked[name] = value
    if len(checked) > MAX_METADATA_ENTRIES:
        raise InvalidStorageKey(
            f"Backup metadata has {len(checked)} entries; at most {MAX_METADATA_ENTRIES} "
            "are allowed."
        )
    total = sum(len(name) + len(value) for name, value in checked.items())
    if total > MAX_METADATA_BYTES:
        raise InvalidStorageKey(
            f"Backup metadata is {total} bytes of names and values; at most "
            f"{MAX_METADATA_BYTES} are allowed."
        )
    return checked


# --- objects and streams -----------------------------------------------------------------------


@dataclass(frozen=True)
class StoredObject:
    """One object as the store describes it.

    ``etag`` is the store's own fingerprint (an MD5 for small S3 and Swift objects, an MD5 of
    part MD5s for multipart or segmented ones, the SHA-256 for the file driver); compare it only
    with etags of the same store. ``sha256`` is the SHA-256 of the content: ``put_stream`` always
    sets it (computed while streaming); ``stat`` and ``list`` set it only when the store
    records it. Listings do not carry metadata (no store returns it in a listing): ``list``
    yields empty ``metadata``; ``stat`` returns it.
    """

    key: str
    size: int
    metadata: dict[str, str] = field(default_factory=dict)
    etag: str | None = None
    sha256: str | None = None


class ChunkSource:
    """The caller's chunks as a driver consumes them: counted and hashed on the way through.

    A driver either iterates over the source or pulls from it with ``read``/``take``; the
    pieces never overlap, so every byte is delivered exactly once. If the caller's iterator
    raises, the exception is remembered in ``failure`` and re-raised to the driver, and every
    later pull raises it again: the base class re-raises it to the caller unchanged even if a
    library wrapped it on the way.
    """

    def __init__(self, chunks: Iterable[Chunk]) -> None:
        self._chunks = iter(chunks)
        self._pending = memoryview(b"")
        self._sha256 = hashlib.sha256()
        self._done = False
        self.size = 0
        self.failure: BaseException | None = None

    def _pull(self) -> bool:
        """Refill ``_pending`` from the caller; False at the end of the stream."""
        if self.failure is not None:
            raise self.failure
        while not self._pending and not self._done:
            try:
                chunk = next(self._chunks)
            except StopIteration:
                self._done = True
                break
            except BaseException as exc:
                self.failure = exc
                raise
            if not isinstance(chunk, Chunk):
                self.failure = TypeError(
                    f"put_stream chunks must be bytes, not {type(chunk).__name__}"
                )
                raise self.failure
            if chunk:
                self._sha256.update(chunk)
                self.size += len(chunk)
                self._pending = memoryview(chunk).cast("B")
        return bool(self._pending)

    def at_end(self) -> bool:
        """True when every byte has been handed out (pulls from the caller to find out)."""
        return not self._pull()

    def take(self, limit: int) -> Iterator[bytes]:
        """Yield the next ``limit`` bytes (fewer only at the end of the stream) in pieces."""
        left = limit
        while left > 0 and self._pull():
            piece = self._pending[:left]
            self._pending = self._pending[len(piece) :]
            left -= len(piece)
            yield bytes(piece)

    def read(self, size: int = -1) -> bytes:
        """File-like read: exactly ``size`` bytes unless the stream ends (-1: all of it)."""
        if size is None or size < 0:
            return b"".join(self)
        return b"".join(self.take(size))

    def __iter__(self) -> Iterator[bytes]:
        while self._pull():
            piece, self._pending = self._pending, memoryview(b"")
            whole = piece.obj
            if isinstance(whole, bytes) and len(whole) == piece.nbytes:
                yield whole  # a caller's bytes chunk, untouched: no copy
            else:
                yield bytes(piece)

    @property
    def exhausted(self) -> bool:
        """True once the caller's iterator has ended and everything was handed out."""
        return self._done and not self._pending and self.failure is None

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of everything pulled so far (the whole object once exhausted)."""
        return self._sha256.hexdigest()


# --- the contract ------------------------------------------------------------------------------


class BackupStorage(ABC):
    """Where backups are kept: whole objects under path-like keys, moved as byte streams.

    Guarantees every driver gives:

    * ``put_stream`` streams: it holds at most a bounded buffer (one part or segment, set by the
      driver's options) and never the whole object, in memory or on local disk.
    * An object is visible (``stat``, ``get_stream``, ``list``) only once it is complete. An
      upload that fails for any reason, including the caller's iterator raising, leaves nothing
      under its key and removes its parts (a previous object under the key, if any, stays).
      A process killed mid-upload may leave parts behind, but never under the key: hidden
      temporary files, S3 incomplete multipart uploads, or segments in Swift's
      ``<container>_segments`` container.
    * ``put_stream`` on an existing key replaces the object as a whole: a reader sees the old
      or the new one, never a mix.
    * ``delete`` is idempotent; ``list`` yields keys in ascending order.
    * Every method validates its arguments before touching the store, raises only the
      ``StorageError`` family for store failures (see the module docstring for which are
      transient), and never puts credentials in an exception, a log line or ``repr``.

    Every method blocks on disk or network I/O; none is a coroutine. An instance may be used
    by one thread at a time; use one per thread for parallel work. Call ``close`` when done.
    """

    #: Short name in the registry and in ``[storage] driver``.
    name: ClassVar[str]

    @classmethod
    @abstractmethod
    def from_settings(cls, section: StorageSection, state_dir: Path | None = None) -> Self:
        """Build the driver from the ``[storage]`` options; ``StorageConfigError`` if unusable.

        ``state_dir`` resolves defaults that live under Coffer's state directory.
        """

    # -- public methods: validate, then call the driver's hook ---------------------------------

    def put_stream(
        self, key: str, chunks: Iterable[Chunk], metadata: Mapping[str, str] | None = None
    ) -> StoredObject:
        """Store the bytes ``chunks`` yields as the object ``key`` with ``metadata``.

        Consumes ``chunks`` as it uploads. Returns the stored object with its size, etag and
        the SHA-256 of the bytes sent. Raises ``InvalidStorageKey`` before reading a single
        chunk if the key or metadata is unacceptable; a ``StorageError`` if the store fails
        (nothing is left under the key); and, unchanged, whatever ``chunks`` itself raises.
        """
        validate_key(key)
        checked = validate_metadata(metadata)
        source = ChunkSource(chunks)
        started = time.monotonic()
        try:
            stored = self._put(key, source, checked)
        except BaseException as exc:
            if source.failure is not None and exc is not source.failure:
                # A library wrapped the caller's own error (or failed after it): the caller
                # must see the error its iterator raised.
                raise source.failure from None
            raise
        if not source.exhausted:
            raise StorageIntegrityError(
                f"The {self.name} driver stopped reading {key!r} before the end of the stream."
            )
        if stored.size != source.size:
            raise StorageIntegrityError(
                f"The store reports {stored.size} bytes for {key!r} but {source.size} were "
                "sent; the object is not usable, store it again."
            )
        LOG.info(
            "stored %s (%d bytes) with the %s driver in %.1f s",
            key,
            source.size,
            self.name,
            time.monotonic() - started,
        )
        return StoredObject(
            key=key, size=source.size, metadata=checked, etag=stored.etag, sha256=source.sha256
        )

    def get_stream(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """The object's bytes, in chunks of at most ``chunk_size``.

        Opens the object before returning, so a missing key raises ``StorageNotFound`` here
        rather than on the first ``next()``. A transfer that breaks off raises
        ``StorageUnavailable`` from the iterator (never a silently short stream). Close the
        iterator (or exhaust it) to release the connection or file.
        """
        validate_key(key)
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise InvalidStorageKey(f"chunk_size must be a positive integer, not {chunk_size!r}.")
        size, body = self._open(key, chunk_size)
        return self._exactly(key, size, body)

    def stat(self, key: str) -> StoredObject | None:
        """The object's size, metadata and etag (and SHA-256 if recorded); None if missing."""
        validate_key(key)
        return self._stat(key)

    def delete(self, key: str) -> None:
        """Remove the object and any parts of it; deleting a missing key is not an error."""
        validate_key(key)
        self._delete(key)

    def list(self, prefix: str) -> Iterator[StoredObject]:
        """Complete objects whose key starts with ``prefix`` ("" for all), in key order.

        The listing is lazy (paged from the store) and carries no metadata. Objects added or
        removed while it runs may or may not appear.
        """
        validate_prefix(prefix)
        return self._list(prefix)

    def close(self) -> None:  # noqa: B027 - optional hook, deliberately empty by default
        """Release connections or handles the driver holds."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- driver hooks --------------------------------------------------------------------------

    @abstractmethod
    def _put(self, key: str, source: ChunkSource, metadata: dict[str, str]) -> StoredObject:
        """Upload everything in ``source``; publish it under ``key`` only when complete.

        On any exception, remove what was uploaded, then re-raise. Return the object as the
        store describes it (size and etag at least).
        """

    @abstractmethod
    def _open(self, key: str, chunk_size: int) -> tuple[int, Iterator[bytes]]:
        """Start reading ``key``: its size and an iterator over its bytes.

        Raise ``StorageNotFound`` now if the key is missing.
        """

    @abstractmethod
    def _stat(self, key: str) -> StoredObject | None:
        """The object under ``key`` or None."""

    @abstractmethod
    def _delete(self, key: str) -> None:
        """Remove ``key`` and its parts; no error if missing."""

    @abstractmethod
    def _list(self, prefix: str) -> Iterator[StoredObject]:
        """Complete objects under ``prefix``, in ascending key order, without metadata."""

    @staticmethod
    def _exactly(key: str, size: int, body: Iterator[bytes]) -> Iterator[bytes]:
        received = 0
        try:
            for chunk in body:
                received += len(chunk)
                if received > size:
                    raise StorageIntegrityError(
                        f"Reading {key!r} returned more than its {size} bytes; the object is "
                        "damaged."
                    )
                yield chunk
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()
        if received != size:
            raise StorageUnavailable(
                f"Reading {key!r} ended after {received} of {size} bytes; the transfer was "
                "cut short, try again."
            )


# --- registry ----------------------------------------------------------------------------------

#: Short name -> "module:Class" of the built-in drivers (imported only when chosen, so boto3 and
#: python-swiftclient are needed only by the deployments that use them).
DRIVERS: dict[str, str] = {
    "file": "coffer.storage.file:FileStorage",
    "s3": "coffer.storage.s3:S3Storage",
    "swift": "coffer.storage.swift:SwiftStorage",
}

#: Third-party drivers register under this entry point group.
ENTRY_POINT_GROUP = "coffer.storage"


def available_drivers() -> dict[str, str]:
    """Short name -> "module:Class" of every built-in and installed storage driver."""
    found = dict(DRIVERS)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(entry.name, entry.value)
    return found


def driver_class(name: str) -> type[BackupStorage]:
    """The driver class registered as ``name``; ``StorageConfigError`` with did-you-mean."""
    drivers = available_drivers()
    target = drivers.get(name)
    if target is None:
        close = difflib.get_close_matches(str(name), list(drivers), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise StorageConfigError(
            [
                f"[storage] driver: unknown backup storage driver {name!r}{hint}; "
                f"known drivers: {', '.join(sorted(drivers))}"
            ]
        )
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise StorageConfigError(
            [
                f"[storage] driver: the {name!r} driver cannot be loaded ({exc}); install "
                f"its library, e.g. pip install 'coffer[{name}]'"
            ]
        ) from exc
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, BackupStorage)):
        raise StorageConfigError([f"[storage] driver: {target} is not a backup storage driver"])
    return cls


def get_storage(
    name: str, settings_section: StorageSection, *, state_dir: Path | None = None
) -> BackupStorage:
    """Build the storage driver called ``name`` from the ``[storage]`` section.

    ``state_dir`` gives the file driver its default directory (``<state_dir>/backups``).
    Raises ``StorageConfigError`` for an unknown name (naming the closest known one), a
    missing library or unusable options. Builds no connection: the first request does.
    """
    return driver_class(name).from_settings(settings_section, state_dir)


def storage_from_settings(settings: Settings) -> BackupStorage:
    """The driver ``[storage] driver`` names, built from a whole settings object."""
    return get_storage(settings.storage.driver, settings.storage, state_dir=settings.state_dir)
