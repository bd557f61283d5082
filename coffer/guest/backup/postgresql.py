"""PostgreSQL backups: ``pg_basebackup -D - -Ft -X fetch``, full only for now.

The base backup is one tar stream on stdout (a server with tablespaces besides the default ones
cannot stream that way; Coffer creates none). ``-X fetch`` puts the write-ahead log needed to make
the copy consistent into the same tar, so the stream alone restores. It connects as the agent's
admin account over the unix socket (``pg_hba.conf`` allows it replication connections there and
nowhere else), with the password in the environment, never on the command line.

The stream's first member is ``backup_label``; its START WAL LOCATION, CHECKPOINT LOCATION and
timeline are read as the stream passes and recorded as the backup's ``engine_position``.

Restore untars into a staging directory, drops configuration files Coffer keeps in ``etc/``, and
moves the tree into the empty data directory, ``PG_VERSION`` last. At the first start the server
replays the included WAL (``backup_label``) and ``os_admin`` gets this instance's own password.

Later (issue 5 item 5): WAL archiving to the backup store, so that incremental and point-in-time
restores replay archived WAL on top of a base backup; ``engine_position`` already records where
each base backup starts.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

from coffer.errors import EngineError
from coffer.guest.backup.base import BackupSource, EngineBackup, Payload, find_tool

_TAR_BLOCK = 512
#: Files a base backup may carry that Coffer's instances keep elsewhere or must not start with.
_DROP_ON_RESTORE = (
    "postgresql.conf",
    "pg_hba.conf",
    "pg_ident.conf",
    "standby.signal",
    "recovery.signal",
)
_LABEL_KEYS = {
    "START WAL LOCATION": "start_wal_location",
    "CHECKPOINT LOCATION": "checkpoint_location",
    "START TIMELINE": "timeline",
    "START TIME": "start_time",
}


def _bin(name: str) -> str:
    # Imported here: the datastore module composes this one.
    from coffer.guest.datastores.postgresql import bin_dir

    directory = bin_dir()
    if directory is not None and (directory / name).is_file():
        return str(directory / name)
    return find_tool(name)


def parse_backup_label(text: str) -> dict[str, Any]:
    """The recorded position from a ``backup_label`` (``KEY: value`` lines)."""
    position: dict[str, Any] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(": ")
        name = _LABEL_KEYS.get(key.strip())
        if not sep or name is None:
            continue
        value = value.strip()
        if name == "start_wal_location":
            lsn, _, rest = value.partition(" ")
            position[name] = lsn
            if rest.startswith("(file ") and rest.endswith(")"):
                position["start_wal_file"] = rest[len("(file ") : -1]
        else:
            position[name] = value
    return position


class _LabelTap:
    """Watches the first tar member of a base backup go by and keeps it if it is backup_label."""

    def __init__(self) -> None:
        self._head = bytearray()
        self.done = False
        self.label = ""

    def feed(self, piece: bytes) -> None:
        if self.done:
            return
        self._head += piece
        if len(self._head) < _TAR_BLOCK:
            return
        header = bytes(self._head[:_TAR_BLOCK])
        name = header[:100].split(b"\0", 1)[0].decode(errors="replace")
        try:
            size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            self.done = True
            return
        if name != "backup_label":
            self.done = True
            return
        if len(self._head) >= _TAR_BLOCK + size:
            self.label = bytes(self._head[_TAR_BLOCK : _TAR_BLOCK + size]).decode(errors="replace")
            self.done = True
            self._head.clear()


class PostgreSQLBackup(EngineBackup):
    """See the module docstring; ``access.socket`` is the server's unix socket."""

    manager: ClassVar[str] = "postgresql"

    def backup(self, backup_id: str, parent: Mapping[str, Any] | None = None) -> BackupSource:
        if parent is not None:
            raise EngineError(
                "PostgreSQL backups are full base backups; incremental backups need WAL "
                "archiving, which is not available yet."
            )
        tap = _LabelTap()

        def chunks() -> Iterator[bytes]:
            argv = [
                _bin("pg_basebackup"),
                f"--host={self.access.socket.parent}",
                f"--port={self.access.port}",
                "--username=os_admin",
                "--pgdata=-",
                "--format=tar",
                "--wal-method=fetch",
                "--checkpoint=fast",
                "--no-password",
                f"--label=coffer backup {backup_id}",
            ]
            env = {"PGPASSWORD": self.access.password(), "PGAPPNAME": "coffer-backup"}
            for piece in self.tool_output(
                argv, "pg_basebackup", self._log("pg_basebackup.log"), env
            ):
                tap.feed(piece)
                yield piece

        def position() -> dict[str, Any]:
            return parse_backup_label(tap.label)

        return BackupSource(chunks(), position)

    def restore(self, payloads: Sequence[Payload]) -> None:
        self._check_chain(payloads)
        tar = find_tool("tar")
        staging = self._staging()
        try:
            self.tool_input(
                [tar, "--extract", "--file=-", f"--directory={staging}", "--no-same-owner"],
                payloads[0](),
                "tar",
                self._log("restore-tar.log"),
            )
            if not (staging / "backup_label").is_file():
                raise EngineError(
                    "The backup holds no backup_label; it is not a PostgreSQL base backup."
                )
            for name in _DROP_ON_RESTORE:
                (staging / name).unlink(missing_ok=True)
            self._install(staging, last="PG_VERSION")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
