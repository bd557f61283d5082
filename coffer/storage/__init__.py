"""Backup storage: one contract (``base.BackupStorage``) and drivers by short name.

``file`` (a directory, the default), ``s3`` (any S3-compatible store, boto3) and ``swift``
(OpenStack Swift's native API, python-swiftclient). Build one with ``get_storage`` or
``storage_from_settings``; drivers are imported only when chosen.
"""

from coffer.storage.base import (
    BackupStorage,
    InvalidStorageKey,
    StorageAccessDenied,
    StorageConfigError,
    StorageError,
    StorageIntegrityError,
    StorageNotFound,
    StorageUnavailable,
    StoredObject,
    available_drivers,
    get_storage,
    storage_from_settings,
    validate_key,
    validate_metadata,
)

__all__ = [
    "BackupStorage",
    "InvalidStorageKey",
    "StorageAccessDenied",
    "StorageConfigError",
    "StorageError",
    "StorageIntegrityError",
    "StorageNotFound",
    "StorageUnavailable",
    "StoredObject",
    "available_drivers",
    "get_storage",
    "storage_from_settings",
    "validate_key",
    "validate_metadata",
]
