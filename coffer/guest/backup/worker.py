"""What the guest agent runs in the background for backups and restores.

A backup: the engine's stream (``datastore.backups``) → ``seal_stream`` (zstd, AES-256-GCM
chunks, SHA-256) → ``storage.put_stream`` under the key the taskmanager chose. Nothing is staged:
the store receives the bytes as the engine tool writes them. The store writes in a thread of its
own (``write_behind``), so reading the tool, compressing, encrypting and hashing go on while it
writes. Progress (raw and stored bytes) and
the result go to the conductor through ``report``; the result (or "the agent stopped") is also
kept in ``state/backups/<id>.json``, so a restarted agent answers ``backup_status`` truthfully and
the taskmanager can tell a backup that died with its agent from one still running.

A restore: every backup of the chain is verified completely first (each chunk's tag and the
checksum of the whole stored object, ``authenticate_stream``; a backup whose engine bytes the
request does not give is also decompressed, ``verify_stream``, to count them), and only then
streamed again through ``open_stream`` into the engine's handler, which fills a staging directory
and moves it into the empty data directory last. A tampered or corrupted backup is refused
before a single byte is written. The second pass checks again as it goes (tags, the zstd
frame, and, for handlers that read each backup to its end, the checksum and the recorded number
of engine bytes); if that fails the handler removes its staging directory, so nothing reaches
the data directory. Its
progress (engine bytes verified, then restored, and the rate; ``RestoreMeter``) goes to the
conductor through ``restore_report`` at each phase's start, twice a second while bytes pass,
and once the data is in place.

Keys: the taskmanager sends each backup's key-encryption key (derived from the operator's master
key for that backup id) with the request, sealed with this instance's key; the master key never
reaches a guest, and this worker never logs or reports a key.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from coffer.backup import BackupIntegrityError, authenticate_stream, open_stream, seal_stream
from coffer.backup.overlap import write_behind
from coffer.backup.progress import RestoreMeter
from coffer.errors import (
    CofferError,
    Conflict,
    EngineError,
    NotImplementedByDatastore,
    ValidationError,
)
from coffer.guest.backup import backups_of
from coffer.guest.backup.archive import Archiver, ArchiveReader, ArchiveTarget, PointInTime
from coffer.guest.datastores.base import Datastore
from coffer.storage.base import BackupStorage, get_storage

LOG = logging.getLogger(__name__)

#: Seconds between progress reports while a backup runs.
PROGRESS_INTERVAL = 2.0
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}")

Report = Callable[[str, dict[str, Any]], None]


def check_id(value: object, what: str = "backup id") -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ValidationError(f"The {what} {value!r} is not a valid id.")
    return value


def decode_key(value: object) -> bytes:
    """A base64 32-byte key from a request; ValidationError (naming no value) otherwise."""
    try:
        key = base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 32:
        raise ValidationError("The backup key in the request is not a base64 32-byte key.")
    return key


def open_storage(spec: dict[str, Any]) -> BackupStorage:
    """The storage driver a request describes (the ``[storage]`` options, driver included)."""
    from coffer.config import StorageSection

    if not isinstance(spec, dict) or "driver" not in spec:
        raise ValidationError("The request does not say which backup storage to use.")
    try:
        section = StorageSection.model_validate(spec)
    except Exception:
        raise ValidationError("The backup storage options in the request are invalid.") from None
    return get_storage(section.driver, section)


def describe(exc: BaseException) -> str:
    """A sentence for the backup's ``fail_reason`` (Coffer errors never carry secrets)."""
    if isinstance(exc, CofferError):
        return exc.message
    return f"The backup failed unexpectedly ({type(exc).__name__}); see the guest agent's log."


@dataclass(frozen=True)
class BackupRequest:
    backup_id: str
    storage: dict[str, Any]
    storage_key: str
    key: bytes
    parent: dict[str, Any] | None
    metadata: dict[str, str]
    archive: ArchiveTarget | None = None

    def __repr__(self) -> str:
        return f"BackupRequest(backup_id={self.backup_id!r}, storage_key={self.storage_key!r})"


@dataclass(frozen=True)
class ChainLink:
    """One backup of a restore chain: where it is and what it must verify against."""

    backup_id: str
    storage_key: str
    key: bytes
    wrapped_key: str
    checksum: str
    #: Its engine bytes as recorded when it was taken (None: not sent, by an older taskmanager).
    raw_size: int | None = None

    def __repr__(self) -> str:
        return f"ChainLink(backup_id={self.backup_id!r})"


class BackupWorker:
    """Runs one backup at a time and at most one restore, each in its own thread."""

    @property
    def datastore(self) -> Datastore:
        return self._datastore()

    def __init__(
        self,
        datastore: Callable[[], Datastore],
        state_dir: Path,
        report: Report,
        prepared: Callable[[], bool],
        archive_report: Callable[[dict[str, Any]], None] | None = None,
        restore_report: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        """``datastore`` returns the agent's current datastore (the agent may replace it);
        ``report(backup_id, fields)`` casts ``update_backup`` to the conductor; ``prepared``
        says whether the engine was ever prepared (a restore only fills a never-prepared one);
        ``archive_report(extent)`` casts ``update_archive`` (the WAL archive's extent);
        ``restore_report(fields)`` casts ``update_restore`` (a restore's progress, see
        ``RestoreMeter``)."""
        self._datastore = datastore
        self._archive_report = archive_report
        self._restore_report = restore_report
        self._archiver: Archiver | None = None
        self.results_dir = state_dir / "backups"
        self.restore_file = state_dir / "restore.json"
        self._report = report
        self._prepared = prepared
        self._lock = threading.Lock()
        self._running: str | None = None
        self._restore_thread: threading.Thread | None = None

    # -- the log archive -----------------------------------------------------------------------

    @property
    def archiver(self) -> Archiver:
        """The instance's log archiver (made on first use; idle until enabled)."""
        with self._lock:
            if self._archiver is None:
                handler = backups_of(self.datastore)
                source = handler.archive_source()
                if source is None:
                    raise NotImplementedByDatastore(
                        f"The {handler.manager} datastore keeps no log archive."
                    )
                self._archiver = Archiver(handler.layout, source, self._send_extent, open_storage)
            return self._archiver

    def resume_archiving(self) -> bool:
        """At agent start: carry on archiving if a backup enabled it before."""
        try:
            handler = backups_of(self.datastore)
        except CofferError:
            return False
        return handler.point_in_time and self.archiver.resume()

    def stop_archiving(self) -> None:
        if self._archiver is not None:
            self._archiver.stop()

    def _send_extent(self, extent: dict[str, Any]) -> None:
        if self._archive_report is not None:
            self._archive_report(extent)

    # -- backups -----------------------------------------------------------------------------

    def start_backup(
        self,
        backup_id: str,
        storage: dict[str, Any],
        storage_key: str,
        backup_key: str,
        parent: dict[str, Any] | None = None,
        metadata: dict[str, str] | None = None,
        archive: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Start taking backup ``backup_id`` in the background; its status at once.

        Idempotent: asking again for a backup this agent already runs or finished returns its
        status. Conflict if another backup runs, or a restore. Validation happens here, so a
        bad request fails the call instead of the backup.
        """
        check_id(backup_id)
        request = BackupRequest(
            backup_id,
            dict(storage),
            storage_key,
            decode_key(backup_key),
            dict(parent) if parent is not None else None,
            dict(metadata or {}),
            ArchiveTarget.from_request(archive) if archive is not None else None,
        )
        handler = backups_of(self.datastore)  # 501 before anything starts
        if request.archive is not None and handler.point_in_time:
            # Before the engine tool starts, so every WAL file from the backup's start is kept.
            self.archiver.enable(request.archive)
        with self._lock:
            known = self._load(backup_id) is not None
            if not known and self._running is not None:
                raise Conflict(
                    f"Backup {self._running} is still running on this instance; wait for it."
                )
            if self.restoring():
                raise Conflict("The instance is being restored; back it up once it is ready.")
            if not known:
                self._running = backup_id
                self._save(backup_id, {"state": "building"})
        if known:
            return self.backup_status(backup_id)
        thread = threading.Thread(
            target=self._run_backup, args=(request,), name=f"backup-{backup_id}", daemon=True
        )
        thread.start()
        return {"state": "building"}

    def backup_status(self, backup_id: str) -> dict[str, Any]:
        """``{"state": "building"|"completed"|"failed"|"unknown", ...}``.

        A backup recorded as building that no thread of this agent runs was cut off by an agent
        restart: it is reported (and recorded) as failed.
        """
        check_id(backup_id)
        with self._lock:
            result = self._load(backup_id)
            if result is None:
                return {"state": "unknown"}
            cut_off = result.get("state") == "building" and self._running != backup_id
            if cut_off:
                result = {
                    "state": "failed",
                    "reason": "The guest agent stopped while the backup was running.",
                }
                self._save(backup_id, result)
        if cut_off:
            self._send(backup_id, result)
        return result

    def _run_backup(self, request: BackupRequest) -> None:
        backup_id = request.backup_id
        self._send(backup_id, {"state": "building"})
        try:
            result = self._take(request)
        except BaseException as exc:
            if not isinstance(exc, CofferError):
                LOG.exception("backup %s failed", backup_id)
            else:
                LOG.warning("backup %s failed: %s", backup_id, exc.message)
            result = {"state": "failed", "reason": describe(exc)}
        with self._lock:
            self._save(backup_id, result)
            self._running = None
        self._send(backup_id, result)

    def _take(self, request: BackupRequest) -> dict[str, Any]:
        started = time.monotonic()
        handler = backups_of(self.datastore)
        archive = self.archiver if handler.point_in_time else None
        source = handler.backup(request.backup_id, request.parent, archive=archive)
        meter = _Meter(lambda fields: self._send(request.backup_id, fields))
        sealed, info_of = seal_stream(meter.raw(source), request.key, request.backup_id)
        storage = open_storage(request.storage)
        try:
            # The store writes (and hashes) in a thread of its own while this one reads the
            # engine tool, compresses, encrypts and hashes: neither waits for the other.
            stored = write_behind(
                lambda items: storage.put_stream(request.storage_key, items, request.metadata),
                meter.stored(sealed),
                name=f"store-{request.backup_id}",
            )
            info = info_of()
            if stored.size != info.size or (stored.sha256 and stored.sha256 != info.checksum):
                storage.delete(request.storage_key)
                raise EngineError(
                    "The store holds something other than what was sent; the backup was removed."
                )
            position = source.position()
        finally:
            # If the store gave up first, this stops the engine tool now rather than whenever
            # the half-read stream is garbage-collected.
            close = getattr(sealed, "close", None)
            if callable(close):
                close()
            storage.close()
        LOG.info(
            "backup %s: %d engine bytes stored as %d bytes in %.1f s",
            request.backup_id,
            info.raw_size,
            info.size,
            time.monotonic() - started,
        )
        return {
            "state": "completed",
            "size": info.size,
            "raw_size": info.raw_size,
            "checksum": info.checksum,
            "wrapped_key": info.wrapped_key,
            "engine_position": position,
        }

    def _send(self, backup_id: str, fields: dict[str, Any]) -> None:
        try:
            self._report(backup_id, fields)
        except Exception as exc:
            # The result is on disk; the taskmanager asks for it if the report is lost.
            LOG.warning("could not report backup %s: %s", backup_id, describe(exc))

    def _path(self, backup_id: str) -> Path:
        return self.results_dir / f"{backup_id}.json"

    def _load(self, backup_id: str) -> dict[str, Any] | None:
        try:
            data = json.loads(self._path(backup_id).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _save(self, backup_id: str, result: dict[str, Any]) -> None:
        self.results_dir.mkdir(mode=0o700, exist_ok=True)
        path = self._path(backup_id)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(path)

    # -- restore -------------------------------------------------------------------------------

    def restoring(self) -> bool:
        thread = self._restore_thread
        return thread is not None and thread.is_alive()

    def ensure_not_restoring(self) -> None:
        """Refuse (transiently) to prepare the engine while a restore fills its data directory."""
        if self.restoring():
            raise Conflict("A restore into this instance is still running; try again shortly.")

    def start_restore(
        self,
        backups: list[dict[str, Any]],
        storage: dict[str, Any],
        pitr: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Start restoring the chain ``backups`` (full first) in the background; its status.

        With ``pitr`` (``{"archive": <the source's archive settings>, "restore_time": ISO
        8601}``), the restored data is recovered to that time from the source's archived log.
        Idempotent: a restore that is running or finished is not started again.
        """
        if not isinstance(backups, list) or not backups:
            raise ValidationError("A restore needs the list of backups to restore, full first.")
        chain = []
        for item in backups:
            if not isinstance(item, dict):
                raise ValidationError("Each backup of a restore must be an object.")
            chain.append(
                ChainLink(
                    check_id(item.get("backup_id")),
                    str(item.get("storage_key")),
                    decode_key(item.get("backup_key")),
                    str(item.get("wrapped_key")),
                    str(item.get("checksum")),
                    _raw_size(item.get("raw_size")),
                )
            )
        point = _point_in_time(pitr)
        handler = backups_of(self.datastore)
        if point is not None and not handler.point_in_time:
            raise ValidationError(
                f"The {handler.manager} datastore has no point-in-time restore on this host."
            )
        with self._lock:
            status = self._restore_state()
            if status["state"] in ("running", "done"):
                return status
            self.restore_file.unlink(missing_ok=True)
            thread = threading.Thread(
                target=self._run_restore,
                args=(chain, dict(storage), point),
                name="restore",
                daemon=True,
            )
            self._restore_thread = thread
            thread.start()
        return {"state": "running"}

    def restore_status(self) -> dict[str, Any]:
        """``{"state": "idle"|"running"|"done"|"failed", "reason"?}``."""
        with self._lock:
            return self._restore_state()

    def _restore_state(self) -> dict[str, Any]:
        if self.restoring():
            return {"state": "running"}
        try:
            data = json.loads(self.restore_file.read_text())
        except (OSError, ValueError):
            return {"state": "idle"}
        return data if isinstance(data, dict) else {"state": "idle"}

    def _run_restore(
        self,
        chain: list[ChainLink],
        storage_spec: dict[str, Any],
        point: PointSpec | None = None,
    ) -> None:
        try:
            self._restore(chain, storage_spec, point)
            result: dict[str, Any] = {"state": "done", "backups": [c.backup_id for c in chain]}
        except BaseException as exc:
            if isinstance(exc, CofferError):
                LOG.warning("restore failed: %s", exc.message)
            else:
                LOG.exception("restore failed")
            result = {"state": "failed", "reason": describe(exc)}
        self._write_restore(result)

    def _restore(
        self,
        chain: list[ChainLink],
        storage_spec: dict[str, Any],
        point: PointSpec | None = None,
    ) -> None:
        handler = backups_of(self.datastore)
        storage = open_storage(storage_spec)
        archive_storage = open_storage(point[0].storage) if point is not None else None
        meter = RestoreMeter(self._send_restore)

        def opened(link: ChainLink) -> Iterator[bytes]:
            # The engine bytes of one backup, checked chunk by chunk and against the stored
            # object's checksum at its end (the checksum is always given here).
            pieces = open_stream(
                storage.get_stream(link.storage_key),
                link.key,
                link.backup_id,
                link.wrapped_key,
                link.checksum,
            )
            if link.raw_size is not None:
                pieces = _exact_length(pieces, link.raw_size, link.backup_id)
            return meter.wrap(pieces, part=link.backup_id)

        try:
            started = time.monotonic()
            meter.begin("verifying")
            for link in chain:
                before = meter.verified_bytes
                if link.raw_size is None:
                    # Its engine bytes are not known: decompress it too, to count them.
                    for _piece in opened(link):
                        pass
                else:
                    _authenticate(storage, link, meter)
                LOG.info(
                    "backup %s verified (%d bytes of engine data)",
                    link.backup_id,
                    meter.verified_bytes - before,
                )
            if self._prepared():
                raise EngineError("The instance is already prepared; it cannot be restored into.")
            self._clear_data_dir()

            def payload(link: ChainLink) -> Callable[[], Iterator[bytes]]:
                return lambda: opened(link)

            pitr = None
            if point is not None and archive_storage is not None:
                pitr = PointInTime(ArchiveReader(archive_storage, point[0]), *point[1:])
            meter.begin("restoring")
            handler.restore([payload(link) for link in chain], pitr=pitr)
            meter.finish()
            LOG.info(
                "restored %d backup(s), %d engine bytes, in %.1f s",
                len(chain),
                meter.restored_bytes,
                time.monotonic() - started,
            )
        finally:
            storage.close()
            if archive_storage is not None:
                archive_storage.close()

    def _send_restore(self, fields: dict[str, Any]) -> None:
        if self._restore_report is None:
            return
        try:
            self._restore_report(fields)
        except Exception as exc:
            # Progress only: the restore goes on, and its result is asked for by the taskmanager.
            LOG.warning("could not report the restore's progress: %s", describe(exc))

    def _clear_data_dir(self) -> None:
        # Only reached before the engine was ever prepared: what is there is a restore that was
        # cut off while moving its files in, never tenant data.
        data_dir = self.datastore.layout.data_dir
        if not data_dir.is_dir():
            return
        for entry in data_dir.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def _write_restore(self, result: dict[str, Any]) -> None:
        tmp = self.restore_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(self.restore_file)


#: A restore request's ``pitr``: the archive, the time, and the extent's newest file and time.
PointSpec = tuple[ArchiveTarget, datetime, str | None, datetime | None]


def _raw_size(value: object) -> int | None:
    """A chain link's recorded engine bytes: a non-negative integer, or absent."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValidationError("The raw size of a backup to restore must be a whole number.")
    return value


def _authenticate(storage: BackupStorage, link: ChainLink, meter: RestoreMeter) -> None:
    """The verifying pass over one backup whose engine bytes are known: every chunk's tag and
    the stored object's checksum (``authenticate_stream``), without decompressing it; the
    progress counts its engine bytes in proportion to the stored bytes read."""
    assert link.raw_size is not None
    raw_size = link.raw_size
    found = storage.stat(link.storage_key)
    stored_size = found.size if found is not None else 0
    counted = 0
    read = 0

    def counting(pieces: Iterator[bytes]) -> Iterator[bytes]:
        nonlocal counted, read
        try:
            for piece in pieces:
                read += len(piece)
                reached = min(raw_size, raw_size * read // stored_size) if stored_size else 0
                if reached > counted:
                    meter.add(reached - counted)
                    counted = reached
                yield piece
        finally:
            close = getattr(pieces, "close", None)
            if callable(close):
                close()

    authenticate_stream(
        counting(storage.get_stream(link.storage_key)),
        link.key,
        link.backup_id,
        link.wrapped_key,
        link.checksum,
    )
    if counted < raw_size:
        meter.add(raw_size - counted)


def _exact_length(pieces: Iterator[bytes], size: int, backup_id: str) -> Iterator[bytes]:
    """Pass a backup's engine bytes on, refusing more or fewer than were recorded for it."""
    passed = 0
    try:
        for piece in pieces:
            passed += len(piece)
            if passed > size:
                break
            yield piece
    finally:
        close = getattr(pieces, "close", None)
        if callable(close):
            close()
    if passed != size:
        raise BackupIntegrityError(
            backup_id,
            f"it holds {'more' if passed > size else 'fewer'} engine bytes than the {size} "
            "recorded when it was taken",
        )


def _point_in_time(pitr: object) -> PointSpec | None:
    """The archive, the (UTC) time of a restore request's ``pitr``, and the archive's extent
    the control plane checked it against (``extent``: newest file and time, if sent);
    ValidationError."""
    if pitr is None:
        return None
    if not isinstance(pitr, dict):
        raise ValidationError("pitr must be an object with archive and restore_time.")
    target = ArchiveTarget.from_request(pitr.get("archive"))
    when = _utc_time(pitr.get("restore_time"), "restore_time")
    extent = pitr.get("extent")
    if not isinstance(extent, dict):
        return target, when, None, None
    return target, when, str(extent.get("segment")), _utc_time(extent.get("time"), "extent")


def _utc_time(value: object, what: str) -> datetime:
    try:
        when = datetime.fromisoformat(str(value))
    except ValueError:
        raise ValidationError(f"{what} is not an ISO 8601 time.") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC)


class _Meter:
    """Counts engine bytes and stored bytes as they pass and reports progress now and then."""

    def __init__(self, send: Callable[[dict[str, Any]], None]) -> None:
        self._send = send
        self.raw_bytes = 0
        self.stored_bytes = 0
        self._last = time.monotonic()

    def raw(self, source: Iterable[bytes]) -> Iterator[bytes]:
        try:
            for piece in source:
                self.raw_bytes += len(piece)
                yield piece
        finally:
            close = getattr(source, "close", None)
            if callable(close):
                close()

    def stored(self, sealed: Iterable[bytes]) -> Iterator[bytes]:
        for piece in sealed:
            self.stored_bytes += len(piece)
            now = time.monotonic()
            if now - self._last >= PROGRESS_INTERVAL:
                self._last = now
                self._send(
                    {"state": "building", "size": self.stored_bytes, "raw_size": self.raw_bytes}
                )
            yield piece
