"""Errors of the backup stream: what a restore or a verification reports when a backup is bad."""

from __future__ import annotations

from coffer.errors import Conflict


class BackupIntegrityError(Conflict):
    """A stored backup failed verification: it was tampered with, corrupted, cut short, or it is
    being opened with the wrong master key, backup id or checksum.

    Not transient: reading the same bytes again gives the same answer. The message names the
    backup and what failed, never a key.
    """

    transient = False

    def __init__(self, backup_id: str, detail: str) -> None:
        self.backup_id = backup_id
        self.detail = detail
        super().__init__(
            f"backup {backup_id} is tampered or corrupted: {detail}; "
            "it cannot be restored, restore from another backup"
        )
