"""Redis backups: an RDB snapshot, streamed from the file the server just wrote.

A backup asks the server for a fresh snapshot (``BGSAVE SCHEDULE``: Redis forks and writes
``dump.rdb`` through a temporary file and a rename, after any AOF rewrite in progress), waits for
it, opens ``dump.rdb`` and streams that open file: a later snapshot renamed over the name does not
change what is read. ``redis-cli --rdb -`` would avoid the file, but Redis 7.0's redis-cli leaves
the 40-byte end-of-transfer mark of a diskless sync at the end of its stdout, so its output is not
an exact RDB file.

Restore writes the RDB into the empty data directory as ``dump.rdb``. Redis loads an RDB only
when AOF is off (with AOF on and no AOF yet it would start empty and later overwrite the
snapshot), so a marker in ``etc/`` tells the datastore to start once with ``appendonly no``;
``finish_restore`` then turns AOF on, which rewrites the AOF from the loaded data, and removes the
marker once the rewrite has succeeded. Only keys are in an RDB: the instance's ACL users are not
part of a Redis backup.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import redis

from coffer.errors import EngineError
from coffer.guest.backup.base import READ_SIZE, BackupSource, EngineBackup, Payload
from coffer.guest.layout import chown_to

if TYPE_CHECKING:
    from coffer.guest.backup.archive import Archiver, PointInTime

RDB_FILE = "dump.rdb"
RESTORE_MARKER = "rdb-restore.pending"
_RDB_MAGIC = b"REDIS"
_POLL = 0.05
#: How long a snapshot or the AOF rewrite after a restore may take.
SAVE_TIMEOUT = 3600.0


class RedisBackup(EngineBackup):
    """See the module docstring; ``access.socket`` is the server's unix socket."""

    manager: ClassVar[str] = "redis"

    def _client(self) -> redis.Redis:
        return redis.Redis(
            unix_socket_path=str(self.access.socket),
            username="os_admin",
            password=self.access.password(),
            decode_responses=True,
            socket_timeout=30,
            socket_connect_timeout=10,
        )

    def _snapshot(self) -> dict[str, Any]:
        """Have the server write a fresh dump.rdb; its persistence info once written."""
        try:
            with self._client() as client:
                before = int(client.info("persistence")["rdb_saves"])
                client.execute_command("BGSAVE", "SCHEDULE")
                deadline = time.monotonic() + SAVE_TIMEOUT
                while True:
                    info = client.info("persistence")
                    if int(info["rdb_saves"]) > before and not int(info["rdb_bgsave_in_progress"]):
                        break
                    if info.get("rdb_last_bgsave_status") == "err" and not int(
                        info["rdb_bgsave_in_progress"]
                    ):
                        raise EngineError(
                            "Redis could not write its snapshot (rdb_last_bgsave_status is err); "
                            "see the instance's redis.log."
                        )
                    if time.monotonic() > deadline:
                        raise EngineError("Redis did not finish its snapshot within an hour.")
                    time.sleep(_POLL)
                if info.get("rdb_last_bgsave_status") != "ok":
                    raise EngineError(
                        "Redis could not write its snapshot; see the instance's redis.log."
                    )
                return dict(info)
        except redis.RedisError as exc:
            raise EngineError(f"Redis refused the snapshot: {type(exc).__name__}.") from None

    def backup(
        self,
        backup_id: str,
        parent: Mapping[str, Any] | None = None,
        archive: Archiver | None = None,
    ) -> BackupSource:
        if parent is not None:
            raise EngineError("Redis backups are RDB snapshots; there are no incremental ones.")
        position: dict[str, Any] = {}

        def chunks() -> Iterator[bytes]:
            info = self._snapshot()
            position["rdb_last_save_time"] = int(info.get("rdb_last_save_time", 0))
            try:
                handle = open(self.layout.data_dir / RDB_FILE, "rb")  # noqa: SIM115
            except OSError as exc:
                raise EngineError(f"Cannot read the Redis snapshot: {exc.strerror}.") from None
            with handle:
                first = True
                while True:
                    piece = handle.read(READ_SIZE)
                    if not piece:
                        break
                    if first and not piece.startswith(_RDB_MAGIC):
                        raise EngineError("The Redis snapshot file is not an RDB file.")
                    first = False
                    yield piece
                if first:
                    raise EngineError("The Redis snapshot file is empty.")

        return BackupSource(chunks(), lambda: dict(position))

    @property
    def marker(self) -> Path:
        return self.layout.etc_dir / RESTORE_MARKER

    def restore(self, payloads: Sequence[Payload], pitr: PointInTime | None = None) -> None:
        self._check_chain(payloads, pitr)
        staging = self._staging()
        target = staging / RDB_FILE
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as out:
                first = True
                for piece in payloads[0]():
                    if first and not bytes(piece[: len(_RDB_MAGIC)]) == _RDB_MAGIC:
                        raise EngineError("The backup is not a Redis RDB snapshot.")
                    first = False
                    out.write(piece)
                out.flush()
                os.fsync(out.fileno())
            chown_to(target, self.access.owner)
            # The marker goes first: dump.rdb in data/ without it would be ignored at start.
            self.marker.write_text("restored from a backup; AOF is rebuilt at the next start\n")
            chown_to(self.marker, self.access.owner)
            target.replace(self.layout.data_dir / RDB_FILE)
        finally:
            target.unlink(missing_ok=True)
            staging.rmdir()

    def restore_pending(self) -> bool:
        return self.marker.exists()

    def finish_restore(self, client: redis.Redis) -> None:
        """Turn AOF on in the server that loaded the restored RDB; wait for the AOF rewrite.

        ``client`` is an admin connection. Raises EngineError if the rewrite fails; the marker
        stays then, so the next start loads the RDB and tries again.
        """
        client.config_set("appendonly", "yes")
        deadline = time.monotonic() + SAVE_TIMEOUT
        while True:
            info = client.info("persistence")
            busy = int(info["aof_rewrite_in_progress"]) or int(info["aof_rewrite_scheduled"])
            if int(info["aof_enabled"]) and not busy:
                break
            if time.monotonic() > deadline:
                raise EngineError("Redis did not finish rebuilding its AOF within an hour.")
            time.sleep(_POLL)
        if info.get("aof_last_bgrewrite_status") != "ok":
            raise EngineError(
                "Redis could not rebuild its AOF from the restored snapshot; see redis.log."
            )
        self.marker.unlink(missing_ok=True)
