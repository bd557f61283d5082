"""The ``s3`` backup storage driver: any S3-compatible object store, through boto3.

Uploads go through boto3's managed transfer (``upload_fileobj``) reading straight from the
backup stream: below ``s3_multipart_threshold`` one PUT, above it a multipart upload in parts of
``s3_multipart_chunksize`` with ``s3_max_concurrency`` parts in flight. At most about
``s3_max_concurrency + 2`` parts are held in memory and nothing is written to local disk. A
multipart object becomes visible only when the upload is completed; a failed upload is aborted,
which removes its parts (boto3 registers the abort as the transfer's failure cleanup).

boto3 1.36 and later add CRC checksums to every upload in a chunked encoding many
S3-compatible stores do not understand; the driver asks for checksums only where S3 requires
them, and relies on Content-MD5/ETags and Coffer's own SHA-256 instead.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coffer.storage.base import (
    BackupStorage,
    ChunkSource,
    InvalidStorageKey,
    StorageAccessDenied,
    StorageConfigError,
    StorageError,
    StorageNotFound,
    StorageUnavailable,
    StoredObject,
    validate_key,
)

if TYPE_CHECKING:
    from typing import Self

    from coffer.config import StorageSection

MIB = 1 << 20
#: S3's own bounds on a part (except the last) and on the number of parts.
MIN_PART_SIZE = 5 * MIB
MAX_PART_SIZE = 5 * 1024 * MIB

_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_DENIED = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "AccountProblem",
}
_TRANSIENT = {"SlowDown", "RequestTimeout", "Throttling", "ThrottlingException", "InternalError"}


def _etag(value: object) -> str | None:
    return value.strip('"') if isinstance(value, str) else None


class S3Storage(BackupStorage):
    """Backups as objects in one bucket of an S3-compatible store (the bucket must exist)."""

    name = "s3"

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        region_name: str = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        addressing_style: str = "path",
        verify: bool | str = True,
        multipart_threshold: int = 64 * MIB,
        multipart_chunksize: int = 16 * MIB,
        max_concurrency: int = 4,
        max_attempts: int = 5,
    ) -> None:
        problems = []
        if not bucket:
            problems.append("[storage] s3_bucket: set the bucket backups are stored in")
        if (access_key_id is None) != (secret_access_key is None):
            problems.append(
                "[storage] s3_access_key_id and s3_secret_access_key: set both or neither "
                "(neither: boto3 finds credentials in the environment or ~/.aws)"
            )
        if not MIN_PART_SIZE <= multipart_chunksize <= MAX_PART_SIZE:
            problems.append(
                f"[storage] s3_multipart_chunksize: {multipart_chunksize} is outside S3's "
                f"part size limits ({MIN_PART_SIZE} to {MAX_PART_SIZE} bytes)"
            )
        if multipart_threshold < MIN_PART_SIZE:
            problems.append(f"[storage] s3_multipart_threshold: use at least {MIN_PART_SIZE} bytes")
        if max_concurrency < 1 or max_attempts < 1:
            problems.append("[storage] s3_max_concurrency and s3_max_attempts must be >= 1")
        if problems:
            raise StorageConfigError(problems)
        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.region_name = region_name
        self.addressing_style = addressing_style
        self.verify = verify
        self.multipart_threshold = multipart_threshold
        self.multipart_chunksize = multipart_chunksize
        self.max_concurrency = max_concurrency
        self.max_attempts = max_attempts
        self._access_key_id = access_key_id
        self._secret_access_key = secret_access_key
        self._client: Any = None
        self._client_lock = threading.Lock()

    @classmethod
    def from_settings(cls, section: StorageSection, state_dir: Path | None = None) -> Self:
        secret = section.s3_secret_access_key
        verify: bool | str = section.s3_verify
        if section.s3_verify and section.s3_ca_bundle is not None:
            verify = str(section.s3_ca_bundle)
        return cls(
            section.s3_bucket or "",
            endpoint_url=section.s3_endpoint_url,
            region_name=section.s3_region_name,
            access_key_id=section.s3_access_key_id,
            secret_access_key=secret.get_secret_value() if secret is not None else None,
            addressing_style=section.s3_addressing_style,
            verify=verify,
            multipart_threshold=section.s3_multipart_threshold,
            multipart_chunksize=section.s3_multipart_chunksize,
            max_concurrency=section.s3_max_concurrency,
            max_attempts=section.s3_max_attempts,
        )

    def __repr__(self) -> str:
        where = self.endpoint_url or f"AWS {self.region_name}"
        return f"S3Storage(bucket={self.bucket!r}, endpoint={where!r})"

    # -- boto3 ---------------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The boto3 S3 client, made on first use (thread-safe, shared by transfer threads)."""
        with self._client_lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                config = Config(
                    region_name=self.region_name,
                    signature_version="s3v4",
                    s3={"addressing_style": self.addressing_style},
                    retries={"mode": "standard", "max_attempts": self.max_attempts},
                    max_pool_connections=max(10, self.max_concurrency + 2),
                    connect_timeout=10,
                    read_timeout=120,
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                )
                self._client = boto3.session.Session().client(
                    "s3",
                    endpoint_url=self.endpoint_url,
                    aws_access_key_id=self._access_key_id,
                    aws_secret_access_key=self._secret_access_key,
                    verify=self.verify,
                    config=config,
                )
            return self._client

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=self.multipart_chunksize,
            max_concurrency=self.max_concurrency,
            preferred_transfer_client="classic",
        )
        # Parts read ahead of the uploads: the memory bound promised in the module docstring.
        config.max_in_memory_upload_chunks = self.max_concurrency + 2
        return config

    def _error(self, exc: Exception, action: str, key: str) -> StorageError:
        """Coffer's error for a boto3/botocore failure while doing ``action`` on ``key``."""
        from botocore import exceptions as boto_errors

        cause = exc
        if not isinstance(cause, boto_errors.ClientError | boto_errors.BotoCoreError):
            # boto3 may wrap the client's error (S3UploadFailedError) with it as the cause.
            inner = exc.__cause__ or exc.__context__
            if isinstance(inner, boto_errors.ClientError | boto_errors.BotoCoreError):
                cause = inner
        where = f"S3 bucket {self.bucket!r}"
        if isinstance(cause, boto_errors.ClientError):
            error = cause.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = int(cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            detail = f"{code or status}: {error.get('Message') or 'no message'}"
            if code in _NOT_FOUND:
                return StorageNotFound(f"No backup object {key!r} in {where}.")
            if code == "NoSuchBucket":
                return StorageConfigError(
                    [
                        f"[storage] s3_bucket: the bucket {self.bucket!r} does not exist at "
                        f"{self.endpoint_url or 'AWS'}; create it or fix s3_bucket"
                    ]
                )
            if code in _DENIED or status in (401, 403):
                return StorageAccessDenied(
                    f"The S3 store refused to {action} {key!r} in {where} ({detail}); check "
                    "[storage] s3_access_key_id, s3_secret_access_key and the bucket policy."
                )
            if code in _TRANSIENT or status >= 500 or status == 429:
                return StorageUnavailable(
                    f"The S3 store failed to {action} {key!r} in {where} ({detail}); try again."
                )
            return StorageError(f"The S3 store refused to {action} {key!r} in {where} ({detail}).")
        if isinstance(cause, boto_errors.NoCredentialsError | boto_errors.PartialCredentialsError):
            return StorageAccessDenied(
                "No S3 credentials were found: set [storage] s3_access_key_id and "
                "s3_secret_access_key, or provide them to boto3 in the environment."
            )
        if isinstance(cause, boto_errors.ConnectionError | boto_errors.HTTPClientError):
            return StorageUnavailable(
                f"Could not reach the S3 store at {self.endpoint_url or 'AWS'} to {action} "
                f"{key!r} ({type(cause).__name__}); try again."
            )
        return StorageError(f"S3 failed to {action} {key!r} in {where}: {cause}")

    @staticmethod
    def _library_errors() -> tuple[type[Exception], ...]:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        return (ClientError, BotoCoreError, Boto3Error)

    # -- hooks ---------------------------------------------------------------------------------

    def _put(self, key: str, source: ChunkSource, metadata: dict[str, str]) -> StoredObject:
        try:
            self.client.upload_fileobj(
                source,
                self.bucket,
                key,
                ExtraArgs={"Metadata": metadata} if metadata else None,
                Config=self._transfer_config(),
            )
            head = self.client.head_object(Bucket=self.bucket, Key=key)
        except self._library_errors() as exc:
            raise self._error(exc, "store", key) from exc
        return StoredObject(
            key=key,
            size=int(head["ContentLength"]),
            metadata=dict(head.get("Metadata") or {}),
            etag=_etag(head.get("ETag")),
        )

    def _open(self, key: str, chunk_size: int) -> tuple[int, Iterator[bytes]]:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
        except self._library_errors() as exc:
            raise self._error(exc, "read", key) from exc
        return int(response["ContentLength"]), self._body(key, response["Body"], chunk_size)

    def _body(self, key: str, body: Any, chunk_size: int) -> Iterator[bytes]:
        try:
            yield from body.iter_chunks(chunk_size)
        except self._library_errors() as exc:
            raise self._error(exc, "read", key) from exc
        except OSError as exc:
            raise StorageUnavailable(
                f"Reading {key!r} from S3 bucket {self.bucket!r} failed ({exc}); try again."
            ) from exc
        finally:
            body.close()

    def _stat(self, key: str) -> StoredObject | None:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key)
        except self._library_errors() as exc:
            error = self._error(exc, "inspect", key)
            if isinstance(error, StorageNotFound):
                return None
            raise error from exc
        return StoredObject(
            key=key,
            size=int(head["ContentLength"]),
            metadata=dict(head.get("Metadata") or {}),
            etag=_etag(head.get("ETag")),
        )

    def _delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except self._library_errors() as exc:
            error = self._error(exc, "delete", key)
            if not isinstance(error, StorageNotFound):
                raise error from exc

    def _list(self, prefix: str) -> Iterator[StoredObject]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        )
        try:
            for page in pages:
                for item in page.get("Contents") or ():
                    try:
                        key = validate_key(item["Key"])
                    except InvalidStorageKey:
                        continue  # not written by Coffer
                    yield StoredObject(
                        key=key, size=int(item["Size"]), etag=_etag(item.get("ETag"))
                    )
        except self._library_errors() as exc:
            raise self._error(exc, "list", prefix or "the backups") from exc

    def close(self) -> None:
        with self._client_lock:
            if self._client is not None:
                self._client.close()
                self._client = None
