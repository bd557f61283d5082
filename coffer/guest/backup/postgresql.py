"""PostgreSQL backups: ``pg_basebackup -D - -Ft -X fetch`` (full), archived WAL (incremental),
and restores of either, to the end of a chain or to a point in time.

The base backup is one tar stream on stdout (a server with tablespaces besides the default ones
cannot stream that way; Coffer creates none). ``-X fetch`` puts the write-ahead log needed to make
the copy consistent into the same tar, so the stream alone restores. It connects as the agent's
admin account over the unix socket (``pg_hba.conf`` allows it replication connections there and
nowhere else), with the password in the environment, never on the command line.

The stream's first member is ``backup_label``; its START WAL LOCATION, CHECKPOINT LOCATION and
timeline are read as the stream passes and recorded as the backup's ``engine_position``.

An incremental backup is the write-ahead log since its parent: it writes a marker record
(``pg_logical_emit_message``), whose end is the backup's point (``end_lsn``), closes the current
WAL file (``pg_switch_wal()``), waits until the archiver (``coffer.guest.backup.archive``) has
stored it, and streams every WAL file from the parent's start (a full parent's first WAL file, or
the one after an incremental parent's last) through that one, read back from the archive and
verified, as one tar. So it is self-contained: it does not need the archive to be kept.

Restore untars the base backup into a staging directory, drops configuration files Coffer keeps
in ``etc/`` and, for a chain or a point in time, recovers there before anything reaches
``data/``: the incrementals' WAL (and, for a point in time, the archived WAL files up to the first
one written at or after the target time, each verified as it is fetched) goes into a directory
``restore_command`` copies from, and a single-user ``postgres`` replays it with
``recovery_target_lsn`` = the last incremental's ``end_lsn`` or ``recovery_target_time``
(exclusive: the last transaction committed before the target is the last one kept), then
promotes. The tree then moves into the empty data directory, ``PG_VERSION`` last. At the first
start ``os_admin`` gets this instance's own password.
"""

from __future__ import annotations

import json
import shutil
import tarfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from coffer.errors import EngineError
from coffer.guest.backup.archive import (
    SEGMENT,
    SEGMENT_SIZE,
    Archiver,
    LogSource,
    PointInTime,
    WalSpool,
    next_segment,
    parse_lsn,
    segment_name,
    segment_number,
)
from coffer.guest.backup.base import BackupSource, EngineBackup, Payload, find_tool
from coffer.guest.layout import chown_to

_TAR_BLOCK = 512
#: Files a base backup may carry that Coffer's instances keep elsewhere or must not start with.
_DROP_ON_RESTORE = (
    "postgresql.conf",
    "pg_hba.conf",
    "pg_ident.conf",
    "standby.signal",
    "recovery.signal",
)
#: The first member of an incremental backup's tar: where its WAL starts, ends and its point.
MANIFEST = "coffer-wal.json"
#: What a single-user server says when the WAL ran out before the recovery target.
_RAN_OUT = "recovery ended before configured recovery target was reached"
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
    incremental: ClassVar[bool] = True
    point_in_time: ClassVar[bool] = True
    #: Seconds an incremental backup waits for its last WAL file to reach the archive.
    archive_wait: ClassVar[float] = 300.0

    def backup(
        self,
        backup_id: str,
        parent: Mapping[str, Any] | None = None,
        archive: Archiver | None = None,
    ) -> BackupSource:
        if parent is not None:
            return self._incremental(backup_id, parent, archive)
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
            found = parse_backup_label(tap.label)
            found["backup_type"] = "full"
            return found

        return BackupSource(chunks(), position)

    def archive_source(self) -> LogSource:
        return WalSpool(self.layout, self.access.owner, self.access)

    # -- incremental ---------------------------------------------------------------------------

    def _incremental(
        self, backup_id: str, parent: Mapping[str, Any], archive: Archiver | None
    ) -> BackupSource:
        if parent.get("backup_type") == "incremental":
            last = str(parent.get("wal_to", ""))
            first = next_segment(last) if SEGMENT.fullmatch(last) else ""
        else:
            first = str(parent.get("start_wal_file", ""))
        if not SEGMENT.fullmatch(first):
            raise EngineError(
                "The parent backup recorded no WAL position, so no incremental backup can start "
                "from it; take a full backup."
            )
        if archive is None or archive.target() is None:
            raise EngineError(
                "Incremental PostgreSQL backups need WAL archiving, which is not enabled on this "
                "instance; take a full backup."
            )
        position: dict[str, Any] = {}

        def chunks() -> Iterator[bytes]:
            end_lsn, last = self._close_wal(backup_id)
            if segment_number(last) < segment_number(first) or last[:8] != first[:8]:
                raise EngineError(
                    f"The server's WAL ({last}) is not after the parent backup's ({first}); the "
                    "parent belongs to another timeline. Take a full backup."
                )
            archive.wait_archived(last, self.archive_wait)
            names = [
                segment_name(int(first[:8], 16), number)
                for number in range(segment_number(first), segment_number(last) + 1)
            ]
            manifest = {
                "backup_id": backup_id,
                "timeline": int(first[:8], 16),
                "wal_from": first,
                "wal_to": last,
                "end_lsn": end_lsn,
            }
            yield from _tar_member(MANIFEST, [json.dumps(manifest).encode()])
            with archive.reader() as reader:
                for name in names:
                    yield from _tar_member(
                        name, _exactly(reader.open(name), SEGMENT_SIZE, name), SEGMENT_SIZE
                    )
            yield b"\0" * (_TAR_BLOCK * 2)
            position.update(manifest, backup_type="incremental")
            position.pop("backup_id", None)

        return BackupSource(chunks(), lambda: dict(position))

    def _close_wal(self, backup_id: str) -> tuple[str, str]:
        """Write the backup's marker record and close its WAL file: (end LSN, last file name)."""
        import psycopg

        try:
            with psycopg.connect(
                host=str(self.access.socket.parent),
                port=self.access.port,
                user="os_admin",
                password=self.access.password(),
                dbname="postgres",
                autocommit=True,
                connect_timeout=10,
                application_name="coffer-backup",
                sslmode="disable",
            ) as conn:
                marker = conn.execute(
                    "SELECT pg_logical_emit_message(false, 'coffer', %s)::text",
                    (f"incremental backup {backup_id}",),
                ).fetchone()
                switched = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()
        except psycopg.Error as exc:
            raise EngineError(
                f"Could not close the WAL for the incremental backup ({type(exc).__name__}); is "
                "the instance running?"
            ) from None
        if marker is None or switched is None:
            raise EngineError("The server did not say where its WAL ends.")
        return str(marker[0]), str(switched[0])

    # -- restore --------------------------------------------------------------------------------

    def restore(self, payloads: Sequence[Payload], pitr: PointInTime | None = None) -> None:
        self._check_chain(payloads)
        tar = find_tool("tar")
        staging = self._staging()
        wal_dir = self.layout.root / ".restore-wal"
        try:
            self.tool_input(
                [tar, "--extract", "--file=-", f"--directory={staging}", "--no-same-owner"],
                payloads[0](),
                "tar",
                self._log("restore-tar.log"),
            )
            label = staging / "backup_label"
            if not label.is_file():
                raise EngineError(
                    "The backup holds no backup_label; it is not a PostgreSQL base backup."
                )
            for name in _DROP_ON_RESTORE:
                (staging / name).unlink(missing_ok=True)
            if len(payloads) > 1 or pitr is not None:
                shutil.rmtree(wal_dir, ignore_errors=True)
                wal_dir.mkdir(mode=0o700)
                chown_to(wal_dir, self.access.owner)
                manifest: dict[str, Any] = {}
                for payload in payloads[1:]:
                    self.tool_input(
                        [tar, "--extract", "--file=-", f"--directory={wal_dir}", "--no-same-owner"],
                        payload(),
                        "tar",
                        self._log("restore-tar.log"),
                    )
                    manifest = self._manifest(wal_dir)
                if pitr is not None:
                    if manifest:
                        start = next_segment(str(manifest["wal_to"]))
                    else:
                        start = str(parse_backup_label(label.read_text()).get("start_wal_file"))
                    self._fetch_archive(pitr, start, wal_dir)
                    targets = {"recovery_target_time": pitr.target_time.isoformat()}
                else:
                    targets = {"recovery_target_lsn": str(manifest["end_lsn"])}
                self._recover(staging, wal_dir, targets, may_run_out=pitr is not None)
            self._install(staging, last="PG_VERSION")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(wal_dir, ignore_errors=True)
            shutil.rmtree(self.layout.root / ".restore-recovery", ignore_errors=True)

    def _manifest(self, wal_dir: Path) -> dict[str, Any]:
        path = wal_dir / MANIFEST
        try:
            manifest = json.loads(path.read_text())
            parse_lsn(str(manifest["end_lsn"]))
            if not SEGMENT.fullmatch(str(manifest["wal_to"])):
                raise ValueError
        except (OSError, ValueError, KeyError, TypeError):
            raise EngineError(
                "An incremental backup of the chain holds no WAL manifest; it is not a "
                "PostgreSQL incremental backup."
            ) from None
        path.unlink()
        return dict(manifest)

    def _fetch_archive(self, pitr: PointInTime, start: str, wal_dir: Path) -> None:
        """Fetch (verified) the archived WAL from ``start`` to the first file written at or
        after the target time (through the newest one for a time the source spent idle, see
        ``PointInTime.idle_covers``), and every timeline history file."""
        if not SEGMENT.fullmatch(start):
            raise EngineError("The backup does not say where its WAL starts.")
        timeline, first = start[:8], segment_number(start)
        reached = False
        expected = first
        for name in pitr.reader.names():
            if name.endswith(".history"):
                pitr.reader.fetch(name, wal_dir / name, self.access.owner)
                continue
            if not SEGMENT.fullmatch(name) or name[:8] != timeline:
                continue
            number = segment_number(name)
            if number < first or reached:
                continue
            if number != expected:
                break  # a gap: nothing after it can be replayed
            pitr.reader.fetch(name, wal_dir / name, self.access.owner)
            expected += 1
            written = pitr.reader.segment_time(name)
            if written is not None and written >= pitr.target_time:
                reached = True
        last = segment_name(int(timeline, 16), expected - 1) if expected > first else ""
        if not reached and not pitr.idle_covers(last):
            raise EngineError(
                "The WAL archive does not reach the requested time "
                f"{pitr.target_time.isoformat()}; choose an earlier one."
            )

    def _recover(
        self, staging: Path, wal_dir: Path, targets: dict[str, str], may_run_out: bool
    ) -> None:
        """Replay the WAL in ``wal_dir`` over the base backup in ``staging`` up to ``targets``,
        then promote, in a single-user server that listens nowhere."""
        work = self.layout.root / ".restore-recovery"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(mode=0o700)
        chown_to(work, self.access.owner)
        for name in ("hba.conf", "ident.conf"):
            (work / name).write_text("")
            chown_to(work / name, self.access.owner)
        log = self._log("restore-recovery.log")

        def run(with_targets: bool) -> None:
            settings = {
                "hba_file": str(work / "hba.conf"),
                "ident_file": str(work / "ident.conf"),
                "listen_addresses": "",
                "shared_buffers": "32MB",
                "hot_standby": "off",
                "archive_mode": "off",
                "timezone": "UTC",
                "log_timezone": "UTC",
                "lc_messages": "C",
                "log_min_messages": "log",
                "restore_command": f"cp {wal_dir}/%f %p",
                "recovery_target_timeline": "current",
                "recovery_target_action": "promote",
            }
            if with_targets:
                settings.update(targets)
                settings["recovery_target_inclusive"] = "off"
            conf = work / "recovery.conf"
            conf.write_text("".join(f"{key} = '{value}'\n" for key, value in settings.items()))
            chown_to(conf, self.access.owner)
            signal = staging / "recovery.signal"
            signal.write_text("")
            chown_to(signal, self.access.owner)
            self.run_tool(
                [
                    _bin("postgres"),
                    "--single",
                    "-D",
                    str(staging),
                    f"--config-file={conf}",
                    "postgres",
                ],
                "PostgreSQL recovery",
                log,
            )

        try:
            run(with_targets=True)
        except EngineError:
            # Every archived transaction is older than the target (the archive reaches it, but
            # nothing committed between): replaying all of it is exactly the state at the target.
            if not may_run_out or not any(_RAN_OUT in line for line in self._tail(log, 40)):
                raise
            run(with_targets=False)
        (staging / "recovery.signal").unlink(missing_ok=True)
        if not (staging / "backup_label.old").exists() and (staging / "backup_label").exists():
            raise EngineError("PostgreSQL recovery did not finish; the backup was not restored.")


def _tar_member(name: str, body: Iterable[bytes], size: int | None = None) -> Iterator[bytes]:
    """One tar member (ustar header, body, padding); ``body``'s total length must be ``size``
    (the joined body is measured when no size is given: only for small members)."""
    if size is None:
        data = b"".join(body)
        body, size = [data], len(data)
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o600
    info.mtime = int(time.time())
    yield info.tobuf(format=tarfile.USTAR_FORMAT)
    sent = 0
    for piece in body:
        sent += len(piece)
        yield piece
    if sent != size:
        raise EngineError(f"{name} is {sent} bytes, not the {size} its tar header says.")
    if size % _TAR_BLOCK:
        yield b"\0" * (_TAR_BLOCK - size % _TAR_BLOCK)


def _exactly(chunks: Iterator[bytes], size: int, name: str) -> Iterator[bytes]:
    """Pass ``chunks`` on, refusing a WAL file of any size but ``size``."""
    sent = 0
    for piece in chunks:
        sent += len(piece)
        if sent > size:
            raise EngineError(f"The archived {name} is longer than a WAL segment.")
        yield piece
    if sent != size:
        raise EngineError(f"The archived {name} is shorter than a WAL segment.")
