"""Backups as streams: engine bytes → zstd → AES-256-GCM chunks → SHA-256 → storage, and back.

The public API is re-exported here; ``coffer.backup.stream`` holds the pipeline,
``coffer.backup.format`` the stored format, ``coffer.backup.progress`` the progress meter.
"""

from coffer.backup.errors import BackupIntegrityError
from coffer.backup.progress import ProgressMeter, ProgressSnapshot
from coffer.backup.stream import (
    SealedStreamInfo,
    authenticate_stream,
    open_stream,
    seal_stream,
    verify_stream,
)

__all__ = [
    "BackupIntegrityError",
    "ProgressMeter",
    "ProgressSnapshot",
    "SealedStreamInfo",
    "authenticate_stream",
    "open_stream",
    "seal_stream",
    "verify_stream",
]
