"""The ``swift`` backup storage driver: OpenStack Swift's native API, through python-swiftclient.

This is where Trove keeps backups by default (container ``database_backups``). Authentication is
Keystone v3 (``swift_auth_version = 3``, the usual deployment) or Swift's own v1 auth (tempauth,
``swift_auth_version = 1``).

Every non-empty object is a Static Large Object: the stream is cut into segments of
``swift_segment_size`` bytes, each uploaded with chunked transfer encoding straight from the
stream (nothing is buffered beyond the chunk in hand, nothing touches local disk) into the
``<container>_segments`` container, the same layout the ``swift`` CLI uses. Each segment's MD5
is computed on the way and checked against the ETag Swift returns. Only when every segment is
stored does the driver PUT the manifest under the key, listing each segment with its size and
ETag, which Swift verifies; until then nothing exists under the key. A failed upload deletes
the segments it stored. An empty object is a plain empty object.

A streamed segment cannot be re-sent, so a connection that breaks mid-segment fails the upload
(``StorageUnavailable``); the caller retries the whole backup.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coffer.storage.base import (
    BackupStorage,
    ChunkSource,
    InvalidStorageKey,
    StorageAccessDenied,
    StorageConfigError,
    StorageError,
    StorageIntegrityError,
    StorageNotFound,
    StorageUnavailable,
    StoredObject,
    validate_key,
)

if TYPE_CHECKING:
    from typing import Self

    from coffer.config import StorageSection

LOG = logging.getLogger(__name__)

MIB = 1 << 20
#: Swift refuses single objects above 5 GiB; a segment must stay below.
MAX_SEGMENT_SIZE = 5 * 1024 * MIB
MIN_SEGMENT_SIZE = 1 * MIB
_META_PREFIX = "x-object-meta-"
_TRANSIENT_STATUS = {408, 429, 498, 499}
_LISTING_PAGE = 1000


def _unquote(etag: object) -> str | None:
    return etag.strip('"') if isinstance(etag, str) else None


class SwiftStorage(BackupStorage):
    """Backups as Static Large Objects in one Swift container (created on the first upload)."""

    name = "swift"

    def __init__(
        self,
        auth_url: str,
        user: str,
        key: str,
        *,
        auth_version: str = "3",
        project_name: str | None = None,
        user_domain_name: str = "Default",
        project_domain_name: str = "Default",
        region_name: str | None = None,
        interface: str = "public",
        container: str = "database_backups",
        segment_size: int = 1024 * MIB,
        insecure: bool = False,
        cacert: str | None = None,
        retries: int = 5,
        timeout: float = 120.0,
    ) -> None:
        problems = []
        if not auth_url:
            problems.append("[storage] swift_auth_url: set the Keystone or Swift auth URL")
        if not user or not key:
            problems.append("[storage] swift_user and swift_key: set both")
        if auth_version not in ("1", "3"):
            problems.append(f"[storage] swift_auth_version: {auth_version!r} is not 1 or 3")
        if auth_version == "3" and not project_name:
            problems.append("[storage] swift_project_name: Keystone v3 auth needs a project")
        if not container or "/" in container:
            problems.append(f"[storage] swift_container: {container!r} is not a container name")
        if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
            problems.append(
                f"[storage] swift_segment_size: {segment_size} is outside {MIN_SEGMENT_SIZE} to "
                f"{MAX_SEGMENT_SIZE} bytes"
            )
        if problems:
            raise StorageConfigError(problems)
        self.auth_url = auth_url
        self.user = user
        self.auth_version = auth_version
        self.project_name = project_name
        self.user_domain_name = user_domain_name
        self.project_domain_name = project_domain_name
        self.region_name = region_name
        self.interface = interface
        self.container = container
        self.segment_container = f"{container}_segments"
        self.segment_size = segment_size
        self.insecure = insecure
        self.cacert = cacert
        self.retries = retries
        self.timeout = timeout
        self._key = key
        self._connection: Any = None

    @classmethod
    def from_settings(cls, section: StorageSection, state_dir: Path | None = None) -> Self:
        key = section.swift_key
        return cls(
            section.swift_auth_url or "",
            section.swift_user or "",
            key.get_secret_value() if key is not None else "",
            auth_version=section.swift_auth_version,
            project_name=section.swift_project_name,
            user_domain_name=section.swift_user_domain_name,
            project_domain_name=section.swift_project_domain_name,
            region_name=section.swift_region_name,
            interface=section.swift_interface,
            container=section.swift_container,
            segment_size=section.swift_segment_size,
            insecure=section.swift_insecure,
            cacert=str(section.swift_cacert) if section.swift_cacert else None,
            retries=section.swift_retries,
        )

    def __repr__(self) -> str:
        return (
            f"SwiftStorage(auth_url={self.auth_url!r}, user={self.user!r}, "
            f"container={self.container!r})"
        )

    # -- swiftclient ---------------------------------------------------------------------------

    @property
    def connection(self) -> Any:
        """The swiftclient connection, made on first use; it authenticates lazily itself."""
        if self._connection is None:
            from swiftclient.client import Connection

            os_options: dict[str, str] = {
                "service_type": "object-store",
                "endpoint_type": f"{self.interface}URL",
            }
            if self.auth_version == "3":
                os_options |= {
                    "project_name": self.project_name or "",
                    "user_domain_name": self.user_domain_name,
                    "project_domain_name": self.project_domain_name,
                }
            if self.region_name:
                os_options["region_name"] = self.region_name
            self._connection = Connection(
                authurl=self.auth_url,
                user=self.user,
                key=self._key,
                auth_version=self.auth_version,
                os_options=os_options,
                retries=self.retries,
                insecure=self.insecure,
                cacert=self.cacert,
                timeout=self.timeout,
            )
        return self._connection

    @staticmethod
    def _library_errors() -> tuple[type[Exception], ...]:
        from requests.exceptions import RequestException
        from swiftclient.exceptions import ClientException

        errors: tuple[type[Exception], ...] = (ClientException, RequestException, OSError)
        with contextlib.suppress(ImportError):
            from keystoneauth1.exceptions import ClientException as KeystoneError

            errors += (KeystoneError,)
        return errors

    def _error(self, exc: Exception, action: str, key: str) -> StorageError:
        """Coffer's error for a swiftclient (or keystoneauth, requests) failure."""
        from swiftclient.exceptions import ClientException

        where = f"Swift container {self.container!r}"
        if isinstance(exc, ClientException):
            status = exc.http_status
            reason = exc.http_reason or exc.msg
            if status == 404:
                return StorageNotFound(f"No backup object {key!r} in {where}.")
            denied = str(exc.msg).startswith(("Unauthorized", "Authorization Failure"))
            if status in (401, 403) or (status is None and denied):
                return StorageAccessDenied(
                    f"Swift refused to {action} {key!r} in {where} ({status or reason}); check "
                    "[storage] swift_user, swift_key, swift_project_name and the auth URL."
                )
            if status is None or status >= 500 or status in _TRANSIENT_STATUS:
                return StorageUnavailable(
                    f"Swift failed to {action} {key!r} in {where} ({status or reason}); try again."
                )
            return StorageError(
                f"Swift refused to {action} {key!r} in {where} ({status} {reason})."
            )
        name = type(exc).__name__
        if "Unauthorized" in name or "Forbidden" in name:
            return StorageAccessDenied(
                f"Keystone refused Coffer's Swift credentials ({name}); check [storage] "
                "swift_user, swift_key and swift_project_name."
            )
        return StorageUnavailable(
            f"Could not reach Swift at {self.auth_url} to {action} {key!r} ({name}); try again."
        )

    def _call(self, action: str, key: str, request: Callable[[], Any]) -> Any:
        try:
            return request()
        except self._library_errors() as exc:
            raise self._error(exc, action, key) from exc

    def _ensure_containers(self, key: str) -> None:
        # On every upload, not once: a container deleted meanwhile would otherwise turn every
        # later upload into a 404. Two idempotent PUTs are nothing next to a backup.
        try:
            for container in (self.container, self.segment_container):
                self.connection.put_container(container)
        except self._library_errors() as exc:
            raise self._error(exc, "create the container for", key) from exc

    # -- hooks ---------------------------------------------------------------------------------

    def _put(self, key: str, source: ChunkSource, metadata: dict[str, str]) -> StoredObject:
        self._ensure_containers(key)
        headers = {f"X-Object-Meta-{name}": value for name, value in metadata.items()}
        previous = self._segments_of(key)  # freed once the new object has replaced the old
        if source.at_end():
            etag = self._call(
                "store",
                key,
                lambda: self.connection.put_object(
                    self.container, key, b"", content_length=0, headers=headers
                ),
            )
            self._delete_segments(key, previous)
            return StoredObject(key=key, size=0, metadata=metadata, etag=_unquote(etag))

        upload = f"{time.time():.6f}-{secrets.token_hex(6)}"
        stored: list[str] = []
        manifest: list[dict[str, Any]] = []
        try:
            while not source.at_end():
                name = f"{key}/{upload}/{len(manifest):08d}"
                stored.append(name)  # before the PUT: a PUT that fails late may still land
                manifest.append(self._put_segment(key, name, source))
            etag = self._call(
                "store",
                key,
                lambda: self.connection.put_object(
                    self.container,
                    key,
                    json.dumps(manifest),
                    headers=headers,
                    query_string="multipart-manifest=put",
                ),
            )
        except BaseException:
            self._delete_segments(key, stored)
            raise
        self._delete_segments(key, previous)
        return StoredObject(
            key=key,
            size=sum(segment["size_bytes"] for segment in manifest),
            metadata=metadata,
            etag=_unquote(etag),
        )

    def _put_segment(self, key: str, name: str, source: ChunkSource) -> dict[str, Any]:
        digest = hashlib.md5(usedforsecurity=False)
        size = 0

        def body() -> Iterator[bytes]:
            nonlocal size
            for piece in source.take(self.segment_size):
                digest.update(piece)
                size += len(piece)
                yield piece

        etag = self._call(
            "store",
            key,
            lambda: self.connection.put_object(self.segment_container, name, body()),
        )
        if _unquote(etag) != digest.hexdigest():
            raise StorageIntegrityError(
                f"Swift stored a segment of {key!r} with ETag {etag!r} but "
                f"{digest.hexdigest()!r} was sent; the upload was abandoned."
            )
        return {
            "path": f"/{self.segment_container}/{name}",
            "etag": digest.hexdigest(),
            "size_bytes": size,
        }

    def _segments_of(self, key: str) -> list[str]:
        """Names, in the segment container, of the segments of the object under ``key``."""
        head = self._head(key)
        if head is None or str(head.get("x-static-large-object", "")).lower() != "true":
            return []
        _, body = self._call(
            "read the manifest of",
            key,
            lambda: self.connection.get_object(
                self.container, key, query_string="multipart-manifest=get"
            ),
        )
        prefix = f"/{self.segment_container}/"
        names = []
        for segment in json.loads(body):
            path = str(segment.get("name", ""))
            # Only ever delete our own segments, whatever a manifest says.
            if path.startswith(prefix):
                names.append(path[len(prefix) :])
        return names

    def _delete_segments(self, key: str, names: list[str]) -> None:
        leaked = []
        for name in names:
            try:
                self.connection.delete_object(self.segment_container, name)
            except self._library_errors() as exc:
                if getattr(exc, "http_status", None) != 404:
                    leaked.append(name)
        if leaked:
            LOG.warning(
                "could not delete %d segment(s) of %s from Swift container %s; they use space "
                "but are not part of any backup (first: %s)",
                len(leaked),
                key,
                self.segment_container,
                leaked[0],
            )

    def _head(self, key: str) -> dict[str, str] | None:
        try:
            headers: dict[str, str] = self.connection.head_object(self.container, key)
        except self._library_errors() as exc:
            error = self._error(exc, "inspect", key)
            if isinstance(error, StorageNotFound):
                return None
            raise error from exc
        return headers

    def _open(self, key: str, chunk_size: int) -> tuple[int, Iterator[bytes]]:
        headers, body = self._call(
            "read",
            key,
            lambda: self.connection.get_object(self.container, key, resp_chunk_size=chunk_size),
        )
        return int(headers["content-length"]), self._body(key, body)

    def _body(self, key: str, body: Any) -> Iterator[bytes]:
        try:
            yield from body
        except self._library_errors() as exc:
            raise self._error(exc, "read", key) from exc
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()

    def _stat(self, key: str) -> StoredObject | None:
        headers = self._head(key)
        if headers is None:
            return None
        metadata = {
            name[len(_META_PREFIX) :].lower(): value
            for name, value in headers.items()
            if name.lower().startswith(_META_PREFIX)
        }
        return StoredObject(
            key=key,
            size=int(headers["content-length"]),
            metadata=metadata,
            etag=_unquote(headers.get("etag")),
        )

    def _delete(self, key: str) -> None:
        segments = self._segments_of(key)
        try:
            # The manifest first: the object disappears at once, then its parts.
            self.connection.delete_object(self.container, key)
        except self._library_errors() as exc:
            error = self._error(exc, "delete", key)
            if not isinstance(error, StorageNotFound):
                raise error from exc
        self._delete_segments(key, segments)

    def _list(self, prefix: str) -> Iterator[StoredObject]:
        marker = ""
        while True:
            try:
                _, page = self.connection.get_container(
                    self.container, prefix=prefix, marker=marker, limit=_LISTING_PAGE
                )
            except self._library_errors() as exc:
                error = self._error(exc, "list", prefix or "the backups")
                if isinstance(error, StorageNotFound):
                    return  # no container yet: nothing was ever stored
                raise error from exc
            if not page:
                return
            for item in page:
                marker = item["name"]
                try:
                    key = validate_key(item["name"])
                except InvalidStorageKey:
                    continue  # not written by Coffer
                yield StoredObject(
                    key=key,
                    size=int(item["bytes"]),
                    etag=_unquote(item.get("slo_etag") or item.get("hash")),
                )

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
