"""The ``file`` backup storage driver: one directory on a local or mounted file system.

Each object is one file directly in the directory, named by its key with ``/`` written as
``%2F`` (percent-encoding; keys use no other character that needs it). A flat directory means
no path is ever built from a key's parts, so no key can escape the directory, and a key may be
both an object and the prefix of others (``a/b`` and ``a/b/c``), as in S3 and Swift.

A file holds the object's bytes followed by a trailer: the metadata, size and SHA-256 as JSON,
the JSON's length (8 bytes, big-endian) and the magic ``COFFER\\x00\\x01``. Keeping them in one
file lets a single ``rename`` publish data and metadata together. An upload is written to a
hidden temporary file (``.<name>.<random>.tmp``) in the same directory, fsynced, renamed over
the final name and the directory fsynced, so a crash leaves either the old object or the new
one. Hidden files are never listed; a killed upload's temporary file is left behind and is
safe to delete.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import secrets
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import quote, unquote

from coffer.storage.base import (
    BackupStorage,
    ChunkSource,
    InvalidStorageKey,
    StorageAccessDenied,
    StorageConfigError,
    StorageError,
    StorageIntegrityError,
    StorageNotFound,
    StoredObject,
    validate_key,
)

if TYPE_CHECKING:
    from typing import Self

    from coffer.config import StorageSection

MAGIC = b"COFFER\x00\x01"
_FOOTER = struct.Struct(">Q8s")
#: A trailer larger than this is damage, not metadata (metadata is capped at 2 KB).
_MAX_TRAILER = 64 * 1024
_WRITE_BUFFER = 1 << 20
_MAX_NAME = 230  # keeps ".<name>.<16 hex>.tmp" within the 255-byte file name limit


def _os_error(action: str, key: str, exc: OSError) -> StorageError:
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorageAccessDenied(
            f"Cannot {action} {key!r}: {exc.strerror}; check the permissions of the backup "
            "directory ([storage] file_directory)."
        )
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageError(f"Cannot {action} {key!r}: the backup directory is full.")
    return StorageError(f"Cannot {action} {key!r}: {exc.strerror or exc}.")


class FileStorage(BackupStorage):
    """Backups as files in one directory (created on the first upload)."""

    name = "file"

    def __init__(self, directory: Path, *, fsync: bool = True) -> None:
        if not directory.is_absolute():
            raise StorageConfigError(
                [f"[storage] file_directory: {directory} must be an absolute path"]
            )
        self.directory = directory
        self.fsync = fsync

    @classmethod
    def from_settings(cls, section: StorageSection, state_dir: Path | None = None) -> Self:
        directory = section.file_directory
        if directory is None:
            if state_dir is None:
                raise StorageConfigError(
                    ["[storage] file_directory: not set and no state_dir to default it from"]
                )
            directory = state_dir / "backups"
        return cls(directory)

    def __repr__(self) -> str:
        return f"FileStorage(directory={str(self.directory)!r})"

    # -- names ---------------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        name = quote(key, safe="")
        if len(name) > _MAX_NAME:
            raise InvalidStorageKey(
                f"The backup storage key {key!r} is too long for a file name once its '/' "
                "are encoded; use a shorter key or fewer '/'."
            )
        return self.directory / name

    @staticmethod
    def _key_of(name: str) -> str | None:
        """The key a file name stands for, or None for temporary and foreign files."""
        if name.startswith("."):
            return None
        key = unquote(name)
        try:
            validate_key(key)
        except InvalidStorageKey:
            return None
        return key if quote(key, safe="") == name else None

    # -- hooks ---------------------------------------------------------------------------------

    def _put(self, key: str, source: ChunkSource, metadata: dict[str, str]) -> StoredObject:
        final = self._path(key)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _os_error("create the backup directory for", key, exc) from exc
        temporary = self.directory / f".{final.name}.{secrets.token_hex(8)}.tmp"
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            raise _os_error("store", key, exc) from exc
        try:
            with open(fd, "wb", buffering=_WRITE_BUFFER) as out:
                try:
                    for chunk in source:
                        out.write(chunk)
                    trailer = json.dumps(
                        {"size": source.size, "sha256": source.sha256, "metadata": metadata},
                        sort_keys=True,
                    ).encode()
                    out.write(trailer)
                    out.write(_FOOTER.pack(len(trailer), MAGIC))
                    out.flush()
                    if self.fsync:
                        os.fsync(out.fileno())
                except OSError as exc:
                    if source.failure is exc:
                        raise
                    raise _os_error("store", key, exc) from exc
            try:
                os.replace(temporary, final)
            except OSError as exc:
                raise _os_error("store", key, exc) from exc
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        self._sync_directory(key)
        return StoredObject(
            key=key, size=source.size, metadata=metadata, etag=source.sha256, sha256=source.sha256
        )

    def _open(self, key: str, chunk_size: int) -> tuple[int, Iterator[bytes]]:
        try:
            handle = open(self._path(key), "rb")  # noqa: SIM115 - closed by the generator
        except FileNotFoundError:
            raise StorageNotFound(f"No backup object {key!r} in {self.directory}.") from None
        except OSError as exc:
            raise _os_error("read", key, exc) from exc
        try:
            trailer = self._read_trailer(key, handle)
        except BaseException:
            handle.close()
            raise
        size: int = trailer["size"]
        return size, self._read_body(key, handle, size, chunk_size)

    def _read_body(self, key: str, handle: BinaryIO, size: int, chunk_size: int) -> Iterator[bytes]:
        # The open handle keeps reading the same file even if the key is replaced or deleted
        # meanwhile (POSIX keeps an unlinked file alive while it is open).
        with handle:
            handle.seek(0)
            left = size
            while left > 0:
                try:
                    chunk = handle.read(min(chunk_size, left))
                except OSError as exc:
                    raise _os_error("read", key, exc) from exc
                if not chunk:
                    break
                left -= len(chunk)
                yield chunk

    def _stat(self, key: str) -> StoredObject | None:
        try:
            with open(self._path(key), "rb") as handle:
                trailer = self._read_trailer(key, handle)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _os_error("read", key, exc) from exc
        return StoredObject(
            key=key,
            size=trailer["size"],
            metadata=dict(trailer["metadata"]),
            etag=trailer["sha256"],
            sha256=trailer["sha256"],
        )

    def _delete(self, key: str) -> None:
        final = self._path(key)
        # Partial uploads of the key (a writer killed before its rename) go with it.
        for partial in self.directory.glob(f".{glob.escape(final.name)}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
        try:
            os.unlink(final)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise _os_error("delete", key, exc) from exc
        self._sync_directory(key)

    def _list(self, prefix: str) -> Iterator[StoredObject]:
        try:
            names = [entry.name for entry in os.scandir(self.directory)]
        except FileNotFoundError:
            return
        except OSError as exc:
            raise _os_error("list", prefix or "the backups", exc) from exc
        keys = sorted(
            key for key in map(self._key_of, names) if key is not None and key.startswith(prefix)
        )
        for key in keys:
            found = self._stat(key)
            if found is not None:  # deleted since the scan
                yield StoredObject(
                    key=found.key, size=found.size, etag=found.etag, sha256=found.sha256
                )

    # -- helpers -------------------------------------------------------------------------------

    @staticmethod
    def _read_trailer(key: str, handle: BinaryIO) -> dict[str, Any]:
        damaged = StorageIntegrityError(
            f"The backup object {key!r} is damaged (its trailer is missing or unreadable)."
        )
        end = handle.seek(0, os.SEEK_END)
        if end < _FOOTER.size:
            raise damaged
        handle.seek(end - _FOOTER.size)
        length, magic = _FOOTER.unpack(handle.read(_FOOTER.size))
        if magic != MAGIC or length > min(_MAX_TRAILER, end - _FOOTER.size):
            raise damaged
        handle.seek(end - _FOOTER.size - length)
        try:
            trailer = json.loads(handle.read(length))
        except ValueError:
            raise damaged from None
        if (
            not isinstance(trailer, dict)
            or trailer.get("size") != end - _FOOTER.size - length
            or not isinstance(trailer.get("sha256"), str)
            or not isinstance(trailer.get("metadata"), dict)
        ):
            raise damaged
        return trailer

    def _sync_directory(self, key: str) -> None:
        # The rename or unlink is durable only once the directory entry is on disk.
        if not self.fsync:
            return
        try:
            fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise _os_error("sync the backup directory for", key, exc) from exc
