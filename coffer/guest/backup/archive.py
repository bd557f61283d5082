"""Continuous archiving of PostgreSQL's write-ahead log to the backup store.

The server copies each completed WAL file into a spool directory on the instance's volume with a
small ``archive_command`` script (``pg_archive_script``): copy to a hidden temporary name, keep the
segment's modification time, fsync, rename, fsync the directory; a file already spooled under the
same name is accepted only if it is byte for byte the same. The script keeps nothing while the
spool directory does not exist, so an instance that was never backed up spends no disk on it:
archiving starts (``Archiver.enable``) with the instance's first backup, before the engine tool
runs, so every segment from that backup's start on is kept.

The ``Archiver`` thread of the guest agent looks at the spool every few seconds (a directory
listing; no SQL, nothing else when it is empty), and uploads each spooled file in name order,
which is WAL order, sealed with the backup stream format (``coffer.backup``) under the archive
key the taskmanager derived for this instance (``archive:<instance id>``; the master key never
reaches a guest), to ``<project>/archive/<instance id>/<file name>``, then deletes the spooled
file. A failed upload is retried with a growing pause and the file stays spooled until it is
stored, so no segment is ever skipped: the archive is contiguous. The sealed object carries its
wrapped data key in the object's metadata; each chunk is authenticated and bound to the object's
name, so a swapped, cut or altered object does not open.

After uploads the archiver reports the archive's extent to the conductor: the newest archived
segment, the WAL position where it ends and its time (the segment's last write, less a second of
margin): every transaction committed before that time is in the archive. An idle server writes no
new segment, so with nothing spooled the archiver asks the server, at most every ``IDLE_CHECK``
seconds, where its WAL ends (``WalSpool.covered_until``): when nothing but standby snapshots lies
past the newest archived segment, every commit before the moment it asked is archived, and the
extent's time moves to that moment (less the margin).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import re
import struct
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from coffer.errors import CofferError, EngineError, ValidationError
from coffer.guest.layout import InstanceLayout, chown_to

if TYPE_CHECKING:
    # The sealed-stream pipeline and the storage drivers load only when archiving runs: the
    # datastore imports this module for its server settings.
    from coffer.guest.backup.base import EngineAccess
    from coffer.storage.base import BackupStorage

LOG = logging.getLogger(__name__)

#: The spool directory (in the instance's volume) and the archiver's state file (in ``state/``).
SPOOL_DIR = "wal-spool"
STATE_FILE = "archive.json"
#: ``archive_timeout`` until the control plane says otherwise: the archive lags at most this.
DEFAULT_TIMEOUT = 60
#: Seconds between two looks at an empty spool, and the longest pause after failed uploads.
DEFAULT_INTERVAL = 5.0
MAX_BACKOFF = 300.0
#: Subtracted from a segment's last write to give the archive's extent (see the module doc).
EXTENT_MARGIN = timedelta(seconds=1)
#: PostgreSQL's default WAL segment size (Coffer's initdb keeps it).
SEGMENT_SIZE = 16 * 1024 * 1024
#: Seconds between two questions to an idle PostgreSQL server about its unarchived WAL.
IDLE_CHECK = 30.0

SEGMENT = re.compile(r"[0-9A-F]{24}")
#: MariaDB's binary log files (``log-bin`` base name and a sequence number).
BINLOG_BASE = "mariadb-bin"
BINLOG = re.compile(rf"{BINLOG_BASE}\.(\d{{6,}})")
#: What the server archives: segments, timeline histories, backup history files, partials.
_ARCHIVED = re.compile(r"[0-9A-F]{8}(?:[0-9A-F]{16}(?:\.[0-9A-F]{8}\.backup|\.partial)?|\.history)")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}")
#: Any archived file's name (WAL files, binary logs).
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,120}")


# --- names and positions -------------------------------------------------------------------------


def segment_number(name: str) -> int:
    """The segment number of a WAL file name (timeline left out)."""
    if not SEGMENT.fullmatch(name):
        raise ValueError(f"{name!r} is not a WAL segment name")
    per_id = 0x100000000 // SEGMENT_SIZE
    return int(name[8:16], 16) * per_id + int(name[16:24], 16)


def segment_name(timeline: int, number: int) -> str:
    per_id = 0x100000000 // SEGMENT_SIZE
    return f"{timeline:08X}{number // per_id:08X}{number % per_id:08X}"


def next_segment(name: str) -> str:
    return segment_name(int(name[:8], 16), segment_number(name) + 1)


def format_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    high, sep, low = text.partition("/")
    if not sep:
        raise ValueError(f"{text!r} is not a WAL position")
    return (int(high, 16) << 32) | int(low, 16)


def segment_end_lsn(name: str) -> str:
    """The WAL position just after the last byte of segment ``name``."""
    return format_lsn((segment_number(name) + 1) * SEGMENT_SIZE)


# --- what the taskmanager sends ------------------------------------------------------------------


@dataclass(frozen=True)
class ArchiveTarget:
    """Where one instance's archive lives and the key its objects are sealed with."""

    instance_id: str
    storage: dict[str, Any]
    prefix: str
    key: bytes
    timeout: int = DEFAULT_TIMEOUT

    def __repr__(self) -> str:
        return f"ArchiveTarget(instance_id={self.instance_id!r}, prefix={self.prefix!r})"

    @classmethod
    def from_request(cls, spec: object) -> ArchiveTarget:
        """From a request's ``archive`` object; ValidationError (naming no secret) otherwise."""
        if not isinstance(spec, dict):
            raise ValidationError("The archive settings in the request must be an object.")
        instance_id = spec.get("instance_id")
        if not isinstance(instance_id, str) or not _ID.fullmatch(instance_id):
            raise ValidationError("The archive settings name no valid instance id.")
        prefix = spec.get("prefix")
        if not isinstance(prefix, str) or not prefix or prefix.endswith("/"):
            raise ValidationError("The archive settings name no storage prefix.")
        storage = spec.get("storage")
        if not isinstance(storage, dict) or "driver" not in storage:
            raise ValidationError("The archive settings do not say which storage to use.")
        try:
            key = base64.b64decode(str(spec.get("key")), validate=True)
        except (binascii.Error, ValueError):
            key = b""
        if len(key) != 32:
            raise ValidationError("The archive key in the request is not a base64 32-byte key.")
        timeout = spec.get("timeout", DEFAULT_TIMEOUT)
        if not isinstance(timeout, int) or isinstance(timeout, bool) or not 1 <= timeout <= 86400:
            raise ValidationError("The archive timeout must be a whole number of seconds.")
        return cls(instance_id, dict(storage), prefix, key, timeout)

    def to_request(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "storage": self.storage,
            "prefix": self.prefix,
            "key": base64.b64encode(self.key).decode(),
            "timeout": self.timeout,
        }

    def object_key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def stream_id(self, name: str) -> str:
        """What each sealed object is bound to: its instance and file name."""
        return f"archive:{self.instance_id}:{name}"


# --- the server side: postgresql.conf settings and the archive_command script ---------------------


def spool_dir(layout: InstanceLayout) -> Path:
    return layout.root / SPOOL_DIR


def script_path(layout: InstanceLayout) -> Path:
    return layout.etc_dir / "archive-wal.sh"


def pg_archive_settings(layout: InstanceLayout) -> dict[str, str]:
    """The postgresql.conf lines that make the server spool each completed WAL file."""
    return {
        "archive_mode": "on",
        "archive_command": f"/bin/sh {script_path(layout)} %p %f",
        "archive_timeout": f"{configured_timeout(layout)}s",
    }


def configured_timeout(layout: InstanceLayout) -> int:
    """``archive_timeout`` in seconds: the control plane's, once archiving was enabled."""
    try:
        data = json.loads((layout.root / "state" / STATE_FILE).read_text())
        timeout = int(data["timeout"])
    except (OSError, ValueError, KeyError, TypeError):
        return DEFAULT_TIMEOUT
    return timeout if 1 <= timeout <= 86400 else DEFAULT_TIMEOUT


def pg_archive_script(layout: InstanceLayout) -> str:
    """The ``archive_command`` script (run by the server as the engine user, in ``data/``)."""
    spool = spool_dir(layout)
    return (
        "# Written by Coffer at every start; edits here are lost.\n"
        "# Spools one completed WAL file ($1, its path; $2, its name) for the guest agent's\n"
        "# archiver. Keeps nothing until archiving is enabled (the spool directory exists).\n"
        "set -e\n"
        f"spool={spool}\n"
        '[ -d "$spool" ] || exit 0\n'
        'dest="$spool/$2"\n'
        'if [ -e "$dest" ]; then\n'
        '  cmp -s "$1" "$dest"\n'
        "  exit $?\n"
        "fi\n"
        'tmp="$spool/.$2.tmp"\n'
        'cp "$1" "$tmp"\n'
        'touch -r "$1" "$tmp"\n'
        'sync "$tmp"\n'
        'mv "$tmp" "$dest"\n'
        'sync "$spool"\n'
    )


@dataclass(frozen=True)
class PointInTime:
    """What a point-in-time restore needs besides its backups: the source's archive and when.

    ``newest`` and ``covered`` are the archive's extent the control plane checked the time
    against (its newest file, and a time before which that file and the ones before it hold
    every commit); None when the request did not carry them."""

    reader: ArchiveReader
    target_time: datetime
    newest: str | None = None
    covered: datetime | None = None

    def idle_covers(self, fetched: str) -> bool:
        """True if the target time lies after the last write of every file fetched, through
        ``fetched``, and the extent says nothing was committed between (the source was idle):
        replaying all of them is then exactly the state at the target time."""
        return (
            bool(fetched)
            and fetched == self.newest
            and self.covered is not None
            and self.target_time <= self.covered
        )


def binlog_dir(layout: InstanceLayout) -> Path:
    """MariaDB's binary logs: in the instance's volume, beside (not in) the data directory."""
    return layout.root / "binlog"


def mariadb_binlog_settings(layout: InstanceLayout) -> dict[str, str]:
    """The option-file lines that give a MariaDB server a row-based binary log to archive."""
    directory = binlog_dir(layout)
    archived = (layout.root / "state" / STATE_FILE).exists()
    return {
        "log-bin": str(directory / BINLOG_BASE),
        "log-bin-index": str(directory / f"{BINLOG_BASE}.index"),
        "binlog-format": "ROW",
        "server-id": "1",
        # Row events replay exactly, so stored functions need no SUPER to be created.
        "log-bin-trust-function-creators": "1",
        # Once archiving runs, the archiver purges what it stored; until then, a day is kept.
        "binlog-expire-logs-seconds": "0" if archived else "86400",
    }


# --- reading the archive back ----------------------------------------------------------------


class ArchiveReader:
    """Reads one instance's archive: which files it holds, and each one opened and verified."""

    def __init__(self, storage: BackupStorage, target: ArchiveTarget) -> None:
        self.storage = storage
        self.target = target

    def names(self) -> list[str]:
        """Every archived file name, sorted (WAL order; binary log order)."""
        base = self.target.prefix + "/"
        found = []
        for item in self.storage.list(base):
            name = item.key[len(base) :]
            if _NAME.fullmatch(name):
                found.append(name)
        return sorted(found)

    def segment_time(self, name: str) -> datetime | None:
        """When segment ``name`` was last written (recorded at upload); None if not archived."""
        stat = self.storage.stat(self.target.object_key(name))
        if stat is None:
            return None
        return _parse_time(stat.metadata.get("wal-time"))

    def open(self, name: str) -> Iterator[bytes]:
        """The original bytes of archived file ``name``; each chunk authenticated as it is read
        (``BackupIntegrityError`` on any damage), ``StorageNotFound`` if it is not there."""
        from coffer.backup import open_stream
        from coffer.storage.base import StorageNotFound

        key = self.target.object_key(name)
        stat = self.storage.stat(key)
        if stat is None:
            raise StorageNotFound(f"The archive holds no {name}.")
        wrapped = stat.metadata.get("wrapped-key", "")
        return open_stream(
            self.storage.get_stream(key), self.target.key, self.target.stream_id(name), wrapped
        )

    def fetch(self, name: str, dest: Path, owner: str | None) -> None:
        """Write archived file ``name`` to ``dest``, which appears only once fully verified."""
        tmp = dest.with_name(f".{dest.name}.tmp")
        try:
            with open(tmp, "wb") as out:
                for piece in self.open(name):
                    out.write(piece)
                out.flush()
                os.fsync(out.fileno())
            chown_to(tmp, owner)
            tmp.replace(dest)
        finally:
            tmp.unlink(missing_ok=True)


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value).astimezone(UTC)
    except ValueError:
        return None


# --- has an idle PostgreSQL server written anything unarchived? ------------------------------

#: WAL pages are 8 KiB; a segment's first page opens with a 40-byte header; records are 8-byte
#: aligned, each with a 24-byte header (length, transaction id, previous record, info, rmgr).
WAL_PAGE = 8192
LONG_PAGE_HEADER = 40
_PAGE_HEADER = struct.Struct("<HHIQ")
_RECORD_HEADER = struct.Struct("<IIQBB")
_XLP_FIRST_IS_CONTRECORD = 0x0001
_XLP_LONG_HEADER = 0x0002
#: The standby snapshot (``RUNNING_XACTS``, resource manager 8): logged by the background writer
#: after activity, it changes no data, and ``archive_timeout`` does not close a file holding only
#: such records, so on an idle server one often stays past the archived WAL for good.
_RM_STANDBY = 8
_RUNNING_XACTS = 0x10


@dataclass(frozen=True)
class WalPosition:
    """Where the server's WAL stands: its timeline, the insert position (the end of the last
    record reserved) and the write position (bytes handed to the file system)."""

    timeline: int
    insert: int
    written: int


def nothing_unarchived(newest: str, at: WalPosition, read: Callable[[str, int], bytes]) -> bool:
    """True if no WAL record that could hold a commit lies past archived segment ``newest``
    (every segment before it being archived too): the server's insert position is at the start
    of the next segment (a WAL switch leaves it just past that segment's page header), or only
    standby snapshots lie between that start and the position, within the segment's first page
    and already written; ``read(name, length)`` gives the first bytes of WAL file ``name``.
    Anything else, including another timeline, is taken as unarchived work."""
    if not SEGMENT.fullmatch(newest) or int(newest[:8], 16) != at.timeline:
        return False
    start = (segment_number(newest) + 1) * SEGMENT_SIZE
    if at.insert < start:
        return False  # the server is behind its own archive: not a state to reason about
    if at.insert <= start + LONG_PAGE_HEADER:
        return True
    if at.insert - start > WAL_PAGE or at.written < at.insert:
        return False
    name = segment_name(at.timeline, segment_number(newest) + 1)
    return only_standby_snapshots(read(name, at.insert - start), start, at.timeline)


def only_standby_snapshots(head: bytes, start: int, timeline: int) -> bool:
    """True if ``head``, the first bytes of the WAL segment at position ``start`` through the
    insert position, holds whole standby snapshot records only, each linked to the one before."""
    if len(head) < LONG_PAGE_HEADER or len(head) > WAL_PAGE:
        return False
    _, info, page_timeline, page_address = _PAGE_HEADER.unpack_from(head)
    if (
        page_address != start
        or page_timeline != timeline
        or not info & _XLP_LONG_HEADER
        or info & _XLP_FIRST_IS_CONTRECORD
    ):
        return False
    pos, previous = LONG_PAGE_HEADER, None
    while pos < len(head):
        if len(head) - pos < _RECORD_HEADER.size:
            return False
        length, xid, prev, rec_info, rmgr = _RECORD_HEADER.unpack_from(head, pos)
        linked = prev < start if previous is None else prev == previous
        if (
            length < _RECORD_HEADER.size
            or pos + length > len(head)
            or not linked
            or xid != 0
            or rmgr != _RM_STANDBY
            or rec_info & 0xF0 != _RUNNING_XACTS
        ):
            return False
        previous = start + pos
        pos += (length + 7) & ~7
    return pos == len(head)


# --- the archiver thread ---------------------------------------------------------------------


Report = Callable[[dict[str, Any]], None]
Storage = Callable[[dict[str, Any]], "BackupStorage"]


class LogSource(ABC):
    """Where an engine's completed log files wait for the archiver, and what to do with them."""

    #: What one file is called in messages ("WAL file", "binary log").
    kind: ClassVar[str] = "log file"

    @abstractmethod
    def enable(self) -> None:
        """Start keeping completed files for the archiver (idempotent)."""

    @abstractmethod
    def pending(self) -> list[Path]:
        """Completed files not archived yet, oldest first (cheap: no SQL)."""

    @abstractmethod
    def uploaded(self, path: Path) -> None:
        """``path`` is safely in the archive: forget it (and free its space when possible)."""

    def after_uploads(self) -> None:  # noqa: B027 - optional hook
        """Called once after a batch of uploads."""

    def tick(self, timeout: int) -> datetime | None:
        """Called at every look at the source: close the current file if ``timeout`` says so.
        Returns a time before which every commit is in a completed file, when the source can
        tell the current file holds none (an idle engine), else None."""
        return None

    def covered_until(self, extent: dict[str, Any]) -> datetime | None:
        """Asked, at most every ``Archiver.idle_every`` seconds, when nothing waits for upload:
        a time before which every commit is in the archive that ends with ``extent``'s file,
        when the engine can tell nothing was committed after that file (an idle engine); else
        None. May ask the engine (SQL); errors are the archiver's to log."""
        return None

    @abstractmethod
    def extent_of(self, name: str, written: datetime) -> dict[str, Any] | None:
        """The extent once ``name`` (last written at ``written``) is archived; None if that
        file does not move it (a history file)."""

    @staticmethod
    def order(name: str) -> tuple[Any, ...]:
        return (name,)


class WalSpool(LogSource):
    """PostgreSQL: the spool directory the ``archive_command`` script copies WAL files into."""

    kind: ClassVar[str] = "WAL file"

    def __init__(
        self, layout: InstanceLayout, owner: str | None, access: EngineAccess | None = None
    ) -> None:
        self.spool = spool_dir(layout)
        self._owner = owner
        self._access = access

    def enable(self) -> None:
        if not self.spool.is_dir():
            self.spool.mkdir(mode=0o700, exist_ok=True)
            chown_to(self.spool, self._owner)

    def pending(self) -> list[Path]:
        try:
            with os.scandir(self.spool) as entries:
                names = [e.name for e in entries if _ARCHIVED.fullmatch(e.name)]
        except FileNotFoundError:
            return []
        return [self.spool / name for name in sorted(names)]

    def uploaded(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            fd = os.open(self.spool, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def extent_of(self, name: str, written: datetime) -> dict[str, Any] | None:
        if not SEGMENT.fullmatch(name):
            return None
        return {
            "segment": name,
            "lsn": segment_end_lsn(name),
            "time": (written - EXTENT_MARGIN).isoformat(),
        }

    def covered_until(self, extent: dict[str, Any]) -> datetime | None:
        newest = str(extent.get("segment", ""))
        if self._access is None or not SEGMENT.fullmatch(newest):
            return None
        # Read before the server is asked: a commit stamped before this is in the WAL it reports
        # (its record follows its timestamp within the margin the extent leaves).
        asked = datetime.now(UTC)
        import psycopg

        access = self._access
        try:
            with psycopg.connect(
                host=str(access.socket.parent),
                port=access.port,
                user="os_admin",
                password=access.password(),
                dbname="postgres",
                autocommit=True,
                connect_timeout=10,
                application_name="coffer-archiver",
                sslmode="disable",
            ) as conn:
                row = conn.execute(
                    "SELECT pg_current_wal_insert_lsn()::text, pg_current_wal_lsn()::text,"
                    " pg_walfile_name(pg_current_wal_insert_lsn())"
                ).fetchone()
                if row is None:
                    return None
                at = WalPosition(int(str(row[2])[:8], 16), parse_lsn(row[0]), parse_lsn(row[1]))

                def read(name: str, length: int) -> bytes:
                    found = conn.execute(
                        "SELECT pg_read_binary_file(%s, 0, %s)", (f"pg_wal/{name}", length)
                    ).fetchone()
                    return bytes(found[0]) if found is not None else b""

                idle = nothing_unarchived(newest, at, read)
        except psycopg.Error as exc:
            # A server stopped, restarting or in recovery: the extent waits for the next look.
            LOG.debug("could not ask the server where its WAL ends (%s)", type(exc).__name__)
            return None
        return asked if idle else None

    @staticmethod
    def order(name: str) -> tuple[Any, ...]:
        return (name[8:], name[:8])


class Archiver:
    """Uploads an engine's completed log files (see the module docstring). One per agent."""

    def __init__(
        self,
        layout: InstanceLayout,
        source: LogSource,
        report: Report,
        open_storage: Storage,
        interval: float = DEFAULT_INTERVAL,
        idle_every: float = IDLE_CHECK,
    ) -> None:
        self.layout = layout
        self.source = source
        self.state_file = layout.root / "state" / STATE_FILE
        self._report = report
        self._open_storage = open_storage
        self.interval = interval
        #: Seconds between two ``covered_until`` questions (and so two idle extent reports),
        #: at most the archive timeout.
        self.idle_every = idle_every
        self._idle_asked = float("-inf")
        self._lock = threading.Lock()
        self._upload_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._target: ArchiveTarget | None = None
        self._extent: dict[str, Any] | None = None
        self._reported: dict[str, Any] | None = None

    # -- control ------------------------------------------------------------------------------

    def enable(self, target: ArchiveTarget) -> None:
        """Start keeping and uploading log to ``target`` (idempotent; kept across restarts)."""
        with self._lock:
            state = self._load()
            if state.get("target") != target.to_request():
                state["target"] = target.to_request()
                self._save(state)
                LOG.info("log archiving enabled to %s", target.prefix)
            self._target = target
            self._extent = state.get("extent") if isinstance(state.get("extent"), dict) else None
            self.source.enable()
        self.start()

    def resume(self) -> bool:
        """At agent start: carry on archiving if it was enabled before. True if it was."""
        state = self._load()
        if "target" not in state:
            return False
        try:
            target = ArchiveTarget.from_request(state["target"])
        except ValidationError:
            LOG.error("the archive settings in %s are unreadable; archiving stays off", STATE_FILE)
            return False
        self.enable(target)
        return True

    def target(self) -> ArchiveTarget | None:
        with self._lock:
            return self._target

    @contextlib.contextmanager
    def reader(self) -> Iterator[ArchiveReader]:
        """An ``ArchiveReader`` on this instance's archive (EngineError if archiving is off)."""
        target = self.target()
        if target is None:
            raise EngineError("WAL archiving is not enabled on this instance.")
        storage = self._open_storage(target.storage)
        try:
            yield ArchiveReader(storage, target)
        finally:
            storage.close()

    def extent(self) -> dict[str, Any] | None:
        with self._lock:
            return dict(self._extent) if self._extent else None

    def start(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="log-archiver", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def poke(self) -> None:
        """Look at the source now rather than at the next interval."""
        self._wake.set()

    # -- work ---------------------------------------------------------------------------------

    def pending(self) -> list[Path]:
        """Completed files waiting for upload, oldest first."""
        return self.source.pending()

    def upload_pending(self) -> int:
        """Upload every completed file in order; the number uploaded. Stops at the first failure
        (raised), leaving that file and the later ones for the next try."""
        target = self.target()
        if target is None:
            return 0
        with self._upload_lock:
            paths = self.pending()
            if not paths:
                return 0
            done = 0
            storage = self._open_storage(target.storage)
            try:
                for path in paths:
                    self._upload(storage, target, path)
                    done += 1
            finally:
                storage.close()
                if done:
                    self.source.after_uploads()
                    self._send_extent()
            return done

    def _upload(self, storage: BackupStorage, target: ArchiveTarget, path: Path) -> None:
        from coffer.backup import seal_stream
        from coffer.backup.stream import pending_wrapped_key

        name = path.name
        try:
            written = datetime.fromtimestamp(path.stat().st_mtime, UTC)
        except FileNotFoundError:
            return  # uploaded by a concurrent caller
        sealed, info_of = seal_stream(_file_chunks(path), target.key, target.stream_id(name))
        metadata = {
            "wrapped-key": pending_wrapped_key(info_of),
            "wal-time": written.isoformat(),
            "instance-id": target.instance_id,
        }
        stored = storage.put_stream(target.object_key(name), sealed, metadata)
        info = info_of()
        if stored.size != info.size or (stored.sha256 and stored.sha256 != info.checksum):
            storage.delete(target.object_key(name))
            raise EngineError(
                f"The store kept something other than {self.source.kind} {name}; retrying."
            )
        self.source.uploaded(path)
        extent = self.source.extent_of(name, written)
        if extent is not None:
            order = self.source.order
            with self._lock:
                known = self._extent
                if known is None or order(str(known.get("segment", ""))) < order(name):
                    self._extent = extent
                    state = self._load()
                    state["extent"] = extent
                    self._save(state)

    def _idle_extent(self, until: datetime, every: float, newest: str | None = None) -> None:
        """Nothing was committed since the newest archived file (``newest``, when the caller
        checked against a given one): the window reaches ``until`` (reported at most every
        ``every`` seconds, and only forward)."""
        if self.pending():
            return
        with self._lock:
            known = self._extent
            if known is None or (newest is not None and known.get("segment") != newest):
                return
            moved = until - EXTENT_MARGIN
            gained = moved - datetime.fromisoformat(str(known["time"]))
            if gained <= timedelta(0) or gained < timedelta(seconds=every):
                return
            self._extent = {**known, "time": moved.isoformat()}
            state = self._load()
            state["extent"] = self._extent
            self._save(state)
        self._send_extent()

    def _ask_idle(self, timeout: float) -> None:
        """With nothing spooled, ask the source (at most every ``idle_every`` seconds, or every
        archive ``timeout`` when that is shorter) whether the archive holds every commit up to
        now, and move the extent if it does."""
        now = time.monotonic()
        if now - self._idle_asked < min(self.idle_every, timeout) or self.pending():
            return
        known = self.extent()
        if known is None:
            return
        self._idle_asked = now
        until = self.source.covered_until(known)
        if until is not None:
            self._idle_extent(until, 0, str(known.get("segment", "")))

    def _send_extent(self) -> None:
        extent = self.extent()
        if extent is None or extent == self._reported:
            return
        try:
            self._report(extent)
            self._reported = extent
        except Exception as exc:
            LOG.warning("could not report the archive's extent: %s", exc)

    def wait_archived(self, name: str, timeout: float) -> None:
        """Wait until WAL file ``name`` (and so every earlier one) is in the archive."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            extent = self.extent()
            if extent is not None and extent["segment"][8:] >= name[8:]:
                return
            if self.target() is not None and self.pending():  # upload now, not at the next look
                with contextlib.suppress(Exception):
                    self.upload_pending()
                continue
            time.sleep(0.2)
        raise EngineError(
            f"WAL file {name} did not reach the archive within {timeout:g} s; the server may "
            "not be archiving (see its log)."
        )

    def _run(self) -> None:
        backoff = 0.0
        while not self._stop.is_set():
            self._wake.wait(backoff or self.interval)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                target = self.target()
                idle = self.source.tick(target.timeout) if target is not None else None
                self.upload_pending()
                if idle is not None and target is not None:
                    self._idle_extent(idle, target.timeout)
                elif target is not None:
                    self._ask_idle(target.timeout)
                backoff = 0.0
            except Exception as exc:
                backoff = min(MAX_BACKOFF, max(self.interval, backoff * 2))
                message = exc.message if isinstance(exc, CofferError) else type(exc).__name__
                LOG.warning("log archiving failed (%s); retrying in %.0f s", message, backoff)

    # -- state --------------------------------------------------------------------------------

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _save(self, state: dict[str, Any]) -> None:
        # Holds the archive key and the storage credentials: readable by the agent only.
        self.state_file.parent.mkdir(mode=0o700, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(state))
        tmp.replace(self.state_file)


def _file_chunks(path: Path, size: int = 1 << 20) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        while piece := handle.read(size):
            yield piece
